"""EWA projection of 3D Gaussians to the image plane (part of the torch splatting backend).

Everything here follows gsplat 1.5.3's ``fully_fused_projection`` (pinhole camera, classic
mode, opacity-aware radii) so that the torch and gsplat backends agree; the semantics are
written out in :mod:`headkit.render.gaussians`. All outputs are differentiable by autograd
w.r.t. every input, ``viewmats`` and ``Ks`` included, except ``radii`` (integers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# gsplat's ALPHA_THRESHOLD: a pixel/Gaussian pair with alpha below it is skipped.
ALPHA_THRESHOLD = 1.0 / 255.0
# gsplat caps the bounding-box extent at 3.33 sigma; with alpha <= 1 the opacity-aware
# bound sqrt(2 ln(255 o)) <= 3.329 is always the smaller one, so the cap never binds.
MAX_EXTENT = 3.33


def quat_to_rotmat(quats: Tensor) -> Tensor:  # quats: [..., 4] wxyz, any norm
    """Rotation matrices of (normalised) wxyz quaternions.

    Args:
        quats: ``[..., 4]`` quaternions ``(w, x, y, z)``; normalised here.

    Returns:
        ``[..., 3, 3]`` rotation matrices ``R`` with ``R @ v`` rotating ``v``.
    """
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def project_gaussians(
    means: Tensor,  # [N, 3] world
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N] in [0, 1]
    viewmats: Tensor,  # [C, 4, 4] world -> camera
    Ks: Tensor,  # [C, 3, 3] pixels
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Project 3D Gaussians to 2D (EWA splatting with gsplat 1.5.3's rules).

    With ``W = viewmat[:3, :3]``, ``t = viewmat[:3, 3]`` and ``p = W mu + t = (x, y, z)``:

    * ``Sigma = R S S^T R^T`` (``R`` from the normalised quaternion, ``S = diag(scales)``);
    * ``means2d = (fx x / z + cx, fy y / z + cy)``;
    * ``Sigma2d = J W Sigma W^T J^T + eps2d I`` with
      ``J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]``, where ``tx = z clamp(x/z,
      -lim_x_neg, lim_x_pos)``, ``lim_x_pos = (width - cx)/fx + 0.3 * 0.5 width/fx``,
      ``lim_x_neg = cx/fx + 0.3 * 0.5 width/fx`` (likewise for y): off-screen Gaussians get
      the Jacobian of the nearest point 1.3x the field of view out, as in gsplat;
    * ``conics = Sigma2d^-1`` as ``(a, b, c)`` = entries ``[0,0], [0,1], [1,1]``;
    * ``radii = ceil(e * sqrt(diag(Sigma2d)))`` with ``e = min(3.33, sqrt(2 ln(255 o)))``: the
      opacity-aware box of gsplat 1.5, outside which ``o exp(-d^2/2) < 1/255`` anyway.

    A Gaussian is culled (radii 0) if ``z < near_plane`` or ``z > far_plane``, if
    ``det(Sigma2d) <= 0``, if ``o < 1/255``, or if its box misses the image.

    Returns:
        ``means2d [C, N, 2]``, ``conics [C, N, 3]``, ``depths [C, N]`` (camera z), ``radii
        [C, N, 2]`` int32. Culled entries of the float outputs are finite but meaningless.
    """
    Ms = quat_to_rotmat(quats) * scales[:, None, :]  # [N, 3, 3], Sigma = M M^T
    Ws = viewmats[:, :3, :3]  # [C, 3, 3]
    means_c = torch.einsum("cij,nj->cni", Ws, means) + viewmats[:, None, :3, 3]  # [C, N, 3]
    xs, ys, zs = means_c.unbind(-1)  # [C, N] each

    in_range = (zs >= near_plane) & (zs <= far_plane)  # [C, N]
    # Culled Gaussians may sit at z <= 0; divide by 1 there so no inf/NaN reaches autograd.
    safe_zs = torch.where(in_range, zs, torch.ones_like(zs))
    fxs, fys = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cxs, cys = Ks[:, 0, 2, None], Ks[:, 1, 2, None]  # [C, 1]
    means2d, tu, tv = _pinhole(xs, ys, safe_zs, (fxs, fys, cxs, cys), width, height)  # [C, N, 2], [C, N] x 2
    cov_xx, cov_xy, cov_yy = _covariance_2d(Ws, Ms, fxs, fys, safe_zs, tu, tv, eps2d)  # [C, N] each
    dets = cov_xx * cov_yy - cov_xy * cov_xy
    valid = in_range & (dets > 0)
    safe_dets = torch.where(valid, dets, torch.ones_like(dets))
    conics = torch.stack([cov_yy / safe_dets, -cov_xy / safe_dets, cov_xx / safe_dets], dim=-1)  # [C, N, 3]
    radii = _screen_radii(opacities, cov_xx, cov_yy, means2d, valid, width, height)  # [C, N, 2]
    return means2d, conics, zs, radii


