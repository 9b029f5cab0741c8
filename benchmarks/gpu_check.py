"""The GPU path proven by one command: ``python benchmarks/gpu_check.py [--out benchmarks/gpu.md]``.

On one CUDA GPU, in about 8 minutes, it runs and reports:

1. the environment: torch, the GPU, which Gaussian backend ``auto`` picks and why;
2. gsplat's CUDA extension, built (JIT, in a background process) while the rest runs;
3. short training runs with evaluation on the GPU: GraphAvatar (``experiment=synthetic_subject``,
   torch splatting backend) and the neural-cache model (``experiment=neuralcache_synthetic``);
4. benchmark rows: Gaussian splatting forward+backward at 512x512 with 50k and 200k Gaussians
   (torch backend, and gsplat once built), the mesh rasterizer, generator and warp latency,
   one against two workers on the one GPU;
5. once gsplat is built: the ``cuda``-marked tests and the torch-against-gsplat image difference.

Rows that cannot run say why ("skipped: no CUDA device", "unavailable: gsplat did not build in
N s: ..."). ``--device cpu --quick`` runs every CPU-capable part on tiny settings (the suite does,
in ``tests/test_gpu_check.py``), so the script cannot rot on machines without a GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from headkit.render.gaussians import auto_backend  # noqa: E402

#: the files holding the ``cuda``-marked tests (collecting only these keeps optional extras out)
CUDA_TEST_FILES = ("tests/test_gaussians.py", "tests/test_mesh_raster.py", "tests/test_ga_graph_unet.py")
GSPLAT_BUILD = "from gsplat.cuda._backend import _C; assert _C is not None, 'no extension'; print('built')"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def environment(device: str) -> list[str]:
    """Lines on torch and the device (the backend ``auto`` picks is asked only once gsplat's
    background build has ended: asking loads gsplat's extension, which would start a second JIT
    build of it in the same folder and break both)."""
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    return [f"- torch {torch.__version__}, device `{device}` ({name})"]


def start_gsplat_build(log: Path) -> subprocess.Popen:
    """Build gsplat's CUDA extension in a background process (it compiles on first import)."""
    arch = "{}.{}".format(*torch.cuda.get_device_capability(0))  # only this GPU's architecture: a shorter build
    env = {"MAX_JOBS": str(max(1, (os.cpu_count() or 2) - 2)), "TORCH_CUDA_ARCH_LIST": arch, **os.environ}
    return subprocess.Popen([sys.executable, "-c", GSPLAT_BUILD], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=env)


def wait_gsplat(build: subprocess.Popen | None, log: Path, deadline: float) -> tuple[bool, str]:
    """Whether gsplat's extension is usable by ``deadline`` (a ``time.time()``), and why not."""
    if build is None:
        return False, "skipped: no CUDA device"
    try:
        build.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        build.kill()
        return False, f"unavailable: gsplat's extension did not build within the time limit ({log.name})"
    if build.returncode:
        tail = " ".join(log.read_text().strip().splitlines()[-2:])[-300:]
        return False, f"unavailable: gsplat's extension failed to build: {tail}"
    return True, "built"


