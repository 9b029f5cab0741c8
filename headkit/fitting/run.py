"""``scripts/fit_3dgs.py``: a static 3DGS fit of a subject written to a run folder."""

from __future__ import annotations

import torch

from headkit.data.dataset import FrameDataset
from headkit.fitting.scene import initial_points, scene_cameras
from headkit.fitting.static import fit_static_gaussians, render_frames

__all__ = ["fit_3dgs"]


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

    from headkit.engine.threads import ThreadPolicy

    seed_everything(int(cfg.seed))
    ThreadPolicy(cfg.num_threads, key="num_threads").start()  # auto: the free cores at the start
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
