"""Chebyshev graph U-Nets that turn a tracked mesh into per-vertex anchor Gaussians.

GraphAvatar (Sec. "GNN-based Avatar Representation") runs two graph U-Nets of the same shape on
the tracked mesh: a geometric one predicting position offsets, rotations and scales, and an
appearance one predicting colours and opacities. Each is a COMA-style encoder/decoder: Chebyshev
graph convolutions (torch-geometric ``ChebConv``, symmetric normalisation, ``lambda_max = 2``,
i.e. the scaled Laplacian ``-D^{-1/2} A D^{-1/2}``), pooling by the decimation matrices ``D``
and unpooling by the barycentric matrices ``U`` of :mod:`graphavatar.sampling`, a bottleneck
``z``, and the expression vector concatenated to ``z`` before decoding.

Batching: the graph is the same for every frame, so frames are stacked as ``x [B, V, C]``.
The layers are torch-geometric ``ChebConv`` modules (their parameters, initialisation and state
dict keys), but the filter is evaluated by :func:`cheb_filter`: the Chebyshev recursion with the
scaled Laplacian precomputed once as a sparse matrix and applied to ``[V, B * C]``, which is
exactly what ``ChebConv.forward`` computes (tested to 1e-5) and 2.3-2.7x faster here (CPU, one
thread, 2562 vertices, 16 channels, K = 6, forward + backward: 16.5 vs 38.6 ms for B = 1,
37.6 vs 101 ms for B = 4), because PyG rebuilds the normalisation and gathers/scatters per
edge on every call. (``ChebConv`` itself also accepts ``[B, V, C]`` directly, since PyG
propagates along ``node_dim = -2``.) No PyG ``Batch``, no offset edge indices. Pooling and
unpooling are sparse matrix products on ``[V, B * C]`` too.

Every fixed matrix (``L~``, ``D``, ``U``) is a :class:`SparseMatrix`: CSR with int32 indices, and
a backward that multiplies by a precomputed CSR transpose; the ``K`` Chebyshev terms meet their
weights in one GEMM. Issue #15 measured both U-Nets (forward + backward, one thread) 2.1-2.6x
faster at 2.5k vertices and 2.6-2.9x at 11k than with COO ``torch.sparse.mm`` and an ``einsum``
(``benchmarks/bench_graph_unet.py``, ``benchmarks/train_step.md``); same sums, float rounding aside.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import ChebConv

from headkit.encodings import num_sh_bases, positional_encoding, positional_encoding_dim
from headkit.mesh import vertex_normals

from .sampling import MeshHierarchy

__all__ = ["GraphUNet", "GeometryHead", "AppearanceHead", "SparseMatrix", "sparse_apply",
           "scaled_laplacian", "cheb_filter", "HEAD_INITS"]

#: ``model.unet.head_init``: the U-Nets' output convolution starts at zero (the anchors exactly
#: on the template, this project's default) or at PyTorch/PyG's default (the authors' code)
HEAD_INITS = ("zero", "default")


class _CSRMatmul(torch.autograd.Function):
    """``A @ x`` for a constant CSR ``A [M, N]``; backward ``dx = A^T @ dy`` with a precomputed CSR ``A^T``.

    Autograd's own backward of a CSR product transposes ``A`` on every call: 0.9 ms instead of
    0.03 ms for a 2.5k-vertex Laplacian and 6 channels (one CPU thread)."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, a_t: Tensor) -> Tensor:  # [N, C], CSR [M, N], CSR [N, M]
        ctx.a_t = a_t
        return a @ x  # [M, C]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # [M, C]
        return ctx.a_t @ grad, None, None  # [N, C]


