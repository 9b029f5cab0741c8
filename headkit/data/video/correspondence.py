"""Dense correspondence between MediaPipe's face landmarks and a head model's surface.

The landmarker returns 478 points per frame: the 468 vertices of MediaPipe's canonical face plus
10 iris points. To fit a full-head model (ICT-FaceKit) to them, each of the 468 canonical
vertices is attached to a fixed point of the model's surface, a triangle and barycentric weights,
so that the same point moves with the model's identity and expression. The registration is done
once per (canonical face, head model) pair and cached:

1. a similarity from a dozen named points that both meshes share (eye corners, nose tip, mouth
   corners, chin, ...) moves the canonical face into the model's frame;
2. non-rigid ICP: every canonical vertex takes its closest point on the model's surface; the
   model's identity and expression coefficients (expressions kept in [0, 1]) and the similarity
   are re-solved by least squares against those closest points; repeated a few times, so the
   generic model takes the shape of MediaPipe's average face before the final closest points
   are taken.

The residual (distance of each canonical vertex to its surface point on the fitted model) is
reported in millimetres. The iris points (468-477) have no surface point: they depend on gaze,
which the eyeball-free default model does not carry, so the fit ignores them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...headmodel.model import atomic_save_npz
from .align import umeyama

log = logging.getLogger(__name__)

# (Multi-PIE landmark index of the head model, MediaPipe canonical vertex): points both define.
NAMED_PAIRS = (
    (30, 1),     # nose tip
    (36, 33), (39, 133), (42, 362), (45, 263),  # eye corners (subject's right outer/inner, left inner/outer)
    (48, 61), (54, 291),  # mouth corners
    (8, 152),    # chin
    (62, 13), (66, 14),  # inner lips
    (27, 168),   # nose bridge
    (33, 2),     # nose base
)
CORRESPONDENCE_VERSION = 1


def surface_points(vertices: np.ndarray,  # [..., V, 3] a mesh or basis deltas
                   faces: np.ndarray,  # [L, 3] vertex ids of each point's triangle
                   weights: np.ndarray,  # [L, 3] barycentric weights
                   ) -> np.ndarray:  # -> [..., L, 3]
    """Points given by triangles and barycentric weights, on a mesh or any of its deltas."""
    return np.einsum("...lkc,lk->...lc", vertices[..., faces, :], weights)


@dataclass
class Correspondence:
    """Each MediaPipe canonical vertex as a point on the head model's surface.

    Attributes:
        faces: ``[L, 3]`` int64 vertex ids (head model numbering) of the triangle holding each point.
        weights: ``[L, 3]`` float32 barycentric weights (sum to 1).
        residual_mm: ``[L]`` distance of each canonical vertex to its point after registration.
    """

    faces: np.ndarray
    weights: np.ndarray
    residual_mm: np.ndarray

    @property
    def num_points(self) -> int:
        """``L`` (468 for MediaPipe's canonical face)."""
        return int(self.faces.shape[0])

    def gather(self, vertices: np.ndarray) -> np.ndarray:  # [..., V, 3] -> [..., L, 3]
        """The corresponding points of a mesh (or of basis deltas, which interpolate the same way)."""
        return surface_points(vertices, self.faces, self.weights)

    def summary(self) -> dict[str, float]:
        """Mean, median and maximum residual in millimetres."""
        r = self.residual_mm
        return {"mean_mm": round(float(r.mean()), 3), "median_mm": round(float(np.median(r)), 3),
                "max_mm": round(float(r.max()), 3)}


def closest_points_on_triangles(points: np.ndarray,  # [N, 3]
                                a: np.ndarray, b: np.ndarray, c: np.ndarray,  # [N, M, 3] candidate corners
                                ) -> tuple[np.ndarray, np.ndarray]:
    """Closest point of each point on each of its ``M`` candidate triangles (Ericson, Real-Time
    Collision Detection, 5.1.5, vectorised). Returns barycentrics ``[N, M, 3]`` and squared
    distances ``[N, M]``."""
    p = points[:, None, :]
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(-1), (ac * ap).sum(-1)
    bp = p - b
    d3, d4 = (ab * bp).sum(-1), (ac * bp).sum(-1)
    cp = p - c
    d5, d6 = (ab * cp).sum(-1), (ac * cp).sum(-1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = va + vb + vc
        v_in, w_in = vb / denom, vc / denom
        w_ab, w_ac = d1 / (d1 - d3), d2 / (d2 - d6)
        w_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
    bary = np.stack([1 - v_in - w_in, v_in, w_in], -1)  # interior
    regions = [  # (condition, barycentrics), later entries take precedence
        ((va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0), np.stack([0 * w_bc, 1 - w_bc, w_bc], -1)),  # edge bc
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), np.stack([1 - w_ac, 0 * w_ac, w_ac], -1)),  # edge ac
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), np.stack([1 - w_ab, w_ab, 0 * w_ab], -1)),  # edge ab
        ((d6 >= 0) & (d5 <= d6), np.broadcast_to([0.0, 0.0, 1.0], bary.shape)),  # vertex c
        ((d3 >= 0) & (d4 <= d3), np.broadcast_to([0.0, 1.0, 0.0], bary.shape)),  # vertex b
        ((d1 <= 0) & (d2 <= 0), np.broadcast_to([1.0, 0.0, 0.0], bary.shape)),  # vertex a
    ]
    for cond, value in regions:
        bary = np.where(cond[..., None], value, bary)
    bary = np.nan_to_num(bary, nan=1.0 / 3.0)
    q = bary[..., :1] * a + bary[..., 1:2] * b + bary[..., 2:] * c
    return bary, ((q - p) ** 2).sum(-1)


