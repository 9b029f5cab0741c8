"""Issue #15's training-step speed-ups give the old numbers: each change pinned against the code it
replaced (bit-identical where the math is the same; fused Adam to float rounding)."""

from __future__ import annotations

import copy

import pytest
import torch

from graphavatar.losses import GraphAvatarLoss
from graphavatar.model import GraphAvatar
from headkit.data.synthetic import generate_synthetic_subject
from headkit.engine.guards import NonFiniteError, _all_finite, check_finite, check_finite_grads
from headkit.losses import photometric_loss, photometric_losses
from headkit.metrics import ssim, ssim_shared_target

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _images(seed: int, shape=(2, 24, 20, 3)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _old_ssim(preds, targets, *, sigma=1.5, border="valid", k1=0.01, k2=0.03, data_range=1.0):
    """``headkit.metrics.ssim`` before issue #15, verbatim (the reference of the shared-target path)."""
    from headkit.metrics import _blur, _gaussian_window
    single = preds.ndim == 3
    if single:
        preds, targets = preds[None], targets[None]
    radius = int(3.5 * sigma + 0.5)
    x, y = preds.permute(0, 3, 1, 2), targets.permute(0, 3, 1, 2)
    taps = _gaussian_window(sigma, radius, x.dtype, x.device)
    pad = radius if border == "same" else 0
    mu_x, mu_y = _blur(x, taps, pad), _blur(y, taps, pad)
    var_x = _blur(x * x, taps, pad) - mu_x.square()
    var_y = _blur(y * y, taps, pad) - mu_y.square()
    cov_xy = _blur(x * y, taps, pad) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    maps = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    values = maps.mean(dim=(1, 2, 3))
    return values[0] if single else values


@pytest.mark.parametrize("border", ["valid", "same"])
def test_ssim_and_shared_target_ssim_equal_the_old_ssim_bit_for_bit(border):
    a, b, t = _images(1), _images(2), _images(3)
    old = [_old_ssim(p, t, border=border) for p in (a, b)]
    assert torch.equal(ssim(a, t, border=border), old[0])
    shared = ssim_shared_target([a, b], t, border=border)
    assert all(torch.equal(s, o) for s, o in zip(shared, old))
    assert torch.equal(ssim(a[0], t[0], border=border), _old_ssim(a[0], t[0], border=border))  # one image
    assert ssim_shared_target([], t) == []


def test_shared_target_ssim_checks_like_ssim():
    with pytest.raises(ValueError, match="border"):
        ssim_shared_target([_images(1)], _images(2), border="full")
    with pytest.raises(ValueError, match="differ in shape"):
        ssim_shared_target([_images(1), _images(1, (2, 24, 21, 3))], _images(2))
    with pytest.raises(ValueError, match="smaller than"):
        ssim_shared_target([_images(1, (1, 8, 8, 3))], _images(2, (1, 8, 8, 3)))


@pytest.mark.parametrize("dssim_weight", [0.2, 0.0])
def test_photometric_losses_equal_one_call_per_image_values_and_gradients(dssim_weight):
    targets = _images(3)
    results = {}
    for version in ("old", "new"):
        images = [_images(1).requires_grad_(), _images(2).requires_grad_()]
        if version == "old":
            terms = [photometric_loss(image, targets, 0.8, dssim_weight) for image in images]
        else:
            terms = photometric_losses(images, targets, 0.8, dssim_weight)
        total = torch.stack([value for pair in terms for value in pair]).sum()
        total.backward()
        results[version] = [value.detach() for pair in terms for value in pair] + [i.grad for i in images]
    assert all(torch.equal(o, n) for o, n in zip(results["old"], results["new"]))


def test_graphavatar_loss_terms_equal_the_per_image_terms():
    outputs = {"image": _images(1), "coarse_image": _images(2), "alpha": _images(4, (2, 24, 20, 1)) * 0.9 + 0.05}
    targets, masks = _images(3), (_images(5, (2, 24, 20, 1)) > 0.5).float()
    terms = GraphAvatarLoss(lpips=0.0)(outputs, targets, masks, step=0, edge_length=1.0, has_enhancer=True)
    l1, ds = photometric_loss(outputs["image"], targets, 0.8, 0.2)
    cl1, cds = photometric_loss(outputs["coarse_image"], targets, 0.8, 0.2)
    assert torch.equal(terms["final_l1"], l1) and torch.equal(terms["final_dssim"], ds)
    assert torch.equal(terms["coarse"], 0.1 * (cl1 + cds))
    without = GraphAvatarLoss(lpips=0.0)(outputs, targets, masks, step=0, edge_length=1.0, has_enhancer=False)
    assert "coarse" not in without and torch.equal(without["final_dssim"], ds)


def test_finite_check_finds_nan_and_inf_and_names_the_entry():
    assert _all_finite([torch.ones(3), torch.tensor(2.0), torch.arange(4), torch.zeros(0)])
    assert _all_finite([])
    assert not _all_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not _all_finite([torch.tensor([float("-inf")], dtype=torch.float64)])
    check_finite({"a": torch.ones(2), "b": 1.5, "n": torch.arange(3)}, step=0)
    with pytest.raises(NonFiniteError, match="'b'") as info:
        check_finite({"a": torch.ones(2), "b": torch.tensor([0.0, float("inf")]), "c": float("nan")}, step=7)
    assert info.value.name == "b" and info.value.step == 7


def test_finite_check_does_not_report_finite_values_whose_norm_overflows():
    huge = torch.full((4,), 3e38)  # finite float32, but its norm is inf
    assert not _all_finite([huge])  # the fast test says "maybe", ...
    check_finite({"huge": huge, "half": torch.full((3,), 6e4, dtype=torch.float16)}, step=0)  # ... the re-check: fine


def test_finite_gradient_check_names_the_parameter():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    net(torch.ones(2, 3)).sum().backward()
    check_finite_grads(net, step=0)
    net[1].bias.grad[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'1\.bias\.grad'"):
        check_finite_grads(net, step=3)


@pytest.fixture(scope="module")
def model() -> GraphAvatar:
    subject = generate_synthetic_subject(num_frames=4, width=32, height=32, num_test=1, num_vertices_target=300,
                                         expression_dim=4, texture_resolution=32, supersample=1)
    torch.manual_seed(0)
    return GraphAvatar(subject, hierarchy={"factors": [4, 4]}, unet={"filters": [8, 8], "K": 2, "latent": 4},
                       appearance={"sh_degree": 1}, neural_gaussians={"num_offsets": 2, "hidden_dim": 8},
                       ggo={"num_heads": 2, "num_freqs": 4}, enhancer={"channels": [4, 8], "film_hidden": 4})


def test_fused_adam_follows_the_per_parameter_adam(model):
    """``configure_optimizers`` uses fused Adam on CPU; over 20 steps with the schedule it stays within
    float rounding of the per-parameter Adam it replaced (same groups, learning rates, states)."""
    fast = copy.deepcopy(model)
    optimizer, scheduler = fast.configure_optimizers()
    assert all(group["fused"] for group in optimizer.param_groups)
    slow = copy.deepcopy(model)
    reference = torch.optim.Adam([{"params": g, "lr": float(slow.settings["optim"]["lr"][name]), "name": name}
                                  for name, g in slow.parameter_groups().items()])
    assert [g["lr"] for g in reference.param_groups] == [g["lr"] for g in optimizer.param_groups]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        for p_fast, p_slow in zip(fast.parameters(), slow.parameters()):
            grad = torch.randn(p_fast.shape, generator=generator)
            p_fast.grad, p_slow.grad = grad.clone(), grad.clone()
        optimizer.step()
        reference.step()
    for p_fast, p_slow in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(p_fast, p_slow, rtol=1e-5, atol=1e-6)
    assert scheduler is not None
