"""Zero-phase Gaussian smoothing over time that respects gaps left by dropped frames.

Preprocessing is offline, so a symmetric (non-causal) Gaussian beats causal filters such as
One-Euro: it adds no lag. Weights use the true frame numbers, ``exp(-(n_i - n_j)^2 / 2 sigma^2)``,
so frames on either side of a gap of dropped frames influence each other only as much as their
distance in time allows. The kernel is cut at 3 sigma and renormalised at the clip's ends.
"""

from __future__ import annotations

import math

import numpy as np


def gaussian_smooth(values: np.ndarray,  # [T, ...]
                    frame_numbers: np.ndarray,  # [T] increasing
                    sigma: float) -> np.ndarray:
    """Gaussian-weighted average of ``values`` over neighbouring frames; ``sigma`` in frames.

    ``sigma <= 0`` returns a copy. Returns float64 ``[T, ...]``.
    """
    values = np.asarray(values, np.float64)
    if sigma <= 0 or len(values) < 2:
        return values.copy()
    numbers = np.asarray(frame_numbers, np.float64)
    T = len(values)
    reach = max(1, math.ceil(3 * sigma))
    total = np.zeros_like(values)
    norm = np.zeros(T)
    for offset in range(-reach, reach + 1):
        lo, hi = max(0, -offset), min(T, T - offset)  # t in [lo, hi) has a neighbour t + offset
        if lo >= hi:
            continue
        gap = numbers[lo + offset:hi + offset] - numbers[lo:hi]
        w = np.exp(-0.5 * (gap / sigma) ** 2) * (np.abs(gap) <= 3 * sigma + 0.5)
        total[lo:hi] += w.reshape(-1, *([1] * (values.ndim - 1))) * values[lo + offset:hi + offset]
        norm[lo:hi] += w
    return total / norm.reshape(-1, *([1] * (values.ndim - 1)))


def nearest_rotations(mats: np.ndarray) -> np.ndarray:  # [..., 3, 3]
    """Closest rotation matrices (Frobenius norm) via SVD: ``U diag(1, 1, det(U V^T)) V^T``."""
    U, _, Vt = np.linalg.svd(mats)
    d = np.sign(np.linalg.det(U @ Vt))
    U = U.copy()
    U[..., :, 2] *= d[..., None]
    return U @ Vt


def smooth_rotations(rotations: np.ndarray,  # [T, 3, 3]
                     frame_numbers: np.ndarray,  # [T]
                     sigma: float) -> np.ndarray:
    """Gaussian-weighted chordal mean of neighbouring rotations, ``[T, 3, 3]``.

    The weighted average of the matrices, projected back onto SO(3), is the rotation that
    minimises the weighted squared Frobenius distance to the neighbours (the chordal L2 mean).
    """
    if sigma <= 0:
        return np.asarray(rotations, np.float64).copy()
    return nearest_rotations(gaussian_smooth(rotations, frame_numbers, sigma))


def smooth_poses(poses: np.ndarray,  # [T, 4, 4] rigid
                 frame_numbers: np.ndarray,  # [T]
                 sigma: float) -> np.ndarray:
    """Smooth rigid poses: rotations by chordal mean, translations by :func:`gaussian_smooth`."""
    out = np.array(poses, np.float64, copy=True)
    out[:, :3, :3] = smooth_rotations(poses[:, :3, :3], frame_numbers, sigma)
    out[:, :3, 3] = gaussian_smooth(poses[:, :3, 3], frame_numbers, sigma)
    return out
