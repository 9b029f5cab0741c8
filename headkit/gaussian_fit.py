"""Static 3D Gaussian splatting fit (3DGS, Kerbl et al. 2023) to a subject's frames.

:func:`fit_static_gaussians` optimises Gaussians initialised from given points against
frames seen by their (tracked) cameras, with the 3DGS recipe: Adam with per-attribute
learning rates, exponential decay of the position rate, ``(1 - l) L1 + l D-SSIM``, SH degree
raised every 1000 steps, and, optionally, 3DGS's adaptive density control
(:func:`densify_and_prune`: clone / split by view-space gradient, prune transparent or huge
Gaussians, periodic opacity reset).

A talking head is not a static scene: the head moves in front of the camera. What is
static is the head in its own coordinate frame, so with ``head_space=True`` (the default
of ``scripts/fit_3dgs.py``) every frame's camera is re-expressed relative to the head,
``viewmat_head = viewmat @ head_pose`` (head-to-camera), and the points live in head
coordinates (the template vertices). Head poses come from ``subject.head_poses`` or, when
the source has none, from a rigid Kabsch fit of the template to the frame's tracked
vertices (:func:`estimate_rigid`); expressions and world-fixed lighting stay unexplained,
which bounds the reachable PSNR. With ``densify=False`` the Gaussians stay one-to-one with
the initial points (no clone, split or prune), as GraphAvatar's warm-up needs: one pseudo
Gaussian per template vertex.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from headkit.cameras import camtoworld_to_viewmat, invert_rigid, transform_points
from headkit.data.dataset import FrameDataset
from headkit.data.subject import Subject
from headkit.encodings import num_sh_bases
from headkit.engine.guards import check_finite
from headkit.gaussian_densify import DEFAULT_DENSIFY, _remap_optimizer, densify_and_prune
from headkit.progress import progress
from headkit.metrics import compute_image_metrics, dssim, psnr
from headkit.render.gaussians import rasterize_gaussians

SH_C0 = 0.28209479177387814
# The 3DGS defaults (arguments/__init__.py). "means" is multiplied by the scene scale and
# decays exponentially to "means_final" (also scaled) over the run.
DEFAULT_LRS = {"means": 1.6e-4, "means_final": 1.6e-6, "sh_dc": 2.5e-3, "sh_rest": 2.5e-3 / 20,
               "opacities": 0.05, "scales": 5e-3, "quats": 1e-3}
PARAM_NAMES = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest")
_LR_KEY = {"means": "means", "log_scales": "scales", "quats": "quats",
           "opacity_logits": "opacities", "sh_dc": "sh_dc", "sh_rest": "sh_rest"}


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


def knn_scales(points: Tensor, k: int = 3, chunk: Optional[int] = None) -> Tensor:  # [N, 3]
    """Initial isotropic scale per point, ``sqrt(mean_j d_j^2)`` over its ``k`` nearest
    neighbours, with ``d^2`` clamped at 1e-7 (3DGS's ``distCUDA2``; a root-mean-square, i.e.
    the "mean distance" in the 3DGS sense). ``torch.cdist`` runs on ``chunk`` rows at a time
    (default: ``2^24 / N`` rows, a 64 MB block). With fewer than ``k + 1`` points, all the
    others are used. Returns ``[N]``.
    """
    N = points.shape[0]
    if N == 0:
        raise ValueError("knn_scales: no points")
    chunk = chunk or max(1, 2 ** 24 // N)
    k = min(k, N - 1)
    if k == 0:
        return torch.full((1,), math.sqrt(1e-7), dtype=points.dtype, device=points.device)
    out = []
    for start in range(0, N, chunk):
        d2 = torch.cdist(points[start:start + chunk], points).square()
        rows = torch.arange(start, min(start + chunk, N), device=points.device)
        d2[rows - start, rows] = float("inf")  # not its own neighbour
        out.append(d2.topk(k, dim=1, largest=False).values.mean(1))
    return torch.cat(out).clamp_min(1e-7).sqrt()


def estimate_rigid(sources: Tensor, targets: Tensor) -> Tensor:  # [V, 3], [..., V, 3]
    """Least-squares rigid transforms ``[..., 4, 4]`` mapping ``sources`` onto ``targets``
    (Kabsch: SVD of the centred cross-covariance, reflection removed), in float64."""
    src = sources.double()
    dst = targets.double()
    src_c, dst_c = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    H = (src - src_c).transpose(-1, -2) @ (dst - dst_c)  # [..., 3, 3]
    U, _, Vh = torch.linalg.svd(H)
    det = torch.linalg.det(Vh.transpose(-1, -2) @ U.transpose(-1, -2))
    d = torch.where(det < 0, -1.0, 1.0).to(det)
    D = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    R = Vh.transpose(-1, -2) @ D @ U.transpose(-1, -2)
    t = dst_c[..., 0, :] - (R @ src_c[..., 0, :, None])[..., 0]
    out = torch.zeros(R.shape[:-2] + (4, 4), dtype=torch.float64, device=R.device)
    out[..., :3, :3], out[..., :3, 3], out[..., 3, 3] = R, t, 1.0
    return out.to(targets.dtype)


def frame_head_poses(subject: Subject) -> Tensor:
    """Head-to-world ``[T, 4, 4]``: ``subject.head_poses``, or Kabsch template -> tracked vertices."""
    if subject.head_poses is not None:
        return torch.from_numpy(np.asarray(subject.head_poses, np.float32))
    return estimate_rigid(torch.from_numpy(subject.template_vertices).float(),
                          torch.from_numpy(subject.vertices).float())


def scene_cameras(subject: Subject, head_space: bool) -> tuple[Tensor, Tensor]:
    """Per-frame ``viewmats [T, 4, 4]`` and ``Ks [T, 3, 3]`` of the static scene.

    ``head_space=True``: ``viewmat @ head_pose`` (head coordinates to camera); else the
    tracked world-to-camera matrices.
    """
    viewmats = camtoworld_to_viewmat(torch.from_numpy(subject.camtoworlds).double())
    if head_space:
        viewmats = viewmats @ frame_head_poses(subject).double()
    return viewmats.float(), torch.from_numpy(np.asarray(subject.Ks, np.float32))


def initial_points(subject: Subject, head_space: bool, init_frame: Optional[int] = None) -> Tensor:
    """Points ``[V, 3]`` to start from, one per mesh vertex.

    ``init_frame=None``: the template vertices (head frame), posed by the first train
    frame's head pose when ``head_space`` is false. ``init_frame=t``: frame ``t``'s tracked
    vertices (its expression included), brought into the head frame when ``head_space``.
    """
    if init_frame is None:
        points = torch.from_numpy(subject.template_vertices).float()
        if not head_space:
            points = transform_points(points, frame_head_poses(subject)[int(subject.train_ids[0])])
        return points
    if not -subject.num_frames <= init_frame < subject.num_frames:
        raise IndexError(f"init_frame={init_frame} but subject '{subject.name}' has "
                         f"{subject.num_frames} frames")
    points = torch.from_numpy(subject.vertices[init_frame]).float()
    if head_space:
        points = transform_points(points, invert_rigid(frame_head_poses(subject)[init_frame]))
    return points


def scene_scale_of(viewmats: Tensor, points: Tensor) -> float:  # [C, 4, 4], [N, 3]
    """3DGS's scene extent: 1.1 x the largest distance of a camera centre from their mean.

    When the cameras (nearly) coincide (extent below 1 % of their distance to the points, e.g.
    a fixed camera in world space) the points' extent is used instead: 1.1 x the largest
    distance of a point from their centroid.
    """
    centres = invert_rigid(viewmats.double())[:, :3, 3]
    extent = 1.1 * (centres - centres.mean(0)).norm(dim=-1).max().item()
    distance = (centres.mean(0) - points.double().mean(0)).norm().item()
    if extent < 0.01 * distance or extent == 0.0:
        extent = 1.1 * (points.double() - points.double().mean(0)).norm(dim=-1).max().item()
    return max(extent, 1e-6)


def _logit(x: Tensor) -> Tensor:
    return torch.log(x) - torch.log1p(-x)


def fit_static_gaussians(
    data: Subject | FrameDataset,
    init_means: Tensor,  # [N, 3] in head coordinates when head_space, else world
    *,
    init_colors: Optional[Tensor] = None,  # [N, 3] in [0, 1]
    steps: int = 3000,
    sh_degree: int = 3,
    sh_increase_every: int = 1000,
    lrs: Optional[dict] = None,
    lambda_dssim: float = 0.2,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    use_mask: bool = True,
    head_space: bool = True,
    densify: bool = False,
    densify_options: Optional[dict] = None,
    batch_size: int = 1,
    scene_scale: Optional[float] = None,
    init_opacity: float = 0.1,
    eval_data: Optional[FrameDataset] = None,
    eval_lpips: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    log_every: int = 100,
    callback: Optional[Callable[[int, dict], None]] = None,
    logger=None,
    show_progress: bool = True,
    backend: str = "auto",
) -> FitResult:
    """Fit 3D Gaussians to a subject's frames treated as a static scene (module docstring).

    Args:
        data: a :class:`Subject` (fit on its train split, evaluate on its test split) or a
            :class:`FrameDataset` (evaluated on ``eval_data``, or on the subject's test split
            when it is a train split).
        init_means: one Gaussian per point; ``init_colors`` sets the SH DC term
            (``(c - 0.5) / C0``), default 0.5 grey. Scales start at :func:`knn_scales`,
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
    train = FrameDataset(data, "train") if isinstance(data, Subject) else data
    subject = train.subject
    if eval_data is None and train.split == "train":
        eval_data = FrameDataset(subject, "test")
    lrs = _merge("lrs", DEFAULT_LRS, lrs)
    dopts = _merge("densify_options", DEFAULT_DENSIFY, densify_options)
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
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    all_viewmats, all_Ks = scene_cameras(subject, head_space)
    ids = torch.from_numpy(train.frame_ids)
    if scene_scale is None:
        scene_scale = scene_scale_of(all_viewmats[ids], init_means.float().cpu())
    N, K = len(init_means), num_sh_bases(sh_degree)
    means0 = init_means.detach().float().to(device).clone()  # never alias the caller's tensor
    colors0 = torch.full((N, 3), 0.5) if init_colors is None else init_colors.detach().float().cpu()
    raw = {"means": means0,
           "log_scales": torch.log(knn_scales(means0))[:, None].repeat(1, 3),
           "quats": torch.tensor([1.0, 0.0, 0.0, 0.0], device=device).repeat(N, 1),
           "opacity_logits": _logit(torch.full((N,), float(init_opacity), device=device)),
           "sh_dc": ((colors0.to(device) - 0.5) / SH_C0)[:, None, :],
           "sh_rest": torch.zeros(N, K - 1, 3, device=device)}
    params = {k: nn.Parameter(v.contiguous()) for k, v in raw.items()}
    lr_of = {n: lrs[_LR_KEY[n]] * (scene_scale if n == "means" else 1.0) for n in PARAM_NAMES}
    optimizer = torch.optim.Adam([{"params": [params[n]], "lr": lr_of[n], "name": n} for n in PARAM_NAMES],
                                 eps=1e-15)
    bg = torch.tensor(background, dtype=torch.float32, device=device)
    W, H = subject.width, subject.height
    # As in 3DGS (15k of 30k steps) density control stays in the first half of the run, so the
    # run never ends shortly after an opacity reset (which makes every Gaussian nearly clear).
    densify_stop = min(dopts["stop"], steps // 2)
    grad_accum = torch.zeros(N, device=device)
    grad_count = torch.zeros(N, device=device)
    max_radii = torch.zeros(N, device=device)
    history, window, order = [], [], torch.empty(0, dtype=torch.long)
    start_time = time.perf_counter()
    bar = progress(range(1, steps + 1), desc="fit 3dgs", enabled=None if show_progress else False)
    for step in bar:
        t = (step - 1) / max(steps - 1, 1)
        optimizer.param_groups[0]["lr"] = math.exp(  # log-linear decay of the position rate
            (1 - t) * math.log(lr_of["means"]) + t * math.log(lrs["means_final"] * scene_scale))
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(train), generator=gen)])
        positions, order = order[:batch_size], order[batch_size:]
        batch = train.batch(positions.numpy(), device)
        targets = _targets(batch, bg, use_mask)
        frames = batch["index"].cpu()
        viewmats, Ks = all_viewmats[frames].to(device), all_Ks[frames].to(device)
        active = min(sh_degree, (step - 1) // sh_increase_every)
        sh = torch.cat([params["sh_dc"], params["sh_rest"]], 1)
        renders, _, _, info = rasterize_gaussians(
            params["means"], params["quats"], params["log_scales"].exp(),
            torch.sigmoid(params["opacity_logits"]), sh, viewmats, Ks, W, H, sh_degree=active,
            backgrounds=bg.expand(len(frames), 3), backend=backend)
        if densify:
            info["means2d"].retain_grad()
        l1 = (renders - targets).abs().mean()
        loss = (1 - lambda_dssim) * l1 + lambda_dssim * dssim(renders, targets, border="same").mean()
        check_finite({"loss": loss}, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            window.append((loss.item(), psnr(renders.clamp(0, 1), targets).mean().item()))
            if densify and step < densify_stop:
                # NDC-scaled per-view gradient norms (3DGS's viewspace gradient; x C undoes
                # the batch mean of the loss, as gsplat's DefaultStrategy does).
                g2d = info["means2d"].grad * torch.tensor([W / 2, H / 2], device=device) * len(frames)
                visible = (info["radii"] > 0).all(-1)  # [C, N]
                grad_accum += (g2d.norm(dim=-1) * visible).sum(0)
                grad_count += visible.sum(0)
                radii = info["radii"].max(-1).values.float() * visible
                max_radii = torch.maximum(max_radii, radii.max(0).values)
                if step > dopts["start"] and step % dopts["every"] == 0:
                    size_limit = dopts["max_screen_size"] if step > dopts["reset_opacity_every"] else None
                    new, sources, is_new, counts = densify_and_prune(
                        {k: v.detach() for k, v in params.items()}, grad_accum / grad_count,
                        max_radii, scene_scale=scene_scale, grad_threshold=dopts["grad_threshold"],
                        percent_dense=dopts["percent_dense"], min_opacity=dopts["min_opacity"],
                        max_screen_size=size_limit, split_count=int(dopts["split_count"]),
                        generator=gen)
                    params = _remap_optimizer(optimizer, new, sources, is_new)
                    n = counts["num_gaussians"]
                    grad_accum, grad_count, max_radii = (torch.zeros(n, device=device) for _ in range(3))
                if step % dopts["reset_opacity_every"] == 0:
                    capped = torch.clamp_max(torch.sigmoid(params["opacity_logits"]), 0.01)
                    params = _remap_optimizer(optimizer, {**params, "opacity_logits": _logit(capped)},
                                              torch.arange(len(capped), device=device),
                                              torch.ones(len(capped), dtype=torch.bool, device=device),
                                              only=("opacity_logits",))
        if step % log_every == 0 or step == steps:
            mean_loss, mean_psnr = (float(np.mean(v)) for v in zip(*window))
            window = []
            history.append((step, mean_loss, mean_psnr))
            scalars = {"loss": mean_loss, "psnr": mean_psnr, "num_gaussians": len(params["means"]),
                       "sh_degree": active, "lr_means": optimizer.param_groups[0]["lr"]}
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{mean_loss:.4f}", psnr=f"{mean_psnr:.2f}", n=len(params["means"]))
            if logger is not None:
                logger.scalars(scalars, step, prefix="train/")
            if callback is not None:
                callback(step, scalars)
    result = FitResult(
        means=params["means"].detach(), quats=nn.functional.normalize(params["quats"].detach(), dim=-1),
        scales=params["log_scales"].detach().exp(), opacities=torch.sigmoid(params["opacity_logits"].detach()),
        sh=torch.cat([params["sh_dc"], params["sh_rest"]], 1).detach(), sh_degree=sh_degree,
        head_space=head_space, scene_scale=float(scene_scale), history=history,
        train_seconds=time.perf_counter() - start_time)
    if eval_data is not None:
        result.eval_metrics = evaluate_fit(result, eval_data, background=background, use_mask=use_mask,
                                           with_lpips=eval_lpips, backend=backend)
    return result


# log-decayed rates and periods/counts that must not be zero
_POSITIVE = {"means", "means_final", "every", "reset_opacity_every", "split_count"}


def _merge(name: str, defaults: dict, overrides: Optional[dict]) -> dict:
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


def _targets(batch: dict, background: Tensor, use_mask: bool) -> Tensor:  # -> [B, H, W, 3]
    if not use_mask:
        return batch["image"]
    return batch["image"] * batch["mask"] + background * (1.0 - batch["mask"])


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
    return renders.clamp(0.0, 1.0), _targets(batch, bg, use_mask)


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


def fit_3dgs(cfg) -> dict:
    """``scripts/fit_3dgs.py``: fit the subject's train frames, write the run folder, return metrics.

    The run folder (``cfg.out``, else Hydra's ``outputs/fit_3dgs/<time>``; an existing run is
    never overwritten) receives ``config.yaml``, TensorBoard events and ``scalars.jsonl``,
    ``gaussians.ply`` (standard 3DGS layout; vertex normals when one-to-one with the mesh),
    ``render_vs_gt.png`` (first test frame: render | target) and ``metrics.json``.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from headkit.engine import (RunLogger, device_from_string, make_run_dir, save_config, save_image,
                                seed_everything, write_metrics)
    from headkit.mesh import vertex_normals
    from headkit.metrics import file_size_mb, time_fn
    from headkit.ply import save_ply

    seed_everything(int(cfg.seed))
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    device = device_from_string(cfg.device)
    root = cfg.out
    if not root:
        try:
            from hydra.core.hydra_config import HydraConfig
            root = HydraConfig.get().runtime.output_dir
        except ValueError:  # called outside @hydra.main
            root = f"{cfg.paths.output_dir}/{cfg.task_name}"
    run_dir = make_run_dir(root)
    save_config(run_dir, cfg)
    subject = instantiate(cfg.data, _convert_="all")
    points = initial_points(subject, bool(cfg.head_space), cfg.init_frame)
    plain = OmegaConf.to_container(cfg, resolve=True)
    background = tuple(float(c) for c in plain["background"])
    with RunLogger(run_dir) as logger:
        result = fit_static_gaussians(
            subject, points, steps=int(cfg.steps), sh_degree=int(cfg.sh_degree),
            sh_increase_every=int(cfg.sh_increase_every), lrs=plain["lrs"],
            lambda_dssim=float(cfg.lambda_dssim), background=background, use_mask=bool(cfg.use_mask),
            head_space=bool(cfg.head_space), densify=bool(cfg.densify),
            densify_options=plain["densify_options"], batch_size=int(cfg.batch_size),
            scene_scale=cfg.scene_scale, init_opacity=float(cfg.init_opacity),
            eval_lpips=bool(cfg.lpips), device=device, seed=int(cfg.seed),
            log_every=int(cfg.log_every), logger=logger, show_progress=bool(cfg.progress))
        test = FrameDataset(subject, "test")
        renders, targets = render_frames(result, test, [0], background=background, use_mask=bool(cfg.use_mask))
        side_by_side = torch.cat([renders[0], targets[0]], dim=1)  # [H, 2W, 3]: render | target
        save_image(run_dir / "render_vs_gt.png", side_by_side)
        logger.image("test/render_vs_gt", side_by_side, int(cfg.steps))
        logger.scalars({k: result.eval_metrics[k] for k in ("psnr", "ssim")}, int(cfg.steps), prefix="test/")
    normals = None
    if not cfg.densify:  # one Gaussian per vertex: the mesh normals are meaningful
        normals = vertex_normals(points, torch.from_numpy(subject.faces))
    ply = save_ply(run_dir / "gaussians.ply", result.means, result.quats, result.scales,
                   result.opacities, result.sh, normals)
    viewmats, Ks = scene_cameras(subject, result.head_space)
    frame = int(test.frame_ids[0])
    timing = time_fn(lambda: result.render(viewmats[frame:frame + 1], Ks[frame:frame + 1], subject.width,
                                           subject.height, background), repeats=5, warmup=1, device=device)
    metrics = {**result.eval_metrics, "time_per_frame_ms": timing["median_ms"],
               "fps": 1e3 / timing["median_ms"], "model_size_mb": file_size_mb(ply),
               "device": str(device), "config_name": str(cfg.task_name), "steps": int(cfg.steps),
               "num_gaussians": result.num_gaussians, "train_seconds": result.train_seconds,
               "final_train_psnr": result.history[-1][2], "scene_scale": result.scene_scale,
               "run_dir": str(run_dir)}
    write_metrics(run_dir, metrics)
    return metrics
