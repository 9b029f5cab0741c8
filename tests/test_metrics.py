"""Image metrics against scikit-image / scipy references, model size and timing."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.data import astronaut
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from headkit import metrics

SKIMAGE_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                    data_range=1, channel_axis=-1)


def _image_pairs():
    """(name, preds [B,H,W,3], targets) as float32 numpy: random noise and a real portrait."""
    rng = np.random.default_rng(0)
    rand_a = rng.uniform(size=(2, 24, 30, 3)).astype(np.float32)
    rand_b = np.clip(rand_a + rng.normal(0, 0.1, rand_a.shape), 0, 1).astype(np.float32)
    face = astronaut()[40:200:2, 160:320:2].astype(np.float32) / 255.0  # 80x80 crop of the face
    noisy = np.clip(face + rng.normal(0, 0.05, face.shape), 0, 1).astype(np.float32)
    blurred = gaussian_filter(face, sigma=(1.2, 1.2, 0)).astype(np.float32)
    return [("random", rand_a, rand_b),
            ("astronaut", np.stack([face, face]), np.stack([noisy, blurred]))]


@pytest.mark.parametrize("name,preds,targets", _image_pairs(), ids=lambda x: x if isinstance(x, str) else "")
def test_psnr_ssim_match_skimage(name, preds, targets):
    p, t = torch.from_numpy(preds), torch.from_numpy(targets)
    ours_psnr, ours_ssim = metrics.psnr(p, t), metrics.ssim(p, t)
    assert ours_psnr.shape == ours_ssim.shape == (len(preds),)
    for i in range(len(preds)):
        ref_psnr = peak_signal_noise_ratio(targets[i], preds[i], data_range=1)
        ref_ssim = structural_similarity(preds[i], targets[i], **SKIMAGE_SSIM)
        assert abs(ours_psnr[i].item() - ref_psnr) < 1e-3, name
        assert abs(ours_ssim[i].item() - ref_ssim) < 1e-3, name
        # a single [H, W, 3] image gives a scalar equal to its batch entry
        single = metrics.ssim(p[i], t[i])
        assert single.ndim == 0 and torch.allclose(single, ours_ssim[i])
        assert metrics.psnr(p[i], t[i]).ndim == 0


def test_ssim_same_border_matches_zero_padded_reference():
    """``border="same"`` is the gaussian-splatting training SSIM: zero padding, mean of all."""
    _, preds, targets = _image_pairs()[1]
    x, y = preds[0].astype(np.float64), targets[0].astype(np.float64)

    def blur(a):  # per channel, zero padding, 11 taps
        return gaussian_filter(a, sigma=(1.5, 1.5, 0), mode="constant", truncate=3.5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ref = (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean()
    ours = metrics.ssim(torch.from_numpy(preds[0]), torch.from_numpy(targets[0]), border="same")
    assert abs(ours.item() - ref) < 1e-4
    valid = metrics.ssim(torch.from_numpy(preds[0]), torch.from_numpy(targets[0]))
    assert abs(ours.item() - valid.item()) > 1e-4  # the two borders really differ


def test_hand_checked_values():
    zeros, halves = torch.zeros(2, 12, 12, 3), torch.full((2, 12, 12, 3), 0.5)
    torch.testing.assert_close(metrics.l2(zeros, halves), torch.full((2,), 0.25))
    torch.testing.assert_close(metrics.psnr(zeros, halves), torch.full((2,), 10 * math.log10(4)))
    images = torch.rand(12, 13, 3)
    assert metrics.psnr(images, images).item() == math.inf
    assert metrics.ssim(images, images).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(metrics.dssim(images, images * 0.5),
                               1 - metrics.ssim(images, images * 0.5))


def test_ssim_psnr_differentiable():
    gen = torch.Generator().manual_seed(0)
    preds = torch.rand(1, 11, 12, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(1, 11, 12, 2, generator=gen, dtype=torch.float64)
    for fn in (lambda p: metrics.ssim(p, targets), lambda p: metrics.ssim(p, targets, border="same"),
               lambda p: metrics.psnr(p, targets)):
        assert torch.autograd.gradcheck(fn, (preds,), fast_mode=True)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(8, 8, 3\).*\(8, 9, 3\)"):
        metrics.l2(torch.rand(8, 8, 3), torch.rand(8, 9, 3))
    with pytest.raises(ValueError, match="11-pixel window"):
        metrics.ssim(torch.rand(10, 20, 3), torch.rand(10, 20, 3))
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        metrics.psnr(torch.rand(5, 5), torch.rand(5, 5))
    with pytest.raises(TypeError, match="float"):
        metrics.psnr(torch.zeros(5, 5, 3, dtype=torch.uint8), torch.zeros(5, 5, 3, dtype=torch.uint8))


def test_model_size_counts_params_and_buffers():
    linear = torch.nn.Linear(10, 5)  # 55 float32
    assert metrics.model_size_mb(linear) == 55 * 4 / 2 ** 20
    bn = torch.nn.BatchNorm1d(8)  # weight, bias, running mean/var: 32 floats; counter: 1 int64
    assert metrics.model_size_mb(bn) == (32 * 4 + 8) / 2 ** 20
    assert metrics.model_size_mb(bn, dtype=torch.float16) == (32 * 2 + 8) / 2 ** 20
    # tied weights count once; non-persistent buffers are not stored
    tied = torch.nn.Sequential(torch.nn.Embedding(7, 3), torch.nn.Linear(3, 7, bias=False))
    tied[1].weight = tied[0].weight
    tied.register_buffer("scratch", torch.zeros(1000), persistent=False)
    assert metrics.model_size_mb(tied) == 21 * 4 / 2 ** 20
    nested = {"model": linear.state_dict(), "extra": [torch.zeros(3, dtype=torch.int32)]}
    assert metrics.model_size_mb(nested) == (55 * 4 + 12) / 2 ** 20


def test_file_size(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\0" * 2 ** 20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"\0" * 2 ** 19)
    assert metrics.file_size_mb(tmp_path / "a.bin") == 1.0
    assert metrics.file_size_mb(tmp_path) == 1.5
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        metrics.file_size_mb(tmp_path / "missing.bin")


def test_time_fn_statistics_exact_with_fake_clock(monkeypatch):
    """Warm-up calls take 1 s each on a fake clock and must not show up in the statistics."""
    clock = {"now": 0.0, "calls": 0}
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock["now"])

    def fn():
        clock["calls"] += 1
        clock["now"] += 1.0 if clock["calls"] <= 3 else (clock["calls"] - 3) * 1e-3

    stats = metrics.time_fn(fn, repeats=10, warmup=3)
    assert clock["calls"] == 13
    assert stats["repeats"] == 10 and stats["warmup"] == 3
    assert stats["median_ms"] == pytest.approx(5.5)
    assert stats["mean_ms"] == pytest.approx(5.5)
    assert stats["min_ms"] == pytest.approx(1.0) and stats["max_ms"] == pytest.approx(10.0)
    assert stats["p90_ms"] == pytest.approx(np.percentile(np.arange(1, 11), 90))


def test_time_fn_real_sleep_and_stopwatch():
    stats = metrics.time_fn(lambda: time.sleep(0.005), repeats=5, warmup=1)
    assert 4.5 < stats["median_ms"] < 60  # loose: the machine is shared
    with metrics.Stopwatch() as sw:
        time.sleep(0.005)
    assert 4.5 < sw.elapsed_ms < 60


def test_cuda_synchronised_before_and_after_each_call(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    metrics.time_fn(lambda: None, repeats=4, warmup=2, device="cuda:0")
    assert synced == [torch.device("cuda:0")] * 5
    synced.clear()
    metrics.time_fn(lambda: None, repeats=4, warmup=2, device="cpu")
    assert synced == []
    with metrics.Stopwatch("cuda"):
        pass
    assert len(synced) == 2
