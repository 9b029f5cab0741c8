"""Issue #17: correlated tracking drift, zero-mean GGO error metric, head-motion statistics,
experiment=ggo_drift, the U-Net heads' output initialisation switch. All fast, CPU only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from graphavatar.evaluation import rotation_errors_deg, tracking_errors
from graphavatar.graph_unet import GeometryHead, GraphUNet
from graphavatar.sampling import build_mesh_hierarchy
from graphavatar.settings import ConfigValueError, section
from headkit.cameras import so3_exp
from headkit.data.synthetic import _parse_noise
from headkit.data.synthetic_motion import correlation_sigma_frames, smooth_noise
from headkit.mesh import icosphere
from headkit.motion_stats import frame_speeds, head_to_camera, motion_stats, rigid_fit

from .conftest import make_tiny_subject

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _autocorrelation(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Mean over columns of the normalised autocorrelation at lags 0..max_lag of ``x [T, D]``."""
    x = x - x.mean(0)
    var = (x * x).mean(0)
    return np.array([((x[: len(x) - k] * x[k:]).mean(0) / var).mean() for k in range(max_lag + 1)])


@pytest.mark.parametrize("correlation_s,fps", [(0.5, 30.0), (1.0, 24.0)])
def test_correlated_noise_has_the_requested_std_and_correlation_time(correlation_s, fps):
    sigma = correlation_sigma_frames(correlation_s, fps)
    noise = smooth_noise(np.random.default_rng(0), 200_000, 4, sigma)
    assert noise.std(0) == pytest.approx(np.ones(4), rel=0.05)  # unit std; the generator scales it
    ell = correlation_s * fps  # frames
    rho = _autocorrelation(noise, int(3 * ell))
    # squared-exponential kernel: rho(lag) = exp(-lag^2 / (2 ell^2)), 0.61 at ell, 0.14 at 2 ell
    lag_at = lambda level: np.interp(-level, -rho, np.arange(len(rho)))  # noqa: E731  (rho decreasing)
    assert lag_at(math.exp(-0.5)) == pytest.approx(ell, rel=0.05)
    assert lag_at(math.exp(-2.0)) == pytest.approx(2 * ell, rel=0.05)
    lags = np.arange(len(rho))
    np.testing.assert_allclose(rho, np.exp(-lags ** 2 / (2 * ell ** 2)), atol=0.03)


def test_default_noise_is_todays_tracker_jitter():
    # correlation_s: null keeps the 1.5-frame smoothing and its random stream bit for bit
    assert _parse_noise(0)["correlation_s"] is None
    assert _parse_noise({"pose_rot_deg": 1.0})["correlation_s"] is None
    a = smooth_noise(np.random.default_rng(1), 50, 3)
    b = smooth_noise(np.random.default_rng(1), 50, 3, 1.5)
    np.testing.assert_array_equal(a, b)
    assert _parse_noise({"correlation_s": 0.75})["correlation_s"] == 0.75
    for bad in (0, -1.0, float("nan"), "1s", True):
        with pytest.raises(ValueError, match="correlation_s"):
            _parse_noise({"correlation_s": bad})


