"""Tile-based front-to-back compositing of projected Gaussians in plain torch.

The torch backend of :func:`headkit.render.gaussians.rasterize_gaussians` (semantics there).
Autograd does the backward pass; nothing here is a custom ``Function``.

Design, chosen for speed on a few CPU cores:

1. Binning (no grad): every visible Gaussian is paired with each ``tile_size``-square tile
   its opacity-aware box touches; pairs are sorted by (tile, depth).
2. Bucketing: non-empty tiles are sorted by their pair count and cut into buckets whose
   counts differ by at most a factor ``bucket_ratio``; each bucket is padded to its largest
   count, so padding wastes at most ``1 - bucket_ratio`` of the work, and holds at most
   ``max_bucket_elements`` (tiles x pairs x pixels) values, which bounds peak memory.
3. Per bucket, dense tensors ``[tiles, K, tile_px]``: the exponent ``log o - d^T Sigma^-1 d / 2``
   is a quadratic in the pixel offset inside the tile, so it is one small matrix product of
   six per-pair coefficients with six pixel monomials; then alpha, the skip/stop masks, an
   inclusive ``cumsum`` of ``log(1 - alpha)`` for transmittance, and one ``bmm`` of weights
   with ``[features, depth, 1]`` giving colour, depth and alpha at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .gaussians_project import ALPHA_THRESHOLD

ALPHA_MAX = 0.999  # gsplat 1.5.3's clamp (the original 3DGS kernel used 0.99)
T_MIN = 1e-4  # compositing stops before transmittance would reach this
_LOG_T_MIN = math.log(T_MIN)
_PAD_LOG_OPACITY = -100.0  # padding pairs: alpha = exp(-100) = 0, skipped like alpha < 1/255


def bin_gaussians(
    means2d: Tensor,  # [C, N, 2]
    radii: Tensor,  # [C, N, 2] int, 0 = culled
    depths: Tensor,  # [C, N]
    tile_size: int,
    tiles_x: int,
    tiles_y: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pair each visible Gaussian with the tiles its box touches, sorted by (tile, depth).

    The box is gsplat's: tiles ``floor((m - r) / s) .. ceil((m + r) / s) - 1`` per axis,
    clipped to the grid (``m`` the 2D mean, ``r`` the radius, ``s`` the tile size).

    Returns:
        ``pair_gaussians [P]`` flat index ``c * N + n``, ``pair_tiles [P]`` flat index
        ``c * tiles_y * tiles_x + ty * tiles_x + tx``, both int64 and sorted by tile then
        depth, and ``tile_counts [C * tiles_y * tiles_x]``.
    """
    C, N = depths.shape
    device = depths.device
    with torch.no_grad():
        m2d = means2d.detach().reshape(C * N, 2)
        rad = radii.reshape(C * N, 2).to(m2d.dtype)
        lo = torch.floor((m2d - rad) / tile_size)
        hi = torch.ceil((m2d + rad) / tile_size)
        limits = torch.tensor([tiles_x, tiles_y], device=device, dtype=m2d.dtype)
        lo = torch.minimum(lo.clamp_min(0), limits).long()  # [CN, 2]
        hi = torch.minimum(hi.clamp_min(0), limits).long()
        spans = (hi - lo).clamp_min(0)  # [CN, 2]
        visible = (radii.reshape(C * N, 2) > 0).all(-1)
        counts = spans[:, 0] * spans[:, 1] * visible  # [CN]

        gauss = torch.repeat_interleave(torch.arange(C * N, device=device), counts)  # [P]
        starts = torch.cumsum(counts, 0) - counts
        local = torch.arange(gauss.numel(), device=device) - starts[gauss]
        span_x = spans[gauss, 0]
        tx = lo[gauss, 0] + local % span_x
        ty = lo[gauss, 1] + local // span_x
        cams = gauss // N
        tiles = (cams * tiles_y + ty) * tiles_x + tx  # [P]

        # Rank of each Gaussian by depth within the whole batch: ties keep input order.
        flat_depths = depths.detach().reshape(C * N)
        ranks = torch.empty(C * N, dtype=torch.long, device=device)
        ranks[torch.sort(flat_depths, stable=True).indices] = torch.arange(C * N, device=device)
        keys = tiles * (C * N) + ranks[gauss]
        order = torch.sort(keys).indices
        tile_counts = torch.bincount(tiles, minlength=C * tiles_x * tiles_y)
    return gauss[order], tiles[order], tile_counts


