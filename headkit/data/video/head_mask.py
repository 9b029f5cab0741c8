"""Masks of head and neck only, as INSTA made them: the person mask cut below the fitted neck.

Selfie segmentation marks the whole person, shoulders and shirt included, which no head model
can explain. The fitted full-head mesh ends in a loop of boundary vertices at the base of the
neck; projected into a frame, the lower envelope of that loop is the cut line. Pixels below it
go; columns left or right of the neck keep the line's height at its nearest end, which removes
the shoulders but keeps hair that hangs beside the neck above that height.
"""

from __future__ import annotations

import numpy as np


def boundary_edges(faces: np.ndarray) -> np.ndarray:  # [F, 3] -> [B, 2]
    """Edges used by exactly one triangle, as sorted vertex pairs."""
    pairs = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), 1)
    unique, counts = np.unique(pairs, axis=0, return_counts=True)
    return unique[counts == 1]


def boundary_loops(faces: np.ndarray, num_vertices: int) -> list[np.ndarray]:  # [F, 3] -> vertex ids per loop
    """Vertex ids of each connected chain of boundary edges (edges used by one triangle)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    edges = boundary_edges(faces)
    if not len(edges):
        return []
    graph = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(num_vertices, num_vertices))
    _, labels = connected_components(graph, directed=False)
    on_boundary = np.unique(edges)
    return [on_boundary[labels[on_boundary] == k] for k in np.unique(labels[on_boundary])]


def neck_loop(faces: np.ndarray,  # [F, 3]
              vertices: np.ndarray,  # [V, 3] head coordinates (y down)
              ) -> tuple[np.ndarray, np.ndarray]:
    """The boundary loop lowest on the head (largest mean ``y``): its vertex ids ``[N]`` (sorted)
    and the loop's edges ``[N, 2]``. Raises ``ValueError`` for a closed mesh."""
    loops = boundary_loops(faces, len(vertices))
    if not loops:
        raise ValueError("the head mesh has no boundary, so it has no neck cut")
    ids = max(loops, key=lambda vs: float(vertices[vs, 1].mean()))
    member = np.zeros(len(vertices), bool)
    member[ids] = True
    edges = boundary_edges(faces)
    return ids, edges[member[edges[:, 0]] & member[edges[:, 1]]]


def cut_heights(points: np.ndarray,  # [N, 2] pixel positions of the loop's vertices
                edges: np.ndarray,  # [M, 2] indices into points
                width: int) -> np.ndarray:  # -> [width]
    """The cut line: per image column the lowest (largest ``y``) point of the projected loop;
    columns outside the loop take its nearest end's height. Every edge is sampled at least once
    per pixel column it spans, so no column sees only the loop's far (upper) side."""
    span = np.abs(points[edges[:, 0], 0] - points[edges[:, 1], 0]).max() if len(edges) else 0.0
    samples = int(np.ceil(min(span, 4 * width))) + 2
    t = np.linspace(0.0, 1.0, samples)[None, :, None]
    dense = (points[edges[:, 0]][:, None] * (1 - t) + points[edges[:, 1]][:, None] * t).reshape(-1, 2)
    cols = np.round(dense[:, 0]).astype(np.int64)
    heights = np.full(width, -np.inf)
    keep = (cols >= 0) & (cols < width)
    np.maximum.at(heights, cols[keep], dense[keep, 1])
    known = np.flatnonzero(np.isfinite(heights))
    if not len(known):  # the neck lies beside the frame: cut at the height of its lowest point
        return np.full(width, float(dense[:, 1].max()))
    return np.interp(np.arange(width), known, heights[known])


def neck_cut_mask(mask: np.ndarray,  # [H, W] uint8 person mask
                  points: np.ndarray,  # [N, 2] projected neck-loop vertices (pixels)
                  edges: np.ndarray,  # [M, 2]
                  antialias: bool = False,
                  ) -> np.ndarray:  # -> [H, W] uint8
    """``mask`` with every pixel below the neck's cut line cleared. With ``antialias`` a pixel the
    line crosses keeps the fraction of it above the line (pixel ``r`` spans ``[r - 0.5, r + 0.5]``);
    without, a pixel is kept when its centre is on or above the line."""
    H, W = mask.shape
    heights = cut_heights(points, edges, W)
    rows = np.arange(H, dtype=np.float64)[:, None]
    if not antialias:
        return np.where(rows <= heights[None, :], mask, 0).astype(mask.dtype)
    keep = np.clip(heights[None, :] - rows + 0.5, 0.0, 1.0)
    return np.round(mask * keep).astype(mask.dtype)
