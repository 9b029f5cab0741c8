"""The neural cache and the warps that render frame t+1 from it (paper eqs. 1-3).

A :class:`Cache` holds what the generator G left behind at frame t (eq. 1)::

    C_t = [C3_t, C4_t, C5_t, θ_t, p_t, e_t, h_t, U_t]

:class:`ImplicitWarp` (the paper's W) renders ``I_{t+1}`` from ``C_t`` and the new frame's
:class:`FrameParams` with a single-layer MLP and two up-convolutions (eqs. 2-3);
:class:`ExplicitWarp` is the explicit-warp baseline (a flow field applied with ``grid_sample``).
:func:`count_flops` measures either network.

Quantities (the paper uses DECA/FLAME's):
    θ ``poses [B, P]``: FLAME pose, global head rotation then jaw rotation as axis-angle
        vectors (``P = 6`` with DECA); differences ``Δθ = θ_{t+1} - θ_t`` are taken
        coefficient-wise, as the paper defines Δ.
    p ``cam_positions [B, 3]``: camera centre in the head-stabilised frame.
    e ``expressions [B, E]``: expression coefficients (``E = 50`` with DECA).
    h ``pose_shs [B, 9]``: SH encoding of the head pose, see :func:`pose_sh`.
    U ``uvs [B, H, W, 2]`` + ``masks [B, H, W]``: the rasterized UV map (channels-last).
Feature maps are channels-first ``[B, C, h, w]`` (see :mod:`neuralcache.texture`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from headkit.cameras import so3_exp
from headkit.encodings import sh_basis
from neuralcache.generators import make_norm

__all__ = ["FrameParams", "Cache", "pose_sh", "ImplicitWarp", "ExplicitWarp", "count_flops"]


def pose_sh(rotvecs: Tensor, degree: int = 2, forward_axis: Sequence[float] = (0.0, 0.0, 1.0)) -> Tensor:  # [B, 3]
    """h^obj: real SH basis (degree 2 -> 9 values) of the head's rotated facing direction.

    The paper encodes "the pose" with SH but does not say of what direction; we use
    ``sh_basis(R(rotvec) @ forward_axis)``, with ``rotvecs`` the global head rotation
    (axis-angle, first three FLAME pose values) and FLAME's facing axis +z. It varies smoothly
    with yaw and pitch like the texture's view encoding; roll is left to θ itself.
    Returns ``[B, (degree + 1) ** 2]``.
    """
    axis = torch.tensor(forward_axis, dtype=rotvecs.dtype, device=rotvecs.device)
    return sh_basis(so3_exp(rotvecs) @ axis, degree)


@dataclass
class FrameParams:
    """The per-frame conditioning of eq. (2) plus the frame's UV map (see the module docstring
    for shapes and meanings)."""

    poses: Tensor  # [B, P]
    cam_positions: Tensor  # [B, 3]
    expressions: Tensor  # [B, E]
    pose_shs: Tensor  # [B, 9]
    uvs: Tensor  # [B, H, W, 2]
    masks: Tensor  # [B, H, W]

    def to(self, device: torch.device | str) -> FrameParams:
        """A copy on ``device``."""
        return FrameParams(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def detach(self) -> FrameParams:
        """A copy cut from the autograd graph."""
        return FrameParams(*(getattr(self, f).detach() for f in self.__dataclass_fields__))


@dataclass
class Cache:
    """The neural cache C_t of eq. (1).

    Attributes:
        features: G's cached layers ``{3: [B, C3, H/4, W/4], 4: [B, C4, H/4, W/4],
            5: [B, C5, H/2, W/2]}`` (``UNetGenerator(..., return_features=True)["features"]``);
            layers a warp does not use may be left out.
        params: θ_t, p_t, e_t, h_t and U_t of the cached frame.
        images: ``[B, H, W, 3]`` G's image of frame t (needed by :class:`ExplicitWarp` and by
            :class:`ImplicitWarp` with ``residual_image``).
    """

    features: dict[int, Tensor]
    params: FrameParams
    images: Tensor | None = None

    def select(self, layers: Sequence[int]) -> Cache:
        """Keep only ``layers`` (e.g. the warp's ``cached_layers``) to save memory."""
        return replace(self, features={k: self.features[k] for k in layers})

    def detach(self) -> Cache:
        """A copy cut from the autograd graph (inference caches)."""
        return Cache({k: v.detach() for k, v in self.features.items()}, self.params.detach(),
                     None if self.images is None else self.images.detach())

    def to(self, device: torch.device | str) -> Cache:
        """A copy on ``device``."""
        return Cache({k: v.to(device) for k, v in self.features.items()}, self.params.to(device),
                     None if self.images is None else self.images.to(device))


class _Conditioning(nn.Module):
    """Builds ``θ̄_{t+1}`` of eq. (2): the enabled inputs among (p, Δp, θ, Δθ, e, Δe, h) of the
    new frame (``use_absolute=False``: only Δp, Δθ, Δe, Δh), passed through the single-layer
    MLP M (Linear + LeakyReLU(0.2)), or used raw
    when ``use_mlp`` is off (Table 3's "Use θ" row without "Use MLP").

    Input standardisation (buffers, identity until :meth:`set_statistics` is called): values
    become ``(x - mean) / std`` and differences ``Δx / delta_rms``, per component. Between
    consecutive frames the differences are 1-2 orders of magnitude smaller than the values
    (and ``Δh`` multiplies features in the SH skips), so without it the deltas that drive
    the warp barely register next to the absolute values.
    """

    def __init__(self, pose_dim: int, expr_dim: int, cam_dim: int, sh_dim: int, mlp_dim: int,
                 use_camera: bool, use_pose: bool, use_expression: bool, use_pose_sh: bool,
                 use_mlp: bool, use_absolute: bool = True) -> None:
        super().__init__()
        self.use_absolute = use_absolute
        self.dims = {"cam_positions": cam_dim, "poses": pose_dim, "expressions": expr_dim,
                     "pose_shs": sh_dim}
        self.used = {"cam_positions": use_camera, "poses": use_pose, "expressions": use_expression,
                     "pose_shs": use_pose_sh}
        for key, dim in self.dims.items():
            self.register_buffer(f"mean_{key}", torch.zeros(dim))
            self.register_buffer(f"std_{key}", torch.ones(dim))
            self.register_buffer(f"delta_rms_{key}", torch.ones(dim))
        self.register_buffer("uv_delta_scale", torch.ones(2))  # 1 / rms of the interior ΔU
        per_key = 2 if use_absolute else 1  # value and delta, or the delta only
        in_dim = sum(per_key * self.dims[k] for k in ("cam_positions", "poses", "expressions") if self.used[k])
        in_dim += sh_dim if use_pose_sh else 0
        self.in_dim = in_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.LeakyReLU(0.2)) if use_mlp and in_dim else None
        self.out_dim = mlp_dim if self.mlp is not None else in_dim

    def set_statistics(self, stats: dict[str, tuple[Tensor, Tensor, Tensor]], min_scale: float = 1e-4) -> None:
        """Set ``{key: (mean [D], std [D], delta_rms [D])}`` (keys of ``FrameParams``'s
        θ, p, e, h fields, and ``"uvs"``, whose ``delta_rms [2]`` sets the ΔU scale of
        :func:`_delta_uvs`); scales are clamped to ``min_scale`` (constant inputs stay finite)."""
        for key, (mean, std, delta_rms) in stats.items():
            if key == "uvs":
                self.uv_delta_scale.copy_(1.0 / torch.as_tensor(delta_rms).clamp_min(min_scale))
                continue
            if key not in self.dims:
                raise ValueError(f"unknown conditioning key {key!r}; expected one of {sorted(self.dims)}")
            getattr(self, f"mean_{key}").copy_(torch.as_tensor(mean))
            getattr(self, f"std_{key}").copy_(torch.as_tensor(std).clamp_min(min_scale))
            getattr(self, f"delta_rms_{key}").copy_(torch.as_tensor(delta_rms).clamp_min(min_scale))

    def delta(self, new: FrameParams, old: FrameParams, key: str) -> Tensor:
        """Standardised ``new.key - old.key``, ``[B, D]``."""
        return (getattr(new, key) - getattr(old, key)) / getattr(self, f"delta_rms_{key}")

    def value(self, params: FrameParams, key: str) -> Tensor:
        """Standardised ``params.key``, ``[B, D]``."""
        return (getattr(params, key) - getattr(self, f"mean_{key}")) / getattr(self, f"std_{key}")

    def check(self, params: FrameParams, where: str) -> None:
        for key, dim in self.dims.items():
            value = getattr(params, key)
            if value.ndim != 2 or value.shape[1] != dim:
                raise ValueError(f"{where}.{key} must be [B, {dim}] (the warp's "
                                 f"{_DIM_ARGS[key]}={dim}), got {tuple(value.shape)}")

    def forward(self, new: FrameParams, old: FrameParams) -> Tensor | None:
        parts = []
        for key in ("cam_positions", "poses", "expressions"):
            if self.used[key]:
                parts += ([self.value(new, key)] if self.use_absolute else []) + [self.delta(new, old, key)]
        if self.used["pose_shs"]:
            parts.append(self.value(new, "pose_shs") if self.use_absolute else self.delta(new, old, "pose_shs"))
        if not parts:
            return None
        vec = torch.cat(parts, dim=1)
        return self.mlp(vec) if self.mlp is not None else vec


