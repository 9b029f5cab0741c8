"""Square head crops from landmark bounding boxes, and the intrinsics that go with them.

A box is ``(x0, y0, side)`` in integer pixels of the full frame; pixel ``(i, j)`` of the crop is
pixel ``(y0 + i, x0 + j)`` of the frame (zero outside the frame). Cropping shifts the principal
point by ``(-x0, -y0)`` and resizing ``side -> S`` scales continuous pixel coordinates by
``S / side`` (pixel centres at +0.5), so a 3D point keeps projecting onto the same image content.
"""

from __future__ import annotations

import numpy as np

from .smoothing import gaussian_smooth

CROP_MODES = ("smoothed", "fixed")


def landmark_boxes(points: np.ndarray) -> np.ndarray:  # [T, L, 2] pixels -> [T, 4]
    """Axis-aligned bounding boxes ``(x_min, y_min, x_max, y_max)`` of each frame's 2D landmarks."""
    return np.concatenate([points.min(1), points.max(1)], -1)


def crop_boxes(bboxes: np.ndarray,  # [T, 4] landmark boxes
               frame_numbers: np.ndarray,  # [T]
               mode: str = "smoothed", margin: float = 1.6, shift_y: float = -0.1,
               sigma: float = 3.0) -> np.ndarray:
    """Square crop boxes ``[T, 3]`` int ``(x0, y0, side)`` around the landmark boxes.

    The side is ``margin`` times the larger landmark-box side; the centre moves by
    ``shift_y`` times that side (negative: up, to keep the hair the landmarks do not cover).
    ``smoothed``: per-frame boxes, centre and size Gaussian-smoothed over time (``sigma`` frames)
    so the crop follows the head without jitter. ``fixed``: one box for the whole clip around
    the union of all landmark boxes (static background and intrinsics; a smaller face when
    the head moves a lot).
    """
    if mode not in CROP_MODES:
        raise ValueError(f"crop mode must be one of {CROP_MODES}, got {mode!r}")
    if margin <= 0:
        raise ValueError(f"crop margin must be positive, got {margin}")
    if mode == "fixed":
        bboxes = np.concatenate([bboxes[:, :2].min(0), bboxes[:, 2:].max(0)])[None].repeat(len(bboxes), 0)
    centres = 0.5 * (bboxes[:, :2] + bboxes[:, 2:])
    sizes = (bboxes[:, 2:] - bboxes[:, :2]).max(1)
    if mode == "smoothed":
        centres = gaussian_smooth(centres, frame_numbers, sigma)
        sizes = gaussian_smooth(sizes, frame_numbers, sigma)
    centres = centres + np.stack([np.zeros_like(sizes), shift_y * sizes], -1)
    sides = np.maximum(np.round(margin * sizes), 2).astype(np.int64)
    corners = np.round(centres - sides[:, None] / 2.0).astype(np.int64)
    return np.concatenate([corners, sides[:, None]], -1)


def inside_frame(boxes: np.ndarray,  # [T, 3] (x0, y0, side)
                 width: int, height: int) -> np.ndarray:  # -> [T, 3]
    """The boxes shrunk to fit the frame (side at most ``min(width, height)``, same centre) and
    moved inside it. Pixels beyond the frame have no ground truth: padded and masked as
    background, they would teach an avatar to erase the chin wherever the head nears an edge."""
    sides = np.minimum(boxes[:, 2], min(width, height))
    centres = boxes[:, :2] + boxes[:, 2:3] / 2.0
    corners = np.round(centres - sides[:, None] / 2.0).astype(np.int64)
    corners[:, 0] = np.clip(corners[:, 0], 0, width - sides)
    corners[:, 1] = np.clip(corners[:, 1], 0, height - sides)
    return np.concatenate([corners, sides[:, None]], -1)


def crop_intrinsics(K: np.ndarray,  # [3, 3] of the full frame
                    boxes: np.ndarray,  # [T, 3] (x0, y0, side)
                    size: int) -> np.ndarray:
    """Intrinsics ``[T, 3, 3]`` of the crops resized to ``size x size``:
    ``f' = f S / side``, ``c' = (c - corner) S / side``."""
    Ks = np.tile(np.asarray(K, np.float64), (len(boxes), 1, 1))
    Ks[:, 0, 2] -= boxes[:, 0]
    Ks[:, 1, 2] -= boxes[:, 1]
    Ks[:, :2, :] *= (size / boxes[:, 2].astype(np.float64))[:, None, None]
    return Ks


def crop_frame(frame: np.ndarray,  # [H, W, ...]
               box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (x0, y0, side)
    """Cut ``box`` out of ``frame``, zero where the box leaves the frame.

    Returns the crop ``[side, side, ...]`` and a boolean ``[side, side]`` map of pixels inside
    the frame.
    """
    x0, y0, side = (int(v) for v in box)
    H, W = frame.shape[:2]
    out = np.zeros((side, side) + frame.shape[2:], frame.dtype)
    inside = np.zeros((side, side), bool)
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, W), min(y0 + side, H)
    if xa < xb and ya < yb:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = frame[ya:yb, xa:xb]
        inside[ya - y0:yb - y0, xa - x0:xb - x0] = True
    return out, inside


def resize_square(image: np.ndarray,  # [side, side, 3] uint8
                  mask: np.ndarray,  # [side, side] uint8
                  size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a square crop and its mask to ``size x size`` with Pillow's bilinear filter, which
    widens to the scale factor when shrinking (antialiased) and keeps pixel centres at +0.5 (our
    convention too), so :func:`crop_intrinsics` stays exact. (Pillow's BOX filter is not exact
    area averaging for non-integer factors: it shifts content by up to a quarter pixel.)"""
    from PIL import Image

    if image.shape[0] == size:
        return image, mask
    resample = Image.Resampling.BILINEAR
    return (np.asarray(Image.fromarray(image).resize((size, size), resample)),
            np.asarray(Image.fromarray(mask).resize((size, size), resample)))
