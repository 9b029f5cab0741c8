"""Parser for NBS subjects (NeRFBlendShape, Gao et al. 2022) re-tracked with metrical-tracker.

GraphAvatar trains on the NBS videos with a metrical-tracker re-track (FLAME meshes and
OpenCV cameras). Layout, all frame files named ``%05d``::

    <root>/head_neck_imgs/00000.png     RGB frames (from the NBS release)
    <root>/head_neck_mask/00000.png     foreground masks (255 = head and neck)
    <tracker_root>/checkpoint/00000.frame   metrical-tracker's per-frame state (torch.save)
    <tracker_root>/mesh/00000.ply           tracked FLAME mesh, world space
    <tracker_root>/canonical.obj            the tracker's neutral mesh (optional)

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
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .image_io import read_mask, read_rgb
from .insta import (load_template_obj, map_frames, parse_image_size, require_dir,
                    resize_images, scale_intrinsics, tracked_subject)
from .subject import Subject, SubjectError, holdout_split

__all__ = ["load_nbs", "load_tracker_frame", "read_ply_mesh", "EXPRESSION_PARTS"]

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
    trust_pickle: bool = False,
    fps: float = 25.0,
    num_workers: int = 4,
) -> Subject:
    """Read an NBS subject with its metrical-tracker re-track into a validated :class:`Subject`.

    Args:
        root: folder with ``head_neck_imgs/`` and ``head_neck_mask/``.
        num_test: frames held out from the end (GraphAvatar's NBS protocol: 500).
        tracker_root: metrical-tracker output folder (``checkpoint/``, ``mesh/``); default
            ``root``.
        image_size: optional ``(height, width)`` (or one int) to resize frames and intrinsics to.
        template: ``"canonical"`` uses ``<tracker_root>/canonical.obj`` when present (the
            tracker's identity, neutral expression), else the first frame's mesh; ``"first"``
            always uses the first frame's mesh. Faces come from that file.
        expression_parts: ``flame`` entries concatenated, in order, into the expression
            vector; default ``("exp", "eyes", "eyelids", "jaw")`` as in GraphAvatar.
        img_size_order: how ``img_size`` is stored: ``"hw"`` (metrical-tracker) or ``"wh"``
            (files re-saved by code that swapped it).
        missing_mask: ``"error"`` (default) or ``"full"`` (a frame without a mask file is all
            foreground).
        trust_pickle: ``.frame`` files are pickles. They are read with ``weights_only=True``
            and an allow-list of numpy array types, which covers what metrical-tracker
            writes; anything else is refused unless this is true, which runs the full
            unpickler (only for files you trust: it can execute code).
        fps: frame rate recorded on the subject.
        num_workers: threads that read frames.

    Errors name the file (and frame, field, sizes): a missing image/mask/mesh/``.frame``,
    differing image and tracking counts, a vertex count unlike the template's, NaN/Inf in a
    mesh, expression or camera, an image whose size differs from ``img_size``.
    """
    root = require_dir(root, "NBS subject folder", "head_neck_imgs/ and head_neck_mask/")
    tracker = root if tracker_root is None else require_dir(
        tracker_root, "metrical-tracker output folder", "checkpoint/ and mesh/")
    if template not in ("canonical", "first"):
        raise ValueError(f"load_nbs: template must be 'canonical' or 'first', got {template!r}")
    if img_size_order not in ("hw", "wh"):
        raise ValueError(f"load_nbs: img_size_order must be 'hw' or 'wh', got {img_size_order!r}")
    if missing_mask not in ("error", "full"):
        raise ValueError(f"load_nbs: missing_mask must be 'error' or 'full', got {missing_mask!r}")
    if not expression_parts:
        raise ValueError("load_nbs: expression_parts must name at least one flame entry")

    image_dir, mask_dir = root / "head_neck_imgs", root / "head_neck_mask"
    ckpt_dir, mesh_dir = tracker / "checkpoint", tracker / "mesh"
    for folder, hint in ((image_dir, "the NBS frames"), (ckpt_dir, "metrical-tracker's output; "
                         "set tracker_root if it lives elsewhere")):
        if not folder.is_dir():
            raise SubjectError(f"{folder}: folder not found ({hint})")
    image_numbers = _numbered_files(image_dir, ".png")
    frame_numbers = _numbered_files(ckpt_dir, ".frame")
    if image_numbers != frame_numbers:
        only_img = sorted(set(image_numbers) - set(frame_numbers))
        only_trk = sorted(set(frame_numbers) - set(image_numbers))
        if only_img:
            missing = ckpt_dir / f"{only_img[0]:05d}.frame"
        else:
            missing = image_dir / f"{only_trk[0]:05d}.png"
        what = ("image and tracking counts differ" if len(image_numbers) != len(frame_numbers)
                else "same counts but different frame numbers")
        raise SubjectError(f"{root}: {len(image_numbers)} images in {image_dir.name}/ but "
                           f"{len(frame_numbers)} tracked frames in {ckpt_dir}/ ({what}); "
                           f"{missing} is missing")
    numbers = np.array(image_numbers, np.int64)
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

    H, W = records[0]["img_size"]
    dims = [r["expression"].shape[0] for r in records]
    if len(set(dims)) > 1:
        t = next(i for i, d in enumerate(dims) if d != dims[0])
        raise SubjectError(f"{ckpt_dir / f'{numbers[t]:05d}.frame'} (frame {t}): {dims[t]} expression "
                           f"coefficients but frame 0 has {dims[0]}")

    size = (H, W) if image_size is None else parse_image_size(image_size)
    images = np.empty((T, *size, 3), np.uint8)  # resized per frame: never all frames at full size
    masks = np.empty((T, *size), np.uint8)

    def read_pixels(t: int) -> None:
        n = int(numbers[t])
        path = image_dir / f"{n:05d}.png"
        image = read_rgb(path, frame=t, expected_size=records[t]["img_size"])
        if image.shape[:2] != (H, W):
            raise SubjectError(f"{path} (frame {t}): image and img_size are {image.shape[0]}x"
                               f"{image.shape[1]} (HxW) but frame 0's are {H}x{W}; one subject has "
                               f"one image size")
        mask_path = mask_dir / f"{n:05d}.png"
        if missing_mask == "full" and not mask_path.exists():
            mask = np.full((H, W), 255, np.uint8)
        else:
            mask = read_mask(mask_path, frame=t, expected_size=(H, W))
        images[t], masks[t] = (x[0] for x in resize_images(image[None], mask[None], size))

    map_frames(read_pixels, T, num_workers)

    Ks = scale_intrinsics(np.stack([r["K"] for r in records]), (H, W), size)
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
              "expression_slices": slices})


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
