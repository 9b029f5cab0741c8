"""Per-stage time of one GraphAvatar training step (forward and backward), CPU.

    python benchmarks/bench_train_step.py                       # both subjects, 1 and 2 threads
    python benchmarks/bench_train_step.py --subjects default --threads 1 --steps 7
    python benchmarks/bench_train_step.py --compare             # + old vs new of each speed-up

The model is built as ``scripts/train.py`` builds the default experiment: ``configs/train.yaml``
composed with Hydra's compose API (plus the subject's overrides), ``instantiate(cfg.data)`` and
``headkit.engine.trainer.build_method``, ``configure_optimizers``; untrained, no warm-up
(``before_training`` is not run). Subjects: ``default`` (the synthetic subject, ~2.5k vertices,
128x128) and ``11k`` (the ICT demo subject ``data/demo_ict_128c`` with ``experiment=video_subject``
when present, else the synthetic subject with ``data.generator.num_vertices_target=11000``).

One step is cut into stages at their tensor boundaries: each stage's outputs are detached into
fresh leaves that the next stage consumes, so its forward and its backward (``torch.autograd
.backward`` of its outputs with the leaves' gradients) can each be timed on their own with
``time.perf_counter`` (CPU ops are synchronous). The gradients are the same as the trainer's one
``total.backward()``; ``whole step`` times an uncut step as ``headkit.engine.trainer`` runs it, to
show what the cutting costs. Stages: graph U-Nets (encoders, GGO, decoders: ``encode``, ``refine``,
``anchors``), neural Gaussians, rasterizer (projection: ``project_gaussians``, forward only; binning
+ compositing: ``rasterize_tiles``, forward only; backward as one), enhancer, losses, finite checks
(losses and gradients, ``headkit.engine.guards``), optimiser (``zero_grad`` + Adam ``step`` + LR
schedule). Every timing is the median over ``--steps`` steps after one discarded step (first-call
allocations); the same ``--seed`` gives the same batches and the same model.

``--compare`` times, interleaved in this process (old, new, old, new, ...), each speed-up of
issue #15 against the code it replaced (kept below as ``old_*``) and prints the median ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from headkit.data.dataset import FrameDataset  # noqa: E402
from headkit.engine import guards  # noqa: E402
from headkit.engine.trainer import build_method  # noqa: E402
from headkit.render import gaussians as gaussians_module  # noqa: E402

STAGES = ("graph U-Nets", "neural Gaussians", "rasterizer", "  projection (fwd)", "  binning+compositing (fwd)",
          "enhancer", "losses", "finite checks", "optimiser", "sum of stages", "whole step (uncut)")


def subject_overrides(name: str) -> list[str]:
    """Hydra overrides of the benchmark subjects (module docstring)."""
    if name == "default":
        return []
    ict = ROOT / "data" / "demo_ict_128c"
    if (ict / "subject.json").is_file():
        return ["experiment=video_subject", f"data.root={ict}"]
    return ["data.generator.num_vertices_target=11000"]


def build(name: str, seed: int = 0, extra: tuple[str, ...] = ()):
    """``(model, optimiser, scheduler, train set, cfg)`` as the trainer builds them (untrained)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*subject_overrides(name), "trainer.device=cpu", f"seed={seed}", *extra])
    subject = instantiate(cfg.data, _convert_="all")
    torch.manual_seed(seed)
    model = build_method(cfg, subject)
    model.train()
    optimizer, scheduler = model.configure_optimizers()
    return model, optimizer, scheduler, FrameDataset(subject, "train"), cfg


def _cut(value, pairs):
    """``value`` with every tensor that requires grad replaced by a detached leaf; (orig, leaf) into pairs."""
    if isinstance(value, dict):
        return {k: _cut(v, pairs) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(v, pairs) for v in value)
    if isinstance(value, torch.Tensor) and value.requires_grad:
        leaf = value.detach().requires_grad_(True)
        pairs.append((value, leaf))
        return leaf
    return value


def _backward(pairs) -> None:
    outs = [(o, l.grad) for o, l in pairs if l.grad is not None]
    if outs:
        torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])


@contextlib.contextmanager
def _timed_render_parts(times: dict):
    """Time ``project_gaussians`` and ``rasterize_tiles`` (forward) inside the torch backend."""
    project, tiles = gaussians_module.project_gaussians, gaussians_module.rasterize_tiles

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            out = fn(*args, **kwargs)
            times[key] += time.perf_counter() - began
            return out
        return wrapper
    gaussians_module.project_gaussians = timed(project, "  projection (fwd)")
    gaussians_module.rasterize_tiles = timed(tiles, "  binning+compositing (fwd)")
    try:
        yield
    finally:
        gaussians_module.project_gaussians, gaussians_module.rasterize_tiles = project, tiles


