"""Drawing the tracked mesh and masks over frames, for the contact sheet a person checks."""

from __future__ import annotations

import numpy as np


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
