"""Neural caching modules: texture, DNR/DNR+/DNR++ generators, cache + implicit/explicit warp."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from headkit.encodings import sh_basis
from neuralcache.generators import DNR, DNRPlus, DNRPlusPlus, GaussianLowPass, UNetGenerator
from neuralcache.texture import NeuralTexture, check_uv_maps, texture_l1
from neuralcache.warp import Cache, ExplicitWarp, FrameParams, ImplicitWarp, count_flops, pose_sh


pytestmark = pytest.mark.usefixtures("one_intraop_thread")



def _bilinear_border(img: np.ndarray, u: float, v: float) -> np.ndarray:
    """Independent bilinear lookup of a [C, r, r] texture at OBJ-style (u, v), border clamp."""
    r = img.shape[-1]
    x = min(max(u * r - 0.5, 0.0), r - 1.0)
    y = min(max((1.0 - v) * r - 0.5, 0.0), r - 1.0)
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1 = min(x0 + 1, r - 1), min(y0 + 1, r - 1)
    ax, ay = x - x0, y - y0
    return ((1 - ax) * (1 - ay) * img[:, y0, x0] + ax * (1 - ay) * img[:, y0, x1]
            + (1 - ax) * ay * img[:, y1, x0] + ax * ay * img[:, y1, x1])


# ---------------------------------------------------------------- texture
def test_texture_sampling_matches_independent_bilinear_sum_over_levels():
    torch.manual_seed(0)
    tex = NeuralTexture(num_channels=4, resolution=16, num_levels=4, view_sh=False)
    assert [tuple(l.shape[-2:]) for l in tex.levels] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    uvs = torch.rand(2, 3, 5, 2)
    uvs[0, 0, 0] = torch.tensor([0.0, 1.0])  # corners exercise the border clamp
    uvs[0, 0, 1] = torch.tensor([1.0, 0.0])
    got = tex(uvs, torch.ones(2, 3, 5)).detach().numpy()  # [B, D, H, W]
    levels = [l.detach().numpy()[0] for l in tex.levels]
    for b in range(2):
        for i in range(3):
            for j in range(5):
                u, v = uvs[b, i, j].tolist()
                ref = sum(_bilinear_border(lv, u, v) for lv in levels)
                np.testing.assert_allclose(got[b, :, i, j], ref, atol=1e-5)


def test_texture_v_axis_points_up_and_background_is_zero():
    tex = NeuralTexture(num_channels=3, resolution=8, num_levels=1, view_sh=False)
    with torch.no_grad():
        tex.levels[0].zero_()
        tex.levels[0][0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])  # texture row 0 = top = v ~ 1
    uvs = torch.tensor([[[[0.5 / 8, 1 - 0.5 / 8], [0.5 / 8, 0.5 / 8]]]])  # [1, 1, 2, 2]
    out = tex(uvs, torch.ones(1, 1, 2))
    assert out[0, :, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert out[0, :, 0, 1].abs().max() == 0
    out = tex(uvs, torch.tensor([[[True, False]]]))
    assert out[0, :, 0, 0].tolist() == [1.0, 2.0, 3.0]
    torch.manual_seed(1)
    tex2 = NeuralTexture(num_channels=16, resolution=8, num_levels=2)
    masks = torch.rand(2, 4, 4) > 0.5
    feats = tex2(torch.rand(2, 4, 4, 2), masks, torch.randn(2, 3))
    assert feats.permute(0, 2, 3, 1)[~masks].abs().max() == 0


def test_texture_sh_multiplies_channels_3_to_11_only():
    torch.manual_seed(2)
    plain = NeuralTexture(num_channels=16, resolution=8, num_levels=2, view_sh=False)
    tex = NeuralTexture(num_channels=16, resolution=8, num_levels=2)
    tex.load_state_dict(plain.state_dict())
    uvs, masks = torch.rand(2, 4, 4, 2), torch.ones(2, 4, 4)
    base = plain(uvs, masks)
    # Looking along +z: only Y_0 = 0.2820948, Y_2 = 0.4886025 z and Y_6 = 0.3153916 (2z^2) remain.
    dirs = torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    out = tex(uvs, masks, dirs)
    scale = torch.ones(2, 16)
    scale[0, 3:12] = torch.tensor([0.28209479, 0, 0.48860251, 0, 0, 0, 0.63078313, 0, 0])
    scale[1, 3:12] = sh_basis(dirs[1], 2)
    torch.testing.assert_close(out, base * scale[:, :, None, None], atol=1e-6, rtol=1e-5)
    per_pixel = tex(uvs, masks, dirs[:, None, None, :].expand(2, 4, 4, 3))
    torch.testing.assert_close(per_pixel, out)


def test_texture_gradients_reach_every_level():
    tex = NeuralTexture(num_channels=16, resolution=16, num_levels=4)
    tex(torch.rand(1, 8, 8, 2), torch.ones(1, 8, 8), torch.randn(1, 3)).square().sum().backward()
    assert all(l.grad is not None and l.grad.abs().sum() > 0 for l in tex.levels)


def test_texture_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        NeuralTexture(resolution=12, num_levels=4)
    with pytest.raises(ValueError, match="do not fit"):
        NeuralTexture(num_channels=8)
    tex = NeuralTexture(num_channels=16, resolution=8, num_levels=2)
    with pytest.raises(ValueError, match="view_dirs is required"):
        tex(torch.rand(1, 4, 4, 2), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="masks must be"):
        tex(torch.rand(1, 4, 4, 2), torch.ones(1, 4, 5), torch.randn(1, 3))
    with pytest.raises(ValueError, match="view_dirs must be"):
        tex(torch.rand(1, 4, 4, 2), torch.ones(1, 4, 4), torch.randn(2, 3))
    uvs, masks = torch.rand(2, 4, 4, 2), torch.ones(2, 4, 4)
    check_uv_maps(uvs, masks)
    uvs[1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="frame 1: 1 foreground pixels have NaN"):
        check_uv_maps(uvs, masks, "uv map of test")
    masks[1, 2, 3] = 0  # background values are ignored
    check_uv_maps(uvs, masks)
    uvs[0, 0, 0, 1] = 1.5
    with pytest.raises(ValueError, match=r"frame 0: 1 foreground pixels .* outside \[0, 1\]"):
        check_uv_maps(uvs, masks)


def test_texture_l1_hand_values():
    feats = torch.zeros(1, 5, 1, 2)
    feats[0, :3, 0, 0] = torch.tensor([0.5, 0.5, 0.5])
    images = torch.tensor([[[[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]]])  # [1, 1, 2, 3]
    assert torch.isclose(texture_l1(feats, images), torch.tensor((1.0 / 6) * (0.5 + 0 + 0.5 + 3)))
    assert torch.isclose(texture_l1(feats, images, torch.tensor([[[1.0, 0.0]]])), torch.tensor(1.0 / 3))


# ---------------------------------------------------------------- generators
def test_gaussian_lowpass_matches_scipy():
    x = torch.randn(2, 3, 7, 6)
    for sigma in (0.6, 1.0, 1.7):
        ref = gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=2.0)
        np.testing.assert_allclose(GaussianLowPass(sigma)(x).numpy(), ref, atol=1e-5)
    assert torch.allclose(GaussianLowPass(1.0)(torch.full((1, 2, 2, 2), 3.0)), torch.full((1, 2, 2, 2), 3.0))


@pytest.mark.parametrize("cls", [DNR, DNRPlus])
def test_generator_shapes_and_cached_layers_are_inputs_of_last_two_layers(cls):
    torch.manual_seed(3)
    G = cls(in_channels=16, channels=(8, 16, 16)).eval()
    x = torch.randn(2, 16, 32, 24)
    downs = []
    hooks = [d.register_forward_hook(lambda m, i, o: downs.append(o)) for d in G.downs]
    out = G(x, return_features=True)
    for h in hooks:
        h.remove()
    feats = out["features"]
    assert out["images"].shape == (2, 32, 24, 3)
    assert 0 <= out["images"].min() and out["images"].max() <= 1
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        3: (2, 16, 8, 6), 4: (2, 16, 8, 6), 5: (2, 8, 16, 12)}
    assert G.feature_channels == {3: 16, 4: 16, 5: 8}
    assert torch.equal(feats[4], downs[1]) and torch.equal(feats[5], downs[0])  # the skips
    # The image is a function of the cached layers alone: G's last two up layers reproduce it.
    again = G.ups[-1](torch.cat([G.ups[-2](torch.cat([feats[3], feats[4]], 1)), feats[5]], 1))
    assert torch.equal(again.permute(0, 2, 3, 1), out["images"])
    assert set(G(x).keys()) == {"images"}


def test_dnr_variants_differ_as_specified():
    dnr, plus = DNR(channels=(8, 16, 16)), DNRPlus(channels=(8, 16, 16))
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in dnr.modules())
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in plus.modules())
    assert any(isinstance(m, torch.nn.Upsample) for m in plus.modules())
    assert isinstance(plus.lowpass, GaussianLowPass) and isinstance(dnr.lowpass, torch.nn.Identity)
    no_lpf = DNRPlus(channels=(8, 16, 16), lowpass_sigma=None)
    no_lpf.load_state_dict(plus.state_dict())
    x = torch.randn(1, 16, 32, 32)
    assert not torch.allclose(plus(x)["images"], no_lpf(x)["images"])
    # The low-pass acts on the bottleneck: feeding it a pre-blurred bottleneck is the same thing.
    x = torch.randn(1, 16, 64, 64)
    with torch.no_grad():
        got = plus(x)["images"]
        h = x
        skips = []
        for d in plus.downs:
            h = d(h)
            skips.append(h)
        h = plus.lowpass(skips.pop())
        for j, up in enumerate(plus.ups):
            h = up(h if j == 0 else torch.cat([h, skips.pop()], 1))
    assert torch.equal(h.permute(0, 2, 3, 1), got)


def test_dnr_plus_plus_concatenates_previous_frames():
    torch.manual_seed(4)
    G = DNRPlusPlus(texture_channels=4, num_prev_frames=2, channels=(8, 16, 16))
    assert G.in_channels == 12
    cur, prev = torch.randn(1, 4, 32, 32), torch.randn(1, 8, 32, 32)
    a = G(cur, prev, return_features=True)
    b = UNetGenerator.forward(G, torch.cat([cur, prev], 1), return_features=True)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["features"][3], b["features"][3])
    with pytest.raises(ValueError, match="num_prev_frames\\*D = 8"):
        G(cur, prev[:, :4])


def test_generator_bad_inputs():
    G = DNRPlus(channels=(8, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8, got 20x32"):
        G(torch.randn(1, 16, 20, 32))
    with pytest.raises(ValueError, match=r"expects input \[B, 16, H, W\]"):
        G(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=">= 3 levels"):
        DNRPlus(channels=(8, 16))
    with pytest.raises(ValueError, match="unknown norm"):
        DNRPlus(norm="group")


# ---------------------------------------------------------------- cache and warps
def _params(B=2, H=16, W=16, expr_dim=5, seed=0) -> FrameParams:
    g = torch.Generator().manual_seed(seed)
    return FrameParams(poses=torch.randn(B, 6, generator=g), cam_positions=torch.randn(B, 3, generator=g),
                       expressions=torch.randn(B, expr_dim, generator=g),
                       pose_shs=pose_sh(0.3 * torch.randn(B, 3, generator=g)),
                       uvs=torch.rand(B, H, W, 2, generator=g),
                       masks=(torch.rand(B, H, W, generator=g) > 0.3).float())


def _cache(B=2, H=16, W=16, chans=(16, 16, 12), seed=1) -> Cache:
    g = torch.Generator().manual_seed(seed)
    feats = {3: torch.randn(B, chans[0], H // 4, W // 4, generator=g),
             4: torch.randn(B, chans[1], H // 4, W // 4, generator=g),
             5: torch.randn(B, chans[2], H // 2, W // 2, generator=g)}
    return Cache(feats, _params(B, H, W, seed=seed + 10), torch.rand(B, H, W, 3, generator=g))


def _warp(**kw) -> ImplicitWarp:
    torch.manual_seed(5)
    return ImplicitWarp(feature_channels=(16, 16, 12), expr_dim=5, mlp_dim=6, **kw).eval()


def test_pose_sh_matches_scipy_rotation():
    rotvecs = torch.randn(4, 3, dtype=torch.float64)
    ref = Rotation.from_rotvec(rotvecs.numpy()).apply([0.0, 0.0, 1.0])
    torch.testing.assert_close(pose_sh(rotvecs), sh_basis(torch.from_numpy(ref), 2))
    assert pose_sh(torch.zeros(1, 3))[0, 0].item() == pytest.approx(0.28209479)
    assert pose_sh(torch.zeros(1, 3))[0, 2].item() == pytest.approx(0.48860251)


def test_warp_mlp_input_is_eq2_in_order():
    W = _warp()
    cache, new = _cache(), _params(seed=7)
    seen = []
    W.cond.mlp[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    W(cache, new)
    old = cache.params
    ref = torch.cat([new.cam_positions, new.cam_positions - old.cam_positions, new.poses,
                     new.poses - old.poses, new.expressions, new.expressions - old.expressions,
                     new.pose_shs], dim=1)
    torch.testing.assert_close(seen[0], ref)


def test_warp_w1_input_holds_broadcast_theta_bar_and_area_delta_uv():
    W = _warp()
    zeros, ones = torch.zeros(2), torch.ones(2)
    W.set_input_statistics({"uvs": (zeros, ones, torch.tensor([0.5, 0.25]))})  # ΔU scale (2, 4)
    cache, new = _cache(), _params(seed=8)
    seen = []
    W.w1[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    W(cache, new)
    x = seen[0]  # [B, 16 + 16 + 6 + 3, 8, 8]
    assert x.shape == (2, 41, 8, 8)
    old = cache.params
    m_in = torch.cat([new.cam_positions, new.cam_positions - old.cam_positions, new.poses,
                      new.poses - old.poses, new.expressions, new.expressions - old.expressions,
                      new.pose_shs], 1)
    theta_bar = F.leaky_relu(W.cond.mlp[0](m_in), 0.2)
    torch.testing.assert_close(x[:, 32:38], theta_bar[:, :, None, None].expand(-1, -1, 8, 8))
    both = (new.masks * old.masks)[..., None].numpy()
    duv = (new.uvs - old.uvs).numpy() * both * np.array([2.0, 4.0])  # interior change, scaled
    cover = (new.masks - old.masks)[..., None].numpy()  # coverage change
    d = np.concatenate([duv, cover], axis=-1)
    ref = d.reshape(2, 8, 2, 8, 2, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2)  # 2x2 block means
    np.testing.assert_allclose(x[:, 38:].detach().numpy(), ref, atol=1e-5)


def test_warp_sh_modulation_of_skips():
    cache, new = _cache(), _params(seed=9)
    same_pose = FrameParams(**{**new.__dict__, "pose_shs": cache.params.pose_shs.clone()})  # Δh = 0
    for layer in (4, 5):
        bumped = Cache({**cache.features}, cache.params)
        bumped.features[layer] = cache.features[layer].clone()
        bumped.features[layer][:, :9] += 1.0  # the 9 modulated channels
        W = _warp(use_pose_sh=False)
        with torch.no_grad():
            # Δh = 0 zeroes the modulated channels, so their content cannot matter ...
            assert torch.equal(W(cache, same_pose)["images"], W(bumped, same_pose)["images"])
            # ... unless the pose changed, or modulation is off (plain skips, Table 3 without SH Skips).
            assert not torch.allclose(W(cache, new)["images"], W(bumped, new)["images"])
            plain = _warp(use_pose_sh=False, modulate_skips=False)
            assert not torch.allclose(plain(cache, same_pose)["images"], plain(bumped, same_pose)["images"])
            other = Cache({**cache.features}, cache.params)
            other.features[layer] = cache.features[layer].clone()
            other.features[layer][:, 9:] += 1.0  # unmodulated channels always matter
            assert not torch.allclose(W(cache, same_pose)["images"], W(other, same_pose)["images"])


@pytest.mark.parametrize("flag,field", [("use_camera", "cam_positions"), ("use_pose", "poses"),
                                        ("use_expression", "expressions"), ("use_uv", "uvs")])
def test_warp_ablation_flags_remove_their_input(flag, field):
    cache, new = _cache(), _params(seed=11)
    changed = FrameParams(**{**new.__dict__, field: new.__dict__[field] + 0.25})
    with torch.no_grad():
        on, off = _warp(), _warp(**{flag: False})
        assert not torch.allclose(on(cache, new)["images"], on(cache, changed)["images"])
        assert torch.equal(off(cache, new)["images"], off(cache, changed)["images"])


def test_warp_cached_layers_and_no_mlp():
    cache, new = _cache(), _params(seed=12)
    W = _warp(cached_layers=(3,))
    W(cache.select([3]), new)  # C4 and C5 are not needed
    assert W.w1[0].in_channels == 16 + 6 + 3 and W.w2[1].in_channels == 6
    W = _warp(cached_layers=(3, 4), use_mlp=False)
    assert W.cond.mlp is None and W.w1[0].in_channels == 16 + 16 + (2 * 3 + 2 * 6 + 2 * 5 + 9) + 3
    with pytest.raises(ValueError, match=r"lacks layers \[4\]"):
        W(cache.select([3]), new)
    with pytest.raises(ValueError, match="subset of"):
        _warp(cached_layers=(4, 5))


def test_warp_bad_inputs_name_the_key():
    W = _warp()
    cache, new = _cache(), _params(seed=13)
    with pytest.raises(ValueError, match=r"params.expressions must be \[B, 5\] \(the warp's expr_dim=5\)"):
        W(cache, FrameParams(**{**new.__dict__, "expressions": torch.zeros(2, 7)}))
    bad = Cache({**cache.features, 5: cache.features[5][..., :4]}, cache.params)
    with pytest.raises(ValueError, match=r"cache.features\[5\] must be \[2, 12, 8, 8\]"):
        W(bad, new)
    with pytest.raises(ValueError, match="too few to modulate"):
        ImplicitWarp(feature_channels=(16, 8, 12))


def test_warp_trains_end_to_end_with_the_generator():
    torch.manual_seed(14)
    G = DNRPlus(in_channels=4, channels=(12, 16, 16), norm="none")
    W = ImplicitWarp(feature_channels=tuple(G.feature_channels.values()), expr_dim=5, mlp_dim=4, norm="none")
    x = torch.randn(1, 4, 32, 32)
    ramp = torch.linspace(0.1, 0.9, 32)
    target = torch.stack([ramp[None, :].expand(32, 32), ramp[:, None].expand(32, 32),
                          torch.full((32, 32), 0.2)], dim=-1)[None]  # a smooth, learnable image
    cache_params, new = _params(1, 32, 32, seed=15), _params(1, 32, 32, seed=16)
    opt = torch.optim.Adam([*G.parameters(), *W.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        out = G(x, return_features=True)
        image = W(Cache(out["features"], cache_params), new)["images"]
        loss = (image - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert G.downs[0][0].weight.grad.abs().sum() > 0  # the warp loss reaches G through the cache
    assert losses[-1] < 0.5 * losses[0]


def test_explicit_warp_starts_as_identity_and_applies_flow():
    torch.manual_seed(17)
    Ex = ExplicitWarp(c3_channels=16, expr_dim=5, mlp_dim=6, hidden_channels=8)
    cache, new = _cache(), _params(seed=18)
    out = Ex(cache, new)
    assert out["flows"].shape == (2, 16, 16, 2) and out["flows"].abs().max() == 0
    torch.testing.assert_close(out["images"], cache.images, atol=1e-6, rtol=0)
    with torch.no_grad():
        Ex.head[-1].bias.copy_(torch.tensor([2.0 / 16, 0.0]))  # sample one pixel to the right
    shifted = Ex(cache, new)["images"]
    torch.testing.assert_close(shifted[:, :, :-1], cache.images[:, :, 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(shifted[:, :, -1], cache.images[:, :, -1], atol=1e-6, rtol=0)  # border
    with pytest.raises(ValueError, match="needs cache.images"):
        Ex(Cache(cache.features, cache.params), new)


def test_count_flops_analytic_and_warp_is_light():
    assert count_flops(torch.nn.Linear(8, 4), torch.randn(5, 8)) == 2 * 5 * 8 * 4
    assert count_flops(torch.nn.Conv2d(2, 3, 3, padding=1), torch.randn(1, 2, 4, 4)) == 2 * 16 * 2 * 3 * 9
    W = _warp()
    cache, new = _cache(), _params(seed=19)
    # M: 2*B*in*out; W1 at 8x8: (16+16+6+3) -> 12/2; W2 at 16x16: (6+12) -> 3 (3x3 kernels).
    m_in = 2 * 3 + 2 * 6 + 2 * 5 + 9
    expected = 2 * 2 * m_in * 6 + 2 * 2 * 64 * 41 * 6 * 9 + 2 * 2 * 256 * 18 * 3 * 9
    assert count_flops(W, cache, new) == expected
    # With the default widths the warp costs under a third of the generator (paper: 87/364).
    G = DNRPlus()
    x = torch.randn(1, 16, 64, 64)
    out = G(x, return_features=True)
    Wd = ImplicitWarp(tuple(G.feature_channels.values()))
    cache = Cache(out["features"], _params(1, 64, 64, expr_dim=50))
    ratio = count_flops(Wd, cache, _params(1, 64, 64, expr_dim=50, seed=1)) / count_flops(G, x)
    assert 0.1 < ratio < 1 / 3


def test_warp_uv_modulation_multiplies_c3_by_the_delta_uv():
    W = _warp(uv_modulation=4)
    cache, new = _cache(), _params(seed=21)
    seen = []
    W.w1[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    W(cache, new)
    x = seen[0]  # [C3 up (16), C4 up (16), θ̄ (6), ΔU (3), C3[:4] ΔU_u (4), C3[:4] ΔU_v (4)]
    assert x.shape == (2, 16 + 16 + 6 + 3 + 8, 8, 8) and W.w1[0].in_channels == 49
    c3, duv = x[:, :4], x[:, 38:41]
    torch.testing.assert_close(x[:, 41:45], c3 * duv[:, :1])
    torch.testing.assert_close(x[:, 45:49], c3 * duv[:, 1:2])
    with pytest.raises(ValueError, match="uv_modulation"):
        _warp(uv_modulation=4, use_uv=False)


def test_warp_without_absolute_inputs_sees_only_the_deltas():
    W = _warp(use_absolute=False)
    cache, new = _cache(), _params(seed=22)
    seen = []
    W.cond.mlp[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    W(cache, new)
    old = cache.params
    ref = torch.cat([new.cam_positions - old.cam_positions, new.poses - old.poses,
                     new.expressions - old.expressions, new.pose_shs - old.pose_shs], dim=1)
    torch.testing.assert_close(seen[0], ref)
    # the same motion from another absolute pose renders the same image
    shifted = FrameParams(**{**new.__dict__, "poses": new.poses + 1.0})
    moved = Cache(cache.features, FrameParams(**{**old.__dict__, "poses": old.poses + 1.0}))
    with torch.no_grad():
        torch.testing.assert_close(W(moved, shifted)["images"], W(cache, new)["images"])


def test_residual_warp_starts_as_the_naive_image_and_learns_a_change():
    W = _warp(residual_image=True)
    cache, new = _cache(), _params(seed=9)
    out = W(cache, new)["images"]
    torch.testing.assert_close(out, cache.images, atol=1e-4, rtol=0)  # untrained W = naive baseline
    W.train()
    target = (cache.images + 0.2).clamp(0, 1)
    opt = torch.optim.Adam(W.parameters(), lr=1e-2)
    before = (W(cache, new)["images"] - target).abs().mean().item()
    for _ in range(30):
        loss = (W(cache, new)["images"] - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * before
    with pytest.raises(ValueError, match="cache's image"):
        W(replace(cache, images=None), new)
    with pytest.raises(ValueError, match="residual_image needs"):
        _warp(residual_image=True, out_activation="none")