_DIM_ARGS = {"cam_positions": "cam_dim", "poses": "pose_dim", "expressions": "expr_dim",
             "pose_shs": "sh_dim"}


def _delta_uvs(cache: Cache, params: FrameParams, size: tuple[int, int], scale: Tensor) -> Tensor:
    """ΔU_{t+1}, area-averaged to ``size``: ``[B, 3, *size]``.

    Channels 0-1: ``(U_{t+1} - U_t) * scale`` where the face covers the pixel in both frames
    (zero elsewhere); channel 2: the change of coverage ``mask_{t+1} - mask_t`` (-1, 0, 1).
    Between consecutive frames UVs move by ~1e-3 (a fraction of a pixel) while the cached
    features are O(1); ``scale`` (``1 / rms`` of the interior ΔU over consecutive training
    frames, see :meth:`ImplicitWarp.set_input_statistics`) brings the motion cue to unit size.
    Keeping coverage changes apart stops the few silhouette pixels, whose "UV change" is a
    whole UV coordinate, from swamping it.
    """
    new_m, old_m = params.masks.to(params.uvs.dtype), cache.params.masks.to(params.uvs.dtype)
    both = (new_m * old_m).unsqueeze(-1)
    duv = (params.uvs - cache.params.uvs) * both * scale.to(params.uvs.dtype)
    x = torch.cat([duv, (new_m - old_m).unsqueeze(-1)], dim=-1).permute(0, 3, 1, 2)
    return F.interpolate(x, size=size, mode="area")


