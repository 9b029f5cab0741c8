"""The main job (``python scripts/train.py``, no arguments) of two commits, side by side.

    python benchmarks/bench_main_job.py --before fe55288 [--after HEAD] [--repeats 1] [--out FILE]

Each commit is cloned fresh into a temporary folder and its main job runs as a user would run it
(the environment as it is, the commit's own defaults: threads, OpenMP wait policy, splatting
backend), one job at a time, alternating before/after when ``--repeats`` > 1. Prints and (with
``--out``) appends a table: wall time of the whole process, its training part
(``train_seconds`` in ``metrics.json``), test PSNR/SSIM, and the ratio. Nothing else should run
on the machine meanwhile; the table says when and on how many cores it was measured.

Issue #15 compares the code before its first change (``fe55288``) with today's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_times import ROOT, fresh_clone, timed  # noqa: E402

COMMAND = "python scripts/train.py run_dir=outputs/train/main"


def clone_at(work: Path, rev: str) -> Path:
    """A fresh clone of this checkout checked out at ``rev`` (with ``../shared`` beside it)."""
    clone = fresh_clone(work)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", rev], check=True)
    return clone


def run_job(clone: Path, logs: Path, label: str) -> dict:
    """The main job in ``clone``; wall seconds and ``metrics.json``'s values."""
    shutil.rmtree(clone / "outputs", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(clone)}  # the clone's packages, not an installed copy
    seconds = timed(COMMAND, clone, env, logs / f"{label}.log")
    metrics = json.loads((clone / "outputs" / "train" / "main" / "metrics.json").read_text())
    return {"wall": seconds, "train": float(metrics["train_seconds"]), "psnr": float(metrics["psnr"]),
            "ssim": float(metrics["ssim"])}


def table(revs: dict[str, str], results: dict[str, list[dict]]) -> str:
    """Markdown: one row per commit (medians over repeats) and the speed-up."""
    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in results[label])

    lines = [f"Measured {dt.datetime.now():%Y-%m-%d %H:%M} on a {os.cpu_count()}-core CPU machine, "
             f"nothing else running; {len(results['before'])} job(s) per commit, medians.", "",
             "| commit | whole job | training part | test PSNR / SSIM |", "|---|---:|---:|---|"]
    for label in ("before", "after"):
        wall, train = med(label, "wall"), med(label, "train")
        lines.append(f"| {label} (`{revs[label]}`) | {int(wall // 60)} min {wall % 60:.0f} s | {train:.0f} s | "
                     f"{med(label, 'psnr'):.2f} / {med(label, 'ssim'):.4f} |")
    lines.append(f"| speed-up | **{med('before', 'wall') / med('after', 'wall'):.2f}x** | "
                 f"{med('before', 'train') / med('after', 'train'):.2f}x | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the older commit")
    p.add_argument("--after", default="HEAD", help="the newer commit (default HEAD)")
    p.add_argument("--repeats", type=int, default=1, help="jobs per commit, alternating")
    p.add_argument("--logs", default="outputs/bench_main_job", help="folder for each job's output")
    p.add_argument("--out", help="append the table to this file")
    args = p.parse_args(argv)
    revs = {"before": args.before, "after": args.after}
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_main_job_"))
    try:
        clones = {label: clone_at(work / label, rev) for label, rev in revs.items()}
        results: dict[str, list[dict]] = {"before": [], "after": []}
        for i in range(args.repeats):
            for label in (("before", "after") if i % 2 == 0 else ("after", "before")):
                results[label].append(run_job(clones[label], logs, f"{label}_{i}"))
                print(label, results[label][-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(revs, results)
    print(text)
    if args.out:
        with open(args.out, "a") as out:
            out.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
