"""Held-out PSNR with the true test cameras, in the avatar's own gauge (issue #17, diagnosis).

    python benchmarks/ggo_heldout_truth.py RUN_DIR [RUN_DIR ...] [--true-expressions]

A run's held-out frames are normally rendered with the tracker's cameras, which drift on the
``experiment=ggo_drift`` subject, and GGO is not applied after the training time range. Their PSNR
then also scores how each run's avatar happens to sit relative to that drift. This script renders
them instead with the true cameras moved by the run's own shared offset: the rigid offset common
to all training frames, in the avatar's frame, between the cameras the avatar was trained with
(GGO-refined, or tracked without GGO) and the true ones
(:func:`graphavatar.evaluation.shared_offset`); that offset is moving the avatar, which no image
can tell. So each test frame is seen from where this avatar's training would place a perfectly
tracked camera. Needs a subject that keeps the truth (the synthetic one). A diagnosis, not the
paper's metric.

A third column renders the tracked test frames with GGO refining them (``ggo.apply_on_test``, the
time code held at the last training frame's, ``ggo.test_time=hold``): no truth is used, so that
one is a way the model itself can render them (``experiment=ggo_drift`` does since 2026-12-01).
For runs with ``ggo.rounds`` trained without ``apply_on_test`` the earlier rounds' refinement of the
test frames was not baked, so there it holds the last round's only.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from graphavatar.evaluation import shared_offset, training_frame_tracking
from headkit.cameras import invert_rigid
from headkit.data.dataset import FrameDataset
from headkit.engine.runs import load_run
from headkit.metrics import psnr


@torch.no_grad()
def heldout_psnrs(run_dir: str, true_expressions: bool = False) -> dict[str, float]:
    """Mean held-out PSNR with the tracked cameras (``tracked``, GGO not applied), with GGO refining
    them (``ggo_on_test``) and with the true ones in the run's gauge (``true_aligned``)."""
    run = load_run(run_dir, "cpu")
    model, subject = run.model, run.subject
    if "true_camtoworlds" not in subject.extras:
        raise SystemExit(f"{run_dir}: the subject has no true cameras (only the synthetic subject keeps them)")
    t = training_frame_tracking(model, subject, torch.device("cpu"))
    to_local = invert_rigid(t["poses"])
    gauge = shared_offset(to_local @ t["c2w_after"], to_local @ t["true_c2w"])  # [4, 4] in the avatar's frame
    test = FrameDataset(subject, "test")
    true_c2w = torch.from_numpy(np.asarray(subject.extras["true_camtoworlds"], np.float32))
    true_expr = torch.from_numpy(np.asarray(subject.extras["true_expressions"], np.float32))
    scores = {"tracked": [], "ggo_on_test": [], "true_aligned": []}
    for position in range(len(test)):
        batch = test.batch([position])
        target = model.target_image(batch)
        for key, apply in (("tracked", False), ("ggo_on_test", True)):
            with model.ggo_applied(apply):
                scores[key].append(psnr(model.render_eval(batch), target).item())
        poses = model.local_poses(batch)
        batch["camtoworld"] = poses @ gauge.float() @ invert_rigid(poses) @ true_c2w[batch["index"]]
        if true_expressions:
            batch["expression"] = true_expr[batch["index"]]
        scores["true_aligned"].append(psnr(model.render_eval(batch), target).item())
    return {key: float(np.mean(values)) for key, values in scores.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders of experiment=ggo_drift (subject with the truth)")
    parser.add_argument("--true-expressions", action="store_true", help="also render the true expressions")
    args = parser.parse_args(argv)
    print("| run | held-out PSNR, tracked cameras | the same, GGO refining them (time held) "
          "| held-out PSNR, true cameras in the run's gauge |")
    print("|---|---:|---:|---:|")
    for run in args.runs:
        r = heldout_psnrs(run, args.true_expressions)
        print(f"| {run} | {r['tracked']:.2f} | {r['ggo_on_test']:.2f} | {r['true_aligned']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