def closest_points_on_mesh(points: np.ndarray,  # [N, 3]
                           vertices: np.ndarray,  # [V, 3]
                           faces: np.ndarray,  # [F, 3]
                           candidates: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest surface point of each point: ``(face index [N], barycentrics [N, 3], distance [N])``.

    Exact among the ``candidates`` triangles whose centroids are nearest (a KD-tree); for a mesh of
    roughly even triangles that contains the true closest triangle.
    """
    from scipy.spatial import cKDTree

    corners = vertices[faces]  # [F, 3, 3]
    k = min(candidates, len(faces))
    _, ids = cKDTree(corners.mean(1)).query(points, k=k)
    ids = ids.reshape(len(points), k)
    tri = corners[ids]  # [N, k, 3, 3]
    bary, d2 = closest_points_on_triangles(points, tri[:, :, 0], tri[:, :, 1], tri[:, :, 2])
    best = d2.argmin(1)
    rows = np.arange(len(points))
    return ids[rows, best], bary[rows, best], np.sqrt(d2[rows, best])


def _solve_shape(model, faces: np.ndarray, weights: np.ndarray, targets: np.ndarray,  # [L,3], [L,3], [L,3]
                 num_identities: int, identity_reg: float) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares identity (ridge) and expression (in [0, 1]) coefficients of the model whose
    surface points ``(faces, weights)`` best match ``targets``."""
    from scipy.optimize import lsq_linear

    base = surface_points(model.neutral, faces, weights)  # [L, 3]
    E = surface_points(model.expressions, faces, weights).reshape(len(model.expressions), -1).T  # [3L, E]
    Iden = surface_points(model.identities[:num_identities], faces, weights)
    Iden = Iden.reshape(num_identities, -1).T  # [3L, K]
    A = np.concatenate([Iden, E], 1)
    reg = np.concatenate([np.full(num_identities, identity_reg), np.full(E.shape[1], 1e-4)])
    A = np.concatenate([A, np.diag(np.sqrt(reg))], 0)
    rhs = np.concatenate([(targets - base).ravel(), np.zeros(len(reg))])
    lower = np.concatenate([np.full(num_identities, -np.inf), np.zeros(E.shape[1])])
    upper = np.concatenate([np.full(num_identities, np.inf), np.ones(E.shape[1])])
    x = lsq_linear(A, rhs, bounds=(lower, upper), method="bvls").x
    return x[:num_identities], x[num_identities:]


def register_canonical_face(canonical: np.ndarray,  # [L, 3] MediaPipe canonical face, head axes, metres
                            model, iterations: int = 10, num_identities: int = 20,
                            identity_reg: float = 1e-6) -> Correspondence:
    """Attach each canonical vertex to the head model's surface (see the module docstring).

    ``model`` is a :class:`headkit.headmodel.HeadModel` (``neutral``, ``expressions``,
    ``identities``, ``faces``, ``landmark_vertices``).
    """
    kit_ids = np.array([model.landmark_vertices[i] for i, _ in NAMED_PAIRS])
    mp_ids = np.array([j for _, j in NAMED_PAIRS])
    if (kit_ids < 0).any():
        raise ValueError("the head model's named landmarks are not all in its selected regions")
    K = min(num_identities, model.identities.shape[0])
    s, R, t = umeyama(canonical[mp_ids], model.neutral[kit_ids].astype(np.float64))
    ident, expr = np.zeros(K), np.zeros(model.expressions.shape[0])
    for _ in range(iterations):
        mesh = model.neutral + np.tensordot(ident, model.identities[:K], 1) + np.tensordot(expr, model.expressions, 1)
        moved = s * canonical @ R.T + t
        fids, bary, _ = closest_points_on_mesh(moved, mesh, model.faces)
        tri = model.faces[fids]
        ident, expr = _solve_shape(model, tri, bary, moved, K, identity_reg)
        mesh = model.neutral + np.tensordot(ident, model.identities[:K], 1) + np.tensordot(expr, model.expressions, 1)
        s, R, t = umeyama(canonical, surface_points(mesh, tri, bary))
    moved = s * canonical @ R.T + t
    fids, bary, dist = closest_points_on_mesh(moved, mesh, model.faces)
    return Correspondence(model.faces[fids].astype(np.int64), bary.astype(np.float32),
                          (dist / s * 1000.0).astype(np.float32))  # in the canonical face's millimetres


def _cache_key(canonical: np.ndarray, model) -> str:
    h = hashlib.sha1(f"v{CORRESPONDENCE_VERSION}".encode())
    for array in (canonical, model.neutral, model.faces, model.expressions, model.identities[:20]):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


def load_or_register(canonical: np.ndarray,  # [L, 3]
                     model, cache_dir: str | os.PathLike | None) -> Correspondence:
    """:func:`register_canonical_face`, cached in ``cache_dir`` (one small ``.npz`` keyed by a
    hash of both meshes); the residual is logged either way."""
    path = Path(cache_dir) / f"correspondence-{_cache_key(canonical, model)}.npz" if cache_dir else None
    corr = None
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                corr = Correspondence(z["faces"], z["weights"], z["residual_mm"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("%s: unreadable correspondence cache (%s); registering again", path, exc)
    if corr is None:
        corr = register_canonical_face(canonical, model)
        if path is not None:
            atomic_save_npz(path, {"faces": corr.faces, "weights": corr.weights, "residual_mm": corr.residual_mm})
    log.info("landmark correspondence residual: %s", corr.summary())
    return corr
