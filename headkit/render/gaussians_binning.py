"""Binning of projected Gaussians into screen tiles for the torch splatting backend.

No gradients flow here: binning only decides which (Gaussian, tile) pairs the compositing
of :mod:`.gaussians_torch` evaluates, in which order, and how tiles are grouped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gaussians_project import ALPHA_THRESHOLD


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
        table = torch.cat([lo, spans[:, :1], m2d,
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
