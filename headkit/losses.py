"""Image losses shared by the static 3DGS fit (:mod:`headkit.fitting`) and the methods.

* :func:`photometric_loss`: 3DGS's ``L1 + D-SSIM`` pair, each term weighted (the fit uses
  ``(1 - λ, λ)``, GraphAvatar its ``loss.l1`` and ``loss.dssim``);
* :func:`composite_over_background`: ground truth composited over a background colour with
  its foreground mask, the targets of a render whose background is that colour.
"""

from __future__ import annotations

from torch import Tensor

from headkit.metrics import dssim

__all__ = ["photometric_loss", "composite_over_background"]


def photometric_loss(
    images: Tensor,  # [B, H, W, 3]
    targets: Tensor,  # [B, H, W, 3]
    l1_weight: float,
    dssim_weight: float,
) -> tuple[Tensor, Tensor]:
    """``(l1_weight · L1, dssim_weight · D-SSIM)``, batch means (SSIM zero-padded,
    ``border="same"``, as 3DGS trains); D-SSIM is not computed when its weight is 0."""
    l1 = (images - targets).abs().mean()
    ds = dssim(images, targets, border="same").mean() if dssim_weight else images.new_zeros(())
    return l1_weight * l1, dssim_weight * ds


def composite_over_background(
    images: Tensor,  # [B, H, W, 3]
    masks: Tensor,  # [B, H, W, 1] foreground in [0, 1]
    background: Tensor,  # [3]
) -> Tensor:
    """``images`` over the ``background`` colour with their ``masks``, ``[B, H, W, 3]``."""
    return images * masks + background * (1.0 - masks)
