"""Dense reference for Gaussian splatting: every Gaussian against every pixel, no tiles.

Written independently of ``headkit.render``: the projection (2D means, conics) is gsplat's
own pure-torch ``_fully_fused_projection`` (runs on CPU), SH colours use gsplat's
``_spherical_harmonics``, and compositing is a direct ``cumprod`` of ``1 - alpha`` over all
Gaussians sorted by depth, per pixel. Rules are those of gsplat 1.5.3's CUDA kernels (see
the docstring of ``headkit.render.gaussians``). Slow by design; used by the tests and, for
the speed ratio, by ``benchmarks/bench_gaussians.py``.
"""

from __future__ import annotations

import torch
from gsplat.cuda._torch_impl import (
    _fully_fused_projection,
    _quat_scale_to_covar_preci,
    _spherical_harmonics,
)


def dense_render(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                 sh_degree=None, backgrounds=None, near_plane=0.01, far_plane=1e10,
                 rows=None):
    """Render ``[C, h, W, D]`` colours, ``[C, h, W, 1]`` depths and alphas densely.

    ``rows = (y0, y1)`` renders only image rows ``y0 .. y1 - 1`` (``h = y1 - y0``), so a
    caller can bound memory by rendering (and back-propagating) a band at a time.
    """
    y0, y1 = rows if rows is not None else (0, height)
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    ys, xs = torch.meshgrid(torch.arange(y0, y1, dtype=means.dtype),
                            torch.arange(width, dtype=means.dtype), indexing="ij")
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1) + 0.5  # [P, 2]
    out_c, out_d, out_a = [], [], []
    for c in range(viewmats.shape[0]):
        # Cull on camera z before projecting, so no inf from z <= 0 enters autograd.
        z_all = means @ viewmats[c, 2, :3] + viewmats[c, 2, 3]
        keep = (z_all >= near_plane) & (z_all <= far_plane)
        _, m2d, z, conic, _ = _fully_fused_projection(
            means[keep], covars[keep], viewmats[c:c + 1], Ks[c:c + 1], width, height,
            eps2d=0.3, near_plane=-1e30, far_plane=1e30)
        m2d, z, conic = m2d[0], z[0], conic[0]
        if sh_degree is not None:
            campos = torch.inverse(viewmats[c])[:3, 3]
            col = _spherical_harmonics(sh_degree, means[keep] - campos, colors[keep])
            col = torch.clamp_min(col + 0.5, 0.0)
        elif colors.dim() == 3:
            col = colors[c][keep]
        else:
            col = colors[keep]
        order = torch.argsort(z, stable=True)
        m2d, z, conic, col = m2d[order], z[order], conic[order], col[order]
        op = opacities[keep][order]

        d = m2d[:, None, :] - pix[None]  # [G, P, 2]
        sigma = 0.5 * (conic[:, None, 0] * d[..., 0] ** 2 + conic[:, None, 2] * d[..., 1] ** 2) \
            + conic[:, None, 1] * d[..., 0] * d[..., 1]
        alpha = torch.clamp_max(op[:, None] * torch.exp(-sigma), 0.999)
        alpha = torch.where(alpha < 1.0 / 255.0, torch.zeros_like(alpha), alpha)
        trans_after = torch.cumprod(1.0 - alpha, dim=0)  # [G, P]
        trans_before = torch.cat([torch.ones_like(trans_after[:1]), trans_after[:-1]], 0)
        used = trans_after > 1e-4
        w = torch.where(used, alpha * trans_before, torch.zeros_like(alpha))  # [G, P]
        img = w.T @ col  # [P, D]
        acc = w.sum(0)[:, None]  # [P, 1]
        if backgrounds is not None:
            img = img + (1.0 - acc) * backgrounds[c]
        out_c.append(img.reshape(y1 - y0, width, -1))
        out_d.append((w.T @ z[:, None]).reshape(y1 - y0, width, 1))
        out_a.append(acc.reshape(y1 - y0, width, 1))
    return torch.stack(out_c), torch.stack(out_d), torch.stack(out_a)
