"""Which cameras does a trained GraphAvatar fit its training frames best with? (issue #17, GGO)

    python benchmarks/ggo_camera_check.py RUN_DIR [RUN_DIR ...]

For a run on the synthetic subject (which keeps the true cameras and expressions), renders every
training frame's coarse (pre-enhancer) image with the tracked cameras, the true cameras, the true
cameras and expressions, and (when the model has GGO) the GGO-refined cameras, and prints the mean
L1 against the ground-truth images. An avatar that fits better with the tracked (wrong) cameras
than with the true ones has absorbed the tracking errors into its per-frame geometry.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from headkit.data.dataset import FrameDataset
from headkit.engine.runs import load_run


@torch.no_grad()
def camera_check(run_dir: str, batch_size: int = 30) -> dict[str, float]:
    """Mean coarse-image L1 per camera/expression source: ``{tracked, true_cameras, true_both, ggo}``."""
    run = load_run(run_dir, "cpu")
    model, subject = run.model, run.subject
    if "true_camtoworlds" not in subject.extras:
        raise SystemExit(f"{run_dir}: the subject has no true cameras (only the synthetic subject keeps them)")
    true_c2w = torch.from_numpy(np.asarray(subject.extras["true_camtoworlds"], np.float32))
    true_expr = torch.from_numpy(np.asarray(subject.extras["true_expressions"], np.float32))
    train = FrameDataset(subject, "train")
    sums = {"tracked": 0.0, "true_cameras": 0.0, "true_both": 0.0, "ggo": 0.0}
    for start in range(0, len(train), batch_size):
        batch = train.batch(np.arange(start, min(start + batch_size, len(train))), torch.device("cpu"))
        target = model.target_image(batch)
        true_cams = {**batch, "camtoworld": true_c2w[batch["index"]]}
        variants = {"tracked": (batch, False), "true_cameras": (true_cams, False),
                    "true_both": ({**true_cams, "expression": true_expr[batch["index"]]}, False)}
        if model.ggo is not None:
            variants["ggo"] = (batch, True)
        for name, (frames, apply_ggo) in variants.items():
            with model.ggo_applied(apply_ggo):
                image = model.get_outputs(frames)["coarse_image"]
            sums[name] += float((image - target).abs().mean(dim=(1, 2, 3)).sum())
    return {name: total / len(train) for name, total in sums.items() if model.ggo is not None or name != "ggo"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders of experiment=ggo_drift (or any synthetic-subject run)")
    args = parser.parse_args(argv)
    print("| run | tracked cameras | true cameras | true cameras + expressions | GGO-refined cameras |")
    print("|---|---:|---:|---:|---:|")
    for run_dir in args.runs:
        r = camera_check(run_dir)
        refined = f"{r['ggo']:.4f}" if "ggo" in r else "n/a (no GGO)"
        print(f"| {run_dir} | {r['tracked']:.4f} | {r['true_cameras']:.4f} | {r['true_both']:.4f} | {refined} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
