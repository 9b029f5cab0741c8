"""Renderers shared by both methods: the mesh rasterizer (face ids, barycentrics, depth) and
differentiable Gaussian splatting (gsplat on CUDA, the project's own C kernel on CPU, its torch code
anywhere)."""

from .gaussians import GaussianRasterizationError, gsplat_available, rasterize_gaussians
from .mesh_raster import MeshRaster, interpolate, rasterize_mesh

__all__ = ["GaussianRasterizationError", "MeshRaster", "gsplat_available", "interpolate",
           "rasterize_gaussians", "rasterize_mesh"]
