"""Scaffold-GS-style neural Gaussians spawned around GraphAvatar's anchor Gaussians.

The tracked mesh has no vertices for hair, accessories or the mouth interior, so every anchor
(one per template vertex, from the graph U-Nets) spawns ``k`` neural Gaussians (paper eq. 7-8):

    μ_i = μ + δ_i ⊙ s                        δ_i: learnable offsets [V, k, 3], s: anchor scale
    (α_i, c_i, s_i, q_i) = MLPs(f_a, d, e)   f_a: learnable anchor feature, d: view direction,
                                             e: expression

As in Scaffold-GS: opacity ``tanh``, and Gaussians with opacity <= ``opacity_threshold`` (0) are
dropped before rasterisation (they would be invisible, and dropping them saves render time);
colour is RGB through a sigmoid (view dependence comes from the MLP's view-direction input, not
from SH); scale is ``sigmoid(·) ⊙ s``; the rotation is a normalised quaternion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NeuralGaussians", "quat_multiply", "gather_kept"]


def quat_multiply(
    p: Tensor,  # [..., 4] wxyz
    q: Tensor,  # [..., 4] wxyz
) -> Tensor:
    """Hamilton product ``p ⊗ q`` of wxyz quaternions, ``[..., 4]`` (rotation ``R(p) R(q)``)."""
    pw, px, py, pz = p.unbind(-1)
    qw, qx, qy, qz = q.unbind(-1)
    return torch.stack([
        pw * qw - px * qx - py * qy - pz * qz,
        pw * qx + px * qw + py * qz - pz * qy,
        pw * qy - px * qz + py * qw + pz * qx,
        pw * qz + px * qy - py * qx + pz * qw,
    ], dim=-1)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class NeuralGaussians(nn.Module):
    """``k`` neural Gaussians per anchor, decoded by small MLPs (Scaffold-GS, GraphAvatar eq. 7-8).

    The MLP input per anchor is ``[f_a, d, (|x - c|), e]``: the learnable anchor feature
    ``f_a [feature_dim]``, the unit view direction ``d = (μ - c) / |μ - c|`` from the camera
    centre ``c``, optionally the distance (Scaffold-GS's option; off in the authors' code) and the
    expression ``e``. One MLP per attribute (opacity, colour, scale+rotation), each with one
    hidden ReLU layer, producing all ``k`` children at once.

    Args:
        num_anchors: V, the template's vertex count.
        expression_dim: E (0: no expression input).
        num_offsets: k, neural Gaussians per anchor (authors: 2).
        feature_dim: anchor feature size (authors: 4).
        hidden_dim: MLP width (authors: equal to ``feature_dim``; 32 here, still tiny).
        use_distance: append the camera distance to the MLP input.
        local_frame: if True, offsets are rotated by the anchor rotation and child rotations
            are composed with it (``q_i = q_anchor ⊗ q̂_i``), so the children turn with the
            anchor. Off by default: the paper's eq. 7 (``μ + δ ⊙ s``) and the authors' code use
            world-axis offsets and child rotations.
        opacity_threshold: children with ``tanh`` opacity <= this are masked out (Scaffold-GS: 0).
        offset_init_std: std of the initial offsets, in units of the anchor scale. Scaffold-GS
            and the authors start from 0 (all children on the anchor); a spread of ~1 anchor
            scale makes the children distinct from step 0.
        opacity_init: opacity of every child at step 0 (the opacity MLP's last layer starts
            with zero weights and bias ``atanh(opacity_init)``). With a random start (Scaffold-GS,
            zero anchor features) a child index can come out negative, hence masked, for every
            anchor; masked children get no gradient, so it would never come back.
    """

    def __init__(
        self,
        num_anchors: int,
        expression_dim: int = 0,
        num_offsets: int = 2,
        feature_dim: int = 4,
        hidden_dim: int = 32,
        use_distance: bool = False,
        local_frame: bool = False,
        opacity_threshold: float = 0.0,
        offset_init_std: float = 1.0,
        opacity_init: float = 0.1,
    ) -> None:
        super().__init__()
        if num_anchors < 1 or num_offsets < 1 or feature_dim < 1 or hidden_dim < 1 or expression_dim < 0:
            raise ValueError(
                f"NeuralGaussians: need num_anchors, num_offsets (k), feature_dim, hidden_dim >= 1 "
                f"and expression_dim >= 0; got {num_anchors}, {num_offsets}, {feature_dim}, "
                f"{hidden_dim}, {expression_dim}")
        self.num_anchors, self.expression_dim = num_anchors, expression_dim
        self.num_offsets, self.feature_dim = num_offsets, feature_dim
        self.use_distance, self.local_frame = use_distance, local_frame
        self.opacity_threshold, self.offset_init_std = opacity_threshold, offset_init_std
        if not opacity_threshold < opacity_init < 1.0:
            raise ValueError(f"NeuralGaussians: opacity_init must be in (opacity_threshold, 1) = "
                             f"({opacity_threshold}, 1), got {opacity_init}")
        self.opacity_init = opacity_init
        k = num_offsets
        self.offsets = nn.Parameter(torch.empty(num_anchors, k, 3))
        self.features = nn.Parameter(torch.empty(num_anchors, feature_dim))
        in_dim = feature_dim + 3 + int(use_distance) + expression_dim
        self.mlp_opacity = _mlp(in_dim, hidden_dim, k)
        self.mlp_color = _mlp(in_dim, hidden_dim, 3 * k)
        self.mlp_cov = _mlp(in_dim, hidden_dim, 7 * k)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets ~ N(0, offset_init_std²), features 0 (Scaffold-GS), MLPs torch defaults
        except the opacity output layer (weights 0, bias ``atanh(opacity_init)``)."""
        nn.init.normal_(self.offsets, 0.0, self.offset_init_std)
        nn.init.zeros_(self.features)
        for mlp in (self.mlp_opacity, self.mlp_color, self.mlp_cov):
            for layer in mlp:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        nn.init.zeros_(self.mlp_opacity[-1].weight)
        nn.init.constant_(self.mlp_opacity[-1].bias, math.atanh(self.opacity_init))

    def forward(
        self,
        anchor_means: Tensor,  # [B, V, 3]
        anchor_quats: Tensor,  # [B, V, 4] wxyz, unit
        anchor_scales: Tensor,  # [B, V, 3]
        camera_centers: Tensor,  # [B, 3] world positions of the cameras
        expressions: Tensor | None = None,  # [B, E]
    ) -> dict[str, Tensor]:
        """Decode the neural Gaussians of every anchor, ``M = V · k`` per frame.

        Children of anchor ``v`` are rows ``v·k .. v·k + k - 1``.

        Returns:
            ``means [B, M, 3]``, ``quats [B, M, 4]`` (unit wxyz), ``scales [B, M, 3]``,
            ``opacities [B, M]`` (tanh, may be negative), ``colors [B, M, 3]`` (RGB in (0, 1)),
            ``mask [B, M]`` bool (opacity > threshold: the ones to rasterise).
        """
        b, v = anchor_means.shape[:2]
        k = self.num_offsets
        if anchor_means.shape != (b, self.num_anchors, 3):
            raise ValueError(f"NeuralGaussians: expected anchor_means [B, {self.num_anchors}, 3], "
                             f"got {list(anchor_means.shape)}")
        if anchor_quats.shape != (b, v, 4) or anchor_scales.shape != (b, v, 3):
            raise ValueError(f"NeuralGaussians: anchor_quats/anchor_scales must be [{b}, {v}, 4/3], "
                             f"got {list(anchor_quats.shape)}, {list(anchor_scales.shape)}")
        if camera_centers.shape != (b, 3):
            raise ValueError(f"NeuralGaussians: expected camera_centers [{b}, 3], got {list(camera_centers.shape)}")
        view = anchor_means - camera_centers[:, None]
        dist = view.norm(dim=-1, keepdim=True)
        inputs = [self.features.expand(b, -1, -1), view / dist.clamp_min(1e-8)]
        if self.use_distance:
            inputs.append(dist)
        if self.expression_dim:
            if expressions is None or expressions.shape != (b, self.expression_dim):
                got = None if expressions is None else list(expressions.shape)
                raise ValueError(f"NeuralGaussians: expected expressions [{b}, {self.expression_dim}], got {got}")
            inputs.append(expressions[:, None].expand(-1, v, -1))
        h = torch.cat(inputs, dim=-1)  # [B, V, in_dim]

        opacities = torch.tanh(self.mlp_opacity(h))  # [B, V, k]
        colors = torch.sigmoid(self.mlp_color(h)).reshape(b, v, k, 3)
        cov = self.mlp_cov(h).reshape(b, v, k, 7)
        scales = torch.sigmoid(cov[..., :3]) * anchor_scales[:, :, None]
        quats = F.normalize(cov[..., 3:], dim=-1)
        offsets = self.offsets[None] * anchor_scales[:, :, None]  # [B, V, k, 3]
        if self.local_frame:
            anchor_q = anchor_quats[:, :, None].expand(-1, -1, k, -1)
            offsets = _rotate(anchor_q, offsets)
            quats = quat_multiply(anchor_q, quats)
        means = anchor_means[:, :, None] + offsets

        m = v * k
        opacities = opacities.reshape(b, m)
        return {
            "means": means.reshape(b, m, 3),
            "quats": quats.reshape(b, m, 4),
            "scales": scales.reshape(b, m, 3),
            "opacities": opacities,
            "colors": colors.reshape(b, m, 3),
            "mask": opacities > self.opacity_threshold,
        }


