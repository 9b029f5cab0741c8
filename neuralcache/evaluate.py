"""Evaluation of a neural-cache run: the paper's Table 1 / Table 2 / Fig. 11 on the test split.

Every row is produced by actually executing the mode it names through
:mod:`neuralcache.scheduler` on the test stream, and scored on what came out:

* ``DNR``, ``DNR+``, ``DNR++``: G on every frame (one worker); ``DNR+ (naive)`` shows G's image
  of frame ``t - 1`` for frame ``t`` (the delay of a slow generator without warping).
* ``ExWarp`` / ``Ours (kx warp)`` with ``n`` workers: the online schedule ``"algorithm1"``:
  every frame is warped, every ``k``-th frame is also cached. With one worker the warp
  distances are ``1..k``; with two, Algorithm 1 warps group ``j`` from the cache of group
  ``j - 1`` (distances ``k..2k-1``), so its quality can differ from one worker's; the
  ``distances`` column says which were used.

The stream is the test split preceded by a few frames of the video (their caches feed the
first test frames; they are not scored). Columns:

* ``latency_ms``: median synchronised time from a frame's inputs to its image for the network
  that emits it (G with the texture sampling, or W), one frame at a time after warm-up. UV
  rasterisation is excluded, as in the paper ("implementation dependent"), and so is the
  host-to-device copy: the frame is on the timed device before timing starts.
* ``fps``: frames per second of the executed stream (median of ``stream_repeats`` runs),
  including the caching work a warp mode does alongside.
* ``stream_ms``: median per-frame latency seen inside that stream (queueing included).

Devices: the stream is encoded on the model's device (:func:`model_device`: the frame
encoder's buffers live there, so a CPU batch would not even meet them on a GPU) and stays
there; workers on other devices copy what they need. The scored targets are kept on the CPU
for the metrics.

CPU note: with ``devices=["cpu", "cpu"]`` the two workers are threads of one process sharing
the machine's cores; each uses ``num_threads`` intra-op threads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from headkit.data.dataset import FrameDataset
from headkit.engine.evaluate import save_test_renders, side_by_side
from headkit.errors import InvalidConfigValue
from headkit.metrics import MetricUnavailable, l2, lpips, model_size_mb, psnr, ssim, time_fn
from headkit.plot import line_plot_svg
from headkit.progress import progress
from headkit.registry import choose
from neuralcache.scheduler import ParallelRenderer, SequentialRenderer
from neuralcache.warp import ImplicitWarp, count_flops

log = logging.getLogger(__name__)

__all__ = ["evaluate_neural_cache", "TABLE1_COLUMNS", "score", "build_stream", "model_device", "frame_on",
           "run_mode", "network_latencies", "network_flops", "warp_ablation_row", "Stream", "eval_devices",
           "EXTRA_ROWS", "naive_row", "generator_rows", "warp_rows", "quality_metrics", "cost_metrics", "warp_tables"]

TABLE1_COLUMNS = ["model", "workers", "l1", "psnr", "ssim", "latency_ms", "fps", "stream_ms", "distances"]
ONLINE_COLUMNS = ["model", "rate", "l1", "psnr", "ssim", "frames", "distances"]
DISTANCE_COLUMNS = ["model", "distance", "l1", "psnr", "ssim"]
#: Tables 3 and 4: which inputs and cached layers the implicit warp used, and its 1x-warp scores
WARP_ABLATION_COLUMNS = ["concat_uv", "use_pose", "use_camera", "use_mlp", "sh_pose", "sh_skips", "tex_sample", "exp",
                         "cached", "l1", "psnr", "ssim", "latency_ms", "rel_latency"]


@contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def score(images: list[torch.Tensor], targets: list[torch.Tensor]) -> dict[str, float]:
    """Mean L1, L2, PSNR and SSIM of ``[1, H, W, 3]`` images against their targets."""
    preds, gts = torch.cat(images).clamp(0, 1).float().cpu(), torch.cat(targets).float().cpu()
    return {"l1": (preds - gts).abs().mean().item(), "l2": l2(preds, gts).mean().item(),
            "psnr": psnr(preds, gts).mean().item(), "ssim": ssim(preds, gts).mean().item()}


def model_device(model) -> torch.device:
    """The device of ``model``'s parameters (and its frame encoder's buffers): where frame
    inputs must be built."""
    return next(model.parameters()).device


def frame_on(frame: dict, device: torch.device | str) -> dict:
    """A scheduler frame (``{"inputs", "prev"}``) with its inputs on ``device`` (no copy for
    inputs already there)."""
    return {**frame, "inputs": frame["inputs"].to(device), "prev": frame["prev"].to(device)}


@torch.no_grad()
def build_stream(model, dataset: FrameDataset, warmup: int,
                 device: torch.device | str | None = None) -> tuple[list[dict], list[int], list[torch.Tensor]]:
    """Encode the test stream: ``warmup`` video frames before the first test frame, then the
    test frames. Returns ``(scheduler frames, stream positions that are scored, targets)``.

    Batches are built, and encoded, on ``device`` (default :func:`model_device`, the one the
    encoder's buffers are on); frames and targets are on it too."""
    device = model_device(model) if device is None else torch.device(device)
    subject = dataset.subject
    first = int(dataset.frame_ids[0])
    ids = list(range(max(0, first - warmup), first)) + [int(f) for f in dataset.frame_ids]
    scored = list(range(len(ids) - len(dataset.frame_ids), len(ids)))
    everything = FrameDataset(subject, "all")
    batches = (model.frame_batch(everything, [f], device) for f in ids)
    frames = list(model.encode_stream(batches))
    targets = [frames[i]["inputs"].images for i in scored]
    return frames, scored, targets


def run_mode(model, frames: list[dict], k: int, schedule: str, devices: list[str], repeats: int,
         max_in_flight: int | None) -> tuple[list[torch.Tensor], float, float]:
    """Execute a mode; returns ``(outputs in order, median fps, median per-frame stream latency ms)``."""
    def make():
        if len(devices) == 1:
            return SequentialRenderer(devices[0], model.make_worker, warp_distance=k, schedule=schedule)
        return ParallelRenderer(devices, model.make_worker, warp_distance=k, schedule=schedule,
                                max_in_flight=max_in_flight)

    outputs, fps, lat = None, [], []
    for rep in range(repeats + 1):  # the first run warms up (allocations, thread start)
        with make() as renderer:
            start = time.perf_counter()
            got = [out.cpu() for _, out in renderer.run(frames)]
            elapsed = time.perf_counter() - start
            if rep == 0:
                outputs = got
            else:
                fps.append(len(frames) / elapsed)
                lat.append(1e3 * float(np.median(renderer.latencies_s)))
    if not fps:
        return outputs, math.nan, math.nan
    return outputs, float(np.median(fps)), float(np.median(lat))


def _distances(k: int, n: int, schedule: str) -> str:
    if schedule == "cache_first":
        return "0"
    lo, hi = (1, k) if n == 1 else (k, 2 * k - 1)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def network_latencies(model, frame: dict, device: str, repeats: int) -> dict[str, float]:
    """Synchronised median latency (ms) of G (texture sampling included) and W, one frame.
    The frame is moved to ``device`` before timing (host-to-device copies are not timed)."""
    worker = model.make_worker(device)
    frame = frame_on(frame, device)
    out = {"generator": time_fn(lambda: worker.cache(frame), repeats=repeats, warmup=3, device=device)["median_ms"]}
    if model.warp is not None:
        worker.cache(frame)
        out["warp"] = time_fn(lambda: worker.warp(frame), repeats=repeats, warmup=3, device=device)["median_ms"]
    return out


@torch.no_grad()
def network_flops(model, frame: dict, device: str) -> dict[str, int]:
    """FLOPs of G (on a texture sample) and W (``torch.utils.flop_counter``)."""
    inputs, prev = frame["inputs"].to(device), frame["prev"].to(device)
    textures = model.sample_texture(inputs)
    args = (textures, model.sample_texture(prev)) if model.spec.uses_previous_frame else (textures,)
    out = {"generator": count_flops(model.generator, *args)}
    if model.warp is not None:
        _, cache = model.make_cache(inputs)
        extra = {"textures": textures} if getattr(model.warp, "use_texture", False) else {}
        out["warp"] = count_flops(model.warp, cache, inputs.params, **extra)
    return out


@torch.no_grad()
def _warp_distance_ablation(model, frames, scored, targets, distances, device) -> list[dict]:
    """Quality when every scored frame is warped from the cache of the frame ``d`` before it."""
    caches = {}
    rows = []
    for d in distances:
        images, gts = [], []
        for pos, target in zip(scored, targets):
            src = pos - d
            if src < 0:
                continue
            if src not in caches:
                caches[src] = model.make_cache(frames[src]["inputs"].to(device))[1]
            images.append(model.warp_frame(caches[src], frames[pos]["inputs"].to(device)).cpu())
            gts.append(target)
        if images:
            rows.append({"model": model.spec.label, "distance": d, **score(images, gts), "frames": len(images),
                         "order": 10 * model.spec.table_order + d})
    return rows


def evaluate_neural_cache(model, dataset: FrameDataset, run_dir: str | Path, *, device=None,
                          with_lpips: bool = True, save_video: bool = True, save_images: bool = True,
                          timing_repeats: int = 20, lpips_weights: str | None = None,
                          show_progress: bool = True, warps=(1, 2), workers=(1, 2),
                          devices: list[str] | None = None, num_threads: int | None = 1,
                          stream_repeats: int = 3, max_in_flight: int | None = 1,
                          ablation_distances=(1, 2, 3, 4), online: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` (the test split); see the module docstring.

    Returns the run's ``metrics.json`` content: the generic keys (``psnr``, ``ssim``, ``l2``,
    ``lpips``, ``time_per_frame_ms``, ``fps``, model size, ...) for the variant's own mode
    (G for baselines; ``warp_distance`` x warp on one worker for warp variants), ``l1``, FLOPs
    and latencies of G and W, and ``tables``: ``{name: {"columns", "rows"}}`` with the
    Table-1-style rows, the online (Table-2-style) rows and the warp-distance ablation.
    Writes ``test_renders/``, ``test_side_by_side.mp4`` and ``warp_distance.svg``.
    """
    run_dir = Path(run_dir)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    devices = eval_devices(device, devices, workers)
    dev = str(device)
    model.eval()
    warmup = max(2 * max(warps) - 1, max(ablation_distances, default=1), 1)
    frames, scored, targets = build_stream(model, dataset, warmup)
    stream = Stream(frames, scored, [t.cpu() for t in targets])  # metrics and renders are CPU side
    with _threads(num_threads):
        latency = network_latencies(model, stream.frames[stream.scored[0]], dev, timing_repeats)
        flops = network_flops(model, stream.frames[stream.scored[0]], dev)
        if model.warp is None:
            rows, primary, own = generator_rows(model, stream, latency, dev, stream_repeats, max_in_flight)
        else:
            rows, primary, own = warp_rows(model, stream, latency, warps, workers, devices, dev, stream_repeats,
                                           max_in_flight, show_progress)
    metrics = quality_metrics(model, primary, stream.targets, with_lpips, lpips_weights)
    metrics.update(cost_metrics(model, own, latency, flops, len(stream.scored), num_threads,
                                devices[:max(workers)], device))
    tables = {"table1": {"title": f"Table 1 (offline, {dataset.subject.name} test frames)",
                         "columns": TABLE1_COLUMNS, "rows": rows}}
    tables.update(warp_tables(model, stream, metrics, latency, ablation_distances, online, dev,
                              dataset.subject.fps, run_dir))
    metrics["tables"] = tables
    _save_renders(run_dir, dataset, primary, stream.targets, save_images, save_video, metrics)
    return metrics


@dataclass
class Stream:
    """The encoded test stream (:func:`build_stream`): scheduler ``frames``, the stream positions
    that are ``scored`` and their ``targets``."""

    frames: list[dict]
    scored: list[int]
    targets: list[torch.Tensor]


def eval_devices(device: torch.device, devices: list[str] | None, workers) -> list[str]:
    """The workers' devices: ``devices``, else ``cuda:0..N-1`` with two or more GPUs, else the
    run device repeated; an error names the config keys when there are too few."""
    if devices is None:
        if device.type == "cuda" and torch.cuda.device_count() >= 2:
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        else:
            devices = [str(device)] * max(workers)
    if max(workers) > len(devices):
        raise InvalidConfigValue(f"model.evaluation.workers={list(workers)} needs {max(workers)} devices, "
                         f"model.evaluation.devices has {devices}")
    return devices


def naive_row(row: dict[str, Any], outs: list[torch.Tensor], stream: Stream) -> dict[str, Any]:
    """The naive baseline of a G-only mode ``row``: frame t shows G's image of frame t - 1."""
    naive = [outs[p - 1] for p in stream.scored]
    return {**row, "model": f"{row['model']} (naive)", **score(naive, stream.targets), "distances": "1 (shown late)",
            "order": row["order"] - 10}


#: rows a variant adds to a G-only mode's row (``Variant.extra_rows`` names), each
#: ``f(row, outputs of the stream, stream) -> row``; they come before that row
EXTRA_ROWS: dict[str, Callable[[dict, list, Stream], dict]] = {"naive": naive_row}


def generator_rows(model, stream: Stream, latency: dict[str, float], device: str, repeats: int,
                   max_in_flight: int | None) -> tuple[list[dict], list[torch.Tensor], dict]:
    """Table 1 for a baseline: G on every frame, one worker, plus the variant's
    :data:`EXTRA_ROWS`. Returns the rows, the scored outputs and the row of G's own mode."""
    outs, fps, stream_ms = run_mode(model, stream.frames, 0, "cache_first", [device], repeats, max_in_flight)
    row = {"model": model.spec.label, "workers": 1, "latency_ms": latency["generator"], "fps": fps,
           "stream_ms": stream_ms, "distances": "0", "order": 100 * model.spec.table_order + 50}
    rows = [choose(EXTRA_ROWS, name, f"VARIANTS[{model.variant!r}].extra_rows")(row, outs, stream)
            for name in model.spec.extra_rows]
    primary = [outs[p] for p in stream.scored]
    rows.append({**row, **score(primary, stream.targets)})
    return rows, primary, rows[-1]


def warp_rows(model, stream: Stream, latency: dict[str, float], warps, workers, devices: list[str], device: str,
              repeats: int, max_in_flight: int | None,
              show_progress: bool) -> tuple[list[dict], list[torch.Tensor], dict | None]:
    """Table 1 for a warp variant: the online schedule for each warp distance in ``warps`` and
    worker count in ``workers``. Returns the rows, the scored outputs of the model's own
    ``warp_distance`` on one worker (run separately when ``warps`` lacks it) and that mode's
    row (None when ``warps`` lacks it)."""
    rows, primary, own = [], None, None
    for k in progress(warps, desc="eval modes", enabled=None if show_progress else False):
        for n in workers:
            outs, fps, stream_ms = run_mode(model, stream.frames, k, "algorithm1", devices[:n], repeats,
                                            max_in_flight)
            images = [outs[p] for p in stream.scored]
            rows.append({"model": f"{model.spec.label} ({k}x warp)", "workers": n, **score(images, stream.targets),
                         "latency_ms": latency["warp"], "fps": fps, "stream_ms": stream_ms,
                         "distances": _distances(k, n, "algorithm1"), "warp": k,
                         "order": 100 * model.spec.table_order + 10 * k + n})
            if k == model.warp_distance and n == 1:
                primary, own = images, own or rows[-1]
    if primary is None:  # the run's own k is not among the evaluated warps
        outs, *_ = run_mode(model, stream.frames, model.warp_distance, "algorithm1", [device], 0, max_in_flight)
        primary = [outs[p] for p in stream.scored]
    return rows, primary, own


def quality_metrics(model, primary: list[torch.Tensor], targets: list[torch.Tensor], with_lpips: bool,
                    lpips_weights: str | None) -> dict[str, Any]:
    """The variant's name and the scores (and LPIPS, or why it is missing) of its own mode."""
    metrics: dict[str, Any] = {"variant": model.variant, **score(primary, targets), "lpips": None}
    if with_lpips:
        try:
            metrics["lpips"] = float(np.mean([lpips(p.clamp(0, 1), t, alexnet_path=lpips_weights).item()
                                              for p, t in zip(primary, targets)]))
        except MetricUnavailable as exc:
            metrics["lpips_unavailable_reason"] = exc.reason
    else:
        metrics["lpips_unavailable_reason"] = "disabled by eval.lpips=false"
    return metrics


def cost_metrics(model, own: dict | None, latency: dict[str, float], flops: dict[str, int], num_frames: int,
                 num_threads: int | None, devices: list[str], device: torch.device) -> dict[str, Any]:
    """Speed and size: the latency of the network of the variant's own mode and its stream FPS
    (from its Table 1 row ``own``; None without one), FLOPs and latencies of G (and W, with
    their ratios), the stored model's size and parameter count, the device."""
    own_latency = latency["warp"] if model.warp is not None else latency["generator"]
    out = {"time_per_frame_ms": own_latency, "fps": own["fps"] if own else None, "num_test_frames": num_frames,
           "flops_generator": flops["generator"], "latency_generator_ms": latency["generator"],
           "eval_threads": num_threads, "eval_devices": devices}
    if model.warp is not None:
        out.update({"flops_warp": flops["warp"], "latency_warp_ms": latency["warp"],
                    "warp_to_generator_latency": latency["warp"] / latency["generator"],
                    "warp_to_generator_flops": flops["warp"] / flops["generator"]})
    stored = model.stored_state_dict()
    out.update({"model_size_mb": model_size_mb(stored), "model_size_fp16_mb": model_size_mb(stored, dtype=torch.float16),
                "num_parameters": int(sum(t.numel() for t in stored.values() if t.is_floating_point())),
                "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")})
    return out


def warp_tables(model, stream: Stream, metrics: dict[str, Any], latency: dict[str, float], ablation_distances,
                online: bool, device: str, fps: float, run_dir: Path) -> dict[str, dict]:
    """The warp variants' tables: inputs/cached layers (Tables 3-4, :class:`ImplicitWarp` only),
    the warp-distance ablation (plotted to ``warp_distance.svg``, its path added to
    ``metrics``) and the online rows. Empty for baselines."""
    tables = {}
    if isinstance(model.warp, ImplicitWarp):
        scores = {k: metrics[k] for k in ("l1", "l2", "psnr", "ssim")}  # the primary (own warp distance, 1 worker)
        tables["warp_ablation"] = {"title": "Warp inputs and cached layers (Tables 3-4; 1x warp, 1 worker)",
                                   "columns": WARP_ABLATION_COLUMNS,
                                   "rows": [warp_ablation_row(model.warp, scores, latency)]}
    if model.warp is not None and ablation_distances:
        drows = _warp_distance_ablation(model, stream.frames, stream.scored, stream.targets,
                                        list(ablation_distances), device)
        tables["warp_distance"] = {"title": "Warp distance ablation (every test frame warped d frames ahead)",
                                   "columns": DISTANCE_COLUMNS, "rows": drows}
        if drows:
            xs = [r["distance"] for r in drows]
            line_plot_svg(run_dir / "warp_distance.svg", xs, {"PSNR (dB)": [r["psnr"] for r in drows]},
                          title=f"{model.spec.label}: PSNR vs warp distance", xlabel="warp distance (frames ahead)",
                          ylabel="PSNR (dB)")
            metrics["warp_distance_plot"] = str(run_dir / "warp_distance.svg")
    if model.warp is not None and online:
        tables["online"] = {"title": "Online (Table 2 style): 1x warp at half the frame rate vs 2x at the full rate",
                            "columns": ONLINE_COLUMNS, "rows": _online_rows(model, stream.frames, stream.scored,
                                                                           stream.targets, device, fps,
                                                                           model.spec.label)}
    return tables


def warp_ablation_row(warp: ImplicitWarp, scores: dict[str, float], latency: dict[str, float]) -> dict[str, Any]:
    """One row of the Table-3/4 ablation: the warp's input switches (``x`` = on, as the paper
    ticks them), its cached layers, its scores and latency (absolute and relative to G)."""
    used = warp.cond.used
    tick = lambda on: "x" if on else ""  # noqa: E731
    flags = {"concat_uv": warp.use_uv, "use_pose": used["poses"], "use_camera": used["cam_positions"],
             "use_mlp": warp.cond.mlp is not None, "sh_pose": used["pose_shs"], "sh_skips": warp.modulate_skips,
             "tex_sample": warp.use_texture, "exp": used["expressions"]}
    return {**{k: tick(v) for k, v in flags.items()}, "cached": "C" + ",".join(map(str, warp.cached_layers)),
            **scores, "latency_ms": latency["warp"], "rel_latency": latency["warp"] / latency["generator"],
            "order": sum(flags.values()) * 10 + len(warp.cached_layers)}


def _online_rows(model, frames, scored, targets, device, fps, label) -> list[dict]:
    """Table 2: a 1x-warp renderer that only keeps up with every other frame (so it warps two
    video frames ahead) vs a 2x-warp renderer processing every frame (warps 1 and 2 ahead).
    One worker each (the distances a renderer keeping pace would use); each scored on the
    test frames it processes."""
    rows = []
    first = scored[0]
    half = [i for i in range(len(frames)) if (i - first) % 2 == 0]
    for k, positions, rate in ((1, half, fps / 2), (2, list(range(len(frames))), fps)):
        outs, *_ = run_mode(model, [frames[i] for i in positions], k, "algorithm1", [device], 0, 1)
        by_pos = dict(zip(positions, outs))
        used = [(by_pos[p], t) for p, t in zip(scored, targets) if p in by_pos]
        rows.append({"model": f"{label} ({k}x warp)", "rate": f"{rate:g} fps", "order": 10 * model.spec.table_order + k,
                     **score([u[0] for u in used], [u[1] for u in used]), "frames": len(used),
                     "distances": "2" if k == 1 else "1-2"})
    return rows


def _save_renders(run_dir: Path, dataset: FrameDataset, images, targets, save_images: bool, save_video: bool,
                  metrics: dict) -> None:
    frames = [side_by_side(pred[0], gt[0]) for pred, gt in zip(images, targets)]
    metrics.update(save_test_renders(run_dir, dataset.frame_ids, frames, dataset.subject.fps,
                                     save_images=save_images, save_video=save_video))
    if not math.isfinite(metrics["psnr"]):
        log.warning("non-finite test PSNR")
