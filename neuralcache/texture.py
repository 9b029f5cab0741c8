"""Multi-scale neural texture of deferred neural rendering (DNR), with SH view encoding.

Layout rule of the neural-caching modules: *feature maps* (sampled textures, generator and
cache features) are channels-first ``[B, C, H, W]`` because only CNNs consume them; *images,
UV maps and masks* are channels-last ``[B, H, W, C]`` / ``[B, H, W]`` like everywhere else in
the project.

UV convention (the template's, as in OBJ files): ``u`` grows to the right, ``v`` grows *up*,
both in ``[0, 1]`` over the whole texture. Texture row 0 is the top (``v = 1``), so the sample
location handed to ``grid_sample`` is ``(x, y) = (2u - 1, 1 - 2v)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headkit.encodings import num_sh_bases, sh_basis

__all__ = ["NeuralTexture", "check_uv_maps", "texture_l1"]


def check_uv_maps(uvs: Tensor, masks: Tensor, where: str = "uv map") -> None:  # [B, H, W, 2], [B, H, W]
    """Raise ``ValueError`` naming ``where`` and the frame if a UV map is unusable.

    Checks what a rasterizer bug or a broken template would produce: non-finite UVs or UVs
    outside ``[0, 1]`` (tolerance 1e-3) on foreground pixels. Background values are ignored.
    This reads values back from the device, so call it in data loading, not per forward.
    """
    if uvs.ndim != 4 or uvs.shape[-1] != 2 or masks.shape != uvs.shape[:-1]:
        raise ValueError(f"{where}: expected uvs [B, H, W, 2] and masks [B, H, W], got "
                         f"{tuple(uvs.shape)} and {tuple(masks.shape)}")
    fg = masks > 0
    for b in range(uvs.shape[0]):
        vals = uvs[b][fg[b]]
        if not torch.isfinite(vals).all():
            raise ValueError(f"{where}, frame {b}: {int((~torch.isfinite(vals)).any(-1).sum())} "
                             "foreground pixels have NaN/Inf texture coordinates")
        bad = ((vals < -1e-3) | (vals > 1 + 1e-3)).any(-1)
        if bad.any():
            raise ValueError(f"{where}, frame {b}: {int(bad.sum())} foreground pixels have texture "
                             f"coordinates outside [0, 1] (range {vals.min():.3g}..{vals.max():.3g})")


class NeuralTexture(nn.Module):
    r"""DNR's hierarchical neural texture sampled by a rasterized UV map.

    The texture is a Laplacian-pyramid-style stack of ``num_levels`` learnable maps
    ``N_l \in R^{D x R/2^l x R/2^l}``; a pixel with texture coordinate ``uv`` gets

    .. math:: F(uv) = \sum_l \mathrm{bilinear}(N_l, uv)

    (each level sampled with ``grid_sample``, bilinear, ``align_corners=False``, border
    padding), so coarse levels carry low frequencies and receive gradients from many pixels,
    while the finest level stores detail (Thies et al. 2019). Background pixels (mask 0) are
    zero.

    View dependence: the viewing direction is projected onto the 9 real SH bases of degree 2
    (``headkit.encodings.sh_basis``) and multiplied into 9 consecutive channels starting at
    ``sh_channel_start``. The paper says "channels 4 through 12"; we read that one-based, i.e.
    zero-based channels 3..11 (the default ``sh_channel_start=3``), which keeps channels 0..2
    view independent -- those are the channels the texture loss :func:`texture_l1` ties to
    the RGB image, as in DNR.

    Args:
        num_channels: ``D`` (16 in the paper and the authors' code).
        resolution: ``R`` of the finest level (the authors use 1024; 256 suits CPU runs).
            Must be divisible by ``2 ** (num_levels - 1)``.
        num_levels: pyramid levels (4 as in DNR).
        view_sh: multiply the SH view encoding into the features.
        sh_degree: SH degree of the view encoding (2 gives the paper's 9 coefficients).
        sh_channel_start: first (zero-based) channel multiplied by the SH encoding.
        init_std: std of the random normal initialisation (the paper: "initialized at
            random"; the scale is our choice).
    """

    def __init__(self, num_channels: int = 16, resolution: int = 256, num_levels: int = 4,
                 view_sh: bool = True, sh_degree: int = 2, sh_channel_start: int = 3,
                 init_std: float = 0.1) -> None:
        super().__init__()
        if num_levels < 1 or resolution % (2 ** (num_levels - 1)) != 0:
            raise ValueError(f"texture resolution {resolution} must be divisible by "
                             f"2**(num_levels-1) = {2 ** (num_levels - 1)} (num_levels={num_levels})")
        num_sh = num_sh_bases(sh_degree) if view_sh else 0
        if view_sh and not 0 <= sh_channel_start <= num_channels - num_sh:
            raise ValueError(f"{num_sh} SH channels starting at sh_channel_start={sh_channel_start} "
                             f"do not fit into num_channels={num_channels}")
        self.num_channels = num_channels
        self.resolution = resolution
        self.view_sh = view_sh
        self.sh_degree = sh_degree
        self.sh_channel_start = sh_channel_start
        self.init_std = init_std
        self.levels = nn.ParameterList(
            nn.Parameter(torch.empty(1, num_channels, resolution >> l, resolution >> l))
            for l in range(num_levels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw every level from ``N(0, init_std^2)``."""
        for level in self.levels:
            nn.init.normal_(level, 0.0, self.init_std)

    def sample(self, uvs: Tensor) -> Tensor:  # [B, H, W, 2]
        """Sum of all levels sampled at ``uvs`` (no mask, no SH). Returns ``[B, D, H, W]``."""
        B, H, W, _ = uvs.shape
        grid = torch.stack([2.0 * uvs[..., 0] - 1.0, 1.0 - 2.0 * uvs[..., 1]], dim=-1)
        # One sampling call per level on a [1, B*H, W] grid: the texture is shared by the batch.
        grid = grid.reshape(1, B * H, W, 2)
        out = 0
        for level in self.levels:
            out = out + F.grid_sample(level, grid, mode="bilinear", padding_mode="border",
                                      align_corners=False)
        return out.reshape(self.num_channels, B, H, W).transpose(0, 1)

    def forward(
        self,
        uvs: Tensor,  # [B, H, W, 2] texture coordinates in [0, 1], v up
        masks: Tensor,  # [B, H, W] foreground (bool or {0, 1} float)
        view_dirs: Tensor | None = None,  # [B, 3] or [B, H, W, 3] viewing directions
    ) -> Tensor:
        """Sampled feature map ``F``, ``[B, D, H, W]``, zero on background pixels.

        ``view_dirs`` may be one direction per frame or one per pixel (normalised here); it is
        required when ``view_sh`` is on. Which frame it lives in (the head's object frame is
        the natural choice: it makes the encoding invariant to the head's world placement) is
        the caller's decision.
        """
        if uvs.ndim != 4 or uvs.shape[-1] != 2:
            raise ValueError(f"uvs must be [B, H, W, 2], got {tuple(uvs.shape)}")
        if masks.shape != uvs.shape[:-1]:
            raise ValueError(f"masks must be [B, H, W] = {tuple(uvs.shape[:-1])}, got {tuple(masks.shape)}")
        feats = self.sample(uvs) * masks.to(uvs.dtype).unsqueeze(1)
        if not self.view_sh:
            return feats
        if view_dirs is None:
            raise ValueError("view_dirs is required when the texture's view_sh is enabled")
        B, H, W = masks.shape
        if view_dirs.shape == (B, 3):
            view_dirs = view_dirs[:, None, None, :]
        elif view_dirs.shape != (B, H, W, 3):
            raise ValueError(f"view_dirs must be [B, 3] or [B, H, W, 3] with B, H, W = {B}, {H}, {W}; "
                             f"got {tuple(view_dirs.shape)}")
        shs = sh_basis(view_dirs, self.sh_degree).permute(0, 3, 1, 2)  # [B, 9, 1|H, 1|W]
        s, e = self.sh_channel_start, self.sh_channel_start + shs.shape[1]
        return torch.cat([feats[:, :s], feats[:, s:e] * shs, feats[:, e:]], dim=1)


def texture_l1(
    features: Tensor,  # [B, D, H, W] sampled neural texture
    images: Tensor,  # [B, H, W, 3] target images in [0, 1]
    masks: Tensor | None = None,  # [B, H, W] foreground; None = every pixel
) -> Tensor:
    """L_tex of eq. (4): mean absolute difference between texture channels 0..2 and the image.

    With ``masks`` the mean runs over foreground pixels only (the texture is zero elsewhere, so
    including the background would pull it towards the background colour).
    """
    diffs = (features[:, :3].permute(0, 2, 3, 1) - images).abs()  # [B, H, W, 3]
    if masks is None:
        return diffs.mean()
    weights = masks.to(diffs.dtype).unsqueeze(-1)
    return (diffs * weights).sum() / (3.0 * weights.sum()).clamp_min(1.0)