class SparseMatrix(nn.Module):
    """A fixed sparse matrix ``A [M, N]`` (no gradient of its own) applied as CSR: ``x -> A x``.

    Why CSR: COO ``torch.sparse.mm`` costs 0.5 ms for a 2.5k-vertex Laplacian times ``[V, 6..64]``
    on one CPU thread, the CSR product 0.03-0.14 ms (same sums, float rounding aside). The CSR
    arrays of ``A`` and ``A^T`` are kept as plain index/value buffers (non-persistent: rebuilt
    from the template with the model, never in checkpoints) and wrapped per call, because CSR
    tensors cannot be deep-copied; so the module moves with ``.to()``/``.double()`` like any other.
    """

    def __init__(self, matrix: Tensor) -> None:  # sparse COO or CSR [M, N]
        super().__init__()
        self.shape = tuple(matrix.shape)
        coo = matrix.to_sparse_coo().coalesce()
        for name, m in (("a", coo), ("a_t", coo.t().coalesce())):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                csr = m.to_sparse_csr()
            # int32 indices: the product skips converting them on every call (1.1-1.6x faster here).
            self.register_buffer(f"{name}_crow", csr.crow_indices().int(), persistent=False)
            self.register_buffer(f"{name}_col", csr.col_indices().int(), persistent=False)
            self.register_buffer(f"{name}_val", csr.values(), persistent=False)

    def csr(self, transpose: bool = False) -> Tensor:
        """``A`` (or ``A^T``) as a sparse CSR tensor."""
        name, shape = ("a_t", self.shape[::-1]) if transpose else ("a", self.shape)
        return torch.sparse_csr_tensor(getattr(self, f"{name}_crow"), getattr(self, f"{name}_col"),
                                       getattr(self, f"{name}_val"), shape, check_invariants=False)

    def forward(self, x: Tensor) -> Tensor:  # [N, C] -> [M, C]
        return _CSRMatmul.apply(x, self.csr(), self.csr(transpose=True))

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, nnz={self.a_val.numel()}"


def _matmul(matrix: SparseMatrix | Tensor, x: Tensor) -> Tensor:  # [M, N] @ [N, C] -> [M, C]
    return matrix(x) if isinstance(matrix, SparseMatrix) else torch.sparse.mm(matrix, x)


def sparse_apply(
    matrix: SparseMatrix | Tensor,  # [M, N]: a SparseMatrix or a torch sparse tensor
    x: Tensor,  # [B, N, C]
) -> Tensor:
    """Apply a sparse vertex-to-vertex matrix to every frame: ``[B, N, C] -> [B, M, C]``."""
    b, n, c = x.shape
    flat = x.transpose(0, 1).reshape(n, b * c)
    return _matmul(matrix, flat).reshape(matrix.shape[0], b, c).transpose(0, 1)


def scaled_laplacian(edge_index: Tensor, num_nodes: int) -> Tensor:  # [2, E]
    """ChebConv's scaled Laplacian ``L~ = 2 L_sym / lambda_max - I = -D^{-1/2} A D^{-1/2}``.

    ``L_sym = I - D^{-1/2} A D^{-1/2}`` with ``lambda_max = 2`` (ChebConv's defaults for
    ``normalization="sym"``). Returned as a coalesced sparse COO ``[V, V]``; isolated vertices
    get an all-zero row, as in PyG.
    """
    ones = torch.ones(edge_index.shape[1], device=edge_index.device)
    deg = torch.zeros(num_nodes, device=edge_index.device).index_add_(0, edge_index[0], ones)
    values = -(deg[edge_index[0]] * deg[edge_index[1]]).rsqrt()
    return torch.sparse_coo_tensor(edge_index, values, (num_nodes, num_nodes),
                                   check_invariants=True).coalesce()


