"""Pinhole cameras in the OpenCV convention, rigid transforms and pose perturbations.

Conventions used everywhere in the project:

* Camera axes: x right, y down, z forward (OpenCV). A point in front of the camera has z > 0.
* ``camtoworld [..., 4, 4]`` maps camera coordinates to world coordinates; ``viewmat`` is its
  inverse (gsplat's name), mapping world to camera.
* ``K [3, 3]`` is in pixels. A pixel ``(i, j)`` (row ``i``, column ``j``) covers the square
  ``[j, j + 1) x [i, i + 1)`` of continuous image coordinates, so its centre is
  ``(u, v) = (j + 0.5, i + 0.5)`` (gsplat's convention). The image centre of a ``W x H``
  image is therefore ``(W / 2, H / 2)``.
* Quaternions are ``wxyz`` (gsplat's order).

All functions are plain torch, differentiable, and batch over leading dimensions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "look_at",
    "intrinsics_from_fov",
    "make_intrinsics",
    "invert_rigid",
    "estimate_rigid",
    "head_poses",
    "camtoworld_to_viewmat",
    "viewmat_to_camtoworld",
    "transform_points",
    "project_points",
    "skew",
    "so3_exp",
    "so3_log",
    "se3_exp",
    "perturb_pose",
    "quat_to_rotmat",
    "rotmat_to_quat",
]


def _rigid(rotations: Tensor, translations: Tensor) -> Tensor:
    """Assemble ``[..., 4, 4]`` rigid matrices from ``[..., 3, 3]`` rotations and ``[..., 3]``."""
    batch = rotations.shape[:-2]
    top = torch.cat([rotations, translations.unsqueeze(-1)], dim=-1)  # [..., 3, 4]
    bottom = torch.zeros(*batch, 1, 4, dtype=rotations.dtype, device=rotations.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def look_at(
    eyes: Tensor,  # [..., 3]
    targets: Tensor,  # [..., 3]
    ups: Tensor | None = None,  # [..., 3], default world +y
) -> Tensor:
    """Camera-to-world matrices of cameras at ``eyes`` looking at ``targets`` (OpenCV axes).

    The camera z axis is ``normalize(target - eye)``; ``ups`` is the world direction that
    should appear *up* in the image, so the camera y axis (image down) is minus ``ups``
    projected onto the image plane; x = y × z completes a right-handed frame.

    Raises:
        ValueError: if an eye coincides with its target, or ``ups`` is parallel to the
            viewing direction (the image orientation would be undefined).

    Returns:
        ``[..., 4, 4]`` camtoworld matrices.
    """
    if ups is None:
        ups = torch.tensor([0.0, 1.0, 0.0], dtype=eyes.dtype, device=eyes.device)
    eyes, targets, ups = torch.broadcast_tensors(eyes, targets, ups.to(eyes))
    forward = targets - eyes
    fnorm = forward.norm(dim=-1, keepdim=True)
    if bool((fnorm <= 1e-12).any()):
        bad = torch.nonzero(fnorm[..., 0] <= 1e-12).tolist()
        raise ValueError(f"look_at: eye coincides with target at batch indices {bad}")
    z = forward / fnorm
    down = -(ups - (ups * z).sum(-1, keepdim=True) * z)
    dnorm = down.norm(dim=-1, keepdim=True)
    degenerate = dnorm[..., 0] <= 1e-6 * ups.norm(dim=-1)
    if bool(degenerate.any()):
        bad = torch.nonzero(degenerate).tolist()
        raise ValueError(
            f"look_at: up vector is zero or parallel to the viewing direction at batch indices "
            f"{bad}; pass a different `ups`"
        )
    y = down / dnorm
    x = torch.cross(y, z, dim=-1)
    rotations = torch.stack([x, y, z], dim=-1)  # columns are the camera axes in world
    return _rigid(rotations, eyes)


def intrinsics_from_fov(fov_y_deg: float, width: int, height: int) -> Tensor:
    """Intrinsics ``K [3, 3]`` (float32) of a ``width x height`` camera with vertical FoV.

    Square pixels (``fx = fy = (height / 2) / tan(fov_y / 2)``) and the principal point at the
    image centre ``(width / 2, height / 2)`` under the pixel-centre-at-+0.5 convention.
    """
    if not 0.0 < fov_y_deg < 180.0:
        raise ValueError(f"intrinsics_from_fov: fov_y_deg must be in (0, 180), got {fov_y_deg}")
    if width <= 0 or height <= 0:
        raise ValueError(f"intrinsics_from_fov: image size must be positive, got {width}x{height}")
    focal = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2.0)
    return make_intrinsics(focal, focal, width / 2.0, height / 2.0)


def make_intrinsics(
    fx: float | Tensor,  # scalar or [...]
    fy: float | Tensor,  # scalar or [...]
    cx: float | Tensor,  # scalar or [...]
    cy: float | Tensor,  # scalar or [...]
) -> Tensor:
    """Pinhole intrinsics ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``, shape ``[..., 3, 3]``.

    Python floats give a float32 ``[3, 3]``; tensors broadcast and keep their dtype/device.
    """
    vals = [v if isinstance(v, Tensor) else torch.tensor(float(v)) for v in (fx, fy, cx, cy)]
    dtype = vals[0].dtype if vals[0].is_floating_point() else torch.float32
    fx, fy, cx, cy = torch.broadcast_tensors(*[v.to(dtype=dtype, device=vals[0].device) for v in vals])
    zeros, ones = torch.zeros_like(fx), torch.ones_like(fx)
    rows = [
        torch.stack([fx, zeros, cx], dim=-1),
        torch.stack([zeros, fy, cy], dim=-1),
        torch.stack([zeros, zeros, ones], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def invert_rigid(mats: Tensor) -> Tensor:  # [..., 4, 4]
    """Closed-form inverse of rigid transforms: ``[R t; 0 1]^-1 = [R^T  -R^T t; 0 1]``.

    Exact only for rotation+translation matrices (no scale); cheaper and better conditioned
    than a general inverse. Returns ``[..., 4, 4]``.
    """
    rot_t = mats[..., :3, :3].transpose(-1, -2)
    trans = -(rot_t @ mats[..., :3, 3:4])[..., 0]
    return _rigid(rot_t, trans)


def estimate_rigid(sources: Tensor, targets: Tensor) -> Tensor:  # [V, 3], [..., V, 3]
    """Least-squares rigid transforms ``[..., 4, 4]`` mapping ``sources`` onto ``targets``
    (Kabsch: SVD of the centred cross-covariance, reflection removed), in float64."""
    src = sources.double()
    dst = targets.double()
    src_c, dst_c = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    H = (src - src_c).transpose(-1, -2) @ (dst - dst_c)  # [..., 3, 3]
    U, _, Vh = torch.linalg.svd(H)
    det = torch.linalg.det(Vh.transpose(-1, -2) @ U.transpose(-1, -2))
    d = torch.where(det < 0, -1.0, 1.0).to(det)
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    R = Vh.transpose(-1, -2) @ D @ U.transpose(-1, -2)
    t = dst_c[..., 0, :] - (R @ src_c[..., 0, :, None])[..., 0]
    out = torch.zeros(R.shape[:-2] + (4, 4), dtype=torch.float64, device=R.device)
    out[..., :3, :3], out[..., :3, 3], out[..., 3, 3] = R, t, 1.0
    return out.to(targets.dtype)


def head_poses(
    tracked: Tensor | None,  # [..., 4, 4] head-to-world from the tracker, or None
    template: Tensor,  # [V, 3] head frame
    vertices: Tensor,  # [..., V, 3] tracked, world
) -> Tensor:
    """Head-to-world poses ``[..., 4, 4]`` of tracked frames: the tracker's ``tracked`` poses when
    the data has them, else a rigid Kabsch fit of the template onto the tracked vertices
    (:func:`estimate_rigid`)."""
    if tracked is not None:
        return tracked
    return estimate_rigid(template, vertices)


def camtoworld_to_viewmat(camtoworlds: Tensor) -> Tensor:  # [..., 4, 4]
    """World-to-camera ``viewmat`` ``[..., 4, 4]`` from camera-to-world (rigid inverse)."""
    return invert_rigid(camtoworlds)


def viewmat_to_camtoworld(viewmats: Tensor) -> Tensor:  # [..., 4, 4]
    """Camera-to-world ``[..., 4, 4]`` from world-to-camera ``viewmat`` (rigid inverse)."""
    return invert_rigid(viewmats)


def transform_points(
    points: Tensor,  # [..., N, 3]
    mats: Tensor,  # [..., 4, 4]
) -> Tensor:
    """Apply affine ``mats`` to points: ``p' = A p + b``. Returns ``[..., N, 3]``."""
    return points @ mats[..., :3, :3].transpose(-1, -2) + mats[..., None, :3, 3]


