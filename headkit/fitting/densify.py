"""3DGS's adaptive density control (clone, split, prune) and the optimiser bookkeeping it needs.

Used by :func:`headkit.fitting.fit_static_gaussians` when ``densify=True`` (free scenes) through
:class:`DensityControl`; GraphAvatar's warm-up keeps the Gaussians one-to-one with the mesh and
never calls it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from headkit.cameras import quat_to_rotmat

__all__ = ["DEFAULT_DENSIFY", "densify_and_prune", "remap_optimizer", "reset_opacity", "DensityControl",
           "logit"]

# 3DGS's adaptive density control defaults; steps count from 1 like its iterations.
DEFAULT_DENSIFY = {"start": 500, "stop": 15000, "every": 100, "grad_threshold": 2e-4,
                   "percent_dense": 0.01, "min_opacity": 0.005, "reset_opacity_every": 3000,
                   "max_screen_size": 20.0, "split_count": 2}


def logit(x: Tensor) -> Tensor:
    """Inverse of the sigmoid, ``log(x) - log(1 - x)`` (raw opacities from activated ones)."""
    return torch.log(x) - torch.log1p(-x)


def densify_and_prune(
    params: dict[str, Tensor],  # raw, see below
    grads: Tensor,  # [N] mean view-space (NDC) gradient norm since the last densification
    max_radii: Tensor,  # [N] largest screen radius (pixels) since then
    *,
    scene_scale: float,
    grad_threshold: float = 2e-4,
    percent_dense: float = 0.01,
    min_opacity: float = 0.005,
    max_screen_size: Optional[float] = None,
    split_count: int = 2,
    generator: Optional[torch.Generator] = None,
) -> tuple[dict[str, Tensor], Tensor, Tensor, dict[str, int]]:
    """3DGS's adaptive density control on raw parameters (``densify_and_prune``).

    ``params``: ``means [N, 3]``, ``log_scales [N, 3]``, ``quats [N, 4]``,
    ``opacity_logits [N]``, ``sh_dc [N, 1, 3]``, ``sh_rest [N, K - 1, 3]``.

    * clone: ``grad >= grad_threshold`` and ``max scale <= percent_dense * scene_scale``:
      an exact copy is appended;
    * split: ``grad >= grad_threshold`` and ``max scale > percent_dense * scene_scale``:
      ``split_count`` children with means sampled from the parent's Gaussian
      (``mu + R (s * eps)``, ``eps ~ N(0, I)``) and scales ``s / (0.8 split_count)``
      replace the parent;
    * prune: ``opacity < min_opacity`` and, when ``max_screen_size`` is given, also
      ``max_radii > max_screen_size`` or ``max scale > 0.1 scene_scale``.

    Clones and split children are never pruned in the same call. Returns the new
    parameters, ``sources [M]`` (the row each output row was copied from), ``is_new [M]``
    (rows that did not exist before: their optimiser state starts at zero) and counts.
    """
    grads = torch.nan_to_num(grads, nan=0.0)
    max_scales = params["log_scales"].exp().max(-1).values
    big = max_scales > percent_dense * scene_scale
    clone = (grads >= grad_threshold) & ~big
    split = (grads >= grad_threshold) & big
    prune = torch.sigmoid(params["opacity_logits"]) < min_opacity
    if max_screen_size is not None:
        prune |= (max_radii > max_screen_size) | (max_scales > 0.1 * scene_scale)
    keep = ~prune & ~split
    N = grads.shape[0]
    rows = torch.arange(N, device=grads.device)
    split_rows = rows[split].repeat(split_count)
    sources = torch.cat([rows[keep], rows[clone], split_rows])
    out = {name: value[sources] for name, value in params.items()}
    n_old = int(keep.sum()) + int(clone.sum())
    if len(split_rows):
        stds = params["log_scales"][split_rows].exp()
        # drawn on the CPU so one CPU generator serves every device
        eps = torch.randn(stds.shape, generator=generator, dtype=stds.dtype).to(stds.device)
        offsets = (quat_to_rotmat(params["quats"][split_rows]) @ (stds * eps)[..., None])[..., 0]
        out["means"][n_old:] = params["means"][split_rows] + offsets
        out["log_scales"][n_old:] = params["log_scales"][split_rows] - math.log(0.8 * split_count)
    is_new = torch.ones(len(sources), dtype=torch.bool, device=grads.device)
    is_new[: int(keep.sum())] = False
    counts = {"cloned": int(clone.sum()), "split": int(split.sum()),
              "pruned": int((prune & ~split).sum()), "num_gaussians": int(len(sources))}
    return out, sources, is_new, counts


def remap_optimizer(optimizer: torch.optim.Adam, params: dict[str, Tensor], sources: Tensor,
                     is_new: Tensor, only: Optional[tuple[str, ...]] = None) -> dict[str, nn.Parameter]:
    """Swap the groups' tensors (all, or those named in ``only``) for ``params``; Adam
    moments follow their source row and start at zero for new rows."""
    new_params = {}
    for group in optimizer.param_groups:
        name = group["name"]
        old = group["params"][0]
        if only is not None and name not in only:
            new_params[name] = old
            continue
        new = nn.Parameter(params[name].detach().clone())
        state = optimizer.state.pop(old, None)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                moments = state[key][sources]
                moments[is_new] = 0.0
                state[key] = moments
            optimizer.state[new] = state
        group["params"] = [new]
        new_params[name] = new
    return new_params


def reset_opacity(optimizer: torch.optim.Adam, params: dict[str, Tensor]) -> dict[str, nn.Parameter]:
    """3DGS's periodic opacity reset: every opacity capped at 0.01, its Adam moments restarted
    at zero (3DGS's ``replace_tensor_to_optimizer``); the other parameters are untouched."""
    capped = torch.clamp_max(torch.sigmoid(params["opacity_logits"]), 0.01)
    rows = torch.arange(len(capped), device=capped.device)
    restart = torch.ones(len(capped), dtype=torch.bool, device=capped.device)
    return remap_optimizer(optimizer, {**params, "opacity_logits": logit(capped)}, rows, restart,
                           only=("opacity_logits",))


class DensityControl:
    """3DGS's density control over a run: view-space gradient statistics, periodic
    :func:`densify_and_prune` and opacity resets.

    ``options`` are :data:`DEFAULT_DENSIFY` keys. As in 3DGS (15k of 30k steps) it acts only
    while ``step < min(stop, steps // 2)``, so the run never ends shortly after an opacity
    reset (which makes every Gaussian nearly clear). ``generator`` draws the split children.
    """

    def __init__(self, options: dict, steps: int, num_gaussians: int, scene_scale: float,
                 generator: Optional[torch.Generator], device: torch.device) -> None:
        self.options, self.scene_scale, self.generator = options, scene_scale, generator
        self.stop = min(options["stop"], steps // 2)
        self._reset_statistics(num_gaussians, device)

    def _reset_statistics(self, n: int, device: torch.device) -> None:
        self.grad_accum = torch.zeros(n, device=device)
        self.grad_count = torch.zeros(n, device=device)
        self.max_radii = torch.zeros(n, device=device)

    def active(self, step: int) -> bool:
        """Whether ``step`` still gathers statistics and may densify or reset."""
        return step < self.stop

    def accumulate(self, info: dict, width: int, height: int) -> None:
        """Add one step's NDC-scaled per-view gradient norms of ``info["means2d"]`` (3DGS's
        view-space gradient; x C undoes the batch mean of the loss, as gsplat's
        DefaultStrategy does) and screen radii of the Gaussians each view sees."""
        device, views = self.grad_accum.device, info["means2d"].shape[0]
        g2d = info["means2d"].grad * torch.tensor([width / 2, height / 2], device=device) * views
        visible = (info["radii"] > 0).all(-1)  # [C, N]
        self.grad_accum += (g2d.norm(dim=-1) * visible).sum(0)
        self.grad_count += visible.sum(0)
        radii = info["radii"].max(-1).values.float() * visible
        self.max_radii = torch.maximum(self.max_radii, radii.max(0).values)

    def densify(self, step: int, optimizer: torch.optim.Adam, params: dict[str, Tensor]) -> dict[str, nn.Parameter]:
        """Clone, split and prune by the statistics so far, then start new statistics."""
        o = self.options
        size_limit = o["max_screen_size"] if step > o["reset_opacity_every"] else None
        new, sources, is_new, counts = densify_and_prune(
            {k: v.detach() for k, v in params.items()}, self.grad_accum / self.grad_count,
            self.max_radii, scene_scale=self.scene_scale, grad_threshold=o["grad_threshold"],
            percent_dense=o["percent_dense"], min_opacity=o["min_opacity"],
            max_screen_size=size_limit, split_count=int(o["split_count"]), generator=self.generator)
        params = remap_optimizer(optimizer, new, sources, is_new)
        self._reset_statistics(counts["num_gaussians"], self.grad_accum.device)
        return params

    @torch.no_grad()
    def step(self, step: int, optimizer: torch.optim.Adam, params: dict[str, Tensor], info: dict,
             width: int, height: int) -> dict[str, nn.Parameter]:
        """After optimiser step ``step``: gather statistics, densify every ``every`` steps after
        ``start``, reset opacities every ``reset_opacity_every``; returns the parameters."""
        if not self.active(step):
            return params
        self.accumulate(info, width, height)
        o = self.options
        if step > o["start"] and step % o["every"] == 0:
            params = self.densify(step, optimizer, params)
        if step % o["reset_opacity_every"] == 0:
            params = reset_opacity(optimizer, params)
        return params
