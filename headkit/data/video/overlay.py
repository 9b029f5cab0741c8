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


def shade_mesh(image: np.ndarray,  # [H, W, 3] uint8
               vertices: np.ndarray,  # [V, 3] camera space
               faces: np.ndarray,  # [F, 3]
               K: np.ndarray,  # [3, 3]
               colour: tuple[int, int, int] = (120, 230, 120), opacity: float = 0.55) -> np.ndarray:
    """Return ``image`` with the mesh rasterized over it, shaded by how squarely each triangle
    faces the camera, blended at ``opacity`` (so the fit and the frame show through each other)."""
    import torch

    from ...render.mesh_raster import rasterize_mesh

    H, W = image.shape[:2]
    v = torch.as_tensor(vertices, dtype=torch.float32)
    f = torch.as_tensor(faces, dtype=torch.int64)
    raster = rasterize_mesh(v[None], f, torch.eye(4)[None], torch.as_tensor(K, dtype=torch.float32)[None], W, H)
    ids = raster.face_ids[0].numpy()
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    views = tri.mean(1) / (np.linalg.norm(tri.mean(1), axis=1, keepdims=True) + 1e-12)
    light = np.abs((normals * views).sum(1)) ** 0.7  # [F]
    covered = ids >= 0
    shade = np.zeros((H, W, 1), np.float32)
    shade[covered, 0] = light[ids[covered]]
    alpha = opacity * covered[..., None]
    out = image.astype(np.float32) * (1 - alpha) + shade * np.asarray(colour, np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
