"""The shared training loop: metrics.json, resume equals an unkilled run, NaN stop, no overwrite."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from headkit.data.dataset import FrameDataset
from headkit.data.folder import write_subject_folder
from headkit.engine import ConfigMismatch, NonFiniteError
from headkit.engine.checkpoint import CheckpointManager
from headkit.engine.method import Method
from headkit.engine.runs import evaluate_run, find_latest_run, latest_metrics
from headkit.engine.trainer import train
from tests.conftest import load_repo_module, make_tiny_subject

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")


class TinyMethod(Method):
    """A per-pixel image plus an expression-driven tint: small, but uses the whole interface."""

    def __init__(self, subject, lr: float = 0.05, nan_at_step: int = -1, fail_before_training: bool = False):
        super().__init__()
        self.expression_dim = subject.expression_dim
        self.logits = torch.nn.Parameter(torch.zeros(subject.height, subject.width, 3))
        self.tint = torch.nn.Linear(subject.expression_dim, 3)
        self.lr = lr
        self.nan_at_step = nan_at_step
        self.fail_before_training = fail_before_training

    def before_training(self, context):
        if self.fail_before_training:
            context.logger.scalars({"warmup/loss": 1.0}, 0)  # something written before the failure
            raise RuntimeError("failed in the warm-up")

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


def make_cfg(tmp_path: Path, run_name: str = "run", model: dict | None = None, size: tuple[int, int] = (16, 12),
             **trainer):
    subject_dir = tmp_path / ("subject" if size == (16, 12) else f"subject_{size[0]}x{size[1]}")
    if not subject_dir.exists():
        write_subject_folder(make_tiny_subject(num_frames=8, num_test=2, width=size[0], height=size[1]),
                             subject_dir)
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=["~model", "data=subject", f"data.root={subject_dir}",
                                          f"run_dir={tmp_path / run_name}", "trainer.progress=false",
                                          "eval.video=false", "eval.timing_repeats=2"])
    with open_dict(cfg):
        cfg.model = OmegaConf.create({"_target_": f"{__name__}.TinyMethod", **(model or {})})
        cfg.trainer.update({**dict(max_steps=20, log_every=5, ckpt_every=5, image_every=10), **trainer})
    return cfg


def reference_renders(cfg, run: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(render, ground truth)`` ``[1, H, W, 3]`` of each test frame, made outside the trainer's
    evaluation: a fresh TinyMethod with the run's final checkpoint, on the subject read again."""
    subject = instantiate(cfg.data, _convert_="all")
    model = TinyMethod(subject)
    model.load_state_dict(CheckpointManager(run / "checkpoints").latest_valid()[1]["model"])
    test = FrameDataset(subject, "test")
    with torch.no_grad():
        return [(model.get_outputs(test.batch([i]))["image"].clamp(0, 1), test.batch([i])["image"])
                for i in range(len(test))]


