"""Run engine: seeding, run folders, config/metrics files, checkpoints, logging, guards."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from headkit import engine
from headkit.engine import checkpoint as ckpt_module
from headkit.progress import LineProgress

REPO_ROOT = Path(__file__).resolve().parents[1]


def _draws():
    return (random.random(), np.random.normal(size=3).tolist(), torch.randn(3).tolist())


# ---------------------------------------------------------------- seeding and RNG state

def test_seed_everything_reproducible():
    engine.seed_everything(7)
    first = _draws()
    engine.seed_everything(7)
    assert _draws() == first
    engine.seed_everything(8)
    assert _draws() != first
    with pytest.raises(ValueError, match="non-negative int"):
        engine.seed_everything(-1)


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    engine.seed_everything(0)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    manager = engine.CheckpointManager(tmp_path)
    manager.save({"rng": engine.capture_rng_state()}, step=1)
    expected = _draws()
    _draws()  # move every generator on
    _, state = manager.latest_valid()  # loads with weights_only=True
    engine.restore_rng_state(state["rng"])
    assert _draws() == expected


# ---------------------------------------------------------------- run folders

def test_make_run_dir_never_reuses_a_run(tmp_path):
    first = engine.make_run_dir(tmp_path, "exp")
    assert first == tmp_path / "exp" and first.is_dir()
    assert engine.make_run_dir(tmp_path, "exp") == first  # still empty: reused
    (first / "config.yaml").write_text("a: 1\n")
    with pytest.warns(UserWarning, match="exp-1"):
        second = engine.make_run_dir(tmp_path, "exp")
    assert second == tmp_path / "exp-1" and second.is_dir()
    (second / "metrics.json").write_text("{}")
    with pytest.warns(UserWarning, match="exp-2"):
        assert engine.make_run_dir(tmp_path, "exp") == tmp_path / "exp-2"
    assert (first / "config.yaml").read_text() == "a: 1\n"  # untouched
    assert engine.make_run_dir(tmp_path, "exp", resume=True) == first
    with pytest.raises(ValueError, match="contradict"):
        engine.make_run_dir(tmp_path, "exp", resume=True, overwrite=True)


def test_make_run_dir_hydra_folder_and_overwrite(tmp_path):
    hydra_dir = tmp_path / "outputs" / "12-00-00"
    (hydra_dir / ".hydra").mkdir(parents=True)
    (hydra_dir / ".hydra" / "config.yaml").write_text("x: 1\n")
    (hydra_dir / "train.log").write_text("log\n")
    assert engine.make_run_dir(hydra_dir) == hydra_dir  # Hydra's own files are not a run
    (hydra_dir / "config.yaml").write_text("x: 1\n")
    (hydra_dir / "checkpoints").mkdir()
    (hydra_dir / "checkpoints" / "ckpt_00000001.pt").write_bytes(b"x")
    with pytest.warns(UserWarning, match="12-00-00-1"):
        assert engine.make_run_dir(hydra_dir) == tmp_path / "outputs" / "12-00-00-1"
    assert engine.make_run_dir(hydra_dir, overwrite=True) == hydra_dir
    assert sorted(p.name for p in hydra_dir.iterdir()) == [".hydra", "train.log"]
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="photos"):
        engine.make_run_dir(stranger, overwrite=True)
    assert (stranger / "holiday.jpg").exists()


def test_config_saved_resolved_and_compared(tmp_path):
    cfg = OmegaConf.create({"data": {"size": 64, "root": "/d"}, "model": {"k": 2, "width": "${data.size}"},
                            "trainer": {"max_steps": 100, "lrs": [1e-3, 1e-4]}})
    engine.save_config(tmp_path, cfg)
    saved = engine.load_config(tmp_path)
    assert saved.model.width == 64 and "${" not in (tmp_path / "config.yaml").read_text()
    engine.check_config_compatible(saved, cfg)
    changed = OmegaConf.merge(cfg, {"model": {"k": 5}, "trainer": {"max_steps": 200, "lrs": [1e-3, 5e-4]},
                                    "extra": {"flag": True}})
    with pytest.raises(engine.ConfigMismatch) as info:
        engine.check_config_compatible(saved, changed)
    keys = [d[0] for d in info.value.differences]
    assert keys == ["extra.flag", "model.k", "trainer.lrs.1", "trainer.max_steps"]
    assert "model.k: 2 -> 5" in str(info.value) and "'<absent>' -> True" in str(info.value)
    with pytest.raises(engine.ConfigMismatch) as info:
        engine.check_config_compatible(saved, changed, ignore=("trainer", "extra.*"))
    assert [d[0] for d in info.value.differences] == ["model.k"]
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        engine.load_config(tmp_path / "nothing")


def test_write_metrics_json_safe(tmp_path):
    metrics = {"psnr": torch.tensor(31.5), "ssim": np.float32(0.5), "lpips": None,
               "per_frame": torch.tensor([1.0, 2.0]), "device": torch.device("cpu"),
               "bad": float("nan"), "nested": {"inf": float("inf")}, "steps": np.int64(3)}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        path = engine.write_metrics(tmp_path, metrics)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(path.read_text(), parse_constant=no_constants)
    assert data["psnr"] == 31.5 and data["ssim"] == 0.5 and data["lpips"] is None
    assert data["per_frame"] == [1.0, 2.0] and data["device"] == "cpu" and data["steps"] == 3
    assert data["bad"] is None and data["nested"]["inf"] is None
    assert data["_nonfinite"] == {"bad": "nan", "nested.inf": "inf"}
    engine.write_metrics(tmp_path, {"fps": 30}, merge=True)
    assert engine.read_metrics(tmp_path)["fps"] == 30 and engine.read_metrics(tmp_path)["psnr"] == 31.5
    with pytest.raises(TypeError, match="'nested.obj'"):
        engine.write_metrics(tmp_path, {"nested": {"obj": object()}})
    assert engine.read_metrics(tmp_path)["fps"] == 30  # failed write left the file alone


def test_atomic_open_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with engine.atomic_open(target, "w") as f:
            f.write("partial new cont")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# ---------------------------------------------------------------- checkpoints

def _ckpt_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_checkpoint_keep_n_and_named(tmp_path):
    manager = engine.CheckpointManager(tmp_path, keep=3)
    for step in range(1, 6):
        manager.save({"step": step, "w": torch.full((4,), float(step))}, step)
    manager.save_named({"step": 2}, "best")
    assert _ckpt_names(tmp_path) == ["best.pt", "ckpt_00000003.pt", "ckpt_00000004.pt", "ckpt_00000005.pt"]
    path, state = manager.latest_valid()
    assert path.name == "ckpt_00000005.pt" and state["step"] == 5
    assert torch.equal(state["w"], torch.full((4,), 5.0))
    with pytest.raises(ValueError, match="clashes"):
        manager.save_named({}, "ckpt_00000009")


def test_truncated_and_bitflipped_checkpoints_are_skipped(tmp_path):
    manager = engine.CheckpointManager(tmp_path, keep=None)
    for step in (10, 20, 30):
        manager.save({"step": step, "w": torch.arange(1000.0) + step}, step)
    newest, middle = manager.path_for(30), manager.path_for(20)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    raw = bytearray(middle.read_bytes())
    start = raw.index(b"data/0") + 200  # inside the tensor bytes: only the CRC can tell
    raw[start:start + 16] = b"\xff" * 16
    middle.write_bytes(bytes(raw))
    with pytest.warns(engine.CorruptCheckpointWarning) as record:
        path, state = manager.latest_valid()
    assert path == manager.path_for(10) and state["step"] == 10
    messages = [str(w.message) for w in record]
    assert any("ckpt_00000030.pt" in m for m in messages)
    assert any("ckpt_00000020.pt" in m and "CRC" in m for m in messages)
    # resuming from step 10 and saving again must never prune the good checkpoints
    pruning = engine.CheckpointManager(tmp_path, keep=1)
    pruning.save({"step": 15}, 15)
    assert _ckpt_names(tmp_path) == ["ckpt_00000015.pt", "ckpt_00000020.pt", "ckpt_00000030.pt"]
    with pytest.warns(engine.CorruptCheckpointWarning):
        assert pruning.latest_valid()[1]["step"] == 15
    manager.path_for(15).unlink()
    manager.save({"step": 10}, 10)
    manager.path_for(10).write_bytes(b"garbage")
    with pytest.warns(engine.CorruptCheckpointWarning) as record:
        assert manager.latest_valid() is None
    assert len(record) == 3 and "ckpt_00000010.pt" in str(record[-1].message)


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    manager = engine.CheckpointManager(tmp_path, keep=2)
    manager.save({"step": 1}, 1)

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        manager.save({"step": 2}, 2)
    assert _ckpt_names(tmp_path) == ["ckpt_00000001.pt"]
    monkeypatch.undo()
    assert manager.latest_valid()[1]["step"] == 1


KILLED_WRITER = """
import sys, time, torch
from headkit.engine import CheckpointManager
manager = CheckpointManager(sys.argv[1], keep=2)
def slow_save(obj, f):
    f.write(b"PK\\x03\\x04" + bytes(100000))
    f.flush()
    open(sys.argv[2], "w").close()  # tell the parent we are mid-write
    time.sleep(60)
