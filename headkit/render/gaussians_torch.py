"""Tile-based front-to-back compositing of projected Gaussians in plain torch.

The compositing half of the torch backend of
:func:`headkit.render.gaussians.rasterize_gaussians` (semantics there); projection is in
:mod:`.gaussians_project`, binning in :mod:`.gaussians_binning`. Autograd differentiates the
projection; the compositing is one :class:`CompositeTiles` node with a hand-written
backward pass (tested against autograd through a dense reference and by finite
differences).

Design, chosen for speed on a few CPU cores:

1. Binning (no grad): each visible Gaussian is paired with the ``tile_size``-square tiles
   where it reaches alpha >= 1/255 at some pixel; pairs are sorted by (tile, depth).
2. Bucketing: non-empty tiles are sorted by pair count and cut into buckets whose counts
   differ by at most a factor ``bucket_ratio``; a bucket is padded to its largest count, so
   padding wastes at most ``1 - bucket_ratio`` of the work, and holds at most
   ``max_bucket_elements`` (tiles x pairs x pixels) values, which bounds peak memory.
3. Per bucket, dense ``[tiles, K, tile_px]`` tensors: the exponent ``log o - d^T Sigma^-1 d / 2``
   is a quadratic in the pixel offset inside the tile, so all of it is one matrix product of
   six per-pair coefficients with six pixel monomials; then alpha, the skip/stop masks, a
   ``cumsum`` of ``log(1 - alpha)`` for transmittance, and one ``bmm`` of the weights with
   the features (the caller appends depth and a constant 1: colour, depth and alpha at once).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .gaussians_binning import bin_gaussians, plan_buckets
from .gaussians_project import ALPHA_THRESHOLD

ALPHA_MAX = 0.999  # gsplat 1.5.3's clamp (the original 3DGS kernel used 0.99)
T_MIN = 1e-4  # compositing stops before transmittance would reach this
_LOG_T_MIN = math.log(T_MIN)
_PAD_LOG_OPACITY = -100.0  # padding pairs: alpha = exp(-100) = 0, skipped like alpha < 1/255


def pixel_monomials(tile_size: int, device, dtype) -> Tensor:
    """``[tile_px, 6]`` monomials ``(1, u, v, u^2, v^2, u v)`` of the pixel centres of a tile.

    ``(u, v)`` are pixel-centre offsets from the tile's centre, kept small so that the
    expanded quadratic of :func:`pair_coefficients` loses little float32 precision (the
    cancellation grows with ``(tile_size / sigma)^2``: ~1e-6 at 4 px, ~1e-4 at 16 px).
    """
    j = torch.arange(tile_size * tile_size, device=device)
    half = 0.5 * tile_size
    u = (j % tile_size).to(dtype) + 0.5 - half
    v = torch.div(j, tile_size, rounding_mode="floor").to(dtype) + 0.5 - half
    return torch.stack([torch.ones_like(u), u, v, u * u, v * v, u * v], dim=-1)


def pair_coefficients(
    pair_attrs: Tensor,  # [..., 6] (mx, my, a, b, c, log o), means relative to the tile centre
) -> Tensor:
    """Coefficients of the exponent ``log o - sigma`` as a quadratic in the pixel offset.

    ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy`` with ``(dx, dy) = (mx - u, my - v)``; expanding
    in the monomials of :func:`pixel_monomials` gives

    ``power(u, v) = [log o - a mx^2/2 - c my^2/2 - b mx my] + (a mx + b my) u + (c my + b mx) v
    - a/2 u^2 - c/2 v^2 - b u v``.

    Returns:
        ``[..., 6]``.
    """
    mx, my, a, b, c, log_o = pair_attrs.unbind(-1)
    return torch.stack([
        log_o - 0.5 * a * mx * mx - 0.5 * c * my * my - b * mx * my,
        a * mx + b * my,
        c * my + b * mx,
        -0.5 * a,
        -0.5 * c,
        -b,
    ], dim=-1)


def pair_coefficients_vjp(
    pair_attrs: Tensor,  # [..., 6] as for pair_coefficients
    grad_coeffs: Tensor,  # [..., 6]
) -> Tensor:
    """Vector-Jacobian product of :func:`pair_coefficients`: ``[..., 6]`` attribute grads."""
    mx, my, a, b, c, _ = pair_attrs.unbind(-1)
    g0, g1, g2, g3, g4, g5 = grad_coeffs.unbind(-1)
    return torch.stack([
        g1 * a + g2 * b - g0 * (a * mx + b * my),
        g1 * b + g2 * c - g0 * (c * my + b * mx),
        g1 * mx - 0.5 * (g0 * mx * mx + g3),
        g1 * my + g2 * mx - g0 * mx * my - g5,
        g2 * my - 0.5 * (g0 * my * my + g4),
        g0,
    ], dim=-1)


def _composite_forward(coeffs: Tensor, features: Tensor, monomials: Tensor):
    """Alphas ``[Tb, K, px]`` (0 where skipped or stopped), exclusive transmittance, output."""
    Tb, K, _ = coeffs.shape
    # One 2D GEMM for all pairs: far cheaper on CPU than many tiny batched products.
    alphas = (coeffs.reshape(Tb * K, 6) @ monomials.T).reshape(Tb, K, monomials.shape[0])
    alphas.exp_().clamp_(max=ALPHA_MAX)
    alphas.masked_fill_(alphas < ALPHA_THRESHOLD, 0.0)
    trans = torch.log1p(-alphas)  # log(1 - alpha)
    log_t_incl = torch.cumsum(trans, dim=1)
    # The stop rule only matters where a pixel saturates; the last entry is the minimum.
    if bool((log_t_incl[:, -1] <= _LOG_T_MIN).any()):
        alphas.masked_fill_(log_t_incl <= _LOG_T_MIN, 0.0)
    trans = log_t_incl.sub_(trans).exp_()  # T_k = prod_{j<k} (1 - alpha_j)
    # [Tb, F, K] @ [Tb, K, px]: the long axis innermost keeps bmm efficient.
    out = torch.bmm(features.transpose(1, 2), alphas * trans).transpose(1, 2)  # [Tb, px, F]
    return alphas, trans, out


class CompositeTiles(torch.autograd.Function):
    """Front-to-back compositing of all buckets of depth-sorted (Gaussian, tile) pairs.

    Forward, per tile and pixel ``p`` (``k`` runs over the tile's pairs, front to back):

    * ``alpha_k = min(0.999, exp(power_k(p)))`` with ``power`` from :func:`pair_coefficients`,
      set to 0 below 1/255;
    * ``T_k = prod_{j<k} (1 - alpha_j)`` from a cumulative sum of ``log(1 - alpha)``; the
      first pair with ``T_k (1 - alpha_k) <= 1e-4`` and all after it get ``alpha = 0``
      (``T`` only decreases along ``k``, so the stop is a prefix mask);
    * ``out_p = sum_k w_k f_k`` with ``w_k = alpha_k T_k``.

    Backward, with ``g_k = f_k . dL/dout_p``:
    ``dL/dalpha_k = T_k g_k - (sum_{j>k} w_j g_j) / (1 - alpha_k)`` and
    ``dL/dpower_k = alpha_k dL/dalpha_k`` where ``alpha_k`` was neither clamped nor dropped.
    Written by hand because autograd through the same ops is about twice as slow and keeps
    ~10 tensors of the bucket's size alive instead of 2.

    Args (of ``apply``):
        attrs: ``[R, 6]`` rows ``(mx, my, a, b, c, log o)`` per (camera, Gaussian); the last
            row is padding (``log o = -100``).
        features: ``[R, F]``.
        buckets: list of ``(tile_ids [Tb], pair_rows [Tb * K], centres [Tb, 2], K)``.
        monomials: ``[tile_px, 6]`` from :func:`pixel_monomials`.
        n_tiles: number of tiles of the output.

    Returns:
        ``[n_tiles, tile_px, F]`` per-tile pixel sums (tiles without pairs are 0).
    """

    @staticmethod
    def forward(ctx, attrs, features, buckets, monomials, n_tiles):
        px, F = monomials.shape[0], features.shape[1]
        out = features.new_zeros(n_tiles, px, F)
        saved = []
        for tile_ids, rows, centres, k in buckets:
            pair_attrs = _gather_pairs(attrs, rows, centres, k)
            pair_feats = features.index_select(0, rows).reshape(len(tile_ids), k, F)
            alphas, trans, out_b = _composite_forward(pair_coefficients(pair_attrs),
                                                      pair_feats, monomials)
            out.index_copy_(0, tile_ids, out_b)
            saved += [alphas, trans]
        ctx.buckets = buckets
        ctx.save_for_backward(attrs, features, monomials, *saved)
        return out

    @staticmethod
    @once_differentiable  # no double backward (it would need the backward's own derivative)
    def backward(ctx, grad_out):  # grad_out: [n_tiles, px, F]
        attrs, features, monomials, *saved = ctx.saved_tensors
        grad_attrs = torch.zeros_like(attrs) if ctx.needs_input_grad[0] else None
        grad_feats = torch.zeros_like(features) if ctx.needs_input_grad[1] else None
        F = features.shape[1]
        for b, (tile_ids, rows, centres, k) in enumerate(ctx.buckets):
            alphas, trans = saved[2 * b], saved[2 * b + 1]
            Tb, _, px = alphas.shape
            grads = grad_out.index_select(0, tile_ids)  # [Tb, px, F]
            weights = alphas * trans
            if grad_feats is not None:
                grad_feats.index_add_(0, rows, torch.bmm(weights, grads).reshape(Tb * k, F))
            if grad_attrs is None:
                continue
            pair_feats = features.index_select(0, rows).reshape(Tb, k, F)
            gw = torch.bmm(pair_feats, grads.transpose(1, 2))  # [Tb, K, px]
            behind = torch.cumsum(weights.mul_(gw), dim=1)
            behind = behind[:, -1:].sub(behind)  # sum_{j>k} w_j g_j
            grad_alphas = gw.mul_(trans).sub_(behind.div_(1.0 - alphas))
            # d alpha / d power = alpha, except where alpha was clamped (0.999) or dropped (0).
            grad_powers = grad_alphas.mul_(alphas).masked_fill_(alphas >= ALPHA_MAX, 0.0)
            grad_coeffs = grad_powers.reshape(Tb * k, px) @ monomials  # [Tb * K, 6]
            pair_attrs = _gather_pairs(attrs, rows, centres, k).reshape(Tb * k, 6)
            grad_attrs.index_add_(0, rows, pair_coefficients_vjp(pair_attrs, grad_coeffs))
        return grad_attrs, grad_feats, None, None, None


def _gather_pairs(attrs: Tensor, rows: Tensor, centres: Tensor, k: int) -> Tensor:
    """``[Tb, K, 6]`` pair attributes with means moved to tile-centre coordinates."""
    pair_attrs = attrs.index_select(0, rows).reshape(len(centres), k, 6)
    pair_attrs[..., :2] -= centres[:, None, :]
    return pair_attrs


def rasterize_tiles(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [N] or [C, N]
    features: Tensor,  # [C, N, F]
    depths: Tensor,  # [C, N]
    radii: Tensor,  # [C, N, 2] int
    width: int,
    height: int,
    tile_size: int = 4,
    bucket_ratio: float = 0.85,
    max_bucket_elements: int = 1 << 22,
) -> Tensor:
    """Composite projected Gaussians into images, tile by tile.

    Args:
        features: per-Gaussian values to composite (colour, and whatever else rides along).
        tile_size: square tile side in pixels; 4 is fastest on CPU for head-sized splats.
        bucket_ratio: tiles padded together have pair counts within this factor.
        max_bucket_elements: cap on ``tiles * K * tile_px`` per bucket (peak memory).

    Returns:
        ``[C, height, width, F]``: ``sum_i alpha_i T_i f_i`` per pixel (no background).
    """
    C, N, F = features.shape
    dtype, device = means2d.dtype, means2d.device
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    opacities = opacities.expand(C, N)
    pair_gauss, _, tile_counts = bin_gaussians(
        means2d, conics, opacities, radii, depths, tile_size, tiles_x, tiles_y)

    # Per bucket: which table rows each padded slot reads (padding reads the last row).
    tile_starts = torch.cumsum(tile_counts, 0) - tile_counts
    pair_gauss = torch.cat([pair_gauss, pair_gauss.new_full((1,), C * N)])
    last_pair = pair_gauss.numel() - 2
    buckets = []
    for tile_ids, k in plan_buckets(tile_counts, tile_size**2, bucket_ratio,
                                    max_bucket_elements):
        slots = torch.arange(k, device=device)
        idx = (tile_starts[tile_ids, None] + slots).clamp_max(last_pair)  # [Tb, K]
        filled = slots < tile_counts[tile_ids, None]
        rows = torch.where(filled, pair_gauss[idx], C * N).reshape(-1)
        tile_xy = torch.stack([tile_ids % tiles_x,
                               torch.div(tile_ids, tiles_x, rounding_mode="floor") % tiles_y], -1)
        centres = (tile_xy.to(dtype) + 0.5) * tile_size  # [Tb, 2]
        buckets.append((tile_ids, rows, centres, k))

    log_opacities = torch.log(opacities.clamp_min(ALPHA_THRESHOLD))
    attrs = torch.cat([means2d, conics, log_opacities[..., None]], dim=-1).reshape(C * N, 6)
    pad_attr = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, _PAD_LOG_OPACITY]], dtype=dtype,
                            device=device)
    attrs = torch.cat([attrs, pad_attr], dim=0)  # [CN + 1, 6]
    feats = torch.cat([features.reshape(C * N, F), features.new_zeros(1, F)], dim=0)
    monomials = pixel_monomials(tile_size, device, dtype)
    out_tiles = CompositeTiles.apply(attrs, feats, buckets, monomials, C * tiles_y * tiles_x)

    images = out_tiles.reshape(C, tiles_y, tiles_x, tile_size, tile_size, F)
    images = images.permute(0, 1, 3, 2, 4, 5).reshape(C, tiles_y * tile_size,
                                                      tiles_x * tile_size, F)
    return images[:, :height, :width]
