"""Speed of ``headkit.render.rasterize_mesh`` (and ``interpolate``) on a ~10k-face mesh.

Usage (after ``pip install -e .``, or with ``PYTHONPATH=.`` from the repository root)::

    python benchmarks/bench_mesh_raster.py                 # print a markdown table
    python benchmarks/bench_mesh_raster.py --out benchmarks/mesh_raster.md

Times are medians over ``--runs`` repetitions after ``--warmup`` untimed ones; CUDA timings
synchronise before reading the clock. The mesh is a radially perturbed UV sphere (9800 faces)
seen from distance 2.6 with a 50° FoV, so it covers about 60% of the frame.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from headkit.cameras import camtoworld_to_viewmat, intrinsics_from_fov, look_at
from headkit.mesh import uv_sphere
from headkit.render import interpolate, rasterize_mesh


def make_scene(batch: int, size: int, device: torch.device):
    """A bumpy ~10k-face sphere and ``batch`` cameras around it."""
    verts, faces = uv_sphere(50, 100)
    g = torch.Generator().manual_seed(0)
    verts = verts * (1.0 + 0.05 * torch.rand(len(verts), 1, generator=g))
    angles = torch.linspace(0.0, 1.2, batch)
    eyes = torch.stack([2.6 * torch.sin(angles), 0.3 * torch.ones(batch), 2.6 * torch.cos(angles)], -1)
    viewmats = camtoworld_to_viewmat(look_at(eyes, torch.zeros(batch, 3)))
    Ks = intrinsics_from_fov(50.0, size, size).expand(batch, 3, 3)
    return verts.expand(batch, -1, -1).to(device), faces.to(device), viewmats.to(device), Ks.to(device)


def time_it(fn, device: torch.device, warmup: int, runs: int) -> tuple[float, float]:
    """Median wall time and median process CPU time of ``fn()``, in milliseconds.

    On a shared machine the wall time includes waiting for other processes; the process CPU
    time (summed over this process's threads) is the steadier measure of the work done.
    """
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append((time.perf_counter() - start) * 1e3)
        cpus.append((time.process_time() - start_cpu) * 1e3)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    """Run the benchmark on CPU (and CUDA when present) and print/write a markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=str, default=None, help="write the markdown report here")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for batch in args.batches:
            verts, faces, viewmats, Ks = make_scene(batch, args.size, device)
            raster = rasterize_mesh(verts, faces, viewmats, Ks, args.size, args.size)
            coverage = raster.mask.float().mean().item()
            t_raster = time_it(lambda: rasterize_mesh(verts, faces, viewmats, Ks, args.size, args.size),
                               device, args.warmup, args.runs)
            uvs = torch.rand(verts.shape[1], 2, device=device)
            t_interp = time_it(lambda: interpolate(uvs, faces, raster), device, args.warmup, args.runs)
            rows.append((device.type, batch, faces.shape[0], coverage, *t_raster, t_raster[0] / batch,
                         t_interp[0]))

    when = datetime.date.today().isoformat()
    cpu_note = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, " \
               f"{torch.get_num_threads()} threads, {os.cpu_count()} cores visible"
    if torch.cuda.is_available():
        cpu_note += f"; CUDA: {torch.cuda.get_device_name()}"
    lines = [
        f"# Mesh rasterizer speed ({when})",
        "",
        f"`python benchmarks/bench_mesh_raster.py` — {args.size}x{args.size}, median of {args.runs} "
        f"runs after {args.warmup} warm-up runs. Machine: {cpu_note}.",
        "",
        "| device | B | faces | coverage | rasterize wall (ms) | rasterize CPU time (ms) "
        "| wall per frame (ms) | interpolate uv wall (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dev, batch, nf, cov, tw, tc, tf, ti in rows:
        lines.append(f"| {dev} | {batch} | {nf} | {cov:.0%} | {tw:.1f} | {tc:.1f} | {tf:.1f} | {ti:.1f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(report)


if __name__ == "__main__":
    main()