def test_train_writes_metrics_and_renders(tmp_path):
    skimage_metrics = pytest.importorskip("skimage.metrics")
    cfg = make_cfg(tmp_path)
    with open_dict(cfg):
        cfg.eval.lpips_weights = str(tmp_path / "no_alexnet.pth")  # the same outcome on every machine
    metrics = train(cfg)
    run = Path(metrics["run_dir"])
    saved = json.loads((run / "metrics.json").read_text())
    # image metrics against a hand computation on renders made outside the trainer
    pairs = reference_renders(cfg, run)
    mses = [float(((p.double() - g.double()) ** 2).mean()) for p, g in pairs]
    assert saved["l2"] == pytest.approx(np.mean(mses), rel=1e-5)
    assert saved["psnr"] == pytest.approx(np.mean([10 * np.log10(1 / m) for m in mses]), rel=1e-5)
    ssims = [skimage_metrics.structural_similarity(p[0].numpy(), g[0].numpy(), channel_axis=-1, data_range=1.0,
                                                   gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
             for p, g in pairs]
    assert saved["ssim"] == pytest.approx(np.mean(ssims), abs=1e-3)
    assert 0 < saved["l2"] < 0.2 and saved["psnr"] > 7  # trained towards the frames, not left at 0.5 grey
    # LPIPS without weights: null and the reason naming the missing file, never a number
    assert saved["lpips"] is None and "no_alexnet.pth" in saved["lpips_unavailable_reason"]
    assert saved["fps"] == pytest.approx(1000.0 / saved["time_per_frame_ms"]) and saved["time_per_frame_ms"] > 0
    assert saved["device"] == "cpu" and saved["config_name"] == cfg.experiment_name
    assert saved["steps"] == 20 and saved["method"] == "TinyMethod" and saved["num_test_frames"] == 2
    # per-pixel params (16*12*3) + linear (4*3+3) floats
    assert saved["model_size_mb"] == pytest.approx((16 * 12 * 3 + 15) * 4 / 2**20)
    renders = sorted((run / "test_renders").glob("*.png"))
    assert len(renders) == 2
    import imageio.v3 as iio
    for path, (pred, gt) in zip(renders, pairs):  # render | ground truth, 8-bit
        expected = torch.cat([pred[0], gt[0]], dim=1).numpy()
        assert np.abs(iio.imread(path) / 255.0 - expected).max() <= 0.5 / 255 + 1e-6
    assert (run / "config.yaml").is_file() and list(run.glob("tb/events.out.tfevents*"))
    lines = [json.loads(x) for x in (run / "scalars.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss/l1" in x] == [1, 5, 10, 15, 20]  # step 1, then every log_every
    assert all(x["loss/total"] == x["loss/l1"] > 0 for x in lines if "loss/l1" in x)
    assert not (run / ".not_started").exists()


def test_lpips_in_metrics_equals_a_direct_computation(tmp_path):
    """With (stand-in, seeded) AlexNet weights the run's LPIPS is a number > 0 equal to LPIPS of
    renders made outside the trainer; 0 or null would fail."""
    from headkit.lpips_net import AlexNetFeatures, clear_lpips_cache
    from headkit.metrics import lpips
    torch.manual_seed(0)
    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(AlexNetFeatures().state_dict(), weights)
    clear_lpips_cache()
    cfg = make_cfg(tmp_path, "lpips", size=(32, 32), max_steps=4)
    with open_dict(cfg):
        cfg.eval.lpips_weights = str(weights)
    try:
        saved = json.loads((Path(train(cfg)["run_dir"]) / "metrics.json").read_text())
        expected = np.mean([lpips(p, g, alexnet_path=weights).item() for p, g in reference_renders(cfg, tmp_path / "lpips")])
    finally:
        clear_lpips_cache()
    assert expected > 1e-3
    assert saved["lpips"] == pytest.approx(expected, rel=1e-5)
    assert "lpips_unavailable_reason" not in saved


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
    with pytest.warns(UserWarning, match="already holds a run") as record:
        second = train(make_cfg(tmp_path, "same", max_steps=3))
    assert Path(second["run_dir"]).name == "same-1"
    message = str(record[0].message)  # command-line spelling, and only options train.py has
    assert f"(trainer.resume=true run_dir={tmp_path / 'same'} continues it)" in message
    assert "resume=True" not in message and "overwrite" not in message


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a full disk


def test_resume_with_every_checkpoint_unreadable_stops_and_names_them(tmp_path):
    from headkit.cli import describe, user_errors
    from headkit.engine.checkpoint import NothingToResume
    train(make_cfg(tmp_path, "broken", max_steps=10))
    run = tmp_path / "broken"
    paths = [p for _, p in CheckpointManager(run / "checkpoints").checkpoints()]
    assert [p.name for p in paths] == ["ckpt_00000005.pt", "ckpt_00000010.pt"]
    for path in paths:
        _corrupt(path)
    before = _hashes(run)
    with pytest.raises(NothingToResume) as info:
        train(make_cfg(tmp_path, "broken", max_steps=20, resume=True))
    message = str(info.value)
    assert "none of the 2 checkpoint(s)" in message and all(str(p) in message for p in paths)
    assert _hashes(run) == before  # metrics, curves, config and the broken files untouched
    assert isinstance(info.value, user_errors())  # scripts print it as one error: line with its hint
    line, hint = describe(info.value)
    assert "\n" not in line and "trainer.resume=true" in hint and "run_dir=" in hint


def test_skipped_corrupt_checkpoint_is_logged_for_train_log(tmp_path, caplog):
    train(make_cfg(tmp_path, "skip", max_steps=10))
    _corrupt(CheckpointManager(tmp_path / "skip" / "checkpoints").path_for(10))
    log_file = tmp_path / "train.log"  # what Hydra's file handler on the root logger does
    handler = logging.FileHandler(log_file)
    logging.getLogger().addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING):
            resumed = train(make_cfg(tmp_path, "skip", max_steps=12, resume=True))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert resumed["steps"] == 12
    assert "ckpt_00000010.pt" in log_file.read_text() and "falling back" in log_file.read_text()
    lines = [json.loads(x) for x in (tmp_path / "skip" / "scalars.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss/l1" in x] == [1, 5, 6, 10]  # from 5: steps 6 (first after resume) and 10 again


def test_resume_refuses_a_finished_run_without_checkpoints_and_a_shorter_run(tmp_path):
    from headkit.engine.checkpoint import NothingToResume
    from headkit.errors import InvalidConfigValue
    train(make_cfg(tmp_path, "done", max_steps=10))
    with pytest.raises(InvalidConfigValue, match=r"trainer\.max_steps=5: .* already done 10 steps; "
                                                 r"pass trainer\.max_steps=10 or more"):
        train(make_cfg(tmp_path, "done", max_steps=5, resume=True))
    for _, path in CheckpointManager(tmp_path / "done" / "checkpoints").checkpoints():
        path.unlink()
    before = _hashes(tmp_path / "done")
    with pytest.raises(NothingToResume, match="metrics.json"):
        train(make_cfg(tmp_path, "done", max_steps=20, resume=True))
    assert _hashes(tmp_path / "done") == before


def test_extending_a_finished_run_continues_it(tmp_path):
    train(make_cfg(tmp_path, "short", max_steps=10))
    extended = train(make_cfg(tmp_path, "short", max_steps=15, resume=True))
    assert extended["steps"] == 15
    state = CheckpointManager(tmp_path / "short" / "checkpoints").latest_valid()[1]
    assert state["step"] == 15 and state["scheduler"]["last_epoch"] == 15
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.99 ** 15)  # ExponentialLR(0.99)
    assert OmegaConf.load(tmp_path / "short" / "config.yaml").trainer.max_steps == 15


def test_a_run_that_failed_before_its_first_step_does_not_block_its_run_dir(tmp_path):
    from hydra.errors import InstantiationException
    from headkit.engine.rundir import _hydra_run_dir
    run = tmp_path / "retry"
    bad = make_cfg(tmp_path, "retry", max_steps=3)
    bad.data.root = str(tmp_path / "no_such_subject")
    with pytest.raises(InstantiationException, match="subject folder not found"):
        train(bad)  # failed while loading the data
    assert (run / "config.yaml").is_file() and (run / ".not_started").is_file()
    assert _hydra_run_dir(str(run), False, "dated") == str(run)  # Hydra's log goes there too
    with pytest.raises(RuntimeError, match="warm-up"):  # failed after the logger and checkpoints/ were made
        train(make_cfg(tmp_path, "retry", max_steps=3, model={"fail_before_training": True}))
    assert (run / "scalars.jsonl").read_text() and list(run.glob("tb/events*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "already holds a run" warning
        metrics = train(make_cfg(tmp_path, "retry", max_steps=3))
    assert metrics["run_dir"] == str(run) and not (tmp_path / "retry-1").exists()
    assert not (run / ".not_started").exists() and len(list(run.glob("tb/events*"))) == 1
    lines = [json.loads(x) for x in (run / "scalars.jsonl").read_text().splitlines()]
    assert not any("warmup/loss" in x for x in lines)  # the failed start's records are gone
    # once a step is done the folder holds a run: the next one goes to a sibling
    assert _hydra_run_dir(str(run), False, "dated") == "dated"
    with pytest.warns(UserWarning, match="retry-1"):
        train(make_cfg(tmp_path, "retry", max_steps=3))


def test_a_not_started_folder_of_a_live_process_is_never_cleared(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from headkit.engine.rundir import NOT_STARTED, make_run_dir
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name, owner, reused in (("live", f"{socket.gethostname()} {os.getppid()}", False),  # e.g. in its warm-up
                                ("other_host", f"not-{socket.gethostname()} {gone.pid}", False),
                                ("gone", f"{socket.gethostname()} {gone.pid}", True)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / NOT_STARTED).write_text(owner + "\n")
        (folder / "config.yaml").write_text("a: 1\n")
        if reused:
            assert make_run_dir(folder) == folder and not (folder / "config.yaml").exists()
        else:
            with pytest.warns(UserWarning, match="already holds a run"):
                assert make_run_dir(folder) == tmp_path / f"{name}-1"
            assert (folder / "config.yaml").read_text() == "a: 1\n"


def test_resume_of_a_run_that_failed_before_its_first_step_starts_afresh(tmp_path):
    bad = make_cfg(tmp_path, "again", max_steps=3)
    bad.data.root = str(tmp_path / "no_such_subject")
    with pytest.raises(Exception, match="subject folder not found"):
        train(bad)
    # resuming with the corrected config is no config mismatch: there is nothing to resume
    metrics = train(make_cfg(tmp_path, "again", max_steps=3, resume=True))
    assert metrics["steps"] == 3 and metrics["run_dir"] == str(tmp_path / "again")
    assert OmegaConf.load(tmp_path / "again" / "config.yaml").data.root == str(tmp_path / "subject")


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
    ablation = load_repo_module("scripts/ablation_table.py")
    nc_table = load_repo_module("scripts/neuralcache_table.py")
    real_video = load_repo_module("benchmarks/real_video.py")
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
    assert "| 30.00 | 21.00 | n/a | 1.0 |" in real_video.format_table([row])  # no GGO: n/a
    assert "| 21.00 | 31.50 / 22.25 | 1.0 |" in real_video.format_table(
        [{**row, "psnr_train_ggo": 31.5, "psnr_before_enhancer_train_ggo": 22.25}])

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
