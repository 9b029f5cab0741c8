"""Static 3D Gaussian splatting fit (3DGS, Kerbl et al. 2023) to a subject's frames.

:func:`fit_static_gaussians` optimises Gaussians initialised from given points against
frames seen by their (tracked) cameras, with the 3DGS recipe: Adam with per-attribute
learning rates, exponential decay of the position rate (:mod:`headkit.fitting.params`),
``(1 - l) L1 + l D-SSIM``, SH degree raised every 1000 steps, and, optionally, 3DGS's adaptive
density control (:mod:`headkit.fitting.densify`: clone / split by view-space gradient, prune
transparent or huge Gaussians, periodic opacity reset).

A talking head is not a static scene: with ``head_space=True`` (the default of
``scripts/fit_3dgs.py``) the cameras are expressed relative to the head and the points live in
head coordinates (:mod:`headkit.fitting.scene`); expressions and world-fixed lighting stay
unexplained, which bounds the reachable PSNR. With ``densify=False`` the Gaussians stay
one-to-one with the initial points (no clone, split or prune), as GraphAvatar's warm-up needs:
one pseudo Gaussian per template vertex.

The steps of a fit, each usable on its own: :func:`fit_datasets`, :func:`check_fit_options`,
:func:`~headkit.fitting.params.initial_parameters`, :func:`~headkit.fitting.params.make_optimizer`,
then per step :class:`FrameOrder` (which frames), :func:`fit_step` (render, loss, Adam),
:class:`~headkit.fitting.densify.DensityControl` and :class:`FitLog`; finally
:meth:`FitResult.from_parameters` and :func:`evaluate_fit`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from headkit.data.dataset import FrameDataset
from headkit.data.subject import Subject
from headkit.engine.guards import check_finite
from headkit.fitting.densify import DEFAULT_DENSIFY, DensityControl
from headkit.fitting.params import DEFAULT_LRS, initial_parameters, make_optimizer, merge_options, position_lr
from headkit.fitting.scene import scene_cameras, scene_scale_of
from headkit.losses import composite_over_background, photometric_loss
from headkit.metrics import compute_image_metrics, psnr
from headkit.progress import progress
from headkit.render.gaussians import rasterize_gaussians

__all__ = ["FitResult", "fit_static_gaussians", "fit_datasets", "check_fit_options", "FrameOrder", "FitState",
           "fit_step", "FitLog", "render_parameters", "image_targets", "render_frames",
           "evaluate_fit"]


@dataclass
class FitResult:
    """Fitted Gaussians as activated tensors, the training curve and held-out metrics.

    ``means [N, 3]``, ``quats [N, 4]`` (wxyz, unit), ``scales [N, 3]`` (linear),
    ``opacities [N]`` in (0, 1), ``sh [N, K, 3]`` coefficients (``K = (sh_degree + 1)^2``;
    colour ``= max(SH(d) + 0.5, 0)``). ``history`` holds ``(step, loss, psnr)`` averaged over
    each logging window; ``eval_metrics`` the held-out PSNR/SSIM/L2 (empty without test
    frames). Coordinates are the head frame when ``head_space`` is true, else the world.
    """

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    sh: Tensor
    sh_degree: int
    head_space: bool
    scene_scale: float
    history: list[tuple[int, float, float]] = field(default_factory=list)
    eval_metrics: dict = field(default_factory=dict)
    train_seconds: float = 0.0

    @property
    def num_gaussians(self) -> int:
        """Number of Gaussians ``N``."""
        return int(self.means.shape[0])

    def render(self, viewmats: Tensor, Ks: Tensor, width: int, height: int,  # [C, 4, 4], [C, 3, 3]
               background=(1.0, 1.0, 1.0), backend: str = "auto") -> tuple[Tensor, Tensor]:
        """Render ``colors [C, H, W, 3]`` and ``alphas [C, H, W, 1]`` (no gradient)."""
        with torch.no_grad():
            bgs = torch.as_tensor(background, dtype=self.means.dtype, device=self.means.device)
            colors, _, alphas, _ = rasterize_gaussians(
                self.means, self.quats, self.scales, self.opacities, self.sh,
                viewmats.to(self.means), Ks.to(self.means), width, height,
                sh_degree=self.sh_degree, backgrounds=bgs.expand(len(viewmats), 3), backend=backend)
        return colors, alphas

    @classmethod
    def from_parameters(cls, params: dict[str, Tensor], sh_degree: int, head_space: bool, scene_scale: float,
                        history: list[tuple[int, float, float]], train_seconds: float) -> FitResult:
        """Activated, detached copies of a fit's raw parameters (:mod:`headkit.fitting.params`)."""
        return cls(
            means=params["means"].detach(), quats=nn.functional.normalize(params["quats"].detach(), dim=-1),
            scales=params["log_scales"].detach().exp(), opacities=torch.sigmoid(params["opacity_logits"].detach()),
            sh=torch.cat([params["sh_dc"], params["sh_rest"]], 1).detach(), sh_degree=sh_degree,
            head_space=head_space, scene_scale=float(scene_scale), history=history, train_seconds=train_seconds)


