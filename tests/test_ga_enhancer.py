"""3D-aware enhancer: identity start, odd sizes, depth FiLM, gradients."""

from __future__ import annotations

import pytest
import torch

from graphavatar.enhancer import DepthEnhancer, DepthFiLM


def perturb_(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def inputs(b: int, h: int, w: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, 3, generator=gen), 2.0 + torch.rand(b, h, w, 1, generator=gen)


@pytest.mark.parametrize("size", [(13, 17), (16, 16), (9, 4)])
def test_identity_at_init_and_shapes_for_odd_sizes(size):
    torch.manual_seed(0)
    enh = DepthEnhancer(channels=(4, 8, 8), film_hidden=4, depth_offset=2.0, depth_scale=0.5)
    images, depths = inputs(2, *size)
    out = enh(images, depths)
    assert out.shape == images.shape
    assert torch.equal(out, images)
    perturb_(enh)
    out = enh(images, depths)
    assert out.shape == images.shape and not torch.allclose(out, images)


def test_film_layer_hand_values():
    film = DepthFiLM(channels=2, hidden=0)  # a single 1x1 conv: γ, β affine in depth
    with torch.no_grad():
        film.net[0].weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]).view(4, 1, 1, 1))
        film.net[0].bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.25]))
    feats = torch.tensor([[[[2.0]], [[-1.0]]]])  # [1, 2, 1, 1]
    depth = torch.full((1, 1, 2, 2), 0.5)  # resized (averaged) to 1x1
    out = film(feats, depth)
    gamma = torch.tensor([1.0 * 0.5 + 0.0, -2.0 * 0.5 + 1.0])
    beta = torch.tensor([0.5 * 0.5 - 1.0, 3.0 * 0.5 + 0.25])
    expect = (1 + gamma) * torch.tensor([2.0, -1.0]) + beta
    torch.testing.assert_close(out.flatten(), expect)
    assert torch.equal(DepthFiLM(2)(feats, depth), feats)  # a fresh layer is the identity


def test_every_block_is_modulated_by_depth():
    torch.manual_seed(0)
    enh = DepthEnhancer(channels=(4, 8, 8), film_hidden=4)
    perturb_(enh)
    images, depths = inputs(1, 12, 12)
    base = enh(images, depths)
    assert not torch.allclose(base, enh(images, depths + 0.5))
    films = [m for m in enh.modules() if isinstance(m, DepthFiLM)]
    assert len(films) == 2 * len(enh.channels) - 1  # encoder and decoder blocks
    for film in films:  # each FiLM changes the result: none is bypassed
        saved = [p.detach().clone() for p in film.parameters()]
        film.reset_parameters()
        assert not torch.allclose(enh(images, depths), base)
        with torch.no_grad():
            for p, s in zip(film.parameters(), saved):
                p.copy_(s)


def test_gradients_reach_parameters_and_depth():
    torch.manual_seed(0)
    enh = DepthEnhancer(channels=(4, 8), film_hidden=4)
    images, depths = inputs(2, 10, 11)
    depths.requires_grad_(True)
    (enh(images, depths) - 0.5).square().sum().backward()
    # Zero output conv: only it learns at step 0.
    for name, p in enh.named_parameters():
        assert (p.grad.abs().sum() > 0) == name.startswith("out."), name
    perturb_(enh)
    enh.zero_grad()
    (enh(images, depths) - 0.5).square().sum().backward()
    for name, p in enh.named_parameters():
        assert p.grad.abs().sum() > 0, name
    assert depths.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    enh = DepthEnhancer(channels=(4, 8))
    images, depths = inputs(1, 8, 8)
    with pytest.raises(ValueError, match="depths"):
        enh(images, depths[:, :4])
    with pytest.raises(ValueError, match="images"):
        enh(images.permute(0, 3, 1, 2), depths)


