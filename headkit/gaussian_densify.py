"""Kept for existing imports: 3DGS's density control now lives in :mod:`headkit.fitting.densify`."""

from headkit.fitting import densify as _densify
from headkit.fitting.densify import DEFAULT_DENSIFY, densify_and_prune

__all__ = ["DEFAULT_DENSIFY", "densify_and_prune"]

_remap_optimizer = _densify.remap_optimizer
