"""Chebyshev graph U-Nets: batching, reference Chebyshev filter, heads' init, gradients, size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_geometric.nn import ChebConv

from graphavatar.graph_unet import (AppearanceHead, GeometryHead, GraphUNet, SparseMatrix, cheb_filter,
                                    scaled_laplacian, sparse_apply)
from graphavatar.sampling import build_mesh_hierarchy
from headkit.mesh import icosphere
from tests.graph_unet_reference import old_cheb_filter, old_sparse_apply, to_coo


@pytest.fixture(scope="module")
def hierarchy():
    v, f = icosphere(2)  # 162 vertices -> ~41 -> ~11
    return build_mesh_hierarchy(v, f, factors=(4, 4))


def perturb_(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Give every parameter random non-zero values (zero-initialised layers hide gradients)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def dense_chebyshev(x, edge_index, weights, bias):  # [B, V, C], [2, E], [K, Cin, Cout], [Cout]
    """Independent reference: sum_k T_k(L~) x W_k with L~ = -D^{-1/2} A D^{-1/2} as a dense matrix."""
    V = x.shape[1]
    A = torch.zeros(V, V, dtype=torch.float64)
    A[edge_index[0], edge_index[1]] = 1.0
    d = A.sum(1)
    dinv = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))
    L = -(dinv[:, None] * A * dinv[None, :])
    x = x.double()
    T = [x, L @ x]
    for _ in range(2, weights.shape[0]):
        T.append(2 * (L @ T[-1]) - T[-2])
    return sum(t @ w.double() for t, w in zip(T, weights)) + bias.double()


@pytest.mark.parametrize("K", [1, 2, 4])
def test_cheb_filter_matches_chebconv_per_frame_and_a_dense_reference(hierarchy, K):
    torch.manual_seed(0)
    conv = ChebConv(5, 7, K=K)
    V = hierarchy.num_vertices[0] + 1  # plus an isolated vertex (no edges), like iris landmarks
    ei = hierarchy.edge_indices[0]
    x = torch.randn(3, V, 5)
    lap = scaled_laplacian(ei, V)
    batched = cheb_filter(conv, x, lap)  # all frames in one sparse recursion
    per_frame = torch.stack([conv(x[b], ei) for b in range(3)])  # PyG, one frame at a time
    torch.testing.assert_close(batched, per_frame, atol=1e-5, rtol=0)
    torch.testing.assert_close(conv(x, ei), per_frame, atol=1e-5, rtol=0)  # PyG on [B, V, C]
    weights = torch.stack([lin.weight.t() for lin in conv.lins])  # [K, Cin, Cout]
    ref = dense_chebyshev(x, ei, weights, conv.bias)
    torch.testing.assert_close(batched.double(), ref, atol=1e-5, rtol=0)


def test_sparse_apply_matches_dense(hierarchy):
    x = torch.randn(2, hierarchy.num_vertices[1], 4)
    up = hierarchy.ups[0]
    torch.testing.assert_close(sparse_apply(up, x), up.to_dense() @ x)


@pytest.mark.parametrize("bottleneck,skip", [("global", True), ("per_vertex", False)])
def test_unet_shapes_batching_and_permutation(hierarchy, bottleneck, skip):
    torch.manual_seed(0)
    net = GraphUNet(hierarchy, in_channels=6, out_channels=5, filters=(8, 12), K=3, latent=4,
                    cond_channels=3, bottleneck=bottleneck, skip=skip, head_init="default")
    V = hierarchy.num_vertices[0]
    x, cond = torch.randn(3, V, 6), torch.randn(3, 3)
    out = net(x, cond)
    assert out["out"].shape == (3, V, 5)
    zshape = (3, 4) if bottleneck == "global" else (3, hierarchy.num_vertices[2], 4)
    assert out["bottleneck"].shape == zshape
    one = net(x[1:2], cond[1:2])
    assert one["out"].shape == (1, V, 5)
    torch.testing.assert_close(one["out"][0], out["out"][1], atol=1e-5, rtol=0)
    perm = torch.tensor([2, 0, 1])
    permuted = net(x[perm], cond[perm])
    torch.testing.assert_close(permuted["out"], out["out"][perm], atol=1e-5, rtol=0)
    # The condition (expression) reaches the output.
    assert not torch.allclose(net(x, cond + 1.0)["out"], out["out"])


def test_gradients_reach_every_parameter(hierarchy):
    torch.manual_seed(0)
    net = GraphUNet(hierarchy, 6, 4, filters=(8, 8), K=3, latent=4, cond_channels=2)
    x, cond = torch.randn(2, hierarchy.num_vertices[0], 6), torch.randn(2, 2)
    (net(x, cond)["out"] - 1.0).square().sum().backward()
    # Zero-initialised head: outputs are 0, only the head gets gradient at step 0.
    for name, p in net.named_parameters():
        nonzero = p.grad is not None and p.grad.abs().sum() > 0
        assert nonzero == name.startswith("head."), name
    perturb_(net)
    net.zero_grad()
    (net(x, cond)["out"] - 1.0).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_heads_initial_values_and_shapes(hierarchy):
    V = hierarchy.num_vertices[0]
    verts = hierarchy.vertices[0][None].repeat(3, 1, 1) + 0.01 * torch.randn(3, V, 3)
    expr = torch.randn(3, 5)
    geo = GeometryHead(hierarchy, expression_dim=5, num_freqs=2, filters=(8, 8), K=3)
    out = geo(verts, expr)
    edge = hierarchy.mean_edge_length(0)
    assert out["means"].shape == out["offsets"].shape == out["scales"].shape == (3, V, 3)
    assert torch.equal(out["means"], verts) and not out["offsets"].any()
    torch.testing.assert_close(out["quats"], torch.tensor([1.0, 0, 0, 0]).expand(3, V, 4))
    torch.testing.assert_close(out["scales"], torch.full((3, V, 3), edge))
    assert out["bottleneck"].shape == (3, 8)

    app = AppearanceHead(hierarchy, sh_degree=2, expression_dim=5, opacity_init=0.3, filters=(8, 8), K=3)
    a = app(verts, expr)
    assert a["sh_coeffs"].shape == (3, V, 9, 3) and not a["sh_coeffs"].any()
    torch.testing.assert_close(a["opacities"], torch.full((3, V), 0.3))

    # Once trained (here: perturbed) the activations hold: unit quaternions, positive scales,
    # opacities in (0, 1), offsets scaled by the edge length.
    perturb_(geo)
    perturb_(app)
    out, a = geo(verts, expr), app(verts, expr)
    torch.testing.assert_close(out["quats"].norm(dim=-1), torch.ones(3, V))
    assert (out["scales"] > 0).all() and ((a["opacities"] > 0) & (a["opacities"] < 1)).all()
    raw = geo.unet(geo_inputs(geo, verts), expr)["out"]
    torch.testing.assert_close(out["offsets"], edge * raw[..., :3])
    torch.testing.assert_close(out["scales"], torch.exp(raw[..., 7:10]) * edge)


def test_encode_then_decode_equals_forward(hierarchy):
    """The split the model uses: encode both U-Nets, refine the expression (GGO), decode."""
    torch.manual_seed(0)
    V = hierarchy.num_vertices[0]
    verts, expr = hierarchy.vertices[0][None].repeat(2, 1, 1), torch.randn(2, 4)
    for head in (GeometryHead(hierarchy, expression_dim=4, filters=(8, 8), K=3),
                 AppearanceHead(hierarchy, sh_degree=1, expression_dim=4, filters=(8, 8), K=3)):
        perturb_(head)
        full = head(verts, expr)
        z, skips = head.encode(verts)
        split = head.decode(z, skips, expr)
        for key in split:
            torch.testing.assert_close(split[key], full[key])
        refined = head.decode(z, skips, expr + 0.5)
        key = "offsets" if "offsets" in split else "sh_coeffs"
        assert refined[key].shape[:2] == (2, V) and not torch.allclose(refined[key], split[key])


def geo_inputs(head, verts):
    """The documented input features: normalised positions and normals, positionally encoded."""
    from headkit.encodings import positional_encoding
    from headkit.mesh import vertex_normals

    x = torch.cat([(verts - head.center) / head.radius, vertex_normals(verts, head.faces)], -1)
    return positional_encoding(x, head.num_freqs)


def test_heads_reject_wrong_inputs(hierarchy):
    geo = GeometryHead(hierarchy, expression_dim=5, filters=(8, 8), K=2)
    V = hierarchy.num_vertices[0]
    with pytest.raises(ValueError, match="template's vertex count"):
        geo(torch.zeros(1, V + 1, 3), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="expression_dim"):
        geo(torch.zeros(1, V, 3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="levels"):
        GraphUNet(hierarchy, 6, 3, filters=(8, 8, 8))


def expected_unet_params(cin, cout, f0, f1, K, latent, E, Vc):
    """Hand count for filters (f0, f1), global bottleneck, skips."""
    cheb = lambda i, o: K * i * o + o  # noqa: E731  (K weight matrices, one bias)
    return (cheb(cin, f0) + cheb(f0, f1) + (Vc * f1 * latent + latent)
            + ((latent + E) * Vc * f1 + Vc * f1) + cheb(2 * f1, f1) + cheb(f1 + f0, f0)
            + cheb(f0, cout))


def test_insta_settings_on_a_5023_vertex_mesh_fit_the_size_budget():
    import fast_simplification

    v, f = icosphere(5)
    pts, faces = fast_simplification.simplify(v.numpy().astype(np.float64), f.numpy().astype(np.int32),
                                              target_count=10042)
    assert pts.shape[0] == 5023
    h = build_mesh_hierarchy(pts, faces, factors=(4, 8))
    Vc = h.num_vertices[2]
    assert abs(Vc - 5023 / 32) < 10
    kw = dict(expression_dim=100, filters=(16, 16), K=6, latent=8)
    geo, app = GeometryHead(h, **kw), AppearanceHead(h, sh_degree=3, **kw)
    n_geo = sum(p.numel() for p in geo.parameters())
    n_app = sum(p.numel() for p in app.parameters())
    assert n_geo == expected_unet_params(6, 10, 16, 16, 6, 8, 100, Vc)
    assert n_app == expected_unet_params(6, 49, 16, 16, 6, 8, 100, Vc)
    # Both U-Nets together stay far below the paper's 10.8 MB for the whole avatar.
    size_mb = 4 * (n_geo + n_app) / 2**20
    assert size_mb < 3.0
    # Nothing template-derived (D, U, edges) is stored in the state dict.
    assert all(not t.is_sparse for t in geo.state_dict().values())
    assert math.isclose(sum(t.numel() for t in geo.state_dict().values()), n_geo)


# ----------------------------------------------- the COO formulation before issue #15 (reference)
def grads_of(fn, tensors, seed=0):
    """Output of ``fn()`` and the gradients of ``<out, r>`` (r random) w.r.t. ``tensors``."""
    out = fn()
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out, torch.autograd.grad((out * r).sum(), tensors)


# Compared in float64: the same sums in another order (CSR vs COO, one GEMM vs einsum) differ by
# rounding only, ~1e-16 relative, where a wrong term would show at O(1).
CLOSE = dict(atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("K,B", [(1, 2), (3, 1), (3, 3), (6, 2)])
def test_cheb_filter_matches_the_old_coo_einsum_formulation(hierarchy, K, B):
    torch.manual_seed(0)
    conv = ChebConv(5, 7, K=K).double()
    V = hierarchy.num_vertices[0]
    lap = scaled_laplacian(hierarchy.edge_indices[0], V).double()
    x = torch.randn(B, V, 5, dtype=torch.float64, requires_grad=True)
    params = [x] + list(conv.parameters())
    new, g_new = grads_of(lambda: cheb_filter(conv, x, SparseMatrix(lap)), params)
    old, g_old = grads_of(lambda: old_cheb_filter(conv, x, lap), params)
    torch.testing.assert_close(new, old, **CLOSE)
    for a, b in zip(g_new, g_old):
        torch.testing.assert_close(a, b, **CLOSE)
    torch.testing.assert_close(cheb_filter(conv, x, lap), old, **CLOSE)  # a plain sparse tensor works too


@pytest.mark.parametrize("which", ["downs", "ups"])
def test_sparse_matrix_forward_and_backward_match_coo(hierarchy, which):
    """Non-symmetric D and U: the backward must use ``A^T``."""
    coo = getattr(hierarchy, which)[0].coalesce().double()
    x = torch.randn(2, coo.shape[1], 4, dtype=torch.float64, requires_grad=True)
    new, (g_new,) = grads_of(lambda: sparse_apply(SparseMatrix(coo), x), [x])
    old, (g_old,) = grads_of(lambda: old_sparse_apply(coo, x), [x])
    torch.testing.assert_close(new, old, **CLOSE)
    torch.testing.assert_close(g_new, g_old, **CLOSE)
    r = torch.randn(new.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(g_new, torch.einsum("mn,bmc->bnc", coo.to_dense(), r), **CLOSE)


def test_unet_matches_the_old_path_outputs_and_every_gradient(hierarchy, monkeypatch):
    import graphavatar.graph_unet as gu

    torch.manual_seed(0)
    head = AppearanceHead(hierarchy, sh_degree=1, expression_dim=4, filters=(8, 8), K=3)
    perturb_(head)
    head.double()
    verts = hierarchy.vertices[0][None].repeat(2, 1, 1) + 0.01 * torch.randn(2, hierarchy.num_vertices[0], 3)
    verts = verts.double()
    expr = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    params = [expr] + list(head.parameters())
    run = lambda: head(verts, expr)["sh_coeffs"]  # noqa: E731
    new, g_new = grads_of(run, params)
    monkeypatch.setattr(gu, "cheb_filter", lambda conv, x, lap: old_cheb_filter(conv, x, to_coo(lap)))
    monkeypatch.setattr(gu, "sparse_apply", lambda m, x: old_sparse_apply(to_coo(m), x))
    old, g_old = grads_of(run, params)
    torch.testing.assert_close(new, old, **CLOSE)
    for p, a, b in zip(["expression"] + [n for n, _ in head.named_parameters()], g_new, g_old):
        assert a.abs().sum() > 0, p
        torch.testing.assert_close(a, b, **CLOSE, msg=p)


def test_sparse_matrix_moves_copies_and_stays_out_of_the_state_dict(hierarchy):
    import copy

    net = GraphUNet(hierarchy, 6, 3, filters=(8, 8), K=3)
    x = torch.randn(1, hierarchy.num_vertices[0], 6)
    out = net(x)["out"]
    twin = copy.deepcopy(net).double()
    assert twin.laplacians[0].csr().dtype == torch.float64
    torch.testing.assert_close(twin(x.double(), None)["out"].float(), out)
    assert not any("laplacians" in k or "downs" in k or "ups" in k for k in net.state_dict())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_heads_on_cuda_match_the_cpu_outputs_and_gradients(hierarchy):
    """The CSR products (int32 indices, cuSPARSE on CUDA) give the CPU's outputs and gradients."""
    torch.manual_seed(0)
    head = GeometryHead(hierarchy, expression_dim=4, filters=(8, 8), K=3)
    perturb_(head)
    head.double()
    verts = (hierarchy.vertices[0][None].repeat(2, 1, 1) + 0.01 * torch.randn(2, hierarchy.num_vertices[0], 3)).double()
    expr = torch.randn(2, 4, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        h = head.to(device)
        e = expr.to(device).requires_grad_(True)
        out = h(verts.to(device), e)
        loss = sum((v.double() ** 2).sum() for v in out.values() if torch.is_tensor(v) and v.is_floating_point())
        grads = torch.autograd.grad(loss, [e] + list(h.parameters()))
        results.append(([v.cpu() for v in out.values() if torch.is_tensor(v)], [g.cpu() for g in grads]))
    (out_cpu, g_cpu), (out_gpu, g_gpu) = results
    for a, b in zip(out_cpu + g_cpu, out_gpu + g_gpu):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)