def cheb_filter(
    conv: ChebConv,
    x: Tensor,  # [B, V, C_in]
    laplacian: SparseMatrix | Tensor,  # [V, V], from scaled_laplacian (wrapped or not)
) -> Tensor:
    """Apply a ``ChebConv``'s filter to every frame: ``sum_k T_k(L~) x W_k + b``, ``[B, V, C_out]``.

    ``T_0 = x``, ``T_1 = L~ x``, ``T_k = 2 L~ T_{k-1} - T_{k-2}``; ``W_k`` is ``conv.lins[k]``.
    Equals ``conv(x, edge_index)`` for ``normalization="sym"`` and the default ``lambda_max``.
    The ``K`` terms are concatenated along channels, ``[T_0 x, ..., T_{K-1} x] [V, B, K C_in]``,
    and multiplied by ``[W_0; ...; W_{K-1}]`` in one GEMM (as PyG's ``ChebConv`` sums them).
    """
    b, v, c = x.shape
    t_prev = x.transpose(0, 1).reshape(v, b * c)
    terms = [t_prev]
    if len(conv.lins) > 1:
        t_cur = _matmul(laplacian, t_prev)
        terms.append(t_cur)
        for _ in range(2, len(conv.lins)):
            t_prev, t_cur = t_cur, 2.0 * _matmul(laplacian, t_cur) - t_prev
            terms.append(t_cur)
    stacked = torch.cat([t.view(v, b, c) for t in terms], dim=-1)  # [V, B, K*C_in], column k*C_in + c
    weight = torch.cat([lin.weight for lin in conv.lins], dim=1)  # [C_out, K*C_in]
    return F.linear(stacked, weight, conv.bias).transpose(0, 1)  # [B, V, C_out]


