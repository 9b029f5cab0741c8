"""Parser for NBS subjects (NeRFBlendShape, Gao et al. 2022) re-tracked with metrical-tracker.

GraphAvatar trains on the NBS videos with a metrical-tracker re-track (FLAME meshes and
OpenCV cameras). Layout, all frame files named ``%05d``::

    <root>/head_neck_imgs/00000.png     RGB frames (from the NBS release)
    <root>/head_neck_mask/00000.png     foreground masks (255 = head and neck)
    <root>/transforms.json              NBS's frame list: frames[i].img_id (+ exp_ori,
                                        transform_matrix; fx, fy, cx, cy, h, w at top level)
    <tracker_root>/checkpoint/00000.frame   metrical-tracker's per-frame state (torch.save)
    <tracker_root>/mesh/00000.ply           tracked FLAME mesh, world space
    <tracker_root>/canonical.obj            the tracker's neutral mesh (optional)
    <tracker_root>/input/00000.png          the frame the tracker fitted (optional; checked)

The frame list and the test split come from ``transforms.json`` as NeRFBlendShape's reader
takes them (frames sorted by ``img_id``, the last 500 held out); GraphAvatar reads the same file
and names the images, masks and tracker files ``%05d`` of ``img_id``. GraphAvatar keeps only
``mask == 255`` as foreground and composites the targets over white (``mask_mode=binary`` and
``experiment=nbs_subject``). metrical-tracker crops its input by default (``crop_image = True``),
and its ``K`` then describes ``input/%05d.png``: ``tracker_crop`` detects that (sizes, and the
content of ``input/`` where it exists) and refuses, or maps ``K`` onto the NBS frames with the
tracker's crop box.

``tracker_root`` defaults to ``root`` (everything in one folder); GraphAvatar's code keeps the
tracker output in a sibling folder, which ``tracker_root`` points at.

A ``.frame`` file is the dict metrical-tracker's ``save_checkpoint`` writes (numpy arrays or,
in some re-saves, torch tensors, each with a leading batch dimension of 1)::

    flame:   exp [1, 100], eyes [1, 12] (two 6D rotations), eyelids [1, 2], jaw [1, 6] (6D),
             shape, tex, sh
    opencv:  R [1, 3, 3], t [1, 3] (world-to-camera, x_cam = R x_world + t), K [1, 3, 3]
    camera:  the PyTorch3D parameters (not used here)
    img_size: [2] = (height, width)   (metrical-tracker's config says ``image_size  # height,
             width``; INSTA's transforms.py reads it that way; GraphAvatar's NBS reader unpacks
             it as (w, h), which only matters for non-square frames)
    frame_id, global_step

The expression vector is ``concat(exp, eyes, eyelids, jaw)`` in that order, GraphAvatar's
choice: 100 + 12 + 2 + 6 = 120 coefficients with the tracker's defaults. The sizes come from
the files, never from constants.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from headkit.errors import InvalidConfigValue

from .image_io import read_image, read_mask, to_rgb
from .insta import (MASK_MODES, _read_json, apply_mask_mode, check_choice, load_template_obj, map_frames,
                    parse_image_size, require_dir, resize_images, scale_intrinsics, tracked_subject,
                    transfer_uv_layout)
from .subject import Subject, SubjectError, holdout_split

__all__ = ["load_nbs", "load_tracker_frame", "read_ply_mesh", "EXPRESSION_PARTS", "FRAME_LISTS", "TRACKER_CROPS"]

log = logging.getLogger(__name__)

EXPRESSION_PARTS = ("exp", "eyes", "eyelids", "jaw")
# safe_globals swaps torch's process-wide allow-list on enter/exit, so concurrent loads from
# the reader threads must not interleave (loading a .frame takes well under a millisecond).
_LOAD_LOCK = threading.Lock()


def load_nbs(
    root: str | os.PathLike,
    *,
    num_test: int = 500,
    tracker_root: str | os.PathLike | None = None,
    image_size: int | Sequence[int] | None = None,
    template: str = "canonical",
    expression_parts: Sequence[str] = EXPRESSION_PARTS,
    img_size_order: str = "hw",
    missing_mask: str = "error",
    mask_mode: str = "soft",
    frame_list: str = "auto",
    tracker_crop: str = "detect",
    tracker_bbox: str | os.PathLike | Sequence[int] | None = None,
    uv_template: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    fps: float = 25.0,
    num_workers: int = 4,
) -> Subject:
    """Read an NBS subject with its metrical-tracker re-track into a validated :class:`Subject`.

    Args:
        root: folder with ``head_neck_imgs/``, ``head_neck_mask/`` and NBS's ``transforms.json``.
        num_test: frames held out from the end of the frame list (NeRFBlendShape's and
            GraphAvatar's NBS protocol: 500).
        tracker_root: metrical-tracker output folder (``checkpoint/``, ``mesh/``, ``input/``);
            default ``root``.
        image_size: optional ``(height, width)`` (or one int) to resize frames and intrinsics to.
        template: ``"canonical"`` uses ``<tracker_root>/canonical.obj`` when present (the
            tracker's identity, jaw opened 12 degrees), else the first frame's mesh; ``"first"``
            always uses the first frame's mesh. Faces come from that file.
        expression_parts: ``flame`` entries concatenated, in order, into the expression
            vector; default ``("exp", "eyes", "eyelids", "jaw")`` as in GraphAvatar.
        img_size_order: how ``img_size`` is stored: ``"hw"`` (metrical-tracker) or ``"wh"``
            (files re-saved by code that swapped it).
        missing_mask: ``"error"`` (default) or ``"full"`` (a frame without a mask file is all
            foreground).
        mask_mode: ``"soft"`` (default) keeps the mask values; ``"binary"`` is GraphAvatar's
            rule, ``mask == 255`` (see :func:`~headkit.data.insta.apply_mask_mode`).
        frame_list: ``"transforms"``: the frames are the ``img_id`` of ``<root>/transforms.json``
            sorted by id, and the test split is its last ``num_test`` (NeRFBlendShape's reader;
            GraphAvatar reads the same file); every listed frame must have an image and a
            tracker checkpoint (the error names the frames that do not), and images or
            checkpoints the file does not list are left out with a warning. ``"images"``: the
            ``%05d.png`` names in ``head_neck_imgs/``, which must match ``checkpoint/``.
            ``"auto"`` (default): ``"transforms"`` when the file exists, else ``"images"`` with
            a warning.
        tracker_crop: metrical-tracker crops the frames by default (``crop_image = True``:
            a box around the face, padded square and resized to its ``image_size``); its ``K``
            then describes the frames it saved as ``<tracker_root>/input/%05d.png``, not
            ``head_neck_imgs/``. ``"detect"`` (default) refuses such a re-track: frame sizes
            must equal the tracker's ``img_size`` and, where ``input/`` frames exist, their
            content must equal the NBS frames (first, middle and last frame compared).
            ``"bbox"`` maps the tracker's ``K`` onto the NBS frames through the crop box
            ``tracker_bbox`` (principal point shifted by the box corner and padding, focal
            length scaled by box size / ``img_size``), checked against ``input/`` where it
            exists. ``"ignore"`` skips the checks.
        tracker_bbox: the crop box the tracker used, ``[x_min, x_max, y_min, y_max]`` in NBS
            pixels, or the path of the ``bbox.pt`` it saved in the actor's input folder.
        uv_template: optional OBJ with ``vt`` lines in the template's vertex order; see
            :func:`~headkit.data.insta.transfer_uv_layout`.
        trust_pickle: ``.frame`` files are pickles. They are read with ``weights_only=True``
            and an allow-list of numpy array types, which covers what metrical-tracker
            writes; anything else is refused unless this is true, which runs the full
            unpickler (only for files you trust: it can execute code).
        fps: frame rate recorded on the subject.
        num_workers: threads that read frames.

    ``head_poses`` are identity (the tracker's camera carries the head pose). Errors name the
    file (and frame, field, sizes): a missing image/mask/mesh/``.frame``, frame lists that
    disagree, a vertex count unlike the template's, NaN/Inf in a mesh, expression or camera,
    an image whose size differs from ``img_size``, tracker frames that are not the NBS frames.
    A bad setting raises :class:`~headkit.errors.InvalidConfigValue` naming the ``data.`` key.
    """
    check_choice("template", template, ("canonical", "first"))
    check_choice("img_size_order", img_size_order, ("hw", "wh"))
    check_choice("missing_mask", missing_mask, ("error", "full"))
    check_choice("mask_mode", mask_mode, MASK_MODES)
    check_choice("frame_list", frame_list, FRAME_LISTS)
    check_choice("tracker_crop", tracker_crop, TRACKER_CROPS)
    if not expression_parts:
        raise InvalidConfigValue("data.expression_parts must name at least one flame entry")
    if tracker_crop == "bbox" and tracker_bbox is None:
        raise InvalidConfigValue("data.tracker_crop=bbox needs data.tracker_bbox ([x_min, x_max, y_min, y_max] "
                                 "or the bbox.pt metrical-tracker saved)")
    root = require_dir(root, "NBS subject folder", "head_neck_imgs/ and head_neck_mask/")
    tracker = root if tracker_root is None else require_dir(
        tracker_root, "metrical-tracker output folder", "checkpoint/ and mesh/")

    image_dir, mask_dir = root / "head_neck_imgs", root / "head_neck_mask"
    ckpt_dir, mesh_dir = tracker / "checkpoint", tracker / "mesh"
    for folder, hint in ((image_dir, "the NBS frames"), (ckpt_dir, "metrical-tracker's output; "
                         "set tracker_root if it lives elsewhere")):
        if not folder.is_dir():
            raise SubjectError(f"{folder}: folder not found ({hint})")
    numbers, listed_by = _frame_list(root, image_dir, ckpt_dir, frame_list)
    T = len(numbers)
    if T == 0:
        raise SubjectError(f"{image_dir}: no frames (expected %05d.png files)")
    train_ids, test_ids = holdout_split(T, num_test, str(root))

    template_path = tracker / "canonical.obj"
    if template == "first" or not template_path.is_file():
        template_path = mesh_dir / f"{numbers[0]:05d}.ply"
        template_mesh = read_ply_mesh(template_path, frame=0, with_faces=True)
        template_mesh["uvs"] = template_mesh["uv_faces"] = None
    else:
        template_mesh = load_template_obj(template_path)
    V = template_mesh["vertices"].shape[0]
    if uv_template is not None:
        template_mesh["uvs"], template_mesh["uv_faces"] = transfer_uv_layout(
            uv_template, template_mesh["faces"], V, template_path)

    records: list[dict[str, Any] | None] = [None] * T

    def read_tracking(t: int) -> None:
        n = int(numbers[t])
        path = ckpt_dir / f"{n:05d}.frame"
        payload = load_tracker_frame(path, trust_pickle=trust_pickle)
        rec = _parse_tracker_frame(payload, path, t, expression_parts, img_size_order)
        mesh_path = mesh_dir / f"{n:05d}.ply"
        verts = read_ply_mesh(mesh_path, frame=t)["vertices"]
        if verts.shape[0] != V:
            raise SubjectError(f"{mesh_path} (frame {t}): mesh has {verts.shape[0]} vertices but the "
                               f"template {template_path.name} has {V}")
        rec["vertices"] = verts
        records[t] = rec

    map_frames(read_tracking, T, num_workers)

    dims = [r["expression"].shape[0] for r in records]
    if len(set(dims)) > 1:
        t = next(i for i, d in enumerate(dims) if d != dims[0])
        raise SubjectError(f"{ckpt_dir / f'{numbers[t]:05d}.frame'} (frame {t}): {dims[t]} expression "
                           f"coefficients but frame 0 has {dims[0]}")

    Ks = np.stack([r["K"] for r in records])
    crop = None
    first_image = image_dir / f"{numbers[0]:05d}.png"
    if tracker_crop == "bbox":
        sizes = sorted({r["img_size"] for r in records})
        if len(sizes) > 1 or sizes[0][0] != sizes[0][1]:
            shown = ", ".join(f"{h}x{w}" for h, w in sizes[:3])
            raise SubjectError(f"{ckpt_dir}: data.tracker_crop=bbox needs one square tracker img_size "
                               f"(metrical-tracker squares its crop), got {shown}")
        crop = _CropBox.load(tracker_bbox, sizes[0][0])
        H, W = read_image(first_image, frame=0).shape[:2]
        Ks = crop.to_frames(Ks, (H, W), first_image)
    else:
        H, W = records[0]["img_size"]

    size = (H, W) if image_size is None else parse_image_size(image_size)
    images = np.empty((T, *size, 3), np.uint8)  # resized per frame: never all frames at full size
    masks = np.empty((T, *size), np.uint8)
    checked = sorted({0, T // 2, T - 1})  # frames compared with the tracker's input/ frames
    full_frames: dict[int, np.ndarray] = {}

    def read_pixels(t: int) -> None:
        n = int(numbers[t])
        path = image_dir / f"{n:05d}.png"
        image = to_rgb(read_image(path, frame=t))
        got = f"{path} (frame {t}): image is {image.shape[0]}x{image.shape[1]} (HxW)"
        if crop is not None:
            if image.shape[:2] != (H, W):
                raise SubjectError(f"{got} but frame 0 is {H}x{W}; one subject has one image size")
        else:
            h, w = records[t]["img_size"]
            if image.shape[:2] != (h, w):
                raise SubjectError(f"{got} but the tracker's img_size in {ckpt_dir / f'{n:05d}.frame'} is "
                                   f"{h}x{w}; {_crop_hint(tracker, n)}")
            if (h, w) != (H, W):
                raise SubjectError(f"{got} and so is its img_size, but frame 0's are {H}x{W}; one subject "
                                   f"has one image size")
        mask_path = mask_dir / f"{n:05d}.png"
        if missing_mask == "full" and not mask_path.exists():
            mask = np.full((H, W), 255, np.uint8)
        else:
            mask = read_mask(mask_path, frame=t, expected_size=(H, W))
        if t in checked and tracker_crop != "ignore":
            full_frames[t] = image
        images[t], masks[t] = (x[0] for x in resize_images(image[None], apply_mask_mode(mask, mask_mode)[None], size))
        if mask_mode == "binary" and size != (H, W):
            masks[t] = apply_mask_mode(masks[t], mask_mode, resized=True)

    if tracker_crop != "ignore":  # before reading every frame: a cropped re-track fails fast
        compared = 0
        for t in checked:
            read_pixels(t)
            compared += _check_tracker_input(tracker, image_dir, int(numbers[t]), t, full_frames.pop(t), crop)
        if not compared:
            log.warning("%s: no input/ frames, so it cannot be checked that metrical-tracker saw %s/ uncropped "
                        "(it crops by default, crop_image = True, and a crop resized to its image_size keeps the "
                        "frame size); its K is taken to describe the NBS frames", tracker, image_dir.name)
    map_frames(read_pixels, T, num_workers)

    Ks = scale_intrinsics(Ks, (H, W), size)
    first = records[0]["parts"]
    slices, start = {}, 0
    for name in expression_parts:
        slices[name] = [start, start + first[name]]
        start += first[name]

    return tracked_subject(
        root, "nbs", template_mesh, numbers, vertices=np.stack([r["vertices"] for r in records]),
        expressions=np.stack([r["expression"] for r in records]), Ks=Ks,
        camtoworlds=np.stack([r["camtoworld"] for r in records]), images=images, masks=masks, train_ids=train_ids,
        test_ids=test_ids, fps=fps,
        meta={"tracker_root": str(tracker), "template": str(template_path), "expression_parts": list(expression_parts),
              "expression_slices": slices, "frame_list": listed_by, "mask_mode": mask_mode,
              "tracker_crop": tracker_crop, "tracker_bbox": None if crop is None else crop.box,
              "uv_template": None if uv_template is None else str(uv_template)})


FRAME_LISTS = ("auto", "transforms", "images")
TRACKER_CROPS = ("detect", "bbox", "ignore")
#: mean absolute difference (0..255) above which the tracker's input/ frame is another image
_SAME_FRAME_TOL = 2.0
#: the same after our bilinear resampling through the crop box (the tracker resized bicubically)
_CROPPED_FRAME_TOL = 8.0


def _show(numbers: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(str(n) for n in list(numbers)[:limit])
    return shown + (f", ... ({len(numbers)} in all)" if len(numbers) > limit else "")


def _span(numbers: Sequence[int]) -> str:
    return f"{len(numbers)} frames, {min(numbers)}..{max(numbers)}" if len(numbers) else "no frames"


def _frame_list(root: Path, image_dir: Path, ckpt_dir: Path, frame_list: str) -> tuple[np.ndarray, str]:
    """Sorted frame numbers ``[T]`` and where they came from (``"transforms.json"`` or the
    image folder); see ``frame_list`` in :func:`load_nbs`."""
    json_path = root / "transforms.json"
    image_numbers = _numbered_files(image_dir, ".png")
    ckpt_numbers = _numbered_files(ckpt_dir, ".frame")
    if frame_list == "transforms" and not json_path.is_file():
        raise SubjectError(f"{json_path}: NBS's frame list is missing (data.frame_list=transforms); "
                           f"set data.frame_list=images to take the frames from {image_dir.name}/")
    if json_path.is_file() and frame_list != "images":
        ids = _json_img_ids(json_path)
        for where, have in ((f"image in {image_dir}/", image_numbers),
                            (f"tracker checkpoint in {ckpt_dir}/", ckpt_numbers)):
            missing = sorted(set(ids) - set(have))
            if missing:
                raise SubjectError(f"{json_path}: {len(missing)} of its {len(ids)} frames have no {where} "
                                   f"(img_id {_show(missing)}); transforms.json lists {_span(ids)}, the "
                                   f"folder holds {_span(have)}")
        extra = sorted((set(image_numbers) | set(ckpt_numbers)) - set(ids))
        if extra:
            log.warning("%s: %d frames in %s/ or %s/ are not in transforms.json and are left out, as "
                        "NeRFBlendShape and GraphAvatar leave them out (frames %s)", root, len(extra),
                        image_dir.name, ckpt_dir, _show(extra))
        return np.array(ids, np.int64), json_path.name
    if frame_list == "auto":
        log.warning("%s: no transforms.json; the frame list and the test split come from the file names in "
                    "%s/ (NeRFBlendShape and GraphAvatar read them from transforms.json)", root, image_dir.name)
    if image_numbers != ckpt_numbers:
        only_img = sorted(set(image_numbers) - set(ckpt_numbers))
        only_trk = sorted(set(ckpt_numbers) - set(image_numbers))
        if only_img:
            missing = ckpt_dir / f"{only_img[0]:05d}.frame"
        else:
            missing = image_dir / f"{only_trk[0]:05d}.png"
        what = ("image and tracking counts differ" if len(image_numbers) != len(ckpt_numbers)
                else "same counts but different frame numbers")
        raise SubjectError(f"{root}: {len(image_numbers)} images in {image_dir.name}/ but "
                           f"{len(ckpt_numbers)} tracked frames in {ckpt_dir}/ ({what}); "
                           f"{missing} is missing")
    return np.array(image_numbers, np.int64), f"{image_dir.name}/"


def _json_img_ids(path: Path) -> list[int]:
    """The sorted ``img_id`` of every entry of NBS's ``transforms.json`` ``frames`` list."""
    data = _read_json(path)
    ids = []
    for i, frame in enumerate(data["frames"]):
        value = frame.get("img_id") if isinstance(frame, dict) else None
        try:
            number = int(value)
            if number != float(value) or number < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise SubjectError(f"{path}: frames[{i}] has no integer 'img_id' (got {value!r})") from None
        ids.append(number)
    ids.sort()
    dupes = sorted({a for a, b in zip(ids, ids[1:]) if a == b})
    if dupes:
        raise SubjectError(f"{path}: img_id {_show(dupes)} listed more than once")
    return ids


def _crop_hint(tracker: Path, number: int) -> str:
    return (f"metrical-tracker cropped or resized the frames (crop_image = True by default), so its K "
            f"describes {tracker / 'input' / f'{number:05d}.png'} and the other input/ frames, not "
            f"head_neck_imgs/: re-track the NBS frames with crop_image: False, or set "
            f"data.tracker_crop=bbox data.tracker_bbox=<actor>/bbox.pt to move K onto head_neck_imgs/, or "
            f"point data.root at a folder whose head_neck_imgs/ and head_neck_mask/ hold the tracker's "
            f"input/ frames and masks cropped the same way")


def _check_tracker_input(tracker: Path, image_dir: Path, number: int, t: int, image: np.ndarray,
                         crop: "_CropBox | None") -> bool:
    """Compare the NBS frame ``image [H, W, 3]`` with the frame the tracker saw, where
    ``<tracker>/input/%05d.png`` exists; raise :class:`SubjectError` naming both when they
    differ (``crop`` given: after mapping the NBS frame through the crop box). Returns whether
    there was a frame to compare."""
    path = tracker / "input" / f"{number:05d}.png"
    if not path.is_file():
        return False
    seen = to_rgb(read_image(path, frame=t)).astype(np.float32)
    nbs = image_dir / f"{number:05d}.png"
    if crop is None:
        diff = np.abs(seen - image.astype(np.float32)).mean() if seen.shape == image.shape else np.inf
        if diff > _SAME_FRAME_TOL:
            size = f"{seen.shape[0]}x{seen.shape[1]} vs {image.shape[0]}x{image.shape[1]}"
            raise SubjectError(f"{path} (frame {t}): the frame the tracker saw is not {nbs} ("
                               f"{'mean |difference| %.1f/255' % diff if np.isfinite(diff) else 'sizes ' + size}); "
                               f"{_crop_hint(tracker, number)}")
        return True
    warped, valid = crop.warp_to_tracker(image)
    diff = np.abs(seen - warped)[valid].mean() if valid.any() else np.inf
    if diff > _CROPPED_FRAME_TOL:
        raise SubjectError(f"{path} (frame {t}): data.tracker_bbox {crop.box} does not map {nbs} onto the frame "
                           f"the tracker saw (mean |difference| {diff:.1f}/255 after cropping); give the bbox.pt "
                           f"metrical-tracker saved for this actor")
    return True


class _CropBox:
    """metrical-tracker's crop (``image.py``: ``crop_image_bbox`` then ``squarefiy``): rows
    ``y0:y1`` and columns ``x0:x1`` of the frame (``x1 = min(x_max, W - 1)``, exclusive, as its
    ``crop_image`` slices), zero-padded to a square (``hp``, ``vp`` on each side) and resized
    to ``size`` x ``size``. In continuous pixel coordinates (centres at +0.5) a tracker pixel
    ``u`` is frame pixel ``x0 - hp + u * (x1 - x0 + 2 hp) / size`` (likewise for rows)."""

    def __init__(self, box: Sequence[int], size: int):
        self.box = [int(v) for v in box]
        self.size = int(size)

    @classmethod
    def load(cls, value: Any, size: int) -> "_CropBox":
        """From ``[x_min, x_max, y_min, y_max]`` or the path of the tracker's ``bbox.pt``/``.npy``."""
        where = "data.tracker_bbox"
        if isinstance(value, (str, os.PathLike)):
            path = Path(value).expanduser()
            where = f"{path} (data.tracker_bbox)"
            if not path.is_file():
                raise SubjectError(f"{where}: crop box file is missing")
            try:
                if path.suffix == ".npy":
                    value = np.load(path, allow_pickle=False)
                else:
                    with _LOAD_LOCK, torch.serialization.safe_globals(_safe_numpy_globals()):
                        value = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise SubjectError(f"{where}: cannot read the crop box ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200]})") from exc
        try:
            box = _array(list(value) if not isinstance(value, (np.ndarray, torch.Tensor)) else value).reshape(-1)
        except (TypeError, ValueError):
            box = np.array([])
        if box.size != 4 or not np.isfinite(box).all() or box[1] <= box[0] or box[3] <= box[2]:
            error = SubjectError if where != "data.tracker_bbox" else InvalidConfigValue
            raise error(f"{where} must be [x_min, x_max, y_min, y_max] with max > min (metrical-tracker's "
                        f"get_bbox order), got {value!r}")
        return cls(np.round(box).astype(int).tolist(), size)

    def geometry(self, frame_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """``(scale_x, scale_y, offset_x, offset_y)``: frame = offset + scale * tracker."""
        H, W = frame_size
        x_min, x_max, y_min, y_max = self.box
        x0, y0 = max(x_min, 0), max(y_min, 0)
        x1, y1 = min(x_max, W - 1), min(y_max, H - 1)
        cw, ch = x1 - x0, y1 - y0
        side = max(cw, ch)
        hp, vp = (side - cw) // 2, (side - ch) // 2
        return (cw + 2 * hp) / self.size, (ch + 2 * vp) / self.size, float(x0 - hp), float(y0 - vp)

    def to_frames(self, Ks: np.ndarray, frame_size: tuple[int, int], where: Path) -> np.ndarray:  # [T, 3, 3]
        """The tracker's intrinsics ``[T, 3, 3]`` moved onto the uncropped frames."""
        H, W = frame_size
        x_min, x_max, y_min, y_max = self.box
        if x_min >= W - 1 or y_min >= H - 1 or x_max <= 0 or y_max <= 0:
            raise SubjectError(f"{where}: data.tracker_bbox {self.box} lies outside the {H}x{W} frame")
        sx, sy, ox, oy = self.geometry(frame_size)
        A = np.array([[sx, 0.0, ox], [0.0, sy, oy], [0.0, 0.0, 1.0]])
        return A @ np.asarray(Ks, np.float64)

    def warp_to_tracker(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The frame ``[H, W, 3]`` as the tracker saw it (bilinear), ``[S, S, 3]`` float, and
        the pixels ``[S, S]`` that come from inside the crop (not padding)."""
        import torch.nn.functional as F

        H, W = image.shape[:2]
        sx, sy, ox, oy = self.geometry((H, W))
        x_min, x_max, y_min, y_max = self.box
        x0, y0, x1, y1 = max(x_min, 0), max(y_min, 0), min(x_max, W - 1), min(y_max, H - 1)
        centres = np.arange(self.size) + 0.5
        xs, ys = ox + sx * centres, oy + sy * centres  # frame coordinates of tracker pixel centres
        gx, gy = np.meshgrid(xs / W * 2 - 1, ys / H * 2 - 1)
        grid = torch.from_numpy(np.stack([gx, gy], -1)[None]).float()
        src = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        inside_x = (xs >= x0 + 0.5) & (xs <= x1 - 0.5)
        inside_y = (ys >= y0 + 0.5) & (ys <= y1 - 0.5)
        return out[0].permute(1, 2, 0).numpy(), inside_y[:, None] & inside_x[None, :]


def _numbered_files(folder: Path, suffix: str) -> list[int]:
    """Sorted frame numbers of the ``%05d<suffix>`` files in ``folder`` (others are ignored)."""
    return sorted(int(p.stem) for p in folder.iterdir() if p.suffix == suffix and p.stem.isdigit())


def _safe_numpy_globals() -> list:
    """What numpy arrays and scalars need to unpickle, under numpy 2 and numpy 1 names."""
    major = int(np.__version__.split(".")[0])
    multiarray = importlib.import_module("numpy._core.multiarray" if major >= 2 else "numpy.core.multiarray")
    allowed: list = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar,
                     (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                     (multiarray.scalar, "numpy.core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by class
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def load_tracker_frame(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict:
    """Load one metrical-tracker ``.frame`` file (a ``torch.save``d dict).

    Reads with ``weights_only=True`` plus an allow-list of numpy array types (what the tracker
    writes, including files pickled under numpy 1). Files that need other classes raise a
    :class:`SubjectError` naming the file, unless ``trust_pickle`` allows the full unpickler.
    """
    path = Path(path)
    if not path.is_file():
        raise SubjectError(f"{path}: tracker frame file is missing")
    try:
        with _LOAD_LOCK, torch.serialization.safe_globals(_safe_numpy_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not any(k in str(exc) for k in ("Unsupported global", "Can only build", "allowlist")):
            raise SubjectError(f"{path}: cannot read tracker frame ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200]})") from exc
        if not trust_pickle:
            detail = next((ln.strip() for ln in str(exc).splitlines() if "global" in ln.lower()), "")
            raise SubjectError(f"{path}: tracker frame holds objects outside the safe allow-list "
                               f"({detail[:200]}); if you trust this file, set data.trust_pickle=true "
                               f"(it runs the full pickle loader)") from exc
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise SubjectError(f"{path}: cannot read tracker frame ({type(exc2).__name__}: "
                               f"{str(exc2).splitlines()[0][:200]})") from exc2
    if not isinstance(payload, dict):
        raise SubjectError(f"{path}: expected a dict, got {type(payload).__name__}")
    return payload


def _array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _field(payload: dict, path: Path, *keys: str) -> np.ndarray:
    node: Any = payload
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise SubjectError(f"{path}: missing key '{'.'.join(keys[:i + 1])}'")
        node = node[key]
    try:
        return _array(node)
    except (TypeError, ValueError):
        raise SubjectError(f"{path}: '{'.'.join(keys)}' is not numeric") from None


def _parse_tracker_frame(payload: dict, path: Path, t: int, parts: Sequence[str],
                         img_size_order: str) -> dict[str, Any]:
    """Expression, OpenCV camera-to-world, K and (H, W) from one tracker frame dict."""
    pieces, sizes = [], {}
    for name in parts:
        arr = _field(payload, path, "flame", name).reshape(-1)
        if not np.isfinite(arr).all():
            raise SubjectError(f"{path} (frame {t}): NaN/Inf in field 'flame.{name}' (expression)")
        pieces.append(arr)
        sizes[name] = arr.size
    shapes = {"R": (3, 3), "t": (3,), "K": (3, 3)}
    cam = {}
    for key, shape in shapes.items():
        arr = _field(payload, path, "opencv", key)
        if arr.size != int(np.prod(shape)):
            raise SubjectError(f"{path} (frame {t}): 'opencv.{key}' has shape {list(arr.shape)}, "
                               f"expected {list(shape)} (with an optional leading 1)")
        if not np.isfinite(arr).all():
            raise SubjectError(f"{path} (frame {t}): NaN/Inf in field 'opencv.{key}' (camera)")
        cam[key] = arr.reshape(shape)
    size = _field(payload, path, "img_size").reshape(-1)
    if size.size != 2 or not np.isfinite(size).all() or (size <= 0).any():
        raise SubjectError(f"{path} (frame {t}): 'img_size' must be two positive numbers, got {size}")
    h, w = (int(size[0]), int(size[1])) if img_size_order == "hw" else (int(size[1]), int(size[0]))
    rot_t = cam["R"].T  # inverse of the rigid world-to-camera [R | t]: [R^T | -R^T t]
    c2w = np.eye(4)
    c2w[:3, :3] = rot_t
    c2w[:3, 3] = -rot_t @ cam["t"]
    return {"expression": np.concatenate(pieces), "parts": sizes, "camtoworld": c2w,
            "K": cam["K"], "img_size": (h, w)}


def read_ply_mesh(path: str | os.PathLike, *, frame: int | None = None,
                  with_faces: bool = False) -> dict[str, np.ndarray]:
    """Vertices ``[V, 3]`` (and with ``with_faces`` faces ``[F, 3]`` int64) of a PLY mesh.

    Reads ASCII and binary PLY with ``plyfile``; faces may be stored as ``vertex_indices`` or
    ``vertex_index`` lists of triangles. Errors name the file and frame.
    """
    from plyfile import PlyData

    path = Path(path)
    where = f"{path}" + (f" (frame {frame})" if frame is not None else "")
    if not path.is_file():
        raise SubjectError(f"{where}: mesh file is missing")
    try:
        try:  # declaring triangle faces lets plyfile skip its slow per-face list parsing (~70x)
            ply = PlyData.read(str(path), known_list_len={"face": {"vertex_indices": 3}})
        except Exception:  # quads, another list name, ASCII, ...: the general reader decides
            ply = PlyData.read(str(path))
        vertex = ply["vertex"]
        verts = np.stack([np.asarray(vertex[c], np.float64) for c in ("x", "y", "z")], axis=1)
    except Exception as exc:  # plyfile raises several types for malformed files
        raise SubjectError(f"{where}: cannot read PLY mesh ({type(exc).__name__}: {exc})") from exc
    if not np.isfinite(verts).all():
        bad = int(np.flatnonzero(~np.isfinite(verts).all(axis=1))[0])
        raise SubjectError(f"{where}: NaN/Inf in field 'vertices' (vertex {bad})")
    out = {"vertices": verts.astype(np.float32)}
    if with_faces:
        try:
            face = ply["face"]
            name = "vertex_indices" if "vertex_indices" in face.data.dtype.names else "vertex_index"
            faces = np.stack([np.asarray(f, np.int64) for f in face[name]])
        except Exception as exc:
            raise SubjectError(f"{where}: cannot read triangle faces ({type(exc).__name__}: {exc})") from exc
        if faces.ndim != 2 or faces.shape[1] != 3:
            raise SubjectError(f"{where}: faces must be triangles, got shape {list(faces.shape)}")
        out["faces"] = faces
    return out