def train_run(experiment: str, steps: int, device: str, work: Path, extra: list[str]) -> dict:
    """``scripts/train.py experiment=... trainer.max_steps=steps`` in this process; its metrics."""
    from hydra import compose, initialize_config_dir

    from headkit.engine.trainer import train

    overrides = [f"experiment={experiment}", f"trainer.max_steps={steps}", f"trainer.device={device}",
                 f"paths.data_dir={work / 'data'}", f"run_dir={work / experiment}", "trainer.progress=false",
                 "eval.video=false", "eval.lpips=false", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    began = time.perf_counter()
    metrics = train(cfg)
    metrics["wall_seconds"] = time.perf_counter() - began
    return metrics


def training_rows(device: str, steps: int, work: Path, quick: bool) -> list[str]:
    """Markdown rows: GraphAvatar and the neural-cache model trained and evaluated."""
    tiny = ["data.generator.num_frames=8", "data.generator.width=32", "data.generator.height=32",
            "data.generator.num_test=2", "data.generator.num_vertices_target=300",
            "data.generator.texture_resolution=32"] if quick else []
    ga_small = ["model.unet.filters=[8,8]", "model.unet.K=2", "model.enhancer.channels=[4,8]"] if quick else []
    runs = {"GraphAvatar (torch splatting)": ("synthetic_subject", tiny + ga_small + [
                "model.render.backend=torch", f"model.warmup.fit_steps={min(600, 4 * steps)}",
                f"model.warmup.steps={min(200, steps)}"]),
            "neural cache (ours)": ("neuralcache_synthetic", tiny)}
    rows = ["| run | steps | PSNR | SSIM | train + eval s | ms per frame | render backend |", "|---|---|---|---|---|---|---|"]
    for label, (experiment, extra) in runs.items():
        try:
            m = train_run(experiment, steps, device, work, extra)
            rows.append(f"| {label} | {steps} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['wall_seconds']:.0f} | "
                        f"{m['time_per_frame_ms']:.2f} | {m.get('render_backend') or 'n/a'} |")
        except Exception as exc:  # one broken run must not hide the others' rows
            rows.append(f"| {label} | {steps} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | | | |")
    return rows


def gaussian_rows(device: str, backends: list[str], counts: list[int], size: int, reps: int) -> list[str]:
    """Forward and forward+backward times of splatting a head-like scene."""
    from bench_gaussians import run_config

    rows = []
    for backend in backends:
        for n in counts:
            r = run_config(backend, size, n, reps, device, None, None)
            rows.append(f"| splatting, {backend}, {n:,} Gaussians, {size}x{size} | {1e3 * r['fwd']:.1f} | "
                        f"{1e3 * r['fwd_bwd']:.1f} | {r['peak_mb']:.0f} MB |")
    return rows


def mesh_raster_row(device: str, size: int) -> str:
    """Rasterize + interpolate a ~10k-face mesh for 4 cameras."""
    from bench_mesh_raster import make_scene, time_it

    from headkit.render import interpolate, rasterize_mesh

    dev = torch.device(device)
    verts, faces, viewmats, Ks = make_scene(4, size, dev)

    def fn():
        out = rasterize_mesh(verts, faces, viewmats, Ks, size, size)
        interpolate(verts, faces, out)

    wall, _ = time_it(fn, dev, warmup=2, runs=5)
    return f"| mesh rasterizer + interpolate, 10k faces, 4 x {size}x{size} | {wall:.1f} | | |"


def neuralcache_rows(device: str, quick: bool) -> list[str]:
    """Latency of G and W and the stream FPS with one and two workers on the one device."""
    from bench_neuralcache import WIDTHS, bench

    from headkit.data.synthetic import generate_synthetic_subject

    size = 32 if quick else 256
    subject = generate_synthetic_subject(num_frames=12 if quick else 40, width=size, height=size, num_test=6 if quick else 24,
                                         num_vertices_target=300 if quick else 2500)
    result = bench("synthetic experiment", WIDTHS["synthetic experiment"], subject, device, [device, device],
                   repeats=3 if quick else 20, stream_repeats=1 if quick else 3)
    rows = [f"| {key} latency ({size}x{size}) | {result[key]['wall_ms']:.2f} | | |" for key in ("G", "W", "ExWarp")
            if key in result]
    rows += [f"| {m['mode']}, {m['workers']} worker(s) on one device | {1e3 / m['fps']:.2f} ms/frame ({m['fps']:.0f} FPS) | | |"
             for m in result["modes"]]
    return rows


def gsplat_checks(device: str) -> list[str]:
    """The cuda-marked tests and the torch-vs-gsplat image difference (gsplat built)."""
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                            *CUDA_TEST_FILES], cwd=ROOT, capture_output=True, text=True)
    summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
    from bench_gaussians import head_scene

    from headkit.render.gaussians import rasterize_gaussians

    scene = head_scene(50_000, 512, device)
    images = {b: rasterize_gaussians(*scene, 512, 512, backend=b)[0] for b in ("torch", "gsplat")}
    diff = (images["torch"] - images["gsplat"]).abs()
    return [f"- `pytest -m cuda`: {summary}",
            f"- torch vs gsplat, 50k Gaussians at 512x512: max |difference| {diff.max().item():.2e}, "
            f"mean {diff.mean().item():.2e}"]


def run_checks(device: str, steps: int, quick: bool, budget_s: float) -> str:
    """Every section, in order, as markdown."""
    deadline = time.time() + budget_s
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    build_log = work / "gsplat_build.log"
    build = start_gsplat_build(build_log) if device.startswith("cuda") else None
    env = environment(device)
    lines = ["## Environment", *env, "", "## Training and evaluation", *training_rows(device, steps, work, quick)]
    size, counts = (64, [500]) if quick else (512, [50_000, 200_000])
    bench = ["| benchmark | forward (or latency) ms | forward + backward ms | peak memory |", "|---|---|---|---|"]
    bench += gaussian_rows(device, ["torch"], counts, size, 2 if quick else 5)
    bench.append(mesh_raster_row(device, 64 if quick else 512))
    bench += neuralcache_rows(device, quick)
    built, why = wait_gsplat(build, build_log, deadline)
    lines.insert(1 + len(env), f"- Gaussian splatting `backend=auto` on this device: {auto_backend(device)[1]}")
    if built:
        try:
            bench += gaussian_rows(device, ["gsplat"], counts, size, 5)
        except RuntimeError as exc:  # e.g. a gsplat version the renderer refuses: say so, keep the report
            built, why = False, f"unavailable: {str(exc).splitlines()[0][:300]}"
    lines += ["", "## Benchmarks (synchronised wall time, median)", *bench, "", "## gsplat",
              f"- extension: {why}"]
    if built:
        lines += gsplat_checks(device)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the report and writes it with ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else None,
                   help="cuda (default when present) or cpu (with --quick: the suite's smoke run)")
    p.add_argument("--steps", type=int, default=300, help="training steps per run")
    p.add_argument("--quick", action="store_true", help="tiny settings everywhere (CPU smoke run)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds before gsplat's build is given up")
    p.add_argument("--out", help="write the report to this file")
    args = p.parse_args(argv)
    stamp = time.strftime("%Y-%m-%d")
    if args.device is None:
        report = (f"# GPU check ({stamp})\n\nskipped: no CUDA device on this machine (torch.cuda.is_available() is "
                  "False); every row needs one. `--device cpu --quick` runs the CPU-capable parts on tiny settings.")
    else:
        report = f"# GPU check ({stamp})\n\n" + run_checks(args.device, args.steps, args.quick, args.budget)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
