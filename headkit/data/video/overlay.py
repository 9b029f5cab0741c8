"""Drawing the tracked mesh over frames, for the contact sheet a person checks."""

from __future__ import annotations

import numpy as np


def draw_wireframe(image: np.ndarray,  # [H, W, 3] uint8
                   pixels: np.ndarray,  # [V, 2] (u, v), pixel centres at +0.5
                   edges: np.ndarray,  # [E, 2] vertex indices
                   points: np.ndarray | None = None,  # [P, 2] extra landmarks drawn as dots
                   colour: tuple[int, int, int] = (60, 255, 60),
                   point_colour: tuple[int, int, int] = (255, 60, 60),
                   opacity: float = 0.6) -> np.ndarray:
    """Return a copy of ``image`` with the mesh edges drawn as 1-px lines blended at ``opacity``,
    and ``points`` as small dots."""
    from PIL import Image, ImageDraw

    base = Image.fromarray(np.ascontiguousarray(image))
    layer = base.copy()
    draw = ImageDraw.Draw(layer)
    xy = pixels - 0.5  # PIL draws pixel (i, j) at integer coordinates (j, i)
    for a, b in edges:
        draw.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=1)
    if points is not None:
        for x, y in points - 0.5:
            draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=point_colour)
    return np.asarray(Image.blend(base, layer, opacity)).copy()


def tint_background(image: np.ndarray,  # [H, W, 3] uint8
                    mask: np.ndarray,  # [H, W] uint8, 255 = foreground
                    tint: tuple[int, int, int] = (40, 40, 160), strength: float = 0.6) -> np.ndarray:
    """Return ``image`` with the background (mask 0) blended towards ``tint``, to check masks."""
    alpha = strength * (1.0 - mask.astype(np.float32)[..., None] / 255.0)
    out = image.astype(np.float32) * (1.0 - alpha) + np.asarray(tint, np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
