"""Kept for existing imports: the static 3DGS fit now lives in :mod:`headkit.fitting`.

Every public name this module defined is re-exported from there; new code imports
:mod:`headkit.fitting`.
"""

from headkit.fitting import densify as _densify
from headkit.fitting.densify import DEFAULT_DENSIFY, densify_and_prune
from headkit.fitting.params import DEFAULT_LRS, PARAM_NAMES, SH_C0
from headkit.fitting.run import fit_3dgs
from headkit.fitting.scene import (estimate_rigid, frame_head_poses, initial_points, knn_scales, scene_cameras,
                                   scene_scale_of)
from headkit.fitting.static import FitResult, evaluate_fit, fit_static_gaussians, render_frames

__all__ = ["DEFAULT_DENSIFY", "densify_and_prune", "DEFAULT_LRS", "PARAM_NAMES", "SH_C0", "fit_3dgs",
           "estimate_rigid", "frame_head_poses", "initial_points", "knn_scales", "scene_cameras", "scene_scale_of",
           "FitResult", "evaluate_fit", "fit_static_gaussians", "render_frames"]

_remap_optimizer = _densify.remap_optimizer  # imported here from headkit.gaussian_densify before
