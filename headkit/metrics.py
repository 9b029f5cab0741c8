"""Image metrics (L2, PSNR, SSIM, LPIPS), model size and latency timing.

Images are float tensors in [0, 1], channels-last: ``[B, H, W, C]`` gives per-image values
``[B]``, a single ``[H, W, C]`` image gives a 0-d tensor. PSNR and SSIM are plain torch and
differentiable, so they double as losses. Reported numbers follow scikit-image's reference
definitions (``peak_signal_noise_ratio(data_range=1)`` and ``structural_similarity(
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headkit.lpips_net import MetricUnavailable, get_lpips, lpips_available, prepare_lpips_weights

__all__ = [
    "l2", "psnr", "ssim", "ssim_shared_target", "dssim", "lpips", "lpips_available", "prepare_lpips_weights", "MetricUnavailable",
    "compute_image_metrics", "model_size_mb", "file_size_mb", "time_fn", "Stopwatch",
]

MB = 2 ** 20  # one "MB" here is 2**20 bytes (MiB), as in the 3DGS literature's model sizes


def _as_batch(preds: Tensor, targets: Tensor, name: str) -> tuple[Tensor, Tensor, bool]:
    """Check shapes and add a batch axis to single images; returns (preds, targets, single)."""
    if preds.shape != targets.shape:
        raise ValueError(f"{name}: prediction {tuple(preds.shape)} and target "
                         f"{tuple(targets.shape)} differ in shape")
    if preds.ndim not in (3, 4):
        raise ValueError(f"{name}: expected [H, W, C] or [B, H, W, C] images, got "
                         f"{tuple(preds.shape)}")
    if not (preds.is_floating_point() and targets.is_floating_point()):
        raise TypeError(f"{name}: expected float images in [0, 1], got {preds.dtype} and "
                        f"{targets.dtype}")
    single = preds.ndim == 3
    if single:
        preds, targets = preds[None], targets[None]
    return preds, targets, single


def _unbatch(values: Tensor, single: bool) -> Tensor:
    return values[0] if single else values


def l2(preds: Tensor, targets: Tensor) -> Tensor:  # [B, H, W, C] or [H, W, C]
    """Mean squared error per image, ``mean((pred - target)^2)`` over pixels and channels.

    This is the "L2" column of GraphAvatar's tables (an MSE, not a root or a sum).
    """
    preds, targets, single = _as_batch(preds, targets, "l2")
    return _unbatch((preds - targets).square().mean(dim=(1, 2, 3)), single)


def psnr(preds: Tensor, targets: Tensor, data_range: float = 1.0) -> Tensor:  # [B,H,W,C]
    """Peak signal-to-noise ratio per image, ``10 log10(data_range^2 / MSE)`` in dB.

    Identical images give ``+inf`` (as scikit-image does). Averaging over a test set is the
    mean of per-image PSNRs, as in the 3DGS/GraphAvatar evaluation scripts.
    """
    mses = l2(preds, targets)
    return 10.0 * torch.log10(data_range ** 2 / mses)


def _gaussian_window(sigma: float, radius: int, dtype: torch.dtype,
                     device: torch.device) -> Tensor:
    """Normalised 1-D gaussian taps ``[2 radius + 1]`` (scipy.ndimage's ``gaussian_filter``)."""
    xs = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (xs / sigma) ** 2)
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def _blur(images: Tensor, taps: Tensor, padding: int) -> Tensor:  # images: [B, C, H, W]
    """Separable depthwise gaussian blur; ``padding`` zero pixels on each side."""
    C, n = images.shape[1], taps.numel()
    rows = taps.view(1, 1, 1, n).expand(C, 1, 1, n)
    cols = taps.view(1, 1, n, 1).expand(C, 1, n, 1)
    out = F.conv2d(images, rows, padding=(0, padding), groups=C)
    return F.conv2d(out, cols, padding=(padding, 0), groups=C)


