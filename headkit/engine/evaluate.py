"""Paper-style evaluation of a trained method on the test split.

Image metrics (L2, PSNR, SSIM, LPIPS) are means over test frames; time per frame is the median
synchronised latency of rendering one frame from its tracked inputs after warm-up; model size is
what :meth:`Method.stored_state_dict` holds (networks only, not tracked data), in MB (2**20 bytes)
at the stored precision and at fp16. The timed frame is on the device before timing starts
(host-to-device copies are not timed). ``render_backend`` says which Gaussian-splatting backend
rendered and why (:func:`headkit.render.gaussians.auto_backend`), None for methods that
render no Gaussians.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headkit.data.dataset import FrameDataset
from headkit.data.image_io import to_uint8, write_image
from headkit.progress import progress
from headkit.render.gaussians import record_render_backends
from headkit.metrics import MetricUnavailable, l2, lpips, model_size_mb, psnr, ssim, time_fn

log = logging.getLogger(__name__)


def write_video(path: str | Path, frames: list[np.ndarray], fps: float) -> Path | None:
    """Write uint8 frames ``[H,W,3]`` as an H.264 MP4 (imageio-ffmpeg); returns None on failure."""
    import imageio.v2 as imageio

    path = Path(path)
    try:
        # even sizes for yuv420p; macro_block_size=1 keeps the frames unscaled
        frames = [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames]
        with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1) as w:
            for frame in frames:
                w.append_data(frame)
        return path
    except Exception as exc:  # a missing ffmpeg binary must not lose the metrics
        log.warning("could not write %s: %s", path, exc)
        return None


def side_by_side(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:  # [H, W, 3] each
    """``render | ground truth`` as one uint8 image ``[H, 2W, 3]`` (the render clamped to [0, 1])."""
    return to_uint8(torch.cat([pred.clamp(0, 1), target], dim=1).cpu().numpy())


def save_test_renders(run_dir: str | Path, frame_ids, frames: list[np.ndarray], fps: float, *,
                      save_images: bool = True, save_video: bool = True) -> dict[str, Any]:
    """Save the test split's :func:`side_by_side` ``frames``: ``run_dir/test_renders/NNNNN.png``
    (``NNNNN`` the frame id) when ``save_images``, and ``run_dir/test_side_by_side.mp4`` when
    ``save_video``. Returns ``{"video": path or None}`` when a video was asked for, else ``{}``."""
    run_dir = Path(run_dir)
    if save_images:
        for fid, frame in zip(frame_ids, frames):
            write_image(run_dir / "test_renders" / f"{int(fid):05d}.png", frame)
    if not (save_video and frames):
        return {}
    video = write_video(run_dir / "test_side_by_side.mp4", frames, fps=fps)
    return {"video": str(video) if video else None}


@torch.no_grad()
def evaluate_method(model, dataset: FrameDataset, run_dir: str | Path, *, device: torch.device | None = None,
                    save_images: bool = True, save_video: bool = True, with_lpips: bool = True,
                    timing_repeats: int = 20, timing_warmup: int = 5,
                    show_progress: bool = True, lpips_weights: str | None = None) -> dict[str, Any]:
    """Render every frame of ``dataset``, score it, time it, and save renders beside the truth.

    Writes ``run_dir/test_renders/NNNNN.png`` (render | ground truth) and
    ``run_dir/test_side_by_side.mp4``. Returns the metrics dict (LPIPS is ``None`` with
    ``lpips_unavailable_reason`` when its weights are missing, never 0; ``render_backend``:
    the Gaussian-splatting backend(s) that rendered, with the reason, e.g. ``"gsplat (CUDA)"``
    or ``"torch (no CUDA device)"``, None when no Gaussians were rendered).
    """
    run_dir = Path(run_dir)
    device = device or next(model.parameters()).device
    model.eval()
    per_frame: dict[str, list[float]] = {"l2": [], "psnr": [], "ssim": [], "lpips": []}
    lpips_reason = None if with_lpips else "disabled by eval.lpips=false"
    frames, frame_ids = [], []
    with record_render_backends() as backends:
        for pos in progress(range(len(dataset)), desc="eval", enabled=None if show_progress else False):
            batch = dataset.batch([pos], device)
            pred = model.render_eval(batch).clamp(0, 1)
            gt = model.target_image(batch)
            per_frame["l2"].append(l2(pred, gt).item())
            per_frame["psnr"].append(psnr(pred, gt).item())
            per_frame["ssim"].append(ssim(pred, gt).item())
            if lpips_reason is None:
                try:
                    per_frame["lpips"].append(lpips(pred, gt, alexnet_path=lpips_weights).item())
                except MetricUnavailable as exc:
                    lpips_reason = exc.reason
            frames.append(side_by_side(pred[0], gt[0]))
            frame_ids.append(int(batch["index"][0]))
        # The timed frame is on the device before time_fn: host-to-device copies are not timed
        # (time_fn synchronises after its warm-up, so no copy is still in flight either).
        batch = dataset.batch([0], device)
        timing = time_fn(lambda: model.render_eval(batch), repeats=timing_repeats, warmup=timing_warmup,
                         device=device)
    metrics: dict[str, Any] = {k: float(np.mean(v)) for k, v in per_frame.items() if k != "lpips"}
    metrics["lpips"] = float(np.mean(per_frame["lpips"])) if lpips_reason is None else None
    if lpips_reason is not None:
        metrics["lpips_unavailable_reason"] = lpips_reason
    metrics["num_test_frames"] = len(dataset)
    metrics["time_per_frame_ms"] = timing["median_ms"]
    metrics["fps"] = 1000.0 / timing["median_ms"]
    stored = model.stored_state_dict()
    metrics["model_size_mb"] = model_size_mb(stored)
    metrics["model_size_fp16_mb"] = model_size_mb(stored, dtype=torch.float16)
    metrics["num_parameters"] = int(sum(t.numel() for t in stored.values() if t.is_floating_point()))
    metrics["device"] = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    metrics["render_backend"] = ", ".join(backends) if backends else None
    metrics.update(save_test_renders(run_dir, frame_ids, frames, dataset.subject.fps, save_images=save_images,
                                     save_video=save_video))
    return metrics


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``rows`` restricted to ``columns`` (None shown as 'n/a')."""
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def format_report(metrics: dict[str, Any], columns: list[str]) -> str:
    """What the train and eval scripts print for a run: the one-row summary of ``columns``,
    each method-specific table of ``metrics["tables"]`` (e.g. the neural cache's Table 1),
    and why LPIPS is missing when it is."""
    parts = [format_table([metrics], columns)]
    for name, table in (metrics.get("tables") or {}).items():
        parts.append(f"\n{table.get('title', name)}\n{format_table(table['rows'], table['columns'])}")
    if metrics.get("lpips") is None and metrics.get("lpips_unavailable_reason"):
        parts.append(f"LPIPS unavailable: {metrics['lpips_unavailable_reason']}")
    return "\n".join(parts)
