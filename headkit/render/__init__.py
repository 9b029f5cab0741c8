"""Renderers shared by both methods: the mesh rasterizer (face ids, barycentrics, depth)."""

from .mesh_raster import MeshRaster, interpolate, rasterize_mesh

__all__ = ["MeshRaster", "interpolate", "rasterize_mesh"]
