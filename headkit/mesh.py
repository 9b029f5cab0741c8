"""Triangle-mesh utilities: normals, areas, edges, adjacency, Laplacians, OBJ I/O, test shapes.

Vertices are ``[..., V, 3]`` (leading batch dimensions allowed), faces ``[F, 3]`` int64 shared by
every batch element. Faces are counter-clockwise seen from outside, so ``(b - a) × (c - a)``
points outward (the OBJ/OpenGL convention; it does not depend on the camera convention).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "check_faces",
    "face_normals",
    "face_areas",
    "vertex_normals",
    "edges",
    "edge_index",
    "adjacency",
    "laplacian",
    "load_obj",
    "save_obj",
    "ObjError",
    "icosphere",
    "uv_sphere",
]


class ObjError(ValueError):
    """Malformed OBJ file; the message names the file and line."""


def check_faces(faces: Tensor, num_vertices: int | None = None) -> None:  # [F, 3]
    """Raise ``ValueError`` unless ``faces`` is an integer ``[F, 3]`` array of valid indices."""
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape [F, 3], got {list(faces.shape)}")
    if faces.dtype.is_floating_point or faces.dtype == torch.bool:
        raise ValueError(f"faces must be an integer tensor, got {faces.dtype}")
    if faces.numel() == 0:
        return
    lo, hi = int(faces.min()), int(faces.max())
    if lo < 0:
        raise ValueError(f"faces contain a negative vertex index ({lo})")
    if num_vertices is not None and hi >= num_vertices:
        raise ValueError(f"faces index vertex {hi} but the mesh has only {num_vertices} vertices")


def _face_cross(vertices: Tensor, faces: Tensor) -> Tensor:
    """Unnormalised face normals ``(b - a) × (c - a)`` (length = 2 · area), ``[..., F, 3]``."""
    a = vertices[..., faces[:, 0], :]
    b = vertices[..., faces[:, 1], :]
    c = vertices[..., faces[:, 2], :]
    return torch.cross(b - a, c - a, dim=-1)


def face_normals(
    vertices: Tensor,  # [..., V, 3]
    faces: Tensor,  # [F, 3]
) -> Tensor:
    """Unit face normals ``[..., F, 3]``; zero for degenerate (zero-area) faces."""
    return torch.nn.functional.normalize(_face_cross(vertices, faces), dim=-1, eps=1e-20)


def face_areas(
    vertices: Tensor,  # [..., V, 3]
    faces: Tensor,  # [F, 3]
) -> Tensor:
    """Triangle areas ``[..., F]``: ``|(b - a) × (c - a)| / 2``."""
    return 0.5 * _face_cross(vertices, faces).norm(dim=-1)


def vertex_normals(
    vertices: Tensor,  # [..., V, 3]
    faces: Tensor,  # [F, 3]
) -> Tensor:
    """Area-weighted unit vertex normals ``[..., V, 3]``.

    ``n_v = normalize(Σ_{f ∋ v} area_f · n_f)``, i.e. the sum of the unnormalised face cross
    products around the vertex. Vertices in no face (INSTA's simplified FLAME leaves about
    958 of 5,023, the eyeballs and eye region; MediaPipe's iris points), or only in degenerate
    ones, get exactly zero, with zero gradient: they neither change their neighbours' normals
    nor put NaN/Inf into a backward pass (a plain ``normalize`` with a tiny ``eps`` would scale
    their gradient by ``1 / eps``).
    """
    cross = _face_cross(vertices, faces)  # [..., F, 3]
    sums = torch.zeros_like(vertices)
    for corner in range(3):
        sums = sums.index_add(-2, faces[:, corner], cross)
    lengths = sums.norm(dim=-1, keepdim=True)  # [..., V, 1]
    covered = lengths > 1e-20
    return torch.where(covered, sums / torch.where(covered, lengths, torch.ones_like(lengths)),
                       torch.zeros_like(sums))


def edges(faces: Tensor) -> Tensor:  # [F, 3]
    """Unique undirected edges ``[E, 2]`` with ``e[:, 0] < e[:, 1]``, rows sorted lexicographically."""
    check_faces(faces)
    pairs = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], dim=0)
    pairs = torch.sort(pairs, dim=1).values
    return torch.unique(pairs, dim=0)


def edge_index(faces: Tensor) -> Tensor:  # [F, 3]
    """PyG-style ``edge_index [2, 2E]``: every undirected edge in both directions.

    Columns are sorted by (source, target), i.e. coalesced like ``torch_geometric.utils.coalesce``.
    """
    e = edges(faces)
    both = torch.cat([e, e.flip(1)], dim=0)  # [2E, 2]
    num = int(both.max()) + 1 if both.numel() else 1
    order = torch.argsort(both[:, 0] * num + both[:, 1])
    return both[order].t().contiguous()


def adjacency(
    faces: Tensor,  # [F, 3]
    num_vertices: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Symmetric 0/1 vertex adjacency as a coalesced sparse COO tensor ``[V, V]``."""
    check_faces(faces, num_vertices)
    ei = edge_index(faces)
    values = torch.ones(ei.shape[1], dtype=dtype, device=faces.device)
    return torch.sparse_coo_tensor(ei, values, (num_vertices, num_vertices),
                                   check_invariants=False).coalesce()


def laplacian(
    faces: Tensor,  # [F, 3]
    num_vertices: int,
    kind: str = "combinatorial",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Graph Laplacian of the mesh's edge graph as a coalesced sparse COO tensor ``[V, V]``.

    ``kind="combinatorial"``: ``L = D - A`` (rows sum to zero, ``L 1 = 0``).
    ``kind="normalized"``: ``L = I - D^{-1/2} A D^{-1/2}`` (``L D^{1/2} 1 = 0``), the form
    ChebConv's spectral filters assume. As in PyG's ``get_laplacian``, a vertex in no edge has
    ``D^{-1/2} = 0``, so its diagonal entry is 1 in the normalised form and 0 in the
    combinatorial one.
    """
    if kind not in ("combinatorial", "normalized"):
        raise ValueError(f"laplacian: kind must be 'combinatorial' or 'normalized', got {kind!r}")
    adj = adjacency(faces, num_vertices, dtype=dtype)
    idx, vals = adj.indices(), adj.values()
    degrees = torch.zeros(num_vertices, dtype=dtype, device=faces.device).index_add(0, idx[0], vals)
    diag_idx = torch.arange(num_vertices, device=faces.device).expand(2, -1)
    if kind == "combinatorial":
        diag_vals, off_vals = degrees, -vals
    else:
        inv_sqrt = torch.where(degrees > 0, degrees.clamp_min(1e-30).rsqrt(), torch.zeros_like(degrees))
        diag_vals = torch.ones_like(degrees)
        off_vals = -vals * inv_sqrt[idx[0]] * inv_sqrt[idx[1]]
    all_idx = torch.cat([diag_idx, idx], dim=1)
    all_vals = torch.cat([diag_vals, off_vals])
    return torch.sparse_coo_tensor(all_idx, all_vals, (num_vertices, num_vertices),
                                   check_invariants=False).coalesce()


# OBJ statements that carry nothing this loader needs but are legal.
_OBJ_IGNORED = {"vn", "vp", "g", "o", "s", "usemtl", "mtllib", "l", "p", "cstype", "deg", "curv",
                "curv2", "surf", "parm", "trim", "hole", "scrv", "sp", "end", "con", "mg", "bmat",
                "step", "lod", "usemap", "maplib", "shadow_obj", "trace_obj", "ctech", "stech"}


def load_obj(path: str | os.PathLike) -> dict[str, Tensor | None]:
    """Read a triangle mesh (positions, faces, optional UVs) from a Wavefront OBJ file.

    Handles ``f v``, ``f v/vt``, ``f v//vn`` and ``f v/vt/vn`` corners, negative (relative)
    indices, and polygons with more than three corners (fan-triangulated, so a quad gives two
    triangles). Normals, groups and materials are ignored.

    Returns:
        ``dict(vertices [V, 3] float32, faces [F, 3] int64, uvs [Vt, 2] float32 | None,
        uv_faces [F, 3] int64 | None)``; UVs are returned only when every face has them.

    Raises:
        FileNotFoundError: the file does not exist.
        ObjError: malformed content; the message names the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OBJ file not found: {path}")
    obj = _ObjContent()
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.split("#", 1)[0].strip()
            if line:
                _read_obj_statement(obj, line, f"{path}:{lineno}")
    return _obj_tensors(obj, path)


class _ObjContent:
    """What an OBJ file declared so far: positions, UVs and triangles (0-based indices), and how
    many triangles came with texture indices."""

    def __init__(self) -> None:
        self.verts: list[list[float]] = []
        self.uvs: list[list[float]] = []
        self.faces: list[list[int]] = []
        self.uv_faces: list[list[int]] = []
        self.faces_with_uv = 0


def _read_obj_statement(obj: _ObjContent, line: str, where: str) -> None:
    """Add one statement (comment stripped, not empty) to ``obj``; ``where`` is ``file:line``."""
    tokens = line.split()
    key, args = tokens[0], tokens[1:]
    if key == "v" or key == "vt":
        (obj.verts if key == "v" else obj.uvs).append(_obj_numbers(key, args, line, where))
    elif key == "f":
        _add_obj_face(obj, args, line, where)
    elif key not in _OBJ_IGNORED:
        raise ObjError(f"{where}: unknown OBJ statement {key!r} in {line[:80]!r}")


def _obj_numbers(key: str, args: list[str], line: str, where: str) -> list[float]:
    """The 3 (``v``) or 2 (``vt``) finite numbers of a statement; extra values are ignored."""
    need = 3 if key == "v" else 2
    if len(args) < need:
        raise ObjError(f"{where}: '{key}' needs {need} numbers, got {line!r}")
    try:
        vals = [float(a) for a in args[:need]]
    except ValueError:
        raise ObjError(f"{where}: cannot parse numbers in {line!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise ObjError(f"{where}: non-finite value in {line!r}")
    return vals


def _add_obj_face(obj: _ObjContent, args: list[str], line: str, where: str) -> None:
    """Fan-triangulate an ``f`` statement's corners (``v``, ``v/vt``, ``v//vn``, ``v/vt/vn``)
    into ``obj``; texture indices must be on all corners or none."""
    if len(args) < 3:
        raise ObjError(f"{where}: a face needs at least 3 corners, got {line!r}")
    vidx, tidx = [], []
    for corner in args:
        parts = corner.split("/")
        try:
            vi = int(parts[0])
            ti = int(parts[1]) if len(parts) > 1 and parts[1] else None
        except ValueError:
            raise ObjError(f"{where}: bad face corner {corner!r} in {line!r}") from None
        vidx.append(_resolve_index(vi, len(obj.verts), where, "vertex"))
        if ti is not None:
            tidx.append(_resolve_index(ti, len(obj.uvs), where, "texture coordinate"))
    if tidx and len(tidx) != len(vidx):
        raise ObjError(f"{where}: some corners have texture indices and some not: {line!r}")
    for k in range(1, len(vidx) - 1):  # fan triangulation
        obj.faces.append([vidx[0], vidx[k], vidx[k + 1]])
        if tidx:
            obj.uv_faces.append([tidx[0], tidx[k], tidx[k + 1]])
    if tidx:
        obj.faces_with_uv += len(vidx) - 2


def _obj_tensors(obj: _ObjContent, path: Path) -> dict[str, Tensor | None]:
    """:func:`load_obj`'s tensors, after checking the file declared vertices, faces, and UVs on
    all faces or none."""
    if not obj.verts:
        raise ObjError(f"{path}: no vertices ('v' lines) found")
    if not obj.faces:
        raise ObjError(f"{path}: no faces ('f' lines) found")
    if 0 < obj.faces_with_uv < len(obj.faces):
        raise ObjError(f"{path}: {obj.faces_with_uv} of {len(obj.faces)} triangles have texture indices; "
                       "expected all or none")
    has_uv = obj.faces_with_uv == len(obj.faces)
    return {
        "vertices": torch.tensor(obj.verts, dtype=torch.float32),
        "faces": torch.tensor(obj.faces, dtype=torch.int64),
        "uvs": torch.tensor(obj.uvs, dtype=torch.float32).reshape(-1, 2) if has_uv else None,
        "uv_faces": torch.tensor(obj.uv_faces, dtype=torch.int64) if has_uv else None,
    }


def _resolve_index(index: int, count: int, where: str, what: str) -> int:
    """OBJ 1-based (or negative, relative) index → 0-based, checked against ``count`` so far."""
    if index == 0:
        raise ObjError(f"{where}: {what} index 0 is invalid (OBJ indices start at 1)")
    resolved = index - 1 if index > 0 else count + index
    if not 0 <= resolved < count:
        raise ObjError(f"{where}: {what} index {index} out of range ({count} defined so far)")
    return resolved


def save_obj(
    path: str | os.PathLike,
    vertices: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3]
    uvs: Tensor | None = None,  # [Vt, 2]
    uv_faces: Tensor | None = None,  # [F, 3]
) -> None:
    """Write a triangle mesh (with optional UVs) as OBJ; 9 significant digits round-trip float32.

    The file is written to a temporary name and renamed, so a crash never leaves a half file.
    """
    vertices = torch.as_tensor(vertices).detach().cpu()
    faces = torch.as_tensor(faces).detach().cpu()
    if vertices.dim() != 2 or vertices.shape[1] != 3:
        raise ValueError(f"save_obj({path}): vertices must be [V, 3], got {list(vertices.shape)}")
    check_faces(faces, vertices.shape[0])
    if (uvs is None) != (uv_faces is None):
        raise ValueError(f"save_obj({path}): give both uvs and uv_faces or neither")
    lines = [f"v {x:.9g} {y:.9g} {z:.9g}" for x, y, z in vertices.tolist()]
    if uvs is not None:
        uvs = torch.as_tensor(uvs).detach().cpu()
        uv_faces = torch.as_tensor(uv_faces).detach().cpu()
        if uvs.dim() != 2 or uvs.shape[1] != 2:
            raise ValueError(f"save_obj({path}): uvs must be [Vt, 2], got {list(uvs.shape)}")
        if uv_faces.shape != faces.shape:
            raise ValueError(f"save_obj({path}): uv_faces {list(uv_faces.shape)} must match "
                             f"faces {list(faces.shape)}")
        check_faces(uv_faces, uvs.shape[0])
        lines += [f"vt {u:.9g} {v:.9g}" for u, v in uvs.tolist()]
        lines += [f"f {a + 1}/{p + 1} {b + 1}/{q + 1} {c + 1}/{r + 1}"
                  for (a, b, c), (p, q, r) in zip(faces.tolist(), uv_faces.tolist())]
    else:
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces.tolist()]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def icosphere(subdivisions: int = 0, radius: float = 1.0, dtype: torch.dtype = torch.float32
              ) -> tuple[Tensor, Tensor]:
    """Icosphere ``(vertices [V, 3], faces [F, 3])`` with ``F = 20 · 4^s``, outward winding.

    Each subdivision splits every triangle into four at its edge midpoints, which are pushed
    onto the sphere. ``V = 10 · 4^s + 2``.
    """
    if subdivisions < 0:
        raise ValueError(f"icosphere: subdivisions must be >= 0, got {subdivisions}")
    t = (1.0 + math.sqrt(5.0)) / 2.0
    verts = torch.tensor(
        [[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t], [0, -1, -t],
         [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]], dtype=torch.float64)
    faces = torch.tensor(
        [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
         [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
         [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]], dtype=torch.int64)
    verts = torch.nn.functional.normalize(verts, dim=-1)
    for _ in range(subdivisions):
        pairs = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], dim=0)
        uniq, inverse = torch.unique(torch.sort(pairs, dim=1).values, dim=0, return_inverse=True)
        mids = torch.nn.functional.normalize(verts[uniq[:, 0]] + verts[uniq[:, 1]], dim=-1)
        num_f = faces.shape[0]
        ab, bc, ca = (verts.shape[0] + inverse).view(3, num_f)
        a, b, c = faces.unbind(1)
        faces = torch.cat([torch.stack(f, dim=1) for f in
                           ((a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca))], dim=0)
        verts = torch.cat([verts, mids], dim=0)
    return (verts * radius).to(dtype), faces


