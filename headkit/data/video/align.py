"""Robust similarity alignment of landmarks to the canonical face, head pose, and 3D lifting.

MediaPipe's pixel-unit landmarks ``L = (x W, y H, z W)`` form a weak-perspective 3D shape in the
image's axes. A similarity maps the canonical face (head coordinates, metres) onto them:
``L_i ~ s R X_i + t``. Expression deformations (an open jaw, closed eyes) are outliers of that
rigid fit, so it is solved by iteratively reweighted least squares (IRLS) with a Huber or Tukey
weight on each landmark's residual, every step a weighted Umeyama solve.

Monocular scale and depth are ambiguous: one image cannot tell a large head far away from a small
one close by, and under weak perspective it cannot tell focal length from distance either. We fix
both with assumptions, documented here and set in the config: the head has the metric size of
MediaPipe's canonical face (an average adult; outer eye corners about 8.9 cm apart) and the camera
has a fixed focal length (``focal_px``, or a typical field of view ``fov_deg``). The depth of the
landmark centroid is then ``Z = f / s``.

3D lifting: MediaPipe's ``z`` is only relative (origin near the head centre, the scale of ``x``),
so each landmark's camera depth is ``Z`` plus its relative depth in metres, ``(z_i - z_c) / s``,
and its ``x, y`` are back-projected along the pixel ray through ``(u_i, v_i)``. The lifted mesh
therefore projects exactly onto the tracked 2D landmarks whatever the assumed size and focal.
The head pose is then a robust rigid fit of the reference to the lifted points, which removes
the weak-perspective rotation bias of a head away from the image centre.
"""

from __future__ import annotations

import math

import numpy as np

ROBUST_LOSSES = ("huber", "tukey", "none")
_DEFAULT_K = {"huber": 1.5, "tukey": 4.0, "none": 1.0}
_EPS = 1e-12


def umeyama(src: np.ndarray,  # [N, 3]
            dst: np.ndarray,  # [N, 3]
            weights: np.ndarray | None = None,  # [N], non-negative
            with_scale: bool = True,
            ) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted least-squares similarity ``dst ~ s R src + t`` (Umeyama 1991).

    Minimises ``sum_i w_i |dst_i - (s R src_i + t)|^2`` in closed form: with weighted means
    ``mu``, the weighted cross-covariance ``S = sum w (dst - mu_d)(src - mu_s)^T / sum w = U D V^T``
    gives ``R = U diag(1, 1, sign(det U V^T)) V^T`` (a rotation, never a reflection),
    ``s = tr(D E) / var_src`` (1 when ``with_scale`` is False: a rigid fit) and
    ``t = mu_d - s R mu_s``. Returns ``(s, R [3, 3], t [3])``.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3:
        raise ValueError(f"umeyama: src and dst must both be [N, 3], got {list(src.shape)} and {list(dst.shape)}")
    total = w.sum()
    if total <= _EPS:
        raise ValueError("umeyama: all weights are zero")
    mu_s = w @ src / total
    mu_d = w @ dst / total
    cs, cd = src - mu_s, dst - mu_d
    cov = (cd * w[:, None]).T @ cs / total
    U, D, Vt = np.linalg.svd(cov)
    E = np.diag([1.0, 1.0, np.sign(np.linalg.det(U) * np.linalg.det(Vt)) or 1.0])
    R = U @ E @ Vt
    var_s = (w * (cs ** 2).sum(1)).sum() / total
    if var_s <= _EPS:
        raise ValueError("umeyama: the source points are all at one place")
    s = float(np.trace(np.diag(D) @ E) / var_s) if with_scale else 1.0
    return s, R, mu_d - s * R @ mu_s


def robust_weights(residuals: np.ndarray, loss: str = "huber", k: float | None = None) -> np.ndarray:
    """IRLS weights ``[N]`` of residual norms ``[N]``, relative to their median ``m``.

    Huber: ``w = min(1, k m / r)`` (bounded influence); Tukey's biweight:
    ``w = (1 - (r / k m)^2)^2`` for ``r < k m``, else 0 (gross outliers get no weight);
    ``none``: all ones. ``k`` defaults to 1.5 (Huber) and 4 (Tukey).
    """
    if loss not in ROBUST_LOSSES:
        raise ValueError(f"robust loss must be one of {ROBUST_LOSSES}, got {loss!r}")
    if loss == "none":
        return np.ones_like(residuals)
    c = (_DEFAULT_K[loss] if k is None else k) * max(float(np.median(residuals)), _EPS)
    if loss == "huber":
        return np.minimum(1.0, c / np.maximum(residuals, _EPS))
    return np.where(residuals < c, (1.0 - (residuals / c) ** 2) ** 2, 0.0)


