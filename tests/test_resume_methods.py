"""Resume with the real methods, through ``train(cfg)``: a tiny GraphAvatar and a tiny neural-cache
model continue a run to exactly the parameters, optimiser state and metrics of an uninterrupted
run, and an extended run (``trainer.resume=true`` with a larger ``trainer.max_steps``) follows
the new length, learning-rate schedule included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from graphavatar.model import GraphAvatar
from headkit.engine.checkpoint import CheckpointManager
from headkit.engine.trainer import train

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
N = 4  # steps of the straight run; the split runs stop or finish at N // 2

GRAPHAVATAR = dict(num_frames=6, width=24, height=24, num_test=1, num_vertices_target=200, expression_dim=3,
                   texture_resolution=32, supersample=1)
GRAPHAVATAR_MODEL = ["model.hierarchy.factors=[4,4]", "model.unet.filters=[4,4]", "model.unet.K=2",
                     "model.unet.latent=4", "model.appearance.sh_degree=1", "model.neural_gaussians.hidden_dim=8",
                     "model.ggo.num_heads=2", "model.ggo.num_freqs=4", "model.enhancer.channels=[4,8]",
                     "model.enhancer.film_hidden=4", "model.loss.lpips=0.0", "model.warmup.steps=2",
                     "model.warmup.fit_steps=2", "model.warmup.log_every=1", "model.warmup.fit_sh_increase_every=1"]
NEURALCACHE = dict(num_frames=8, width=24, height=24, num_test=2, num_vertices_target=200, texture_resolution=32,
                   supersample=1, hair=False, accessories=False)
NEURALCACHE_MODEL = ["model.generator.channels=[12,16,16]", "model.texture.resolution=16", "model.texture.num_levels=2",
                     "model.warp.mlp_dim=4", "model.loss.perceptual=0.0", "model.optim.gamma=0.8",
                     "model.evaluation.warps=[1]", "model.evaluation.workers=[1]", "model.evaluation.stream_repeats=1",
                     "model.evaluation.ablation_distances=[1]", "model.evaluation.online=false"]

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _cfg(tmp_path: Path, name: str, experiment: str, max_steps: int, resume: bool = False, extra=()):
    generator = GRAPHAVATAR if experiment == "synthetic_subject" else NEURALCACHE
    model = GRAPHAVATAR_MODEL if experiment == "synthetic_subject" else NEURALCACHE_MODEL
    overrides = [f"experiment={experiment}", f"paths.data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / name}",
                 f"trainer.max_steps={max_steps}", f"trainer.resume={str(resume).lower()}", "trainer.device=cpu",
                 "trainer.progress=false", "trainer.log_every=1", f"trainer.ckpt_every={N // 2}",
                 "trainer.image_every=1000", "eval.video=false", "eval.lpips=false", "eval.timing_repeats=1",
                 *[f"data.generator.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in generator.items()],
                 *model, *extra]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train", overrides=overrides)


def _final(tmp_path: Path, name: str) -> dict:
    path, state = CheckpointManager(tmp_path / name / "checkpoints").latest_valid()
    assert state["step"] == N
    return state


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for group_a, group_b in zip(a["optimizer"]["param_groups"], b["optimizer"]["param_groups"]):
        assert group_a["lr"] == group_b["lr"]
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)


def _scalars(run: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


class _Killed(Exception):
    """Stands for a killed process."""


@pytest.mark.parametrize("extra", [(), ("model.ggo.rounds=2",)], ids=["one_round", "two_rounds"])
def test_graphavatar_resumed_after_a_kill_equals_the_straight_run(tmp_path, monkeypatch, extra):
    """With ``model.ggo.rounds=2`` the second round starts at step N/2: the checkpoint there holds the
    baked tracking and no optimiser moments, and the resumed run still equals the straight one."""
    straight = train(_cfg(tmp_path, "straight", "synthetic_subject", N, extra=extra))

    after_step = GraphAvatar.after_step

    def killed_after_the_checkpoint(self, step, train_set=None):
        restarted = after_step(self, step, train_set)
        if step == N // 2:  # the checkpoint of step N/2 is on disk; this step's update is lost
            raise _Killed
        return restarted

    monkeypatch.setattr(GraphAvatar, "after_step", killed_after_the_checkpoint)
    with pytest.raises(_Killed):
        train(_cfg(tmp_path, "split", "synthetic_subject", N, extra=extra))
    monkeypatch.setattr(GraphAvatar, "after_step", after_step)
    warmups = (tmp_path / "split" / "warmup.json").stat().st_mtime_ns
    resumed = train(_cfg(tmp_path, "split", "synthetic_subject", N, resume=True, extra=extra))

    assert (tmp_path / "split" / "warmup.json").stat().st_mtime_ns == warmups  # no second warm-up
    _assert_same_state(_final(tmp_path, "straight"), _final(tmp_path, "split"))
    for key in ("psnr", "ssim", "l2", "num_gaussians", "ggo_rot_err_deg_after"):
        assert resumed[key] == straight[key], key
    # the curves of the resumed run continue the killed one: every step once, equal to the straight run's
    assert _scalars(tmp_path / "split", "loss/total") == _scalars(tmp_path / "straight", "loss/total")


def test_graphavatar_extended_run_follows_the_new_schedule_length(tmp_path):
    train(_cfg(tmp_path, "straight", "synthetic_subject", N))
    train(_cfg(tmp_path, "ext", "synthetic_subject", N // 2))  # finished at N/2, schedule over N/2
    extended = train(_cfg(tmp_path, "ext", "synthetic_subject", N, resume=True))
    assert extended["steps"] == N

    base, final_ratio = 0.001, 0.1  # model.optim.lr.unets, model.optim.final_ratio (exponential)
    lrs = _scalars(tmp_path / "ext", "train/lr")
    # the first half decayed over N/2 steps, the extension over N: base * final_ratio ** (step / length)
    for step in range(1, N // 2 + 1):
        assert lrs[step] == pytest.approx(base * final_ratio ** (step / (N // 2)), rel=1e-6)  # scalars.jsonl holds float32 values
    for step in range(N // 2 + 1, N + 1):
        assert lrs[step] == pytest.approx(base * final_ratio ** (step / N), rel=1e-6)  # scalars.jsonl holds float32 values
        assert lrs[step] == _scalars(tmp_path / "straight", "train/lr")[step]
    state = _final(tmp_path, "ext")
    assert state["scheduler"]["lr_lambdas"][0]["max_steps"] == N
    assert state["config"]["model"]["optim"]["max_steps"] == N
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(base * final_ratio)


def test_graphavatar_extended_with_a_constant_schedule_equals_the_straight_run(tmp_path):
    constant = ["model.optim.schedule=constant"]
    straight = train(_cfg(tmp_path, "straight", "synthetic_subject", N, extra=constant))
    train(_cfg(tmp_path, "ext", "synthetic_subject", N // 2, extra=constant))
    extended = train(_cfg(tmp_path, "ext", "synthetic_subject", N, resume=True, extra=constant))
    _assert_same_state(_final(tmp_path, "straight"), _final(tmp_path, "ext"))
    assert extended["psnr"] == straight["psnr"] and extended["ssim"] == straight["ssim"]


def test_neuralcache_extended_run_equals_the_straight_run(tmp_path):
    straight = train(_cfg(tmp_path, "straight", "neuralcache_synthetic", N))
    half = train(_cfg(tmp_path, "ext", "neuralcache_synthetic", N // 2))
    extended = train(_cfg(tmp_path, "ext", "neuralcache_synthetic", N, resume=True))
    assert half["steps"] == N // 2 and extended["steps"] == N
    a, b = _final(tmp_path, "straight"), _final(tmp_path, "ext")
    _assert_same_state(a, b)
    # model.optim.gamma=0.8 per step, for the texture (5e-3) and G/W (5e-4, experiment=neuralcache_synthetic)
    assert [g["lr"] for g in b["optimizer"]["param_groups"]] == pytest.approx([5e-3 * 0.8 ** N, 5e-4 * 0.8 ** N])
    for key in ("psnr", "ssim", "l1", "l2"):
        assert extended[key] == straight[key], key
    assert extended["tables"]["table1"]["rows"][0]["psnr"] == straight["tables"]["table1"]["rows"][0]["psnr"]
    assert _scalars(tmp_path / "ext", "loss/total") == _scalars(tmp_path / "straight", "loss/total")