class GraphUNet(nn.Module):
    """COMA-style Chebyshev graph U-Net on a fixed mesh hierarchy, batched over frames.

    With ``L = len(filters)`` pooling steps (the hierarchy must have at least ``L + 1`` levels)::

        encoder  for l < L:   h_l = ELU(Cheb_l(x_l));  x_{l+1} = D_l h_l
        bottleneck            z = ELU(Linear(x_L))                    (see ``bottleneck``)
        decoder               g_L = ELU(Linear([z, cond]))
                 for l = L-1..0: g_l = ELU(Cheb'_l([U_l g_{l+1}, h_l]))  (skip optional)
        head                  y = Cheb_out(g_0)                        [B, V, out_channels]

    Channels: ``Cheb_l`` outputs ``filters[l]``; the decoder at level ``l`` outputs
    ``filters[l]`` too. This is the authors' layout (two graph convolutions on each side plus
    an output convolution for ``filters = (16, 16)``), with U-Net skip connections added.

    Args:
        hierarchy: the template's :class:`~graphavatar.sampling.MeshHierarchy`.
        in_channels: per-vertex input features.
        out_channels: per-vertex outputs.
        filters: channels per level, one per pooling step (authors: ``(16, 16)``).
        K: Chebyshev polynomial order (number of hops + 1; authors: 6).
        latent: bottleneck size (authors and paper: 8).
        cond_channels: size of the vector concatenated to ``z`` before decoding (the
            expression; 0 for none).
        bottleneck: ``"global"`` flattens the coarsest level into one ``z [B, latent]`` per frame,
            as COMA, the paper (``z ∈ R^8``) and the authors' code do; the decoder's linear layer
            then gives every coarse vertex its own function of ``[z, expression]``, which is what
            lets the expression act locally. ``"per_vertex"`` keeps ``z [B, V_L, latent]`` and
            uses one shared linear layer on ``[z_v, expression]`` per coarse vertex: fewer
            parameters and not tied to the vertex order, but the expression then acts the same
            way on every coarse vertex up to its 8-number code.
        skip: concatenate the encoder features of each level into the decoder (U-Net). The
            authors' code has none (a plain COMA autoencoder); the paper calls it a U-Net.
        head_init: the output convolution's initialisation (``model.unet.head_init``):
            ``"zero"`` (default) zeroes it so the outputs start at exactly 0 (the heads add their
            own constant offsets; gradients still reach the head at step 0 and the rest of the
            network from step 1); ``"default"`` keeps PyTorch/PyG's default, as the authors'
            code: the anchors start at random offsets, rotations, scales and colours around the
            heads' constants, which the warm-up then has to pull in.
    """

    def __init__(
        self,
        hierarchy: MeshHierarchy,
        in_channels: int,
        out_channels: int,
        filters: tuple[int, ...] = (16, 16),
        K: int = 6,
        latent: int = 8,
        cond_channels: int = 0,
        bottleneck: str = "global",
        skip: bool = True,
        head_init: str = "zero",
    ) -> None:
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ValueError(f"GraphUNet: head_init must be one of {list(HEAD_INITS)}, got {head_init!r}")
        filters = tuple(int(f) for f in filters)
        num_steps = len(filters)
        if num_steps < 1 or any(f < 1 for f in filters):
            raise ValueError(f"GraphUNet: filters must be a non-empty list of positive ints, got {filters}")
        if hierarchy.num_levels < num_steps + 1:
            raise ValueError(
                f"GraphUNet: {num_steps} pooling steps (len(filters)) need a hierarchy with "
                f"{num_steps + 1} levels, got {hierarchy.num_levels} (factors {hierarchy.factors})")
        if bottleneck not in ("global", "per_vertex"):
            raise ValueError(f"GraphUNet: bottleneck must be 'global' or 'per_vertex', got {bottleneck!r}")
        if K < 1 or latent < 1 or cond_channels < 0:
            raise ValueError(f"GraphUNet: need K >= 1, latent >= 1, cond_channels >= 0; got "
                             f"K={K}, latent={latent}, cond_channels={cond_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.filters, self.K, self.latent = filters, K, latent
        self.cond_channels, self.bottleneck, self.skip = cond_channels, bottleneck, skip
        self.head_init = head_init
        self.num_steps = num_steps
        self.num_coarse = hierarchy.num_vertices[num_steps]

        # Template-derived graph data: rebuilt from the template with the model, so they are
        # (non-persistent) buffers that move with .to() but are not stored in checkpoints.
        self.laplacians = nn.ModuleList(
            SparseMatrix(scaled_laplacian(hierarchy.edge_indices[level], hierarchy.num_vertices[level]))
            for level in range(num_steps + 1))
        self.downs = nn.ModuleList(SparseMatrix(hierarchy.downs[step]) for step in range(num_steps))
        self.ups = nn.ModuleList(SparseMatrix(hierarchy.ups[step]) for step in range(num_steps))

        chans = (in_channels,) + filters
        self.enc = nn.ModuleList(ChebConv(chans[l], filters[l], K) for l in range(num_steps))
        coarse_c = filters[-1]
        if bottleneck == "global":
            self.enc_lin = nn.Linear(self.num_coarse * coarse_c, latent)
            self.dec_lin = nn.Linear(latent + cond_channels, self.num_coarse * coarse_c)
        else:
            self.enc_lin = nn.Linear(coarse_c, latent)
            self.dec_lin = nn.Linear(latent + cond_channels, coarse_c)
        self.dec = nn.ModuleList()
        for l in range(num_steps):
            up_c = filters[min(l + 1, num_steps - 1)]
            self.dec.append(ChebConv(up_c + (filters[l] if skip else 0), filters[l], K))
        self.head = ChebConv(filters[0], out_channels, K)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyG/torch default initialisation; the output convolution zeroed when ``head_init="zero"``."""
        for conv in list(self.enc) + list(self.dec):
            conv.reset_parameters()
        self.enc_lin.reset_parameters()
        self.dec_lin.reset_parameters()
        self.head.reset_parameters()
        if self.head_init == "zero":
            for lin in self.head.lins:
                nn.init.zeros_(lin.weight)
            nn.init.zeros_(self.head.bias)

    def _conv(self, conv: ChebConv, x: Tensor, level: int) -> Tensor:
        return cheb_filter(conv, x, self.laplacians[level])

    def encode(
        self,
        x: Tensor,  # [B, V, in_channels]
    ) -> tuple[Tensor, list[Tensor]]:
        """Encoder: ``(z, skips)`` with ``z [B, latent]`` (global) or ``[B, V_L, latent]``."""
        if x.dim() != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"GraphUNet.encode: expected x [B, V, {self.in_channels}], got {list(x.shape)}")
        skips = []
        for l, conv in enumerate(self.enc):
            h = F.elu(self._conv(conv, x, l))
            skips.append(h)
            x = sparse_apply(self.downs[l], h)
        if self.bottleneck == "global":
            x = x.reshape(x.shape[0], -1)
        return F.elu(self.enc_lin(x)), skips

    def decode(
        self,
        z: Tensor,  # [B, latent] or [B, V_L, latent]
        skips: list[Tensor],  # per level [B, V_l, filters[l]]
        cond: Tensor | None = None,  # [B, cond_channels]
    ) -> Tensor:
        """Decoder: ``[B, V, out_channels]`` from the bottleneck, skips and the condition."""
        if self.cond_channels:
            if cond is None or cond.dim() != 2 or cond.shape != (z.shape[0], self.cond_channels):
                got = None if cond is None else list(cond.shape)
                raise ValueError(f"GraphUNet.decode: expected cond [{z.shape[0]}, {self.cond_channels}] "
                                 f"(the expression), got {got}")
            if self.bottleneck == "per_vertex":
                cond = cond[:, None].expand(-1, z.shape[1], -1)
            z = torch.cat([z, cond], dim=-1)
        g = F.elu(self.dec_lin(z))
        if self.bottleneck == "global":
            g = g.reshape(z.shape[0], self.num_coarse, self.filters[-1])
        for l in reversed(range(self.num_steps)):
            g = sparse_apply(self.ups[l], g)
            if self.skip:
                g = torch.cat([g, skips[l]], dim=-1)
            g = F.elu(self._conv(self.dec[l], g, l))
        return self._conv(self.head, g, 0)

    def forward(
        self,
        x: Tensor,  # [B, V, in_channels]
        cond: Tensor | None = None,  # [B, cond_channels]
    ) -> dict[str, Tensor]:
        """Run the U-Net. Returns ``{"out": [B, V, out_channels], "bottleneck": z}``."""
        z, skips = self.encode(x)
        return {"out": self.decode(z, skips, cond), "bottleneck": z}


class _MeshHead(nn.Module):
    """Shared input handling of the two heads: positions and normals, normalised, encoded."""

    def __init__(self, hierarchy: MeshHierarchy, out_channels: int, expression_dim: int,
                 num_freqs: int, unet_kwargs: dict) -> None:
        super().__init__()
        self.num_freqs = num_freqs
        self.expression_dim = expression_dim
        self.num_vertices = hierarchy.num_vertices[0]
        template = hierarchy.vertices[0]
        center = template.mean(dim=0)
        radius = (template - center).norm(dim=-1).max().clamp_min(1e-8)
        # Inputs are expressed relative to the template's centre and size so the network sees
        # O(1) values whatever the data's units (FLAME metres, synthetic units).
        self.register_buffer("center", center, persistent=False)
        self.register_buffer("radius", radius, persistent=False)
        self.register_buffer("faces", hierarchy.faces[0].clone(), persistent=False)
        self.mean_edge_length = hierarchy.mean_edge_length(0)
        in_channels = positional_encoding_dim(6, num_freqs)
        self.unet = GraphUNet(hierarchy, in_channels, out_channels, cond_channels=expression_dim,
                              **unet_kwargs)

    def reset_parameters(self) -> None:
        """Re-initialise the U-Net (heads have no other parameters)."""
        self.unet.reset_parameters()

    def encode(
        self,
        vertices: Tensor,  # [B, V, 3] tracked mesh
        normals: Tensor | None = None,  # [B, V, 3], computed from the faces if None
    ) -> tuple[Tensor, list[Tensor]]:
        """Encoder half: ``(bottleneck, skips)``; ``bottleneck`` is ``[B, latent]`` (global z) or
        ``[B, V_L, latent]`` (``bottleneck="per_vertex"``).

        Split from :meth:`decode` so the model can refine the expression with GGO (which reads
        the bottlenecks of both U-Nets) before decoding with it.
        """
        if vertices.dim() != 3 or vertices.shape[1:] != (self.num_vertices, 3):
            raise ValueError(f"{type(self).__name__}: expected vertices [B, {self.num_vertices}, 3] "
                             f"(the template's vertex count), got {list(vertices.shape)}")
        if normals is None:
            normals = vertex_normals(vertices, self.faces)
        x = torch.cat([(vertices - self.center) / self.radius, normals], dim=-1)
        if self.num_freqs:
            x = positional_encoding(x, self.num_freqs)
        return self.unet.encode(x)

    def decode_raw(
        self,
        bottleneck: Tensor,  # [B, latent] or [B, V_L, latent]
        skips: list[Tensor],  # from encode
        expressions: Tensor | None,  # [B, E]
    ) -> Tensor:
        """Decoder half before the output activations: ``[B, V, out_channels]``."""
        b = bottleneck.shape[0]
        if self.expression_dim and (expressions is None or expressions.shape != (b, self.expression_dim)):
            got = None if expressions is None else list(expressions.shape)
            raise ValueError(f"{type(self).__name__}: expected expressions [{b}, {self.expression_dim}] "
                             f"(model.expression_dim), got {got}")
        return self.unet.decode(bottleneck, skips, expressions if self.expression_dim else None)

    def forward(
        self,
        vertices: Tensor,  # [B, V, 3] tracked mesh
        expressions: Tensor | None = None,  # [B, E]
        normals: Tensor | None = None,  # [B, V, 3], computed from the faces if None
    ) -> dict[str, Tensor]:
        """``decode(*encode(vertices, normals), expressions)``; see the subclasses' ``decode``."""
        bottleneck, skips = self.encode(vertices, normals)
        return self.decode(bottleneck, skips, expressions)


class GeometryHead(_MeshHead):
    """Geometric graph U-Net: per-vertex anchor position offsets, rotations and scales.

    Output activations (10 raw channels, the authors' layout):

    * ``offsets = offset_scale · raw[0:3]``, ``means = vertices + offsets``. ``offset_scale``
      defaults to the template's mean edge length so the network works in edge-length units
      (an optimiser step then moves a vertex by a fraction of an edge, whatever the units).
    * ``quats = normalize(raw[3:7] + (1, 0, 0, 0))`` (wxyz, world frame).
    * ``scales = exp(raw[7:10] + log(scale_init))``; ``scale_init`` defaults to the mean edge
      length, the spacing of the anchors, as 3DGS initialises scales from neighbour distances.

    With the zero-initialised output convolution, at step 0 every anchor sits on its vertex with
    the identity rotation and isotropic scale ``scale_init``.

    Args:
        hierarchy: template hierarchy.
        expression_dim: size of the expression vector concatenated to ``z`` (0: none).
        num_freqs: positional-encoding frequencies applied to (normalised position, normal);
            0 feeds the 6 raw values (the paper); the authors' code used 30.
        offset_scale, scale_init: see above (``None``: the template's mean edge length).
        **unet_kwargs: :class:`GraphUNet` options (``filters``, ``K``, ``latent``,
            ``bottleneck``, ``skip``).
    """

    out_channels = 10

    def __init__(self, hierarchy: MeshHierarchy, expression_dim: int = 0, num_freqs: int = 0,
                 offset_scale: float | None = None, scale_init: float | None = None,
                 **unet_kwargs) -> None:
        super().__init__(hierarchy, self.out_channels, expression_dim, num_freqs, unet_kwargs)
        self.offset_scale = float(offset_scale if offset_scale is not None else self.mean_edge_length)
        self.scale_init = float(scale_init if scale_init is not None else self.mean_edge_length)
        if self.offset_scale <= 0 or self.scale_init <= 0:
            raise ValueError(f"GeometryHead: offset_scale and scale_init must be > 0, got "
                             f"{self.offset_scale}, {self.scale_init}")

    def decode(
        self,
        bottleneck: Tensor,  # [B, latent] or [B, V_L, latent]
        skips: list[Tensor],  # from encode
        expressions: Tensor | None = None,  # [B, E]
    ) -> dict[str, Tensor]:
        """Anchor geometry relative to the mesh: ``offsets, scales [B, V, 3]``,
        ``quats [B, V, 4]``, ``bottleneck``. Anchor positions are ``vertices + offsets``."""
        raw = self.decode_raw(bottleneck, skips, expressions)
        offsets = self.offset_scale * raw[..., 0:3]
        identity = raw.new_tensor([1.0, 0.0, 0.0, 0.0])
        quats = F.normalize(raw[..., 3:7] + identity, dim=-1)
        scales = torch.exp(raw[..., 7:10] + math.log(self.scale_init))
        return {"offsets": offsets, "quats": quats, "scales": scales, "bottleneck": bottleneck}

    def forward(
        self,
        vertices: Tensor,  # [B, V, 3] tracked mesh
        expressions: Tensor | None = None,  # [B, E]
        normals: Tensor | None = None,  # [B, V, 3], computed from the faces if None
    ) -> dict[str, Tensor]:
        """Anchor geometry: ``decode``'s outputs plus ``means = vertices + offsets [B, V, 3]``."""
        out = super().forward(vertices, expressions, normals)
        out["means"] = vertices + out["offsets"]
        return out


class AppearanceHead(_MeshHead):
    """Appearance graph U-Net: per-vertex SH colour coefficients and opacities.

    * ``sh_coeffs [B, V, (d+1)^2, 3] = raw[0 : 3(d+1)^2]`` in gsplat's convention (the
      renderer evaluates ``eval_sh + 0.5``), so zero coefficients are mid grey.
    * ``opacities [B, V] = sigmoid(raw[-1] + logit(opacity_init))``; ``opacity_init = 0.1``
      as in 3DGS: translucent enough that every anchor receives gradient at the start.

    Args:
        hierarchy: template hierarchy.
        sh_degree: 0..3 (3DGS and the paper use 3).
        expression_dim, num_freqs, **unet_kwargs: as :class:`GeometryHead`.
        opacity_init: opacity of every anchor at step 0, in (0, 1).
    """

    def __init__(self, hierarchy: MeshHierarchy, sh_degree: int = 3, expression_dim: int = 0,
                 num_freqs: int = 0, opacity_init: float = 0.1, **unet_kwargs) -> None:
        if not 0.0 < opacity_init < 1.0:
            raise ValueError(f"AppearanceHead: opacity_init must be in (0, 1), got {opacity_init}")
        self.sh_degree = sh_degree
        self.num_bases = num_sh_bases(sh_degree)
        super().__init__(hierarchy, 3 * self.num_bases + 1, expression_dim, num_freqs, unet_kwargs)
        self.opacity_logit = math.log(opacity_init / (1.0 - opacity_init))

    def decode(
        self,
        bottleneck: Tensor,  # [B, latent] or [B, V_L, latent]
        skips: list[Tensor],  # from encode
        expressions: Tensor | None = None,  # [B, E]
    ) -> dict[str, Tensor]:
        """Anchor appearance: ``sh_coeffs [B, V, K, 3]``, ``opacities [B, V]``, ``bottleneck``."""
        raw = self.decode_raw(bottleneck, skips, expressions)
        sh = raw[..., : 3 * self.num_bases].reshape(*raw.shape[:2], self.num_bases, 3)
        opacities = torch.sigmoid(raw[..., -1] + self.opacity_logit)
        return {"sh_coeffs": sh, "opacities": opacities, "bottleneck": bottleneck}
