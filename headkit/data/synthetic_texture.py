"""Procedural textures of the synthetic head: skin (pores, freckles, brows, eyes, lips, mouth
interior, scalp), hair strands, teeth, tongue and gold.

Each texture is ``[R, R, 4]`` float32: RGB albedo in [0, 1] and a specular-strength channel.
Row ``r`` holds ``v = 1 - (r + 0.5) / R`` (v up, row 0 at the top) and column ``c`` holds
``u = (c + 0.5) / R``. The skin is painted as a function of the 3D template point under each
texel (:func:`headkit.data.synthetic_head.head_surface`), so features land where the geometry
puts them at any mesh resolution; only the random details (skin tone, pores, freckles, iris and
hair colour) depend on the seed.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d, zoom

from .synthetic_head import (BROW_Y, EYE_HH, EYE_HW, EYE_X, EYE_Y, HAIRLINE_DEG, HAIRLINE_Y,
                             MOUTH_Y, HeadGrid, head_surface, longitudes, mouth_sector, smoothstep)

MATERIALS = ("skin", "hair", "teeth", "tongue", "gold")
SHININESS = {"skin": 20.0, "hair": 40.0, "teeth": 30.0, "tongue": 20.0, "gold": 80.0}
_IRIS = np.array([[0.25, 0.42, 0.62], [0.30, 0.45, 0.25], [0.40, 0.24, 0.10], [0.18, 0.12, 0.07]])
_HAIR = np.array([[0.20, 0.12, 0.07], [0.07, 0.06, 0.05], [0.38, 0.16, 0.08], [0.58, 0.45, 0.27]])


def _noise(shape: tuple[int, int], cell: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth value noise in [-1, 1] with features about ``cell`` texels wide (cubic zoom)."""
    coarse = rng.uniform(-1.0, 1.0, (shape[0] // cell + 3, shape[1] // cell + 3))
    fine = zoom(coarse, cell, order=3)
    return np.clip(fine[cell:cell + shape[0], cell:cell + shape[1]], -1.0, 1.0)


def _mix(base: np.ndarray, colour, weight: np.ndarray) -> np.ndarray:
    """``base * (1 - w) + colour * w`` with ``w [...]`` broadcast over RGB."""
    w = np.clip(weight, 0.0, 1.0)[..., None]
    return base * (1.0 - w) + np.asarray(colour, dtype=np.float64) * w


def paint_skin(grid: HeadGrid, res: int, rng: np.random.Generator, hair_rgb: np.ndarray) -> np.ndarray:
    """Skin texture ``[res, res, 4]`` of the head grid ``grid`` (scalp and brows in ``hair_rgb``)."""
    ps = (np.arange(res) + 0.5) / res
    phis = longitudes((np.arange(res) + 0.5) / res)
    P = head_surface(grid, ps[:, None], phis[None, :])
    x, y, z = P[..., 0], P[..., 1], P[..., 2]
    ax = np.abs(x)
    front = z / np.maximum(np.hypot(x, z), 1e-9) > 0.3  # the face is a height field only in front
    tone = rng.uniform(0.0, 0.6)
    rgb = np.broadcast_to(np.array([0.90, 0.70, 0.58]) * (1 - tone) + np.array([0.72, 0.50, 0.36]) * tone,
                          P.shape).copy()
    rgb *= 1.0 + 0.05 * _noise((res, res), max(4, res // 24), rng)[..., None]
    red = 0.6 * np.exp(-((ax - 0.045) / 0.02) ** 2 - ((y + 0.03) / 0.02) ** 2) + 0.5 * np.exp(
        -(x / 0.008) ** 2 - ((y + 0.03) / 0.01) ** 2)
    rgb = _mix(rgb, [0.85, 0.48, 0.42], 0.3 * red * front)
    rgb = _mix(rgb, rgb * 0.92, smoothstep(-0.11, -0.14, y))  # neck in the jaw's shadow
    # Pores and grain: single-texel detail that only a high-resolution model can reproduce.
    pores = gaussian_filter((rng.random((res, res)) > 0.97).astype(np.float64), 0.6)
    rgb *= (1.0 - 0.6 * pores[..., None]) * (1.0 + 0.05 * (rng.random((res, res, 1)) - 0.5))
    fx, fy = rng.uniform(-0.055, 0.055, 220), rng.uniform(-0.05, 0.02, 220)
    keep = rng.random(220) < np.exp(-((np.abs(fx) - 0.03) / 0.03) ** 2 - ((fy + 0.02) / 0.025) ** 2)
    sel = front & (y > -0.06) & (y < 0.03) & (ax < 0.065)
    xs, ys, spots = x[sel], y[sel], np.zeros(int(sel.sum()))
    for cx, cy, r in zip(fx[keep], fy[keep], rng.uniform(0.0005, 0.0012, 220)[keep]):
        spots = np.maximum(spots, np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / r ** 2))
    freckles = np.zeros((res, res))
    freckles[sel] = spots
    rgb = _mix(rgb, [0.55, 0.33, 0.22], 0.55 * freckles)
    spec = 0.10 + 0.12 * front * (np.exp(-(x / 0.03) ** 2 - ((y - 0.045) / 0.025) ** 2)
                                   + np.exp(-(x / 0.01) ** 2 - ((y + 0.02) / 0.025) ** 2))

    hairline = np.interp(np.degrees(np.abs(phis)), HAIRLINE_DEG, HAIRLINE_Y)[None, :]
    scalp = smoothstep(hairline - 0.004, hairline + 0.002, y)
    rgb = _mix(rgb, hair_rgb * 0.8, scalp)
    spec = spec * (1 - scalp)

    # Eyebrows: an arc of short strokes slanting outwards.
    sx = np.where(x >= 0, x, -x)
    arc = BROW_Y - 0.001 + 0.005 * (1.0 - ((sx - 0.032) / 0.024) ** 2)
    thick = 0.0045 - 0.002 * np.clip((sx - 0.02) / 0.038, 0, 1)
    brow = (smoothstep(thick, 0.6 * thick, np.abs(y - arc)) * smoothstep(0.008, 0.013, sx)
            * (1 - smoothstep(0.052, 0.06, sx)) * front)
    strokes = 0.5 + 0.5 * np.sin(2 * np.pi * (sx * 0.8 - y * 0.6) / 0.0008 + 6 * _noise((res, res), 3, rng))
    rgb = _mix(rgb, hair_rgb * 0.8, brow * (0.55 + 0.45 * strokes))

    # Eyes: almond of sclera, iris with radial streaks, pupil, lash lines (the lash line sits on
    # the lid rows so it slides down with a blink).
    ex, ey = (sx - EYE_X) / EYE_HW, (y - EYE_Y) / EYE_HH
    top = np.maximum(1 - ex ** 2, 0)
    eye = smoothstep(0.12, -0.12, np.maximum(ey - top, -ey - 0.85 * top)) * front
    r = np.hypot(sx - EYE_X, y - EYE_Y)
    ang = np.arctan2(y - EYE_Y, sx - EYE_X)
    streaks = 0.75 + 0.35 * np.sin(40 * ang + 3 * _noise((res, res), 4, rng))
    iris_rgb = _IRIS[rng.integers(len(_IRIS))] * streaks[..., None]
    iris_rgb = _mix(iris_rgb, [0.05, 0.05, 0.06], smoothstep(0.0042, 0.0052, r))  # limbal ring
    iris_rgb = _mix(iris_rgb, [0.02, 0.02, 0.02], smoothstep(0.0023, 0.0019, r))  # pupil
    sclera = np.broadcast_to([0.93, 0.89, 0.86], P.shape)
    eye_rgb = _mix(sclera, [0.85, 0.6, 0.58], smoothstep(0.6, 1.0, np.abs(ex)))  # pink corners
    eye_rgb = _mix(eye_rgb, iris_rgb, smoothstep(0.0055, 0.005, r))
    rgb = _mix(rgb, eye_rgb, eye)
    lash = (np.exp(-((ey - top - 0.12) / 0.14) ** 2) * (np.abs(ex) < 1.05) * front
            + 0.5 * np.exp(-((ey + 0.85 * top + 0.1) / 0.1) ** 2) * (np.abs(ex) < 0.95) * front)
    rgb = _mix(rgb, [0.07, 0.05, 0.04], lash)
    spec = np.where(eye > 0.5, 0.9, spec)

    # Lips (with a cupid's bow and fine vertical lines), nostrils, and the mouth interior that
    # lines the lip band and only shows when the jaw opens.
    lim = np.clip(1 - (x / 0.026) ** 2, 0, 1)
    upper = (0.0068 - 0.0014 * np.exp(-(x / 0.004) ** 2)) * np.sqrt(lim)
    lower = 0.0085 * np.clip(1 - (x / 0.024) ** 2, 0, 1) ** 0.6
    outside = np.maximum(y - MOUTH_Y - upper, MOUTH_Y - lower - y)
    lips = smoothstep(0.0008, -0.0004, outside) * (lim > 0) * front
    lip_rgb = np.array([0.70, 0.36, 0.36]) * (1 - 0.08 * (np.sin(2 * np.pi * x / 0.0012) > 0.6))[..., None]
    rgb = _mix(rgb, lip_rgb, 0.85 * lips)
    spec = spec + 0.25 * lips
    nostrils = np.exp(-((sx - 0.0075) / 0.0028) ** 2 - ((y + 0.0385) / 0.0016) ** 2) * front
    rgb = _mix(rgb, [0.25, 0.12, 0.10], 0.9 * nostrils)
    inside = np.sin(np.pi * grid.band_fraction(ps))[:, None] * mouth_sector(phis)[None, :]
    rgb = _mix(rgb, [0.45, 0.12, 0.12], smoothstep(0.05, 0.3, inside))
    rgb = _mix(rgb, [0.10, 0.02, 0.02], smoothstep(0.5, 0.95, inside))
    spec = _mix(spec[..., None], [0.05], smoothstep(0.05, 0.3, inside))[..., 0]
    return np.concatenate([np.clip(rgb, 0, 1), np.clip(spec, 0, 1)[..., None]], -1).astype(np.float32)


def paint_hair(res: int, rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """Hair texture ``[res, res, 4]``: strands running along ``v`` (crown to hairline)."""
    strands = gaussian_filter1d(rng.normal(size=2 * res), 0.8, mode="wrap")
    strands = (strands - strands.min()) / (np.ptp(strands) + 1e-9)
    v = 1 - (np.arange(res) + 0.5) / res
    u = (np.arange(res) + 0.5) / res
    wobble = 0.004 * np.sin(6 * np.pi * v[:, None] + 2 * np.pi * 3 * u[None, :])
    idx = (((u[None, :] + wobble) % 1.0) * 2 * res).astype(int)
    shade = 0.55 + 0.6 * strands[idx] + 0.1 * _noise((res, res), max(4, res // 16), rng)
    rgb = np.clip(colour[None, None, :] * shade[..., None], 0, 1)
    spec = 0.2 + 0.25 * strands[idx]
    return np.concatenate([rgb, spec[..., None]], -1).astype(np.float32)


def paint_teeth(res: int) -> np.ndarray:
    """Teeth texture ``[res, res, 4]``: ivory with dark gaps between teeth along ``v`` (the arc)."""
    v = 1 - (np.arange(res) + 0.5) / res
    widths = np.array([0.085, 0.07, 0.06, 0.055, 0.05, 0.05, 0.05, 0.05])
    gaps = 0.5 + np.concatenate([[0.0], np.cumsum(widths)])
    gaps = np.concatenate([gaps, 1.0 - gaps[1:]])
    dark = np.max(np.exp(-((v[:, None] - gaps[None, :]) / 0.006) ** 2), axis=1)
    rgb = np.array([0.93, 0.90, 0.82])[None, :] * (1 - 0.55 * dark[:, None])
    rgb = np.broadcast_to(rgb[:, None, :], (res, res, 3))
    return np.concatenate([rgb, np.full((res, res, 1), 0.5)], -1).astype(np.float32)


def paint_tongue(res: int, rng: np.random.Generator) -> np.ndarray:
    """Tongue texture ``[res, res, 4]``: pink with fine papillae."""
    papillae = rng.random((res, res, 1))
    rgb = np.array([0.78, 0.38, 0.40]) * (0.9 + 0.2 * papillae)
    return np.concatenate([np.clip(rgb, 0, 1), np.full((res, res, 1), 0.3)], -1).astype(np.float32)


def paint_textures(grid: HeadGrid, res: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All material textures, keyed by :data:`MATERIALS`; the skin at ``res``, the rest smaller."""
    hair_rgb = _HAIR[rng.integers(len(_HAIR))]
    skin = paint_skin(grid, res, rng, hair_rgb)
    gold = np.broadcast_to(np.array([0.95, 0.75, 0.30, 1.0], np.float32), (4, 4, 4)).copy()
    return dict(skin=skin, hair=paint_hair(max(32, res // 2), rng, hair_rgb),
                teeth=paint_teeth(max(16, res // 8)), tongue=paint_tongue(max(16, res // 8), rng), gold=gold)
