"""Forward+backward speed and peak memory of ``rasterize_gaussians`` on a head-like scene.

    python benchmarks/bench_gaussians.py                      # CPU: torch vs native, 1 and 2 threads
    python benchmarks/bench_gaussians.py --sizes 128 --counts 5000 --reps 7 --threads 1
    python benchmarks/bench_gaussians.py --device cuda --backends torch gsplat --threads 0
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_gaussians.py --dense   # shared CPUs

The scene: N Gaussians on and near a unit sphere (a head) seen from 3 units away, flat
discs tangent to the sphere with a log-normal spread of sizes, world scale shrinking as
1/sqrt(N) so that coverage (about 3 layers deep) is the same for every N; their footprint
is ~2 px sigma at 128^2. The default grid: N = 5000 (about what the default GraphAvatar
subject renders, 2.5k anchors and their kept neural children) and N = 20000 (an 11k-vertex
subject), at 128^2 and 256^2. The loss is a fixed random weighting of colour, depth and
alpha. Each timing is the median over ``--reps`` runs after one warm-up, as wall time and as
the process' CPU time (all threads; on a shared machine CPU time is the steadier number, and
with one thread it is what the wall time would be on an idle core). Peak memory: CUDA
``max_memory_allocated``; CPU the growth of the process' max RSS (``ru_maxrss``) during the
warm-up run, each configuration in a fresh process (so it includes the allocator's own
overhead but not an earlier configuration's high-water mark). With several backends, a
second table puts them side by side per scene and thread count (speed-up: the first
backend's time over each other's). ``--dense`` also times the dense reference of
``tests/gaussian_reference.py`` (every Gaussian against every pixel, forward+backward in
bands of rows to bound memory) for the speed ratio.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from headkit.render.gaussians import rasterize_gaussians  # noqa: E402


def head_scene(n: int, size: int, device: str = "cpu", seed: int = 0):
    """Random head-like scene: ``n`` Gaussians near a unit sphere, one camera, ``size^2``.

    Returns:
        ``(means, quats, scales, opacities, colors, viewmats, Ks)``.
    """
    g = torch.Generator().manual_seed(seed)
    normals = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = normals * (1.0 + 0.03 * torch.randn(n, 1, generator=g))
    # Quaternion taking +z to the normal, so the thin axis (z) is along the normal.
    z = torch.tensor([0.0, 0.0, 1.0])
    axes = torch.linalg.cross(z.expand_as(normals), normals)
    quats = torch.cat([1.0 + normals[:, 2:3], axes], dim=-1)
    quats = torch.where(quats[:, :1] < 1e-6, torch.tensor([0.0, 1.0, 0.0, 0.0]), quats)
    base = 0.04 * math.sqrt(5000.0 / n)
    scales = base * torch.exp(0.3 * torch.randn(n, 3, generator=g))
    scales[:, 2] *= 0.1
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    colors = torch.rand(n, 3, generator=g)
    viewmats = torch.eye(4)[None].clone()
    viewmats[0, 2, 3] = 3.0  # camera at z = -3 looking along +z at the sphere
    f = 1.2 * size
    Ks = torch.tensor([[[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]]])
    return tuple(t.to(device) for t in (means, quats, scales, opacities, colors, viewmats, Ks))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def time_fwd_bwd(render, inputs, weights, reps: int, device: str):
    """Medians of forward and forward+backward wall seconds and of forward+backward process
    CPU seconds (all threads; robust to other processes on a shared machine), and peak
    memory in MB, of ``render``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]

    def step(backward: bool) -> None:
        outs = render(*leaves)
        if backward:
            loss = sum((o * w).sum() for o, w in zip(outs, weights))
            loss.backward()
            for t in leaves:
                t.grad = None

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss0 = _max_rss_mb()
    step(True)  # warm-up, also the memory measurement
    _sync(device)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else _max_rss_mb() - rss0)
    fwd, both, cpu = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            step(False)
        _sync(device)
        t1, c1 = time.perf_counter(), time.process_time()
        step(True)
        _sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
        fwd.append(t1 - t0)
        both.append(t2 - t1)
        cpu.append(c2 - c1)
    return statistics.median(fwd), statistics.median(both), statistics.median(cpu), peak


def run_config(backend: str, size: int, n: int, reps: int, device: str,
               tile_size: int | None, threads: int | None) -> dict:
    """Time one configuration (meant to run in a fresh process, for a clean max RSS)."""
    if threads:
        torch.set_num_threads(threads)
    inputs = head_scene(n, size, device)
    g = torch.Generator().manual_seed(1)
    weights = [torch.rand(1, size, size, c, generator=g).to(device) for c in (3, 1, 1)]

    def render(*xs):
        return rasterize_gaussians(*xs, size, size, backend=backend, tile_size=tile_size)[:3]

    fwd, both, cpu, peak = time_fwd_bwd(render, inputs, weights, reps, device)
    return dict(backend=backend, size=size, n=n, fwd=fwd, fwd_bwd=both, cpu=cpu, peak_mb=peak)


