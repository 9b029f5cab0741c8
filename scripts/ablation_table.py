"""GraphAvatar's component ablation (paper Table 2) from a Hydra multirun folder.

    python scripts/train.py -m ablation=full,no_warmup,no_neural,no_ggo,no_enhancer
    python scripts/ablation_table.py outputs/train/multirun_<date_time>

Every run folder under DIR (one holding ``config.yaml`` or ``metrics.json``) becomes a row,
named by its config's ``ablation_name`` (else the ``ablation=`` override in
``.hydra/overrides.yaml``, else the folder name). Columns: L2, PSNR, SSIM, LPIPS, time per
frame (seconds, as the paper) and model size (MB). A run's metrics are its newest evaluation
(``RUN/eval/<name>/metrics.json``, from ``scripts/eval.py``), else the training's
``RUN/metrics.json`` (:func:`headkit.engine.runs.latest_metrics`); the source is stated, as a
note under the table when all rows share it, else as a ``metrics from`` column. Evaluation
folders are not runs of their own. A run without metrics (unfinished or crashed) is listed as
such. Prints the markdown table and writes it to ``DIR/ablation_table.md`` (or ``--out``).

For several subjects or seeds (mean ± std, CSV, plots) use the general gatherer:
``python scripts/table.py runs=DIR group=ablation_name``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from headkit.engine.runs import find_runs, latest_metrics, run_value

ORDER = ("no_warmup", "no_neural", "no_ggo", "no_enhancer", "full")  # Table 2's row order
LABELS = {"no_warmup": "w/o Warm-up Stage", "no_neural": "w/o Neural Gaussian",
          "no_ggo": "w/o Graph-guided Optimization", "no_enhancer": "w/o 3D-aware Enhancer",
          "full": "Full Pipeline"}
COLUMNS = (("L2", "l2", 1.0, "{:.4f}"), ("PSNR", "psnr", 1.0, "{:.2f}"), ("SSIM", "ssim", 1.0, "{:.3f}"),
           ("LPIPS", "lpips", 1.0, "{:.3f}"), ("Time (s)", "time_per_frame_ms", 1e-3, "{:.4f}"),
           ("Size (MB)", "model_size_mb", 1.0, "{:.2f}"))


def _ablation_name(run: Path) -> str:
    """The run's ablation: config ``ablation_name``, else the Hydra override, else the folder name."""
    for key in ("ablation_name", "ablation"):  # run_value: config.yaml, then .hydra/overrides.yaml
        name = run_value(run, key)
        if name:
            return str(name)
    return run.name


def collect(root: str | Path) -> list[dict]:
    """One row per run folder under ``root``: ``{"ablation", "run", "metrics" (None if missing),
    "source" (:func:`latest_metrics`' label, None if missing)}``, in Table 2's order (other
    names after, alphabetically). ``RUN/eval/<name>/`` folders are not rows
    (:func:`headkit.engine.runs.find_runs`, shared with ``scripts/table.py``)."""
    rows = []
    for run in find_runs(root):
        try:
            metrics, source = latest_metrics(run)
        except FileNotFoundError:
            metrics, source = None, None
        rows.append({"ablation": _ablation_name(run), "run": str(run), "metrics": metrics, "source": source})
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(rows, key=lambda r: (rank.get(r["ablation"], len(ORDER)), r["ablation"], r["run"]))


def markdown_table(rows: list[dict]) -> str:
    """Table 2 layout: ``| Method | L2 | PSNR | SSIM | LPIPS | Time (s) | Size (MB) |``, then
    ``metrics from: SOURCE`` under it when all finished rows share a source, else a last
    column ``metrics from``."""
    sources = {r.get("source") for r in rows if r["metrics"] is not None} - {None}
    per_row = len(sources) > 1
    header = "| Method | " + " | ".join(c[0] for c in COLUMNS) + (" | metrics from" if per_row else "") + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1 + per_row)]
    for row in rows:
        label = LABELS.get(row["ablation"], row["ablation"])
        if row["metrics"] is None:
            cells = ["not finished"] + [""] * (len(COLUMNS) - 1)
        else:
            cells = []
            for _, key, factor, fmt in COLUMNS:
                value = row["metrics"].get(key)
                cells.append("n/a" if value is None else fmt.format(value * factor))
        if per_row:
            cells.append(row.get("source") or "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if len(sources) == 1:
        lines.append(f"\nmetrics from: {sources.pop()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table of the multirun folder and write it next to the runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the multirun folder (outputs/train/multirun_<date_time>)")
    parser.add_argument("--out", default=None, help="markdown file to write (default FOLDER/ablation_table.md)")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.folder)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not rows:
        print(f"error: no run folders (config.yaml / metrics.json) under {args.folder}", file=sys.stderr)
        return 1
    text = markdown_table(rows)
    print(text)
    reasons = {r["metrics"].get("lpips_unavailable_reason") for r in rows if r["metrics"]} - {None}
    for reason in sorted(reasons):
        print(f"LPIPS n/a: {reason}")
    out = Path(args.out) if args.out else Path(args.folder) / "ablation_table.md"
    out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
