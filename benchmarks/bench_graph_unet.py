"""Graph U-Nets and depth enhancer of one GraphAvatar step, old vs new code, forward + backward (CPU).

    python benchmarks/bench_graph_unet.py                  # U-Nets 2.5k + 11k, enhancer 128² + 256², 1 and 2 threads
    python benchmarks/bench_graph_unet.py --parts unet --subjects 11k --threads 1 --reps 15

Workloads (issue #15), built as ``scripts/train.py`` builds the default experiment (see
``benchmarks/bench_train_step.py``: Hydra compose of ``configs/train.yaml``, ``build_method``;
untrained, parameters perturbed so no layer is zero):

* **graph U-Nets**: both heads' encoders and decoders as ``GraphAvatar.encode``/``anchors`` run
  them (same tracked mesh and normals, the expression a leaf that needs grad, as GGO's output
  does), then the backward of a random projection of every output. Subjects: ``default`` (the
  synthetic subject, 2486 vertices) and ``11k`` (``data/demo_ict_128c``, 11248 vertices; the
  synthetic subject with 11000 target vertices when that folder is missing).
* **enhancer**: ``DepthEnhancer`` of the default config on a ``[1, R, R, 3]`` image and depth that
  need grad (they come from the rasterizer), ``R = 128, 256``; forward + backward.
* **step** (``--parts step``): the whole training step without the optimiser (``get_outputs``,
  ``get_loss_dict``, ``backward``) on the subject's first training frame; the rasterizer is the
  torch backend (``model.render.backend=torch``) so the numbers do not depend on a C compiler.

``old`` is the code before issue #15, patched in for its turn: COO ``torch.sparse.mm`` with
autograd's own backward and the ``einsum`` Chebyshev contraction (``old_sparse_apply``,
``old_cheb_filter``), and an enhancer without :func:`graphavatar.enhancer.dense_grad`. ``new`` is
the code as checked in. Old and new run on the same model and inputs, interleaved in this one
process (old, new, new, old, ...) so a busy machine slows both alike; medians after two
discarded rounds. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from headkit.data.dataset import FrameDataset  # noqa: E402
from headkit.engine.trainer import build_method  # noqa: E402
from headkit.mesh import vertex_normals  # noqa: E402
from tests.graph_unet_reference import old_graph_code  # noqa: E402


# ------------------------------------------------------------------ the code before issue #15
def code(version: str):
    """``"old"``: the pre-issue-#15 graph products and enhancer patched in; ``"new"``: as checked in."""
    return old_graph_code() if version == "old" else contextlib.nullcontext()


# ------------------------------------------------------------------ workloads
def build(subject_name: str):
    """The default experiment's model (``build_method``) and one training batch."""
    overrides = []
    if subject_name == "11k":
        ict = ROOT / "data" / "demo_ict_128c"
        overrides = (["experiment=video_subject", f"data.root={ict}"] if (ict / "subject.json").is_file()
                     else ["data.generator.num_vertices_target=11000"])
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "trainer.device=cpu", "seed=0", "model.render.backend=torch"])
    subject = instantiate(cfg.data, _convert_="all")
    torch.manual_seed(0)
    model = build_method(cfg, subject).train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # no zero-initialised layer: every product and gradient is real
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, FrameDataset(subject, "train").batch([0])


def unet_workload(model, batch):
    """Both U-Nets, forward + backward, as ``encode``/``anchors`` run them; returns a callable."""
    with torch.no_grad():
        inputs = model.encode(batch)
    vertices = inputs["vertices"]
    normals = vertex_normals(vertices, model.geometry.faces)
    expressions = batch["expression"].clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    grads = []  # the outputs' random gradients, drawn once (not timed)

    def step():
        z_geo, skips_geo = model.geometry.encode(vertices, normals)
        z_app, skips_app = model.appearance.encode(vertices, normals)
        geo = model.geometry.decode(z_geo, skips_geo, expressions)
        app = model.appearance.decode(z_app, skips_app, expressions)
        outs = [geo["offsets"], geo["quats"], geo["scales"], app["sh_coeffs"], app["opacities"]]
        grads[:] = grads or [torch.randn(o.shape, generator=gen) for o in outs]
        torch.autograd.backward(outs, grads)
    return step


def enhancer_workload(model, size: int):
    """The enhancer on a ``size²`` image and depth that need grad; returns a callable."""
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(1, size, size, 3, generator=gen).requires_grad_(True)
    depth = model.enhancer.depth_offset + model.enhancer.depth_scale * torch.randn(1, size, size, 1, generator=gen)
    depth.requires_grad_(True)
    grad = torch.randn(1, size, size, 3, generator=gen)

    def step():
        model.enhancer(images, depth).backward(grad)
    return step


def train_step_workload(model, batch):
    """The whole training step without the optimiser (``get_outputs``, losses, ``backward``)."""
    def step():
        outputs = model.get_outputs(batch)
        losses = model.get_loss_dict(outputs, batch, 0)
        model.zero_grad(set_to_none=True)
        torch.stack(list(losses.values())).sum().backward()
    return step


def compare(step, threads: int, reps: int) -> dict[str, float]:
    """Median ms of ``step`` under the old and the new code, interleaved; 2 rounds discarded."""
    torch.set_num_threads(threads)
    times = {"old": [], "new": []}
    for rep in range(reps + 2):
        for version in (("old", "new") if rep % 2 == 0 else ("new", "old")):
            with code(version):
                began = time.perf_counter()
                step()
                elapsed = time.perf_counter() - began
            if rep >= 2:
                times[version].append(elapsed)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["unet", "enhancer"], choices=["unet", "enhancer", "step"])
    parser.add_argument("--subjects", nargs="+", default=["default", "11k"], choices=["default", "11k"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=21)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    workloads = []
    models = {}
    if "unet" in args.parts:
        for name in args.subjects:
            models[name] = build(name)
            model, batch = models[name]
            label = f"graph U-Nets, {name} ({model.geometry.num_vertices} vertices)"
            workloads.append((label, unet_workload(model, batch)))
    if "enhancer" in args.parts:
        model = (models.get("default") or build("default"))[0]
        workloads += [(f"enhancer {s}x{s}", enhancer_workload(model, s)) for s in args.sizes]
    if "step" in args.parts:
        for name in args.subjects:
            model, batch = models.get(name) or build(name)
            workloads.append((f"train step w/o optimiser, {name}", train_step_workload(model, batch)))
    print("\n| workload | threads | before (ms) | after (ms) | after/before |\n|---|---:|---:|---:|---:|")
    for label, step in workloads:
        for threads in args.threads:
            t = compare(step, threads, args.reps)
            print(f"| {label} | {threads} | {t['old']:.2f} | {t['new']:.2f} | {t['new'] / t['old']:.2f} |", flush=True)
    print(f"\nmedian of {args.reps} interleaved runs each; load average after: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