def run_dense(size: int, n: int, reps: int, device: str, threads: int | None) -> dict:
    """Time forward+backward of the dense reference, band by band (bounded memory)."""
    if threads:
        torch.set_num_threads(threads)
    from tests.gaussian_reference import dense_render

    inputs = head_scene(n, size, device)
    g = torch.Generator().manual_seed(1)
    weights = [torch.rand(1, size, size, c, generator=g).to(device) for c in (3, 1, 1)]
    band = max(1, (1 << 21) // (n * size))  # rows per band: ~2M Gaussian-pixel pairs
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for y0 in range(0, size, band):  # the loss is a sum over pixels: band grads add up
            y1 = min(size, y0 + band)
            outs = dense_render(*leaves, size, size, rows=(y0, y1))
            sum((o * w[:, y0:y1]).sum() for o, w in zip(outs, weights)).backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return dict(backend="dense", size=size, n=n, fwd=float("nan"),
                fwd_bwd=statistics.median(times), cpu=statistics.median(cpu),
                peak_mb=float("nan"))


def side_by_side(rows: list[dict], backends: list[str]) -> list[str]:
    """Markdown lines: per scene and thread count, each backend's times and its speed-up over
    the first backend (forward+backward, wall and CPU time)."""
    base, others = backends[0], backends[1:]
    head = ["size", "N", "threads"] + [f"{b} fwd ms" for b in backends] \
        + [f"{b} fwd+bwd ms" for b in backends] \
        + [f"{b} speed-up (wall / CPU)" for b in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["size"], r["n"], r["threads"]) for r in rows if r["backend"] in backends})
    for key in keys:
        got = {r["backend"]: r for r in rows if (r["size"], r["n"], r["threads"]) == key}
        if not all(b in got for b in backends):
            continue
        cells = [str(k) for k in key] + [f"{1e3 * got[b]['fwd']:.1f}" for b in backends] \
            + [f"{1e3 * got[b]['fwd_bwd']:.1f}" for b in backends] \
            + [f"{got[base]['fwd_bwd'] / got[b]['fwd_bwd']:.2f}x / "
               f"{got[base]['cpu'] / got[b]['cpu']:.2f}x" for b in others]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> list[dict]:
    """Run the benchmark grid; print markdown tables and return their rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--counts", type=int, nargs="+", default=[5000, 20000])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", nargs="+", default=["torch", "native"])
    p.add_argument("--tile-size", type=int, default=None)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch.set_num_threads values to run (0: leave torch's default)")
    p.add_argument("--same-process", action="store_true",
                   help="no fresh process per configuration (faster; CPU peak memory unclean)")
    p.add_argument("--dense", action="store_true",
                   help="also time the dense reference at --dense-size / --dense-count")
    p.add_argument("--dense-size", type=int, default=128)
    p.add_argument("--dense-count", type=int, default=5000)
    p.add_argument("--dense-reps", type=int, default=1)
    args = p.parse_args(argv)

    def call(fn, *a):
        if args.same_process:
            return fn(*a)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, a)

    print(f"device={args.device} threads={args.threads} torch={torch.__version__} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} "
          f"loadavg={os.getloadavg()[0]:.1f}")
    print("| backend | size | N | threads | forward s | fwd+bwd s | fwd+bwd CPU s | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for threads in args.threads:
        for size in args.sizes:
            for n in args.counts:
                for backend in args.backends:
                    r = call(run_config, backend, size, n, args.reps, args.device, args.tile_size,
                             threads or None)
                    r["threads"] = threads or torch.get_num_threads()
                    rows.append(r)
                    print(f"| {backend} | {size} | {n} | {r['threads']} | {r['fwd']:.4f} | "
                          f"{r['fwd_bwd']:.4f} | {r['cpu']:.4f} | {r['peak_mb']:.0f} |", flush=True)
    if len(args.backends) > 1:
        print()
        print("\n".join(side_by_side(rows, args.backends)))
    if args.dense:
        size, n, threads = args.dense_size, args.dense_count, args.threads[0] or None
        r = call(run_dense, size, n, args.dense_reps, args.device, threads)
        rows.append(r)
        print(f"| dense reference | {size} | {n} | - | {r['fwd_bwd']:.3f} | {r['cpu']:.3f} | - |")
        for ours in [x for x in rows if x["backend"] != "dense" and x["size"] == size
                     and x["n"] == n and x["threads"] == (threads or torch.get_num_threads())]:
            print(f"speed-up of {ours['backend']} over dense at {size}^2, N={n}: "
                  f"{r['fwd_bwd'] / ours['fwd_bwd']:.0f}x wall, "
                  f"{r['cpu'] / ours['cpu']:.0f}x CPU time")
    print(f"loadavg at end={os.getloadavg()[0]:.1f}")
    return rows


if __name__ == "__main__":
    main()
