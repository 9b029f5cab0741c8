"""Real footage, tracker against tracker: GraphAvatar runs on subjects prepared from one clip.

    python benchmarks/real_video.py RUN_DIR [RUN_DIR ...] [--train-frames 40] [--images DIR] [--out FILE]

Per run (a finished ``scripts/train.py`` folder) it reports, on the held-out frames (the last
20 % of the clip): PSNR, SSIM, L2 and LPIPS from the run's newest metrics, its latest
``scripts/eval.py`` evaluation (``RUN/eval/<name>/metrics.json``) else the training's
``RUN/metrics.json`` (:func:`headkit.engine.runs.latest_metrics`; the source is stated under the
table, or in a ``metrics from`` column when the runs differ; LPIPS "n/a" with the reason when
the AlexNet weights are missing), and PSNR of the splatted image *before* the enhancer; on
evenly spaced training frames the same two PSNRs (how well the Gaussians explain what they
were trained on), with the tracked cameras and, for a model with GGO, with GGO's refined cameras
and expressions (the training frames as the model learnt them; GGO is not applied to held-out
frames, which lie after the training time range); the number of Gaussians and the training
time (the latter always from the training's ``RUN/metrics.json``). With ``--images`` it writes,
per run, three held-out frames side by side: target | final | before the enhancer | rendered
alpha, to ``DIR/real_video_<run name>.png``.

Both subjects of a comparison come from the same clip and the same crops, so the targets differ
only by their masks (``tracker=ict`` cuts the person mask below the fitted neck).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from headkit.data.dataset import FrameDataset
from headkit.data.image_io import to_uint8
from headkit.engine.rundir import METRICS_NAME, read_metrics
from headkit.engine.runs import latest_metrics, load_run
from headkit.metrics import psnr


@torch.no_grad()
def split_psnr(run, split: str, max_frames: int | None = None) -> tuple[float, float, list[dict]]:
    """Mean PSNR of the final and the pre-enhancer image over ``split`` (evenly subsampled to
    ``max_frames``); also the outputs of its first, middle and last frame."""
    data = FrameDataset(run.subject, split)
    picks = np.arange(len(data)) if not max_frames or len(data) <= max_frames else \
        np.linspace(0, len(data) - 1, max_frames).round().astype(int)
    finals, coarses, shown = [], [], []
    keep = {int(picks[0]), int(picks[len(picks) // 2]), int(picks[-1])}
    for p in picks:
        batch = data.batch([int(p)], run.device)
        out = run.model.get_outputs(batch)
        target = run.model.target_image(batch)
        finals.append(psnr(out["image"].clamp(0, 1), target).item())
        coarses.append(psnr(out["coarse_image"].clamp(0, 1), target).item())
        if int(p) in keep:
            shown.append({"target": target[0], "final": out["image"][0], "coarse": out["coarse_image"][0],
                          "alpha": out["alpha"][0].expand_as(target[0]) if out["alpha"].dim() == 4
                          else out["alpha"][0][..., None].expand_as(target[0])})
    return float(np.mean(finals)), float(np.mean(coarses)), shown


def side_by_side(shown: list[dict]) -> np.ndarray:
    """Rows of ``target | final | before the enhancer | alpha``, uint8."""
    rows = [np.concatenate([to_uint8(s[k].clamp(0, 1).cpu().numpy()) for k in ("target", "final", "coarse", "alpha")],
                           axis=1) for s in shown]
    return np.concatenate(rows, axis=0)


def benchmark_run(run_dir: Path, train_frames: int, images: Path | None) -> dict:
    """One table row for ``run_dir`` (``"source"``: where its test metrics came from)."""
    run = load_run(run_dir, "cpu")
    metrics, source = latest_metrics(run_dir)
    training = read_metrics(run_dir) if (run_dir / METRICS_NAME).is_file() else {}  # train_seconds
    test_final, test_coarse, shown = split_psnr(run, "test")
    train_final, train_coarse, _ = split_psnr(run, "train", train_frames)
    refined = (None, None)  # the training frames with GGO's refinement, when the model has GGO
    if run.model.ggo is not None:
        with run.model.ggo_applied():
            refined = split_psnr(run, "train", train_frames)[:2]
    row = {
        "run": run_dir.name, "tracker": run.subject.meta.get("tracker", "?"),
        "size": f"{run.subject.width}x{run.subject.height}", "steps": run.step,
        "vertices": run.subject.num_vertices, "gaussians": int(metrics.get("num_gaussians", 0)),
        "psnr": metrics["psnr"], "ssim": metrics["ssim"], "l2": metrics["l2"], "lpips": metrics.get("lpips"),
        "lpips_reason": metrics.get("lpips_unavailable_reason"),
        "psnr_test_check": test_final, "psnr_before_enhancer_test": test_coarse,
        "psnr_train": train_final, "psnr_before_enhancer_train": train_coarse,
        "psnr_train_ggo": refined[0], "psnr_before_enhancer_train_ggo": refined[1],
        "train_minutes": training.get("train_seconds", float("nan")) / 60.0, "source": source,
    }
    if images is not None:
        import imageio.v3 as iio

        images.mkdir(parents=True, exist_ok=True)
        path = images / f"real_video_{run_dir.name}.png"
        iio.imwrite(path, side_by_side(shown))
        row["images"] = str(path)
    return row


def _refined(row: dict) -> str:
    """``final / before the enhancer`` on the training frames with GGO applied, or n/a (no GGO)."""
    final, coarse = row.get("psnr_train_ggo"), row.get("psnr_before_enhancer_train_ggo")
    return "n/a" if final is None else f"{final:.2f} / {coarse:.2f}"


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows; ``metrics from: SOURCE`` under it when all rows share a
    source, else a last ``metrics from`` column."""
    sources = {r.get("source") for r in rows} - {None}
    per_row = len(sources) > 1
    head = ("| run | tracker | size | steps | Gaussians | PSNR | SSIM | L2 | LPIPS | PSNR before enh. (test) "
            "| PSNR train | PSNR before enh. (train) | same, GGO-refined | train min |"
            + (" metrics from |" if per_row else "") + "\n|" + "---|" * (14 + per_row))
    lines = [head]
    for r in rows:
        lp = "n/a" if r["lpips"] is None else f"{r['lpips']:.4f}"
        lines.append(f"| {r['run']} | {r['tracker']} | {r['size']} | {r['steps']} | {r['gaussians']} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['l2']:.4f} | {lp} | {r['psnr_before_enhancer_test']:.2f} | "
                     f"{r['psnr_train']:.2f} | {r['psnr_before_enhancer_train']:.2f} | {_refined(r)} | "
                     f"{r['train_minutes']:.1f} |"
                     + (f" {r.get('source') or ''} |" if per_row else ""))
    reasons = {r["lpips_reason"] for r in rows if r["lpips"] is None and r["lpips_reason"]}
    note = [f"\nmetrics from: {sources.pop()}"] if len(sources) == 1 else []
    return "\n".join(lines + note + [f"\nLPIPS n/a: {reason}" for reason in reasons])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table (and writes it with ``--out``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished training run folders")
    p.add_argument("--train-frames", type=int, default=40, help="training frames scored (evenly spaced)")
    p.add_argument("--images", help="folder for the side-by-side PNGs (e.g. docs/results)")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        rows = [benchmark_run(Path(r), args.train_frames, Path(args.images) if args.images else None)
                for r in args.runs]
    except (FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = format_table(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
