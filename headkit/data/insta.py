"""Parser for INSTA subjects (Zielonka et al., CVPR 2023), read in place with no conversion step.

Layout of one subject folder, as written by INSTA's ``scripts/generate.sh`` (its
``transforms.py`` turns a metrical-tracker run into these files)::

    transforms.json          all frames; intrinsics at top level: fl_x, fl_y, cx, cy, w, h
                             (+ camera_angle_x/y, x_fov, y_fov, integer_depth_scale)
    transforms_train.json    the same, frames[:-350]   (350 = generate.sh's default test count)
    transforms_test.json     the same, frames[-350:]
    transforms_val.json      the same, frames[-20:]    (a subset of test; not used here)
    canonical.obj            the tracker's neutral mesh (jaw opened 12 degrees), simplified
    images/00000.png         RGBA; alpha is the foreground matte (soft below 128, see below)
    meshes/00000.obj         tracked FLAME mesh per frame (Open3D-written OBJ, world space)
    flame/exp/00000.txt      FLAME expression coefficients, one float per line
    depth/, seg_mask/        not used here

Each frame entry holds ``transform_matrix`` (camera-to-world), ``file_path``, ``mesh_path``,
``exp_path`` (and ``depth_path``, ``seg_mask_path``). INSTA's ``transforms.py`` builds
``transform_matrix = inv([R | t])`` from the tracker's OpenCV extrinsics, so the matrix is
already OpenCV (x right, y down, z forward); GraphAvatar's INSTA reader uses it unchanged. NeRF
files in the OpenGL/Blender convention can be read with ``camera_convention="opengl"``.

Facts about INSTA's scripts that decide how the files are read:

* ``transforms.py`` collects the frames with ``Pool.imap_unordered``, so every ``frames`` list
  is in pool completion order (nearly sorted, with local swaps), and ``transforms_test.json`` is
  the last 350 *list entries*, which need not be the last 350 frame numbers. ``split=transforms``
  keeps exactly that official test set; ``split=last`` sorts by frame number first.
* ``postprocess.py`` median-filters the matte and sets alpha > 127.5 to 255, leaving alpha soft
  (1..127) on the silhouette rim. GraphAvatar casts ``alpha / 255`` to uint8, so only alpha = 255
  is foreground there; ``mask_mode="binary"`` applies that rule, ``"soft"`` keeps the alpha.
* ``simplification.py`` rewrites ``canonical.obj`` and every ``meshes/*.obj``: 5,023 vertices
  in FLAME order but about 8,090 triangles (INSTA's sparse face set), about 958 vertices in no
  triangle (eyeballs, eye region) and no UVs. ``uv_template`` brings a UV layout back.
* metrical-tracker's FLAME forward pass has identity global rotation and zero translation; the
  camera carries the head pose. The subject's ``head_poses`` are therefore identity.

The helpers at the bottom (frame numbers, times, masks, resizing, UV transfer) are shared with
:mod:`.nbs`.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from headkit.errors import InvalidConfigValue

from .image_io import read_image
from .subject import Subject, SubjectError, holdout_split

__all__ = ["load_insta", "map_frames", "frame_number", "normalised_times", "resize_frames",
           "resize_images", "scale_intrinsics", "MASK_MODES", "apply_mask_mode", "check_choice",
           "parse_image_size", "require_dir", "read_mesh_vertices_obj", "load_template_obj",
           "transfer_uv_layout", "tracked_subject"]

log = logging.getLogger(__name__)

#: ``data.mask_mode`` values: ``binary`` (the paper's code: only 255 is foreground) | ``soft``
MASK_MODES = ("binary", "soft")

_FRAME_KEYS = ("transform_matrix", "file_path", "mesh_path", "exp_path")
_INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
# OpenGL/Blender cameras look down -z with y up; flipping the y and z camera axes gives OpenCV.
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def load_insta(
    root: str | os.PathLike,
    *,
    num_test: int = 350,
    split: str = "transforms",
    image_size: int | Sequence[int] | None = None,
    template: str = "canonical",
    camera_convention: str = "opencv",
    missing_mask: str = "error",
    mask_mode: str = "soft",
    uv_template: str | os.PathLike | None = None,
    fps: float = 25.0,
    num_workers: int = 4,
) -> Subject:
    """Read one INSTA subject folder into a validated :class:`Subject`.

    Args:
        root: the subject folder (holding ``transforms*.json``).
        num_test: test frames held out from the end of the sequence (INSTA's and GraphAvatar's
            protocol: 350). Used when ``split="last"``, or when the folder has no
            ``transforms_train.json``/``transforms_test.json``.
        split: ``"transforms"`` (default) keeps INSTA's own split files when both exist: the
            official test set, i.e. the last 350 entries of the frame list in the (unsorted)
            order ``transforms.py`` wrote it. ``"last"`` reads every frame, sorts by frame
            number and holds out the last ``num_test``.
        image_size: optional ``(height, width)`` (or one int for square) to resize images,
            masks and intrinsics to; see :func:`resize_frames`.
        template: ``"canonical"`` uses ``canonical.obj`` when the folder has it (the tracker's
            identity with neutral expression; INSTA ships it), else the first frame's mesh;
            ``"first"`` always uses the first frame's mesh. Faces always come from the
            template file, so topology comes from the data.
        camera_convention: ``"opencv"`` (INSTA's files) or ``"opengl"`` (NeRF/Blender
            ``transform_matrix``; converted to OpenCV by flipping the camera's y and z axes).
        missing_mask: ``"error"`` (default) raises when an image has no alpha channel;
            ``"full"`` treats such a frame as all foreground.
        mask_mode: ``"soft"`` (default) keeps the alpha matte as it is; ``"binary"`` is the
            paper's rule (GraphAvatar's reader): alpha = 255 is foreground, anything lower is
            background (see :func:`apply_mask_mode`).
        uv_template: optional OBJ with ``vt`` lines in the template's vertex order (e.g.
            FLAME's UV template); its layout is transferred onto the template's faces
            (:func:`transfer_uv_layout`) so UV-based models get real texture coordinates.
        fps: frame rate recorded on the subject (metrical-tracker's default extraction: 25).
        num_workers: threads that read frames.

    Times are the normalised frame numbers parsed from the image names (see
    :func:`normalised_times`); ``head_poses`` are identity (the camera carries the pose).
    ``meta`` records ``source="insta"``, the root, the frame numbers, the split and the mask
    mode used. Every data problem raises :class:`SubjectError` naming the file; a bad setting
    raises :class:`~headkit.errors.InvalidConfigValue` naming the ``data.`` key.
    """
    check_choice("split", split, ("transforms", "last"))
    check_choice("template", template, ("canonical", "first"))
    check_choice("camera_convention", camera_convention, ("opencv", "opengl"))
    check_choice("missing_mask", missing_mask, ("error", "full"))
    check_choice("mask_mode", mask_mode, MASK_MODES)
    root = require_dir(root, "INSTA subject folder", "transforms.json")

    entries, train_numbers, used = _read_frame_entries(root, split)
    entries.sort(key=lambda e: e["number"])
    numbers = np.array([e["number"] for e in entries], np.int64)
    dupes = numbers[1:][numbers[1:] == numbers[:-1]]
    if dupes.size:
        raise SubjectError(f"{root}: frame {int(dupes[0])} is listed twice in {', '.join(used)}")
    T = len(entries)
    if train_numbers is None:
        train_ids, test_ids = holdout_split(T, num_test, str(root))
    else:
        is_train = np.isin(numbers, np.array(sorted(train_numbers), np.int64))
        train_ids, test_ids = np.flatnonzero(is_train), np.flatnonzero(~is_train)

    template_path = root / "canonical.obj"
    if template == "first" or not template_path.is_file():
        template_path = root / entries[0]["mesh_path"]
    template_mesh = load_template_obj(template_path)
    V = template_mesh["vertices"].shape[0]
    if uv_template is not None:
        template_mesh["uvs"], template_mesh["uv_faces"] = transfer_uv_layout(
            uv_template, template_mesh["faces"], V, template_path)

    H, W = entries[0]["h"], entries[0]["w"]
    size = (H, W) if image_size is None else parse_image_size(image_size)
    images = np.empty((T, *size, 3), np.uint8)  # resized per frame: never all frames at full size
    masks = np.empty((T, *size), np.uint8)
    vertices = np.empty((T, V, 3), np.float32)
    exps: list[np.ndarray | None] = [None] * T

    def read_frame(t: int) -> None:
        e = entries[t]
        if (e["h"], e["w"]) != (H, W):
            raise SubjectError(f"{e['json']}: frame {e['number']} says {e['h']}x{e['w']} (HxW) but "
                               f"the first frame says {H}x{W}; one subject has one image size")
        img = read_image(root / e["file_path"], frame=t, expected_size=(H, W))
        if img.shape[-1] == 4:
            mask = img[..., 3]
        elif missing_mask == "full":
            mask = np.full((H, W), 255, np.uint8)
        else:
            raise SubjectError(f"{root / e['file_path']} (frame {t}): image has no alpha channel; "
                               f"INSTA stores the foreground mask as alpha (or set missing_mask=full)")
        rgb = img[..., :3] if img.shape[-1] >= 3 else np.repeat(img, 3, axis=-1)
        images[t], masks[t] = (x[0] for x in resize_images(rgb[None], apply_mask_mode(mask, mask_mode)[None], size))
        if mask_mode == "binary" and size != (H, W):
            masks[t] = apply_mask_mode(masks[t], mask_mode, resized=True)
        vertices[t] = read_mesh_vertices_obj(root / e["mesh_path"], V, t, template_path)
        exps[t] = _read_expression(root / e["exp_path"], t)

    map_frames(read_frame, T, num_workers)

    sizes = {len(x) for x in exps}
    if len(sizes) > 1:
        t = next(i for i, x in enumerate(exps) if len(x) != len(exps[0]))
        raise SubjectError(f"{root / entries[t]['exp_path']} (frame {t}): {len(exps[t])} expression "
                           f"coefficients, but {root / entries[0]['exp_path']} has {len(exps[0])}")
    expressions = np.stack(exps).astype(np.float32)

    camtoworlds = np.stack([e["camtoworld"] for e in entries])
    if camera_convention == "opengl":
        camtoworlds = camtoworlds @ _GL_TO_CV
    Ks = scale_intrinsics(np.stack([e["K"] for e in entries]), (H, W), size)

    return tracked_subject(
        root, "insta", template_mesh, numbers, vertices=vertices, expressions=expressions, Ks=Ks,
        camtoworlds=camtoworlds, images=images, masks=masks, train_ids=train_ids, test_ids=test_ids, fps=fps,
        meta={"split": split, "split_files": used, "template": os.path.relpath(template_path, root),
              "camera_convention": camera_convention, "mask_mode": mask_mode,
              "uv_template": None if uv_template is None else str(uv_template)})


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SubjectError(f"{path}: malformed JSON ({exc})") from exc
    except OSError as exc:
        raise SubjectError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        raise SubjectError(f"{path}: expected a JSON object with a 'frames' list")
    return data


def _read_frame_entries(root: Path, split: str) -> tuple[list[dict], set[int] | None, list[str]]:
    """Parse the transforms files into per-frame entries; return them, the train frame numbers
    (``None`` when the split is left to ``num_test``) and the names of the files read."""
    train_file, test_file, all_file = (root / f"transforms{s}.json" for s in ("_train", "_test", ""))
    if split == "transforms" and train_file.is_file() and test_file.is_file():
        train = _parse_transforms(train_file)
        test = _parse_transforms(test_file)
        shared = {e["number"] for e in train} & {e["number"] for e in test}
        if shared:
            raise SubjectError(f"{train_file} and {test_file} share frame {min(shared)}; the train "
                               f"and test splits must be disjoint")
        return train + test, {e["number"] for e in train}, [train_file.name, test_file.name]
    if all_file.is_file():
        return _parse_transforms(all_file), None, [all_file.name]
    parts = [f for f in (train_file, root / "transforms_val.json", test_file) if f.is_file()]
    if not parts:
        raise SubjectError(f"{root}: no transforms.json (nor transforms_train/test.json); this is not "
                           f"an INSTA subject folder")
    by_number: dict[int, dict] = {}
    for f in parts:  # val repeats test frames, so merge by frame number
        for e in _parse_transforms(f):
            by_number.setdefault(e["number"], e)
    return list(by_number.values()), None, [f.name for f in parts]


def _parse_transforms(path: Path) -> list[dict]:
    """One transforms file → entries with paths, ``number``, ``K [3, 3]``, ``camtoworld [4, 4]``."""
    data = _read_json(path)
    entries = []
    for i, frame in enumerate(data["frames"]):
        where = f"{path}: frames[{i}]"
        if not isinstance(frame, dict):
            raise SubjectError(f"{where}: expected an object, got {type(frame).__name__}")
        for key in _FRAME_KEYS:
            if key not in frame:
                raise SubjectError(f"{where}: missing key '{key}'")
        intr = {}
        for key in _INTRINSIC_KEYS:  # instant-ngp lets a frame override the shared intrinsics
            value = frame.get(key, data.get(key))
            if value is None:
                raise SubjectError(f"{path}: missing intrinsic '{key}' (top level or in frames[{i}])")
            try:
                intr[key] = float(value)
            except (TypeError, ValueError):
                raise SubjectError(f"{where}: intrinsic '{key}' is not a number: {value!r}") from None
        number = frame_number(frame["file_path"], fallback=i)
        if not all(np.isfinite(v) for v in intr.values()):
            bad = next(k for k, v in intr.items() if not np.isfinite(v))
            raise SubjectError(f"{where} (frame {number}): NaN/Inf in intrinsic '{bad}'")
        try:
            c2w = np.asarray(frame["transform_matrix"], np.float64)
        except (TypeError, ValueError):
            raise SubjectError(f"{where}: 'transform_matrix' is not a numeric matrix") from None
        if c2w.shape == (3, 4):
            c2w = np.vstack([c2w, [0.0, 0.0, 0.0, 1.0]])
        if c2w.shape != (4, 4):
            raise SubjectError(f"{where}: 'transform_matrix' must be 4x4, got {list(c2w.shape)}")
        if not np.isfinite(c2w).all():
            raise SubjectError(f"{where} (frame {number}): NaN/Inf in 'transform_matrix' (camera)")
        entries.append({
            "json": path, "number": number, "camtoworld": c2w,
            "K": np.array([[intr["fl_x"], 0.0, intr["cx"]], [0.0, intr["fl_y"], intr["cy"]],
                           [0.0, 0.0, 1.0]]),
            "w": int(round(intr["w"])), "h": int(round(intr["h"])),
            **{k: str(frame[k]) for k in ("file_path", "mesh_path", "exp_path")},
        })
    return entries


def load_template_obj(path: Path) -> dict[str, np.ndarray | None]:
    """Template OBJ as numpy: vertices ``[V, 3]``, faces ``[F, 3]``, optional ``uvs``/``uv_faces``."""
    mesh = read_obj(path, "template mesh file", "template mesh")
    return {k: None if v is None else v.numpy() for k, v in mesh.items()}


def read_obj(path: Path, missing: str, label: str) -> dict:
    """:func:`headkit.mesh.load_obj` with errors as :class:`SubjectError`: ``"{path}: {missing} is
    missing"``, or ``"{label}: <what is wrong in the file>"``."""
    from headkit.mesh import ObjError, load_obj

    try:
        return load_obj(path)
    except FileNotFoundError:
        raise SubjectError(f"{path}: {missing} is missing") from None
    except ObjError as exc:
        raise SubjectError(f"{label}: {exc}") from exc


def read_mesh_vertices_obj(path: Path, num_vertices: int, frame: int, template_path: Path) -> np.ndarray:
    """Vertices ``[V, 3]`` of one frame's OBJ; errors name the file, frame and both counts.

    Per-frame meshes only contribute positions, so the ``v`` lines are parsed directly (about
    4x faster than the full :func:`headkit.mesh.load_obj`, which matters for INSTA's thousands
    of 5023-vertex frames); anything unusual is re-read with ``load_obj`` so its precise
    file:line message (or its tolerant parsing) decides.
    """
    from headkit.mesh import ObjError, load_obj

    if not path.is_file():
        raise SubjectError(f"{path} (frame {frame}): mesh file is missing")
    try:
        rows = [ln.split()[1:4] for ln in path.read_bytes().splitlines() if ln[:2] in (b"v ", b"v\t")]
        verts = np.array(rows, dtype=np.float64).reshape(len(rows), 3)
        fast_ok = verts.shape[0] == num_vertices and np.isfinite(verts).all()
    except ValueError:
        fast_ok = False
    if not fast_ok:
        try:
            verts = load_obj(path)["vertices"].numpy()
        except ObjError as exc:  # its message names file and line; non-finite values land here
            raise SubjectError(f"frame {frame}, field 'vertices': {exc}") from exc
    if verts.shape[0] != num_vertices:
        raise SubjectError(f"{path} (frame {frame}): mesh has {verts.shape[0]} vertices but the "
                           f"template {template_path.name} has {num_vertices}")
    return verts.astype(np.float32)


def _read_expression(path: Path, frame: int) -> np.ndarray:
    if not path.is_file():
        raise SubjectError(f"{path} (frame {frame}): expression file is missing")
    try:
        values = np.array(path.read_text().split(), dtype=np.float64)
    except ValueError as exc:
        raise SubjectError(f"{path} (frame {frame}): cannot parse expression coefficients ({exc})") from None
    if values.size == 0:
        raise SubjectError(f"{path} (frame {frame}): expression file is empty")
    if not np.isfinite(values).all():
        raise SubjectError(f"{path} (frame {frame}): NaN/Inf in field 'expressions' "
                           f"(coefficient {int(np.flatnonzero(~np.isfinite(values))[0])})")
    return values


# ---------------------------------------------------------------- helpers shared with nbs.py

def check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    """Raise :class:`~headkit.errors.InvalidConfigValue` naming ``data.<key>`` unless ``value``
    is one of ``choices``."""
    if value not in choices:
        raise InvalidConfigValue(f"data.{key} must be one of {', '.join(choices)}; got {value!r}")


def apply_mask_mode(mask: np.ndarray, mode: str, resized: bool = False) -> np.ndarray:  # [H, W] uint8
    """The foreground mask ``[H, W]`` uint8 under ``data.mask_mode``.

    ``"soft"`` returns ``mask`` unchanged. ``"binary"`` is the rule of GraphAvatar's readers
    (INSTA: ``uint8(alpha / 255)``; NBS: ``mask == 255``): 255 where the mask is 255, else 0.
    Effect on INSTA (``postprocess.py`` already set alpha > 127.5 to 255): the soft fringe
    outside the matte's 50 % contour (alpha 1..127) becomes background, so targets composited
    with the mask are pure background there and the silhouette is a hard step at the 50 %
    contour instead of a soft ramp; the alpha BCE target is exactly 0 there instead of the
    matte's fractions, so the rendered alpha is pushed to 0 on the fringe. NBS masks are
    binary already apart from stray values, which the rule sends to background.

    With ``resized=True`` (a mask binarised at full resolution, then area-resized by
    ``data.image_size``) pixels at least half covered are foreground, so it stays 0/255.
    """
    if mode == "soft":
        return mask
    return np.where(mask >= (128 if resized else 255), 255, 0).astype(np.uint8)


def transfer_uv_layout(path: str | os.PathLike, faces: np.ndarray, num_vertices: int,
                       template_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Texture coordinates ``(uvs [Vt, 2], uv_faces [F, 3])`` for ``faces`` (the subject's
    template triangles, ``[F, 3]``) from a UV layout: an OBJ with ``vt`` lines on the same
    ``num_vertices`` vertices in the same order (``data.uv_template``; e.g. FLAME's UV template
    for INSTA's simplified meshes, which keep FLAME's vertex order but not its triangles).

    A template triangle that the layout also has (same three vertices) takes the layout's
    corners. Any other triangle (INSTA's sparse face set need not be a subset of FLAME's)
    takes, per corner, one of the ``vt`` the layout uses for that vertex: the combination with
    the smallest UV perimeter, so it stays on one UV island wherever its vertices' UVs allow
    (a seam vertex has one ``vt`` per island). Vertices in no template triangle need no UV. Raises :class:`SubjectError` naming the file when it has no ``vt``, another vertex
    count, or no ``vt`` for a vertex the template's triangles use.
    """
    from itertools import product

    path = Path(path).expanduser()
    layout = read_obj(path, "UV layout file (data.uv_template)", "data.uv_template")
    if layout["uvs"] is None:
        raise SubjectError(f"{path}: data.uv_template has no texture coordinates ('vt' lines on every "
                           f"face); give an OBJ with a UV layout")
    lv = layout["vertices"].shape[0]
    if lv != num_vertices:
        raise SubjectError(f"{path}: data.uv_template has {lv} vertices but the template "
                           f"{template_path.name} has {num_vertices}; the layout must share the "
                           f"template's vertex order")
    uvs = layout["uvs"].numpy().astype(np.float32)
    lfaces, lcorners = layout["faces"].numpy(), layout["uv_faces"].numpy()
    faces = np.asarray(faces, np.int64)
    by_tri = {tuple(sorted(f)): i for i, f in enumerate(lfaces.tolist())}
    candidates: dict[int, set[int]] = {}
    for v, t in zip(lfaces.reshape(-1).tolist(), lcorners.reshape(-1).tolist()):
        candidates.setdefault(v, set()).add(t)
    uv_faces = np.empty_like(faces)
    matched = 0
    for i, tri in enumerate(faces.tolist()):
        j = by_tri.get(tuple(sorted(tri)))
        if j is not None:
            corner_of = dict(zip(lfaces[j].tolist(), lcorners[j].tolist()))
            uv_faces[i] = [corner_of[v] for v in tri]
            matched += 1
            continue
        missing = [v for v in tri if v not in candidates]
        if missing:
            raise SubjectError(f"{path}: data.uv_template gives vertex {missing[0]} no texture coordinate, "
                               f"but triangle {i} of {template_path.name} uses it")
        options = [sorted(candidates[v]) for v in tri]
        if all(len(o) == 1 for o in options):
            uv_faces[i] = [o[0] for o in options]
            continue
        combos = np.array(list(product(*options)))  # [C, 3]
        corners = uvs[combos]  # [C, 3, 2]
        perimeters = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=-1).sum(1)
        uv_faces[i] = combos[int(np.argmin(perimeters))]
    if matched < len(faces):
        log.info("UV layout %s: %d of %d template triangles match the layout's; the others take the "
                 "nearest corners of their vertices' UVs", path, matched, len(faces))
    return uvs, uv_faces


def require_dir(root: str | os.PathLike, what: str, marker: str) -> Path:
    """Return ``root`` as a Path, or raise :class:`SubjectError` saying how to get such a folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SubjectError(
            f"{root}: {what} not found (expected a folder holding {marker}). Point data.root at "
            f"an existing one, or make a subject folder from your own video with "
            f"'python scripts/prepare_data.py source=video video=PATH out=DIR' and use data=subject")
    return root


def tracked_subject(root: Path, source: str, template_mesh: dict, numbers: np.ndarray, *, vertices, expressions,
                    Ks, camtoworlds, images, masks, train_ids, test_ids, fps: float, meta: dict) -> Subject:
    """The validated :class:`Subject` of a tracker's output read in place (INSTA, NBS): named
    after ``root``; faces, template and UVs from ``template_mesh`` (:func:`load_template_obj`);
    vertices, expressions and cameras as float32; times from the frame ``numbers``
    (:func:`normalised_times`); ``head_poses`` identity for every frame, because metrical-tracker
    (behind both INSTA and the NBS re-track) runs FLAME with identity global rotation and zero
    translation and puts the head's motion into the camera, so the tracked meshes are already
    in the head frame (fitting the jaw-open template to each frame would turn jaw and eyelid
    motion into small rigid motions); ``meta`` is ``source``, ``root``, then the given
    ``meta``, ``head_poses`` and the ``frame_numbers``. Errors name ``root``."""
    subject = Subject(
        name=root.name,
        faces=template_mesh["faces"],
        template_vertices=template_mesh["vertices"],
        vertices=np.asarray(vertices, np.float32),
        expressions=np.asarray(expressions, np.float32),
        Ks=Ks.astype(np.float32),
        camtoworlds=camtoworlds.astype(np.float32),
        times=normalised_times(numbers),
        images=images,
        masks=masks,
        train_ids=train_ids,
        test_ids=test_ids,
        fps=float(fps),
        uvs=template_mesh["uvs"],
        uv_faces=template_mesh["uv_faces"],
        head_poses=np.tile(np.eye(4, dtype=np.float32), (len(numbers), 1, 1)),
        meta={"source": source, "root": str(root), **meta, "head_poses": "identity",
              "frame_numbers": [int(n) for n in numbers]},
    )
    return subject.validate(str(root))


def map_frames(fn, num_frames: int, num_workers: int) -> None:
    """Run ``fn(t)`` for every frame on a thread pool and re-raise the first error.

    Frames not yet started when a frame fails are cancelled, so a bad frame fails fast instead
    of after reading thousands more.
    """
    pool = ThreadPoolExecutor(max(1, int(num_workers)))
    try:
        for _ in pool.map(fn, range(num_frames)):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def frame_number(path: str | os.PathLike, fallback: int) -> int:
    """Frame number from a file name like ``images/00042.png`` (42); ``fallback`` if not numeric."""
    stem = Path(str(path)).stem
    return int(stem) if stem.isdigit() else int(fallback)


def normalised_times(numbers: np.ndarray) -> np.ndarray:  # [T] int
    """Normalised time ``(n - n_first) / (n_last - n_first)`` in [0, 1], float32 ``[T]``.

    Frame numbers rather than positions are used so that frames the tracker skipped leave a
    gap in time, as they did in the video; train and test frames share one time axis.

    GraphAvatar's readers differ. NBS: ``img_id / N`` with ``N`` the frame count of
    ``transforms.json``; for ids ``0..N-1`` this differs from ours by at most one frame step
    (``1 / N``). INSTA: ``frame / N_split`` with ``N_split`` the length of the split file being
    read, so its training times run up to about ``N / (N - 350)`` (past 1) and its test times
    up to about ``N / 350``; there the two conventions differ by much more than one step, and
    only the NBS statement holds.
    """
    numbers = np.asarray(numbers, np.float64)
    span = max(numbers[-1] - numbers[0], 1.0)
    return ((numbers - numbers[0]) / span).astype(np.float32)


def parse_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from one int (square) or a pair; non-positive sizes raise
    :class:`~headkit.errors.InvalidConfigValue` naming ``data.image_size``."""
    if np.isscalar(image_size):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise InvalidConfigValue(f"data.image_size must be a positive int or [height, width], got {image_size!r}")
    return size


def resize_images(
    images: np.ndarray,  # [T, H, W, 3] uint8
    masks: np.ndarray,  # [T, H, W] uint8
    size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Resize uint8 images and masks to ``size = (H', W')``.

    Shrinking uses area averaging (each output pixel is the mean of the input pixels it
    covers: no aliasing, and exact box filtering for integer factors); enlarging uses bilinear
    interpolation (``align_corners=False``). Returns ``[T, H', W', 3]`` and ``[T, H', W']``.
    """
    H, W = masks.shape[1:]
    if tuple(size) == (H, W):
        return images, masks
    mode = "area" if size[0] <= H and size[1] <= W else "bilinear"
    x = torch.from_numpy(np.concatenate([images, masks[..., None]], -1)).permute(0, 3, 1, 2).float()
    kw = {} if mode == "area" else {"align_corners": False}
    y = F.interpolate(x, size=tuple(size), mode=mode, **kw)
    y = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(y[..., :3]), np.ascontiguousarray(y[..., 3])


def scale_intrinsics(
    Ks: np.ndarray,  # [T, 3, 3]
    old_size: tuple[int, int],
    new_size: tuple[int, int],
) -> np.ndarray:
    """Intrinsics ``[T, 3, 3]`` (float64) for images resized from ``(H, W)`` to ``(H', W')``.

    With pixel centres at ``+0.5`` (the project's convention) a resize is an exact scaling of
    continuous pixel coordinates: ``fx' = fx W'/W``, ``cx' = cx W'/W`` (likewise ``fy``,
    ``cy`` with ``H'/H``).
    """
    Ks = np.array(Ks, np.float64, copy=True)
    Ks[:, 0, :] *= new_size[1] / old_size[1]
    Ks[:, 1, :] *= new_size[0] / old_size[0]
    return Ks


def resize_frames(
    images: np.ndarray,  # [T, H, W, 3] uint8
    masks: np.ndarray,  # [T, H, W] uint8
    Ks: np.ndarray,  # [T, 3, 3]
    size: tuple[int, int],
    chunk: int = 64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resize images and masks to ``size = (H', W')`` (:func:`resize_images`) and scale the
    intrinsics to match (:func:`scale_intrinsics`), ``chunk`` frames at a time."""
    T, H, W = masks.shape
    out_images = np.empty((T, size[0], size[1], 3), np.uint8)
    out_masks = np.empty((T, size[0], size[1]), np.uint8)
    for s in range(0, T, chunk):  # bounded memory: float copies of a few frames at a time
        out_images[s:s + chunk], out_masks[s:s + chunk] = resize_images(
            images[s:s + chunk], masks[s:s + chunk], size)
    return out_images, out_masks, scale_intrinsics(Ks, (H, W), size)
