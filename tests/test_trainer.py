"""The shared training loop: metrics.json, resume equals an unkilled run, NaN stop, no overwrite."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from headkit.data.folder import write_subject_folder
from headkit.engine import ConfigMismatch, NonFiniteError
from headkit.engine.checkpoint import CheckpointManager
from headkit.engine.method import Method
from headkit.engine.runs import evaluate_run, find_latest_run, latest_metrics
from headkit.engine.trainer import train
from tests.conftest import make_tiny_subject

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")


class TinyMethod(Method):
    """A per-pixel image plus an expression-driven tint: small, but uses the whole interface."""

    def __init__(self, subject, lr: float = 0.05, nan_at_step: int = -1):
        super().__init__()
        self.expression_dim = subject.expression_dim
        self.logits = torch.nn.Parameter(torch.zeros(subject.height, subject.width, 3))
        self.tint = torch.nn.Linear(subject.expression_dim, 3)
        self.lr = lr
        self.nan_at_step = nan_at_step

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, 0.99)

    def get_outputs(self, batch):
        tint = self.tint(batch["expression"])[:, None, None, :]  # [B,1,1,3]
        return {"image": torch.sigmoid(self.logits[None] + 0.01 * tint)}

    def get_loss_dict(self, outputs, batch, step):
        l1 = (outputs["image"] - batch["image"]).abs().mean()
        if step == self.nan_at_step:
            l1 = l1 * float("nan")
        return {"l1": l1}


def make_cfg(tmp_path: Path, run_name: str = "run", model: dict | None = None, **trainer):
    subject_dir = tmp_path / "subject"
    if not subject_dir.exists():
        write_subject_folder(make_tiny_subject(num_frames=8, num_test=2), subject_dir)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=["~model", "data=subject", f"data.root={subject_dir}",
                                          f"run_dir={tmp_path / run_name}", "trainer.progress=false",
                                          "eval.video=false", "eval.timing_repeats=2"])
    with open_dict(cfg):
        cfg.model = OmegaConf.create({"_target_": f"{__name__}.TinyMethod", **(model or {})})
        cfg.trainer.update({**dict(max_steps=20, log_every=5, ckpt_every=5, image_every=10), **trainer})
    return cfg


def test_train_writes_metrics_and_renders(tmp_path):
    metrics = train(make_cfg(tmp_path))
    run = Path(metrics["run_dir"])
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("psnr", "ssim", "l2", "lpips", "time_per_frame_ms", "fps", "model_size_mb", "device",
                "config_name"):
        assert key in saved, key
    assert saved["lpips"] is None or saved["lpips"] >= 0
    if saved["lpips"] is None:
        assert saved["lpips_unavailable_reason"]
    # per-pixel params (16*12*3) + linear (4*3+3) floats
    assert saved["model_size_mb"] == pytest.approx((16 * 12 * 3 + 15) * 4 / 2**20)
    assert len(list((run / "test_renders").glob("*.png"))) == 2
    assert (run / "config.yaml").is_file() and list(run.glob("tb/events.out.tfevents*"))
    lines = [json.loads(x) for x in (run / "scalars.jsonl").read_text().splitlines()]
    assert any("loss/l1" in (x.get("values") or x) for x in lines)


def test_resume_matches_an_unkilled_run(tmp_path):
    full = train(make_cfg(tmp_path, "full"))
    train(make_cfg(tmp_path, "split", max_steps=10))
    resumed = train(make_cfg(tmp_path, "split", resume=True))
    assert resumed["steps"] == 20
    a = CheckpointManager(tmp_path / "full" / "checkpoints").latest_valid()[1]["model"]
    b = CheckpointManager(tmp_path / "split" / "checkpoints").latest_valid()[1]["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert resumed["psnr"] == pytest.approx(full["psnr"], abs=1e-4)


def test_resume_with_incompatible_config_lists_keys(tmp_path):
    train(make_cfg(tmp_path, "r", max_steps=5))
    cfg = make_cfg(tmp_path, "r", resume=True)
    cfg.seed = 7
    with pytest.raises(ConfigMismatch, match="seed"):
        train(cfg)


def test_nan_loss_stops_and_keeps_last_good_state(tmp_path):
    cfg = make_cfg(tmp_path, "nan", model={"nan_at_step": 7})
    with pytest.raises(NonFiniteError, match="step 7"):
        train(cfg)
    path, state = CheckpointManager(tmp_path / "nan" / "checkpoints").latest_valid()
    assert state["step"] == 7 and state["stopped_by"] == "non-finite"
    assert torch.isfinite(state["model"]["logits"]).all()


def test_existing_run_is_never_overwritten(tmp_path):
    train(make_cfg(tmp_path, "same", max_steps=3))
    with pytest.warns(UserWarning, match="already holds a run"):
        second = train(make_cfg(tmp_path, "same", max_steps=3))
    assert Path(second["run_dir"]).name == "same-1"


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except its ``eval/`` folder, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] != "eval"}


def test_eval_script_function_reevaluates_latest_run_beside_the_training(tmp_path):
    train(make_cfg(tmp_path, "ev", max_steps=4))
    run = find_latest_run(tmp_path)
    assert run.name == "ev"
    before = _hashes(run)
    assert "metrics.json" in before and any(k.startswith("test_renders/") for k in before)
    assert latest_metrics(run) == (json.loads((run / "metrics.json").read_text()), "training")
    ecfg = {"video": False, "timing_repeats": 2}
    metrics = evaluate_run(run, device="cpu", eval_cfg=ecfg, show_progress=False, name="first")
    assert metrics["steps"] == 4 and metrics["psnr"] > 0
    out = run / "eval" / "first"
    assert metrics["eval_dir"] == str(out)
    assert _hashes(run) == before  # the training's files are byte-identical
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("psnr", "ssim", "l2", "time_per_frame_ms", "run_dir", "checkpoint", "steps", "config_name",
                "method", "evaluated_at"):
        assert key in saved, key
    assert saved["run_dir"] == str(run) and saved["steps"] == 4 and saved["method"] == "TinyMethod"
    assert len(list((out / "test_renders").glob("*.png"))) == 2
    assert latest_metrics(run) == (saved, "eval/first")

    first = (out / "metrics.json").read_bytes()
    with pytest.warns(UserWarning, match="already holds an evaluation"):
        again = evaluate_run(run, device="cpu", eval_cfg=ecfg, show_progress=False, name="first")
    assert again["eval_dir"] == str(run / "eval" / "first-1")
    assert (out / "metrics.json").read_bytes() == first and _hashes(run) == before
    dated = evaluate_run(run, device="cpu", eval_cfg=ecfg, show_progress=False)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(-\d+)?", Path(dated["eval_dir"]).name)
    assert Path(dated["eval_dir"]).parent == run / "eval" and _hashes(run) == before
    with pytest.raises(ValueError, match="plain folder name"):
        evaluate_run(run, device="cpu", eval_cfg=ecfg, show_progress=False, name="../escape")
    with pytest.raises(ValueError, match="overwrite=true"):
        evaluate_run(run, device="cpu", eval_cfg=ecfg, show_progress=False, name="x", overwrite=True)

    replaced = evaluate_run(run, device="cpu", eval_cfg=ecfg, show_progress=False, overwrite=True)
    assert replaced["eval_dir"] == str(run)
    own = json.loads((run / "metrics.json").read_text())
    assert own["evaluated_at"] == replaced["evaluated_at"] and own["checkpoint"] == replaced["checkpoint"]
    assert "train_seconds" in own and "eval_dir" not in own  # merged into the training's file
    assert latest_metrics(run) == (own, "training (re-evaluated)")


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_latest_metrics_picks_the_newest_evaluation_and_names_bad_files(tmp_path):
    run = tmp_path / "run"
    (run / "eval" / "b").mkdir(parents=True)
    (run / "eval" / "a").mkdir()
    (run / "metrics.json").write_text(json.dumps({"psnr": 20.0}))
    (run / "eval" / "a" / "metrics.json").write_text(json.dumps({"psnr": 22.0, "evaluated_at": "2030-01-02T00:00:00"}))
    (run / "eval" / "b" / "metrics.json").write_text(json.dumps({"psnr": 21.0, "evaluated_at": "2030-01-01T00:00:00"}))
    assert latest_metrics(run) == ({"psnr": 22.0, "evaluated_at": "2030-01-02T00:00:00"}, "eval/a")
    (run / "eval" / "b" / "metrics.json").write_text("{broken")
    with pytest.raises(ValueError, match=re.escape(str(run / "eval" / "b" / "metrics.json"))):
        latest_metrics(run)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none" / "metrics.json"))):
        latest_metrics(tmp_path / "none")


def test_gatherers_read_the_newest_evaluation_and_skip_eval_folders(tmp_path):
    ablation = _load_script(ROOT / "scripts" / "ablation_table.py")
    nc_table = _load_script(ROOT / "scripts" / "neuralcache_table.py")
    real_video = _load_script(ROOT / "benchmarks" / "real_video.py")
    for i, (name, psnr) in enumerate([("full", 27.5), ("no_ggo", 27.1)]):
        run = tmp_path / str(i)
        run.mkdir()
        (run / "config.yaml").write_text(f"ablation_name: {name}\n")
        table = {"t": {"title": "T", "columns": ["model", "psnr"], "rows": [{"model": name, "psnr": psnr}]}}
        (run / "metrics.json").write_text(json.dumps({"psnr": psnr, "tables": table}))
    evaluation = tmp_path / "0" / "eval" / "later"
    evaluation.mkdir(parents=True)
    table = {"t": {"title": "T", "columns": ["model", "psnr"], "rows": [{"model": "full", "psnr": 28.25}]}}
    (evaluation / "metrics.json").write_text(json.dumps({"psnr": 28.25, "evaluated_at": "2030-01-01T00:00:00",
                                                        "tables": table}))
    rows = ablation.collect(tmp_path)
    assert [(r["ablation"], r["source"]) for r in rows] == [("no_ggo", "training"), ("full", "eval/later")]
    text = ablation.markdown_table(rows)
    assert text.splitlines()[0].endswith("| metrics from |")
    assert "28.25" in text and "| eval/later |" in text and "27.50" not in text
    assert ablation.markdown_table(rows[:1]).endswith("\n\nmetrics from: training")
    tables, unfinished = nc_table.gather([tmp_path])
    assert [r["psnr"] for r in tables["t"]["rows"]] == [28.25, 27.1] and not unfinished
    assert "| full | 28.25 | eval/later |" in nc_table.table_text(tables["t"])
    row = {"run": "0", "tracker": "ict", "size": "16x12", "steps": 4, "gaussians": 9, "psnr": 28.25, "ssim": 0.9,
           "l2": 0.01, "lpips": None, "lpips_reason": None, "psnr_before_enhancer_test": 20.0, "psnr_train": 30.0,
           "psnr_before_enhancer_train": 21.0, "train_minutes": 1.0, "source": "eval/later"}
    assert real_video.format_table([row]).splitlines()[-1] == "metrics from: eval/later"
    assert real_video.format_table([row, {**row, "source": "training"}]).splitlines()[2].endswith("| eval/later |")

def test_invalid_value_names_key(tmp_path):
    cfg = make_cfg(tmp_path, "bad", batch_size=0)
    with pytest.raises(ValueError, match="trainer.batch_size=0"):
        train(cfg)


def test_missing_mandatory_value_is_one_clear_line(tmp_path):
    from headkit.engine.trainer import MissingConfigValue
    cfg = make_cfg(tmp_path, "missing")
    cfg.data.root = "???"
    with pytest.raises(MissingConfigValue, match=r"data\.root.*data\.root=\.\.\."):
        train(cfg)


def test_format_report_prints_method_tables_and_lpips_reason():
    from headkit.engine.evaluate import format_report
    metrics = {"psnr": 27.5, "lpips": None, "lpips_unavailable_reason": "no AlexNet weights",
               "tables": {"table1": {"title": "Table 1", "columns": ["model", "psnr"],
                                     "rows": [{"model": "DNR+", "psnr": 27.45}, {"model": "Ours", "psnr": 27.3}]}}}
    text = format_report(metrics, ["psnr", "lpips"])
    lines = text.splitlines()
    assert lines[2].split() == ["27.50", "n/a"]
    assert "Table 1" in lines and any(l.split() == ["Ours", "27.30"] for l in lines)
    assert lines[-1] == "LPIPS unavailable: no AlexNet weights"


def test_evaluation_bars_follow_headkit_no_progress(tmp_path, monkeypatch, capsys):
    train(make_cfg(tmp_path, "quiet", max_steps=2))
    capsys.readouterr()
    monkeypatch.setenv("HEADKIT_NO_PROGRESS", "1")
    evaluate_run(tmp_path / "quiet", device="cpu", eval_cfg={"video": False, "timing_repeats": 2},
                 show_progress=True)  # True = "if the environment allows", as for training bars
    assert "eval:" not in capsys.readouterr().err
