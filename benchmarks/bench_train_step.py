"""Per-stage time of one GraphAvatar training step (forward and backward), CPU.

    python benchmarks/bench_train_step.py                       # both subjects, 1 and 2 threads
    python benchmarks/bench_train_step.py --subjects default --threads 1 --steps 7
    python benchmarks/bench_train_step.py --micro --fixed-seed 30   # + each change alone, + a 30-step run
    python benchmarks/bench_train_step.py --after model.enhancer.precision=bf16   # after = with an option

The model is built as ``scripts/train.py`` builds the default experiment: ``configs/train.yaml``
composed with Hydra's compose API (plus the subject's overrides), ``instantiate(cfg.data)`` and
``headkit.engine.trainer.build_method``, ``configure_optimizers``; untrained, no warm-up
(``before_training`` is not run). Subjects: ``default`` (the synthetic subject, ~2.5k vertices,
128x128), ``11k`` (the ICT demo subject ``data/demo_ict_128c`` with ``experiment=video_subject``
when present, else the synthetic subject with ``data.generator.num_vertices_target=11000``) and
``11k_256`` (the same at 256x256: ``data/demo_ict_256``, else the synthetic subject at 256x256).

One step is cut into stages at their tensor boundaries: each stage's outputs are detached into
fresh leaves that the next stage consumes, so its forward and its backward (``torch.autograd
.backward`` of its outputs with the leaves' gradients) can each be timed on their own with
``time.perf_counter`` (CPU ops are synchronous). The gradients are those of the trainer's one
``total.backward()`` (up to the order in which a shared input's gradients are summed); ``whole step`` times an uncut step as ``headkit.engine.trainer`` runs it, to
show what the cutting costs. Stages: graph U-Nets (encoders, GGO, decoders: ``encode``, ``refine``,
``anchors``), neural Gaussians, rasterizer (projection: ``project_gaussians``, forward only; binning
+ compositing: ``rasterize_tiles``, forward only; backward as one), enhancer, losses, finite checks
(losses and gradients, ``headkit.engine.guards``), optimiser (``zero_grad`` + Adam ``step`` + LR
schedule). Every timing is the median over ``--steps`` steps after one discarded step (first-call
allocations); the same ``--seed`` gives the same batches and the same model.

Each table has a ``before`` and an ``after`` column: the code before issue #15 (kept below as
``old_*`` and patched in by :func:`code`) and the code as checked in, on two identical models fed
the same batches, their steps interleaved in this one process (old, new, new, old, ...), so a busy
machine slows both alike. ``--micro`` times each speed-up on its own the same way (and the two
enhancer candidates that were measured and rejected); ``--fixed-seed STEPS`` trains the shrunk
default experiment with ``headkit.engine.trainer.train`` twice (old, new) and compares the logged
losses/PSNRs and the test metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from headkit.data.dataset import FrameDataset  # noqa: E402
from headkit.engine import guards  # noqa: E402
from headkit.engine.trainer import build_method  # noqa: E402
from headkit.losses import photometric_losses  # noqa: E402
from headkit.render import gaussians as gaussians_module  # noqa: E402

STAGES = ("graph U-Nets", "neural Gaussians", "rasterizer", "  projection (fwd)", "  binning+compositing (fwd)",
          "enhancer", "losses", "finite checks", "optimiser", "sum of stages", "whole step (uncut)")


def subject_overrides(name: str) -> list[str]:
    """Hydra overrides of the benchmark subjects (module docstring)."""
    if name == "default":
        return []
    size = 256 if name == "11k_256" else 128
    ict = ROOT / "data" / ("demo_ict_256" if size == 256 else "demo_ict_128c")
    if (ict / "subject.json").is_file():
        return ["experiment=video_subject", f"data.root={ict}"]
    return ["data.generator.num_vertices_target=11000", f"data.generator.width={size}", f"data.generator.height={size}"]


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
    """Time ``project_gaussians`` and ``rasterize_tiles`` (forward; torch's or native's)."""
    names = {"project_gaussians": "  projection (fwd)", "rasterize_tiles": "  binning+compositing (fwd)",
             "rasterize_tiles_native": "  binning+compositing (fwd)"}
    saved = {name: getattr(gaussians_module, name) for name in names}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            out = fn(*args, **kwargs)
            times[key] += time.perf_counter() - began
            return out
        return wrapper
    for name, key in names.items():
        setattr(gaussians_module, name, timed(saved[name], key))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(gaussians_module, name, fn)


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
        c2w, expressions, offsets = model.refine(batch, encoded, True)
        from headkit.cameras import invert_rigid
        cam_to_local = invert_rigid(encoded["poses"]) @ c2w
        return {"anchors": model.anchors(encoded, expressions), "viewmats": invert_rigid(cam_to_local),
                "centres": cam_to_local[:, :3, 3], "expressions": expressions, "offsets": offsets}

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
               **a["offsets"],
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


# ------------------------------------------------------------------ the code before issue #15
def old_check_finite(named_tensors, step):
    """``headkit.engine.guards.check_finite`` before issue #15 (one ``isfinite().all()`` per tensor)."""
    tensors = {k: torch.as_tensor(v).detach() for k, v in named_tensors.items()}
    if not tensors:
        return
    flags = [torch.isfinite(t).all() for t in tensors.values()]
    if bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
        return
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise guards.NonFiniteError(f"step {step}: non-finite values in '{name}'", name, step)


