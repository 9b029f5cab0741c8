"""Load the ICT Face Model Light (ICT-FaceKit, MIT licence) from its own distributed layout.

The kit is the ``FaceXModel`` folder of the ICT-FaceKit repository: ``generic_neutral_mesh.obj``
(quads with UVs, centimetres, y up, z towards the viewer), one OBJ per expression named in
``vertex_indices.json["expressions"]`` and ``identity000.obj``, ``identity001.obj``, ... all with
the neutral topology (a mode is its OBJ's vertices minus the neutral's).

Parsing uses numpy on whole files (regex picks the ``v``/``vt``/``f`` lines, one conversion per
block), about 40 ms per 2.5 MB OBJ. The parsed full kit (all vertices, the modes read) is cached
as one ``.npz`` in ``cache_dir``, keyed by :func:`~headkit.headmodel.model.file_fingerprint` of
every file read (name, size, mtime, first and last 64 KiB, not a full hash: see there).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import numpy as np

from headkit.headmodel.model import (HeadModel, HeadModelError, atomic_save_npz, file_fingerprint,
                                    read_npz)

log = logging.getLogger(__name__)

ICT_REPOSITORY = "ICT-VGL/ICT-FaceKit"
ICT_COMMIT = "da5f95a607f5e6b37755b38d3385d7f2853732e5"
ICT_REGIONS: dict[str, tuple[int, int]] = {  # name -> (first, last) vertex, inclusive
    "face": (0, 9408),
    "head_neck": (9409, 11247),
    "mouth_socket": (11248, 13293),
    "eye_sockets": (13294, 14061),
    "gums_tongue": (14062, 17038),
    "teeth": (17039, 21450),
    "eyeballs": (21451, 24590),
}
DEFAULT_REGIONS = ("face", "head_neck")

KIT_FOLDER = "FaceXModel"
NEUTRAL_NAME = "generic_neutral_mesh.obj"
INDICES_NAME = "vertex_indices.json"
ENV_VAR = "HEADKIT_ICT_FACEKIT"
CONFIG_KEY = "video_preprocess.head_model_dir"
# ICT centimetres, y up, z to the viewer -> metres, OpenCV head axes (det +1: winding kept)
ICT_TO_OPENCV = np.array([0.01, -0.01, -0.01])
CACHE_VERSION = 1
_CACHE_KEYS = ("neutral", "expressions", "identities", "triangles", "uv_triangles", "uvs",
               "expression_names", "landmarks", "cache_version")
_IDENTITY_RE = re.compile(r"identity(\d{3})\.obj")


def fetch_hint() -> str:
    """One sentence on how to get the kit, for error messages."""
    return (f"get the {ICT_REPOSITORY} repository at commit {ICT_COMMIT} (git clone "
            f"https://github.com/{ICT_REPOSITORY} and check out that commit, or download its zip) "
            f"and point {CONFIG_KEY} or env {ENV_VAR} at its {KIT_FOLDER} folder")


def find_kit_folder(kit_dir: str | os.PathLike) -> Path:
    """The ``FaceXModel`` folder: ``kit_dir`` itself or its ``FaceXModel`` subfolder."""
    path = Path(kit_dir).expanduser()
    if not path.is_dir():
        raise HeadModelError(f"{path}: no such folder (ICT Face Model kit); {fetch_hint()}")
    if (path / INDICES_NAME).is_file() or (path / NEUTRAL_NAME).is_file():
        return path
    if (path / KIT_FOLDER).is_dir():
        return path / KIT_FOLDER
    raise HeadModelError(f"{path}: missing {INDICES_NAME} (neither an ICT-FaceKit {KIT_FOLDER} "
                         f"folder nor a folder holding one); {fetch_hint()}")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; HeadModelError naming it when missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise HeadModelError(f"{path}: missing file of the ICT Face Model kit") from None
    except OSError as exc:
        raise HeadModelError(f"{path}: unreadable ({exc})") from exc


def _parse_numbers(path: Path, rows: list[bytes], width: int, what: str,
                   dtype: type = np.float64) -> np.ndarray:  # -> [len(rows), width]
    """The first ``width`` numbers of each OBJ line body, converted in one numpy call."""
    tokens = b" ".join(rows).split()
    if len(tokens) != width * len(rows):  # extra columns (vertex colours, w): slow path
        split = [row.split() for row in rows]
        short = next((i for i, row in enumerate(split) if len(row) < width), None)
        if short is not None:
            raise HeadModelError(f"{path}: '{what}' line {short + 1} has fewer than {width} "
                                 f"numbers: {rows[short][:60]!r} (unreadable or truncated OBJ)")
        tokens = [tok for row in split for tok in row[:width]]
    try:
        values = np.array(tokens, dtype=dtype).reshape(len(rows), width)
    except ValueError as exc:
        raise HeadModelError(f"{path}: unreadable '{what}' line ({exc})") from exc
    if dtype is np.float64 and not np.isfinite(values).all():
        raise HeadModelError(f"{path}: non-finite '{what}' values")
    return values


def parse_obj_vertices(path: str | os.PathLike,
                       data: bytes | None = None) -> np.ndarray:  # -> [N, 3]
    """The ``v`` positions of an OBJ as float64, in file order (other lines are skipped)."""
    path = Path(path)
    if data is None:
        data = _read_bytes(path)
    rows = re.findall(rb"^v[ \t]+([^\n]*)", data, re.M)
    if not rows:
        raise HeadModelError(f"{path}: no 'v' lines (not an OBJ mesh, or empty)")
    return _parse_numbers(path, rows, 3, "v")


def _fan_corners(n: int) -> np.ndarray:  # -> [n-2, 3]
    """Corner triples that split an n-gon into a fan, keeping its winding."""
    middle = np.arange(1, n - 1)
    return np.stack([np.zeros_like(middle), middle, middle + 1], axis=1)


def _polygon_corners(path: Path, rows: list[bytes]) -> np.ndarray:  # -> [P, n, 2]
    """(v, vt) 1-based indices of ``rows``, all n-gons with the same n."""
    n = len(rows[0].split())
    text = b" ".join(rows)
    if b"//" in text:
        raise HeadModelError(f"{path}: faces without texture coordinates (need 'f v/vt ...')")
    tokens = text.replace(b"/", b" ").split()
    per_corner, rest = divmod(len(tokens), len(rows) * n)
    if rest or per_corner not in (2, 3):
        raise HeadModelError(f"{path}: 'f' lines must all be 'v/vt' or 'v/vt/vn' corners "
                             f"(unreadable or truncated OBJ)")
    try:
        ids = np.array(tokens, dtype=np.int64).reshape(len(rows), n, per_corner)
    except ValueError as exc:
        raise HeadModelError(f"{path}: unreadable 'f' line ({exc})") from exc
    return ids[:, :, :2]


def _to_zero_based(path: Path, ids: np.ndarray, count: int, what: str) -> np.ndarray:
    """OBJ 1-based (or negative, from the end) indices -> 0-based; out of range is an error."""
    ids = np.where(ids < 0, ids + count + 1, ids) - 1
    if ids.size and (ids.min() < 0 or ids.max() >= count):
        raise HeadModelError(f"{path}: face {what} index out of range 1..{count}")
    return ids


def parse_obj_faces(path: Path, data: bytes, num_vertices: int, num_uvs: int
                    ) -> tuple[np.ndarray, np.ndarray]:  # -> [T, 3], [T, 3]
    """Triangles and UV triangles of an OBJ's ``f v/vt`` polygons, 0-based.

    Each n-gon becomes n-2 consecutive fan triangles in file order (a quad abcd -> abc, acd),
    so the winding, and with it the normals' direction, is kept.
    """
    rows = re.findall(rb"^f[ \t]+([^\n]*)", data, re.M)
    if not rows:
        raise HeadModelError(f"{path}: no 'f' lines")
    arity = np.array([len(row.split()) for row in rows])
    if arity.min() < 3:
        raise HeadModelError(f"{path}: a face with fewer than 3 corners")
    parts, order = [], []
    for n in np.unique(arity):
        polys = np.flatnonzero(arity == n)
        ids = _polygon_corners(path, [rows[i] for i in polys])[:, _fan_corners(n)]  # [P, n-2, 3, 2]
        parts.append(ids.reshape(-1, 3, 2))
        order.append((polys[:, None] * arity.max() + np.arange(n - 2)).reshape(-1))
    corners = np.concatenate(parts)[np.argsort(np.concatenate(order), kind="stable")]
    return (_to_zero_based(path, corners[..., 0], num_vertices, "vertex"),
            _to_zero_based(path, corners[..., 1], num_uvs, "texture-coordinate"))


def parse_obj_mesh(path: Path) -> dict[str, np.ndarray]:
    """Vertices [N, 3] float64, uvs [U, 2] float32 and (uv) triangles [T, 3] int64 of an OBJ."""
    data = _read_bytes(path)
    vertices = parse_obj_vertices(path, data)
    uv_rows = re.findall(rb"^vt[ \t]+([^\n]*)", data, re.M)
    if not uv_rows:
        raise HeadModelError(f"{path}: no 'vt' texture coordinates")
    uvs = _parse_numbers(path, uv_rows, 2, "vt").astype(np.float32)
    triangles, uv_triangles = parse_obj_faces(path, data, len(vertices), len(uvs))
    return {"vertices": vertices, "uvs": uvs, "triangles": triangles,
            "uv_triangles": uv_triangles}


def _read_indices(folder: Path) -> tuple[list[str], np.ndarray]:  # -> names [E], landmarks [68]
    """Expression names and the 68 landmark vertex ids from ``vertex_indices.json``."""
    path = folder / INDICES_NAME
    if not path.is_file():
        raise HeadModelError(f"{path}: missing (the ICT kit's {INDICES_NAME}); {fetch_hint()}")
    try:
        table = json.loads(path.read_text())
        names = [str(name) for name in table["expressions"]]
        landmarks = np.asarray(table["idx_to_landmark_verts"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HeadModelError(f"{path}: unreadable or lacks 'expressions'/'idx_to_landmark_verts'"
                             f" ({exc!r})") from exc
    return names, landmarks


def _identity_files(folder: Path, num_identities: int | None) -> list[Path]:
    """``identity000.obj``, ``identity001.obj``, ... while present, the first ``num_identities``."""
    numbers = sorted(int(m.group(1)) for p in folder.iterdir()
                     if (m := _IDENTITY_RE.fullmatch(p.name)))
    count = 0
    while count < len(numbers) and numbers[count] == count:
        count += 1
    if count < len(numbers):
        log.warning("%s: identity%03d.obj is missing; using the %d identity modes before it",
                    folder, count, count)
    if num_identities is not None and num_identities > count:
        log.warning("%s: %d identity modes asked for, %d present; using %d",
                    folder, num_identities, count, count)
    if count == 0:
        log.warning("%s: no identity OBJs (identity000.obj, ...); the model has no identity "
                    "modes", folder)
    take = count if num_identities is None else min(num_identities, count)
    return [folder / f"identity{i:03d}.obj" for i in range(take)]


def _mode_deltas(paths: list[Path], neutral: np.ndarray,  # [N, 3] ICT cm, float64
                 bar) -> np.ndarray:                   # -> [len(paths), N, 3] float32
    """Each OBJ's vertices minus the neutral's, converted to metres and OpenCV axes."""
    deltas = np.empty((len(paths),) + neutral.shape, dtype=np.float32)
    for i, path in enumerate(paths):
        vertices = parse_obj_vertices(path)
        if vertices.shape != neutral.shape:
            raise HeadModelError(f"{path}: {len(vertices)} vertices, the neutral "
                                 f"{NEUTRAL_NAME} has {len(neutral)}")
        deltas[i] = (vertices - neutral) * ICT_TO_OPENCV
        bar.update(1)
    return deltas


def _progress_bar(total: int, enabled: bool):
    """:func:`headkit.progress.progress` (a bar, or lines without a terminal) when shown, else a
    silent stand-in (update, close)."""
    if enabled and os.environ.get("HEADKIT_NO_PROGRESS", "") in ("", "0"):
        from headkit.progress import progress
        return progress(iter(()), desc="ICT Face Model OBJs", total=total, unit="obj")
    return SimpleNamespace(update=lambda n=1: None, close=lambda: None)


def _parse_kit(folder: Path, names: list[str], landmarks: np.ndarray,  # landmarks: [68]
               mode_paths: list[Path], num_expressions: int, progress: bool) -> dict:
    """The full kit in metres and OpenCV axes: neutral, modes, triangles, uvs, landmarks."""
    bar = _progress_bar(1 + len(mode_paths), progress)
    try:
        mesh = parse_obj_mesh(folder / NEUTRAL_NAME)
        bar.update(1)
        deltas = _mode_deltas(mode_paths, mesh["vertices"], bar)
    finally:
        bar.close()
    if landmarks.size and (landmarks.min() < 0 or landmarks.max() >= len(mesh["vertices"])):
        raise HeadModelError(f"{folder / INDICES_NAME}: landmark vertex ids outside "
                             f"0..{len(mesh['vertices']) - 1}")
    return {"neutral": (mesh["vertices"] * ICT_TO_OPENCV).astype(np.float32),
            "expressions": deltas[:num_expressions], "identities": deltas[num_expressions:],
            "triangles": mesh["triangles"], "uv_triangles": mesh["uv_triangles"],
            "uvs": mesh["uvs"], "expression_names": np.array(names, dtype=str),
            "landmarks": landmarks, "cache_version": np.array(CACHE_VERSION)}


def _load_kit(folder: Path, num_identities: int | None, cache_dir: str | os.PathLike | None,
              progress: bool) -> dict:
    """The parsed full kit, from the cache file when its fingerprint matches."""
    names, landmarks = _read_indices(folder)
    expression_paths = [folder / f"{name}.obj" for name in names]
    missing = next((p for p in expression_paths if not p.is_file()), None)
    if missing is not None:
        raise HeadModelError(f"{missing}: missing expression OBJ '{missing.stem}' (listed in "
                             f"{INDICES_NAME})")
    mode_paths = expression_paths + _identity_files(folder, num_identities)
    if cache_dir is None:
        return _parse_kit(folder, names, landmarks, mode_paths, len(names), progress)
    key = file_fingerprint([folder / INDICES_NAME, folder / NEUTRAL_NAME] + mode_paths,
                           salt=f"ict-facekit-cache-v{CACHE_VERSION}")
    cache = Path(cache_dir).expanduser() / f"ict_facekit_{key}.npz"
    if cache.is_file():
        try:
            return read_npz(cache, _CACHE_KEYS)
        except HeadModelError as exc:
            warnings.warn(f"corrupt head-model cache, parsing the kit again: {exc}",
                          RuntimeWarning, stacklevel=3)
    kit = _parse_kit(folder, names, landmarks, mode_paths, len(names), progress)
    try:
        atomic_save_npz(cache, kit)
    except OSError as exc:
        log.warning("could not write the head-model cache %s: %s", cache, exc)
    return kit


def _region_mask(names: Sequence[str], ranges: Mapping[str, tuple[int, int]],
                 num_vertices: int | None) -> np.ndarray:  # -> [N] bool
    """Which kit vertices lie in the named regions (inclusive vertex ranges); with
    ``num_vertices=None`` only the names are checked. Errors list the valid regions."""
    unknown = [name for name in names if name not in ranges]
    if unknown or not names:
        raise HeadModelError(f"unknown head-model regions {unknown or list(names)}; valid: "
                             f"{', '.join(ranges)}")
    if num_vertices is None:
        return np.zeros(0, dtype=bool)
    mask = np.zeros(num_vertices, dtype=bool)
    for name in names:
        first, last = ranges[name]
        if not 0 <= first <= last < num_vertices:
            raise HeadModelError(f"region '{name}' ({first}-{last}) lies outside the kit's "
                                 f"{num_vertices} vertices")
        mask[first:last + 1] = True
    return mask


def _select(kit: dict, regions: tuple[str, ...], ranges: Mapping[str, tuple[int, int]],
            source: str) -> HeadModel:
    """The HeadModel over the chosen regions: their vertices, the faces wholly inside them."""
    mask = _region_mask(regions, ranges, len(kit["neutral"]))
    vertex_ids = np.flatnonzero(mask).astype(np.int64)
    remap = np.full(len(mask), -1, dtype=np.int64)
    remap[vertex_ids] = np.arange(len(vertex_ids))
    keep = mask[kit["triangles"]].all(axis=1)
    uv_triangles = kit["uv_triangles"][keep]
    used_uvs = np.unique(uv_triangles)
    return HeadModel(
        neutral=np.ascontiguousarray(kit["neutral"][vertex_ids]),
        expressions=np.ascontiguousarray(kit["expressions"][:, vertex_ids]),
        expression_names=[str(name) for name in kit["expression_names"]],
        identities=np.ascontiguousarray(kit["identities"][:, vertex_ids]),
        faces=remap[kit["triangles"][keep]],
        uvs=kit["uvs"][used_uvs],
        uv_faces=np.searchsorted(used_uvs, uv_triangles).astype(np.int64),
        vertex_ids=vertex_ids,
        landmark_vertices=remap[kit["landmarks"]],
        regions=regions,
        source=source)


def load_ict_face_model(kit_dir: str | os.PathLike, regions: Sequence[str] = DEFAULT_REGIONS,
                        num_identities: int | None = None,
                        cache_dir: str | os.PathLike | None = None, progress: bool = True,
                        region_ranges: Mapping[str, tuple[int, int]] | None = None) -> HeadModel:
    """The ICT Face Model Light as a :class:`HeadModel` in metres and OpenCV head axes.

    Args:
        kit_dir: the ``FaceXModel`` folder or a folder holding it.
        regions: region names of ``region_ranges`` to keep (a single name is accepted too).
        num_identities: how many identity modes to read; None takes all present.
        cache_dir: where the parsed kit is cached as one ``.npz``; None disables caching.
        progress: show a bar while parsing (also hidden by ``HEADKIT_NO_PROGRESS=1`` or when
            stderr is not a terminal).
        region_ranges: overrides :data:`ICT_REGIONS` (for small test kits).

    Raises:
        HeadModelError: naming the missing, unreadable or inconsistent file or folder.
    """
    folder = find_kit_folder(kit_dir)
    regions = (regions,) if isinstance(regions, str) else tuple(regions)
    ranges = ICT_REGIONS if region_ranges is None else region_ranges
    _region_mask(regions, ranges, None)  # name errors before the slow part
    kit = _load_kit(folder, num_identities, cache_dir, progress)
    source = (f"ICT-FaceKit Light (MIT), {folder}, "
              f"{len(kit['identities'])} identity modes")
    return _select(kit, regions, ranges, source)


def _not_found(places: list[str], why: str) -> HeadModelError:
    """The error for a kit found nowhere: where it was looked for and how to get it."""
    return HeadModelError(f"ICT Face Model kit not found (looked in: {'; '.join(places)}); {why}; "
                          f"{fetch_hint()}")


def _extract_kit(zip_path: Path, root: Path) -> Path:
    """Extract the ``*/FaceXModel/*`` members into ``root/FaceXModel`` via a temp folder."""
    tmp = root.parent / f".{root.name}.extract-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for info in archive.infolist():
                parts = PurePosixPath(info.filename).parts
                if (len(parts) < 3 or parts[1] != KIT_FOLDER or info.is_dir()
                        or any(p in ("..", "") or p.startswith("/") for p in parts)):
                    continue
                target = tmp.joinpath(*parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not (tmp / KIT_FOLDER).is_dir():
            raise HeadModelError(f"{zip_path}: holds no */{KIT_FOLDER}/ folder")
        root.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / KIT_FOLDER, root / KIT_FOLDER)
    except (OSError, zipfile.BadZipFile) as exc:
        raise HeadModelError(f"{zip_path}: could not extract the ICT kit ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / KIT_FOLDER


def _download_kit(data_dir: Path, places: list[str]) -> Path:
    """Download the pinned ICT-FaceKit zip into ``data_dir`` and keep only its FaceXModel."""
    from headkit.download import DownloadError, download_file

    url = f"https://codeload.github.com/{ICT_REPOSITORY}/zip/{ICT_COMMIT}"
    zip_path = data_dir / "ICT-FaceKit.zip"
    log.info("downloading the ICT Face Model kit from %s", url)
    try:
        download_file(url, zip_path, sha256=None, desc="ICT-FaceKit")
        return _extract_kit(zip_path, data_dir / "ICT-FaceKit")
    except (DownloadError, OSError) as exc:
        raise _not_found(places, f"downloading {url} failed ({exc})") from exc
    finally:
        zip_path.unlink(missing_ok=True)


def resolve_ict_kit(head_model_dir: str | None, data_dir: str | os.PathLike,
                    download: bool = True) -> Path:
    """The ICT kit's ``FaceXModel`` folder, found or downloaded.

    Order: ``head_model_dir`` (config ``video_preprocess.head_model_dir``; must exist), env
    ``HEADKIT_ICT_FACEKIT`` (must exist), ``<data_dir>/ICT-FaceKit/FaceXModel``, then (when
    ``download``) the pinned commit's zip from GitHub, unpacked there.
    """
    if head_model_dir:
        if not Path(head_model_dir).expanduser().is_dir():
            raise HeadModelError(f"{head_model_dir}: no such folder (set by {CONFIG_KEY}); "
                                 f"{fetch_hint()}")
        return find_kit_folder(head_model_dir)
    env = os.environ.get(ENV_VAR, "")
    if env:
        if not Path(env).expanduser().is_dir():
            raise HeadModelError(f"{env}: no such folder (set by env {ENV_VAR}); {fetch_hint()}")
        return find_kit_folder(env)
    local = Path(data_dir).expanduser() / "ICT-FaceKit"
    if (local / KIT_FOLDER).is_dir():
        return local / KIT_FOLDER
    places = [f"{CONFIG_KEY} (unset)", f"env {ENV_VAR} (unset)", str(local / KIT_FOLDER)]
    if not download:
        raise _not_found(places, "downloading is off")
    return _download_kit(Path(data_dir).expanduser(), places)