def ssim(preds: Tensor, targets: Tensor, *, sigma: float = 1.5, border: str = "valid",
         k1: float = 0.01, k2: float = 0.03, data_range: float = 1.0) -> Tensor:  # [B,H,W,C]
    """Structural similarity per image (Wang et al. 2004), mean over pixels and channels.

    Gaussian window of ``2 * int(3.5 sigma + 0.5) + 1`` taps (11 for sigma 1.5), population
    (co)variances, ``C1 = (k1 R)^2``, ``C2 = (k2 R)^2``::

        S = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))

    Args:
        border: ``"valid"`` (default) averages S only where the window lies inside the image,
            which equals scikit-image's ``structural_similarity`` (it crops ``(win - 1) / 2``
            pixels off each side). ``"same"`` zero-pads the image and averages S everywhere,
            which is the ``ssim()`` of the gaussian-splatting code that 3DGS-style methods
            (GraphAvatar included) train with. Report numbers with ``"valid"``.
    """
    return ssim_shared_target([preds], targets, sigma=sigma, border=border, k1=k1, k2=k2,
                              data_range=data_range)[0]


def ssim_shared_target(preds: Sequence[Tensor], targets: Tensor, *, sigma: float = 1.5,
                       border: str = "valid", k1: float = 0.01, k2: float = 0.03,
                       data_range: float = 1.0) -> list[Tensor]:  # each [B,H,W,C]
    """:func:`ssim` of several predictions against the same ``targets``, one tensor per
    prediction (bit-identical to calling :func:`ssim` for each), with the target's local mean
    and variance blurred once instead of once per prediction (a training loss scoring the
    final and the coarse image against one frame)."""
    if border not in ("valid", "same"):
        raise ValueError(f"ssim: border must be 'valid' or 'same', got {border!r}")
    if not preds:
        return []
    checked = [_as_batch(p, targets, "ssim") for p in preds]
    targets, single = checked[0][1], checked[0][2]
    radius = int(3.5 * sigma + 0.5)
    if min(targets.shape[1:3]) < 2 * radius + 1:
        raise ValueError(f"ssim: images of {tuple(targets.shape[1:3])} pixels are smaller than "
                         f"the {2 * radius + 1}-pixel window")
    y = targets.permute(0, 3, 1, 2)
    taps = _gaussian_window(sigma, radius, y.dtype, y.device)
    pad = radius if border == "same" else 0
    mu_y = _blur(y, taps, pad)
    var_y = _blur(y * y, taps, pad) - mu_y.square()
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    results = []
    for p, _, _ in checked:
        x = p.permute(0, 3, 1, 2)
        mu_x = _blur(x, taps, pad)
        var_x = _blur(x * x, taps, pad) - mu_x.square()
        cov_xy = _blur(x * y, taps, pad) - mu_x * mu_y
        maps = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
            (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
        results.append(_unbatch(maps.mean(dim=(1, 2, 3)), single))
    return results


def dssim(preds: Tensor, targets: Tensor, **ssim_kwargs) -> Tensor:  # [B, H, W, C]
    """D-SSIM loss ``1 - SSIM`` per image, the term 3DGS weights by 0.2 (``0.8 L1 + 0.2 D-SSIM``).

    Not halved: the lpips package's ``dssim`` is ``(1 - SSIM) / 2``; the gaussian-splatting
    and GraphAvatar training code use ``1 - SSIM``, which is what their loss weights assume.
    Keyword arguments go to :func:`ssim` (training code usually passes ``border="same"``).
    """
    return 1.0 - ssim(preds, targets, **ssim_kwargs)


def lpips(preds: Tensor, targets: Tensor, *, alexnet_path: str | os.PathLike | None = None,
          lin_path: str | os.PathLike | None = None,
          download: bool = False) -> Tensor:  # [B, H, W, 3] or [H, W, 3]
    """LPIPS (AlexNet, v0.1) per image; see :mod:`headkit.lpips_net`.

    The network is cached per device. Gradients flow to the images when they require grad.
    ``download=True`` fetches weights missing at their default place into the torch hub cache
    first, as the lpips package does (never with ``HEADKIT_OFFLINE=1``); the default does not.

    Raises:
        MetricUnavailable: a weight file is missing (``reason`` says which and where).
    """
    preds, targets, single = _as_batch(preds, targets, "lpips")
    net = get_lpips(preds.device, alexnet_path, lin_path, download=download)
    return _unbatch(net(preds, targets), single)


@torch.no_grad()
def compute_image_metrics(preds: Tensor, targets: Tensor, *, with_lpips: bool = True,
                          alexnet_path: str | os.PathLike | None = None,
                          download: bool = False) -> dict:  # [B,H,W,3]
    """Batch means of L2, PSNR, SSIM and LPIPS as Python floats, ready for ``metrics.json``.

    When LPIPS cannot be computed the result holds ``"lpips": None`` and
    ``"lpips_unavailable_reason"``; it is never reported as 0. ``download``: see :func:`lpips`.
    """
    out = {"l2": l2(preds, targets).mean().item(),
           "psnr": psnr(preds, targets).mean().item(),
           "ssim": ssim(preds, targets).mean().item(),
           "lpips": None}
    if not with_lpips:
        out["lpips_unavailable_reason"] = "LPIPS disabled by the caller"
        return out
    try:
        out["lpips"] = lpips(preds, targets, alexnet_path=alexnet_path, download=download).mean().item()
    except MetricUnavailable as exc:
        out["lpips_unavailable_reason"] = exc.reason
    return out


def _iter_tensors(obj) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _iter_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _iter_tensors(v)]
    return []