def _check_inputs(cache: Cache, params: FrameParams, cond: _Conditioning, layers: Sequence[int],
                  channels: dict[int, int]) -> tuple[int, int]:
    """Validate shapes; return the cache resolution ``(h, w)`` of C3."""
    missing = [k for k in layers if k not in cache.features]
    if missing:
        raise ValueError(f"cache.features lacks layers {missing} (has {sorted(cache.features)}); "
                         f"the warp was built with cached_layers={list(layers)}")
    cond.check(params, "params")
    cond.check(cache.params, "cache.params")
    B, H, W = params.masks.shape
    if (params.uvs.shape != (B, H, W, 2) or cache.params.uvs.shape != (B, H, W, 2)
            or cache.params.masks.shape != (B, H, W)):
        raise ValueError(f"params.uvs / cache.params.uvs must be [B, H, W, 2] = {(B, H, W, 2)} and "
                         f"cache.params.masks [B, H, W]; got {tuple(params.uvs.shape)}, "
                         f"{tuple(cache.params.uvs.shape)}, {tuple(cache.params.masks.shape)}")
    if H % 4 or W % 4:
        raise ValueError(f"image size {H}x{W} must be divisible by 4 (the cache is at 1/4 resolution)")
    expected = {3: (H // 4, W // 4), 4: (H // 4, W // 4), 5: (H // 2, W // 2)}
    for k in layers:
        f = cache.features[k]
        if f.ndim != 4 or f.shape[0] != B or f.shape[1] != channels[k] or tuple(f.shape[-2:]) != expected[k]:
            raise ValueError(f"cache.features[{k}] must be [{B}, {channels[k]}, {expected[k][0]}, "
                             f"{expected[k][1]}] for {H}x{W} images, got {tuple(f.shape)}")
    for key in ("poses", "cam_positions", "expressions", "pose_shs"):
        if getattr(params, key).shape[0] != B or getattr(cache.params, key).shape[0] != B:
            raise ValueError(f"params.{key} / cache.params.{key} batch size differs from the UV map's {B}")
    return expected[3]


def _broadcast(vec: Tensor | None, size: tuple[int, int]) -> list[Tensor]:  # [B, n]
    return [] if vec is None else [vec[:, :, None, None].expand(-1, -1, *size)]


class ImplicitWarp(nn.Module):
    r"""The paper's implicit warp W (eqs. 2-3): renders ``I_{t+1}`` from ``C_t`` without any
    spatial transformation layer.

    .. math::
        \bar θ_{t+1} &= M(p_{t+1}, Δp_{t+1}, θ_{t+1}, Δθ_{t+1}, e_{t+1}, Δe_{t+1}, h_{t+1}) \\
        F_1 &= W_1(C^{(3)}_t,\; C^{(4)}_t Δh_{t+1},\; \bar θ_{t+1},\; ΔU_{t+1}) \\
        I_{t+1} &= W_2(F_1,\; C^{(5)}_t Δh_{t+1})

    with the arguments of each layer concatenated along channels. ``W1``, ``W2`` are
    up-convolutions (bilinear x2, then 3x3 conv; W1 adds norm + ReLU, W2 the output
    activation), mirroring G's last two up layers: C3, C4 are at ``H/4``, ``F1`` and C5 at
    ``H/2``, the image at ``H``. W1 upsamples only the feature maps and joins ``θ̄`` and ``ΔU``
    after its upsampling: ``θ̄`` is broadcast (upsampling a constant map would change nothing,
    it only costs time) and ``ΔU`` is area-downsampled from full resolution straight to ``H/2``.

    "Δh modulates the feature map by multiplication, similar to positional encoding": as the
    texture's SH view encoding multiplies 9 of its channels, we multiply the 9 channels
    ``[sh_channel_start, sh_channel_start + 9)`` of C4 and C5 by the 9 values of
    ``Δh = h_{t+1} - h_t`` and pass the other channels unchanged (so C4/C5 need >= 9 + start
    channels). The paper does not say which channels; G learns, end to end, what to put there.
    For consecutive frames ``Δh`` is small, so these channels carry a first-order, motion-
    scaled term and are nearly zero without motion; with a narrow G (C5 of 16 channels) that
    silences over half of C5. ``skip_modulation="append"`` keeps C4/C5 whole and appends the
    9 modulated channels instead (+9 input channels to W1 and W2).

    Ablation switches (Table 3 / Table 4): ``use_uv`` (Concat UV), ``use_pose`` and
    ``use_camera`` (Use θ), ``use_mlp`` (Use MLP), ``use_pose_sh`` (SH Pose: h in M's input),
    ``modulate_skips`` (SH Skips), ``use_expression`` (Exp), ``cached_layers`` (a subset of
    ``(3, 4, 5)`` containing 3).

    Args:
        feature_channels: channels of (C3, C4, C5), e.g. ``UNetGenerator.feature_channels``.
        pose_dim, expr_dim, cam_dim, sh_dim: sizes of θ, e, p, h.
        mlp_dim: output width of M.
        hidden_channels: width of F1. The paper gives none; the default, half of C5's
            channels (G's own layer at that place has all of them), is a latency choice: W1's
            convolution at ``H/2`` is W's largest cost, and halving it brings W to about 0.3x
            G's CPU time with the paper-sized generator (0.40-0.47x at full width).
        skip_modulation: ``"replace"`` (multiply the 9 channels in place) or ``"append"``.
        uv_modulation: not in the paper (0 = off, the paper's W). ``m > 0`` appends to W1's
            input the first ``m`` channels of the upsampled C3 multiplied by each component of
            the standardised ΔU: ``C3[:m] ΔU_u, C3[:m] ΔU_v`` (+2m channels). It is the per-pixel
            analogue of the SH skips' ``C Δh``: a first-order term ``F(x - v) ≈ F(x) - v·∇F``
            that a two-layer W cannot easily form from a concatenated ΔU alone.
        use_texture: Table 3's "ExWarp" column: the neural texture sampled with the new frame's
            UV map ``U_{t+1}`` (``forward(..., textures=)``, ``[B, D, H, W]``), area-averaged to
            C3's resolution and concatenated with C3. Off in the paper's final model (it adds
            the texture sampling to W's latency).
        texture_channels: ``D`` of that texture sample.
        use_absolute: not in the paper when False (True = eq. 2). False gives M only the
            changes Δp, Δθ, Δe, Δh, so W cannot key its output to the absolute pose and
            expression of training frames (a per-frame memory that does not carry to test
            frames) and has to render from the cache and the motion.
        residual_image: not in the paper (False = eq. 3). True renders
            ``I_{t+1} = σ(σ⁻¹(I_t) + W_2(...))``: W predicts a change of G's cached image ``I_t``
            (``Cache.images``, cut from the graph: the image the viewer was shown) instead of
            re-rendering the frame, and W2's convolution starts at zero, so an untrained W equals
            the naive baseline (show ``I_t`` again). Motivation: on our subjects the paper's W
            loses a few tenths of a dB to G even with no motion to bridge (W0 < G), which outweighs
            what it gains on moving frames (``benchmarks/neuralcache_talking.md``). Needs
            ``out_activation="sigmoid"``.
        norm: norm after W1 (see :func:`neuralcache.generators.make_norm`).
        out_activation: ``"sigmoid"`` or ``"none"``, as G's.
    """

    def __init__(self, feature_channels: Sequence[int] = (32, 32, 16), pose_dim: int = 6,
                 expr_dim: int = 50, cam_dim: int = 3, sh_dim: int = 9, mlp_dim: int = 16,
                 hidden_channels: int | None = None, use_camera: bool = True, use_pose: bool = True,
                 use_expression: bool = True, use_pose_sh: bool = True, use_uv: bool = True,
                 use_mlp: bool = True, modulate_skips: bool = True, skip_modulation: str = "replace",
                 uv_modulation: int = 0, use_absolute: bool = True, use_texture: bool = False,
                 texture_channels: int = 16,
                 cached_layers: Sequence[int] = (3, 4, 5), sh_channel_start: int = 0,
                 residual_image: bool = False, norm: str = "instance", out_channels: int = 3,
                 out_activation: str = "sigmoid") -> None:
        super().__init__()
        layers = tuple(sorted(set(int(k) for k in cached_layers)))
        if 3 not in layers or not set(layers) <= {3, 4, 5}:
            raise ValueError(f"cached_layers must be a subset of (3, 4, 5) containing 3, got {list(cached_layers)}")
        if len(feature_channels) != 3:
            raise ValueError(f"feature_channels must give (C3, C4, C5), got {list(feature_channels)}")
        self.channels = dict(zip((3, 4, 5), (int(c) for c in feature_channels)))
        if modulate_skips:
            for k in layers:
                if k != 3 and self.channels[k] < sh_channel_start + sh_dim:
                    raise ValueError(f"C{k} has {self.channels[k]} channels, too few to modulate "
                                     f"{sh_dim} of them from sh_channel_start={sh_channel_start}")
        if skip_modulation not in ("replace", "append"):
            raise ValueError(f"unknown skip_modulation {skip_modulation!r}; expected 'replace' or 'append'")
        self.cached_layers, self.use_uv, self.modulate_skips = layers, use_uv, modulate_skips
        self.skip_modulation = skip_modulation
        if not 0 <= int(uv_modulation) <= self.channels[3] or (uv_modulation and not use_uv):
            raise ValueError(f"uv_modulation must be in 0..C3={self.channels[3]} and needs use_uv, "
                             f"got {uv_modulation} (use_uv={use_uv})")
        self.uv_modulation = int(uv_modulation)
        self.use_texture, self.texture_channels = use_texture, int(texture_channels)
        extra = sh_dim if modulate_skips and skip_modulation == "append" else 0
        self.sh_channel_start, self.sh_dim = sh_channel_start, sh_dim
        self.cond = _Conditioning(pose_dim, expr_dim, cam_dim, sh_dim, mlp_dim, use_camera, use_pose,
                                  use_expression, use_pose_sh, use_mlp, use_absolute)
        hidden = hidden_channels or max(1, self.channels[5] // 2)
        w1_in = self.channels[3] + self.cond.out_dim + (3 if use_uv else 0) + 2 * self.uv_modulation
        w1_in += self.channels[4] + extra if 4 in layers else 0
        w1_in += self.texture_channels if use_texture else 0
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.w1 = nn.Sequential(nn.Conv2d(w1_in, hidden, 3, padding=1), make_norm(norm, hidden),
                                nn.ReLU(inplace=True))
        w2_in = hidden + (self.channels[5] + extra if 5 in layers else 0)
        if out_activation not in ("sigmoid", "none"):
            raise ValueError(f"unknown out_activation {out_activation!r}; expected 'sigmoid' or 'none'")
        if residual_image and (out_activation != "sigmoid" or out_channels != 3):
            raise ValueError("residual_image needs out_activation='sigmoid' and out_channels=3 (it adds to "
                             "the logits of G's RGB image)")
        self.residual_image = bool(residual_image)
        act = nn.Sigmoid() if out_activation == "sigmoid" and not residual_image else nn.Identity()
        self.w2 = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                nn.Conv2d(w2_in, out_channels, 3, padding=1), act)
        self._zero_residual()

    def _zero_residual(self) -> None:
        if self.residual_image:  # W starts as the naive baseline
            nn.init.zeros_(self.w2[1].weight)
            nn.init.zeros_(self.w2[1].bias)

    def set_input_statistics(self, stats: dict[str, tuple[Tensor, Tensor, Tensor]]) -> None:
        """Standardise θ, p, e, h and their deltas (also the Δh of the SH skips) with training
        statistics ``{key: (mean, std, delta_rms)}``; see ``_Conditioning``. Stored as buffers."""
        self.cond.set_statistics(stats)

    def reset_parameters(self) -> None:
        """Re-initialise M, W1 and W2 (torch defaults; with ``residual_image`` W2's convolution
        starts at zero, so W starts as the naive baseline)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self._zero_residual()

    def _modulate(self, feats: Tensor, dhs: Tensor) -> Tensor:  # [B, C, h, w], [B, 9]
        if not self.modulate_skips:
            return feats
        s, e = self.sh_channel_start, self.sh_channel_start + self.sh_dim
        modulated = feats[:, s:e] * dhs[:, :, None, None]
        if self.skip_modulation == "append":
            return torch.cat([feats, modulated], dim=1)
        return torch.cat([feats[:, :s], modulated, feats[:, e:]], dim=1)

    def forward(self, cache: Cache, params: FrameParams, textures: Tensor | None = None) -> dict[str, Tensor]:
        """``{"images": [B, H, W, 3]}``: frame ``t+1`` (``params``) rendered from ``cache``
        (``textures [B, D, H, W]``: the texture sampled with ``U_{t+1}``, only with ``use_texture``)."""
        size = _check_inputs(cache, params, self.cond, self.cached_layers, self.channels)
        up_size = (2 * size[0], 2 * size[1])
        dhs = self.cond.delta(params, cache.params, "pose_shs")
        x = [cache.features[3]]
        if self.use_texture:
            B, H, W = params.masks.shape
            if textures is None or textures.shape != (B, self.texture_channels, H, W):
                raise ValueError(f"use_texture needs textures [{B}, {self.texture_channels}, {H}, {W}] (the "
                                 f"texture sampled with U_t+1), got "
                                 f"{None if textures is None else tuple(textures.shape)}")
            x.append(F.interpolate(textures, size=size, mode="area"))
        if 4 in self.cached_layers:
            x.append(self._modulate(cache.features[4], dhs))
        x = [self.up(torch.cat(x, dim=1))] + _broadcast(self.cond(params, cache.params), up_size)
        if self.use_uv:
            duv = _delta_uvs(cache, params, up_size, self.cond.uv_delta_scale)  # [B, 3, h, w]
            x.append(duv)
            if self.uv_modulation:  # C3[:m] ΔU_u, C3[:m] ΔU_v (x[0] starts with the upsampled C3)
                c3 = x[0][:, :self.uv_modulation]
                x += [c3 * duv[:, :1], c3 * duv[:, 1:2]]
        f1 = self.w1(torch.cat(x, dim=1))
        if 5 in self.cached_layers:
            f1 = torch.cat([f1, self._modulate(cache.features[5], dhs)], dim=1)
        out = self.w2(f1).permute(0, 2, 3, 1)  # [B, H, W, 3]
        if self.residual_image:
            if cache.images is None or cache.images.shape != out.shape:
                raise ValueError(f"residual_image needs the cache's image {tuple(out.shape)} (G's image "
                                 f"of frame t), got {None if cache.images is None else tuple(cache.images.shape)}")
            out = torch.sigmoid(torch.logit(cache.images.detach(), eps=1e-4) + out)
        return {"images": out}


class ExplicitWarp(nn.Module):
    """Explicit-warp baseline ("ExWarp as in [33]"): a flow field predicted from the cache and
    the frame deltas, applied to G's cached image of frame t with ``grid_sample``.

    Flow head, at the cache resolution ``H/4``: ``[C3, θ̄, ΔU]`` (same conditioning as
    :class:`ImplicitWarp`) -> 3x3 conv -> ReLU -> 3x3 conv -> 2 channels, bilinearly upsampled
    to ``H x W``. The flow is a displacement of the *sampling* location in ``grid_sample``'s
    normalised units (``2 / W`` = one pixel in x): ``I_{t+1}(x) = I_t(x + flow(x))``, bilinear,
    border padding. The last conv starts at zero, so an untrained head reproduces the cached
    image (the naive baseline) and learns corrections from there.

    Args:
        c3_channels: channels of C3.
        hidden_channels: width of the flow head.
        (pose_dim, expr_dim, cam_dim, sh_dim, mlp_dim, use_*: as :class:`ImplicitWarp`)
    """

    def __init__(self, c3_channels: int = 32, pose_dim: int = 6, expr_dim: int = 50, cam_dim: int = 3,
                 sh_dim: int = 9, mlp_dim: int = 16, hidden_channels: int = 32,
                 use_camera: bool = True, use_pose: bool = True, use_expression: bool = True,
                 use_pose_sh: bool = True, use_uv: bool = True, use_mlp: bool = True) -> None:
        super().__init__()
        self.channels = {3: c3_channels}
        self.use_uv = use_uv
        self.cond = _Conditioning(pose_dim, expr_dim, cam_dim, sh_dim, mlp_dim, use_camera, use_pose,
                                  use_expression, use_pose_sh, use_mlp)
        cin = c3_channels + self.cond.out_dim + (3 if use_uv else 0)
        self.head = nn.Sequential(nn.Conv2d(cin, hidden_channels, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden_channels, 2, 3, padding=1))
        self.reset_parameters()

    def set_input_statistics(self, stats: dict[str, tuple[Tensor, Tensor, Tensor]]) -> None:
        """As :meth:`ImplicitWarp.set_input_statistics`."""
        self.cond.set_statistics(stats)

    def reset_parameters(self) -> None:
        """Default init everywhere, then a zero last layer (identity warp)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, cache: Cache, params: FrameParams) -> dict[str, Tensor]:
        """``{"images": [B, H, W, 3], "flows": [B, H, W, 2]}`` for frame ``t+1``."""
        if cache.images is None:
            raise ValueError("ExplicitWarp needs cache.images (G's image of the cached frame)")
        size = _check_inputs(cache, params, self.cond, (3,), self.channels)
        B, H, W = params.masks.shape
        if cache.images.ndim != 4 or cache.images.shape[:3] != (B, H, W):
            raise ValueError(f"cache.images must be [{B}, {H}, {W}, C], got {tuple(cache.images.shape)}")
        x = [cache.features[3]] + _broadcast(self.cond(params, cache.params), size)
        if self.use_uv:
            x.append(_delta_uvs(cache, params, size, self.cond.uv_delta_scale))
        flows = F.interpolate(self.head(torch.cat(x, dim=1)), size=(H, W), mode="bilinear",
                              align_corners=False).permute(0, 2, 3, 1)  # [B, H, W, 2]
        # Pixel-centre grid in grid_sample's normalised coordinates (align_corners=False).
        ys = (torch.arange(H, device=flows.device, dtype=flows.dtype) + 0.5) * (2.0 / H) - 1.0
        xs = (torch.arange(W, device=flows.device, dtype=flows.dtype) + 0.5) * (2.0 / W) - 1.0
        base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [H, W, 2] as (x, y)
        images = F.grid_sample(cache.images.permute(0, 3, 1, 2), base + flows, mode="bilinear",
                               padding_mode="border", align_corners=False)
        return {"images": images.permute(0, 2, 3, 1), "flows": flows}


def count_flops(module: nn.Module, *inputs, **kwargs) -> int:
    """FLOPs of one forward ``module(*inputs, **kwargs)`` by ``torch.utils.flop_counter``
    (no grad). It counts matrix products and convolutions (2 FLOPs per multiply-add), not
    element-wise ops, norms, resampling or ``grid_sample``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs, **kwargs)
    return int(counter.get_total_flops())
