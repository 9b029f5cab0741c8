"""Graph-guided optimisation (GGO): refine the tracked expression and camera pose per frame.

GraphAvatar (eq. 9): the normalised time ``t`` goes through a frequency encoding and an MLP to
temporal features ``f_t``; the bottleneck features of both graph U-Nets form ``f_g``; a
cross-attention with query ``f_g`` and key/value ``f_t`` predicts an expression offset and a
camera update in so(3) × R³, applied through the exponential map.

Tensor shapes (``B`` frames, ``E`` expression size, ``D`` embedding size, ``Q`` query tokens)::

    t [B]  --encode (num_freqs)-->  [B, 2·num_freqs]  --Linear-->  [B, (E + 6)·D]
           --view-->  time tokens   [B, E + 6, D]                    (key and value)
    bottlenecks [B, Q, C]  --Linear-->  queries [B, Q, D]            (Q = 1 for a global z)
    MultiheadAttention(queries, tokens, tokens)  -->  [B, Q, D]  --mean over Q-->  [B, D]
    --Linear (zero-initialised)-->  [B, E + 6]  =  (delta_expressions [B, E], delta_poses [B, 6])

As in the authors' code there is one time token per output scalar (E + 6 of them), and the
output projection maps the attended feature to all E + 6 offsets.

Initialisation: only the output projection is zeroed, so the refinement starts at exactly the
identity while the gradient of the output projection (``∂out/∂W = attended features``) is
non-zero at step 0; after one step the gradient reaches the attention and the time MLP. (The
authors zero *every* parameter; then the attended features are 0 as well and only the output
bias can ever learn, i.e. one constant offset for all frames.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from headkit.cameras import perturb_pose
from headkit.encodings import positional_encoding

__all__ = ["GraphGuidedOptimization", "apply_pose_delta"]


class GraphGuidedOptimization(nn.Module):
    """Cross-attention between graph bottleneck features and time tokens (GraphAvatar eq. 9).

    Args:
        bottleneck_dim: C, channels of the query features (concatenated bottlenecks of both
            U-Nets: ``2 · latent``, 16 with the authors' settings).
        expression_dim: E.
        embed_dim: D (default ``bottleneck_dim``, as the authors); must divide by ``num_heads``.
        num_heads: attention heads (authors: 4).
        num_freqs: frequencies of the time encoding ``[sin(2^k π t), cos(2^k π t)]`` (authors: 10).
        dropout: attention dropout (authors: 0.1; 0 keeps the refinement deterministic).
    """

    def __init__(
        self,
        bottleneck_dim: int,
        expression_dim: int,
        embed_dim: int | None = None,
        num_heads: int = 4,
        num_freqs: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        embed_dim = embed_dim or bottleneck_dim
        if embed_dim % num_heads:
            raise ValueError(f"GraphGuidedOptimization: embed_dim {embed_dim} is not divisible by "
                             f"num_heads {num_heads}")
        if expression_dim < 0 or num_freqs < 1:
            raise ValueError(f"GraphGuidedOptimization: need expression_dim >= 0 and num_freqs >= 1, "
                             f"got {expression_dim}, {num_freqs}")
        self.bottleneck_dim, self.expression_dim = bottleneck_dim, expression_dim
        self.embed_dim, self.num_freqs = embed_dim, num_freqs
        self.num_tokens = expression_dim + 6
        self.time_mlp = nn.Linear(2 * num_freqs, self.num_tokens * embed_dim)
        self.query_proj = nn.Linear(bottleneck_dim, embed_dim)
        self.attention = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.out_proj = nn.Linear(embed_dim, self.num_tokens)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default init everywhere, then the output projection zeroed (identity refinement)."""
        self.time_mlp.reset_parameters()
        self.query_proj.reset_parameters()
        self.attention._reset_parameters()
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def time_tokens(self, times: Tensor) -> Tensor:  # [B]
        """Temporal key/value tokens ``[B, E + 6, D]`` from normalised times in [0, 1]."""
        enc = positional_encoding(times[:, None], self.num_freqs, include_input=False)  # [B, 2F]
        return self.time_mlp(enc).reshape(times.shape[0], self.num_tokens, self.embed_dim)

    def forward(
        self,
        times: Tensor,  # [B] normalised time of each frame
        bottlenecks: Tensor,  # [B, C] or [B, Q, C]
    ) -> dict[str, Tensor]:
        """Offsets for the tracked parameters.

        Returns:
            ``delta_expressions [B, E]``, ``delta_poses [B, 6]`` (``(ω, v)`` for
            :func:`apply_pose_delta`) and ``attention [B, Q, E + 6]`` (weights averaged over
            heads, for inspection).
        """
        if bottlenecks.dim() == 2:
            bottlenecks = bottlenecks[:, None]
        if times.dim() != 1 or bottlenecks.dim() != 3 or bottlenecks.shape[0] != times.shape[0] \
                or bottlenecks.shape[-1] != self.bottleneck_dim:
            raise ValueError(f"GraphGuidedOptimization: expected times [B] and bottlenecks [B, (Q,) "
                             f"{self.bottleneck_dim}], got {list(times.shape)} and {list(bottlenecks.shape)}")
        tokens = self.time_tokens(times)
        queries = self.query_proj(bottlenecks)
        attended, weights = self.attention(queries, tokens, tokens, need_weights=True)
        out = self.out_proj(attended.mean(dim=1))  # [B, E + 6]
        return {"delta_expressions": out[:, : self.expression_dim],
                "delta_poses": out[:, self.expression_dim:], "attention": weights}


def apply_pose_delta(
    camtoworlds: Tensor,  # [B, 4, 4]
    delta_poses: Tensor,  # [B, 6] (ω, v)
    side: str = "right",
) -> Tensor:
    """Refined camera-to-world poses ``[B, 4, 4]``: ``camtoworld · exp(δ)`` (or ``exp(δ) · camtoworld``).

    ``exp`` is :func:`headkit.cameras.se3_exp`, the so(3) × R³ map (rotation ``so3_exp(ω)``,
    translation ``v`` as is). ``side="right"`` (default) applies the update in the camera's own
    frame, so ``ω`` rotates about the camera centre and ``v`` moves along the camera axes: the
    same pose error means the same ``δ`` whatever the head's placement in the world. ``"left"``
    applies it in world coordinates.
    """
    if camtoworlds.shape[-2:] != (4, 4) or delta_poses.shape[-1] != 6 \
            or camtoworlds.shape[:-2] != delta_poses.shape[:-1]:
        raise ValueError(f"apply_pose_delta: expected camtoworlds [B, 4, 4] and delta_poses [B, 6], "
                         f"got {list(camtoworlds.shape)} and {list(delta_poses.shape)}")
    return perturb_pose(camtoworlds, delta_poses.to(camtoworlds.dtype), side=side)