def _rigid(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = torch.eye(4, dtype=torch.float64).repeat(len(R), 1, 1)
    out[:, :3, :3], out[:, :3, 3] = R, t
    return out


def test_zero_mean_errors_remove_the_shared_offset_on_a_hand_made_case():
    N = 8
    gen = torch.Generator().manual_seed(0)
    true = _rigid(so3_exp(0.3 * torch.randn(N, 3, generator=gen, dtype=torch.float64)),
                  torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) + 0.02 * torch.randn(N, 3, generator=gen,
                                                                                          dtype=torch.float64))
    # world-frame errors E_i = C @ Z_i: a constant offset C and a known zero-mean part Z_i
    # (rotations of +-theta about one axis, translations +-d along another, alternating)
    theta, d = math.radians(1.5), 0.004
    signs = torch.tensor([1.0, -1.0] * (N // 2), dtype=torch.float64)
    Z = _rigid(so3_exp(signs[:, None] * torch.tensor([0.0, 0.0, theta], dtype=torch.float64)),
               signs[:, None] * torch.tensor([0.0, d, 0.0], dtype=torch.float64))
    C = _rigid(so3_exp(torch.tensor([[0.02, -0.03, 0.01]], dtype=torch.float64)),
               torch.tensor([[0.01, 0.0, -0.02]], dtype=torch.float64))
    est = C @ Z @ true
    expr_true = torch.rand(N, 5, dtype=torch.float64, generator=gen)
    expr_zero_mean = 0.1 * signs[:, None] * torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)
    expr_est = expr_true + torch.tensor([0.2, 0.1, 0, 0, 0], dtype=torch.float64) + expr_zero_mean
    e = tracking_errors(est, true, expr_est, expr_true)
    # zero-mean: exactly the known part
    assert e["rot_err_deg_zero_mean"] == pytest.approx(math.degrees(theta), rel=1e-6)
    centre_err = ((Z @ true)[:, :3, 3] - true[:, :3, 3]).norm(dim=-1).mean().item()  # Z also rotates the centre
    assert e["centre_err_zero_mean"] == pytest.approx(centre_err, rel=1e-6)
    assert e["expr_err_zero_mean"] == pytest.approx(0.1, rel=1e-9)
    # raw: includes the offset, and equals the direct per-frame errors
    raw_rot = rotation_errors_deg(est[:, :3, :3], true[:, :3, :3]).mean().item()
    assert e["rot_err_deg"] == pytest.approx(raw_rot, rel=1e-9) and e["rot_err_deg"] > math.degrees(theta) + 0.5
    assert e["centre_err"] == pytest.approx((est[:, :3, 3] - true[:, :3, 3]).norm(dim=-1).mean().item(), rel=1e-9)
    assert e["centre_err"] > 2 * e["centre_err_zero_mean"]
    assert e["expr_err"] == pytest.approx((expr_est - expr_true).norm(dim=-1).mean().item(), rel=1e-9)
    # a pure offset scores zero once the common part is removed
    e0 = tracking_errors(C @ true, true, expr_true + 0.3, expr_true)
    assert e0["rot_err_deg_zero_mean"] < 1e-4 and e0["centre_err_zero_mean"] < 1e-9
    assert e0["expr_err_zero_mean"] < 1e-9 and e0["rot_err_deg"] > 1.0



def test_zero_mean_errors_in_the_avatars_frame_remove_an_offset_that_turns_with_the_head():
    """An avatar attached to the head is rendered from ``P_i^-1 c2w_i``: an offset ``G`` shared in
    the head's frame (``c2w_i -> P_i G P_i^-1 c2w_i``) is the same as moving that avatar, and
    scores zero with ``local_poses``; in the world frame it changes with the head's yaw."""
    N = 12
    yaw = torch.linspace(-math.radians(30), math.radians(30), N, dtype=torch.float64)
    P = _rigid(so3_exp(torch.stack([torch.zeros(N), yaw, 0.1 * yaw], -1).double()),
               0.02 * torch.stack([torch.sin(3 * yaw), torch.cos(2 * yaw), yaw], -1))  # head to world
    true = _rigid(torch.eye(3, dtype=torch.float64).repeat(N, 1, 1),
                  torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).repeat(N, 1))  # a fixed camera
    G = _rigid(so3_exp(torch.tensor([[0.03, -0.02, 0.01]], dtype=torch.float64)),
               torch.tensor([[0.004, 0.0, -0.003]], dtype=torch.float64))
    shared_in_head = P @ G @ torch.linalg.inv(P) @ true
    expr = torch.zeros(N, 3, dtype=torch.float64)
    local = tracking_errors(shared_in_head, true, expr, expr, local_poses=P)
    world = tracking_errors(shared_in_head, true, expr, expr)
    assert local["rot_err_deg_zero_mean"] < 1e-5 and local["centre_err_zero_mean"] < 1e-9
    assert world["rot_err_deg_zero_mean"] > 0.3 and world["centre_err_zero_mean"] > 0.002
    # raw errors do not depend on the frame
    for key in ("rot_err_deg", "centre_err"):
        assert local[key] == pytest.approx(world[key], rel=1e-9) and local[key] > 1.0 * (key == "rot_err_deg")
    # a known per-frame part Z_i in the head's frame, on top of the shared offset, is what remains
    theta = math.radians(0.8)
    signs = torch.tensor([1.0, -1.0] * (N // 2), dtype=torch.float64)
    Z = _rigid(so3_exp(signs[:, None] * torch.tensor([theta, 0.0, 0.0], dtype=torch.float64)),
               torch.zeros(N, 3, dtype=torch.float64))
    est = P @ G @ Z @ torch.linalg.inv(P) @ true
    assert tracking_errors(est, true, expr, expr, local_poses=P)["rot_err_deg_zero_mean"] == \
        pytest.approx(math.degrees(theta), rel=1e-6)
    # a world-frame offset is not shared in the head's frame while the head turns
    assert tracking_errors(G @ true, true, expr, expr, local_poses=P)["rot_err_deg_zero_mean"] > 0.3
    with pytest.raises(ValueError, match="local_poses"):
        tracking_errors(est, true, expr, expr, local_poses=P[:3])

def test_motion_stats_on_a_trajectory_with_known_speed():
    T, fps = 41, 25.0
    omega, speed = math.radians(0.8), 0.003  # 0.8 deg and 3 mm per frame
    i = torch.arange(T, dtype=torch.float64)
    axis = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    R = so3_exp(i[:, None] * omega * axis)
    t = torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64) + i[:, None] * speed * torch.tensor([1.0, 0, 0],
                                                                                           dtype=torch.float64)
    heads = _rigid(R, t).numpy()  # head-to-world; the head centre (origin) moves 3 mm per frame
    ang, dist = frame_speeds(heads)
    np.testing.assert_allclose(ang, 0.8, rtol=1e-6)
    np.testing.assert_allclose(dist, 3e-3, rtol=1e-6)

    # through a Subject: a fixed camera at the world origin, template centred at the head origin
    subject = make_tiny_subject(num_frames=T)
    tmpl = subject.template_vertices - subject.template_vertices.mean(0)
    subject.template_vertices = tmpl.astype(np.float32)
    subject.head_poses = heads.astype(np.float32)
    subject.camtoworlds = np.tile(np.eye(4, dtype=np.float32), (T, 1, 1))
    subject.fps = fps
    stats = motion_stats(subject)
    for p in (50, 90, 99):
        assert stats[f"rot_deg_per_frame_p{p}"] == pytest.approx(0.8, rel=1e-3)
        assert stats[f"trans_mm_per_frame_p{p}"] == pytest.approx(3.0, rel=1e-3)
        assert stats[f"rot_deg_per_s_p{p}"] == pytest.approx(0.8 * fps, rel=1e-3)
    # without head poses the head is fitted to the tracked vertices (Kabsch): same speeds
    subject.vertices = (np.einsum("tij,vj->tvi", heads[:, :3, :3], tmpl) + heads[:, None, :3, 3]).astype(np.float32)
    np.testing.assert_allclose(rigid_fit(tmpl, subject.vertices), heads, atol=1e-5)
    subject.head_poses = None
    np.testing.assert_allclose(head_to_camera(subject), heads, atol=1e-5)
    assert motion_stats(subject)["rot_deg_per_frame_p50"] == pytest.approx(0.8, rel=1e-2)


def test_ggo_drift_experiment_composes():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=ggo_drift"])
        noggo = compose("train", overrides=["experiment=ggo_drift", "ablation=no_ggo"])
        default = compose("train")
    noise = cfg.data.generator.tracking_noise
    assert cfg.experiment_name == "ggo_drift" and cfg.model._target_ == "graphavatar.model.GraphAvatar"
    assert 0.5 <= noise.correlation_s <= 1.0 and noise.pose_rot_deg > 0 and noise.pose_trans > 0
    assert noise.expression > 0
    # two rounds of the default length (model.ggo.rounds), and the same length without GGO
    assert cfg.model.ggo.rounds == 2 and default.model.ggo.rounds == 1
    assert cfg.trainer.max_steps == 2 * default.trainer.max_steps == noggo.trainer.max_steps
    assert default.data.generator.tracking_noise.correlation_s is None
    assert noggo.model.ggo.enabled is False and noggo.data.generator.tracking_noise == noise
    assert _parse_noise(dict(noise))["correlation_s"] == noise.correlation_s
    # GGO tuned for drift (benchmarks/ggo_drift.md); the default experiment keeps its own settings
    assert cfg.model.ggo.pose_side == "head" and default.model.ggo.pose_side == "right"
    assert cfg.model.loss.ggo_reg.pose < default.model.loss.ggo_reg.pose
    assert cfg.model.loss.ggo_reg.target == "offsets"
    # GGO refines the held-out frames there, with the last training frame's time code; not by default
    assert cfg.model.ggo.apply_on_test is True and default.model.ggo.apply_on_test is False
    assert cfg.model.ggo.test_time == default.model.ggo.test_time == "hold"


@pytest.fixture(scope="module")
def hierarchy():
    v, f = icosphere(2)
    return build_mesh_hierarchy(v, f, factors=(4, 4))


def test_head_init_default_differs_from_zero_and_trains_a_step(hierarchy):
    assert section("unet", {})["head_init"] == "zero"
    assert section("unet", {"head_init": "default"})["head_init"] == "default"
    with pytest.raises(ConfigValueError, match="model.unet.head_init"):
        section("unet", {"head_init": "xavier"})
    with pytest.raises(ValueError, match="head_init"):
        GraphUNet(hierarchy, 6, 4, filters=(8, 8), K=2, head_init="xavier")

    V = hierarchy.num_vertices[0]
    verts = hierarchy.vertices[0][None].repeat(2, 1, 1)
    expr = torch.zeros(2, 3)
    torch.manual_seed(0)
    zero = GeometryHead(hierarchy, expression_dim=3, filters=(8, 8), K=2, head_init="zero")
    torch.manual_seed(0)
    default = GeometryHead(hierarchy, expression_dim=3, filters=(8, 8), K=2, head_init="default")
    assert not any(p.any() for p in zero.unet.head.parameters())
    assert all(lin.weight.abs().sum() > 0 for lin in default.unet.head.lins)  # PyG: weights random, bias 0
    assert not zero(verts, expr)["offsets"].any()
    out = default(verts, expr)
    assert out["offsets"].abs().max() > 0 and torch.isfinite(out["offsets"]).all()
    assert default.unet.reset_parameters() is None and default.unet.head.lins[0].weight.abs().sum() > 0

    # one optimiser step toward a target moves every layer and lowers the loss
    target = verts + 0.01
    opt = torch.optim.Adam(default.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in default.named_parameters()}
    loss0 = (default(verts, expr)["means"] - target).square().mean()
    loss0.backward()
    opt.step()
    opt.zero_grad()
    loss1 = (default(verts, expr)["means"] - target).square().mean()
    assert loss1 < loss0
    changed = [n for n, p in default.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("unet.enc") for n in changed) and any(n.startswith("unet.head") for n in changed)
    assert V == out["offsets"].shape[1]


def test_pose_bound_fit_recovers_a_known_camera_offset():
    """benchmarks/ggo_pose_bound.py: against a frozen avatar's own render at the true camera, the
    per-frame fit started from a camera turned by 2 degrees about the head comes back to it."""
    from graphavatar.ggo import apply_pose_delta
    from headkit.data.dataset import FrameDataset
    from headkit.data.synthetic import generate_synthetic_subject

    from .conftest import load_repo_module
    from .test_graphavatar_model import TINY_GENERATOR, small_model

    bound = load_repo_module("benchmarks/ggo_pose_bound.py")
    subject = generate_synthetic_subject(**{**TINY_GENERATOR, "width": 48, "height": 48})
    model = small_model(subject, unet={"head_init": "default"}, neural_gaussians={"enabled": False}).eval()
    model.requires_grad_(False)
    batch = FrameDataset(subject, "train").batch([0, 3])
    with torch.no_grad():
        encoded = model.encode(batch)
        target = model.splat(model.anchors(encoded, batch["expression"]), batch["camtoworld"], encoded["poses"],
                             batch["K"], batch["expression"])[0]
    true = batch["camtoworld"].clone()
    turn = torch.tensor([[0.0, 0.035, 0.0, 0.0, 0.0, 0.0], [0.025, 0.0, 0.0, 0.0, 0.0, 0.0]])
    batch["camtoworld"] = apply_pose_delta(true, turn, side="head", head_poses=encoded["poses"])
    refined, poses, l1_before, l1_after = bound.fit_chunk(model, batch, target, iters=60, lr=3e-3)
    assert torch.equal(poses, encoded["poses"])
    before = rotation_errors_deg(batch["camtoworld"][:, :3, :3], true[:, :3, :3])
    after = rotation_errors_deg(refined[:, :3, :3], true[:, :3, :3])
    assert l1_after < 0.5 * l1_before
    assert (after < 0.3 * before).all(), (before, after)


def test_ggo_rounds_bake_the_refined_tracking_and_restart_the_model(tmp_path):
    """model.ggo.rounds=2 over 4 steps: the LR schedule starts again at step 2; there the training
    frames' refined cameras and expressions become the ones GGO refines, the whole model goes back to
    its initial values (so the refinement is unchanged by the restart) and the trainer drops every
    optimiser moment (the checkpoint written at step 2 holds no Adam state)."""
    from graphavatar.evaluation import training_frame_tracking
    from graphavatar.schedules import LRSchedule, round_starts
    from headkit.data.dataset import FrameDataset
    from headkit.data.synthetic import generate_synthetic_subject
    from headkit.engine.trainer import train

    from .test_graphavatar_model import TINY_GENERATOR, _compose, small_model
    schedule = LRSchedule("exponential", 0.1, 4, rounds=2)
    assert [schedule(s) for s in range(5)] == pytest.approx([1.0, 0.1 ** 0.5, 1.0, 0.1 ** 0.5, 0.1])
    assert LRSchedule("exponential", 0.1, 4)(2) == pytest.approx(0.1 ** 0.5)  # one round: as before
    uneven = LRSchedule("exponential", 0.1, 7, rounds=3)  # rounds start at steps 3 and 5
    assert round_starts(7, 3) == [3, 5] and round_starts(7, 1) == []
    assert [uneven(s) for s in (0, 3, 5)] == [1.0, 1.0, 1.0] and uneven(2) < 1.0 and uneven(7) == pytest.approx(0.1)

    # the model's part
    subject = generate_synthetic_subject(**TINY_GENERATOR)
    model = small_model(subject, ggo={"rounds": 2}, optim={"max_steps": 4})
    assert model.round_starts() == [2] and small_model(subject).round_starts() == []
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # stands in for training: GGO now moves the cameras
    train_set = FrameDataset(subject, "train")
    before = training_frame_tracking(model, subject, torch.device("cpu"))
    assert (before["c2w_after"] - before["c2w_before"]).abs().max() > 1e-4
    assert model.after_step(0, train_set) == []
    assert torch.equal(model.baked_camtoworlds, torch.from_numpy(subject.camtoworlds))  # not yet baked
    restarted = model.after_step(1, train_set)
    assert len(restarted) == len(list(model.parameters()))
    for k, v in model.state_dict().items():
        if not k.startswith("baked_"):
            assert torch.equal(v, initial[k]), k
    ids = torch.as_tensor(before["ids"])
    torch.testing.assert_close(model.baked_camtoworlds[ids], before["c2w_after"])
    torch.testing.assert_close(model.baked_expressions[ids], before["expr_after"])
    after = training_frame_tracking(model, subject, torch.device("cpu"))  # fresh GGO (zero) on the baked tracking
    torch.testing.assert_close(after["c2w_after"], before["c2w_after"], atol=1e-5, rtol=0)
    torch.testing.assert_close(after["c2w_before"], before["c2w_before"])  # still scored from the tracked ones
    test_ids = torch.as_tensor(subject.test_ids)
    assert torch.equal(model.baked_camtoworlds[test_ids], torch.from_numpy(subject.camtoworlds[subject.test_ids]))
    # where GGO refines the test frames (ggo.apply_on_test), their refinement is baked as well
    model = small_model(subject, ggo={"rounds": 2, "apply_on_test": True}, optim={"max_steps": 4})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    test_before = training_frame_tracking(model, subject, torch.device("cpu"), split="test")
    assert torch.equal(test_before["ids"].cpu(), test_ids)
    assert (test_before["c2w_after"] - test_before["c2w_before"]).abs().max() > 1e-4
    model.after_step(1, train_set)
    torch.testing.assert_close(model.baked_camtoworlds[test_ids], test_before["c2w_after"])
    torch.testing.assert_close(model.baked_expressions[test_ids], test_before["expr_after"])
    test_after = training_frame_tracking(model, subject, torch.device("cpu"), split="test")
    torch.testing.assert_close(test_after["c2w_after"], test_before["c2w_after"], atol=1e-5, rtol=0)

    # the trainer's part
    gen = [f"data.generator.{k}={v}" for k, v in TINY_GENERATOR.items()]
    cfg = _compose(gen + [
        f"paths.data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", "trainer.max_steps=4",
        "trainer.ckpt_every=2", "trainer.keep_checkpoints=3", "trainer.progress=false", "trainer.device=cpu",
        "eval.video=false", "eval.timing_repeats=1", "eval.lpips=false", "model.unet.filters=[8,8]",
        "model.unet.K=2", "model.enhancer.channels=[4,8]", "model.warmup.enabled=false", "model.ggo.rounds=2"])
    train(cfg)
    states = [torch.load(c, weights_only=False) for c in (tmp_path / "run" / "checkpoints").glob("*.pt")]
    at_restart = next(st for st in states if st["step"] == 2)
    assert at_restart["optimizer"]["state"] == {}, "every Adam moment is dropped at the restart"
    assert at_restart["scheduler"]["last_epoch"] == 2
    assert next(st for st in states if st["step"] == 4)["optimizer"]["state"]  # and rebuilt after it