def project_points(
    points: Tensor,  # [B, N, 3] world
    viewmats: Tensor,  # [B, 4, 4]
    Ks: Tensor,  # [B, 3, 3]
) -> tuple[Tensor, Tensor]:
    """Project world points to continuous pixel coordinates.

    ``(u, v) = (fx x / z + cx, fy y / z + cy)`` with ``(x, y, z)`` in camera space. Pixel
    ``(i, j)`` has its centre at ``(u, v) = (j + 0.5, i + 0.5)`` (gsplat's convention).
    Points with ``depth <= 0`` are behind the camera and their pixels are meaningless; the
    division is left unguarded so callers mask on ``depths`` explicitly.

    Returns:
        ``pixels [B, N, 2]`` as ``(u, v)`` and ``depths [B, N]`` (camera-space z).
    """
    cams = transform_points(points, viewmats)  # [B, N, 3]
    depths = cams[..., 2]
    hom = cams @ Ks.transpose(-1, -2)  # [B, N, 3]
    pixels = hom[..., :2] / hom[..., 2:3]
    return pixels, depths


def skew(vectors: Tensor) -> Tensor:  # [..., 3]
    """Cross-product matrices ``[v]_x`` with ``[v]_x w = v × w``. Returns ``[..., 3, 3]``."""
    x, y, z = vectors.unbind(-1)
    zeros = torch.zeros_like(x)
    return torch.stack(
        [
            torch.stack([zeros, -z, y], dim=-1),
            torch.stack([z, zeros, -x], dim=-1),
            torch.stack([-y, x, zeros], dim=-1),
        ],
        dim=-2,
    )