def _pinhole(xs: Tensor, ys: Tensor, safe_zs: Tensor,  # [C, N] camera coordinates, z > 0
             intrinsics: tuple[Tensor, Tensor, Tensor, Tensor],  # fx, fy, cx, cy: [C, 1] each
             width: int, height: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel centres ``means2d [C, N, 2]`` and the normalised coordinates ``tu, tv [C, N]``
    clamped to 1.3x the field of view (where the Jacobian of off-screen Gaussians is taken)."""
    fxs, fys, cxs, cys = intrinsics
    lim_x_pos = (width - cxs) / fxs + 0.15 * width / fxs
    lim_x_neg = cxs / fxs + 0.15 * width / fxs
    lim_y_pos = (height - cys) / fys + 0.15 * height / fys
    lim_y_neg = cys / fys + 0.15 * height / fys
    u = xs / safe_zs  # [C, N]
    v = ys / safe_zs
    tu = torch.minimum(torch.maximum(u, -lim_x_neg), lim_x_pos)
    tv = torch.minimum(torch.maximum(v, -lim_y_neg), lim_y_pos)
    means2d = torch.stack([fxs * u + cxs, fys * v + cys], dim=-1)  # [C, N, 2]
    return means2d, tu, tv


def _covariance_2d(Ws: Tensor, Ms: Tensor,  # [C, 3, 3], [N, 3, 3]
                   fxs: Tensor, fys: Tensor,  # [C, 1] each
                   safe_zs: Tensor, tu: Tensor, tv: Tensor,  # [C, N] each
                   eps2d: float) -> tuple[Tensor, Tensor, Tensor]:
    """Entries ``xx, xy, yy`` (``[C, N]`` each) of ``Sigma2d = J W Sigma W^T J^T + eps2d I``
    with ``Sigma = M M^T``."""
    # J W as two rows [C, N, 3]; then A = J W M and Sigma2d = A A^T (symmetric by construction).
    zeros = torch.zeros_like(tu)
    j0 = torch.stack([fxs / safe_zs, zeros, -fxs * tu / safe_zs], dim=-1)  # [C, N, 3]
    j1 = torch.stack([zeros, fys / safe_zs, -fys * tv / safe_zs], dim=-1)
    jw0 = torch.einsum("cnk,ckj->cnj", j0, Ws)  # [C, N, 3]
    jw1 = torch.einsum("cnk,ckj->cnj", j1, Ws)
    a0 = torch.einsum("cnj,njk->cnk", jw0, Ms)  # [C, N, 3]
    a1 = torch.einsum("cnj,njk->cnk", jw1, Ms)
    cov_xx = (a0 * a0).sum(-1) + eps2d  # [C, N]
    cov_xy = (a0 * a1).sum(-1)
    cov_yy = (a1 * a1).sum(-1) + eps2d
    return cov_xx, cov_xy, cov_yy


@torch.no_grad()
def _screen_radii(opacities: Tensor, cov_xx: Tensor, cov_yy: Tensor,  # [N], [C, N], [C, N]
                  means2d: Tensor, valid: Tensor, width: int, height: int) -> Tensor:  # [C, N, 2], [C, N]
    """Opacity-aware box half-sizes ``radii [C, N, 2]`` int32, zero for culled Gaussians
    (``valid`` false, opacity below 1/255, or a box that misses the image)."""
    ops = opacities.detach().expand_as(cov_xx)  # [C, N]
    # A new tensor: `valid` itself is saved by torch.where in the caller for the backward pass.
    keep = valid & (ops >= ALPHA_THRESHOLD)
    extents = torch.sqrt(2.0 * torch.log(ops.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
    extents = extents.clamp_max(MAX_EXTENT)
    radii = torch.stack([torch.ceil(extents * cov_xx.detach().sqrt()),
                         torch.ceil(extents * cov_yy.detach().sqrt())], dim=-1)  # [C, N, 2]
    keep &= (radii > 0).any(-1)
    m2d = means2d.detach()
    keep &= (m2d[..., 0] + radii[..., 0] > 0) & (m2d[..., 0] - radii[..., 0] < width)
    keep &= (m2d[..., 1] + radii[..., 1] > 0) & (m2d[..., 1] - radii[..., 1] < height)
    return torch.where(keep[..., None], radii, torch.zeros_like(radii)).to(torch.int32)


def camera_centers(viewmats: Tensor) -> Tensor:  # viewmats: [C, 4, 4]
    """Camera centres in world space, ``inverse(viewmat)[:3, 3]`` as gsplat computes them.

    A general inverse (not ``-R^T t``) so that gradients w.r.t. ``viewmats`` equal gsplat's.

    Returns:
        ``[C, 3]``.
    """
    return torch.linalg.inv(viewmats)[:, :3, 3]

