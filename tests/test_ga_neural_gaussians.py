"""Scaffold-GS-style neural Gaussians: placement, activations, masking, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphavatar.neural_gaussians import NeuralGaussians, gather_kept, quat_multiply
from headkit.cameras import quat_to_rotmat


def anchors(b: int, v: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(b, v, 3, generator=gen)
    quats = F.normalize(torch.randn(b, v, 4, generator=gen), dim=-1)
    scales = torch.rand(b, v, 3, generator=gen) * 0.1 + 0.01
    cams = torch.randn(b, 3, generator=gen) * 0.1 + torch.tensor([0.0, 0.0, -3.0])
    return means, quats, scales, cams


def test_shapes_honour_k_feature_size_and_expression():
    torch.manual_seed(0)
    b, v, k, fa, e = 2, 7, 3, 5, 4
    ng = NeuralGaussians(v, expression_dim=e, num_offsets=k, feature_dim=fa, hidden_dim=8,
                         use_distance=True)
    assert ng.offsets.shape == (v, k, 3) and ng.features.shape == (v, fa)
    assert ng.mlp_opacity[0].in_features == fa + 3 + 1 + e
    out = ng(*anchors(b, v), expressions=torch.randn(b, e))
    m = v * k
    expect = {"means": (b, m, 3), "quats": (b, m, 4), "scales": (b, m, 3), "opacities": (b, m),
              "colors": (b, m, 3), "mask": (b, m)}
    assert {key: tuple(t.shape) for key, t in out.items()} == expect
    assert out["mask"].dtype == torch.bool


@pytest.mark.parametrize("local_frame", [False, True])
def test_placement_scales_and_rotations(local_frame):
    torch.manual_seed(1)
    b, v, k = 2, 5, 2
    ng = NeuralGaussians(v, num_offsets=k, local_frame=local_frame)
    means, quats, scales, cams = anchors(b, v)
    out = ng(means, quats, scales, cams)
    child_means = out["means"].reshape(b, v, k, 3)
    local = ng.offsets[None] * scales[:, :, None]  # δ ⊙ s, eq. 7
    if local_frame:  # rotated by the anchor's rotation matrix (independent of the quaternion code)
        local = torch.einsum("bvij,bvkj->bvki", quat_to_rotmat(quats), local)
    torch.testing.assert_close(child_means - means[:, :, None], local, atol=1e-5, rtol=0)
    child_scales = out["scales"].reshape(b, v, k, 3)
    assert (child_scales > 0).all() and (child_scales < scales[:, :, None]).all()
    torch.testing.assert_close(out["quats"].norm(dim=-1), torch.ones(b, v * k))
    assert ((out["colors"] > 0) & (out["colors"] < 1)).all()
    assert ((out["opacities"] > -1) & (out["opacities"] < 1)).all()


def test_quat_multiply_matches_rotation_products():
    gen = torch.Generator().manual_seed(0)
    p, q = F.normalize(torch.randn(2, 10, 4, generator=gen), dim=-1)
    torch.testing.assert_close(quat_to_rotmat(quat_multiply(p, q)), quat_to_rotmat(p) @ quat_to_rotmat(q),
                               atol=1e-5, rtol=0)
    # Hand case: 90° about z twice = 180° about z.
    r = torch.tensor([2 ** -0.5, 0, 0, 2 ** -0.5])
    torch.testing.assert_close(quat_multiply(r, r), torch.tensor([0.0, 0, 0, 1]), atol=1e-6, rtol=0)


def perturb_opacity_mlp_(ng: NeuralGaussians, seed: int = 0) -> None:
    """Random anchor features and opacity head, as after some training: opacities of both signs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ng.features.copy_(torch.randn(ng.features.shape, generator=gen))
        last = ng.mlp_opacity[-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=gen))
        last.bias.zero_()


def test_mask_semantics_and_gather_kept():
    torch.manual_seed(2)
    b, v, k = 3, 20, 2
    ng = NeuralGaussians(v, num_offsets=k, opacity_init=0.2)
    out = ng(*anchors(b, v))
    # At step 0 every child is kept with the configured opacity.
    assert out["mask"].all()
    torch.testing.assert_close(out["opacities"], torch.full((b, v * k), 0.2))
    perturb_opacity_mlp_(ng)
    out = ng(*anchors(b, v))
    assert torch.equal(out["mask"], out["opacities"] > 0)
    counts = out["mask"].sum(1)
    assert 0 < counts.min() and counts.max() < v * k  # some kept, some dropped
    kept = gather_kept(out)
    assert len(kept) == b and "mask" not in kept[0]
    for i, frame in enumerate(kept):
        assert frame["means"].shape == (int(counts[i]), 3)
        assert (frame["opacities"] > 0).all()
        torch.testing.assert_close(frame["colors"], out["colors"][i][out["mask"][i]])
    # The threshold is honoured: below tanh's range everything is kept.
    ng.opacity_threshold = -1.0
    assert ng(*anchors(b, v))["mask"].all()
    with pytest.raises(ValueError, match="bool"):
        gather_kept(out, out["opacities"])


def test_gradients_only_through_kept_children():
    torch.manual_seed(3)
    b, v, k, e = 2, 12, 2, 3
    ng = NeuralGaussians(v, expression_dim=e, num_offsets=k)
    perturb_opacity_mlp_(ng)
    means, quats, scales, cams = anchors(b, v)
    means.requires_grad_(True)
    out = ng(means, quats, scales, cams, torch.randn(b, e))
    loss = sum((f["means"].sum() + f["opacities"].sum() + f["colors"].sum() + f["scales"].sum()
                + f["quats"][:, 1:].sum()) for f in gather_kept(out))
    loss.backward()
    for name, p in ng.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert means.grad.abs().sum() > 0
    # Offsets of children masked out in every frame get no gradient.
    dropped = (~out["mask"]).all(0).reshape(v, k)
    assert dropped.any()
    assert not ng.offsets.grad[dropped].any()
    assert ng.offsets.grad[~dropped].abs().sum(-1).gt(0).all()


def test_view_direction_and_expression_change_the_children():
    torch.manual_seed(4)
    v, e = 6, 3
    ng = NeuralGaussians(v, expression_dim=e)
    means, quats, scales, cams = anchors(1, v)
    expr = torch.randn(1, e)
    base = ng(means, quats, scales, cams, expr)
    moved = ng(means, quats, scales, cams + torch.tensor([2.0, 0, 0]), expr)
    other = ng(means, quats, scales, cams, expr + 1.0)
    assert not torch.allclose(base["colors"], moved["colors"])
    assert not torch.allclose(base["colors"], other["colors"])
    # Positions do not depend on the view (offsets are learnable parameters, eq. 7).
    torch.testing.assert_close(base["means"], moved["means"])


def test_bad_inputs_are_named():
    ng = NeuralGaussians(4, expression_dim=2)
    means, quats, scales, cams = anchors(1, 4)
    with pytest.raises(ValueError, match="expressions"):
        ng(means, quats, scales, cams, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="anchor_means"):
        ng(torch.zeros(1, 5, 3), quats, scales, cams, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="num_offsets"):
        NeuralGaussians(4, num_offsets=0)
