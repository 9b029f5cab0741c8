"""Differentiable 3D Gaussian splatting: one API, three backends (gsplat on CUDA, a C kernel on
CPU, torch anywhere).

:func:`rasterize_gaussians` renders ``C`` pinhole cameras. All backends implement the
same image formation, that of gsplat 1.5.3's ``rasterization(..., packed=False,
rasterize_mode="classic", render_mode="RGB+D")``:

Projection (per camera; ``W, t`` the viewmat's rotation and translation, OpenCV axes):
  * camera-space mean ``p = W mu + t = (x, y, z)``; the Gaussian is culled if
    ``z < near_plane`` or ``z > far_plane``;
  * 3D covariance ``Sigma = R S S^T R^T``, ``R`` from the normalised wxyz quaternion,
    ``S = diag(scales)`` (linear scales);
  * 2D mean ``(fx x/z + cx, fy y/z + cy)``; pixel ``(i, j)`` (row, column) has its centre at
    ``(j + 0.5, i + 0.5)``;
  * EWA: ``Sigma2d = J W Sigma W^T J^T + 0.3 I`` with the perspective Jacobian
    ``J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]`` whose ``tx/z, ty/z`` are clamped to
    1.3x the field of view, ``tx/z in [-(cx/fx + 0.15 width/fx), (width-cx)/fx + 0.15 width/fx]``
    (and likewise in y); the 0.3 px low-pass is added without antialiasing compensation;
  * radius per axis ``ceil(e sqrt(Sigma2d_ii))`` with ``e = min(3.33, sqrt(2 ln(255 o)))``:
    gsplat 1.5's opacity-aware box, which contains every pixel with ``alpha >= 1/255``, so
    the image does not depend on it. (The original 3DGS used ``ceil(3 sigma_max)``, which
    cuts off pixels with ``1/255 <= alpha < o e^-4.5``; gsplat 1.5.3 renders those, so do
    we.) Gaussians with ``o < 1/255`` or whose box misses the image get radius 0 (culled).

Compositing (per pixel, Gaussians sorted front to back by camera z, per tile):
  * ``alpha_i = min(0.999, o_i exp(-d^T Sigma2d^-1 d / 2))``, ``d`` = 2D mean - pixel
    centre; pairs with ``alpha_i < 1/255`` are skipped. (0.999 is gsplat 1.5.3's clamp; the
    original 3DGS kernel used 0.99.)
  * ``T_i = prod_{j<i} (1 - alpha_j)``; compositing stops at the first Gaussian whose
    ``T_i (1 - alpha_i)`` would be ``<= 1e-4``: that one and all behind it are not applied.
  * ``color = sum_i alpha_i T_i c_i + T_final bg``, ``alpha = 1 - T_final``;
  * depth ``= sum_i alpha_i T_i z_i``: the alpha-weighted camera z, NOT divided by alpha
    (gsplat's "D"/"RGB+D"; its "ED" divides by alpha). Divide by ``alphas`` yourself for
    expected depth where ``alphas > 0``. The background does not enter depth.

Intrinsics: only ``fx, fy, cx, cy`` of ``Ks`` are read (no skew), as in gsplat's kernels.

Colours: ``colors [N, D]`` (or per camera ``[C, N, D]``) are used as given, any ``D``. With
``sh_degree`` set, ``colors [N, K, 3]`` are SH coefficients (``K >= (sh_degree + 1)^2``, the
first ones used) evaluated along ``mu - camera centre`` and mapped by ``max(sh + 0.5, 0)``.

Backends: ``"native"`` (:mod:`.gaussians_native`: CPU; the torch backend's projection and
binning, then a fused C kernel per tile with early termination for the compositing, float32,
compiled with the system C compiler on first use; a render's forward+backward is 2-3x faster
than with ``"torch"`` on CPU, see ``benchmarks/gaussians.md``; without a working compiler it
logs a warning and renders with torch), ``"torch"`` (:mod:`.gaussians_torch`: differentiable w.r.t. every float input,
``viewmats`` and ``Ks`` included, CPU or CUDA, computes in the input dtype), ``"gsplat"``
(CUDA only, gsplat 1.5.x: 1.4 returns radii ``[C, N]`` and renders differently, so other
versions are refused; gsplat gives no gradient for ``Ks``), ``"auto"`` (gsplat for CUDA
tensors when a supported gsplat is installed and its extension loads, which may JIT-compile
it on first use; native for float32 CPU tensors when its kernel builds; else torch).
``auto`` never falls back silently: the first render with each choice logs the backend and
why (:func:`auto_backend`, e.g. ``"gsplat (CUDA)"``, ``"native (no CUDA device)"``,
``"torch (gsplat not installed)"``; a warning when a CUDA device renders with torch or the
native kernel is unavailable), and :func:`record_render_backends` collects what rendered
(evaluation writes it to ``metrics.json`` as ``render_backend``). The backends differ only in
speed and float rounding; each one's tile size is its fastest (:data:`DEFAULT_TILE_SIZES`).

Precision: the gsplat and native kernels are float32. Other floating inputs (float64, half)
given to those backends are cast to float32 for the kernel, and the float outputs are cast back
to the input dtype (gradients flow through the casts), so every backend returns the input
dtype; the result then has float32 precision. The torch backend computes in the input dtype.

Inputs with NaN/Inf, or opacities outside [0, 1], raise :class:`GaussianRasterizationError`
instead of silently vanishing.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import operator
import re
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from headkit.encodings import eval_sh

from . import gaussians_native
from .gaussians_native import native_load_error
from .gaussians_native import rasterize_tiles as rasterize_tiles_native
from .gaussians_project import camera_centers, project_gaussians
from .gaussians_torch import rasterize_tiles

log = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "torch", "gsplat")
#: tile side of each backend when ``tile_size`` is None (the fastest measured)
DEFAULT_TILE_SIZES = {"torch": 4, "native": gaussians_native.DEFAULT_TILE_SIZE, "gsplat": 16}
EPS2D = 0.3
#: gsplat releases whose kernels follow the image formation above (major, minor)
GSPLAT_SUPPORTED = (1, 5)


class GaussianRasterizationError(ValueError):
    """Invalid input to :func:`rasterize_gaussians` (names the argument and the problem)."""


def rasterize_gaussians(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] linear
    opacities: Tensor,  # [N] in [0, 1]
    colors: Tensor,  # [N, D] | [C, N, D] | [N, K, 3] with sh_degree
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    *,
    sh_degree: Optional[int] = None,
    backgrounds: Optional[Tensor] = None,  # [C, D]
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    backend: str = "auto",
    tile_size: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Render 3D Gaussians into ``C`` cameras (semantics in the module docstring).

    Args:
        means, quats, scales, opacities: Gaussian centres, wxyz rotations (any norm), linear
            scales and activated opacities.
        colors: ``[N, D]`` or ``[C, N, D]`` features, or ``[N, K, 3]`` SH coefficients when
            ``sh_degree`` is given.
        viewmats: world-to-camera matrices (OpenCV axes); ``Ks``: pinhole intrinsics.
        backgrounds: ``[C, D]`` colours added as ``T_final * bg``; ``None`` means black.
        backend: ``"auto"``, ``"native"``, ``"torch"`` or ``"gsplat"`` (module docstring).
        tile_size: tile side in pixels; ``None`` picks the backend's
            (:data:`DEFAULT_TILE_SIZES`: 4 for torch, 8 for native, 16 for gsplat). Only
            speed and memory depend on it.

    Returns:
        ``colors [C, H, W, D]``, ``depths [C, H, W, 1]`` (alpha-weighted z, not normalised),
        ``alphas [C, H, W, 1]`` and ``info`` with ``radii [C, N, 2]`` int32 (0 = culled),
        ``means2d [C, N, 2]``, ``depths [C, N]`` (camera z), ``visible [C, N]`` bool,
        ``conics [C, N, 3]`` and ``backend`` (the one that ran). Float outputs have the
        inputs' dtype on every backend.
    """
    _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                  sh_degree, backgrounds, near_plane, far_plane, backend, tile_size)
    width, height = int(width), int(height)
    backend = _choose_backend(backend, means)
    args = (means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree,
            backgrounds, near_plane, far_plane, tile_size or DEFAULT_TILE_SIZES[backend])
    if backend == "gsplat":
        return _rasterize_gsplat(*args)
    return _rasterize_tiled(*args, backend=backend)