def uv_sphere(num_lat: int = 16, num_lon: int = 32, radius: float = 1.0,
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Closed latitude/longitude sphere ``(vertices [V, 3], faces [F, 3])`` with outward winding.

    ``num_lat >= 2`` latitude bands between the poles at ``±y`` and ``num_lon >= 3`` longitude
    segments; ``V = (num_lat - 1) · num_lon + 2`` and ``F = 2 · (num_lat - 1) · num_lon``.
    """
    if num_lat < 2 or num_lon < 3:
        raise ValueError(f"uv_sphere: need num_lat >= 2 and num_lon >= 3, got {num_lat}, {num_lon}")
    theta = torch.arange(1, num_lat, dtype=torch.float64) * math.pi / num_lat  # polar angle from +y
    phi = torch.arange(num_lon, dtype=torch.float64) * 2.0 * math.pi / num_lon
    th, ph = torch.meshgrid(theta, phi, indexing="ij")
    ring = torch.stack([th.sin() * ph.cos(), th.cos(), -th.sin() * ph.sin()], dim=-1).reshape(-1, 3)
    top = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    verts = torch.cat([top, ring, -top], dim=0)
    south = verts.shape[0] - 1
    j = torch.arange(num_lon)
    jn = (j + 1) % num_lon
    faces = [torch.stack([torch.zeros_like(j), 1 + j, 1 + jn], dim=1)]
    for i in range(num_lat - 2):
        r0, r1 = 1 + i * num_lon, 1 + (i + 1) * num_lon
        faces.append(torch.stack([r0 + j, r1 + j, r1 + jn], dim=1))
        faces.append(torch.stack([r0 + j, r1 + jn, r0 + jn], dim=1))
    last = 1 + (num_lat - 2) * num_lon
    faces.append(torch.stack([last + j, torch.full_like(j, south), last + jn], dim=1))
    return (verts * radius).to(dtype), torch.cat(faces, dim=0)