torch.save = slow_save
manager.save({"step": 2}, 2)
"""


def test_sigkill_mid_write_keeps_previous(tmp_path):
    ckpt_dir, ready = tmp_path / "ckpts", tmp_path / "ready"
    engine.CheckpointManager(ckpt_dir).save({"step": 1, "w": torch.ones(3)}, 1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(ckpt_dir), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, "writer exited before reaching the write"
            assert time.monotonic() < deadline, "writer never reached the write"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    names = _ckpt_names(ckpt_dir)
    assert [n for n in names if n.startswith("ckpt_")] == ["ckpt_00000001.pt"]
    assert any(n.startswith(".ckpt_00000002.pt.tmp-") for n in names)  # the partial write, hidden
    manager = engine.CheckpointManager(ckpt_dir)  # removes the dead writer's temp file
    assert _ckpt_names(ckpt_dir) == ["ckpt_00000001.pt"]
    path, state = manager.latest_valid()
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_unsafe_objects_are_an_error_not_corruption(tmp_path):
    manager = engine.CheckpointManager(tmp_path)
    manager.save({"step": 1, "obj": Path("x")}, 1)  # pickles, but weights_only refuses it
    with pytest.raises(engine.CheckpointError, match="weights_only"):
        manager.latest_valid()


def _train(model, optimizer, scheduler, steps, start=0):
    losses = []
    for _ in range(start, steps):
        inputs = torch.randn(8, 4)
        loss = (model(inputs) - inputs.sum(dim=1, keepdim=True)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def _fresh():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    model, optimizer, scheduler = _fresh()
    _train(model, optimizer, scheduler, 5)
    manager = engine.CheckpointManager(tmp_path / "ckpts")
    manager.save(engine.make_checkpoint_state(5, model, optimizer, scheduler, config={"lr": 1e-2}), 5)
    reference = _train(model, optimizer, scheduler, 10, start=5)

    torch.manual_seed(123)  # a restarted process: different weights and RNG
    resumed_model, resumed_opt, resumed_sched = _fresh()
    start = engine.resume_or_start(manager, resumed_model, resumed_opt, resumed_sched)
    assert start == 5
    assert _train(resumed_model, resumed_opt, resumed_sched, 10, start=start) == reference
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert engine.resume_or_start(engine.CheckpointManager(tmp_path / "empty"), resumed_model) == 0
    manager.save({"step": 6, "model": resumed_model.state_dict()}, 6)
    with pytest.raises(engine.CheckpointError, match="'optimizer'"):
        engine.resume_or_start(manager, resumed_model, resumed_opt)


# ---------------------------------------------------------------- logging

def test_run_logger_events_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with engine.RunLogger(tmp_path) as logger:
        for step in range(3):
            values = {"loss": torch.tensor(1.0 / (step + 1)), "psnr": 20.0 + step}
            logger.scalars(values, step, prefix="train/")
        logger.scalars({"loss": float("nan")}, 3, prefix="train/")
        logger.images({"render": torch.rand(8, 6, 3), "depth": torch.rand(8, 6)}, step=2)
        with pytest.raises(ValueError, match="'train/vec' at step 4 has 2 elements"):
            logger.scalars({"vec": torch.ones(2)}, 4, prefix="train/")
        with pytest.raises(ValueError, match="'bad'"):
            logger.image("bad", torch.rand(3, 8, 6), 0)
    rows = engine.read_scalars(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["train/loss"] == 0.5 and rows[2]["train/psnr"] == 22.0 and rows[3]["train/loss"] is None
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/psnr")] == [20.0, 21.0, 22.0]
    assert set(acc.Tags()["images"]) == {"render", "depth"}

    resumed = engine.RunLogger(tmp_path, purge_step=2, tensorboard=False)
    resumed.scalars({"train/loss": 9.0}, 2)
    resumed.close()
    rows = engine.read_scalars(tmp_path)
    assert [(r["step"], r["train/loss"]) for r in rows] == [(0, 1.0), (1, 0.5), (2, 9.0)]

    quiet = tmp_path / "quiet"
    engine.RunLogger(quiet, enabled=False).scalars({"a": 1.0}, 0)
    assert not quiet.exists()


def test_save_image_rounds(tmp_path):
    import imageio.v3 as iio

    image = torch.rand(5, 7, 3)
    path = engine.save_image(tmp_path / "renders" / "0000.png", image)
    assert np.array_equal(iio.imread(path), np.round(image.numpy() * 255).astype(np.uint8))


def test_progress_disabled_by_env(monkeypatch):
    monkeypatch.setenv("HEADKIT_NO_PROGRESS", "1")
    assert not engine.progress_enabled()
    bar = engine.progress(4, desc="x")
    assert isinstance(bar, LineProgress) and list(bar) == [0, 1, 2, 3]  # lines instead of a bar
    assert list(engine.progress(["a", "b"], enabled=True, file=open(os.devnull, "w"))) == ["a", "b"]


def test_progress_lines_every_n_items_with_rate_eta_and_postfix(caplog):
    bar = engine.progress(range(10), desc="train", enabled=False, every=3, min_seconds=0.0, total=10)
    with caplog.at_level(logging.INFO, logger="headkit.progress"):
        for i in bar:
            bar.set_postfix(loss=f"{0.5 - i / 100:.2f}")
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == ["train 3/10 (30%)", "train 6/10 (60%)",
                                                      "train 9/10 (90%)", "train 10/10 (100%)"]
    assert all("it/s" in line and "elapsed" in line for line in lines)
    assert "ETA" in lines[0] and "ETA" not in lines[-1]  # nothing left at the end
    assert lines[0].endswith("| loss=0.48") and lines[-1].endswith("| loss=0.41")


def test_progress_lines_wait_for_min_seconds_but_not_past_max_seconds(caplog):
    with caplog.at_level(logging.INFO, logger="headkit.progress"):
        list(LineProgress(range(50), "slow", every=1, min_seconds=3600.0))  # only the final line
        assert [r.getMessage().split(",")[0] for r in caplog.records] == ["slow 50/50 (100%)"]
        caplog.clear()
        list(LineProgress(range(5), "stuck", every=100, min_seconds=3600.0, max_seconds=0.0))
        assert len(caplog.records) == 5  # max_seconds passed after every item: a line each time
        caplog.clear()
        bar = LineProgress(iter(()), "bytes", total=2048, unit="B", min_seconds=0.0)
        bar.update(1024)
        bar.close()
        bar.close()
        assert [r.getMessage().split(",")[0] for r in caplog.records] == ["bytes 1024/2048 (50%)"]  # no repeat
        assert "B/s" in caplog.records[0].getMessage()


# ---------------------------------------------------------------- guards

def test_check_finite_names_tensor_and_step():
    engine.check_finite({"loss": torch.tensor(1.0), "aux": 2.0}, step=3)
    rgbs = torch.tensor([0.0, float("nan"), float("inf"), 1.0])
    with pytest.raises(engine.NonFiniteError, match=r"step 7: non-finite values in 'rgb' \(1 NaN and 1 Inf of 4\)"):
        engine.check_finite({"loss": torch.tensor(1.0), "rgb": rgbs}, 7)
    with pytest.raises(engine.NonFiniteError, match="'scale'"):
        engine.check_finite({"scale": float("-inf")}, 0)


def test_check_finite_grads_names_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model(torch.ones(1, 2)).sum().backward()
    engine.check_finite_grads(model, 1)
    model[1].weight.grad[0, 0] = float("nan")
    with pytest.raises(engine.NonFiniteError, match="step 2: non-finite values in '1.weight.grad'") as info:
        engine.check_finite_grads(model, 2)
    assert info.value.name == "1.weight.grad" and info.value.step == 2


def test_device_from_string(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine.device_from_string("cpu") == torch.device("cpu")
    assert engine.device_from_string("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda:0' asked for but CUDA is not available"):
        engine.device_from_string("cuda:0")
    with pytest.raises(ValueError, match="'banana' is not a device"):
        engine.device_from_string("banana")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert engine.device_from_string("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        engine.device_from_string("cuda:1")


def test_explain_oom_names_knobs():
    knobs = {"data.resolution": 512, "trainer.batch_size": 4, "model.k": 10}
    with pytest.raises(torch.OutOfMemoryError) as info:
        with engine.explain_oom(knobs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    message = str(info.value)
    assert "data.resolution=512" in message and "trainer.batch_size=4" in message and "model.k=10" in message
    assert "Tried to allocate 2.00 GiB" in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    with pytest.raises(torch.OutOfMemoryError, match="batch size"):
        with engine.explain_oom():
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB")
    with pytest.raises(RuntimeError, match="^unrelated$"):
        with engine.explain_oom(knobs):
            raise RuntimeError("unrelated")