def fit_static_gaussians(
    data: Subject | FrameDataset,
    init_means: Tensor,  # [N, 3] in head coordinates when head_space, else world
    *,
    init_colors: Optional[Tensor] = None,  # [N, 3] in [0, 1]
    steps: int = 3000, sh_degree: int = 3, sh_increase_every: int = 1000, lrs: Optional[dict] = None,
    lambda_dssim: float = 0.2, background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    use_mask: bool = True, head_space: bool = True,
    densify: bool = False, densify_options: Optional[dict] = None,
    batch_size: int = 1, scene_scale: Optional[float] = None, init_opacity: float = 0.1,
    eval_data: Optional[FrameDataset] = None, eval_lpips: bool = False,
    device: str | torch.device = "cpu", seed: int = 0,
    log_every: int = 100, callback: Optional[Callable[[int, dict], None]] = None, logger=None,
    show_progress: bool = True, backend: str = "auto",
) -> FitResult:
    """Fit 3D Gaussians to a subject's frames treated as a static scene (module docstring).

    Args:
        data: a :class:`Subject` (fit on its train split, evaluate on its test split) or a
            :class:`FrameDataset` (evaluated on ``eval_data``, or on the subject's test split
            when it is a train split).
        init_means: one Gaussian per point; ``init_colors`` sets the SH DC term
            (``(c - 0.5) / C0``), default 0.5 grey. Scales start at :func:`~.scene.knn_scales`,
            opacities at ``init_opacity``, rotations at identity, higher SH at 0.
        steps, sh_degree, sh_increase_every: optimiser steps; the active SH degree is
            ``min(sh_degree, (step - 1) // sh_increase_every)`` (3DGS raises it every 1000).
        lrs: overrides of :data:`DEFAULT_LRS` (means rates are multiplied by the scene scale).
        lambda_dssim: loss ``(1 - l) L1 + l (1 - SSIM)`` (SSIM zero-padded, as 3DGS trains).
        background: render background; with ``use_mask`` the target is
            ``image * mask + background * (1 - mask)``, else the image as is.
        head_space: cameras relative to the head (:func:`scene_cameras`).
        densify, densify_options: 3DGS density control (overrides of :data:`DEFAULT_DENSIFY`),
            run while ``step < min(stop, steps // 2)``; off keeps the Gaussians one-to-one
            with ``init_means``.
        batch_size: frames per step (random order, every frame once per epoch).
        scene_scale: default :func:`scene_scale_of` over the training cameras.
        eval_data, eval_lpips: held-out frames scored at the end into ``eval_metrics``.
        callback: ``callback(step, scalars)`` at each log; ``logger``: a
            :class:`~headkit.engine.RunLogger` receiving ``train/*`` scalars.
    """
    train, eval_data = fit_datasets(data, eval_data)
    lrs, dopts = check_fit_options(init_means, init_colors, lrs=lrs, densify_options=densify_options,
                                   steps=steps, sh_degree=sh_degree, sh_increase_every=sh_increase_every,
                                   batch_size=batch_size, log_every=log_every, init_opacity=init_opacity)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)  # frame order and split children
    viewmats, Ks = scene_cameras(train.subject, head_space)
    if scene_scale is None:
        scene_scale = scene_scale_of(viewmats[torch.from_numpy(train.frame_ids)], init_means.float().cpu())
    params = initial_parameters(init_means, init_colors, sh_degree, init_opacity, device)
    state = FitState(train, viewmats, Ks, params, make_optimizer(params, lrs, scene_scale), device,
                     torch.tensor(background, dtype=torch.float32, device=device), use_mask, lambda_dssim, backend)
    density = DensityControl(dopts, steps, len(init_means), scene_scale, gen, device) if densify else None
    order = FrameOrder(len(train), gen)
    log = FitLog(steps, log_every, callback=callback, logger=logger, show_progress=show_progress)
    start_time = time.perf_counter()
    for step in log.bar:
        state.optimizer.param_groups[0]["lr"] = position_lr(step, steps, lrs, scene_scale)
        active = min(sh_degree, (step - 1) // sh_increase_every)
        loss, psnr_value, info = fit_step(state, order.take(batch_size), step, active, keep_means2d_grad=densify)
        log.record(loss, psnr_value)
        if density is not None:
            state.params = density.step(step, state.optimizer, state.params, info, train.subject.width,
                                        train.subject.height)
        log.flush(step, len(state.params["means"]), active, state.optimizer.param_groups[0]["lr"])
    result = FitResult.from_parameters(state.params, sh_degree, head_space, scene_scale, log.history,
                                       time.perf_counter() - start_time)
    if eval_data is not None:
        result.eval_metrics = evaluate_fit(result, eval_data, background=background, use_mask=use_mask,
                                           with_lpips=eval_lpips, backend=backend)
    return result


def fit_datasets(data: Subject | FrameDataset,
                 eval_data: Optional[FrameDataset]) -> tuple[FrameDataset, Optional[FrameDataset]]:
    """The frames a fit trains on (a :class:`Subject`'s train split, or ``data`` itself) and
    those it is scored on: ``eval_data``, else the subject's test split when training on its
    train split, else none."""
    train = FrameDataset(data, "train") if isinstance(data, Subject) else data
    if eval_data is None and train.split == "train":
        eval_data = FrameDataset(train.subject, "test")
    return train, eval_data


def check_fit_options(init_means: Tensor, init_colors: Optional[Tensor], *, lrs: Optional[dict],
                      densify_options: Optional[dict], steps: int, sh_degree: int, sh_increase_every: int,
                      batch_size: int, log_every: int, init_opacity: float) -> tuple[dict, dict]:
    """Check :func:`fit_static_gaussians`'s arguments (errors name them); returns the learning
    rates and density-control options merged over their defaults."""
    lrs = merge_options("lrs", DEFAULT_LRS, lrs)
    dopts = merge_options("densify_options", DEFAULT_DENSIFY, densify_options)
    if not 0 <= sh_degree <= 3:
        raise ValueError(f"sh_degree must be 0..3, got {sh_degree}")
    if steps < 1 or batch_size < 1 or log_every < 1:
        raise ValueError(f"steps, batch_size and log_every must be >= 1, got {steps}, {batch_size}, {log_every}")
    if init_means.ndim != 2 or init_means.shape[1] != 3 or len(init_means) == 0:
        raise ValueError(f"init_means must be [N, 3] with N > 0, got {list(init_means.shape)}")
    if init_colors is not None and tuple(init_colors.shape) != (len(init_means), 3):
        raise ValueError(f"init_colors must be [N, 3] = [{len(init_means)}, 3], got {list(init_colors.shape)}")
    if sh_increase_every < 1 or not 0 < init_opacity < 1:
        raise ValueError(f"need sh_increase_every >= 1 and 0 < init_opacity < 1, got "
                         f"{sh_increase_every}, {init_opacity}")
    return lrs, dopts


class FrameOrder:
    """Which frames each step trains on: dataset positions in random order, every position once
    per epoch (a fresh permutation from ``generator`` is appended when fewer than a batch remain)."""

    def __init__(self, num_frames: int, generator: torch.Generator) -> None:
        self.num_frames, self.generator = num_frames, generator
        self.order = torch.empty(0, dtype=torch.long)

    def take(self, batch_size: int) -> Tensor:
        """The next ``batch_size`` positions ``[B]``."""
        if len(self.order) < batch_size:
            self.order = torch.cat([self.order, torch.randperm(self.num_frames, generator=self.generator)])
        positions, self.order = self.order[:batch_size], self.order[batch_size:]
        return positions


@dataclass
class FitState:
    """What the steps of one fit share: the training frames and every frame's scene camera,
    the raw parameters (replaced when density control changes their number), the optimiser,
    and the fit's rendering and loss settings."""

    train: FrameDataset
    viewmats: Tensor  # [T, 4, 4] of every frame of the subject (CPU), see scene_cameras
    Ks: Tensor  # [T, 3, 3]
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Adam
    device: torch.device
    background: Tensor  # [3] on the device
    use_mask: bool = True
    lambda_dssim: float = 0.2
    backend: str = "auto"


def fit_step(state: FitState, positions: Tensor, step: int, sh_degree: int,
             keep_means2d_grad: bool = False) -> tuple[float, float, dict]:
    """One optimiser step on the frames at dataset ``positions [B]``: render with SH up to
    ``sh_degree``, 3DGS's ``(1 - λ) L1 + λ D-SSIM`` (:func:`headkit.losses.photometric_loss`,
    checked finite), backward, Adam.

    Returns the loss, the PSNR of the clamped renders and the rasterizer's ``info``
    (``info["means2d"].grad`` kept when ``keep_means2d_grad``, for density control).
    """
    batch = state.train.batch(positions.numpy(), state.device)
    targets = image_targets(batch, state.background, state.use_mask)
    frames = batch["index"].cpu()
    subject = state.train.subject
    renders, info = render_parameters(state.params, state.viewmats[frames].to(state.device),
                                      state.Ks[frames].to(state.device), subject.width, subject.height,
                                      sh_degree, state.background, state.backend)
    if keep_means2d_grad:
        info["means2d"].retain_grad()
    l1, ds = photometric_loss(renders, targets, 1 - state.lambda_dssim, state.lambda_dssim)
    loss = l1 + ds
    check_finite({"loss": loss}, step)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    with torch.no_grad():
        return loss.item(), psnr(renders.clamp(0, 1), targets).mean().item(), info


def render_parameters(params: dict[str, Tensor], viewmats: Tensor, Ks: Tensor,  # [C, 4, 4], [C, 3, 3]
                      width: int, height: int, sh_degree: int, background: Tensor,  # [3]
                      backend: str = "auto") -> tuple[Tensor, dict]:
    """Render raw parameters (activated here): ``colors [C, H, W, 3]`` and the rasterizer's
    ``info`` (``means2d``, ``radii``, ...), differentiable."""
    sh = torch.cat([params["sh_dc"], params["sh_rest"]], 1)
    renders, _, _, info = rasterize_gaussians(
        params["means"], params["quats"], params["log_scales"].exp(),
        torch.sigmoid(params["opacity_logits"]), sh, viewmats, Ks, width, height, sh_degree=sh_degree,
        backgrounds=background.expand(len(viewmats), 3), backend=backend)
    return renders, info


def image_targets(batch: dict, background: Tensor, use_mask: bool) -> Tensor:  # -> [B, H, W, 3]
    """The image, composited over ``background`` by the mask when ``use_mask``."""
    if not use_mask:
        return batch["image"]
    return composite_over_background(batch["image"], batch["mask"], background)


class FitLog:
    """The training curve: the ``(step, loss, psnr)`` means of each window of ``log_every``
    steps (and of the last step) go to ``history``, the progress bar, ``logger`` (``train/*``
    scalars) and ``callback(step, scalars)``. Iterate over ``bar`` for the steps ``1..steps``."""

    def __init__(self, steps: int, log_every: int, *, callback: Optional[Callable[[int, dict], None]] = None,
                 logger=None, show_progress: bool = True) -> None:
        self.steps, self.log_every, self.callback, self.logger = steps, log_every, callback, logger
        self.bar = progress(range(1, steps + 1), desc="fit 3dgs", enabled=None if show_progress else False)
        self.history: list[tuple[int, float, float]] = []
        self.window: list[tuple[float, float]] = []

    def record(self, loss: float, psnr_value: float) -> None:
        """One step's loss and PSNR."""
        self.window.append((loss, psnr_value))

    def flush(self, step: int, num_gaussians: int, sh_degree: int, lr_means: float) -> None:
        """At the end of a window (``step % log_every == 0`` or the last step), report its means
        with the given state; otherwise nothing."""
        if step % self.log_every != 0 and step != self.steps:
            return
        mean_loss, mean_psnr = (float(np.mean(v)) for v in zip(*self.window))
        self.window = []
        self.history.append((step, mean_loss, mean_psnr))
        scalars = {"loss": mean_loss, "psnr": mean_psnr, "num_gaussians": num_gaussians,
                   "sh_degree": sh_degree, "lr_means": lr_means}
        if hasattr(self.bar, "set_postfix"):
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", psnr=f"{mean_psnr:.2f}", n=num_gaussians)
        if self.logger is not None:
            self.logger.scalars(scalars, step, prefix="train/")
        if self.callback is not None:
            self.callback(step, scalars)


def render_frames(result: FitResult, dataset: FrameDataset, positions, *,
                  background=(1.0, 1.0, 1.0), use_mask: bool = True,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Render the fitted Gaussians for ``dataset`` items at ``positions``; returns
    ``(renders [B, H, W, 3], targets [B, H, W, 3])`` on the Gaussians' device."""
    device = result.means.device
    viewmats, Ks = scene_cameras(dataset.subject, result.head_space)
    batch = dataset.batch(np.asarray(positions), device)
    frames = batch["index"].cpu()
    renders, _ = result.render(viewmats[frames], Ks[frames], dataset.subject.width,
                               dataset.subject.height, background=background, backend=backend)
    bg = torch.tensor(background, dtype=torch.float32, device=device)
    return renders.clamp(0.0, 1.0), image_targets(batch, bg, use_mask)


def evaluate_fit(result: FitResult, dataset: FrameDataset, *, background=(1.0, 1.0, 1.0),
                 use_mask: bool = True, batch_size: int = 8, with_lpips: bool = False,
                 backend: str = "auto") -> dict:
    """Mean PSNR/SSIM/L2 (+ LPIPS when asked and available) over every frame of ``dataset``."""
    totals, count = {}, 0
    for start in range(0, len(dataset), batch_size):
        positions = np.arange(start, min(start + batch_size, len(dataset)))
        renders, targets = render_frames(result, dataset, positions, background=background,
                                         use_mask=use_mask, backend=backend)
        metrics = compute_image_metrics(renders, targets, with_lpips=with_lpips)
        for key, value in metrics.items():
            if isinstance(value, float):
                totals[key] = totals.get(key, 0.0) + value * len(positions)
            else:
                totals.setdefault(key, value)
        count += len(positions)
    out = {k: (v / count if isinstance(v, float) else v) for k, v in totals.items()}
    out["num_frames"] = count
    return out