def _rotate(
    quats: Tensor,  # [..., 4] unit wxyz
    vectors: Tensor,  # [..., 3]
) -> Tensor:
    """Rotate vectors by unit quaternions: ``v + 2w (u × v) + 2 u × (u × v)``, ``[..., 3]``."""
    w, u = quats[..., :1], quats[..., 1:]
    uv = torch.cross(u, vectors, dim=-1)
    return vectors + 2.0 * w * uv + 2.0 * torch.cross(u, uv, dim=-1)


def gather_kept(
    gaussians: dict[str, Tensor],  # each [B, M, ...]
    mask: Tensor | None = None,  # [B, M] bool, default gaussians["mask"]
) -> list[dict[str, Tensor]]:
    """Per frame, the Gaussians the mask keeps: a list of ``B`` dicts of ``[M_b, ...]`` tensors.

    Counts differ per frame, so the result cannot be one batched tensor. Every entry with the
    ``[B, M, ...]`` leading shape is gathered (``mask`` itself is left out); gradients flow to
    the kept rows only.
    """
    if mask is None:
        mask = gaussians["mask"]
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"gather_kept: mask must be a bool [B, M] tensor, got {mask.dtype} {list(mask.shape)}")
    out = []
    for i in range(mask.shape[0]):
        frame = {}
        for key, value in gaussians.items():
            if key == "mask":
                continue
            if value.shape[:2] != mask.shape:
                raise ValueError(f"gather_kept: {key!r} has shape {list(value.shape)}, expected "
                                 f"leading {list(mask.shape)}")
            frame[key] = value[i][mask[i]]
        out.append(frame)
    return out