def so3_exp(omegas: Tensor) -> Tensor:  # [..., 3]
    """Rotation matrices from axis-angle vectors (Rodrigues).

    ``R = I + a [w]_x + b [w]_x^2`` with ``a = sin θ / θ``, ``b = (1 - cos θ) / θ^2``,
    ``θ = |w|``. For small ``θ`` both coefficients use their Taylor series in ``θ^2`` so the
    value and the gradient stay finite and exact at ``w = 0`` (a bare ``θ = sqrt(.)`` has an
    infinite derivative there). Returns ``[..., 3, 3]``.
    """
    theta2 = (omegas * omegas).sum(-1)
    # Below θ = 0.1 the closed forms lose float32 precision in their *gradients* (differences
    # of ~1/θ terms), while the series through θ^6 is exact to ~1e-14 there.
    small = theta2 < 1e-2
    # Feed the non-taken branch a safe value so torch.where does not propagate NaN gradients.
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)
    theta = safe2.sqrt()
    a_big = torch.sin(theta) / theta
    b_big = 2.0 * torch.sin(0.5 * theta) ** 2 / safe2  # = (1 - cos θ)/θ², without cancellation
    x = theta2
    a_small = 1.0 - x / 6.0 + x * x / 120.0 - x * x * x / 5040.0
    b_small = 0.5 - x / 24.0 + x * x / 720.0 - x * x * x / 40320.0
    a = torch.where(small, a_small, a_big)[..., None, None]
    b = torch.where(small, b_small, b_big)[..., None, None]
    k = skew(omegas)
    eye = torch.eye(3, dtype=omegas.dtype, device=omegas.device)
    return eye + a * k + b * (k @ k)


