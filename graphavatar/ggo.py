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

from headkit.cameras import invert_rigid, perturb_pose
from headkit.encodings import FREQUENCY_SPACINGS, positional_encoding

__all__ = ["GraphGuidedOptimization", "apply_pose_delta", "ggo_times", "POSE_SIDES", "TEST_TIMES"]

POSE_SIDES = ("right", "left", "head")  # frames apply_pose_delta can apply the update in
TEST_TIMES = ("hold", "extrapolate")  # what ggo_times gives GGO for frames outside the training time range


def ggo_times(
    times: Tensor,  # [B] normalised time of each frame
    train_range: tuple[float, float],  # first and last training frame's time
    test_time: str = "hold",
) -> Tensor:
    """The times GGO is conditioned on, ``[B]``. Only frames outside the training frames' time
    range differ (test frames, when GGO refines them: ``ggo.apply_on_test``):

    * ``"hold"``: the time is clamped to that range, so a frame after the training range gets the
      time code of the last training frame (a zero-order hold) with its own graph features.
      Tracking errors change slowly (drift), so the correction learnt at the end of the
      training range is the best estimate the time code holds for the frames just after it.
    * ``"extrapolate"``: the time as it is; the time encoding's sinusoids continue past the
      training range, where nothing constrained them.
    """
    if test_time == "extrapolate":
        return times
    return times.clamp(*train_range)


