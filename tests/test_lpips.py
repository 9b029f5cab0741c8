"""The project's LPIPS against the lpips package's own forward pass, with shared weights.

`import lpips` needs torchvision, which does not import here; a stub `torchvision.models`
whose `alexnet()` returns our AlexNet (same seeded random weights) lets the real lpips code
run, so the comparison checks scaling, normalisation, linear layers and averaging.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from headkit import metrics
from headkit.lpips_net import (ALEXNET_ENV, MIN_LPIPS_SIZE, AlexNetFeatures, LPIPSAlex,
                               MetricUnavailable, clear_lpips_cache, default_lin_path,
                               get_lpips, load_lpips, lpips_available)

# torchvision.models.alexnet().features, from torchvision/models/alexnet.py.
TORCHVISION_FEATURE_SHAPES = {
    "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
}


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_lpips_cache()
    yield
    clear_lpips_cache()


@pytest.fixture
def alexnet_file(tmp_path):
    """A torchvision-style AlexNet checkpoint with seeded random weights (plus a classifier)."""
    torch.manual_seed(0)
    feats = AlexNetFeatures()
    state = dict(feats.state_dict())
    state["classifier.1.weight"] = torch.zeros(4, 9216)  # present in the real file; ignored
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(state, path)
    return path, feats


@pytest.fixture
def reference_lpips(monkeypatch, alexnet_file):
    """The lpips package's LPIPS(net='alex', version='0.1') on the same backbone weights."""
    _, feats = alexnet_file
    stub_models = types.ModuleType("torchvision.models")

    def alexnet(pretrained=False, **kwargs):
        holder = torch.nn.Module()
        holder.features = feats.features
        return holder

    stub_models.alexnet = alexnet
    stub = types.ModuleType("torchvision")
    stub.models = stub_models
    before = set(sys.modules)
    monkeypatch.setitem(sys.modules, "torchvision", stub)
    monkeypatch.setitem(sys.modules, "torchvision.models", stub_models)
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    import lpips as lpips_pkg
    ref = lpips_pkg.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True,
                          verbose=False)
    yield ref
    for name in set(sys.modules) - before:  # forget the lpips import made under the stub
        if name == "lpips" or name.startswith("lpips."):
            del sys.modules[name]


def test_alexnet_layout_matches_torchvision():
    shapes = {k: tuple(v.shape) for k, v in AlexNetFeatures().state_dict().items()}
    assert shapes == TORCHVISION_FEATURE_SHAPES


def test_lin_weights_found_in_wheel_without_importing_lpips(monkeypatch):
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        monkeypatch.delitem(sys.modules, name)
    path = default_lin_path()
    assert path is not None and path.is_file() and path.parts[-3:] == ("weights", "v0.1", "alex.pth")
    assert "lpips" not in sys.modules


def test_matches_lpips_package(reference_lpips, alexnet_file):
    path, _ = alexnet_file
    gen = torch.Generator().manual_seed(1)
    preds = torch.rand(3, 64, 64, 3, generator=gen)
    targets = (preds + 0.2 * torch.randn(3, 64, 64, 3, generator=gen)).clamp(0, 1)
    targets[2] = torch.rand(64, 64, 3, generator=gen)  # one unrelated pair
    ours = metrics.lpips(preds, targets, alexnet_path=path)
    with torch.no_grad():
        ref = reference_lpips(preds.permute(0, 3, 1, 2), targets.permute(0, 3, 1, 2),
                              normalize=True).flatten()
    assert ours.shape == (3,)
    assert (ref > 1e-4).all()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # non-square input, a single image
    p, t = preds[0, :48], targets[0, :48]
    with torch.no_grad():
        ref1 = reference_lpips(p.permute(2, 0, 1)[None], t.permute(2, 0, 1)[None], normalize=True)
    torch.testing.assert_close(metrics.lpips(p, t, alexnet_path=path), ref1.flatten()[0],
                               rtol=1e-5, atol=1e-6)


def test_identical_zero_different_positive_and_differentiable(alexnet_file):
    path, _ = alexnet_file
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(2, MIN_LPIPS_SIZE, 40, 3, generator=gen)
    assert torch.equal(metrics.lpips(images, images.clone(), alexnet_path=path), torch.zeros(2))
    other = torch.rand(2, MIN_LPIPS_SIZE, 40, 3, generator=gen, requires_grad=True)
    values = metrics.lpips(other, images, alexnet_path=path)
    assert (values > 0).all()
    values.sum().backward()
    assert other.grad is not None and other.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 31 pixels"):
        metrics.lpips(images[:, :30], images[:, :30], alexnet_path=path)


def test_network_cached_per_device_and_path(alexnet_file):
    path, _ = alexnet_file
    assert get_lpips("cpu", path) is get_lpips(torch.device("cpu"), path)


def test_unavailable_when_backbone_missing(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "alexnet.pth"
    ok, reason = lpips_available(alexnet_path=missing)
    assert not ok and str(missing) in reason
    images = torch.rand(1, 32, 32, 3)
    with pytest.raises(MetricUnavailable, match="nowhere"):
        metrics.lpips(images, images * 0.5, alexnet_path=missing)
    result = metrics.compute_image_metrics(images, images * 0.5, alexnet_path=missing)
    assert result["lpips"] is None and str(missing) in result["lpips_unavailable_reason"]
    assert result["psnr"] > 0 and 0 < result["ssim"] < 1 and result["l2"] > 0
    # the env var is the default location
    monkeypatch.setenv(ALEXNET_ENV, str(missing))
    ok, reason = lpips_available()
    assert not ok and str(missing) in reason


def test_unavailable_when_lin_missing_or_files_corrupt(tmp_path, alexnet_file):
    path, _ = alexnet_file
    ok, reason = lpips_available(alexnet_path=path, lin_path=tmp_path / "lin.pth")
    assert not ok and "linear-layer" in reason
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(MetricUnavailable, match="garbage.pth"):
        load_lpips(alexnet_path=garbage)
    partial = tmp_path / "partial.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, partial)
    with pytest.raises(MetricUnavailable, match="features.10.weight"):
        load_lpips(alexnet_path=partial)


def test_parameters_frozen():
    net = LPIPSAlex()
    assert not any(p.requires_grad for p in net.parameters())