def _choose_backend(backend: str, means: Tensor) -> str:
    """The backend that renders for the requested one, noted (and logged) with the reason."""
    if backend == "auto":
        backend, reason = auto_backend(means.device, means.dtype)
        warn = backend == "torch" and (means.is_cuda or native_load_error() is not None)
        _note_backend(reason, log_as=log.warning if warn else log.info)
        return backend
    if backend == "native":
        if means.device.type != "cpu":
            raise GaussianRasterizationError(
                f"backend='native' needs CPU tensors, got means on {means.device}; "
                "use backend='auto' (gsplat on CUDA)")
        error = native_load_error()
        if error is not None:
            _note_backend(f"torch (backend='native': native kernel unavailable: {error})",
                          log_as=log.warning, requested="native")
            return "torch"
    _note_backend(f"{backend} (backend={backend!r})", log_as=None)
    return backend


def _compositor(backend: str) -> Callable:
    """``rasterize_tiles`` of a tiled backend (looked up per call, so benchmarks can wrap it)."""
    return {"torch": rasterize_tiles, "native": rasterize_tiles_native}[backend]


def _rasterize_tiled(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                     sh_degree, backgrounds, near_plane, far_plane, tile_size, backend):
    """The torch and native backends: torch projection, then the backend's compositing."""
    means2d, conics, depths, radii = project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height,
        near_plane=near_plane, far_plane=far_plane, eps2d=EPS2D)
    C, N = depths.shape
    if sh_degree is not None:
        dirs = means[None] - camera_centers(viewmats)[:, None]  # [C, N, 3]
        coeffs = colors[:, : (sh_degree + 1) ** 2]  # [N, K', 3]
        colors = torch.clamp_min(eval_sh(coeffs[None], dirs) + 0.5, 0.0)  # [C, N, 3]
    elif colors.dim() == 2:
        colors = colors[None].expand(C, N, colors.shape[-1])
    D = colors.shape[-1]
    # Depth and a constant 1 ride along as extra channels: one pass gives colour, depth, alpha.
    features = torch.cat([colors, depths[..., None], torch.ones_like(depths)[..., None]], -1)
    images = _compositor(backend)(means2d, conics, opacities, features, depths, radii, width,
                                  height, tile_size=tile_size)  # [C, H, W, D + 2]
    out_colors, out_depths, out_alphas = images.split([D, 1, 1], dim=-1)
    if backgrounds is not None:
        out_colors = out_colors + (1.0 - out_alphas) * backgrounds[:, None, None, :]
    info = {"radii": radii, "means2d": means2d, "depths": depths,
            "visible": (radii > 0).all(-1), "conics": conics, "backend": backend}
    return out_colors, out_depths, out_alphas, info


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                      sh_degree, backgrounds, near_plane, far_plane, tile_size):
    if not means.is_cuda:
        raise GaussianRasterizationError(
            f"backend='gsplat' needs CUDA tensors, got means on {means.device}; "
            "use backend='torch' (or 'auto') on CPU")
    if not gsplat_available():
        raise RuntimeError(
            f"backend='gsplat': {_gsplat_load_error()}; use backend='torch' (or 'auto') or "
            f"install gsplat {GSPLAT_SUPPORTED[0]}.{GSPLAT_SUPPORTED[1]}.x with working CUDA")
    import gsplat

    return _call_gsplat(gsplat.rasterization, means, quats, scales, opacities, colors, viewmats,
                        Ks, width, height, sh_degree, backgrounds, near_plane, far_plane, tile_size)