class GraphGuidedOptimization(nn.Module):
    """Cross-attention between graph bottleneck features and time tokens (GraphAvatar eq. 9).

    Args:
        bottleneck_dim: C, channels of the query features (concatenated bottlenecks of both
            U-Nets: ``2 · latent``, 16 with the authors' settings).
        expression_dim: E.
        embed_dim: D (default ``bottleneck_dim``, as the authors); must divide by ``num_heads``.
        num_heads: attention heads (authors: 4).
        num_freqs: frequencies of the time encoding ``[sin(f_k π t), cos(f_k π t)]`` (authors: 10).
        frequency_spacing: ``"octave"`` (``f_k = 2^k``, the authors') or ``"linear"``
            (``f_k = k + 1``: a Fourier series over the clip, not in the paper). With octaves the
            upper frequencies alias to a pseudo-random code per frame (10 octaves over 300
            frames: the finest period is about one frame), so GGO can fit per-frame
            photometric residuals rather than tracking drift; linear spacing represents every
            smooth variation up to ``num_freqs / 2`` cycles over the clip and nothing finer
            (``benchmarks/ggo_drift.md``).
        dropout: attention dropout (authors: 0.1; 0 keeps the refinement deterministic).
        shared_momentum: momentum ``β`` of the running mean of the offsets over the training
            frames (``shared_offset``), updated in training-mode forward passes (see
            :meth:`shared`). Not checkpointed (a resumed run re-estimates it within ~1/(1-β)
            steps), so checkpoints of older runs still load.
    """

    def __init__(
        self,
        bottleneck_dim: int,
        expression_dim: int,
        embed_dim: int | None = None,
        num_heads: int = 4,
        num_freqs: int = 10,
        frequency_spacing: str = "octave",
        dropout: float = 0.0,
        shared_momentum: float = 0.99,
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
        if frequency_spacing not in FREQUENCY_SPACINGS:
            raise ValueError(f"GraphGuidedOptimization: frequency_spacing must be one of "
                             f"{sorted(FREQUENCY_SPACINGS)}, got {frequency_spacing!r}")
        self.embed_dim, self.num_freqs, self.frequency_spacing = embed_dim, num_freqs, frequency_spacing
        self.num_tokens = expression_dim + 6
        self.time_mlp = nn.Linear(2 * num_freqs, self.num_tokens * embed_dim)
        self.query_proj = nn.Linear(bottleneck_dim, embed_dim)
        self.attention = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.out_proj = nn.Linear(embed_dim, self.num_tokens)
        self.shared_momentum = float(shared_momentum)
        self.register_buffer("shared_offset", torch.zeros(self.num_tokens), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default init everywhere, then the output projection zeroed (identity refinement)."""
        self.time_mlp.reset_parameters()
        self.query_proj.reset_parameters()
        self.attention._reset_parameters()
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        self.shared_offset.zero_()

    def time_tokens(self, times: Tensor) -> Tensor:  # [B]
        """Temporal key/value tokens ``[B, E + 6, D]`` from normalised times in [0, 1]."""
        enc = positional_encoding(times[:, None], self.num_freqs, include_input=False,
                                  spacing=self.frequency_spacing)  # [B, 2F]
        return self.time_mlp(enc).reshape(times.shape[0], self.num_tokens, self.embed_dim)

    def forward(
        self,
        times: Tensor,  # [B] normalised time of each frame
        bottlenecks: Tensor,  # [B, C] or [B, Q, C]
    ) -> dict[str, Tensor]:
        """Offsets for the tracked parameters.

        Returns:
            ``delta_expressions [B, E]``, ``delta_poses [B, 6]`` (``(ω, v)`` for
            :func:`apply_pose_delta`), ``shared_expression [E]`` and ``shared_pose [6]`` (the
            part common to all training frames, see :meth:`shared`) and ``attention
            [B, Q, E + 6]`` (weights averaged over heads, for inspection).
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
        shared = self.shared(out)
        return {"delta_expressions": out[:, : self.expression_dim],
                "delta_poses": out[:, self.expression_dim:], "shared_expression": shared[: self.expression_dim],
                "shared_pose": shared[self.expression_dim:], "attention": weights}

    def shared(self, out: Tensor) -> Tensor:  # [B, E + 6]
        """The offset shared by all training frames, ``[E + 6]``, for a penalty on it alone.

        Its value is the running mean ``m`` of the offsets over training steps (batches of a few
        frames, so a mean over the training frames after ~1/(1-β) steps); its gradient flows
        into this batch's offsets as if their mean were ``m``:
        ``m + (mean_b out_b - sg(mean_b out_b))``. So ``‖shared‖²`` has the value ``‖m‖²`` and
        pushes every frame's offset by ``-2m``, the gradient of ``‖m + s‖²`` with respect to a
        shift ``s`` common to all frames: it removes a shared offset (a gauge freedom: it is the
        same as moving the avatar) and leaves the differences between frames alone.
        """
        batch_mean = out.mean(dim=0)
        if self.training:
            with torch.no_grad():
                self.shared_offset.lerp_(batch_mean.detach(), 1.0 - self.shared_momentum)
        return self.shared_offset + (batch_mean - batch_mean.detach())


def apply_pose_delta(
    camtoworlds: Tensor,  # [B, 4, 4]
    delta_poses: Tensor,  # [B, 6] (ω, v)
    side: str = "right",
    head_poses: Tensor | None = None,  # [B, 4, 4] head (local frame) to world, for side="head"
) -> Tensor:
    """Refined camera-to-world poses ``[B, 4, 4]``; ``exp`` is :func:`headkit.cameras.se3_exp`.

    * ``"right"`` (the authors'): ``camtoworld · exp(δ)``, the update in the camera's own frame:
      ``ω`` rotates about the camera centre, ``v`` moves along the camera axes.
    * ``"left"``: ``exp(δ) · camtoworld``, in world coordinates (rotation about the world origin).
    * ``"head"``: ``H · exp(δ) · H⁻¹ · camtoworld`` with the head pose ``H``: the update in the
      head's frame, i.e. the camera orbits the head origin by ``ω`` and shifts by ``v`` along the
      head's axes. A monocular tracker's pose error is mostly such a rotation of the head (about
      itself) relative to the camera; in the camera frame the same error needs a rotation *and*
      a coupled shift of about ``ω × distance``, which the offsets' penalty and optimiser treat
      as much larger.
    """
    if camtoworlds.shape[-2:] != (4, 4) or delta_poses.shape[-1] != 6 \
            or camtoworlds.shape[:-2] != delta_poses.shape[:-1]:
        raise ValueError(f"apply_pose_delta: expected camtoworlds [B, 4, 4] and delta_poses [B, 6], "
                         f"got {list(camtoworlds.shape)} and {list(delta_poses.shape)}")
    delta_poses = delta_poses.to(camtoworlds.dtype)
    if side != "head":
        return perturb_pose(camtoworlds, delta_poses, side=side)
    if head_poses is None or head_poses.shape != camtoworlds.shape:
        raise ValueError("apply_pose_delta: side='head' needs head_poses [B, 4, 4] like camtoworlds")
    return head_poses @ perturb_pose(invert_rigid(head_poses) @ camtoworlds, delta_poses, side="left")