@pytest.mark.parametrize("size", [(32, 32), (13, 17)])
def test_dense_upsampling_gradient_is_bit_identical(monkeypatch, size):
    """``dense_grad`` (issue #15) only copies the gradient the skip concatenation hands to the
    upsampling: outputs and every gradient equal the plain formulation bit for bit."""
    import graphavatar.enhancer as enhancer

    torch.manual_seed(0)
    enh = DepthEnhancer(channels=(4, 8, 16), film_hidden=4, depth_offset=2.0, depth_scale=0.5)
    perturb_(enh)
    images, depths = inputs(2, *size)
    r = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))

    def run():
        x, d = images.clone().requires_grad_(True), depths.clone().requires_grad_(True)
        out = enh(x, d)
        grads = torch.autograd.grad((out * r).sum(), [x, d, *enh.parameters()])
        return [out, *grads]

    new = run()
    monkeypatch.setattr(enhancer, "dense_grad", lambda x: x)  # the formulation before issue #15
    old = run()
    for a, b in zip(new, old):
        assert torch.equal(a, b)


def test_dense_grad_copies_a_strided_gradient_into_the_tensors_format():
    from graphavatar.enhancer import dense_grad

    seen = []

    class Probe(torch.autograd.Function):  # records the layout of the gradient that reaches it
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            seen.append(g.is_contiguous(memory_format=torch.channels_last))
            return g

    x = torch.randn(1, 4, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(1, 7, 5, 6).contiguous(memory_format=torch.channels_last)
    for wrap in (lambda t: t, dense_grad):
        big = torch.cat([wrap(Probe.apply(x)), torch.zeros(1, 3, 5, 6)], dim=1)
        (gx,) = torch.autograd.grad(big, [x], grad)
        assert torch.equal(gx, grad[:, :4])  # the value passes unchanged
    assert seen == [False, True]  # the cat's channel slice is not dense; dense_grad makes it so


def test_bf16_precision_follows_fp32_within_bfloat16_rounding():
    torch.manual_seed(0)
    fp32 = DepthEnhancer(channels=(8, 16, 16), film_hidden=4, depth_offset=2.0, depth_scale=0.5)
    perturb_(fp32, std=0.05)
    bf16 = DepthEnhancer(channels=(8, 16, 16), film_hidden=4, depth_offset=2.0, depth_scale=0.5, precision="bf16")
    bf16.load_state_dict(fp32.state_dict())
    images, depths = inputs(1, 24, 20)
    outs, grads = [], []
    for enh in (fp32, bf16):
        x = images.clone().requires_grad_(True)
        out = enh(x, depths)
        out.square().sum().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in enh.parameters()]))
    assert outs[1].dtype == torch.float32 and bf16.out.weight.dtype == torch.float32
    correction = [o - images for o in outs]
    assert not torch.equal(correction[0], correction[1])  # it really ran in bfloat16
    scale = correction[0].abs().max()
    assert (correction[1] - correction[0]).abs().max() < 0.02 * scale  # bfloat16: 8 mantissa bits
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.999
    with pytest.raises(ValueError, match="precision"):
        DepthEnhancer(channels=(4, 8), precision="fp16")


@pytest.mark.parametrize("flags, native", [({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True),
                                           ({"avx2", "avx512f"}, False), (set(), False)])
def test_auto_precision_uses_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, request, flags, native):
    import headkit.engine.guards as guards
    monkeypatch.setattr(guards, "_cpu_flags", lambda: frozenset(flags))
    guards.fast_bfloat16.cache_clear()  # the answer is cached per device
    request.addfinalizer(guards.fast_bfloat16.cache_clear)
    assert guards.fast_bfloat16("cpu") is native
    torch.manual_seed(0)
    auto = DepthEnhancer(channels=(8, 16), film_hidden=4, precision="auto")
    perturb_(auto, std=0.05)
    exact = DepthEnhancer(channels=(8, 16), film_hidden=4)
    exact.load_state_dict(auto.state_dict())
    images, depths = inputs(1, 12, 12)
    assert torch.equal(auto(images, depths), exact(images, depths)) is not native
