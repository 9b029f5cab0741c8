"""The deferred-neural-rendering generators G: DNR, DNR+ and DNR++.

All three are the same ``levels``-deep U-Net (pix2pix style, Isola et al. 2017; the paper's
"10-layer U-Net" is ``levels=5``: five stride-2 down convolutions, five up layers):

* **DNR** (Thies et al. 2019): up layers are 4x4 stride-2 transposed convolutions.
* **DNR+** (the paper, after Karras et al. 2021): up layers are bilinear x2 upsampling followed
  by a 3x3 convolution ("up-convolution"), and a fixed Gaussian low-pass filter is applied to
  the bottleneck (the smallest spatial features).
* **DNR++**: DNR+ fed with the current *and* previous frames' sampled textures, concatenated
  along channels.

Input: a sampled neural texture ``[B, D, H, W]`` (channels-first: a feature map; ``H`` and ``W``
divisible by ``2 ** levels``). Output: a dict with ``"images"`` ``[B, H, W, 3]`` (channels-last,
the project's image layout) and, with ``return_features=True``, ``"features"``: the cached layers
of the neural cache as ``{3: C3, 4: C4, 5: C5}``.

Which tensors are C3, C4, C5. The paper caches "features from the last 3 layers of the
generator" and its warp consumes them as ``F1 = W1(C3, C4 Δh, ...)``, ``I = W2(F1, C5 Δh)``;
its ablation calls the Δh-modulation of C4 and C5 "SH *Skips*". We therefore take the inputs
of G's last two up layers: ``C3`` = output of up layer ``levels-2`` (decoder features at
``H/4``), ``C4`` = the encoder skip joined to it (down layer 2, ``H/4``), ``C5`` = the encoder
skip joined at the final layer (down layer 1, ``H/2``). W's two up-convolutions then replace
exactly G's last two up layers, as the paper's Figure 3 draws it.

Widths: ``channels[i]`` is the width of down layer ``i+1`` (and of the mirrored up layer). The
CPU default ``(16, 32, 64, 128, 256)`` keeps tests and the synthetic experiment fast; the
paper-sized setting is pix2pix's ``(64, 128, 256, 512, 512)`` with a 1024^2 x 16 texture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GaussianLowPass", "UNetGenerator", "DNR", "DNRPlus", "DNRPlusPlus", "make_norm"]

DEFAULT_CHANNELS = (16, 32, 64, 128, 256)
PAPER_CHANNELS = (64, 128, 256, 512, 512)


def make_norm(norm: str, channels: int) -> nn.Module:
    """``"instance"`` (pix2pix/DNR: per-image statistics, batch-size independent), ``"batch"``
    or ``"none"``. Instance statistics of a training crop differ from a full frame's, so when
    training on crops (the authors use 256-pixel crops) prefer ``"batch"`` (running
    statistics at eval) or ``"none"``."""
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; expected 'instance', 'batch' or 'none'")


def _out_activation(name: str) -> nn.Module:
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "none":
        return nn.Identity()
    raise ValueError(f"unknown out_activation {name!r}; expected 'sigmoid' or 'none'")


class GaussianLowPass(nn.Module):
    r"""Fixed (non-learned) depthwise Gaussian blur.

    Kernel ``g(x) ∝ exp(-x^2 / (2 σ^2))`` on ``x = -r..r`` with ``r = round(truncate · σ)``,
    normalised to sum 1, applied separably with replicate padding (so a constant map is left
    unchanged, and maps smaller than the kernel are fine). Matches
    ``scipy.ndimage.gaussian_filter(mode="nearest", truncate=truncate)``.
    """

    def __init__(self, sigma: float = 1.0, truncate: float = 2.0) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"GaussianLowPass sigma must be > 0, got {sigma}")
        radius = int(truncate * sigma + 0.5)
        xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (xs / sigma) ** 2)
        self.sigma = sigma
        self.radius = radius
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W]
        """Blurred ``x``, same shape."""
        C, r = x.shape[1], self.radius
        k = self.kernel.to(x.dtype)
        x = F.pad(x, (r, r, r, r), mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


class UNetGenerator(nn.Module):
    """Pix2pix-style U-Net used by DNR / DNR+ / DNR++ (see the module docstring).

    Down layer ``i`` (``i = 1..L``): 4x4 stride-2 conv -> norm (not on the first and the
    innermost layer, as pix2pix) -> LeakyReLU(0.2). Up layer ``j``: ``upsample`` x2 (4x4 stride-2
    transposed conv, or bilinear + 3x3 conv) on ``[previous up output, skip of the same
    resolution]`` -> norm -> ReLU; the last up layer has no norm and ends in ``out_activation``.

    Args:
        in_channels: channels of the input feature map (the texture's ``D``).
        out_channels: 3 for RGB.
        channels: widths of the ``L = len(channels) >= 3`` levels.
        upsample: ``"transposed"`` (DNR) or ``"bilinear"`` (DNR+).
        lowpass_sigma: σ (in bottleneck pixels) of the Gaussian low-pass on the bottleneck;
            ``None`` disables it. The paper gives no value; 1.0 (5-tap kernel) removes the
            highest bottleneck frequencies without flattening a 2x2..8x8 bottleneck.
        norm: see :func:`make_norm`.
        out_activation: ``"sigmoid"`` (images in [0, 1]) or ``"none"``.
    """

    def __init__(self, in_channels: int = 16, out_channels: int = 3,
                 channels: Sequence[int] = DEFAULT_CHANNELS, upsample: str = "bilinear",
                 lowpass_sigma: float | None = 1.0, norm: str = "instance",
                 out_activation: str = "sigmoid") -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 3:
            raise ValueError(f"the U-Net needs >= 3 levels to expose cached layers C3..C5, "
                             f"got channels={channels}")
        if upsample not in ("transposed", "bilinear"):
            raise ValueError(f"unknown upsample {upsample!r}; expected 'transposed' or 'bilinear'")
        self.in_channels, self.out_channels, self.channels = in_channels, out_channels, channels
        self.upsample, self.levels = upsample, len(channels)
        L = self.levels

        self.downs = nn.ModuleList()
        prev = in_channels
        for i, c in enumerate(channels):
            use_norm = 0 < i < L - 1
            self.downs.append(nn.Sequential(
                nn.Conv2d(prev, c, 4, stride=2, padding=1),
                make_norm(norm if use_norm else "none", c),
                nn.LeakyReLU(0.2, inplace=True)))
            prev = c
        self.lowpass = GaussianLowPass(lowpass_sigma) if lowpass_sigma else nn.Identity()

        self.ups = nn.ModuleList()
        for j in range(1, L + 1):
            cin = channels[L - 1] if j == 1 else 2 * channels[L - j]
            last = j == L
            cout = out_channels if last else channels[L - 1 - j]
            if upsample == "transposed":
                conv = [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)]
            else:
                conv = [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                        nn.Conv2d(cin, cout, 3, padding=1)]
            tail = [_out_activation(out_activation)] if last else [make_norm(norm, cout), nn.ReLU(inplace=True)]
            self.ups.append(nn.Sequential(*conv, *tail))

    @property
    def feature_channels(self) -> dict[int, int]:
        """Channel count of each cached layer, ``{3: C3, 4: C4, 5: C5}``."""
        return {3: self.channels[1], 4: self.channels[1], 5: self.channels[0]}

    def reset_parameters(self) -> None:
        """Re-initialise every convolution and norm layer (torch defaults)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(
        self,
        x: Tensor,  # [B, in_channels, H, W]
        return_features: bool = False,
    ) -> dict[str, Tensor | dict[int, Tensor]]:
        """Run G. Returns ``{"images": [B, H, W, 3]}`` plus ``"features"`` (cached layers
        ``{3: [B, C3, H/4, W/4], 4: [B, C4, H/4, W/4], 5: [B, C5, H/2, W/2]}``) on request."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input [B, {self.in_channels}, H, W], "
                             f"got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        m = 2 ** self.levels
        if H % m or W % m:
            raise ValueError(f"{type(self).__name__} with {self.levels} levels needs H and W divisible "
                             f"by {m}, got {H}x{W}")
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        x = self.lowpass(skips.pop())
        L = self.levels
        features = {}
        for j, up in enumerate(self.ups, start=1):
            if j > 1:
                skip = skips.pop()
                if j == L - 1:
                    features[3], features[4] = x, skip
                elif j == L:
                    features[5] = skip
                x = torch.cat([x, skip], dim=1)
            x = up(x)
        out = {"images": x.permute(0, 2, 3, 1)}
        if return_features:
            out["features"] = features
        return out


class DNR(UNetGenerator):
    """DNR's renderer: the U-Net with transposed-convolution up layers and no low-pass."""

    def __init__(self, in_channels: int = 16, out_channels: int = 3,
                 channels: Sequence[int] = DEFAULT_CHANNELS, norm: str = "instance",
                 out_activation: str = "sigmoid") -> None:
        super().__init__(in_channels, out_channels, channels, upsample="transposed",
                         lowpass_sigma=None, norm=norm, out_activation=out_activation)


class DNRPlus(UNetGenerator):
    """DNR+: bilinear-upsample + conv up layers and a Gaussian low-pass on the bottleneck."""

    def __init__(self, in_channels: int = 16, out_channels: int = 3,
                 channels: Sequence[int] = DEFAULT_CHANNELS, lowpass_sigma: float | None = 1.0,
                 norm: str = "instance", out_activation: str = "sigmoid") -> None:
        super().__init__(in_channels, out_channels, channels, upsample="bilinear",
                         lowpass_sigma=lowpass_sigma, norm=norm, out_activation=out_activation)


class DNRPlusPlus(UNetGenerator):
    """DNR++: DNR+ whose input is the current frame's sampled texture concatenated with those
    of the ``num_prev_frames`` previous frames.

    The paper says both "the current and past frame" and "the two previous frames"; we follow
    the first (``num_prev_frames=1``) and expose the count.

    Args:
        texture_channels: ``D`` of one frame's sampled texture.
        num_prev_frames: previous frames fed alongside the current one.
        (others as :class:`DNRPlus`)
    """

    def __init__(self, texture_channels: int = 16, num_prev_frames: int = 1, out_channels: int = 3,
                 channels: Sequence[int] = DEFAULT_CHANNELS, lowpass_sigma: float | None = 1.0,
                 norm: str = "instance", out_activation: str = "sigmoid") -> None:
        if num_prev_frames < 1:
            raise ValueError(f"DNR++ needs num_prev_frames >= 1, got {num_prev_frames}")
        super().__init__(texture_channels * (1 + num_prev_frames), out_channels, channels,
                         upsample="bilinear", lowpass_sigma=lowpass_sigma, norm=norm,
                         out_activation=out_activation)
        self.texture_channels, self.num_prev_frames = texture_channels, num_prev_frames

    def forward(self, x: Tensor, prev_features: Tensor | None = None,  # [B, D, H, W], [B, P*D, H, W]
                return_features: bool = False) -> dict[str, Tensor | dict[int, Tensor]]:
        """Render from the current texture sample ``x`` and the previous ones, newest first,
        concatenated along channels. ``prev_features=None`` means ``x`` already holds all
        ``(1 + P) * D`` channels."""
        if prev_features is not None:
            if prev_features.shape[1] != self.texture_channels * self.num_prev_frames:
                raise ValueError(f"DNR++ prev_features must have num_prev_frames*D = "
                                 f"{self.num_prev_frames * self.texture_channels} channels, "
                                 f"got {tuple(prev_features.shape)}")
            x = torch.cat([x, prev_features], dim=1)
        return super().forward(x, return_features=return_features)
