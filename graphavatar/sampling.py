"""COMA-style mesh hierarchy: quadric decimation, down-sampling (D) and up-sampling (U) matrices.

GraphAvatar's graph U-Nets pool and unpool vertex features between a template mesh and coarser
versions of it, as in COMA (Ranjan et al. 2018):

* ``D_l [V_{l+1}, V_l]`` copies, for every vertex of the coarser level ``l + 1``, the feature of
  the fine vertex that survived the edge collapses (one 1 per row). The coarse mesh keeps the
  survivors' original positions, so ``vertices[l + 1] = D_l @ vertices[l]`` exactly.
* ``U_l [V_l, V_{l+1}]`` places every fine vertex on its closest point of the coarse surface and
  stores that point's barycentric weights in the coarse triangle (three non-zeros per row that
  sum to 1). Survivors sit on a coarse vertex, so ``D_l @ U_l = I``.

Decimation uses ``fast_simplification`` (Fast-Quadric-Mesh-Simplification) and its collapse
history; it works for any triangle topology: closed (FLAME, the synthetic head), open with holes
(MediaPipe), and with vertices that are in no face (MediaPipe's 10 iris landmarks; about 958 of
INSTA's 5,023 simplified-FLAME vertices: eyeballs and eye region). Those are dropped from the
coarse levels (never a coarse vertex's parent, so D never pools their features into the surface)
and up-sampled from their closest coarse triangle (U gives them convex weights).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import fast_simplification
import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from headkit.mesh import edge_index

__all__ = ["MeshHierarchy", "build_mesh_hierarchy", "closest_point_barycentrics"]

# Bump when the construction changes, so stale cache files are not reused.
_CACHE_VERSION = 3


@dataclass
class MeshHierarchy:
    """A template mesh and its decimated levels, with COMA's pooling matrices.

    Level 0 is the template. With ``L = len(factors)`` there are ``L + 1`` levels and ``L``
    pairs of matrices.

    Attributes:
        vertices: per level ``[V_l, 3]`` float32 positions (coarse levels are subsets of level 0).
        faces: per level ``[F_l, 3]`` int64 triangles.
        edge_indices: per level ``[2, E_l]`` int64, every undirected edge in both directions.
        downs: per step ``D_l``, sparse COO ``[V_{l+1}, V_l]`` (coarse <- fine, copy of the survivor).
        ups: per step ``U_l``, sparse COO ``[V_l, V_{l+1}]`` (fine <- coarse, barycentric weights).
        parents: per step ``[V_{l+1}]`` int64, the level-``l`` vertex each coarse vertex copies.
        up_vertices: per step ``[V_l, 3]`` int64, the coarse triangle each fine vertex lies on
            (for a survivor: its own coarse vertex, repeated, with weights ``(1, 0, 0)``).
        up_weights: per step ``[V_l, 3]`` float32 barycentric weights on that triangle.
        factors: the per-level decimation factors used.
    """

    vertices: list[Tensor]
    faces: list[Tensor]
    edge_indices: list[Tensor]
    downs: list[Tensor]
    ups: list[Tensor]
    parents: list[Tensor]
    up_vertices: list[Tensor]
    up_weights: list[Tensor]
    factors: tuple[float, ...]

    @property
    def num_levels(self) -> int:
        """Number of levels including the template (``len(factors) + 1``)."""
        return len(self.vertices)

    @property
    def num_vertices(self) -> list[int]:
        """Vertex count per level."""
        return [int(v.shape[0]) for v in self.vertices]

    def mean_edge_length(self, level: int = 0) -> float:
        """Mean length of the undirected edges of ``level`` (a natural length unit of the mesh)."""
        ei = self.edge_indices[level]
        v = self.vertices[level]
        return float((v[ei[0]] - v[ei[1]]).norm(dim=-1).mean())


def closest_point_barycentrics(
    points: np.ndarray,  # [N, 3]
    a: np.ndarray,  # [N, 3]
    b: np.ndarray,  # [N, 3]
    c: np.ndarray,  # [N, 3]
) -> np.ndarray:
    """Barycentric weights ``[N, 3]`` of the closest point of triangle ``(a, b, c)`` to each point.

    Ericson's region test (Real-Time Collision Detection, 5.1.5): the closest point lies in the
    vertex, edge or face region that contains the point's projection; the weights are
    non-negative and sum to 1 in every case. Degenerate (zero-area) triangles fall into a vertex
    or edge region, so no division by zero reaches the result.
    """
    ab, ac = b - a, c - a
    ap, bp, cp = points - a, points - b, points - c
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2

    def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return num / np.where(np.abs(den) > 1e-30, den, 1.0)

    n = points.shape[0]
    out = np.empty((n, 3), dtype=np.float64)
    done = np.zeros(n, dtype=bool)

    def assign(mask: np.ndarray, weights: np.ndarray) -> None:
        take = mask & ~done
        out[take] = weights[take]
        done[take] = True

    ones, zeros = np.ones(n), np.zeros(n)
    assign((d1 <= 0) & (d2 <= 0), np.stack([ones, zeros, zeros], -1))  # vertex a
    assign((d3 >= 0) & (d4 <= d3), np.stack([zeros, ones, zeros], -1))  # vertex b
    v_ab = safe_div(d1, d1 - d3)
    assign((vc <= 0) & (d1 >= 0) & (d3 <= 0), np.stack([1 - v_ab, v_ab, zeros], -1))  # edge ab
    assign((d6 >= 0) & (d5 <= d6), np.stack([zeros, zeros, ones], -1))  # vertex c
    w_ac = safe_div(d2, d2 - d6)
    assign((vb <= 0) & (d2 >= 0) & (d6 <= 0), np.stack([1 - w_ac, zeros, w_ac], -1))  # edge ac
    w_bc = safe_div(d4 - d3, (d4 - d3) + (d5 - d6))
    assign((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), np.stack([zeros, 1 - w_bc, w_bc], -1))
    denom = va + vb + vc
    v_in, w_in = safe_div(vb, denom), safe_div(vc, denom)
    assign(np.ones(n, dtype=bool), np.stack([1 - v_in - w_in, v_in, w_in], -1))  # interior
    return out


def _closest_triangles(
    points: np.ndarray,  # [P, 3] float64
    vertices: np.ndarray,  # [Vc, 3] float64
    faces: np.ndarray,  # [Fc, 3] int64
) -> tuple[np.ndarray, np.ndarray]:
    """Exact closest triangle of a mesh for every point: ``(face ids [P], weights [P, 3])``.

    The distance ``d0`` from a point to its nearest mesh vertex bounds its distance to the
    surface, and a triangle with centroid ``g`` and circumradius-about-centroid ``r`` can only
    come closer than ``d0`` if ``|p - g| <= d0 + r``. A k-d tree over the centroids returns that
    candidate set (a superset of the answer), and only those pairs are tested exactly, so the
    result equals a brute-force search at a fraction of its cost.
    """
    corners = vertices[faces]  # [Fc, 3, 3]
    centroids = corners.mean(axis=1)
    radii = np.linalg.norm(corners - centroids[:, None], axis=-1).max(axis=1)
    used = np.unique(faces)
    d0, _ = cKDTree(vertices[used]).query(points)
    # The slack covers rounding, so a tie between two triangles is never lost.
    reach = d0 + radii.max() + 1e-9 * (1.0 + np.abs(points).max())
    cand = cKDTree(centroids).query_ball_point(points, reach, return_sorted=False)
    counts = np.array([len(c) for c in cand], dtype=np.int64)
    pt = np.repeat(np.arange(points.shape[0]), counts)
    tri = np.concatenate([np.asarray(c, dtype=np.int64) for c in cand])
    a, b, c = corners[tri, 0], corners[tri, 1], corners[tri, 2]
    w = closest_point_barycentrics(points[pt], a, b, c)
    q = w[:, :1] * a + w[:, 1:2] * b + w[:, 2:] * c
    d2 = ((points[pt] - q) ** 2).sum(-1)
    # Per point, the candidate with the smallest distance (ties: lowest triangle id).
    order = np.lexsort((tri, d2, pt))
    first = np.flatnonzero(np.r_[True, pt[order][1:] != pt[order][:-1]])
    best = order[first]
    return tri[best], w[best]


def _decimate(
    vertices: np.ndarray,  # [V, 3] float64
    faces: np.ndarray,  # [F, 3] int64
    factor: float,
    preserve_border: bool,
    where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """One quadric-decimation step: ``(parents [Vc], coarse faces [Fc, 3])``.

    The target is ``F / factor`` triangles, i.e. about ``V / factor`` vertices (``F ≈ 2V`` on a
    closed or mostly closed mesh). Each coarse vertex copies the fine vertex that was never
    collapsed into another one (COMA's D keeps original positions, it does not use the quadric
    optimum).
    """
    target = int(round(faces.shape[0] / factor))
    if target < 4:
        raise ValueError(
            f"{where}: cannot decimate a mesh of {faces.shape[0]} faces by a factor {factor:g}: "
            f"the coarse mesh would have {target} faces (need >= 4); use smaller factors")
    _, _, collapses = fast_simplification.simplify(
        vertices, faces.astype(np.int32), target_count=target, return_collapses=True,
        preserve_border=preserve_border)
    dec_points, dec_faces, mapping = fast_simplification.replay_simplification(
        vertices.astype(np.float32), faces.astype(np.int32), collapses)
    dec_faces = np.asarray(dec_faces, dtype=np.int64).reshape(-1, 3)
    mapping = np.asarray(mapping, dtype=np.int64)
    num_coarse = dec_points.shape[0]
    collapsed = np.zeros(vertices.shape[0], dtype=bool)
    if len(collapses):
        collapsed[np.asarray(collapses)[:, 1]] = True
    valid = np.flatnonzero(mapping >= 0)
    in_face = np.zeros(vertices.shape[0], dtype=bool)
    in_face[faces.reshape(-1)] = True
    # Per coarse vertex prefer a fine vertex that is in a triangle (an isolated vertex, e.g. an
    # eyeball point of INSTA's simplified FLAME, has no graph neighbours and a zero normal, so
    # its features must never stand for a surface vertex), then one that was never collapsed;
    # ties (possible after fast_simplification merges isolated points) go to the one nearest
    # the coarse point.
    dist = np.linalg.norm(vertices[valid] - dec_points[mapping[valid]], axis=-1)
    order = np.lexsort((dist, collapsed[valid], ~in_face[valid], mapping[valid]))
    sorted_map = mapping[valid][order]
    first = np.flatnonzero(np.r_[True, sorted_map[1:] != sorted_map[:-1]])
    if len(first) != num_coarse or not np.array_equal(sorted_map[first], np.arange(num_coarse)):
        raise RuntimeError(f"{where}: decimation left coarse vertices without a parent")
    parents = valid[order][first]
    return parents, dec_faces


def _hash(vertices: np.ndarray, faces: np.ndarray, factors: tuple[float, ...],
          preserve_border: bool) -> str:
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(vertices, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(faces, dtype=np.int64).tobytes())
    h.update(repr((factors, preserve_border, _CACHE_VERSION)).encode())
    return h.hexdigest()[:16]


def _to_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _compute(vertices: np.ndarray, faces: np.ndarray, factors: tuple[float, ...],
             preserve_border: bool) -> dict[str, np.ndarray]:
    """The hierarchy as plain arrays (the cache file's content)."""
    arrays: dict[str, np.ndarray] = {"v0": vertices.astype(np.float32), "f0": faces}
    cur_v, cur_f = vertices.astype(np.float64), faces
    for level, factor in enumerate(factors):
        where = f"build_mesh_hierarchy level {level} -> {level + 1} ({cur_v.shape[0]} vertices)"
        parents, coarse_f = _decimate(cur_v, cur_f, factor, preserve_border, where)
        coarse_v = cur_v[parents]
        tri, weights = _closest_triangles(cur_v, coarse_v, coarse_f)
        up_vertices = coarse_f[tri]
        # A survivor *is* its coarse vertex. Where decimation left overlapping coarse triangles
        # (flat regions), another triangle can tie at distance 0; pin survivors so D @ U = I.
        up_vertices[parents] = np.arange(len(parents))[:, None]
        weights[parents] = (1.0, 0.0, 0.0)
        arrays[f"parents{level}"] = parents
        arrays[f"upv{level}"] = up_vertices
        arrays[f"upw{level}"] = weights.astype(np.float32)
        arrays[f"v{level + 1}"] = coarse_v.astype(np.float32)
        arrays[f"f{level + 1}"] = coarse_f
        cur_v, cur_f = coarse_v, coarse_f
    return arrays


def _assemble(arrays: dict[str, np.ndarray], factors: tuple[float, ...]) -> MeshHierarchy:
    levels = len(factors) + 1
    vertices = [torch.from_numpy(np.asarray(arrays[f"v{i}"], np.float32)) for i in range(levels)]
    faces = [torch.from_numpy(np.asarray(arrays[f"f{i}"], np.int64)) for i in range(levels)]
    parents, up_vertices, up_weights, downs, ups = [], [], [], [], []
    for i in range(levels - 1):
        par = torch.from_numpy(np.asarray(arrays[f"parents{i}"], np.int64))
        upv = torch.from_numpy(np.asarray(arrays[f"upv{i}"], np.int64))
        upw = torch.from_numpy(np.asarray(arrays[f"upw{i}"], np.float32))
        n_fine, n_coarse = vertices[i].shape[0], vertices[i + 1].shape[0]
        down = torch.sparse_coo_tensor(
            torch.stack([torch.arange(n_coarse), par]), torch.ones(n_coarse), (n_coarse, n_fine),
            check_invariants=True)
        rows = torch.arange(n_fine).repeat_interleave(3)
        up = torch.sparse_coo_tensor(
            torch.stack([rows, upv.reshape(-1)]), upw.reshape(-1), (n_fine, n_coarse),
            check_invariants=True)
        parents.append(par)
        up_vertices.append(upv)
        up_weights.append(upw)
        downs.append(down.coalesce())
        ups.append(up.coalesce())
    edge_indices = [edge_index(f) for f in faces]
    return MeshHierarchy(vertices, faces, edge_indices, downs, ups, parents, up_vertices,
                         up_weights, tuple(factors))


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an npz next to ``path`` and rename it into place (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_mesh_hierarchy(
    vertices,  # [V, 3] numpy or torch
    faces,  # [F, 3] numpy or torch, integer
    factors: Sequence[float] = (4, 8),
    cache_dir: str | os.PathLike | None = None,
    preserve_border: bool = False,
) -> MeshHierarchy:
    """Decimate a template mesh level by level and build COMA's D/U matrices.

    Args:
        vertices: ``[V, 3]`` template positions (numpy or torch).
        faces: ``[F, 3]`` triangles (numpy or torch, integer). Vertices in no face are allowed.
        factors: per-level reduction factors: level ``l + 1`` has about ``V_l / factors[l]``
            vertices. They are *per level* as in COMA and in the authors' GraphAvatar code, so
            the default ``(4, 8)`` turns FLAME's 5023 vertices into ~1256 and then ~157. An
            overall reduction of 4 then 8 would be ``(4, 2)``.
        cache_dir: if given, the result is stored as ``mesh_hierarchy_<hash>.npz`` there (hash
            of vertices, faces, factors and ``preserve_border``) and reused on the next call.
            A cache file that cannot be read is reported with a warning and rebuilt.
        preserve_border: forbid collapsing edges that touch an open boundary, so open meshes
            keep their outline (up-sampling is then exact for linear fields on flat regions).
            Off by default: on a small open mesh (MediaPipe) the border vertices alone can
            outnumber the coarse target.

    Returns:
        A :class:`MeshHierarchy` (level 0 is the template as given).

    Raises:
        ValueError: on malformed input (wrong shapes, non-finite positions, indices out of
            range, a factor <= 1) or when a level would have fewer than 4 faces.
    """
    v = _to_numpy(vertices, np.float64)
    f = _to_numpy(faces, None)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"build_mesh_hierarchy: vertices must be [V, 3], got {list(v.shape)}")
    if not np.isfinite(v).all():
        raise ValueError("build_mesh_hierarchy: template vertices contain NaN or Inf")
    if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0:
        raise ValueError(f"build_mesh_hierarchy: faces must be a non-empty [F, 3], got {list(f.shape)}")
    if not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"build_mesh_hierarchy: faces must be integers, got {f.dtype}")
    f = f.astype(np.int64)
    if f.min() < 0 or f.max() >= v.shape[0]:
        raise ValueError(
            f"build_mesh_hierarchy: faces index vertices {f.min()}..{f.max()} but the template "
            f"has {v.shape[0]} vertices")
    factors = tuple(float(x) for x in factors)
    if not factors or any(x <= 1.0 for x in factors):
        raise ValueError(f"build_mesh_hierarchy: factors must be a non-empty list of values > 1, "
                         f"got {list(factors)}")

    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"mesh_hierarchy_{_hash(v, f, factors, preserve_border)}.npz"
        if path.exists():
            try:
                with np.load(path) as data:
                    arrays = {k: data[k] for k in data.files}
                return _assemble(arrays, factors)
            except Exception as exc:  # a truncated or foreign file: rebuild it
                warnings.warn(f"mesh hierarchy cache {path} is unreadable ({exc}); rebuilding it")
    arrays = _compute(v, f, factors, preserve_border)
    if path is not None:
        _save_atomic(path, arrays)
    return _assemble(arrays, factors)