def _call_gsplat(rasterization: Callable, means, quats, scales, opacities, colors, viewmats, Ks,
                 width, height, sh_degree, backgrounds, near_plane, far_plane, tile_size):
    """Call gsplat's ``rasterization`` (passed in, so tests can substitute it on CPU) with
    float32 inputs and return our outputs in the input dtype (see "Precision" above)."""
    dtype = means.dtype
    f32 = (lambda t: t if t is None or t.dtype == torch.float32 else t.float())  # noqa: E731
    render, alphas, meta = rasterization(
        f32(means), f32(quats), f32(scales), f32(opacities), f32(colors), f32(viewmats), f32(Ks),
        width, height, near_plane=near_plane, far_plane=far_plane, eps2d=EPS2D,
        sh_degree=sh_degree, packed=False, tile_size=tile_size, backgrounds=f32(backgrounds),
        render_mode="RGB+D", rasterize_mode="classic")
    back = (lambda t: t.to(dtype))  # noqa: E731
    radii = meta["radii"]
    info = {"radii": radii, "means2d": back(meta["means2d"]), "depths": back(meta["depths"]),
            "visible": (radii > 0).all(-1), "conics": back(meta["conics"]), "backend": "gsplat"}
    return back(render[..., :-1]), back(render[..., -1:]), back(alphas), info


