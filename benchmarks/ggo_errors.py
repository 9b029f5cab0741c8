"""GGO's tracking errors of trained runs, zero-mean in the avatar's frame and in the world (issue #17).

    python benchmarks/ggo_errors.py RUN_DIR [RUN_DIR ...]

Re-scores runs on a subject that keeps the truth (``experiment=ggo_drift``): the zero-mean
rotation and camera-centre errors of the training frames, tracked and after GGO, with the shared
offset removed in the avatar's frame (what ``metrics.json`` reports since 2026-12-01:
:func:`graphavatar.evaluation.tracking_errors` with ``local_poses``) and in the world frame (what
runs scored before then; right only for an avatar fixed in the world). One markdown row per run,
and a mean row when there are several runs.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from graphavatar.evaluation import tracking_errors, training_frame_tracking
from headkit.engine.runs import load_run

FRAMES = {"avatar": True, "world": False}  # frame name -> pass the avatar's poses


def run_errors(run_dir: str) -> dict[str, float]:
    """``{FRAME_{rot,centre_mm}_{before,after}}`` for FRAME in :data:`FRAMES`."""
    run = load_run(run_dir, "cpu")
    if "true_camtoworlds" not in run.subject.extras:
        raise SystemExit(f"{run_dir}: the subject has no true cameras (only the synthetic subject keeps them)")
    t = training_frame_tracking(run.model, run.subject, torch.device("cpu"))
    out = {}
    for frame, local in FRAMES.items():
        for tag in ("before", "after"):
            e = tracking_errors(t[f"c2w_{tag}"], t["true_c2w"], t[f"expr_{tag}"], t["true_expr"],
                                t["poses"] if local else None)
            out[f"{frame}_rot_{tag}"] = e["rot_err_deg_zero_mean"]
            out[f"{frame}_centre_mm_{tag}"] = 1000.0 * e["centre_err_zero_mean"]
    return out


def cut(before: float, after: float) -> str:
    return f"{100.0 * (after / before - 1.0):+.1f} %"


def row(name: str, r: dict[str, float]) -> str:
    cells = [name]
    for frame in FRAMES:
        for quantity, fmt in (("rot", "{:.3f}"), ("centre_mm", "{:.1f}")):
            b, a = r[f"{frame}_{quantity}_before"], r[f"{frame}_{quantity}_after"]
            cells.append(f"{fmt.format(b)} -> {fmt.format(a)} ({cut(b, a)})")
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders of experiment=ggo_drift (or another subject with the truth)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    results = {run: run_errors(run) for run in args.runs}
    print("| run | rot. ° zero-mean, avatar's frame | centre mm zero-mean, avatar's frame "
          "| rot. ° zero-mean, world frame | centre mm zero-mean, world frame |")
    print("|---|---|---|---|---|")
    for run, r in results.items():
        print(row(run, r))
    if len(results) > 1:
        print(row(f"mean of {len(results)}", {k: float(np.mean([r[k] for r in results.values()]))
                                               for k in next(iter(results.values()))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
