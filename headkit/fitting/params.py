"""The raw parameters of a 3DGS fit and their optimiser (the 3DGS recipe).

Raw parameters: ``means [N, 3]``, ``log_scales [N, 3]``, ``quats [N, 4]`` (wxyz, unnormalised),
``opacity_logits [N]``, ``sh_dc [N, 1, 3]``, ``sh_rest [N, K - 1, 3]``. Adam runs one group per
parameter (named after it) with 3DGS's per-attribute rates; the position rate is multiplied by
the scene scale and decays log-linearly over the run (:func:`position_lr`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from headkit.encodings import num_sh_bases
from headkit.fitting.densify import logit
from headkit.fitting.scene import knn_scales

__all__ = ["SH_C0", "DEFAULT_LRS", "PARAM_NAMES", "merge_options", "initial_parameters", "make_optimizer",
           "position_lr"]

SH_C0 = 0.28209479177387814
# The 3DGS defaults (arguments/__init__.py). "means" is multiplied by the scene scale and
# decays exponentially to "means_final" (also scaled) over the run.
DEFAULT_LRS = {"means": 1.6e-4, "means_final": 1.6e-6, "sh_dc": 2.5e-3, "sh_rest": 2.5e-3 / 20,
               "opacities": 0.05, "scales": 5e-3, "quats": 1e-3}
PARAM_NAMES = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest")
_LR_KEY = {"means": "means", "log_scales": "scales", "quats": "quats",
           "opacity_logits": "opacities", "sh_dc": "sh_dc", "sh_rest": "sh_rest"}
# log-decayed rates and periods/counts that must not be zero
_POSITIVE = {"means", "means_final", "every", "reset_opacity_every", "split_count"}


def merge_options(name: str, defaults: dict, overrides: Optional[dict]) -> dict:
    """``defaults`` updated with ``overrides``; unknown keys and values that are not
    non-negative numbers (or are zero where :data:`_POSITIVE` forbids it) are errors naming
    ``name.key``."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise KeyError(f"{name}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    merged = {**defaults, **overrides}
    bad = {f"{name}.{k}": v for k, v in merged.items() if isinstance(v, bool)
           or not isinstance(v, (int, float)) or v < 0 or (v == 0 and k in _POSITIVE)}
    if bad:
        raise ValueError(f"invalid value(s) {bad}: need non-negative numbers, and > 0 for {sorted(_POSITIVE)}")
    return merged


def initial_parameters(init_means: Tensor, init_colors: Optional[Tensor], sh_degree: int,
                       init_opacity: float, device: torch.device) -> dict[str, nn.Parameter]:
    """Raw parameters of one Gaussian per point of ``init_means [N, 3]``.

    Scales start at :func:`~headkit.fitting.scene.knn_scales`, opacities at ``init_opacity``,
    rotations at identity, the SH DC term at ``(c - 0.5) / C0`` for ``init_colors [N, 3]``
    (default 0.5 grey), higher SH at 0. The caller's tensors are never aliased.
    """
    N, K = len(init_means), num_sh_bases(sh_degree)
    means0 = init_means.detach().float().to(device).clone()  # never alias the caller's tensor
    colors0 = torch.full((N, 3), 0.5) if init_colors is None else init_colors.detach().float().cpu()
    raw = {"means": means0,
           "log_scales": torch.log(knn_scales(means0))[:, None].repeat(1, 3),
           "quats": torch.tensor([1.0, 0.0, 0.0, 0.0], device=device).repeat(N, 1),
           "opacity_logits": logit(torch.full((N,), float(init_opacity), device=device)),
           "sh_dc": ((colors0.to(device) - 0.5) / SH_C0)[:, None, :],
           "sh_rest": torch.zeros(N, K - 1, 3, device=device)}
    return {k: nn.Parameter(v.contiguous()) for k, v in raw.items()}


def make_optimizer(params: dict[str, nn.Parameter], lrs: dict, scene_scale: float) -> torch.optim.Adam:
    """Adam (``eps=1e-15``), one group per parameter named after it, at the :data:`DEFAULT_LRS`
    keys of ``lrs``; the position rate times ``scene_scale``. Group 0 is ``means``."""
    lr_of = {n: lrs[_LR_KEY[n]] * (scene_scale if n == "means" else 1.0) for n in PARAM_NAMES}
    return torch.optim.Adam([{"params": [params[n]], "lr": lr_of[n], "name": n} for n in PARAM_NAMES],
                            eps=1e-15)


def position_lr(step: int, steps: int, lrs: dict, scene_scale: float) -> float:
    """Position rate at ``step`` (1-based) of ``steps``: log-linear from ``lrs["means"]`` at the
    first step to ``lrs["means_final"]`` at the last, both times ``scene_scale``."""
    t = (step - 1) / max(steps - 1, 1)
    return math.exp((1 - t) * math.log(lrs["means"] * scene_scale) + t * math.log(lrs["means_final"] * scene_scale))
