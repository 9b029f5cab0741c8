"""3D Gaussians to and from PLY in the standard 3DGS layout (what splat viewers open).

The layout is the one the original gaussian-splatting code writes (``GaussianModel.save_ply``)
and SuperSplat, antimatter15/splat and most other viewers read: one ``vertex`` element,
binary little endian, float32 properties in this order::

    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  f_rest_0 .. f_rest_{3(K-1)-1}
    opacity  scale_0 scale_1 scale_2  rot_0 rot_1 rot_2 rot_3

* ``f_dc_c = sh[:, 0, c]``: the degree-0 SH coefficient per colour channel (colour is
  ``max(C0 f_dc + 0.5, 0)`` along any direction, as in :mod:`headkit.render.gaussians`).
* ``f_rest`` is channel-major: ``f_rest_{c (K-1) + k - 1} = sh[:, k, c]`` for ``k >= 1``,
  i.e. the ``[N, 3, K-1]`` transpose of ``sh[:, 1:]`` flattened (3DGS stores its features as
  ``[N, 3, K]`` and writes them that way).
* ``opacity`` is the LOGIT of the opacity, ``scale_i`` the LOG of the linear scale, ``rot``
  the quaternion in wxyz order as given (viewers normalise it).
* Normals are unused by the renderer; 3DGS writes zeros, we write them when given.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement, PlyParseError
from torch import Tensor

from headkit.engine.files import atomic_open

# Opacities are clamped into [EPS, 1 - EPS] before the logit, so 0 and 1 stay finite on disk
# (float32 logit range about +-16); no viewer distinguishes opacity 1e-7 from 0.
OPACITY_EPS = 1e-7


class PlyFormatError(ValueError):
    """A PLY file that is not a 3DGS Gaussian set; the message names the file and the problem."""


def ply_property_names(num_sh_coeffs: int) -> list[str]:
    """The standard 3DGS property names, in file order, for ``K = num_sh_coeffs`` SH bases."""
    if num_sh_coeffs not in (1, 4, 9, 16):
        raise ValueError(f"num_sh_coeffs must be 1, 4, 9 or 16 (SH degree 0..3), got {num_sh_coeffs}")
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(3 * (num_sh_coeffs - 1))]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def _as_numpy(name: str, value, shape: tuple) -> np.ndarray:
    array = value.detach().cpu().double().numpy() if isinstance(value, Tensor) else np.asarray(value, np.float64)
    if array.shape != shape:
        raise ValueError(f"save_ply: {name} must have shape {list(shape)}, got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"save_ply: {name} holds NaN or Inf")
    return array


def save_ply(
    path: str | os.PathLike,
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz
    scales: Tensor,  # [N, 3] linear, > 0
    opacities: Tensor,  # [N] in [0, 1]
    sh: Tensor,  # [N, K, 3] SH coefficients, K in {1, 4, 9, 16}
    normals: Tensor | None = None,  # [N, 3]
) -> Path:
    """Write Gaussians as a standard 3DGS PLY (layout in the module docstring); atomic.

    Activated values go in (linear scales, opacities in [0, 1]); the file holds log-scales
    and opacity logits. Opacities are clamped to ``[1e-7, 1 - 1e-7]`` first so the logit is
    finite. Returns the path.
    """
    path = Path(path)
    N = int(means.shape[0]) if means.ndim >= 1 else -1
    if sh.ndim != 3 or sh.shape[0] != N or sh.shape[2] != 3:
        raise ValueError(f"save_ply: sh must be [N, K, 3] with N={N}, got {list(sh.shape)}")
    K = int(sh.shape[1])
    if K not in (1, 4, 9, 16):
        raise ValueError(f"save_ply: sh has K={K} coefficients; K must be 1, 4, 9 or 16")
    means_np = _as_numpy("means", means, (N, 3))
    quats_np = _as_numpy("quats", quats, (N, 4))
    scales_np = _as_numpy("scales", scales, (N, 3))
    opac_np = _as_numpy("opacities", opacities, (N,))
    sh_np = _as_numpy("sh", sh, (N, K, 3))
    normals_np = np.zeros((N, 3)) if normals is None else _as_numpy("normals", normals, (N, 3))
    if (scales_np <= 0).any():
        raise ValueError(f"save_ply: scales must be > 0 (linear), found min {scales_np.min():.3g}")
    if ((opac_np < 0) | (opac_np > 1)).any():
        raise ValueError(f"save_ply: opacities must lie in [0, 1], found range "
                         f"[{opac_np.min():.3g}, {opac_np.max():.3g}]")
    opac_np = np.clip(opac_np, OPACITY_EPS, 1.0 - OPACITY_EPS)
    rest = sh_np[:, 1:, :].transpose(0, 2, 1).reshape(N, 3 * (K - 1))  # channel-major
    columns = np.concatenate([
        means_np, normals_np, sh_np[:, 0, :], rest,
        (np.log(opac_np) - np.log1p(-opac_np))[:, None], np.log(scales_np), quats_np,
    ], axis=1)
    names = ply_property_names(K)
    assert columns.shape[1] == len(names)
    records = np.empty(N, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        records[name] = columns[:, i]
    path.parent.mkdir(parents=True, exist_ok=True)
    data = PlyData([PlyElement.describe(records, "vertex")], text=False, byte_order="<")
    with atomic_open(path, "wb") as f:
        data.write(f)
    return path


def load_ply(path: str | os.PathLike) -> dict:
    """Read a standard 3DGS PLY back into activated tensors.

    Returns a dict of float32 tensors ``means [N, 3]``, ``normals [N, 3]``, ``quats [N, 4]``
    (wxyz, as stored: not normalised), ``scales [N, 3]`` (``exp`` of the stored log-scales),
    ``opacities [N]`` (``sigmoid`` of the stored logits), ``sh [N, K, 3]``, and
    ``sh_degree`` (int). Extra properties are ignored; ``nx, ny, nz`` may be absent (zeros).

    Raises:
        FileNotFoundError: no such file.
        PlyFormatError: not a PLY, no ``vertex`` element, a missing property, or an
            ``f_rest`` count that is not ``3 (K - 1)`` for ``K`` in 1, 4, 9, 16.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_ply: no such file: {path}")
    try:
        ply = PlyData.read(str(path))
    except (PlyParseError, ValueError, EOFError, UnicodeDecodeError, IndexError) as exc:
        raise PlyFormatError(f"{path}: not a readable PLY file ({type(exc).__name__}: {exc})") from exc
    if "vertex" not in [el.name for el in ply.elements]:
        raise PlyFormatError(f"{path}: no 'vertex' element (found {[el.name for el in ply.elements]})")
    vertex = ply["vertex"]
    present = [prop.name for prop in vertex.properties]
    num_rest = sum(name.startswith("f_rest_") for name in present)
    K = num_rest // 3 + 1
    if num_rest % 3 or K not in (1, 4, 9, 16):
        raise PlyFormatError(f"{path}: {num_rest} f_rest_* properties; expected 0, 9, 24 or 45 "
                             "(3 (K - 1) for SH degree 0..3)")
    required = [n for n in ply_property_names(K) if n not in ("nx", "ny", "nz")]
    missing = [n for n in required if n not in present]
    if missing:
        raise PlyFormatError(f"{path}: missing 3DGS properties {missing} in element 'vertex' "
                             f"(it has {present})")

    def column(name: str) -> np.ndarray:
        return np.asarray(vertex[name], dtype=np.float32)

    def stack(names: list[str]) -> Tensor:
        if not names:
            return torch.zeros(vertex.count, 0)
        return torch.from_numpy(np.stack([column(n) for n in names], axis=1))

    N = vertex.count
    has_normals = all(n in present for n in ("nx", "ny", "nz"))
    rest = stack([f"f_rest_{i}" for i in range(num_rest)]).reshape(N, 3, K - 1).transpose(1, 2)
    sh = torch.cat([stack(["f_dc_0", "f_dc_1", "f_dc_2"])[:, None, :], rest], dim=1)
    logits = torch.from_numpy(column("opacity")).double()
    return {
        "means": stack(["x", "y", "z"]),
        "normals": stack(["nx", "ny", "nz"]) if has_normals else torch.zeros(N, 3),
        "quats": stack(["rot_0", "rot_1", "rot_2", "rot_3"]),
        "scales": torch.exp(stack(["scale_0", "scale_1", "scale_2"]).double()).float(),
        "opacities": torch.sigmoid(logits).float(),
        "sh": sh.contiguous(),
        "sh_degree": int(round(math.sqrt(K))) - 1,
    }
