"""Graph-guided optimisation: identity start, learning dynamics, use of inputs, pose update."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from graphavatar.ggo import GraphGuidedOptimization, apply_pose_delta, ggo_times
from headkit.encodings import positional_encoding


def test_zero_output_at_init_and_shapes():
    torch.manual_seed(0)
    ggo = GraphGuidedOptimization(bottleneck_dim=16, expression_dim=7)
    times = torch.tensor([0.0, 0.3, 1.0])
    out = ggo(times, torch.randn(3, 16))
    assert out["delta_expressions"].shape == (3, 7) and out["delta_poses"].shape == (3, 6)
    assert not out["delta_expressions"].any() and not out["delta_poses"].any()
    assert out["attention"].shape == (3, 1, 13)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(3, 1))
    # Per-vertex bottlenecks: Q query tokens.
    out = ggo(times, torch.randn(3, 5, 16))
    assert out["attention"].shape == (3, 5, 13) and out["delta_poses"].shape == (3, 6)


def test_gradient_reaches_the_time_mlp_after_one_step():
    torch.manual_seed(0)
    ggo = GraphGuidedOptimization(bottleneck_dim=8, expression_dim=4, num_heads=2)
    opt = torch.optim.SGD(ggo.parameters(), lr=0.1)
    times, feats = torch.rand(4), torch.randn(4, 8)
    target = torch.randn(4, 10)

    def step() -> None:
        opt.zero_grad()
        out = ggo(times, feats)
        pred = torch.cat([out["delta_expressions"], out["delta_poses"]], -1)
        (pred - target).square().sum().backward()

    step()
    assert ggo.out_proj.weight.grad.abs().sum() > 0 and ggo.out_proj.bias.grad.abs().sum() > 0
    assert not ggo.time_mlp.weight.grad.any()  # blocked by the zero output layer at step 0
    opt.step()
    step()
    assert ggo.time_mlp.weight.grad.abs().sum() > 0
    assert ggo.query_proj.weight.grad.abs().sum() > 0
    # Training fits per-frame targets: the output follows the time and the bottleneck.
    opt = torch.optim.Adam(ggo.parameters(), lr=0.05)
    for _ in range(40):
        step()
        opt.step()
    out = ggo(times, feats)
    err = (torch.cat([out["delta_expressions"], out["delta_poses"]], -1) - target).square().mean()
    # The best constant offset (the per-column mean) leaves the between-frame variance.
    best_constant = (target - target.mean(0)).square().mean()
    assert err.item() < 0.2 * best_constant.item()


def test_output_depends_on_bottleneck_and_time():
    torch.manual_seed(1)
    ggo = GraphGuidedOptimization(bottleneck_dim=16, expression_dim=3)
    with torch.no_grad():
        ggo.out_proj.weight.normal_(0, 0.5)
    times, feats = torch.tensor([0.2, 0.7]), torch.randn(2, 16)
    base = ggo(times, feats)
    other_feats = ggo(times, feats + torch.randn(2, 16))
    other_times = ggo(times + 0.1, feats)
    for k in ("delta_expressions", "delta_poses"):
        assert not torch.allclose(base[k], other_feats[k])
        assert not torch.allclose(base[k], other_times[k])
    assert not torch.allclose(base["attention"], other_feats["attention"])


def test_apply_pose_delta_matches_an_independent_so3_x_r3_update():
    rng = np.random.default_rng(0)
    c2w = np.tile(np.eye(4), (3, 1, 1))
    c2w[:, :3, :3] = Rotation.random(3, random_state=1).as_matrix()
    c2w[:, :3, 3] = rng.normal(size=(3, 3))
    delta = rng.normal(size=(3, 6)) * 0.2
    T = np.tile(np.eye(4), (3, 1, 1))
    T[:, :3, :3] = Rotation.from_rotvec(delta[:, :3]).as_matrix()
    T[:, :3, 3] = delta[:, 3:]
    c2w_t, delta_t = torch.tensor(c2w), torch.tensor(delta)
    np.testing.assert_allclose(apply_pose_delta(c2w_t, delta_t).numpy(), c2w @ T, atol=1e-10)
    np.testing.assert_allclose(apply_pose_delta(c2w_t, delta_t, side="left").numpy(), T @ c2w, atol=1e-10)
    torch.testing.assert_close(apply_pose_delta(c2w_t, torch.zeros(3, 6, dtype=torch.float64)), c2w_t)
    with pytest.raises(ValueError, match="delta_poses"):
        apply_pose_delta(c2w_t, delta_t[:, :3])


def test_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="divisible"):
        GraphGuidedOptimization(bottleneck_dim=10, expression_dim=3, num_heads=4)
    ggo = GraphGuidedOptimization(bottleneck_dim=8, expression_dim=3)
    with pytest.raises(ValueError, match="bottlenecks"):
        ggo(torch.rand(2), torch.randn(2, 9))
    with pytest.raises(ValueError, match="frequency_spacing"):
        GraphGuidedOptimization(bottleneck_dim=8, expression_dim=3, frequency_spacing="log")


def test_linear_time_encoding_is_a_fourier_series_and_octaves_alias_per_frame():
    t = torch.linspace(0, 0.9, 270, dtype=torch.float64)[:, None]  # 270 training frames of 300
    lin = positional_encoding(t, 3, include_input=False, spacing="linear")
    k = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * np.pi
    torch.testing.assert_close(lin, torch.cat([torch.sin(t * k), torch.cos(t * k)], dim=1))
    octave = positional_encoding(t, 3, include_input=False)
    torch.testing.assert_close(octave[:, 2], torch.sin(4 * np.pi * t[:, 0]))
    # A smooth drift (periods of 1.5, 0.4 and 0.29 clips) is fitted exactly by 8 linear frequencies
    # (f = 5 and 7 are among them) but not by 4 octaves (f = 1, 2, 4, 8): those features cannot
    # represent a variation between their frequencies.
    x = np.pi * t[:, 0]
    drift = torch.sin(4 / 3 * x + 0.3) + 0.5 * torch.cos(5 * x) + 0.5 * torch.sin(7 * x)

    def residual(features):
        basis = torch.cat([torch.ones_like(t), features], dim=1)
        fit = basis @ torch.linalg.lstsq(basis, drift[:, None]).solution
        return ((fit[:, 0] - drift).square().mean() / drift.square().mean()).sqrt().item()

    assert residual(positional_encoding(t, 8, include_input=False, spacing="linear")) < 0.01
    assert residual(positional_encoding(t, 4, include_input=False)) > 0.2
    # The GGO module encodes time with the spacing it was given.
    ggo = GraphGuidedOptimization(bottleneck_dim=8, expression_dim=3, num_freqs=3, frequency_spacing="linear")
    seen = []
    ggo.time_mlp.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    ggo(t[:4, 0].float(), torch.randn(4, 8))
    torch.testing.assert_close(seen[0], lin[:4].float())


def test_head_side_update_orbits_the_camera_about_the_head():
    rng = np.random.default_rng(2)
    c2w = np.tile(np.eye(4), (3, 1, 1))
    c2w[:, :3, :3] = Rotation.random(3, random_state=3).as_matrix()
    c2w[:, :3, 3] = rng.normal(size=(3, 3))
    head = np.tile(np.eye(4), (3, 1, 1))
    head[:, :3, :3] = Rotation.random(3, random_state=4).as_matrix()
    head[:, :3, 3] = rng.normal(size=(3, 3))
    delta = np.concatenate([rng.normal(size=(3, 3)) * 0.1, np.zeros((3, 3))], -1)  # rotation only
    T = np.tile(np.eye(4), (3, 1, 1))
    T[:, :3, :3] = Rotation.from_rotvec(delta[:, :3]).as_matrix()
    out = apply_pose_delta(torch.tensor(c2w), torch.tensor(delta), side="head", head_poses=torch.tensor(head)).numpy()
    np.testing.assert_allclose(out, head @ T @ np.linalg.inv(head) @ c2w, atol=1e-10)
    # A pure rotation moves the camera on a sphere about the head origin.
    dist = lambda cams: np.linalg.norm(cams[:, :3, 3] - head[:, :3, 3], axis=-1)  # noqa: E731
    np.testing.assert_allclose(dist(out), dist(c2w), atol=1e-10)
    # With the head at the world origin, "head" is "left".
    eye = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    torch.testing.assert_close(apply_pose_delta(torch.tensor(c2w), torch.tensor(delta), "head", eye),
                               apply_pose_delta(torch.tensor(c2w), torch.tensor(delta), "left"))
    with pytest.raises(ValueError, match="head_poses"):
        apply_pose_delta(torch.tensor(c2w), torch.tensor(delta), side="head")


def test_shared_offset_is_a_running_mean_with_the_gradient_of_its_square():
    torch.manual_seed(0)
    ggo = GraphGuidedOptimization(bottleneck_dim=8, expression_dim=2, num_heads=2, shared_momentum=0.5)
    out = torch.tensor([[1.0, 2.0, 0, 0, 0, 0, 0, 3.0], [3.0, 0.0, 0, 0, 0, 0, 0, 1.0]], requires_grad=True)
    shared = ggo.shared(out)  # training mode: m = 0.5 * 0 + 0.5 * mean
    expected = 0.5 * out.detach().mean(0)
    torch.testing.assert_close(shared.detach(), expected)
    torch.testing.assert_close(ggo.shared_offset, expected)
    shared.square().sum().backward()
    # d/d out_b ||m + (mean - sg(mean))||^2 = 2 m / B for every frame b: a shift common to all frames.
    torch.testing.assert_close(out.grad, (2 * expected / 2).expand(2, 8))
    ggo.eval()
    ggo.shared(out.detach() * 100)  # evaluation never moves the running mean
    torch.testing.assert_close(ggo.shared_offset, expected)
    assert "shared_offset" not in ggo.state_dict()  # old checkpoints keep loading


def test_ggo_times_hold_the_training_range():
    times = torch.tensor([-0.2, 0.1, 0.5, 0.9, 1.0])
    torch.testing.assert_close(ggo_times(times, (0.1, 0.9), "hold"), torch.tensor([0.1, 0.1, 0.5, 0.9, 0.9]))
    torch.testing.assert_close(ggo_times(times, (0.1, 0.9), "extrapolate"), times)