def plan_buckets(
    tile_counts: Tensor,  # [T] pairs per tile
    tile_px: int,
    bucket_ratio: float,
    max_bucket_elements: int,
) -> list[tuple[Tensor, int]]:
    """Group non-empty tiles into padded buckets of similar pair counts.

    Returns:
        A list of ``(tile_ids [Tb], K)``: tiles of one bucket and the count they pad to.
    """
    counts = tile_counts.cpu()
    nonempty = torch.nonzero(counts > 0).squeeze(1)
    if nonempty.numel() == 0:
        return []
    order = torch.sort(counts[nonempty], descending=True, stable=True).indices
    tiles_sorted = nonempty[order]
    counts_sorted = counts[tiles_sorted].tolist()
    buckets = []
    start = 0
    while start < len(counts_sorted):
        k = counts_sorted[start]
        per_tile = k * tile_px
        max_tiles = max(1, max_bucket_elements // per_tile)
        end = start + 1
        while (end < len(counts_sorted) and end - start < max_tiles
               and counts_sorted[end] >= bucket_ratio * k):
            end += 1
        buckets.append((tiles_sorted[start:end].to(tile_counts.device), k))
        start = end
    return buckets


def pixel_monomials(tile_size: int, device, dtype) -> Tensor:
    """``[tile_px, 6]`` monomials ``(1, u, v, u^2, v^2, u v)`` of the pixel centres of a tile.

    ``(u, v)`` are offsets from the tile's corner (``+ 0.5``: pixel centres), kept small so
    that the quadratic expansion of the Mahalanobis distance loses little float32 precision.
    """
    j = torch.arange(tile_size * tile_size, device=device)
    u = (j % tile_size).to(dtype) + 0.5
    v = torch.div(j, tile_size, rounding_mode="floor").to(dtype) + 0.5
    return torch.stack([torch.ones_like(u), u, v, u * u, v * v, u * v], dim=-1)


def composite_bucket(
    pair_attrs: Tensor,  # [Tb, K, 6] (mx', my', a, b, c, log o), mx' relative to tile corner
    pair_features: Tensor,  # [Tb, K, F]
    monomials: Tensor,  # [tile_px, 6]
) -> Tensor:
    """Front-to-back compositing of depth-sorted pairs over the pixels of each tile.

    ``power = log o - 0.5 (a dx^2 + c dy^2) - b dx dy`` with ``(dx, dy) = m - pixel`` written
    as six coefficients times the monomials; ``alpha = min(0.999, exp(power))``, zero where
    below 1/255; ``T_k = prod_{j<k} (1 - alpha_j)`` through a cumulative sum of logs; pairs
    whose inclusive transmittance would reach ``1e-4`` and all behind them are dropped (the
    stop mask is monotone along K, so masking after the cumsum is exact).

    Returns:
        ``[Tb, tile_px, F]`` sums ``sum_k alpha_k T_k f_k`` per pixel.
    """
    mx, my, a, b, c, log_o = pair_attrs.unbind(-1)  # [Tb, K] each
    coeffs = torch.stack([
        log_o - 0.5 * a * mx * mx - 0.5 * c * my * my - b * mx * my,
        a * mx + b * my,
        c * my + b * mx,
        -0.5 * a,
        -0.5 * c,
        -b,
    ], dim=-1)  # [Tb, K, 6]
    # One 2D GEMM for all pairs: far cheaper on CPU than a batched product of tiny matrices.
    powers = (coeffs.reshape(-1, 6) @ monomials.T).reshape(coeffs.shape[:2] + (-1,))
    alphas = torch.exp(powers).clamp_max(ALPHA_MAX)  # [Tb, K, tile_px]
    alphas = torch.where(alphas >= ALPHA_THRESHOLD, alphas, torch.zeros_like(alphas))
    log_trans = torch.log1p(-alphas)
    log_t_incl = torch.cumsum(log_trans, dim=1)
    applied = log_t_incl > _LOG_T_MIN
    weights = torch.where(applied, alphas * torch.exp(log_t_incl - log_trans),
                          torch.zeros_like(alphas))
    # [Tb, F, K] @ [Tb, K, tile_px]: the long axis innermost keeps bmm efficient.
    return torch.bmm(pair_features.transpose(1, 2), weights).transpose(1, 2)  # [Tb, px, F]


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
    bucket_ratio: float = 0.7,
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
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    tile_px = tile_size * tile_size
    pair_gauss, pair_tiles, tile_counts = bin_gaussians(
        means2d, radii, depths, tile_size, tiles_x, tiles_y)

    dtype, device = means2d.dtype, means2d.device
    n_tiles = C * tiles_x * tiles_y
    out_tiles = torch.zeros(n_tiles, tile_px, F, dtype=dtype, device=device)
    buckets = plan_buckets(tile_counts, tile_px, bucket_ratio, max_bucket_elements)
    if buckets:
        log_opacities = torch.log(opacities.expand(C, N).clamp_min(ALPHA_THRESHOLD))
        # One table row per (camera, Gaussian) plus a padding row that never contributes.
        attrs = torch.cat([means2d, conics, log_opacities[..., None]], dim=-1).reshape(C * N, 6)
        pad_attr = torch.zeros(1, 6, dtype=dtype, device=device)
        pad_attr[0, 5] = _PAD_LOG_OPACITY
        attrs = torch.cat([attrs, pad_attr], dim=0)  # [CN + 1, 6]
        feats = torch.cat([features.reshape(C * N, F),
                           torch.zeros(1, F, dtype=dtype, device=device)], dim=0)
        monomials = pixel_monomials(tile_size, device, dtype)
        tile_starts = torch.cumsum(tile_counts, 0) - tile_counts  # [n_tiles]
        per_tile_x = torch.arange(n_tiles, device=device) % tiles_x
        per_tile_y = torch.div(torch.arange(n_tiles, device=device), tiles_x,
                               rounding_mode="floor") % tiles_y
        pad_id = torch.full((1,), C * N, device=device, dtype=torch.long)
        results, result_tiles = [], []
        for tile_ids, k in buckets:
            slots = torch.arange(k, device=device)
            idx = tile_starts[tile_ids, None] + slots  # [Tb, K]
            filled = slots < tile_counts[tile_ids, None]
            gids = torch.where(filled, pair_gauss[idx.clamp_max(pair_gauss.numel() - 1)], pad_id)
            pair_attrs = attrs[gids]  # [Tb, K, 6]
            corners = torch.stack([per_tile_x[tile_ids], per_tile_y[tile_ids]], -1) * tile_size
            offsets = torch.cat([corners.to(dtype)[:, None, :],
                                 torch.zeros(len(tile_ids), 1, 4, dtype=dtype, device=device)],
                                dim=-1)  # [Tb, 1, 6]: only the means move to tile coordinates
            results.append(composite_bucket(pair_attrs - offsets, feats[gids], monomials))
            result_tiles.append(tile_ids)
        out_tiles = out_tiles.index_copy(0, torch.cat(result_tiles), torch.cat(results))

    images = out_tiles.reshape(C, tiles_y, tiles_x, tile_size, tile_size, F)
    images = images.permute(0, 1, 3, 2, 4, 5).reshape(C, tiles_y * tile_size,
                                                      tiles_x * tile_size, F)
    return images[:, :height, :width]
