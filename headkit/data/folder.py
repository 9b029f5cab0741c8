"""The project's own on-disk subject folder: writer and parser.

Layout (all paths relative to the subject folder)::

    subject.json      metadata: format/version, name, width, height, fps, num_frames,
                      num_vertices, expression_dim, split {train: [...], test: [...]},
                      image/mask filename patterns, free-form "meta"
    template.obj      template mesh: v (canonical vertices), optional vt, f v[/vt]
    tracking.npz      per frame: vertices [T,V,3], expressions [T,E], Ks [T,3,3],
                      camtoworlds [T,4,4] (OpenCV), times [T]; optional head_poses [T,4,4];
                      any extra per-frame arrays under "extra_<name>" (e.g. ground truth)
    images/00000.png  RGB frames (uint8); RGBA frames are composited over the background
                      (see :func:`load_subject_folder`)
    masks/00000.png   foreground masks (uint8, 255 = foreground)

The writer is atomic per file and refuses to overwrite a non-empty folder unless asked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .image_io import DEFAULT_BACKGROUND, read_image, read_mask, to_rgb, write_image
from .subject import Subject, SubjectError, check_split

log = logging.getLogger(__name__)

FORMAT = "headkit-subject"
VERSION = 1
_TRACKING_KEYS = ("vertices", "expressions", "Ks", "camtoworlds", "times")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_subject_folder(subject: Subject, root: str | os.PathLike, *, overwrite: bool = False,
                         num_workers: int = 4) -> Path:
    """Write ``subject`` to ``root`` in the subject-folder layout; returns the folder.

    Raises ``FileExistsError`` when ``root`` is a non-empty folder and ``overwrite`` is False
    (nothing is ever silently replaced).
    """
    from headkit.mesh import save_obj

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root}: folder exists and is not empty; pass overwrite=True "
                                  f"(prepare_data.py: overwrite=true) or choose another folder")
        shutil.rmtree(root)
    subject.validate(str(root))
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)

    def write_frame(t: int) -> None:
        write_image(root / "images" / f"{t:05d}.png", subject.images[t])
        write_image(root / "masks" / f"{t:05d}.png", subject.masks[t])

    with ThreadPoolExecutor(num_workers) as pool:
        list(pool.map(write_frame, range(subject.num_frames)))

    save_obj(root / "template.obj", subject.template_vertices, subject.faces,
             uvs=subject.uvs, uv_faces=subject.uv_faces)
    arrays = {k: np.asarray(getattr(subject, k), dtype=np.float32) for k in _TRACKING_KEYS}
    if subject.head_poses is not None:
        arrays["head_poses"] = np.asarray(subject.head_poses, dtype=np.float32)
    arrays.update({f"extra_{k}": np.asarray(v) for k, v in subject.extras.items()})
    tmp = root / f".tracking.tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, root / "tracking.npz")

    meta = {
        "format": FORMAT, "version": VERSION, "name": subject.name,
        "width": subject.width, "height": subject.height, "fps": float(subject.fps),
        "num_frames": subject.num_frames, "num_vertices": subject.num_vertices,
        "expression_dim": subject.expression_dim,
        "images": "images/{:05d}.png", "masks": "masks/{:05d}.png",
        "split": {"train": [int(i) for i in subject.train_ids],
                  "test": [int(i) for i in subject.test_ids]},
        "meta": subject.meta,
    }
    _atomic_write_bytes(root / "subject.json", json.dumps(meta, indent=1, default=_json_default).encode())
    return root


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SubjectError(f"{path}: malformed JSON ({exc})") from exc


def _require(meta: dict, key: str, path: Path):
    if key not in meta:
        raise SubjectError(f"{path}: missing key '{key}'")
    return meta[key]


def _list_files(paths: list[str], limit: int = 10) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def folder_background(meta: dict, background=None, source: str = "subject.json") -> tuple[float, float, float]:
    """The background colour RGBA frames of a subject folder are composited over.

    ``background`` (the ``data.background`` config value) when given, else the subject's own
    ``meta.settings.background`` in ``subject.json`` (what the synthetic generator records and
    what :class:`neuralcache.inputs.FrameEncoder` reads), else white. RGB in [0, 1].
    """
    if background is None:
        settings = (meta.get("meta") or {}).get("settings") or {}
        background = settings.get("background", DEFAULT_BACKGROUND)
        where = f"{source}: meta.settings.background"
    else:
        where = "data.background"
    try:
        bg = tuple(float(c) for c in background)
    except (TypeError, ValueError):
        bg = ()
    if len(bg) != 3 or not all(0.0 <= c <= 1.0 for c in bg):
        raise SubjectError(f"{where} must be 3 values in [0, 1] (RGB), got {background!r}")
    return bg


def _split_ids(split, T: int, meta_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Train/test ids from ``subject.json``'s ``split``; errors name the file and the split."""
    if not isinstance(split, dict):
        raise SubjectError(f"{meta_path}: 'split' must be {{\"train\": [...], \"test\": [...]}}, got "
                           f"{type(split).__name__}")
    ids = {}
    for name in ("train", "test"):
        try:
            ids[name] = np.asarray(split.get(name, []), np.int64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise SubjectError(f"{meta_path}: split.{name} must be a list of frame indices ({exc})") from exc
    for name, other in (("train", "test"), ("test", "train")):
        if ids[name].size == 0:
            raise SubjectError(
                f"{meta_path}: the {name} split has no frames ('split' lists 0 {name} and "
                f"{ids[other].size} {other} frames of {T}); put frame indices under "
                f"\"split\": {{\"{name}\": [...]}} in {meta_path.name}")
    check_split(ids["train"], ids["test"], T, f"{meta_path} ('split')")
    return ids["train"], ids["test"]


def load_subject_folder(root: str | os.PathLike, *, missing_mask: str = "error",
                        background=None, num_workers: int = 4) -> Subject:
    """Read a subject folder written by :func:`write_subject_folder` (or by hand).

    ``missing_mask="error"`` (default) raises on a missing mask file, naming the file and
    ``data.missing_mask=full``; ``"full"`` treats such a frame as all foreground and logs one
    warning listing the frames so filled.

    RGBA frames (matted images) are not trained on with their alpha dropped (black where the
    matte is transparent, among frames with a white background): each is composited, with
    straight (unpremultiplied) alpha, over the background colour, ``rgb * a + bg * (1 - a)``,
    and one warning names the frame files. The colour is ``background`` (``data.background``)
    when given, else ``subject.json``'s ``meta.settings.background``, else white
    (:func:`folder_background`). The mask still comes from ``masks/``.

    Every problem raises :class:`SubjectError` naming the file; an empty train or test split
    names ``subject.json`` (the file the split comes from) and the split.
    """
    from headkit.mesh import load_obj

    root = Path(root)
    meta_path = root / "subject.json"
    if not root.is_dir():
        raise SubjectError(f"{root}: subject folder not found; make one with "
                           f"'python scripts/prepare_data.py source=synthetic out={root}'")
    if not meta_path.is_file():
        raise SubjectError(f"{meta_path}: missing; {root} is not a subject folder "
                           f"(make one with scripts/prepare_data.py)")
    if missing_mask not in ("error", "full"):
        raise ValueError(f"missing_mask must be 'error' or 'full', got {missing_mask!r}")
    meta = _read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise SubjectError(f"{meta_path}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    T = int(_require(meta, "num_frames", meta_path))
    H, W = int(_require(meta, "height", meta_path)), int(_require(meta, "width", meta_path))
    split = _require(meta, "split", meta_path)
    bg = folder_background(meta, background, str(meta_path))

    obj_path = root / "template.obj"
    if not obj_path.is_file():
        raise SubjectError(f"{obj_path}: template mesh is missing")
    template = load_obj(obj_path)

    npz_path = root / "tracking.npz"
    if not npz_path.is_file():
        raise SubjectError(f"{npz_path}: tracking file is missing")
    try:
        with np.load(npz_path) as npz:
            tracking = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise SubjectError(f"{npz_path}: cannot read tracking ({type(exc).__name__}: {exc})") from exc
    for key in _TRACKING_KEYS:
        if key not in tracking:
            raise SubjectError(f"{npz_path}: missing array '{key}'")
    V = template["vertices"].shape[0]
    verts = tracking["vertices"]
    if verts.ndim != 3 or verts.shape[1] != V:
        raise SubjectError(f"{npz_path}: tracked vertices have {verts.shape[1] if verts.ndim == 3 else '?'} "
                           f"vertices per frame but {obj_path.name} has {V}")
    if verts.shape[0] != T:
        raise SubjectError(f"{root}: subject.json says {T} frames (images) but {npz_path.name} "
                           f"has tracking for {verts.shape[0]}")
    for key in _TRACKING_KEYS[1:]:
        arr = tracking[key]
        bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        if bad.any():
            raise SubjectError(f"{npz_path}: NaN/Inf in '{key}' at frame {int(np.flatnonzero(bad)[0])}")
    bad = ~np.isfinite(verts.reshape(T, -1)).all(axis=1)
    if bad.any():
        raise SubjectError(f"{npz_path}: NaN/Inf in 'vertices' at frame {int(np.flatnonzero(bad)[0])}")

    train_ids, test_ids = _split_ids(split, T, meta_path)  # before reading any frame

    image_pattern = meta.get("images", "images/{:05d}.png")
    mask_pattern = meta.get("masks", "masks/{:05d}.png")
    images = np.empty((T, H, W, 3), np.uint8)
    masks = np.empty((T, H, W), np.uint8)

    had_alpha = np.zeros(T, bool)
    filled = np.zeros(T, bool)

    def read_frame(t: int) -> None:
        image = read_image(root / image_pattern.format(t), frame=t, expected_size=(H, W))
        had_alpha[t] = image.shape[-1] == 4
        images[t] = to_rgb(image, bg)
        mask_path = root / mask_pattern.format(t)
        if not mask_path.exists():
            if missing_mask != "full":
                raise SubjectError(f"{mask_path} (frame {t}): mask file is missing; add it, or set "
                                   f"data.missing_mask=full to treat frames without a mask as all foreground")
            masks[t] = 255
            filled[t] = True
        else:
            masks[t] = read_mask(mask_path, frame=t, expected_size=(H, W))

    with ThreadPoolExecutor(num_workers) as pool:
        list(pool.map(read_frame, range(T)))
    if had_alpha.any():
        files = [image_pattern.format(int(t)) for t in np.flatnonzero(had_alpha)]
        log.warning("%s: %d of %d frames are RGBA; their alpha was composited (straight alpha) over the "
                    "background %s (set data.background to change it): %s", root, len(files), T,
                    list(bg), _list_files(files))
    if filled.any():
        files = [mask_pattern.format(int(t)) for t in np.flatnonzero(filled)]
        log.warning("%s: %d of %d frames have no mask file and were treated as all foreground "
                    "(data.missing_mask=full): %s", root, len(files), T, _list_files(files))

    extras = {k[len("extra_"):]: v for k, v in tracking.items() if k.startswith("extra_")}
    subject = Subject(
        name=str(meta.get("name", root.name)),
        faces=np.asarray(template["faces"], np.int64),
        template_vertices=np.asarray(template["vertices"], np.float32),
        vertices=verts.astype(np.float32),
        expressions=tracking["expressions"].astype(np.float32),
        Ks=tracking["Ks"].astype(np.float32),
        camtoworlds=tracking["camtoworlds"].astype(np.float32),
        times=tracking["times"].astype(np.float32),
        images=images, masks=masks,
        train_ids=train_ids, test_ids=test_ids,
        fps=float(meta.get("fps", 30.0)),
        uvs=None if template.get("uvs") is None else np.asarray(template["uvs"], np.float32),
        uv_faces=None if template.get("uv_faces") is None else np.asarray(template["uv_faces"], np.int64),
        head_poses=tracking.get("head_poses"),
        extras=extras,
        meta=dict(meta.get("meta", {})),
    )
    return subject.validate(str(root))
