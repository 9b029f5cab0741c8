"""Fitting 3D Gaussians to a subject's frames treated as a static scene (3DGS).

* :mod:`~headkit.fitting.scene`: the static scene: head-space cameras, head poses (given or
  Kabsch-fitted), starting points, scene scale, initial Gaussian sizes;
* :mod:`~headkit.fitting.params`: the raw parameters and their Adam optimiser (3DGS's rates,
  the position-rate decay), option merging;
* :mod:`~headkit.fitting.densify`: 3DGS's adaptive density control (clone, split, prune,
  opacity reset) and the optimiser bookkeeping it needs;
* :mod:`~headkit.fitting.static`: :func:`fit_static_gaussians`, its steps, :class:`FitResult`
  and the held-out evaluation;
* :mod:`~headkit.fitting.run`: :func:`fit_3dgs`, the ``scripts/fit_3dgs.py`` run folder.

``headkit.gaussian_fit`` and ``headkit.gaussian_densify`` re-export these names for older imports.
"""

from headkit.fitting.densify import (DEFAULT_DENSIFY, DensityControl, densify_and_prune, logit, remap_optimizer,
                                     reset_opacity)
from headkit.fitting.params import (DEFAULT_LRS, PARAM_NAMES, SH_C0, initial_parameters, make_optimizer,
                                    merge_options, position_lr)
from headkit.fitting.run import fit_3dgs
from headkit.fitting.scene import (estimate_rigid, frame_head_poses, initial_points, knn_scales, scene_cameras,
                                   scene_scale_of)
from headkit.fitting.static import (FitLog, FitResult, FitState, FrameOrder, check_fit_options, evaluate_fit,
                                    fit_datasets, fit_static_gaussians, fit_step, image_targets, render_frames,
                                    render_parameters)

__all__ = ["DEFAULT_DENSIFY", "DensityControl", "densify_and_prune", "logit", "remap_optimizer", "reset_opacity",
           "DEFAULT_LRS", "PARAM_NAMES", "SH_C0", "initial_parameters", "make_optimizer", "merge_options",
           "position_lr", "fit_3dgs", "estimate_rigid", "frame_head_poses", "initial_points", "knn_scales",
           "scene_cameras", "scene_scale_of", "FitLog", "FitResult", "FitState", "FrameOrder", "check_fit_options",
           "evaluate_fit", "fit_datasets", "fit_static_gaussians", "fit_step", "image_targets",
           "render_frames", "render_parameters"]