def staged_step(model, optimizer, scheduler, batch, step: int) -> dict[str, float]:
    """One training step cut into stages; seconds per stage (forward + backward)."""
    t = defaultdict(float)
    clock = time.perf_counter

    def run(key, fn, *args):
        began = clock()
        out = fn(*args)
        t[key] += clock() - began
        return out

    def stage_a(batch):
        encoded = model.encode(batch)
        c2w, expressions, d_expr, d_pose = model.refine(batch, encoded, True)
        from headkit.cameras import invert_rigid
        cam_to_local = invert_rigid(encoded["poses"]) @ c2w
        return {"anchors": model.anchors(encoded, expressions), "viewmats": invert_rigid(cam_to_local),
                "centres": cam_to_local[:, :3, 3], "expressions": expressions, "d_expr": d_expr, "d_pose": d_pose}

    pa, pb, pc, pd = [], [], [], []
    a = _cut(run("graph U-Nets", stage_a, batch), pa)
    children = None
    if model.neural is not None:
        an = a["anchors"]
        children = _cut(run("neural Gaussians", model.neural, an["means"], an["quats"], an["scales"], a["centres"],
                            a["expressions"]), pb)
    with _timed_render_parts(t):
        coarse, depths, alphas, counts = _cut(run("rasterizer", model.rasterize, a["anchors"], children,
                                                  a["viewmats"], batch["K"], a["centres"]), pc)
    image = coarse
    if model.enhancer is not None:
        image = _cut(run("enhancer", model.enhancer, coarse, depths), pd)
    outputs = {"image": image, "coarse_image": coarse, "depth": depths, "alpha": alphas, "num_gaussians": counts,
               "delta_expression": a["d_expr"], "delta_pose": a["d_pose"],
               "anchor_offsets": a["anchors"]["offsets"], "anchor_scales": a["anchors"]["scales"]}

    def losses_fwd():
        losses = model.get_loss_dict(outputs, batch, step)
        return losses, torch.stack(list(losses.values())).sum()
    losses, total = run("losses", losses_fwd)
    run("finite checks", guards.check_finite, {**losses, "loss": total}, step)
    run("optimiser", optimizer.zero_grad, True)
    run("losses", total.backward)
    run("enhancer", _backward, pd)
    run("rasterizer", _backward, pc)
    run("neural Gaussians", _backward, pb)
    run("graph U-Nets", _backward, pa)
    run("finite checks", guards.check_finite_grads, model, step)
    run("optimiser", optimizer.step)
    if scheduler is not None:
        run("optimiser", scheduler.step)
    t["sum of stages"] = sum(v for k, v in t.items() if not k.startswith(" "))
    return t


def whole_step(model, optimizer, scheduler, batch, step: int) -> float:
    """One uncut step, as ``headkit.engine.trainer._run_steps`` runs it; seconds."""
    began = time.perf_counter()
    outputs = model.get_outputs(batch)
    losses = model.get_loss_dict(outputs, batch, step)
    total = torch.stack(list(losses.values())).sum()
    guards.check_finite({**losses, "loss": total}, step)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    guards.check_finite_grads(model, step)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return time.perf_counter() - began


def stage_table(name: str, threads: int, steps: int, seed: int) -> dict[str, float]:
    """Median seconds per stage over ``steps`` staged and ``steps`` uncut steps (interleaved)."""
    torch.set_num_threads(threads)
    model, optimizer, scheduler, dataset, _ = build(name, seed)
    generator = torch.Generator().manual_seed(seed)
    rows = defaultdict(list)
    for i in range(steps + 1):
        positions = torch.randint(len(dataset), (1,), generator=generator).tolist()
        batch = dataset.batch(positions, torch.device("cpu"))
        staged = staged_step(model, optimizer, scheduler, batch, i)
        whole = whole_step(model, optimizer, scheduler, batch, i)
        if i == 0:
            continue  # first call: allocations, lazy imports
        for key, value in staged.items():
            rows[key].append(value)
        rows["whole step (uncut)"].append(whole)
    info = f"{model.num_vertices if hasattr(model, 'num_vertices') else model.template.shape[0]} vertices, " \
           f"{model.width}x{model.height}"
    medians = {key: statistics.median(rows[key]) for key in STAGES if rows.get(key)}
    medians["_info"] = info
    return medians


# ------------------------------------------------------------------ old code, for --compare
def old_check_finite(named_tensors, step):
    """``headkit.engine.guards.check_finite`` before issue #15."""
    tensors = {k: torch.as_tensor(v).detach() for k, v in named_tensors.items()}
    if not tensors:
        return
    flags = [torch.isfinite(t).all() for t in tensors.values()]
    if bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
        return
    raise guards.NonFiniteError("non-finite", "?", step)


def old_check_finite_grads(model, step):
    grads = {f"{name}.grad": p.grad for name, p in model.named_parameters() if p.grad is not None}
    old_check_finite(grads, step)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", nargs="+", default=["default", "11k"], choices=["default", "11k"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args(argv)
    for name in args.subjects:
        for threads in args.threads:
            med = stage_table(name, threads, args.steps, args.seed)
            print(f"\n## {name} ({med.pop('_info')}), {threads} thread(s), median of {args.steps} steps, ms")
            total = med["sum of stages"]
            for key in STAGES:
                if key in med:
                    share = f"{100 * med[key] / total:5.1f} %" if key != "whole step (uncut)" else ""
                    print(f"| {key:28s} | {1000 * med[key]:8.1f} | {share} |")


if __name__ == "__main__":
    main()
