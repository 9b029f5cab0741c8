"""Tile-based front-to-back compositing of projected Gaussians in plain torch.

The torch backend of :func:`headkit.render.gaussians.rasterize_gaussians` (semantics there).
Autograd differentiates everything except the per-pixel compositing, whose backward pass
is written out in :class:`CompositeTiles` (tested against autograd through a dense
reference and by finite differences).

Design, chosen for speed on a few CPU cores:

1. Binning (no grad): every visible Gaussian is paired with each ``tile_size``-square tile
   where it reaches alpha >= 1/255 at some pixel; pairs are sorted by (tile, depth).
2. Bucketing: non-empty tiles are sorted by their pair count and cut into buckets whose
   counts differ by at most a factor ``bucket_ratio``; each bucket is padded to its largest
   count, so padding wastes at most ``1 - bucket_ratio`` of the work, and holds at most
   ``max_bucket_elements`` (tiles x pairs x pixels) values, which bounds peak memory.
3. Per bucket, dense tensors ``[tiles, K, tile_px]``: the exponent ``log o - d^T Sigma^-1 d / 2``
   is a quadratic in the pixel offset inside the tile, so it is one matrix product of six
   per-pair coefficients with six pixel monomials; then alpha, the skip/stop masks, a
   ``cumsum`` of ``log(1 - alpha)`` for transmittance, and one ``bmm`` of the weights with
   the features (the caller appends depth and a constant 1: colour, depth and alpha at once).
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
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    radii: Tensor,  # [C, N, 2] int, 0 = culled
    depths: Tensor,  # [C, N]
    tile_size: int,
    tiles_x: int,
    tiles_y: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pair each visible Gaussian with the tiles it reaches, sorted by (tile, depth).

    Candidates are the tiles of gsplat's box, ``floor((m - r) / s) .. ceil((m + r) / s) - 1``
    per axis (``m`` the 2D mean, ``r`` the radius, ``s`` the tile size); of those, only tiles
    where some pixel centre may reach ``alpha >= 1/255`` are kept (:func:`tile_reaches`),
    which drops about 40% of the pairs of a box test and changes no pixel.

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
        limits = torch.tensor([tiles_x, tiles_y], device=device, dtype=m2d.dtype)
        lo = torch.minimum(torch.floor((m2d - rad) / tile_size).clamp_min(0), limits)  # [CN, 2]
        hi = torch.minimum(torch.ceil((m2d + rad) / tile_size).clamp_min(0), limits)
        spans = (hi - lo).clamp_min(0)
        counts = (spans[:, 0] * spans[:, 1]).long() * (radii.reshape(C * N, 2) > 0).all(-1)

        # Gaussians in depth order (ties: input order), so pairs come out depth-sorted and a
        # stable sort by tile alone finishes the job.
        order = torch.sort(depths.detach().reshape(C * N), stable=True).indices
        order = order[counts.index_select(0, order) > 0]
        counts = counts.index_select(0, order)
        cams = torch.div(order, N, rounding_mode="floor").to(m2d.dtype)
        # Per-Gaussian row copied to each of its pairs: box corner (the camera folded into
        # the tile row), box width, then what tile_reaches needs.
        table = torch.cat([lo[:, :1], lo[:, 1:] + 0.0, spans[:, :1], m2d,
                           conics.detach().reshape(C * N, 3),
                           opacities.detach().reshape(C * N, 1)], dim=-1).index_select(0, order)
        table[:, 1] += cams * tiles_y
        owner = torch.repeat_interleave(torch.arange(len(order), device=device), counts)
        rows = table.index_select(0, owner)  # [P, 9]
        starts = torch.cumsum(counts, 0) - counts
        local = (torch.arange(len(owner), device=device) - starts.index_select(0, owner))
        local = local.to(m2d.dtype)
        # local = dy * span_x + dx; exact in floating point for the sizes involved (< 2^22).
        dy = torch.floor((local + 0.5) / rows[:, 2])
        tx = rows[:, 0] + local - dy * rows[:, 2]
        ty = rows[:, 1] + dy  # includes the camera's block of tile rows
        corners = torch.stack([tx, ty - torch.floor(ty / tiles_y) * tiles_y], -1) * tile_size
        hits = torch.nonzero(tile_reaches(rows[:, 3:5] - corners, rows[:, 5:8], rows[:, 8],
                                          tile_size)).squeeze(1)
        tiles = (ty.index_select(0, hits) * tiles_x + tx.index_select(0, hits)).long()
        gauss = order.index_select(0, owner.index_select(0, hits))
        n_tiles = C * tiles_y * tiles_x
        key_dtype = torch.int32 if n_tiles < 2**31 else torch.int64
        by_tile = torch.sort(tiles.to(key_dtype), stable=True).indices
        tile_counts = torch.bincount(tiles, minlength=n_tiles)
    return gauss.index_select(0, by_tile), tiles.index_select(0, by_tile), tile_counts


def tile_reaches(
    means: Tensor,  # [P, 2] 2D means relative to the tile corner
    conics: Tensor,  # [P, 3] (a, b, c) of Sigma2d^-1
    opacities: Tensor,  # [P]
    tile_size: int,
    margin: float = 1e-2,
) -> Tensor:
    """Whether a Gaussian may reach ``alpha >= 1/255`` at some pixel centre of a tile.

    Exact up to ``margin`` (kept on the safe side): the minimum of ``sigma(p) = (m - p)^T
    Sigma2d^-1 (m - p) / 2`` over the box ``[0.5, s - 0.5]^2`` of pixel centres is 0 if the
    mean is inside, else it lies on the edge facing the mean in x or the one in y, where
    the 1D minimiser has a closed form. The pair is kept if ``o exp(-sigma_min) >= 1/255``.

    Returns:
        ``[P]`` bool.
    """
    mx, my = means.unbind(-1)
    a, b, c = conics.unbind(-1)
    lo, hi = 0.5, tile_size - 0.5
    # Edge x = X facing the mean: best y = my + b (mx - X) / c, clamped to the edge.
    ex = mx - mx.clamp(lo, hi)  # dx to the nearest x-edge (0 if mx is within)
    ey = my - (my + b * ex / c).clamp(lo, hi)
    sig_x = 0.5 * (a * ex * ex + c * ey * ey) + b * ex * ey
    fy = my - my.clamp(lo, hi)
    fx = mx - (mx + b * fy / a).clamp(lo, hi)
    sig_y = 0.5 * (a * fx * fx + c * fy * fy) + b * fx * fy
    return torch.minimum(sig_x, sig_y) <= torch.log(opacities / ALPHA_THRESHOLD) + margin


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
    pair_attrs: Tensor,  # [Tb, K, 6] (mx, my, a, b, c, log o), means relative to the tile centre
) -> Tensor:
    """Coefficients of the exponent ``log o - sigma`` as a quadratic in the pixel offset.

    ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy`` with ``(dx, dy) = (mx - u, my - v)``; expanding
    in the monomials of :func:`pixel_monomials` gives

    ``power(u, v) = [log o - a mx^2/2 - c my^2/2 - b mx my] + (a mx + b my) u + (c my + b mx) v
    - a/2 u^2 - c/2 v^2 - b u v``.

    Returns:
        ``[Tb, K, 6]``.
    """
    mx, my, a, b, c, log_o = pair_attrs.unbind(-1)  # [Tb, K] each
    return torch.stack([
        log_o - 0.5 * a * mx * mx - 0.5 * c * my * my - b * mx * my,
        a * mx + b * my,
        c * my + b * mx,
        -0.5 * a,
        -0.5 * c,
        -b,
    ], dim=-1)


class CompositeTiles(torch.autograd.Function):
    """Front-to-back compositing of depth-sorted pairs over the pixels of their tiles.

    Forward, per tile and pixel ``p`` (``k`` runs over the tile's pairs, front to back):

    * ``alpha_k = min(0.999, exp(coeffs_k . monomials_p))``, set to 0 below 1/255;
    * ``T_k = prod_{j<k} (1 - alpha_j)`` from a cumulative sum of ``log(1 - alpha)``; the
      first pair with ``T_k (1 - alpha_k) <= 1e-4`` and all after it get ``alpha = 0``
      (``T`` only decreases along ``k``, so the stop is a prefix mask);
    * ``out_p = sum_k w_k f_k`` with ``w_k = alpha_k T_k``.

    Backward (hand-written: autograd through the same ops costs about twice the time and
    saves ~10 tensors of this size instead of 2): with ``g_k = f_k . dL/dout_p``,
    ``dL/dalpha_k = T_k g_k - (sum_{j>k} w_j g_j) / (1 - alpha_k)``, and
    ``dL/dpower_k = alpha_k dL/dalpha_k`` where ``alpha_k`` was neither clamped nor dropped.

    Args (of ``apply``):
        coeffs: ``[Tb, K, 6]`` from :func:`pair_coefficients` (padding pairs: alpha 0).
        features: ``[Tb, K, F]``.
        monomials: ``[tile_px, 6]`` from :func:`pixel_monomials` (no gradient).

    Returns:
        ``[Tb, tile_px, F]``.
    """

    @staticmethod
    def forward(ctx, coeffs: Tensor, features: Tensor, monomials: Tensor) -> Tensor:
        Tb, K, _ = coeffs.shape
        # One 2D GEMM for all pairs: far cheaper on CPU than many tiny batched products.
        powers = coeffs.reshape(Tb * K, 6) @ monomials.T
        alphas = powers.reshape(Tb, K, monomials.shape[0])
        alphas.exp_().clamp_(max=ALPHA_MAX)
        alphas.masked_fill_(alphas < ALPHA_THRESHOLD, 0.0)
        trans = torch.log1p(-alphas)  # log(1 - alpha)
        log_t_incl = torch.cumsum(trans, dim=1)
        # The stop rule only matters where a pixel saturates; the last entry is the minimum.
        if bool((log_t_incl[:, -1] <= _LOG_T_MIN).any()):
            alphas.masked_fill_(log_t_incl <= _LOG_T_MIN, 0.0)
        trans = log_t_incl.sub_(trans).exp_()  # exclusive transmittance T_k
        weights = alphas * trans
        ctx.save_for_backward(alphas, trans, features, monomials)
        # [Tb, F, K] @ [Tb, K, px]: the long axis innermost keeps bmm efficient.
        return torch.bmm(features.transpose(1, 2), weights).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # grad_out: [Tb, px, F]
        alphas, trans, features, monomials = ctx.saved_tensors
        Tb, K, px = alphas.shape
        weights = alphas * trans
        grad_features = None
        if ctx.needs_input_grad[1]:
            grad_features = torch.bmm(weights, grad_out)  # [Tb, K, F]
        if not ctx.needs_input_grad[0]:
            return None, grad_features, None
        gw = torch.bmm(features, grad_out.transpose(1, 2))  # [Tb, K, px]
        behind = torch.cumsum(weights.mul_(gw), dim=1)
        behind = behind[:, -1:].sub(behind)  # sum_{j>k} w_j g_j
        grad_alphas = gw.mul_(trans).sub_(behind.div_(1.0 - alphas))
        # d alpha / d power = alpha, except where alpha was clamped (0.999) or dropped (0).
        grad_powers = grad_alphas.mul_(alphas).masked_fill_(alphas >= ALPHA_MAX, 0.0)
        grad_coeffs = (grad_powers.reshape(Tb * K, px) @ monomials).reshape(Tb, K, 6)
        return grad_coeffs, grad_features, None


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
    dtype, device = means2d.dtype, means2d.device
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    tile_px = tile_size * tile_size
    opacities = opacities.expand(C, N)
    pair_gauss, _, tile_counts = bin_gaussians(
        means2d, conics, opacities, radii, depths, tile_size, tiles_x, tiles_y)
    buckets = plan_buckets(tile_counts, tile_px, bucket_ratio, max_bucket_elements)
    if not buckets:
        # Nothing visible: one empty bucket keeps the output attached to the autograd graph.
        buckets = [(torch.zeros(0, dtype=torch.long, device=device), 1)]

    # One table row per (camera, Gaussian) plus a padding row whose alpha is always 0.
    log_opacities = torch.log(opacities.clamp_min(ALPHA_THRESHOLD))
    attrs = torch.cat([means2d, conics, log_opacities[..., None]], dim=-1).reshape(C * N, 6)
    pad_attr = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, _PAD_LOG_OPACITY]], dtype=dtype,
                            device=device)
    attrs = torch.cat([attrs, pad_attr], dim=0)  # [CN + 1, 6]
    feats = torch.cat([features.reshape(C * N, F), features.new_zeros(1, F)], dim=0)
    monomials = pixel_monomials(tile_size, device, dtype)
    tile_starts = torch.cumsum(tile_counts, 0) - tile_counts  # [n_tiles]
    last_pair = max(pair_gauss.numel() - 1, 0)
    pair_gauss = torch.cat([pair_gauss, pair_gauss.new_full((1,), C * N)])  # never empty

    results, result_tiles = [], []
    for tile_ids, k in buckets:
        slots = torch.arange(k, device=device)
        idx = tile_starts[tile_ids, None] + slots  # [Tb, K]
        filled = slots < tile_counts[tile_ids, None]
        gids = torch.where(filled, pair_gauss[idx.clamp_max(last_pair)], C * N).reshape(-1)
        # Means move to tile-centre coordinates (see pixel_monomials).
        centres = torch.stack([tile_ids % tiles_x,
                               torch.div(tile_ids, tiles_x, rounding_mode="floor") % tiles_y],
                              dim=-1).to(dtype) * tile_size + 0.5 * tile_size  # [Tb, 2]
        shift = torch.cat([centres, centres.new_zeros(len(tile_ids), 4)], dim=-1)[:, None]
        Tb = len(tile_ids)
        pair_attrs = attrs.index_select(0, gids).reshape(Tb, k, 6) - shift  # [Tb, K, 6]
        pair_feats = feats.index_select(0, gids).reshape(Tb, k, F)  # [Tb, K, F]
        coeffs = pair_coefficients(pair_attrs)
        results.append(CompositeTiles.apply(coeffs, pair_feats, monomials))
        result_tiles.append(tile_ids)
    out_tiles = torch.zeros(C * tiles_y * tiles_x, tile_px, F, dtype=dtype, device=device)
    out_tiles = out_tiles.index_copy(0, torch.cat(result_tiles), torch.cat(results))

    images = out_tiles.reshape(C, tiles_y, tiles_x, tile_size, tile_size, F)
    images = images.permute(0, 1, 3, 2, 4, 5).reshape(C, tiles_y * tile_size,
                                                      tiles_x * tile_size, F)
    return images[:, :height, :width]