def robust_similarity(src: np.ndarray,  # [N, 3]
                      dst: np.ndarray,  # [N, 3]
                      loss: str = "huber", iterations: int = 20, k: float | None = None,
                      with_scale: bool = True,
                      ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Similarity ``dst ~ s R src + t`` robust to outliers: IRLS over :func:`umeyama`.

    Starts from the unweighted fit and reweights with :func:`robust_weights` until the weights
    settle (or ``iterations`` runs out). Returns ``(s, R [3, 3], t [3], weights [N])``.
    """
    weights = np.ones(len(src))
    s, R, t = umeyama(src, dst, weights, with_scale)
    for _ in range(iterations if loss != "none" else 0):
        residuals = np.linalg.norm(dst - (s * src @ R.T + t), axis=1)
        new = robust_weights(residuals, loss, k)
        if new.sum() <= _EPS:
            break
        s, R, t = umeyama(src, dst, new, with_scale)
        done = np.abs(new - weights).max() < 1e-7
        weights = new
        if done:
            break
    return s, R, t, weights


def align_frames(landmarks: np.ndarray,  # [T, V, 3] pixel units
                 reference: np.ndarray,  # [V, 3] head coordinates
                 loss: str = "huber", iterations: int = 20, k: float | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Robust similarity of ``reference`` onto each frame's landmarks.

    Returns ``scales [T]`` (pixels per metre), ``rotations [T, 3, 3]`` (head to camera axes) and
    ``translations [T, 3]`` (pixel units) with ``landmarks[t] ~ s_t R_t reference + t_t``.
    """
    T = len(landmarks)
    scales, rotations, translations = np.empty(T), np.empty((T, 3, 3)), np.empty((T, 3))
    for i in range(T):
        scales[i], rotations[i], translations[i], _ = robust_similarity(reference, landmarks[i], loss, iterations, k)
    return scales, rotations, translations


def focal_from_fov(fov_deg: float, width: int, height: int) -> float:
    """Focal length in pixels of a camera whose field of view along the longer image side is
    ``fov_deg`` (so portrait and landscape clips of one phone get the same focal)."""
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    return 0.5 * max(width, height) / math.tan(math.radians(fov_deg) / 2.0)


def lift_landmarks(landmarks: np.ndarray,  # [T, V, 3] pixel units
                   scales: np.ndarray,  # [T] pixels per metre
                   anchors: np.ndarray,  # [T, 3] pixel units
                   K: np.ndarray,  # [3, 3] pixels, of the frames the landmarks live in
                   ) -> np.ndarray:
    """Camera-space 3D landmarks ``[T, V, 3]`` (see the module docstring for the assumptions).

    ``anchors`` is the fitted position of the reference centroid, ``s R c + t``; it sits at depth
    ``Z = f_x / s``. Landmark ``i`` gets depth ``z_i = Z + (L_iz - anchor_z) / s`` and is
    back-projected along the ray through its pixel ``(L_ix, L_iy)``.
    """
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    depths = (fx / scales)[:, None] + (landmarks[..., 2] - anchors[:, None, 2]) / scales[:, None]  # [T, V]
    if (depths <= 0).any():
        t = int(np.flatnonzero((depths <= 0).any(1))[0])
        raise ValueError(f"lifting puts landmarks behind the camera at frame {t}: the focal length "
                         f"({fx:.1f} px) is too short for this face size")
    return np.stack([(landmarks[..., 0] - cx) * depths / fx, (landmarks[..., 1] - cy) * depths / fy, depths], -1)


def fit_head_poses(vertices: np.ndarray,  # [T, V, 3] camera space
                   reference: np.ndarray,  # [V, 3] head coordinates
                   loss: str = "huber", iterations: int = 20) -> np.ndarray:
    """Rigid head poses ``[T, 4, 4]`` (head to camera) fitted robustly to the lifted vertices.

    The weak-perspective rotation is biased for a head off the optical axis (it is seen
    obliquely, by up to the angle of its viewing ray); a 3D fit to the perspective-correct
    lifted points is not.
    """
    head_poses = np.tile(np.eye(4), (len(vertices), 1, 1))
    for i, points in enumerate(vertices):
        _, R, t, _ = robust_similarity(reference, points, loss, iterations, with_scale=False)
        head_poses[i, :3, :3], head_poses[i, :3, 3] = R, t
    return head_poses


def to_head_space(vertices: np.ndarray,  # [T, V, 3] world
                  head_poses: np.ndarray,  # [T, 4, 4] head to world
                  ) -> np.ndarray:
    """Vertices in head coordinates ``R^T (p - C)``, ``[T, V, 3]``."""
    R, C = head_poses[:, :3, :3], head_poses[:, :3, 3]
    return np.einsum("tji,tvj->tvi", R, vertices - C[:, None])
