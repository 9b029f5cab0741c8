"""GraphAvatar's training losses (paper eq. 11-12) and the authors' optional hinge penalties.

    L   = λ_f L_f + λ_c L_c + λ_w L_w                    λ_f = 1, λ_c = 0.1, λ_w = 0.1
    L_f = (1 - λ) L1(I_f) + λ D-SSIM(I_f) + λ_lpips LPIPS(I_f)      λ = 0.2, λ_lpips = 0.1
    L_c = (1 - λ) L1(I_c) + λ D-SSIM(I_c)                (coarse, pre-enhancer image)
    L_w = BCE(rendered alpha, foreground mask)

``I_f`` is the enhancer's output and ``I_c`` the splatted image. Every weight is a config value.
LPIPS needs AlexNet weights that may be missing (no download here): then the term is skipped
and the reason logged once, never silently replaced by 0 in the metrics. The authors' code
switches LPIPS on after 20k iterations (``lpips_from_step``; the paper's default here is 0).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from headkit.losses import photometric_losses
from headkit.metrics import MetricUnavailable, lpips

log = logging.getLogger(__name__)

__all__ = ["GraphAvatarLoss", "GGO_REG_TARGETS"]

GGO_REG_TARGETS = ("offsets", "shared")


class GraphAvatarLoss:
    """Weighted loss terms of one training step, as a dict the trainer sums and logs.

    Args:
        l1, dssim, lpips: weights of the final-image terms (paper: 0.8, 0.2, 0.1).
        lpips_from_step: LPIPS is added from this step on (authors' code: 20000; paper: 0).
        coarse: weight of the coarse-image term ``L_c`` (0.1); skipped when there is no
            enhancer, since the coarse image *is* the final image then.
        alpha_bce: weight of the BCE between rendered alpha and the mask (0.1).
        offset_hinge, scale_hinge: the authors' range penalties, ``weight · mean(relu(x - max))``
            with ``x`` = anchor offset length resp. largest anchor scale, both in units of the
            template's mean edge length; ``weight = 0`` turns a penalty off.
        ggo_reg: ``{"pose": w_p, "expression": w_e}``, an L2 penalty on GGO's offsets,
            ``w_p · mean(ω² + (v / d)²) + w_e · mean(Δe²)`` (``ω`` in radians, the translation
            ``v`` divided by the typical camera distance ``d`` so both are angles). Not in the
            paper; it fixes a gauge freedom: a camera offset shared by all training frames is
            indistinguishable from moving the whole avatar, and since test frames are rendered
            with the tracked camera (``ggo.apply_on_test=false``) such a drift would misalign
            every test render. With the penalty, shared offsets go to the avatar and GGO keeps
            only per-frame corrections. ``ggo_reg.target`` says what is penalised: ``offsets``
            (each frame's offsets, as above) or ``shared`` (only their mean over the training
            frames, ``ggo_shared_pose/expression`` from
            :meth:`graphavatar.ggo.GraphGuidedOptimization.shared`): the gauge is fixed while
            per-frame corrections (drift) cost nothing.
        translation_unit: ``d`` above (the model passes the median camera-to-head distance).
        lpips_weights: AlexNet weight file for LPIPS (None: the default locations).
    """

    def __init__(self, l1: float = 0.8, dssim: float = 0.2, lpips: float = 0.1, lpips_from_step: int = 0,
                 coarse: float = 0.1, alpha_bce: float = 0.1, offset_hinge: dict | None = None,
                 scale_hinge: dict | None = None, ggo_reg: dict | None = None, translation_unit: float = 1.0,
                 lpips_weights: str | None = None) -> None:
        self.l1, self.dssim, self.lpips = float(l1), float(dssim), float(lpips)
        self.lpips_from_step = int(lpips_from_step)
        self.coarse, self.alpha_bce = float(coarse), float(alpha_bce)
        self.offset_hinge = {"weight": 0.0, "max": 3.0, **(offset_hinge or {})}
        self.scale_hinge = {"weight": 0.0, "max": 3.0, **(scale_hinge or {})}
        self.ggo_reg = {"pose": 0.0, "expression": 0.0, "target": "offsets", **(ggo_reg or {})}
        if self.ggo_reg["target"] not in GGO_REG_TARGETS:
            raise ValueError(f"ggo_reg.target must be one of {GGO_REG_TARGETS}, got {self.ggo_reg['target']!r}")
        self.translation_unit = float(translation_unit)
        self.lpips_weights = lpips_weights
        self.lpips_unavailable: str | None = None

    def _lpips(self, images: Tensor, targets: Tensor) -> Tensor | None:
        if self.lpips_unavailable is not None:
            return None
        try:
            return lpips(images, targets, alexnet_path=self.lpips_weights).mean()
        except MetricUnavailable as exc:
            self.lpips_unavailable = exc.reason
            log.warning("LPIPS loss term skipped for the whole run: %s", exc.reason)
            return None

    def __call__(
        self,
        outputs: dict[str, Tensor],  # image, coarse_image [B,H,W,3], alpha [B,H,W,1], anchor_offsets, anchor_scales [B,V,3]
        targets: Tensor,  # [B, H, W, 3]
        masks: Tensor,  # [B, H, W, 1]
        step: int,
        edge_length: float,
        has_enhancer: bool,
    ) -> dict[str, Tensor]:
        """Weighted terms ``{final_l1, final_dssim, [final_lpips], [coarse], alpha_bce, [hinges]}``."""
        losses = {}
        with_coarse = bool(self.coarse and has_enhancer)
        # One call for both images: the target's SSIM statistics are computed once per step.
        images = [outputs["image"], outputs["coarse_image"]] if with_coarse else [outputs["image"]]
        photometric = photometric_losses(images, targets, self.l1, self.dssim)
        losses["final_l1"], losses["final_dssim"] = photometric[0]
        if self.lpips and step >= self.lpips_from_step:
            value = self._lpips(outputs["image"].clamp(0, 1), targets)
            if value is not None:
                losses["final_lpips"] = self.lpips * value
        if with_coarse:
            l1, ds = photometric[1]
            losses["coarse"] = self.coarse * (l1 + ds)
        if self.alpha_bce:
            # BCE in float32 with the alpha clamped away from {0, 1}: log(0) would be -inf.
            alphas = outputs["alpha"].clamp(1e-6, 1.0 - 1e-6)
            losses["alpha_bce"] = self.alpha_bce * F.binary_cross_entropy(alphas, masks.clamp(0, 1))
        losses.update(self._ggo_penalties(outputs))
        if self.offset_hinge["weight"]:
            lengths = outputs["anchor_offsets"].norm(dim=-1) / edge_length
            losses["offset_hinge"] = self.offset_hinge["weight"] * F.relu(lengths - self.offset_hinge["max"]).mean()
        if self.scale_hinge["weight"]:
            largest = outputs["anchor_scales"].amax(dim=-1) / edge_length
            losses["scale_hinge"] = self.scale_hinge["weight"] * F.relu(largest - self.scale_hinge["max"]).mean()
        return losses

    def _ggo_penalties(self, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``ggo_pose_reg``, ``ggo_expression_reg``: weighted mean squares of GGO's offsets (pose
        as angles), per frame (``target: offsets``) or of their shared part (``shared``)."""
        shared = self.ggo_reg["target"] == "shared"
        pose_key, expr_key = ("ggo_shared_pose", "ggo_shared_expression") if shared else ("delta_pose", "delta_expression")
        losses = {}
        if self.ggo_reg["pose"] and pose_key in outputs:
            d = outputs[pose_key]
            angles = torch.cat([d[..., :3], d[..., 3:] / self.translation_unit], dim=-1)
            losses["ggo_pose_reg"] = self.ggo_reg["pose"] * angles.square().mean()
        if self.ggo_reg["expression"] and expr_key in outputs:
            losses["ggo_expression_reg"] = self.ggo_reg["expression"] * outputs[expr_key].square().mean()
        return losses
