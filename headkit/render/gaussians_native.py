"""Fused C compositing of projected Gaussians (the ``"native"`` splatting backend, CPU).

Same image formation as the torch compositing of :mod:`.gaussians_torch` (see
:func:`headkit.render.gaussians.rasterize_gaussians`), computed by one C kernel per tile
(``csrc/composite.c``) instead of padded dense tensors, in the manner of gsplat's CUDA
``rasterize_to_pixels``. Per tile and pixel ``p``, over the tile's pairs ``k`` front to back:

* ``power_k = log o_k - sigma_k``, ``sigma = (a dx^2 + c dy^2) / 2 + b dx dy``, ``(dx, dy)`` the
  2D mean minus the pixel centre, evaluated exactly (no expansion around the tile centre);
* ``alpha_k = min(0.999, exp(power_k))``, skipped below 1/255;
* ``T_k = prod_{j<k} (1 - alpha_j)``; the pixel stops at the first pair with
  ``T_k (1 - alpha_k) <= 1e-4`` (early termination: nothing behind it is evaluated);
* ``out_p = sum_k alpha_k T_k f_k``.

The forward saves, per pixel, the final transmittance and the index of the last applied pair;
the backward walks each pixel's pairs back to front from there, recovering ``T_k`` by division
by ``1 - alpha_k``, and writes gradients per (Gaussian, tile) pair (no races, independent of
the number of threads), summed per Gaussian afterwards with ``index_add_``.

The kernel is float32 (other float dtypes are cast for it and the result cast back, as for
gsplat), runs on ``torch.get_num_threads()`` OpenMP threads and is compiled on first use by
:mod:`.native_build`. Without a working C compiler, :func:`rasterize_tiles` logs one warning
and composites with the torch code instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import threading
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import gaussians_torch
from .gaussians_binning import bin_gaussians
from .gaussians_project import ALPHA_THRESHOLD
from .native_build import NativeBuildError, load_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "composite.c"
#: tile side of the native backend when the caller gives none (fastest measured on CPU)
DEFAULT_TILE_SIZE = 8

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_FORWARD_ARGS = [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _INT]
_BACKWARD_ARGS = [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _INT]
_warn_lock = threading.Lock()
_warned = False


@functools.lru_cache(maxsize=1)
def _library() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """``(library, None)``, or ``(None, why it is unavailable)``; built and loaded once."""
    try:
        lib = load_library(SOURCE)
    except NativeBuildError as exc:
        return None, str(exc)
    lib.composite_forward.argtypes, lib.composite_forward.restype = _FORWARD_ARGS, _INT
    lib.composite_backward.argtypes, lib.composite_backward.restype = _BACKWARD_ARGS, _INT
    return lib, None


def native_load_error() -> Optional[str]:
    """Why the native kernel cannot run (None when it can); compiles it on the first call."""
    return _library()[1]


def native_available() -> bool:
    """Whether the native kernel is built and loaded (compiled on the first call)."""
    return native_load_error() is None


def warn_unavailable_once() -> None:
    """Log, once per process, that the native kernel is unavailable and torch composites."""
    global _warned
    with _warn_lock:
        first, _warned = not _warned, True
    if first:
        log.warning("native Gaussian compositing unavailable (%s); using the torch code",
                    native_load_error())


class TilePlan(NamedTuple):
    """Binned pairs and image layout for the kernel (no gradients)."""

    tile_start: Tensor  # [n_tiles + 1] int64, tile t owns pairs tile_start[t] .. tile_start[t+1]-1
    pair_rows: Tensor  # [P] int64 row of attrs / features of each pair, sorted by (tile, depth)
    cameras: int
    height: int
    width: int
    tile_size: int
    max_pairs: int  # largest pair count of a tile


def _ptr(t: Tensor) -> int:
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.data_ptr()


class CompositeNative(torch.autograd.Function):
    """Front-to-back compositing of all tiles by the C kernel (semantics: module docstring).

    Backward, per pixel with ``g = dL/dout_p``, walking back to front:
    ``dL/df_k += alpha_k T_k g``; ``dL/dalpha_k = T_k (f_k . g) - (sum_{j>k} alpha_j T_j f_j . g)
    / (1 - alpha_k)``; ``dL/dpower_k = alpha_k dL/dalpha_k`` (0 where alpha was clamped at
    0.999); ``d power / d (mx, my, a, b, c, log o) = (-(a dx + b dy), -(b dx + c dy), -dx^2/2,
    -dx dy, -dy^2/2, 1)``.

    Args (of ``apply``):
        attrs: ``[R, 6]`` float32 rows ``(mx, my, a, b, c, log o)``, means in pixels.
        features: ``[R, F]`` float32.
        plan: :class:`TilePlan`.

    Returns:
        ``[C, H, W, F]`` float32: ``sum_k alpha_k T_k f_k`` per pixel (no background).
    """

    @staticmethod
    def forward(ctx, attrs: Tensor, features: Tensor, plan: TilePlan) -> Tensor:
        lib, error = _library()
        if lib is None:
            raise RuntimeError(f"native compositing kernel unavailable: {error}")
        attrs, features = attrs.contiguous(), features.contiguous()
        C, H, W, F = plan.cameras, plan.height, plan.width, features.shape[1]
        out = features.new_zeros(C, H, W, F)
        final_t = features.new_empty(C, H, W)
        n_used = torch.empty(C, H, W, dtype=torch.int32)
        failed = lib.composite_forward(
            _ptr(attrs), _ptr(features), _ptr(plan.tile_start), _ptr(plan.pair_rows), C, H, W, F,
            plan.tile_size, plan.max_pairs, _ptr(out), _ptr(final_t), _ptr(n_used),
            torch.get_num_threads())
        if failed:
            raise MemoryError("composite_forward: out of memory for its work buffers")
        ctx.plan = plan
        ctx.save_for_backward(attrs, features, final_t, n_used)
        return out

    @staticmethod
    @once_differentiable  # no double backward
    def backward(ctx, grad_out: Tensor):  # grad_out: [C, H, W, F]
        attrs, features, final_t, n_used = ctx.saved_tensors
        plan: TilePlan = ctx.plan
        lib = _library()[0]
        grad_out = grad_out.contiguous()
        P, F = plan.pair_rows.numel(), features.shape[1]
        grad_pair_attrs = attrs.new_zeros(P, 6)
        grad_pair_feats = features.new_zeros(P, F)
        failed = lib.composite_backward(
            _ptr(attrs), _ptr(features), _ptr(plan.tile_start), _ptr(plan.pair_rows),
            plan.cameras, plan.height, plan.width, F, plan.tile_size, plan.max_pairs,
            _ptr(final_t), _ptr(n_used), _ptr(grad_out), _ptr(grad_pair_attrs),
            _ptr(grad_pair_feats), torch.get_num_threads())
        if failed:
            raise MemoryError("composite_backward: out of memory for its work buffers")
        grad_attrs = grad_feats = None
        if ctx.needs_input_grad[0]:
            grad_attrs = torch.zeros_like(attrs).index_add_(0, plan.pair_rows, grad_pair_attrs)
        if ctx.needs_input_grad[1]:
            grad_feats = torch.zeros_like(features).index_add_(0, plan.pair_rows, grad_pair_feats)
        return grad_attrs, grad_feats, None


def plan_tiles(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    depths: Tensor,  # [C, N]
    radii: Tensor,  # [C, N, 2] int
    width: int,
    height: int,
    tile_size: int,
) -> TilePlan:
    """Bin the Gaussians into tiles (:func:`.gaussians_binning.bin_gaussians`) for the kernel."""
    C = depths.shape[0]
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    pair_rows, _, tile_counts = bin_gaussians(means2d, conics, opacities, radii, depths,
                                              tile_size, tiles_x, tiles_y)
    tile_start = torch.zeros(tile_counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(tile_counts, 0, out=tile_start[1:])
    max_pairs = int(tile_counts.max()) if tile_counts.numel() else 0
    return TilePlan(tile_start, pair_rows.contiguous(), C, height, width, tile_size, max_pairs)


def rasterize_tiles(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [N] or [C, N]
    features: Tensor,  # [C, N, F]
    depths: Tensor,  # [C, N]
    radii: Tensor,  # [C, N, 2] int
    width: int,
    height: int,
    tile_size: int = DEFAULT_TILE_SIZE,
    **torch_options,
) -> Tensor:
    """Composite projected Gaussians into images with the C kernel (CPU tensors).

    A drop-in for :func:`.gaussians_torch.rasterize_tiles` (``torch_options``, e.g. its
    bucketing knobs, are used only when falling back to it): without the kernel (no C
    compiler, failed build) it logs one warning and returns the torch result.

    Returns:
        ``[C, height, width, F]`` in the dtype of ``features``: ``sum_i alpha_i T_i f_i``
        per pixel (no background). Differentiable w.r.t. ``means2d``, ``conics``,
        ``opacities`` and ``features``.
    """
    if means2d.device.type != "cpu":
        raise ValueError(f"the native compositing kernel needs CPU tensors, got {means2d.device}")
    if not native_available():
        warn_unavailable_once()
        return gaussians_torch.rasterize_tiles(means2d, conics, opacities, features, depths,
                                               radii, width, height, tile_size=tile_size,
                                               **torch_options)
    C, N, F = features.shape
    opacities = opacities.expand(C, N)
    plan = plan_tiles(means2d, conics, opacities, depths, radii, width, height, tile_size)
    log_opacities = torch.log(opacities.clamp_min(ALPHA_THRESHOLD))
    attrs = torch.cat([means2d, conics, log_opacities[..., None]], dim=-1).reshape(C * N, 6)
    f32 = torch.float32
    out = CompositeNative.apply(attrs.to(f32), features.reshape(C * N, F).to(f32), plan)
    return out.to(features.dtype)
