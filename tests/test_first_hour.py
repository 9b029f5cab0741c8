"""What a new user meets first: progress they can read without a terminal, an early preview."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio

from headkit.engine.runs import evaluate_run
from headkit.engine.trainer import preview_step
from tests.test_graphavatar_model import TINY_GENERATOR

ROOT = Path(__file__).resolve().parents[1]


def test_preview_comes_within_the_first_five_percent_of_steps():
    for max_steps, image_every in [(3000, 500), (30000, 2000), (100, 10), (6, 100), (200000, 500)]:
        first = preview_step(max_steps, image_every)
        assert 1 <= first <= max(1, 0.05 * max_steps) and first <= image_every


def test_train_script_piped_to_a_file_logs_progress_lines_and_writes_a_preview(tmp_path):
    run = tmp_path / "run"
    args = [f"data.generator.{k}={v}" for k, v in TINY_GENERATOR.items()] + [
        f"paths.data_dir={tmp_path / 'data'}", f"run_dir={run}", "trainer.max_steps=6", "trainer.log_every=2",
        "trainer.progress_seconds=0", "trainer.image_every=100", "trainer.device=cpu", "eval.video=false",
        "eval.timing_repeats=2", "model.unet.filters=[8,8]", "model.unet.K=2", "model.enhancer.channels=[4,8]",
        "model.warmup.steps=4", "model.warmup.fit_steps=4", "model.warmup.log_every=2"]
    with open(tmp_path / "out.txt", "w") as out:  # not a terminal: no bars, lines instead
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], stdout=out,
                              stderr=subprocess.STDOUT, timeout=600, cwd=tmp_path)
    text = (tmp_path / "out.txt").read_text()
    assert proc.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if "train " in line and "/6 (" in line]
    assert [line.split("train ")[1].split(",")[0] for line in lines] == ["2/6 (33%)", "4/6 (67%)", "6/6 (100%)"]
    assert "ETA" in lines[0] and "it/s" in lines[0] and "| loss=" in lines[0] and "psnr=" in lines[0]
    assert "\r" not in text  # no bar redraws in the file
    assert "2/6 (33%)" in (run / "train.log").read_text()  # Hydra's log file in the run folder too
    preview = iio.imread(run / "preview.png")
    assert preview.shape == (32, 64, 3)  # render | ground truth
    # The run's checkpoint loads as eval.py loads it (weights_only: plain values only in its state).
    metrics = evaluate_run(run, device="cpu", eval_cfg={"video": False, "timing_repeats": 1}, show_progress=False)
    assert metrics["steps"] == 6 and Path(metrics["eval_dir"]).parent == run / "eval"