def so3_log(rotations: Tensor) -> Tensor:  # [..., 3, 3]
    """Axis-angle vectors ``[..., 3]`` (angle in ``[0, π]``) of rotation matrices.

    ``θ = atan2(|vee(R - R^T)| / 2, (tr R - 1) / 2)`` is accurate over the whole range. The
    axis comes from ``vee(R - R^T) = 2 sin θ n`` except near ``θ = π`` where ``sin θ`` vanishes;
    there it is read from the symmetric part ``(R + R^T)/2 - cos θ I = (1 - cos θ) n n^T``
    (largest diagonal row), with its sign taken from ``vee(R - R^T)``.
    """
    r = rotations
    vee = torch.stack(
        [r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]],
        dim=-1,
    )  # = 2 sin θ n
    sin_t = 0.5 * vee.norm(dim=-1)
    cos_t = 0.5 * (r[..., 0, 0] + r[..., 1, 1] + r[..., 2, 2] - 1.0)
    theta = torch.atan2(sin_t, cos_t)

    # Generic and small-angle branch: w = θ / (2 sin θ) vee, θ/sinθ ≈ 1 + θ²/6 near 0.
    small = theta < 1e-3
    safe_sin = torch.where(small, torch.ones_like(sin_t), sin_t)
    scale = torch.where(small, 0.5 + theta * theta / 12.0, 0.5 * theta / safe_sin)
    generic = scale[..., None] * vee

    # Near π: n n^T from the symmetric part.
    eye = torch.eye(3, dtype=r.dtype, device=r.device)
    sym = 0.5 * (r + r.transpose(-1, -2)) - cos_t[..., None, None] * eye
    diag = torch.diagonal(sym, dim1=-2, dim2=-1)  # [..., 3] = (1 - cos θ) n_i^2
    k = diag.argmax(dim=-1)
    row = torch.gather(sym, -2, k[..., None, None].expand(*k.shape, 1, 3))[..., 0, :]
    axis = row / row.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    sign = torch.where((axis * vee).sum(-1) < 0, -1.0, 1.0).to(r.dtype)
    near_pi_vec = (sign * theta)[..., None] * axis

    near_pi = cos_t < -0.99
    return torch.where(near_pi[..., None], near_pi_vec, generic)


def se3_exp(xis: Tensor) -> Tensor:  # [..., 6]
    """Rigid transforms ``[..., 4, 4]`` from 6-vectors ``xi = (ω, v)`` via the so(3) × R³ map.

    The rotation is ``so3_exp(ω)`` and the translation is ``v`` *as is*; this is not the
    SE(3) exponential (which would translate by ``V(ω) v``). The decoupled map is what
    pose-refinement code (GraphAvatar's GGO camera update, 3DGS-style camera refinement)
    optimises: rotation and translation updates stay independent, so a translation step means
    the same thing whatever the rotation step, and the optimiser's scales are easy to set.
    At ``xi = 0`` it agrees with SE(3) exp to first order.
    """
    return _rigid(so3_exp(xis[..., :3]), xis[..., 3:])


def perturb_pose(
    camtoworlds: Tensor,  # [..., 4, 4]
    xis: Tensor,  # [..., 6]
    side: str = "left",
) -> Tensor:
    """Apply a small rigid update ``ΔT = se3_exp(xi)`` to camera-to-world poses.

    ``side="left"``: ``ΔT @ camtoworld`` — the update acts in world coordinates (rotation
    about the world origin, then a world-space shift). ``side="right"``:
    ``camtoworld @ ΔT`` — the update acts in the camera's own frame (rotation about the
    camera centre, shift along the camera axes). Returns ``[..., 4, 4]``.
    """
    delta = se3_exp(xis)
    if side == "left":
        return delta @ camtoworlds
    if side == "right":
        return camtoworlds @ delta
    raise ValueError(f"perturb_pose: side must be 'left' or 'right', got {side!r}")


def quat_to_rotmat(quats: Tensor) -> Tensor:  # [..., 4] wxyz
    """Rotation matrices ``[..., 3, 3]`` from ``wxyz`` quaternions (normalised here)."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        dim=-2,
    )


def rotmat_to_quat(rotations: Tensor) -> Tensor:  # [..., 3, 3]
    """Unit ``wxyz`` quaternions ``[..., 4]`` with ``w >= 0`` from rotation matrices.

    Shepperd's method: of the four candidate formulas (led by w, x, y or z) use the one whose
    leading component is largest, which keeps the division well conditioned.
    """
    r = rotations
    m00, m11, m22 = r[..., 0, 0], r[..., 1, 1], r[..., 2, 2]
    trace = m00 + m11 + m22
    d21, d02, d10 = r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]
    s01, s02, s12 = r[..., 0, 1] + r[..., 1, 0], r[..., 0, 2] + r[..., 2, 0], r[..., 1, 2] + r[..., 2, 1]
    # 4 * (component)^2 for w, x, y, z
    sq = torch.stack([1 + trace, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    cands = torch.stack(
        [
            torch.stack([sq[..., 0], d21, d02, d10], -1),
            torch.stack([d21, sq[..., 1], s01, s02], -1),
            torch.stack([d02, s01, sq[..., 2], s12], -1),
            torch.stack([d10, s02, s12, sq[..., 3]], -1),
        ],
        dim=-2,
    )  # row c = 4 q_c * q
    best = sq.argmax(dim=-1)
    row = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    q = row / row.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.where(q[..., :1] < 0, -q, q)
