"""Image losses shared by the static 3DGS fit (:mod:`headkit.fitting`) and the methods.

* :func:`photometric_loss`: 3DGS's ``L1 + D-SSIM`` pair, each term weighted (the fit uses
  ``(1 - λ, λ)``, GraphAvatar its ``loss.l1`` and ``loss.dssim``);
* :func:`photometric_losses`: the same pair for several images against one target (GraphAvatar's
  final and coarse images), the target's SSIM statistics computed once;
* :func:`composite_over_background`: ground truth composited over a background colour with
  its foreground mask, the targets of a render whose background is that colour.
"""

from __future__ import annotations

from torch import Tensor

from collections.abc import Sequence

from headkit.metrics import dssim, ssim_shared_target

__all__ = ["photometric_loss", "photometric_losses", "composite_over_background"]


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


def photometric_losses(
    images: Sequence[Tensor],  # each [B, H, W, 3]
    targets: Tensor,  # [B, H, W, 3]
    l1_weight: float,
    dssim_weight: float,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`photometric_loss` of each of ``images`` against the same ``targets``, bit-identical
    to calling it per image; the target's local SSIM mean and variance are blurred once
    (:func:`headkit.metrics.ssim_shared_target`)."""
    if dssim_weight:
        ds = [(1.0 - s).mean() for s in ssim_shared_target(list(images), targets, border="same")]
    else:
        ds = [img.new_zeros(()) for img in images]
    return [(l1_weight * (img - targets).abs().mean(), dssim_weight * d) for img, d in zip(images, ds)]


def composite_over_background(
    images: Tensor,  # [B, H, W, 3]
    masks: Tensor,  # [B, H, W, 1] foreground in [0, 1]
    background: Tensor,  # [3]
) -> Tensor:
    """``images`` over the ``background`` colour with their ``masks``, ``[B, H, W, 3]``."""
    return images * masks + background * (1.0 - masks)