def _gsplat_version() -> Optional[str]:
    try:
        return importlib.metadata.version("gsplat")
    except importlib.metadata.PackageNotFoundError:
        return None


def _probe_gsplat() -> Optional[str]:
    """Why the gsplat backend cannot render (None when it can): not installed, an unsupported
    version, no CUDA, or a CUDA extension that fails to load/build."""
    if importlib.util.find_spec("gsplat") is None:
        return "gsplat not installed"
    version = _gsplat_version()
    found = re.match(r"(\d+)\.(\d+)", version or "")
    if found is None or (int(found[1]), int(found[2])) != GSPLAT_SUPPORTED:
        want = f"{GSPLAT_SUPPORTED[0]}.{GSPLAT_SUPPORTED[1]}.x"
        return (f"gsplat {version or '(unknown version)'} installed, {want} needed (1.4 returns radii "
                f"[C, N] and renders differently); pip install 'gsplat>={want[:-2]},<{GSPLAT_SUPPORTED[0]}."
                f"{GSPLAT_SUPPORTED[1] + 1}'")
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from gsplat.cuda._backend import _C
    except Exception as exc:  # any build/load failure means: fall back to torch
        return f"gsplat's CUDA extension failed to load ({type(exc).__name__}: {exc})"
    return None if _C is not None else "gsplat's CUDA extension failed to load (gsplat.cuda._backend._C is None)"


@functools.lru_cache(maxsize=1)
def _gsplat_load_error() -> Optional[str]:
    return _probe_gsplat()


def gsplat_available() -> bool:
    """Whether a supported gsplat's CUDA extension loads (tried once, may JIT-compile on first call)."""
    return _gsplat_load_error() is None


