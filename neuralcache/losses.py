"""Training losses of neural caching (paper eq. 4 and the warp objective of Sec. 4.2).

Baselines (DNR, DNR+, DNR++) predict the frame they are given::

    L = λ_tex L_tex + λ_img L_img + λ_p L_p            (weights 1, 1, 0.1)

``L_tex``: L1 between the first three channels of the sampled neural texture and the image
(foreground pixels, :func:`neuralcache.texture.texture_l1`); ``L_img``: L1 over the whole
image; ``L_p``: the perceptual loss, LPIPS-AlexNet here (:mod:`headkit.lpips_net`).

The cache + warp model renders frame ``t`` with G and frame ``t + d`` with W; "for the
warping we add λ_img and L_p on the future frame and down-weight the existing L_img by 0.1"::

    L = λ_tex L_tex(t) + 0.1 λ_img L_img(t) + λ_p L_p(t) + λ_img L_img(t+d) + λ_p L_p(t+d)

Read literally, only ``L_img(t)`` is down-weighted; ``current_image_weight`` is the 0.1 and
``current_perceptual_weight`` (default 1) scales ``L_p(t)`` should one want both.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from headkit.errors import InvalidConfigValue
from headkit.lpips_net import MetricUnavailable, get_lpips
from neuralcache.texture import texture_l1

log = logging.getLogger(__name__)

__all__ = ["NeuralCacheLoss"]


class NeuralCacheLoss:
    """Weighted loss terms as a dict (the trainer sums and logs them).

    Args:
        texture, image, perceptual: λ_tex, λ_img, λ_p.
        current_image_weight: factor on ``L_img`` of the G frame when a warped frame is also
            predicted (0.1 in the paper).
        current_perceptual_weight: factor on ``L_p`` of the G frame in that case.
        lpips_weights: AlexNet backbone weights for LPIPS (None: the default locations).
            Missing weights disable ``L_p`` with one logged warning naming the reason.
    """

    def __init__(self, texture: float = 1.0, image: float = 1.0, perceptual: float = 0.1,
                 current_image_weight: float = 0.1, current_perceptual_weight: float = 1.0,
                 lpips_weights: str | None = None) -> None:
        for key, value in (("texture", texture), ("image", image), ("perceptual", perceptual),
                           ("current_image_weight", current_image_weight),
                           ("current_perceptual_weight", current_perceptual_weight)):
            if not value >= 0:
                raise InvalidConfigValue(f"invalid config value model.loss.{key}={value} (must be >= 0)")
        self.weights = {"texture": texture, "image": image, "perceptual": perceptual}
        self.current_image_weight = current_image_weight
        self.current_perceptual_weight = current_perceptual_weight
        self.lpips_weights = lpips_weights
        self.perceptual_reason: str | None = None if perceptual > 0 else "model.loss.perceptual=0"

    def _lpips(self, preds: Tensor, targets: Tensor) -> Tensor | None:  # [B, H, W, 3] each
        """Mean LPIPS, or None (logged once) when the weights are unavailable."""
        if self.perceptual_reason is not None:
            return None
        try:
            net = get_lpips(preds.device, self.lpips_weights)
        except MetricUnavailable as exc:
            self.perceptual_reason = exc.reason
            log.warning("perceptual (LPIPS) loss skipped: %s", exc.reason)
            return None
        return net(preds, targets).mean()

    def __call__(
        self,
        images: Tensor,  # [B, H, W, 3] prediction of the supervised frame
        targets: Tensor,  # [B, H, W, 3]
        textures: Tensor | None = None,  # [B, D, H, W] sampled texture of the G frame
        texture_targets: Tensor | None = None,  # [B, H, W, 3] image of the G frame
        texture_masks: Tensor | None = None,  # [B, H, W] foreground of the G frame
        current_images: Tensor | None = None,  # [B, H, W, 3] G's image of frame t (warp models)
        current_targets: Tensor | None = None,  # [B, H, W, 3]
    ) -> dict[str, Tensor]:
        """Loss dict; ``current_*`` are given for the cache + warp models only."""
        w = self.weights
        losses = {}
        if textures is not None and w["texture"] > 0:
            losses["texture"] = w["texture"] * texture_l1(textures, texture_targets, texture_masks)
        losses["image"] = w["image"] * (images - targets).abs().mean()
        perceptual = self._lpips(images, targets)
        if perceptual is not None:
            losses["perceptual"] = w["perceptual"] * perceptual
        if current_images is not None:
            losses["image_current"] = (self.current_image_weight * w["image"]
                                       * (current_images - current_targets).abs().mean())
            perceptual = self._lpips(current_images, current_targets)
            if perceptual is not None and self.current_perceptual_weight > 0:
                losses["perceptual_current"] = self.current_perceptual_weight * w["perceptual"] * perceptual
        return losses