def old_check_finite_grads(model, step):
    grads = {f"{name}.grad": p.grad for name, p in model.named_parameters() if p.grad is not None}
    old_check_finite(grads, step)


def old_photometric_losses(images, targets, l1_weight, dssim_weight):
    """Before issue #15 the loss called ``photometric_loss`` once per image (target SSIM statistics twice)."""
    from headkit.losses import photometric_loss
    return [photometric_loss(image, targets, l1_weight, dssim_weight) for image in images]


def pyramid_enhancer_forward(self, images, depths):
    """A REJECTED candidate of issue #15: ``DepthEnhancer.forward`` with the depth pyramid computed
    once per resolution and shared by the encoder and decoder blocks of that resolution. Same
    forward values, but the depth gradient is summed in another order (float rounding, ~5e-7)
    and it measured no faster (``--micro``), so ``graphavatar/enhancer.py`` keeps pooling per block."""
    import torch.nn.functional as F
    h, w = images.shape[1:3]
    x, d = self.padded_inputs(images, depths)
    pyramid = {tuple(d.shape[-2:]): d}

    def depth_at(size):
        key = tuple(size)
        if key not in pyramid:
            pyramid[key] = F.adaptive_avg_pool2d(d, key)
        return pyramid[key]
    return images + self.correction(x, depth_at)[:, :, :h, :w].permute(0, 2, 3, 1)


NEW_AUTO_BACKEND = gaussians_module.auto_backend


def old_auto_backend(device, dtype=torch.float32):
    """``headkit.render.gaussians.auto_backend`` before the native backend (issue #15): the torch
    compositing on the CPU."""
    if torch.device(device).type != "cuda":
        return "torch", "torch (no CUDA device)"
    return NEW_AUTO_BACKEND(device, dtype)


def old_configure_optimizers(model):
    """``GraphAvatar.configure_optimizers`` before issue #15: the default (per-parameter on CPU) Adam."""
    from graphavatar.schedules import LRSchedule, ScheduledLR
    o = model.settings["optim"]
    groups = [{"params": params, "lr": float(o["lr"][name]), "name": name}
              for name, params in model.parameter_groups().items()]
    optimizer = torch.optim.Adam(groups)
    return optimizer, ScheduledLR(optimizer, LRSchedule(o["schedule"], o["final_ratio"], o["max_steps"]))


