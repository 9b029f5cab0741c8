"""A real two-job multirun through hydra/launcher=local (submitit's local executor) on CPU.

Needs the ``cluster`` extra (``pip install -e ".[cluster]"``); skipped without it. Each job is
the tiny GraphAvatar run of tests/test_first_hour.py (a few seconds); the two jobs train two
synthetic subjects (generator seeds 0 and 1) side by side, and scripts/table.py gathers them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_graphavatar_model import TINY_GENERATOR
from tests.conftest import load_repo_module

pytest.importorskip("submitit")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

ROOT = Path(__file__).resolve().parents[1]


def test_two_job_sweep_runs_through_the_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    args = [f"data.generator.{k}={v}" for k, v in TINY_GENERATOR.items() if k != "seed"] + [
        "hydra/launcher=local", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}",
        f"paths.data_dir={tmp_path / 'data'}", "data.generator.seed=0,1", "trainer.max_steps=4",
        "trainer.log_every=2", "trainer.progress=false", "trainer.device=cpu", "eval.video=false",
        "eval.timing_repeats=1", "eval.lpips=false", "model.unet.filters=[8,8]", "model.unet.K=2",
        "model.enhancer.channels=[4,8]", "model.warmup.steps=2", "model.warmup.fit_steps=2",
        "model.warmup.log_every=2"]
    env = {**os.environ, "HEADKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HEADKIT_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "-m", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    metrics = [json.loads((sweep / str(job) / "metrics.json").read_text()) for job in (0, 1)]
    assert [m["steps"] for m in metrics] == [4, 4] and all(m["device"] == "cpu" for m in metrics)
    configs = [(sweep / str(job) / "config.yaml").read_text() for job in (0, 1)]
    assert "seed: 0" in configs[0].split("generator:")[1] and "seed: 1" in configs[1].split("generator:")[1]
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # one process (and log) per job
    table = load_repo_module("scripts/table.py")
    result = table.make_table({"runs": str(sweep), "group": "experiment_name", "subject": "data.generator.seed",
                               "seed": "seed", "metrics": ["psnr", "model_size_mb"], "plot_x": ["model_size_mb"],
                               "out": str(tmp_path / "table")})
    assert "| synthetic_subject | 2 | 2 | 1 |" in result["markdown"]
