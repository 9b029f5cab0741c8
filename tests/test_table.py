"""scripts/table.py: runs grouped by a config key, mean ± std over subjects and seeds, CSV, plots.

The run folders are written by a fixture (config.yaml + metrics.json each, as the trainer writes
them); one case runs the real script with Hydra key=value arguments in a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from headkit.engine.runs import find_runs, run_value
from headkit.plot import log_ticks, scatter_plot_svg
from tests.conftest import load_repo_module

ROOT = Path(__file__).resolve().parents[1]


table = load_repo_module("scripts/table.py")

# (ablation, subject, seed) -> PSNR; size and time differ per ablation
PSNR = {("full", "anna", 0): 30.0, ("full", "anna", 1): 30.4, ("full", "ben", 0): 28.0, ("full", "ben", 1): 28.2,
        ("no_ggo", "anna", 0): 29.0, ("no_ggo", "anna", 1): 29.2, ("no_ggo", "ben", 0): 27.5,
        ("no_ggo", "ben", 1): 27.1}
SIZE = {"full": 0.9, "no_ggo": 12.0}
TIME = {"full": 40.0, "no_ggo": 35.0}


@pytest.fixture
def runs(tmp_path) -> Path:
    """A multirun-like folder: 2 ablations x 2 subjects x 2 seeds, LPIPS missing in one run, an
    unfinished run, a re-evaluated run (eval/ folder, newer), another experiment to filter out."""
    root = tmp_path / "multirun"
    for i, ((ablation, subject, seed), psnr) in enumerate(PSNR.items()):
        run = root / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text("hydra's copy: not a run of its own\n")
        (run / "config.yaml").write_text(f"experiment_name: synthetic_subject\nablation_name: {ablation}\n"
                                         f"seed: {seed}\nmodel:\n  variant: v{seed}\n")
        lpips = None if i == 3 else 0.1 + 0.01 * i
        metrics = {"psnr": psnr, "ssim": 0.9, "l2": 0.001, "lpips": lpips, "subject": subject, "device": "cpu",
                   "time_per_frame_ms": TIME[ablation] + seed, "model_size_mb": SIZE[ablation]}
        if lpips is None:
            metrics["lpips_unavailable_reason"] = "AlexNet weights not found at /nowhere"
        (run / "metrics.json").write_text(json.dumps(metrics))
    later = root / "0" / "eval" / "later"  # scripts/eval.py re-evaluated run 0: its newest metrics
    later.mkdir(parents=True)
    (later / "metrics.json").write_text(json.dumps({"psnr": 31.0, "ssim": 0.9, "l2": 0.001, "lpips": 0.1,
                                                    "subject": "anna", "device": "cpu", "time_per_frame_ms": 40.0,
                                                    "model_size_mb": 0.9, "evaluated_at": "2030-01-01T00:00:00"}))
    (root / "8").mkdir()
    (root / "8" / "config.yaml").write_text("experiment_name: synthetic_subject\nablation_name: full\nseed: 2\n")
    other = root / "9"
    other.mkdir()
    (other / "config.yaml").write_text("experiment_name: other\nablation_name: full\nseed: 0\n")
    (other / "metrics.json").write_text(json.dumps({"psnr": 10.0, "subject": "anna"}))
    return root


CFG = {"group": "ablation_name", "subject": "subject", "seed": "seed",
       "where": {"experiment_name": "synthetic_subject"},
       "metrics": ["psnr", "lpips", "time_per_frame_ms", "model_size_mb"], "order": ["no_ggo", "full"],
       "labels": {"full": "Full pipeline"}, "plot_y": "psnr", "plot_x": ["model_size_mb", "time_per_frame_ms"],
       "name": "table"}


def test_runs_are_found_and_their_keys_read(runs):
    found = find_runs(runs)
    assert [p.name for p in found] == [str(i) for i in range(10)]  # no .hydra, no eval/ folder
    assert run_value(found[0], "ablation_name") == "full" and run_value(found[0], "model.variant") == "v0"
    assert run_value(found[0], "subject", {"subject": "anna"}) == "anna"  # not in the config: metrics.json
    assert run_value(found[0], "missing.key") is None
    (found[1] / ".hydra" / "overrides.yaml").write_text("- ablation=no_ggo\n- seed=1\n")
    assert run_value(found[1], "ablation") == "no_ggo"  # a Hydra override when neither file has it


def test_groups_have_mean_and_std_over_subjects_and_seeds(runs):
    records = table.gather(runs, "ablation_name", where=CFG["where"])
    assert len(records) == 9  # 8 finished + 1 unfinished; the other experiment is filtered out
    rows = table.summarise(records, CFG["metrics"], CFG["order"], CFG["labels"])
    assert [(r["group"], r["label"]) for r in rows] == [("no_ggo", "no_ggo"), ("full", "Full pipeline")]
    full = rows[1]
    assert len(full["runs"]) == 4 and full["subjects"] == ["anna", "ben"] and full["seeds"] == ["0", "1"]
    assert full["unfinished"] == [str(runs / "8")] and full["sources"] == ["eval/later", "training"]
    expected = [31.0, 30.4, 28.0, 28.2]  # run 0 from its newer evaluation
    assert full["stats"]["psnr"]["mean"] == pytest.approx(statistics.fmean(expected))
    assert full["stats"]["psnr"]["std"] == pytest.approx(statistics.stdev(expected))
    assert full["stats"]["lpips"]["n"] == 3  # run 3 has no LPIPS
    by_variant = table.summarise(table.gather(runs, "model.variant", where=CFG["where"]), ["psnr"])
    assert [r["group"] for r in by_variant] == ["(none)", "v0", "v1"]  # the unfinished run has no variant


def test_markdown_csv_and_plots(runs, tmp_path):
    result = table.make_table({**CFG, "runs": str(runs), "out": str(tmp_path / "out")})
    text = result["markdown"]
    lines = text.splitlines()
    assert lines[0] == ("| ablation_name | runs | subjects | seeds | PSNR ↑ | LPIPS ↓ | Time (ms) ↓ "
                        "| Size (MB) ↓ | metrics from |")
    full = next(line for line in lines if line.startswith("| Full pipeline"))
    mean, std = statistics.fmean([31.0, 30.4, 28.0, 28.2]), statistics.stdev([31.0, 30.4, 28.0, 28.2])
    assert f"| 4 | 2 | 2 | {mean:.2f} ± {std:.2f} |" in full and "(3/4)" in full and "eval/later, training" in full
    assert "| ablation_name | anna | ben |" in text  # the per-subject table
    assert f"| no_ggo | {statistics.fmean([29.0, 29.2]):.2f} ± {statistics.stdev([29.0, 29.2]):.2f} |" in text
    assert "unfinished runs (no metrics.json): " + str(runs / "8") in text
    assert "LPIPS n/a: AlexNet weights not found at /nowhere" in text and "device: cpu" in text
    assert "mixes experiments" not in text
    mixed = table.make_table({**CFG, "runs": str(runs), "where": None, "out": str(tmp_path / "mixed")})["markdown"]
    assert "Full pipeline mixes experiments (other, synthetic_subject)" in mixed
    out = tmp_path / "out"
    assert (out / "table.md").read_text() == text
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["ablation_name"] for r in rows] == ["no_ggo", "full"]
    assert float(rows[1]["psnr_mean"]) == pytest.approx(mean) and float(rows[1]["psnr_std"]) == pytest.approx(std)
    assert rows[1]["lpips_n"] == "3" and rows[1]["subjects"] == "anna;ben"
    with open(out / "table_runs.csv") as f:
        per_run = list(csv.DictReader(f))
    assert len(per_run) == 9 and per_run[-1]["metrics_from"] == "unfinished" and per_run[-1]["psnr"] == ""
    for x in ("model_size_mb", "time_per_frame_ms"):
        svg = out / f"table_psnr_vs_{x}.svg"
        assert svg in result["files"]
        tree = ET.parse(svg)  # well-formed
        texts = [t.text for t in tree.iter("{http://www.w3.org/2000/svg}text")]
        assert "Full pipeline" in texts and "no_ggo" in texts
    size_plot = (out / "table_psnr_vs_model_size_mb.svg").read_text()
    assert "(log scale)" in size_plot  # 0.9 MB vs 12 MB
    assert "(log scale)" not in (out / "table_psnr_vs_time_per_frame_ms.svg").read_text()


def test_one_value_per_group_has_no_std_and_missing_plots_are_skipped(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("experiment_name: x\n")
    (run / "metrics.json").write_text(json.dumps({"psnr": 25.0}))
    result = table.make_table({**CFG, "runs": [str(tmp_path)], "where": {}, "group": "experiment_name", "out": None})
    assert "| x | 1 | 1 | 1 | 25.00 | n/a | n/a | n/a |" in result["markdown"]
    assert len(result["skipped"]) == 2 and (tmp_path / "table.md").is_file()


def test_script_takes_hydra_arguments(runs, tmp_path):
    env = {**os.environ, "HEADKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "hydra_out"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "table.py"), f"runs=[{runs}]", "group=ablation_name",
                           "where={experiment_name:synthetic_subject}", "metrics=[psnr,ssim]", f"out={out}",
                           "name=ablation", "labels={full:Full}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| Full | 4 | 2 | 2 |" in proc.stdout and (out / "ablation.md").is_file()
    assert sorted(p.name for p in out.iterdir()) == [
        "ablation.csv", "ablation.md", "ablation_psnr_vs_model_size_mb.svg", "ablation_psnr_vs_time_per_frame_ms.svg",
        "ablation_runs.csv"]
    assert not (tmp_path / ".hydra").exists() and not (tmp_path / "outputs").exists()
    missing = tmp_path / "nowhere"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "table.py"), f"runs={missing}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {missing}")
    assert "Traceback" not in proc.stderr


def test_scatter_plot_and_log_ticks(tmp_path):
    assert log_ticks(0.9, 12.0) == [0.5, 1.0, 2.0, 5.0, 10.0, 20.0]
    assert log_ticks(0.05, 300.0) == [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
    path = scatter_plot_svg(tmp_path / "p.svg", [
        {"label": "a <b>", "x": 1.0, "y": 30.0, "xerr": 0.1, "yerr": 0.5, "members": [(0.9, 29.6), (1.1, 30.4)]},
        {"label": "c", "x": 20.0, "y": 28.0}, {"label": "skipped", "x": None, "y": 1.0}], xlog=True, note="n")
    root = ET.parse(path).getroot()
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "a <b>" in texts and "c" in texts and "skipped" not in texts
    with pytest.raises(ValueError, match="no point"):
        scatter_plot_svg(tmp_path / "q.svg", [{"label": "x", "x": None, "y": None}])