def model_size_mb(module_or_state: nn.Module | Mapping, dtype: torch.dtype | None = None) -> float:
    """Stored size of a model in MB (``MB = 2**20`` bytes): parameters and persistent buffers.

    A module is measured through its ``state_dict()`` (what a checkpoint stores; non-persistent
    buffers are not stored); a mapping may nest dicts/lists of tensors. Tensors that share
    storage (tied weights) count once. ``dtype`` (e.g. ``torch.float16``) prices every
    floating-point tensor at that dtype's item size; integer and bool tensors keep theirs.
    """
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    if not isinstance(state, Mapping):
        raise TypeError(f"model_size_mb: expected an nn.Module or a state dict, got {type(state)}")
    seen, total = set(), 0
    for t in _iter_tensors(state):
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            continue
        seen.add(key)
        itemsize = t.element_size()
        if dtype is not None and t.is_floating_point():
            itemsize = torch.empty((), dtype=dtype).element_size()
        total += t.numel() * itemsize
    return total / MB


def file_size_mb(path: str | os.PathLike) -> float:
    """Size of a file, or the total of all files under a folder, in MB (2**20 bytes)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size / MB
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / MB
    raise FileNotFoundError(f"file_size_mb: no such file or folder: {p}")


def _sync(device: torch.device | None) -> None:
    """Wait for queued CUDA work so wall-clock time covers it (no-op without CUDA)."""
    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


def _timing_device(device: torch.device | str | None) -> torch.device | None:
    return None if device is None else torch.device(device)


def time_fn(fn: Callable[[], object], *, repeats: int = 20, warmup: int = 5,
            device: torch.device | str | None = None) -> dict:
    """Wall-clock latency of ``fn()`` with CUDA synchronisation, in milliseconds.

    ``fn`` runs ``warmup`` untimed times, then ``repeats`` timed times. With a CUDA device
    (or ``device=None`` while CUDA is available) the GPU is synchronised before the first
    timed call and after each call, so queued kernels are counted: the authors' code timed
    with ``time.time()`` and no synchronisation, which under-reports.

    Returns:
        ``{"median_ms", "mean_ms", "min_ms", "max_ms", "p90_ms", "repeats", "warmup"}``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_fn: need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    dev = _timing_device(device)
    for _ in range(warmup):
        fn()
    _sync(dev)
    times_ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(dev)
        times_ms.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times_ms), "mean_ms": statistics.fmean(times_ms),
            "min_ms": min(times_ms), "max_ms": max(times_ms),
            "p90_ms": float(np.percentile(times_ms, 90)), "repeats": repeats, "warmup": warmup}


class Stopwatch:
    """Context manager timing one block, CUDA-synchronised at both ends like :func:`time_fn`.

    ``with Stopwatch("cuda") as sw: render(); print(sw.elapsed_ms)``
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = _timing_device(device)
        self.elapsed_ms = math.nan

    def __enter__(self) -> Stopwatch:
        _sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.elapsed_ms = (time.perf_counter() - self._start) * 1e3
