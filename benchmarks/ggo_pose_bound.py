"""How far can the images alone correct the drift? Per-frame pose fits against a frozen avatar (issue #17).

    python benchmarks/ggo_pose_bound.py --avatar RUN_DIR --poses RUN_DIR [--every 3] [--iters 200]

GGO refines the tracked cameras while the avatar is being learnt. This script asks the simpler
question of what the photometric loss can recover at all: it freezes a trained avatar
(``--avatar``), gives every training frame of a drifted subject (``--poses``: a run of
``experiment=ggo_drift``, whose subject keeps the tracked and the true cameras; the images must be
the same) its own free 6-DoF offset (the head-frame update GGO uses, ``ggo.pose_side=head``),
starts it at the tracked camera and minimises the coarse image's L1 against the frame with Adam.
The zero-mean errors before and after (:func:`graphavatar.evaluation.tracking_errors`) are GGO's
scores. With an avatar trained on the true cameras this is an upper bound on what any pose
refinement can recover from these pixels; with the avatar of a drifted run it shows how much that
avatar's optimum is shifted.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from hydra.utils import instantiate

from graphavatar.evaluation import tracking_errors
from graphavatar.ggo import apply_pose_delta
from headkit.data.dataset import FrameDataset
from headkit.engine.rundir import load_config
from headkit.engine.runs import load_run


def fit_chunk(model, batch: dict, target: torch.Tensor, iters: int,
              lr: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Per-frame head-frame offsets of ``batch``'s cameras fitted to ``target [B,H,W,3]`` (coarse-image
    L1, Adam with a cosine decay): ``(refined c2w [B,4,4], the avatar's frame to world [B,4,4],
    L1 before, L1 after)``."""
    with torch.no_grad():
        encoded = model.encode(batch)
        anchors = model.anchors(encoded, batch["expression"])
    poses = encoded["poses"]

    def l1(c2w: torch.Tensor) -> torch.Tensor:
        return (model.splat(anchors, c2w, poses, batch["K"], batch["expression"])[0] - target).abs().mean()

    delta = torch.zeros(len(target), 6, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters, eta_min=lr * 0.05)
    for i in range(iters):
        loss = l1(apply_pose_delta(batch["camtoworld"], delta, side="head", head_poses=poses))
        if i == 0:
            first = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        refined = apply_pose_delta(batch["camtoworld"], delta, side="head", head_poses=poses)
        return refined, poses, first, l1(refined).item()


def pose_bound(avatar_dir: str, poses_dir: str, every: int = 3, iters: int = 200, lr: float = 2e-3,
               chunk: int = 10, true_expressions: bool = False) -> dict[str, float]:
    """Zero-mean tracking errors of the tracked cameras and of per-frame fits, on every ``every``-th
    training frame of ``poses_dir``'s subject, with ``avatar_dir``'s frozen model."""
    model = load_run(avatar_dir, "cpu").model
    model.requires_grad_(False)
    subject = instantiate(load_config(poses_dir).data, _convert_="all")  # its subject only
    if "true_camtoworlds" not in subject.extras:
        raise SystemExit(f"{poses_dir}: the subject has no true cameras (only the synthetic subject keeps them)")
    true_c2w = torch.from_numpy(np.asarray(subject.extras["true_camtoworlds"], np.float32))
    true_expr = torch.from_numpy(np.asarray(subject.extras["true_expressions"], np.float32))
    train = FrameDataset(subject, "train")
    positions = np.arange(0, len(train), every)
    ids, poses, before, after, l1 = [], [], [], [], [0.0, 0.0]
    for start in range(0, len(positions), chunk):
        batch = train.batch(positions[start:start + chunk])
        if true_expressions:
            batch["expression"] = true_expr[batch["index"]]
        refined, local, l1_before, l1_after = fit_chunk(model, batch, model.target_image(batch), iters, lr)
        ids.append(batch["index"])
        poses.append(local)
        before.append(batch["camtoworld"])
        after.append(refined)
        l1[0] += l1_before * len(refined)
        l1[1] += l1_after * len(refined)
        print(f"  frames {start}-{start + len(refined) - 1}: L1 {l1_before:.4f} -> {l1_after:.4f}", flush=True)
    ids = torch.cat(ids)
    expr = true_expr[ids] if true_expressions else torch.from_numpy(np.asarray(subject.expressions))[ids]
    out = {"frames": float(len(ids)), "l1_before": l1[0] / len(ids), "l1_after": l1[1] / len(ids)}
    for tag, cams in (("before", torch.cat(before)), ("after", torch.cat(after))):
        errors = tracking_errors(cams, true_c2w[ids], expr, true_expr[ids], torch.cat(poses))
        out[f"rot_{tag}"] = errors["rot_err_deg_zero_mean"]
        out[f"centre_mm_{tag}"] = 1000.0 * errors["centre_err_zero_mean"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avatar", required=True, help="run folder whose trained model is frozen")
    parser.add_argument("--poses", required=True, help="run folder of experiment=ggo_drift (tracked + true cameras)")
    parser.add_argument("--every", type=int, default=3, help="fit every N-th training frame")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--true-expressions", action="store_true", help="render with the true expressions")
    args = parser.parse_args(argv)
    r = pose_bound(args.avatar, args.poses, args.every, args.iters, args.lr, true_expressions=args.true_expressions)
    cut = lambda a, b: f"{100.0 * (b / a - 1.0):+.0f} %" if a > 0 and math.isfinite(b) else "n/a"  # noqa: E731
    print("| avatar | frames | L1 before -> after | rot. err. zero-mean ° before -> after (cut) "
          "| centre err. zero-mean mm before -> after (cut) |")
    print("|---|---:|---|---|---|")
    print(f"| {args.avatar} | {int(r['frames'])} | {r['l1_before']:.4f} -> {r['l1_after']:.4f} "
          f"| {r['rot_before']:.3f} -> {r['rot_after']:.3f} ({cut(r['rot_before'], r['rot_after'])}) "
          f"| {r['centre_mm_before']:.1f} -> {r['centre_mm_after']:.1f} "
          f"({cut(r['centre_mm_before'], r['centre_mm_after'])}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
