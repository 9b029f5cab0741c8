"""GraphAvatar's 3D-aware enhancer: an image U-Net whose every block is modulated by depth.

Paper eq. 10: the rendered depth ``D``, resized to the resolution of block ``k`` and passed
through 1×1 convolutions, predicts per-pixel, per-channel scale ``γ`` and bias ``β`` that modulate
the block's activations, ``F' = γ(D) ⊙ F + β(D)`` (FiLM / SFT). The enhancer is residual: it
returns ``image + UNet(image, depth)`` with a zero-initialised last layer, so it starts as the
identity and only learns the correction (the authors' code uses ESRGAN RRDB blocks with SFT
layers instead; the paper's U-Net is the default here).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headkit.engine.guards import fast_bfloat16

__all__ = ["DepthFiLM", "DepthEnhancer", "dense_grad", "PRECISIONS"]

#: ``DepthEnhancer(precision=...)``: the dtype its convolutions compute in on a device (None:
#: float32, exact); ``auto`` is bfloat16 where the device runs it natively
PRECISIONS = {"fp32": lambda device: None, "bf16": lambda device: torch.bfloat16,
              "auto": lambda device: torch.bfloat16 if fast_bfloat16(device) else None}


def dense_grad(x: Tensor) -> Tensor:  # [B, C, h, w]
    """``x``, with its gradient made dense (in ``x``'s memory format) before it flows further back.

    ``torch.cat``'s backward hands each input a channel slice of the concatenated gradient, a
    non-dense tensor, and ``upsample_bilinear2d``'s CPU backward has no fast path for those: it
    takes 3.2 ms instead of 0.6 ms (``[1, 32, 64, 64] -> 128²``, channels-last, one thread) for the
    copy that this hook makes first. Values and gradients are bit-identical.
    """
    if x.requires_grad:
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        x.register_hook(lambda grad: grad.contiguous(memory_format=fmt))
    return x


class DepthFiLM(nn.Module):
    """Per-pixel FiLM from a depth map: ``F' = (1 + γ(D)) ⊙ F + β(D)``.

    ``γ, β`` come from 1×1 convolutions on the (normalised) depth resized to the feature
    resolution: ``hidden > 0`` uses two (1 → hidden → 2C, LeakyReLU between), ``hidden = 0``
    a single affine 1×1 convolution (the paper's literal "such as a 1×1 convolution"). ``γ`` is
    parameterised around 1 and the last convolution is zero-initialised, so a fresh layer is the
    identity.
    """

    def __init__(self, channels: int, hidden: int = 16) -> None:
        super().__init__()
        self.channels = channels
        if hidden > 0:
            self.net = nn.Sequential(nn.Conv2d(1, hidden, 1), nn.LeakyReLU(0.2),
                                     nn.Conv2d(hidden, 2 * channels, 1))
        else:
            self.net = nn.Sequential(nn.Conv2d(1, 2 * channels, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default conv init; the last conv zeroed so ``γ = β = 0`` (identity modulation)."""
        for layer in self.net:
            if isinstance(layer, nn.Conv2d):
                layer.reset_parameters()
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(
        self,
        features: Tensor,  # [B, C, h, w]
        depths: Tensor,  # [B, 1, H, W] normalised depth
    ) -> Tensor:
        """Modulated features ``[B, C, h, w]``."""
        if depths.shape[-2:] != features.shape[-2:]:
            # Area averaging keeps the mean depth of each coarse cell (no aliasing of edges).
            depths = F.adaptive_avg_pool2d(depths, features.shape[-2:])
        gamma, beta = self.net(depths).chunk(2, dim=1)
        return (1.0 + gamma) * features + beta


class _Block(nn.Module):
    """Two 3×3 convolutions with LeakyReLU, the second one depth-modulated."""

    def __init__(self, in_c: int, out_c: int, film_hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, out_c, 3, padding=1)
        self.conv2 = nn.Conv2d(out_c, out_c, 3, padding=1)
        self.film = DepthFiLM(out_c, film_hidden)

    def forward(self, x: Tensor, depths: Tensor) -> Tensor:  # [B, C, h, w], [B, 1, H, W]
        x = F.leaky_relu(self.conv1(x), 0.2)
        return F.leaky_relu(self.film(self.conv2(x), depths), 0.2)


class DepthEnhancer(nn.Module):
    """Residual image U-Net with depth FiLM in every block (GraphAvatar's 3D-aware enhancer).

    Layout for ``channels = (c0, c1, ..., cL)``: an encoder block at each resolution
    (``c0`` at full size, then 2× average-pool + block), a decoder that upsamples bilinearly,
    concatenates the encoder features of that resolution and applies a block, and a
    zero-initialised 3×3 output convolution. Every block (encoder and decoder) has its own
    :class:`DepthFiLM`. Inputs whose size is not a multiple of ``2^L`` are padded (replicate)
    and the output is cropped back.

    Depth normalisation: ``(depth - depth_offset) / depth_scale`` before the FiLM layers, so the
    1×1 convolutions see O(1) values; set ``depth_offset`` to the typical camera distance and
    ``depth_scale`` to the head's depth extent of the data (background pixels, depth 0, then map
    to a distinct negative value).

    Args:
        channels: feature channels per resolution (``len - 1`` down-sampling steps).
        film_hidden: hidden width of the FiLM 1×1 convolutions (0: a single 1×1 conv).
        depth_offset, depth_scale: fixed depth normalisation (see above).
        in_channels: image channels (3).
        precision: ``"fp32"`` (exact), ``"bf16"``: the U-Net runs under autocast to bfloat16
            (weights and the returned image stay float32; the correction is cast back before it
            is added), or ``"auto"``: bf16 where the device runs it natively
            (:func:`headkit.engine.guards.fast_bfloat16`), else fp32. Not in the paper; a speed
            option: on a CPU with AVX512-BF16 the enhancer's forward and backward take about
            0.6x the time, with the same test PSNR (benchmarks/train_step.md).
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (16, 32, 64),
        film_hidden: int = 16,
        depth_offset: float = 0.0,
        depth_scale: float = 1.0,
        in_channels: int = 3,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"DepthEnhancer: precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        channels = tuple(int(c) for c in channels)
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"DepthEnhancer: channels must be a non-empty list of positive ints, got {channels}")
        if depth_scale <= 0:
            raise ValueError(f"DepthEnhancer: depth_scale must be > 0, got {depth_scale}")
        self.channels, self.in_channels = channels, in_channels
        self.depth_offset, self.depth_scale = float(depth_offset), float(depth_scale)
        self.num_down = len(channels) - 1
        self.enc = nn.ModuleList()
        prev = in_channels
        for c in channels:
            self.enc.append(_Block(prev, c, film_hidden))
            prev = c
        self.dec = nn.ModuleList(
            _Block(channels[l + 1] + channels[l], channels[l], film_hidden)
            for l in reversed(range(self.num_down)))
        self.out = nn.Conv2d(channels[0], in_channels, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default conv init, identity FiLM, zero output conv (the enhancer starts as identity)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
            if isinstance(module, DepthFiLM):
                module.reset_parameters()
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self,
        images: Tensor,  # [B, H, W, 3] channels-last, in [0, 1]
        depths: Tensor,  # [B, H, W, 1] rendered depth
    ) -> Tensor:
        """Enhanced images ``[B, H, W, 3]`` = images + U-Net correction (not clamped)."""
        if images.dim() != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(f"DepthEnhancer: expected images [B, H, W, {self.in_channels}], got {list(images.shape)}")
        if depths.shape != images.shape[:-1] + (1,):
            raise ValueError(f"DepthEnhancer: expected depths {list(images.shape[:-1]) + [1]} to match "
                             f"the images, got {list(depths.shape)}")
        h, w = images.shape[1:3]
        x, d = self.padded_inputs(images, depths)
        dtype = PRECISIONS[self.precision](x.device)
        with torch.autocast(x.device.type, dtype=dtype) if dtype is not None else nullcontext():
            correction = self.correction(x, lambda size: d)  # each FiLM pools the depth to its size
        correction = correction.float()
        return images + correction[:, :, :h, :w].permute(0, 2, 3, 1)

    def padded_inputs(
        self,
        images: Tensor,  # [B, H, W, 3]
        depths: Tensor,  # [B, H, W, 1]
    ) -> tuple[Tensor, Tensor]:  # [B, 3, H', W'], [B, 1, H', W']
        """Channels-first images and normalised depths, padded (replicate) to a multiple of
        ``2^L`` so every down-sampling step halves an even size."""
        h, w = images.shape[1:3]
        x = images.permute(0, 3, 1, 2)
        d = ((depths - self.depth_offset) / self.depth_scale).permute(0, 3, 1, 2)
        mult = 2 ** self.num_down
        pad_h, pad_w = (-h) % mult, (-w) % mult
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
            d = F.pad(d, (0, pad_w, 0, pad_h), mode="replicate")
        return x, d

    def correction(
        self,
        x: Tensor,  # [B, 3, H', W'] from padded_inputs
        depth_at,  # (h, w) -> depth map [B, 1, *, *] for the blocks at that size
    ) -> Tensor:  # [B, 3, H', W']
        """The U-Net's correction of padded images; ``depth_at(size)`` gives the depth map the
        blocks of that resolution are modulated by."""
        skips = []
        for l, block in enumerate(self.enc):
            if l > 0:
                x = F.avg_pool2d(x, 2)
            x = block(x, depth_at(x.shape[-2:]))
            skips.append(x)
        for i, block in enumerate(self.dec):
            skip = skips[self.num_down - 1 - i]
            x = dense_grad(F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            x = block(torch.cat([x, skip], dim=1), depth_at(skip.shape[-2:]))
        return self.out(x)