def auto_backend(device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """The backend ``backend="auto"`` renders tensors on ``device`` of ``dtype`` with, and why.

    Returns ``(backend, reason)``, ``backend`` ``"gsplat"``, ``"native"`` or ``"torch"`` and
    ``reason`` a short string starting with it: ``"gsplat (CUDA)"``, ``"native (no CUDA
    device)"``, ``"native (tensors on cpu, not CUDA)"`` (CUDA exists but the data is
    elsewhere), ``"torch (no CUDA device; float64 inputs, the native kernel is float32)"``,
    ``"torch (no CUDA device; native kernel unavailable: no C compiler found ...)"``,
    ``"torch (gsplat not installed)"``, ``"torch (gsplat 1.4.0 installed, 1.5.x needed ...)"``
    or ``"torch (gsplat's CUDA extension failed to load (...))"``. The first call on the CPU
    may compile the native kernel.
    """
    device = torch.device(device)
    if device.type != "cuda":
        where = ("no CUDA device" if not torch.cuda.is_available()
                 else f"tensors on {device.type}, not CUDA")
        if device.type != "cpu":
            return "torch", f"torch ({where})"
        if dtype != torch.float32:
            return "torch", f"torch ({where}; {str(dtype)[6:]} inputs, the native kernel is float32)"
        error = native_load_error()
        if error is not None:
            return "torch", f"torch ({where}; native kernel unavailable: {error})"
        return "native", f"native ({where})"
    error = _gsplat_load_error()
    if error is None:
        return "gsplat", "gsplat (CUDA)"
    return "torch", f"torch ({error})"


_backend_lock = threading.Lock()
_logged_backends: set[str] = set()
_recorders: list[list[str]] = []


def _note_backend(reason: str, log_as: Optional[Callable] = None, requested: str = "auto") -> None:
    """Add ``reason`` to the active recorders; log it with ``log_as`` the first time (an
    ``auto`` choice: a warning when it falls back to torch (CUDA tensors, or no native kernel),
    else info; ``backend="native"`` without its kernel: a warning)."""
    with _backend_lock:
        for seen in _recorders:
            if reason not in seen:
                seen.append(reason)
        first = log_as is not None and reason not in _logged_backends
        if first:
            _logged_backends.add(reason)
    if first:
        log_as("Gaussian splatting (backend=%s) renders with %s", requested, reason)


@contextmanager
def record_render_backends() -> Iterator[list[str]]:
    """Collect, in order of first use, the backend reasons (as :func:`auto_backend` words
    them; ``"torch (backend='torch')"`` for an explicit choice) of every
    :func:`rasterize_gaussians` call made, from any thread, inside the ``with`` block."""
    seen: list[str] = []
    with _backend_lock:
        _recorders.append(seen)
    try:
        yield seen
    finally:
        with _backend_lock:
            _recorders[:] = [r for r in _recorders if r is not seen]


def _check_inputs(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                  sh_degree, backgrounds, near_plane, far_plane, backend, tile_size):
    """Raise :class:`GaussianRasterizationError` on bad shapes, dtypes, devices or values."""
    def fail(msg):
        raise GaussianRasterizationError(f"rasterize_gaussians: {msg}")

    if backend not in BACKENDS:
        fail(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
        fail(f"width and height must be positive ints, got {width!r} x {height!r}")
    if tile_size is not None and (not _is_int(tile_size) or tile_size < 1):
        fail(f"tile_size must be a positive int, got {tile_size!r}")
    if not 0 <= near_plane < far_plane:
        fail(f"need 0 <= near_plane < far_plane, got {near_plane} and {far_plane}")
    if means.dim() != 2 or means.shape[1] != 3:
        fail(f"means must be [N, 3], got {list(means.shape)}")
    N = means.shape[0]
    for name, t, shape in (("quats", quats, [N, 4]), ("scales", scales, [N, 3]),
                           ("opacities", opacities, [N])):
        if list(t.shape) != shape:
            fail(f"{name} must be {shape} (N={N} from means), got {list(t.shape)}")
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        fail(f"viewmats must be [C, 4, 4], got {list(viewmats.shape)}")
    C = viewmats.shape[0]
    if list(Ks.shape) != [C, 3, 3]:
        fail(f"Ks must be [C, 3, 3] (C={C} from viewmats), got {list(Ks.shape)}")
    if sh_degree is not None:
        if sh_degree not in (0, 1, 2, 3):
            fail(f"sh_degree must be 0..3 or None, got {sh_degree!r}")
        need = (sh_degree + 1) ** 2
        if colors.dim() != 3 or colors.shape[0] != N or colors.shape[2] != 3 \
                or colors.shape[1] < need:
            fail(f"with sh_degree={sh_degree} colors must be SH coefficients [N, K>={need}, 3]"
                 f" (N={N}), got {list(colors.shape)}")
        D = 3
    else:
        if not (colors.dim() == 2 and colors.shape[0] == N) and \
                not (colors.dim() == 3 and colors.shape[:2] == (C, N)):
            fail(f"colors must be [N, D] or [C, N, D] (N={N}, C={C}), got "
                 f"{list(colors.shape)}; pass sh_degree for SH coefficients [N, K, 3]")
        D = colors.shape[-1]
    if D < 1:
        fail("colors has zero channels")
    if backgrounds is not None and list(backgrounds.shape) != [C, D]:
        fail(f"backgrounds must be [C, D] = [{C}, {D}], got {list(backgrounds.shape)}")
    tensors = {"means": means, "quats": quats, "scales": scales, "opacities": opacities,
               "colors": colors, "viewmats": viewmats, "Ks": Ks}
    if backgrounds is not None:
        tensors["backgrounds"] = backgrounds
    for name, t in tensors.items():
        if not t.is_floating_point():
            fail(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != means.dtype:
            fail(f"{name} has dtype {t.dtype} but means has {means.dtype}")
        if t.device != means.device:
            fail(f"{name} is on {t.device} but means is on {means.device}")
    # NaN/Inf would otherwise make Gaussians vanish silently (culled as off-screen) rather
    # than show up in the loss. One host sync for all checks.
    with torch.no_grad():
        flags = torch.stack([t.isfinite().all() for t in tensors.values()]
                            + [((opacities >= 0) & (opacities <= 1)).all()]).tolist()
    for (name, t), ok in zip(tensors.items(), flags):
        if not ok:
            fail(f"{name} has {(~t.isfinite()).sum().item()} non-finite values (NaN/Inf)")
    if not flags[-1]:
        fail(f"opacities must be activated, in [0, 1]; got min {opacities.min().item():.4g}, "
             f"max {opacities.max().item():.4g}")


def _is_int(x) -> bool:
    try:
        operator.index(x)
    except TypeError:
        return False
    return not isinstance(x, bool)
