"""Expression coefficients: PCA of the canonical-space deformations over the training frames.

Each frame's tracked mesh in head coordinates minus the template is its deformation
``D_t [V, 3]``; the first ``E`` principal directions of the training frames' deformations form
the expression basis ``B [E, 3V]`` and the coefficients are ``c_t = (B (D_t - mu)) / sigma``.
Test frames are projected onto the same basis (nothing about them leaks into the fit). With
``whiten`` each coefficient has unit variance over the training frames, the scale a network's
input layer expects; ``sigma`` is kept so :meth:`ExpressionPCA.decode` inverts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ExpressionPCA:
    """A fitted expression basis.

    Attributes:
        mean: ``[V, 3]`` mean training deformation ``mu``.
        basis: ``[E, V, 3]`` orthonormal principal directions (rows of ``B``).
        stds: ``[E]`` standard deviation of each coefficient over the training frames.
        explained: ``[E]`` fraction of the training deformation variance each direction explains.
        whiten: whether coefficients are divided by ``stds``.
    """

    mean: np.ndarray
    basis: np.ndarray
    stds: np.ndarray
    explained: np.ndarray
    whiten: bool = True

    @property
    def dim(self) -> int:
        """Number of coefficients ``E``."""
        return int(self.basis.shape[0])

    def encode(self, deformations: np.ndarray) -> np.ndarray:  # [T, V, 3] -> [T, E]
        """Coefficients ``[T, E]`` of deformations ``[T, V, 3]``."""
        T = len(deformations)
        coeffs = (deformations - self.mean).reshape(T, -1) @ self.basis.reshape(self.dim, -1).T
        return coeffs / self.stds if self.whiten else coeffs

    def decode(self, coeffs: np.ndarray) -> np.ndarray:  # [T, E] -> [T, V, 3]
        """Deformations ``[T, V, 3]`` rebuilt from coefficients ``[T, E]`` (the PCA reconstruction)."""
        c = coeffs * self.stds if self.whiten else coeffs
        return self.mean + (c @ self.basis.reshape(self.dim, -1)).reshape(len(coeffs), *self.mean.shape)


def fit_expression_pca(deformations: np.ndarray,  # [N, V, 3] training frames
                       dim: int, whiten: bool = True, key: str = "expression_dim") -> ExpressionPCA:
    """Fit an ``dim``-dimensional :class:`ExpressionPCA` to training deformations by SVD.

    ``dim`` must be at least 1 and at most ``min(N - 1, 3V)`` (a centred set of ``N`` frames has
    rank ``N - 1``); otherwise a ``ValueError`` names ``key`` and both sizes.
    """
    N = len(deformations)
    flat = np.asarray(deformations, np.float64).reshape(N, -1)
    limit = min(N - 1, flat.shape[1])
    if not 1 <= dim <= limit:
        raise ValueError(f"{key}={dim} is out of range: {N} training frames of {flat.shape[1] // 3} "
                         f"vertices allow 1..{limit} expression coefficients")
    mean = flat.mean(0)
    _, svals, Vt = np.linalg.svd(flat - mean, full_matrices=False)
    basis = Vt[:dim]
    # Fix each direction's sign (SVD's is arbitrary) so reruns give identical coefficients.
    signs = np.sign(basis[np.arange(dim), np.abs(basis).argmax(1)])
    basis = basis * signs[:, None]
    variances = svals ** 2 / max(N - 1, 1)
    stds = np.sqrt(variances[:dim])
    stds = np.where(stds > 1e-12, stds, 1.0)  # a zero-variance direction keeps raw coefficients
    shape = deformations.shape[1:]
    return ExpressionPCA(mean=mean.reshape(shape), basis=basis.reshape(dim, *shape), stds=stds,
                         explained=variances[:dim] / max(variances.sum(), 1e-30), whiten=whiten)