@contextlib.contextmanager
def code(version: str):
    """``"old"``: the pre-issue-#15 photometric losses, finite checks, Adam, CPU splatting backend
    (torch compositing; :func:`old_auto_backend`), graph products (COO + einsum,
    ``tests/graph_unet_reference.py``) and enhancer upsampling gradient patched in (for a model built
    before, the optimiser is :func:`old_configure_optimizers`); ``"new"``: as checked in
    (``backend=auto``: native on the CPU)."""
    if version == "new":
        yield
        return
    import graphavatar.losses as ga_losses
    import graphavatar.model as ga_model
    import headkit.engine.trainer as trainer
    from tests.graph_unet_reference import old_graph_code
    slots = [(ga_losses, "photometric_losses", old_photometric_losses),
             (guards, "check_finite", old_check_finite), (guards, "check_finite_grads", old_check_finite_grads),
             (trainer, "check_finite", old_check_finite), (trainer, "check_finite_grads", old_check_finite_grads),
             (ga_model.GraphAvatar, "configure_optimizers", old_configure_optimizers),
             (gaussians_module, "auto_backend", old_auto_backend)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(old_graph_code())
        for owner, attr, value in slots:
            stack.enter_context(mock.patch.object(owner, attr, value))
        yield


def fixed_seed_run(version: str, steps: int, run_dir: Path, threads: int,
                   after: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    """``scripts/train.py``'s ``train(cfg)`` on the default experiment shrunk (``steps`` steps, a
    short warm-up, no video or LPIPS), with the old or the new code (the new one with the extra
    Hydra overrides ``after``); ``(scalars per step, metrics)``."""
    import json
    from headkit.engine.trainer import train
    overrides = [f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.image_every=100000",
                 "trainer.ckpt_every=100000", "trainer.device=cpu", "trainer.progress=false",
                 f"trainer.num_threads={threads}", "model.warmup.steps=20", "model.warmup.fit_steps=40",
                 "model.warmup.log_every=10", "eval.video=false", "eval.lpips=false", "eval.lpips_download=false",
                 "eval.timing_repeats=1", f"run_dir={run_dir}", "seed=0", *(after if version == "new" else ())]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with code(version):
        metrics = train(cfg)
    scalars = [json.loads(line) for line in (run_dir / "scalars.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in scalars if any(str(k).startswith("train/") for k in r)], metrics


def before_after(name: str, threads: int, steps: int, seed: int,
                 after: tuple[str, ...] = ()) -> tuple[str, dict, dict]:
    """Per-stage medians of the old and the new code, steps interleaved (old, new, old, new, ...)
    on two identical models fed the same batches; ``after``: Hydra overrides of the new model
    (e.g. ``model.enhancer.precision=bf16``; the old one keeps the float32 enhancer)."""
    torch.set_num_threads(threads)
    model, optimizer, scheduler, dataset, _ = build(name, seed, tuple(after))
    runs = {"old": [copy.deepcopy(model)], "new": [model, optimizer, scheduler]}
    if runs["old"][0].enhancer is not None:
        runs["old"][0].enhancer.precision = "fp32"  # the code before issue #15 had no other
    runs["old"] += list(old_configure_optimizers(runs["old"][0]))
    generator = torch.Generator().manual_seed(seed)
    rows = {v: defaultdict(list) for v in runs}
    for i in range(steps + 1):
        positions = torch.randint(len(dataset), (1,), generator=generator).tolist()
        batch = dataset.batch(positions, torch.device("cpu"))
        for version in ("old", "new") if i % 2 == 0 else ("new", "old"):
            m, opt, sch = runs[version]
            with code(version):
                staged = staged_step(m, opt, sch, batch, i)
                whole = whole_step(m, opt, sch, batch, i)
            if i == 0:
                continue
            for key, value in staged.items():
                rows[version][key].append(value)
            rows[version]["whole step (uncut)"].append(whole)
    info = f"{model.template.shape[0]} vertices, {model.width}x{model.height}"
    med = {v: {k: statistics.median(r[k]) for k in STAGES if r.get(k)} for v, r in rows.items()}
    return info, med["old"], med["new"]


def micro(threads: int, reps: int, seed: int) -> list[tuple[str, float, float]]:
    """``(change, old median s, new median s)`` of each speed-up on its own, old and new interleaved,
    on the default subject's untrained model after one step (real gradients)."""
    torch.set_num_threads(threads)
    model, optimizer, scheduler, dataset, _ = build("default", seed)
    batch = dataset.batch([0], torch.device("cpu"))
    whole_step(model, optimizer, scheduler, batch, 0)
    outputs = model.get_outputs(batch)
    coarse, depths = outputs["coarse_image"].detach(), outputs["depth"].detach()
    targets = model.target_image(batch)
    old_opt, _ = old_configure_optimizers(copy.deepcopy(model))
    new_opt, _ = model.configure_optimizers()
    for opt, params in ((old_opt, old_opt.param_groups), (new_opt, new_opt.param_groups)):
        for group in params:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
    for p_old, p in zip((p for g in old_opt.param_groups for p in g["params"]),
                        (p for g in new_opt.param_groups for p in g["params"])):
        p_old.grad = p.grad.clone()

    def enhancer(version):  # "new": the rejected depth-pyramid candidate
        forward = pyramid_enhancer_forward if version == "new" else type(model.enhancer).forward
        image = forward(model.enhancer, coarse.requires_grad_(), depths.requires_grad_())
        image.square().mean().backward()

    channels_last = copy.deepcopy(model.enhancer).to(memory_format=torch.channels_last)

    def enhancer_channels_last(version):  # "new": the rejected channels-last candidate
        module = channels_last if version == "new" else model.enhancer
        module(coarse.requires_grad_(), depths.requires_grad_()).square().mean().backward()

    def photometric(version):
        fn = old_photometric_losses if version == "old" else photometric_losses
        images = [outputs["image"].detach().requires_grad_(), coarse.requires_grad_()]
        terms = fn(images, targets, 0.8, 0.2)
        torch.stack([t for pair in terms for t in pair]).sum().backward()

    def finite(version):
        (old_check_finite_grads if version == "old" else guards.check_finite_grads)(model, 0)

    def adam(version):
        (old_opt if version == "old" else new_opt).step()

    cases = {"enhancer fwd+bwd (depth pyramid; rejected)": enhancer,
             "enhancer fwd+bwd (channels-last weights; rejected)": enhancer_channels_last, "final+coarse L1/D-SSIM fwd+bwd (shared target SSIM)":
             photometric, "finite-gradient check (fused norm)": finite, "Adam step (fused)": adam}
    results = []
    for label, fn in cases.items():
        times = {"old": [], "new": []}
        for r in range(reps + 1):
            for version in ("old", "new") if r % 2 == 0 else ("new", "old"):
                began = time.perf_counter()
                fn(version)
                if r:
                    times[version].append(time.perf_counter() - began)
        results.append((label, statistics.median(times["old"]), statistics.median(times["new"])))
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", nargs="+", default=["default", "11k"], choices=["default", "11k", "11k_256"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per version (after one discarded)")
    parser.add_argument("--reps", type=int, default=20, help="repeats per version of each --micro case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro", action="store_true", help="also time each speed-up on its own")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage tables")
    parser.add_argument("--fixed-seed", type=int, default=0, metavar="STEPS",
                        help="also train the shrunk default experiment STEPS steps with the old and the new code "
                             "and compare losses and test metrics")
    parser.add_argument("--after", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides of the 'after' model only, e.g. model.enhancer.precision=bf16")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs visible; times in ms, medians")
    for threads in args.threads if not args.no_stages else []:
        for name in args.subjects:
            info, old, new = before_after(name, threads, args.steps, args.seed, args.after)
            print(f"\n### {name} subject ({info}), {threads} thread(s), median of {args.steps} steps\n")
            print("| stage | before | after | after/before | share after |")
            print("|---|---:|---:|---:|---:|")
            for key in STAGES:
                if key in new:
                    share = f"{100 * new[key] / new['sum of stages']:.1f} %" if "whole" not in key else ""
                    label = f"↳ {key.strip()}" if key.startswith(" ") else key
                    print(f"| {label} | {1000 * old[key]:.1f} | {1000 * new[key]:.1f} | "
                          f"{new[key] / old[key]:.2f} | {share} |")
    if args.micro:
        for threads in args.threads:
            print(f"\n### each speed-up alone, default subject, {threads} thread(s), median of {args.reps}\n")
            print("| change | before | after | after/before |")
            print("|---|---:|---:|---:|")
            for label, old, new in micro(threads, args.reps, args.seed):
                print(f"| {label} | {1000 * old:.2f} | {1000 * new:.2f} | {new / old:.2f} |")

    if args.fixed_seed:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            runs = {v: fixed_seed_run(v, args.fixed_seed, Path(tmp) / v, args.threads[0], args.after)
                    for v in ("old", "new")}
        (old_rows, old_metrics), (new_rows, new_metrics) = runs["old"], runs["new"]
        print(f"\n### fixed seed: default experiment, {args.fixed_seed} steps (+ warm-up 20 + fit 40), "
              f"{args.threads[0]} thread(s)\n")
        print("| value | before | after | abs. difference |")
        print("|---|---:|---:|---:|")
        worst = {}
        for a, b in zip(old_rows, new_rows):
            for key in a:
                if key.startswith("train/") and key in b:
                    worst[key] = max(worst.get(key, 0.0), abs(a[key] - b[key]))
        for key in ("train/loss", "train/psnr", "train/psnr_coarse"):
            last_a, last_b = old_rows[-1].get(key), new_rows[-1].get(key)
            if last_a is not None:
                print(f"| {key} at step {old_rows[-1]['step']} | {last_a:.7f} | {last_b:.7f} | {abs(last_a - last_b):.2e} |")
        for key in ("psnr", "ssim", "l2"):
            if isinstance(old_metrics.get(key), float):
                print(f"| test {key} | {old_metrics[key]:.7f} | {new_metrics[key]:.7f} | "
                      f"{abs(old_metrics[key] - new_metrics[key]):.2e} |")
        print(f"\nlargest per-step difference over {len(old_rows)} logged steps: "
              + ", ".join(f"{k} {v:.2e}" for k, v in sorted(worst.items()) if "lr" not in k))


if __name__ == "__main__":
    main()
