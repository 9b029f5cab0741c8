"""Latency, FPS and FLOPs of neural caching's networks and execution modes (random weights).

    PYTHONPATH=. python benchmarks/bench_neuralcache.py [--size 128] [--threads 1] [--out FILE]

For each generator width setting: G (DNR+ with the texture sampling, as the paper times it
from the UV map on), DNR++, W (implicit warp) and the explicit warp, one frame at a time:
synchronised wall-clock median (``headkit.metrics.time_fn``) and the calling thread's CPU
time (min over repeats: robust to a shared machine), FLOPs by ``torch.utils.flop_counter``.
Then streams of frames through :mod:`neuralcache.scheduler`: G on every frame (one and two
workers), and 1x / 2x warp with the online schedule of Algorithm 1 on one and two workers
(``max_in_flight=1``: post a frame, wait for its image). UV rasterisation is excluded, as in
the paper. Devices: ``cuda:0, cuda:1`` when two GPUs exist, else two CPU worker threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date

import torch

from headkit.data.dataset import FrameDataset
from headkit.data.synthetic import generate_synthetic_subject
from headkit.metrics import time_fn
from neuralcache.evaluate import build_stream, network_flops, run_mode
from neuralcache.model import NeuralCache

WIDTHS = {"cpu default": (16, 32, 64, 128, 256), "synthetic experiment": (16, 32, 128, 256, 512),
          "paper (pix2pix)": (64, 128, 256, 512, 512)}


def cpu_ms(fn, repeats: int) -> float:
    """Minimum CPU time of the calling thread over ``repeats`` calls, in ms."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return 1e3 * best


def bench(name: str, channels, subject, device: str, devices: list[str], repeats: int, stream_repeats: int) -> dict:
    """Per-network and per-mode numbers for one width setting."""
    test = FrameDataset(subject, "test")
    out = {"name": name, "channels": list(channels)}
    nets = {}
    for variant in ("dnr_plus", "dnr_plus_plus", "explicit_warp", "ours"):
        torch.manual_seed(0)
        model = NeuralCache(subject, variant=variant, generator={"channels": list(channels)}).to(device).eval()
        nets[variant] = model
        frames, _, _ = build_stream(model, test, warmup=3)
        frame = frames[-1]
        worker = model.make_worker(device)
        key = "W" if model.warp is not None else ("G" if variant == "dnr_plus" else "DNR++")
        fn = (lambda: worker.warp(frame)) if model.warp is not None else (lambda: worker.cache(frame))
        worker.cache(frame)
        if variant == "explicit_warp":
            key = "ExWarp"
        flops = network_flops(model, frame, device)
        out[key] = {"wall_ms": time_fn(fn, repeats=repeats, warmup=3, device=device)["median_ms"],
                    "cpu_ms": cpu_ms(fn, repeats) if device == "cpu" else None,
                    "gflops": (flops.get("warp") or flops["generator"]) / 1e9}
        if variant in ("dnr_plus", "ours"):
            out[f"streams_{variant}"] = frames
    modes = []
    g_frames, w_frames = out.pop("streams_dnr_plus"), out.pop("streams_ours")
    for n in (1, 2):
        _, fps, stream_ms = run_mode(nets["dnr_plus"], g_frames, 0, "cache_first", devices[:n], stream_repeats, None)
        modes.append({"mode": "DNR+ (G every frame)", "workers": n, "fps": fps, "stream_ms": stream_ms})
    for k in (1, 2):
        for n in (1, 2):
            _, fps, stream_ms = run_mode(nets["ours"], w_frames, k, "algorithm1", devices[:n], stream_repeats, 1)
            modes.append({"mode": f"Ours ({k}x warp)", "workers": n, "fps": fps, "stream_ms": stream_ms})
    out["modes"] = modes
    return out


def markdown(results: list[dict], args, devices: list[str]) -> str:
    """The benchmark report."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    lines = [f"## {date.today()}, {args.size}x{args.size}, {torch.get_num_threads()} intra-op thread(s), "
             f"devices {devices}", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"load average {', '.join(f'{x:.1f}' for x in load)} at the end.", "",
             "| widths | channels | G ms (wall / cpu) | W ms (wall / cpu) | W/G (wall / cpu) | ExWarp ms | "
             "DNR++ ms | G GFLOP | W GFLOP | W/G FLOPs |", "|" + "---|" * 10]
    for r in results:
        G, W, E, P = r["G"], r["W"], r["ExWarp"], r["DNR++"]
        cpu = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
        ratio_cpu = "n/a" if G["cpu_ms"] is None else f"{W['cpu_ms'] / G['cpu_ms']:.2f}"
        lines.append(f"| {r['name']} | {r['channels']} | {G['wall_ms']:.1f} / {cpu(G['cpu_ms'])} | "
                     f"{W['wall_ms']:.1f} / {cpu(W['cpu_ms'])} | {W['wall_ms'] / G['wall_ms']:.2f} / {ratio_cpu} | "
                     f"{E['wall_ms']:.1f} | {P['wall_ms']:.1f} | {G['gflops']:.3f} | {W['gflops']:.3f} | "
                     f"{W['gflops'] / G['gflops']:.2f} |")
    lines += ["", "Streams (FPS = frames / wall time, median of repeats; stream ms = median per-frame "
              "input-to-image time inside the stream):", "",
              "| widths | mode | workers | FPS | stream ms |", "|---|---|---|---|---|"]
    for r in results:
        for m in r["modes"]:
            lines.append(f"| {r['name']} | {m['mode']} | {m['workers']} | {m['fps']:.1f} | {m['stream_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark and print (or append to ``--out``) the markdown report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--stream-repeats", type=int, default=3)
    p.add_argument("--frames", type=int, default=24, help="test frames per stream")
    p.add_argument("--widths", nargs="*", default=list(WIDTHS), help=f"subset of {list(WIDTHS)}")
    p.add_argument("--out", help="append the markdown report to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    devices = ([f"cuda:{i}" for i in range(2)] if torch.cuda.device_count() >= 2 else [device, device])
    subject = generate_synthetic_subject(num_frames=args.frames + 8, num_test=args.frames, width=args.size,
                                         height=args.size, num_vertices_target=1500, supersample=1,
                                         texture_resolution=128)
    results = [bench(w, WIDTHS[w], subject, device, devices, args.repeats, args.stream_repeats) for w in args.widths]
    text = markdown(results, args, devices)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
