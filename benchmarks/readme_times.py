"""Time the README's commands on this machine, one after the other, and write the table.

    python benchmarks/readme_times.py [--setup] [--video] [--out benchmarks/readme_times.md]

Runs, from a fresh clone of this repository in a temporary folder (so no cache of this checkout
helps; pip's own wheel cache does, and is stated): the test command, the main job
(``scripts/train.py`` with no arguments), its evaluation (``scripts/eval.py``) and, with
``--video``, the demo clip's preparation at 128x128 (the model files and the ICT-FaceKit come from
the environment variables the README names; the clip's wheel from ``data/cache`` of this checkout).
``--setup`` first times the README's set-up command into a new virtual environment and runs
everything else with it. Each command's wall time is measured around the whole process, as a
user would with ``time``. Nothing else should run on the machine meanwhile: the table says
what was measured, when, on how many cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = 'pip install torch==2.13.0 && pip install -c constraints.txt -e ".[dev,video,cluster]"'


def timed(command: str, cwd: Path, env: dict[str, str], log: Path) -> float:
    """Run ``command`` in a shell; its wall time in seconds. Output goes to ``log``; a failure
    raises with the log's tail."""
    began = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(command, shell=True, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - began
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"'{command}' failed with exit code {proc.returncode}; its output ends:\n{tail}")
    return seconds


def fresh_clone(work: Path) -> Path:
    """A clone of this checkout's HEAD (committed work only) with ``../shared`` beside it."""
    clone = work / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (work / "shared").symlink_to(shared)
    return clone


def commands(video: bool) -> list[tuple[str, str]]:
    """(label, shell command) in README order after set-up."""
    rows = [("tests", "python -m pytest -q -p no:cacheprovider"),
            ("main job", "python scripts/train.py run_dir=outputs/train/main"),
            ("evaluation", "python scripts/eval.py run=outputs/train/main")]
    if video:
        rows.append(("video preparation (demo clip, 128x128)",
                     "python scripts/prepare_data.py source=demo_video video_preprocess.image_size=128"))
    return rows


def measure(setup: bool, video: bool, logs: Path) -> list[tuple[str, float]]:
    """Every command's wall time, in order."""
    work = Path(tempfile.mkdtemp(prefix="readme_times_"))
    clone = fresh_clone(work)
    # the clone's packages, not an editable install elsewhere; the environment as a user has it
    # (no OpenMP setting of our own: the commands' defaults are what is timed)
    env = {**os.environ, "PYTHONPATH": str(clone)}
    times = []
    if setup:
        subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
        env["PATH"] = f"{work / 'venv' / 'bin'}{os.pathsep}{env['PATH']}"
        env["VIRTUAL_ENV"] = str(work / "venv")
        times.append(("set-up (README command, new virtual environment)", timed(SETUP, clone, env, logs / "setup.log")))
    if video and (ROOT / "data" / "cache").is_dir():
        shutil.copytree(ROOT / "data" / "cache", clone / "data" / "cache")
    for label, command in commands(video):
        name = label.split(" (")[0].replace(" ", "_")
        times.append((label, timed(command, clone, env, logs / f"{name}.log")))
    shutil.rmtree(work, ignore_errors=True)
    return times


def table(times: list[tuple[str, float]]) -> str:
    """The markdown table with the machine and the date."""
    cores = os.cpu_count()
    lines = [f"Measured {dt.date.today().isoformat()} on a {cores}-core CPU machine, no GPU, nothing else "
             "running; each command from a fresh clone, wall time of the whole process.", "",
             "| command | wall time |", "|---|---|"]
    for label, seconds in times:
        lines.append(f"| {label} | {int(seconds // 60)} min {seconds % 60:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the table and writes it with ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true", help="also time the set-up command in a new venv")
    p.add_argument("--video", action="store_true", help="also time the demo clip's preparation")
    p.add_argument("--logs", default="outputs/readme_times", help="folder for each command's output")
    p.add_argument("--out", help="write the table to this file")
    args = p.parse_args(argv)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    try:
        text = table(measure(args.setup, args.video, logs.resolve()))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
