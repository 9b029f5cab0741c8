"""Input encodings shared by both methods: real spherical harmonics and NeRF positional encoding."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Real SH constants in the order used by 3DGS / gsplat (degree <= 3, 16 bases).
_C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005,
       -1.0925484305920792, 0.5462742152960396)
_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
       -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


def num_sh_bases(degree: int) -> int:
    """Number of real SH bases up to ``degree`` inclusive: ``(degree + 1) ** 2``."""
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be in 0..3, got {degree}")
    return (degree + 1) ** 2


def sh_basis(dirs: Tensor, degree: int) -> Tensor:
    """Evaluate the real SH basis of 3DGS/gsplat at unit directions.

    Args:
        dirs: ``[..., 3]`` directions (normalised here).
        degree: 0..3.

    Returns:
        ``[..., (degree + 1) ** 2]`` basis values; ``sum_k basis[k] * coeffs[k]`` gives the
        function value, matching gsplat's ``spherical_harmonics`` before its ``+ 0.5`` offset.
    """
    n = num_sh_bases(degree)
    d = torch.nn.functional.normalize(dirs, dim=-1)
    x, y, z = d.unbind(-1)
    out = [torch.full_like(x, _C0)]
    if degree >= 1:
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [_C2[0] * xy, _C2[1] * yz, _C2[2] * (2.0 * zz - xx - yy), _C2[3] * xz,
                _C2[4] * (xx - yy)]
    if degree >= 3:
        out += [
            _C3[0] * y * (3 * xx - yy),
            _C3[1] * xy * z,
            _C3[2] * y * (4 * zz - xx - yy),
            _C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _C3[4] * x * (4 * zz - xx - yy),
            _C3[5] * z * (xx - yy),
            _C3[6] * x * (xx - 3 * yy),
        ]
    basis = torch.stack(out, dim=-1)
    assert basis.shape[-1] == n
    return basis


def eval_sh(coeffs: Tensor, dirs: Tensor) -> Tensor:
    """Evaluate SH coefficients along directions.

    Args:
        coeffs: ``[..., K, D]`` coefficients, ``K = (degree + 1) ** 2``.
        dirs: ``[..., 3]`` directions, broadcastable to ``coeffs[..., 0, :3]``'s batch shape.

    Returns:
        ``[..., D]`` values (no offset, no clamp).
    """
    K = coeffs.shape[-2]
    degree = int(round(math.sqrt(K))) - 1
    if (degree + 1) ** 2 != K:
        raise ValueError(f"SH coefficient count {K} is not a square")
    basis = sh_basis(dirs, degree)  # [..., K]
    return (basis.unsqueeze(-1) * coeffs).sum(dim=-2)


#: frequency multipliers ``f_k`` of :func:`positional_encoding` for ``k = 0, 1, ...``
FREQUENCY_SPACINGS = {"octave": lambda k: 2.0 ** k, "linear": lambda k: k + 1.0}


def positional_encoding(x: Tensor, num_freqs: int, include_input: bool = True, spacing: str = "octave") -> Tensor:
    """NeRF positional encoding ``[x, sin(f_k pi x), cos(f_k pi x)]_{k < num_freqs}``.

    ``spacing="octave"`` (NeRF's): ``f_k = 2^k``, scales from coarse to very fine.
    ``spacing="linear"``: ``f_k = k + 1``, the first terms of a Fourier series of ``x`` in
    [0, 1] (periods 2, 1, 2/3, ...): every smooth variation up to ``num_freqs / 2`` cycles
    per unit, and nothing finer.

    Args:
        x: ``[..., C]``.

    Returns:
        ``[..., C * (include_input + 2 * num_freqs)]``.
    """
    if spacing not in FREQUENCY_SPACINGS:
        raise ValueError(f"positional_encoding: spacing must be one of {sorted(FREQUENCY_SPACINGS)}, got {spacing!r}")
    parts = [x] if include_input else []
    if num_freqs > 0:
        k = torch.arange(num_freqs, device=x.device, dtype=x.dtype)
        freqs = FREQUENCY_SPACINGS[spacing](k) * math.pi
        xf = x.unsqueeze(-1) * freqs  # [..., C, L]
        parts += [torch.sin(xf).flatten(-2), torch.cos(xf).flatten(-2)]
    return torch.cat(parts, dim=-1)


def positional_encoding_dim(in_channels: int, num_freqs: int, include_input: bool = True) -> int:
    """Output width of :func:`positional_encoding`."""
    return in_channels * (int(include_input) + 2 * num_freqs)
