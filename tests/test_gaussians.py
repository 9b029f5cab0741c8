"""Tests of headkit.render.gaussians against an independent dense reference, hand-checked
values, the CUDA kernel's sequential rule, finite differences and (on GPU) gsplat."""

import math

import pytest
import torch
from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

from headkit.render.gaussians import (GaussianRasterizationError, auto_backend,
                                      rasterize_gaussians)
from headkit.render.gaussians_project import project_gaussians
from headkit.render.gaussians_torch import rasterize_tiles
from tests.gaussian_reference import dense_render

W, H = 48, 32


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def look_at(eye, target, dtype=torch.float32):
    """World-to-camera matrix (OpenCV axes) of a camera at ``eye`` looking at ``target``."""
    eye, target = torch.tensor(eye, dtype=dtype), torch.tensor(target, dtype=dtype)
    fwd = torch.nn.functional.normalize(target - eye, dim=0)
    right = torch.nn.functional.normalize(
        torch.linalg.cross(fwd, torch.tensor([0.0, -1.0, 0.0], dtype=dtype)), dim=0)
    down = torch.linalg.cross(fwd, right)
    R = torch.stack([right, down, fwd])
    V = torch.eye(4, dtype=dtype)
    V[:3, :3], V[:3, 3] = R, -R @ eye
    return V


def tiny_scene(dtype=torch.float64) -> dict:
    """5 large, half-transparent Gaussians covering an 8x8 image, for finite-difference checks
    (every alpha far from 1/255 and 0.999, transmittance far above 1e-4: the image is a smooth
    function of the inputs). Keys: means, quats, scales, opacities, colors, viewmats, Ks."""
    t = lambda rows: torch.tensor(rows, dtype=dtype)  # noqa: E731
    return {
        "means": t([[0.1, -0.1, 3.0], [-0.2, 0.1, 3.3], [0.0, 0.2, 3.6], [0.15, 0.05, 3.9], [-0.1, -0.15, 4.2]]),
        "quats": t([[1.0, 0.1, 0.2, 0.0], [0.9, -0.2, 0.1, 0.3], [1.0, 0.0, 0.0, 0.5], [0.7, 0.3, -0.3, 0.1],
                    [1.0, 0.2, 0.1, -0.2]]),
        "scales": 5.0 * t([[0.8, 0.6, 0.5], [0.7, 0.9, 0.4], [0.6, 0.7, 0.8], [0.9, 0.5, 0.6], [0.7, 0.8, 0.7]]),
        "opacities": t([0.5, 0.4, 0.6, 0.45, 0.55]),
        "colors": torch.rand(5, 3, generator=torch.Generator().manual_seed(0), dtype=dtype),
        "viewmats": look_at([0.2, -0.1, -0.5], [0.0, 0.0, 3.0], dtype)[None],
        "Ks": t([[[6.0, 0.0, 4.1], [0.0, 6.5, 3.9], [0.0, 0.0, 1.0]]]),
    }


def random_scene(n=300, seed=0, dtype=torch.float32, channels=3, sh_degree=None,
                 opaque=False, width=W, height=H):
    """Two cameras around a cloud of Gaussians: some behind a camera, some off-screen."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=dtype) * torch.tensor([0.9, 0.7, 0.9],
                                                                        dtype=dtype)
    means[: n // 20, 2] = -3.5 - torch.rand(n // 20, generator=g, dtype=dtype)  # behind cam 0
    quats = torch.randn(n, 4, generator=g, dtype=dtype) * 2.0  # not normalised on purpose
    scales = (torch.rand(n, 3, generator=g, dtype=dtype) * 0.1 + 0.01) * (2.5 if opaque else 1)
    lo = 0.8 if opaque else 0.0
    opacities = lo + (1.0 - lo) * torch.rand(n, generator=g, dtype=dtype)
    if sh_degree is None:
        colors = torch.rand(n, channels, generator=g, dtype=dtype)
    else:
        colors = 0.4 * torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g, dtype=dtype)
    viewmats = torch.stack([look_at([0.0, 0.0, -3.0], [0.0, 0.0, 0.0], dtype),
                            look_at([1.5, 0.5, -2.5], [0.0, 0.1, 0.0], dtype)])
    Ks = torch.tensor([[1.1 * width, 0.0, 0.5 * width], [0.0, 1.1 * width, 0.45 * height],
                       [0.0, 0.0, 1.0]], dtype=dtype).repeat(2, 1, 1)
    Ks[1, 0, 0] *= 1.2
    return [means, quats, scales, opacities, colors, viewmats, Ks]


def camera_z(means, viewmats):
    return torch.einsum("cj,nj->cn", viewmats[:, 2, :3], means) + viewmats[:, 2, 3:]


@pytest.mark.parametrize("case", ["rgb", "sh3", "features32_bg", "opaque_bg", "per_camera"])
def test_matches_dense_reference(case):
    kw = {}
    if case == "sh3":
        scene = random_scene(seed=1, sh_degree=3)
        kw["sh_degree"] = 3
    elif case == "features32_bg":
        scene = random_scene(seed=2, channels=32)
        kw["backgrounds"] = torch.rand(2, 32, generator=torch.Generator().manual_seed(0))
    elif case == "opaque_bg":
        scene = random_scene(n=500, seed=3, opaque=True)
        kw["backgrounds"] = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]])
    elif case == "per_camera":
        scene = random_scene(seed=4)
        scene[4] = torch.rand(2, 300, 5, generator=torch.Generator().manual_seed(1))
    else:
        scene = random_scene(seed=0)
    colors, depths, alphas, info = rasterize_gaussians(*scene, W, H, backend="torch", **kw)
    ref_colors, ref_depths, ref_alphas = dense_render(*scene, W, H, **kw)
    D = 3 if case in ("rgb", "sh3", "opaque_bg") else scene[4].shape[-1]
    assert colors.shape == (2, H, W, D) and depths.shape == alphas.shape == (2, H, W, 1)
    torch.testing.assert_close(colors, ref_colors, atol=1e-4, rtol=0)
    torch.testing.assert_close(depths, ref_depths, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(alphas, ref_alphas, atol=1e-4, rtol=0)

    # The scene exercises what it claims: culled behind the camera, off-screen, covered.
    z = camera_z(scene[0], scene[5])
    assert (z[0] < 0).sum() >= 10 and not info["visible"][z < 0].any()
    assert (~info["visible"] & (z > 0.5)).any()  # in front but outside the image
    assert 0.3 < alphas.mean() < 0.999
    if case == "opaque_bg":
        # Some pixels saturate, so the transmittance stop (T <= 1e-4) is exercised.
        assert (alphas > 0.999).float().mean() > 0.05
        assert alphas.max() < 1.0 - 0.9e-4  # T stays above 1e-4


def test_info_matches_gsplat_projection():
    means, quats, scales, opacities, colors, viewmats, Ks = random_scene(seed=5)
    opacities[:10] = 0.002  # below 1/255: culled
    _, _, _, info = rasterize_gaussians(means, quats, scales, opacities, colors, viewmats, Ks,
                                        W, H, backend="torch")
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    _, ref_m2d, ref_z, ref_conics, _ = _fully_fused_projection(
        means, covars, viewmats, Ks, W, H, eps2d=0.3, near_plane=-1e30, far_plane=1e30)
    vis = info["visible"]
    assert info["radii"].shape == (2, 300, 2) and info["radii"].dtype == torch.int32
    torch.testing.assert_close(info["depths"], ref_z)
    torch.testing.assert_close(info["means2d"][vis], ref_m2d[vis], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(info["conics"][vis], ref_conics[vis], rtol=1e-4, atol=1e-6)

    # Opacity-aware radii of gsplat 1.5: ceil(min(3.33, sqrt(2 ln(255 o))) * sigma_axis).
    a, b, c = ref_conics.unbind(-1)
    det = a * c - b * b
    sigmas = torch.stack([(c / det).sqrt(), (a / det).sqrt()], -1)  # sqrt(Sigma2d_ii)
    extent = torch.sqrt(2 * torch.log(255 * opacities.clamp_min(1 / 255))).clamp_max(3.33)
    bound = extent[None, :, None] * sigmas
    radii = info["radii"].float()
    assert (radii[vis] >= bound[vis] - 1e-3).all() and (radii[vis] < bound[vis] + 1).all()
    # Visible iff in front of the near plane, opaque enough and its box meets the image.
    m2d, r = ref_m2d, bound.ceil()
    expect = (ref_z >= 0.01) & (opacities >= 1 / 255) & (m2d[..., 0] + r[..., 0] > 0) \
        & (m2d[..., 0] - r[..., 0] < W) & (m2d[..., 1] + r[..., 1] > 0) \
        & (m2d[..., 1] - r[..., 1] < H)
    assert torch.equal(vis, expect)
    assert not vis[:, :10].any() and (info["radii"][~vis] == 0).all()


def test_single_gaussian_analytic():
    """An isotropic Gaussian facing the camera: value o*c at the centre, exp falloff."""
    f, z, s, o = 20.0, 4.0, 0.3, 0.7
    means = torch.tensor([[0.0, 0.0, z]])
    Ks = torch.tensor([[[f, 0.0, 8.5], [0.0, f, 6.5], [0.0, 0.0, 1.0]]])  # mean -> (8.5, 6.5)
    colors, depths, alphas, info = rasterize_gaussians(
        means, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.full((1, 3), s),
        torch.tensor([o]), torch.tensor([[0.2, 0.4, 1.0]]), torch.eye(4)[None], Ks, 17, 13,
        backgrounds=torch.tensor([[0.0, 0.0, 0.5]]), backend="torch")
    var = (f * s / z) ** 2 + 0.3  # EWA variance + low-pass, px^2
    ys, xs = torch.meshgrid(torch.arange(13.0), torch.arange(17.0), indexing="ij")
    a = o * torch.exp(-0.5 * ((xs + 0.5 - 8.5) ** 2 + (ys + 0.5 - 6.5) ** 2) / var)
    a = torch.where(a < 1 / 255, torch.zeros_like(a), a)
    torch.testing.assert_close(alphas[0, ..., 0], a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(depths[0, ..., 0], z * a, atol=1e-5, rtol=1e-5)
    expect = a[..., None] * torch.tensor([0.2, 0.4, 1.0]) + (1 - a[..., None]) * torch.tensor(
        [0.0, 0.0, 0.5])
    torch.testing.assert_close(colors[0], expect, atol=1e-6, rtol=1e-5)
    assert colors[0, 6, 8, 1].item() == pytest.approx(0.4 * o, abs=1e-6)
    assert info["radii"][0, 0].tolist() == [math.ceil(math.sqrt(2 * math.log(255 * o) * var))] * 2


def test_transmittance_stop_and_alpha_clamp_by_hand():
    """Three layers on one pixel centre: 0.98 twice (T = 0.02, then 4e-4) and a third that
    would take T to 8e-6 <= 1e-4, so it and everything behind are not applied."""
    means = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 4.0]])
    cols = torch.eye(4)[:, :3].clone()
    cols[3] = torch.tensor([1.0, 1.0, 1.0])
    Ks = torch.tensor([[[10.0, 0.0, 1.5], [0.0, 10.0, 1.5], [0.0, 0.0, 1.0]]])
    bg = torch.tensor([[0.5, 0.25, 0.125]])
    out = rasterize_gaussians(means, torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1),
                              torch.full((4, 3), 1.0), torch.tensor([0.98, 0.98, 0.98, 0.98]),
                              cols, torch.eye(4)[None], Ks, 3, 3, backgrounds=bg,
                              backend="torch")
    colors, depths, alphas, _ = out
    px = colors[0, 1, 1]  # the pixel at (1.5, 1.5): every alpha is exactly its opacity
    T1, T2 = 0.02, 0.02 * 0.02
    torch.testing.assert_close(px, torch.tensor([0.98, 0.98 * T1, 0.0]) + T2 * bg[0],
                               atol=1e-6, rtol=1e-5)
    assert alphas[0, 1, 1, 0].item() == pytest.approx(1 - T2, abs=1e-6)
    assert depths[0, 1, 1, 0].item() == pytest.approx(0.98 * 1.0 + 0.98 * T1 * 2.0, abs=1e-5)
    # Alpha is clamped at 0.999 (gsplat 1.5.3): opacity 1 still lets 1e-3 through.
    colors, _, alphas, _ = rasterize_gaussians(
        means[:1], torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 1.0), torch.ones(1),
        cols[:1], torch.eye(4)[None], Ks, 3, 3, backend="torch")
    assert alphas[0, 1, 1, 0].item() == pytest.approx(0.999, abs=1e-7)


def test_sequential_kernel_rule():
    """A per-pixel Python loop written like gsplat's CUDA forward kernel, on a few pixels."""
    scene = random_scene(n=200, seed=6, opaque=True)
    means, quats, scales, opacities, colors, viewmats, Ks = scene
    out, _, out_alpha, _ = rasterize_gaussians(*scene, W, H, backend="torch")
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    _, m2d, z, conics, _ = _fully_fused_projection(means, covars, viewmats[:1], Ks[:1], W, H,
                                                   near_plane=-1e30, far_plane=1e30)
    order = [i for i in torch.argsort(z[0]).tolist() if z[0, i] >= 0.01]
    for (i, j) in [(16, 24), (10, 20), (20, 30), (5, 40), (31, 0), (0, 47)]:
        px, py = j + 0.5, i + 0.5
        T, acc = 1.0, torch.zeros(3, dtype=torch.float64)
        for g in order:
            dx, dy = (m2d[0, g, 0] - px).item(), (m2d[0, g, 1] - py).item()
            a, b, c = conics[0, g].tolist()
            sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
            alpha = min(0.999, opacities[g].item() * math.exp(-sigma))
            if sigma < 0 or alpha < 1 / 255:
                continue
            if T * (1 - alpha) <= 1e-4:
                break
            acc += colors[g].double() * alpha * T
            T *= 1 - alpha
        torch.testing.assert_close(out[0, i, j].double(), acc, atol=1e-4, rtol=0)
        assert out_alpha[0, i, j, 0].item() == pytest.approx(1 - T, abs=1e-4)


@pytest.mark.parametrize("opaque", [False, True])
def test_gradients_match_dense_reference(opaque):
    scene = random_scene(n=80, seed=7, dtype=torch.float64, sh_degree=2, opaque=opaque,
                         width=20, height=16)
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.0]], dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in scene + [bg]]
    g = torch.Generator().manual_seed(0)
    weights = [torch.rand(2, 16, 20, k, generator=g, dtype=torch.float64) for k in (3, 1, 1)]

    def grads(render):
        outs = render(*leaves[:7], 20, 16, sh_degree=2, backgrounds=leaves[7])
        loss = sum((o * w).sum() for o, w in zip(outs[:3], weights))
        return torch.autograd.grad(loss, leaves)

    ours = grads(lambda *a, **k: rasterize_gaussians(*a, backend="torch", **k))
    ref = grads(dense_render)
    names = ["means", "quats", "scales", "opacities", "colors", "viewmats", "Ks", "bg"]
    for name, x, y in zip(names, ours, ref):
        if name == "Ks":  # gsplat's CUDA (and ours) read fx, fy, cx, cy only; no skew
            x, y = x[:, [0, 0, 1, 1], [0, 2, 1, 2]], y[:, [0, 0, 1, 1], [0, 2, 1, 2]]
        assert y.abs().max() > 1e-3, name  # a gradient that is there to compare
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-9, msg=name)


def test_gradients_when_only_some_inputs_require_grad():
    scene = random_scene(n=100, seed=11, width=20, height=16)
    weights = torch.rand(2, 16, 20, 3, generator=torch.Generator().manual_seed(0))

    def grad_of(which):
        leaves = [t.clone().requires_grad_(i in which) for i, t in enumerate(scene)]
        colors = rasterize_gaussians(*leaves, 20, 16, backend="torch")[0]
        return torch.autograd.grad((colors * weights).sum(), [leaves[i] for i in which])

    full = grad_of([0, 4])
    torch.testing.assert_close(grad_of([4])[0], full[1])  # colours only
    torch.testing.assert_close(grad_of([0])[0], full[0])  # means only


def test_gradcheck_tiny_scene():
    """Finite differences on 5 large, half-transparent Gaussians covering an 8x8 image."""
    dt = torch.float64
    scene = tiny_scene(dt)
    means, quats, scales, opacities, colors, viewmats, Ks = (scene[k] for k in (
        "means", "quats", "scales", "opacities", "colors", "viewmats", "Ks"))
    bg = torch.tensor([[0.3, 0.6, 0.9]], dtype=dt)

    # Precondition: every pixel/Gaussian alpha is far from 1/255 and 0.999, and T >> 1e-4,
    # so the image is a smooth function of the inputs here.
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    _, m2d, _, conics, _ = _fully_fused_projection(means, covars, viewmats, Ks, 8, 8)
    ys, xs = torch.meshgrid(torch.arange(8.0, dtype=dt), torch.arange(8.0, dtype=dt),
                            indexing="ij")
    d = m2d[0, :, None, None, :] - torch.stack([xs + 0.5, ys + 0.5], -1)
    a, b, c = conics[0].unbind(-1)
    sig = 0.5 * (a[:, None, None] * d[..., 0] ** 2 + c[:, None, None] * d[..., 1] ** 2) \
        + b[:, None, None] * d[..., 0] * d[..., 1]
    alpha = opacities[:, None, None] * torch.exp(-sig)
    assert alpha.min() > 3 / 255 and alpha.max() < 0.9
    assert torch.prod(1 - alpha, 0).min() > 1e-3

    def render(means, quats, scales, opacities, colors, viewmats, Ks, bg):
        out = rasterize_gaussians(means, quats, scales, opacities, colors, viewmats, Ks, 8, 8,
                                  backgrounds=bg, backend="torch")
        return out[:3]

    inputs = [t.clone().requires_grad_(True)
              for t in (means, quats, scales, opacities, colors, viewmats, Ks, bg)]
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-5, rtol=1e-4,
                                    fast_mode=True)


@pytest.mark.parametrize("tile_size", [1, 3, 8, 16])
def test_tile_size_and_buckets_do_not_change_the_image(tile_size):
    scene = random_scene(n=200, seed=8, width=37, height=29)
    base = rasterize_gaussians(*scene, 37, 29, backend="torch")
    out = rasterize_gaussians(*scene, 37, 29, backend="torch", tile_size=tile_size)
    for x, y in zip(out[:3], base[:3]):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)
    # Small buckets (many chunks, memory cap) and no bucketing by count give the same image.
    means2d, conics, depths, radii = project_gaussians(*scene[:4], *scene[5:], 37, 29)
    feats = scene[4][None].expand(2, -1, -1)
    ref = rasterize_tiles(means2d, conics, scene[3], feats, depths, radii, 37, 29,
                          tile_size=tile_size, bucket_ratio=0.0, max_bucket_elements=1 << 30)
    small = rasterize_tiles(means2d, conics, scene[3], feats, depths, radii, 37, 29,
                            tile_size=tile_size, bucket_ratio=0.9, max_bucket_elements=2000)
    torch.testing.assert_close(small, ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(small, base[0], atol=2e-5, rtol=0)


def test_nothing_visible_gives_background_and_zero_grads():
    scene = random_scene(n=50, seed=9)
    scene[0] = scene[0] * 0.1 + torch.tensor([0.0, 0.0, -10.0])  # all behind both cameras
    leaves = [t.clone().requires_grad_(True) for t in scene]
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    colors, depths, alphas, info = rasterize_gaussians(*leaves, W, H, backgrounds=bg,
                                                       backend="torch")
    assert not info["visible"].any() and (alphas == 0).all() and (depths == 0).all()
    torch.testing.assert_close(colors, bg[:, None, None, :].expand(2, H, W, 3))
    colors.sum().backward()
    assert all(t.grad is None or (t.grad == 0).all() for t in leaves)


def test_bad_input_errors_name_the_argument():
    scene = random_scene(n=10)
    with pytest.raises(GaussianRasterizationError, match="quats must be \\[10, 4\\]"):
        rasterize_gaussians(scene[0], scene[1][:, :3], *scene[2:], W, H)
    with pytest.raises(GaussianRasterizationError, match="Ks must be"):
        rasterize_gaussians(*scene[:6], scene[6][:1], W, H)
    with pytest.raises(GaussianRasterizationError, match="sh_degree=3.*\\[N, K>=16, 3\\]"):
        rasterize_gaussians(*scene, W, H, sh_degree=3)
    with pytest.raises(GaussianRasterizationError, match="backgrounds must be \\[C, D\\]"):
        rasterize_gaussians(*scene, W, H, backgrounds=torch.zeros(2, 4))
    with pytest.raises(GaussianRasterizationError, match="width and height"):
        rasterize_gaussians(*scene, 0, H)
    with pytest.raises(GaussianRasterizationError, match="backend must be one of"):
        rasterize_gaussians(*scene, W, H, backend="cuda")
    with pytest.raises(GaussianRasterizationError, match="opacities has dtype"):
        rasterize_gaussians(*scene[:3], scene[3].double(), *scene[4:], W, H)
    bad = [t.clone() for t in scene]
    bad[2][4, 1] = float("nan")
    with pytest.raises(GaussianRasterizationError, match="scales has 1 non-finite"):
        rasterize_gaussians(*bad, W, H)
    with pytest.raises(GaussianRasterizationError, match="opacities must be activated"):
        rasterize_gaussians(*scene[:3], scene[3] * 2.0 - 0.5, *scene[4:], W, H)
    if not torch.cuda.is_available():
        with pytest.raises(GaussianRasterizationError, match="needs CUDA tensors"):
            rasterize_gaussians(*scene, W, H, backend="gsplat")
    # auto on float32 CPU tensors is the native backend (torch where its kernel cannot build)
    assert rasterize_gaussians(*scene, W, H)[3]["backend"] == auto_backend("cpu")[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_matches_gsplat_on_cuda():
    from headkit.render.gaussians import gsplat_available

    if not gsplat_available():
        pytest.skip("gsplat's CUDA extension does not load")
    scene = [t.cuda() for t in random_scene(n=500, seed=10, sh_degree=3)]
    bg = torch.rand(2, 3, device="cuda")
    g = torch.Generator().manual_seed(0)
    weights = [torch.rand(2, H, W, k, generator=g).cuda() for k in (3, 1, 1)]
    results = {}
    for backend in ("torch", "gsplat"):
        leaves = [t.clone().requires_grad_(True) for t in scene[:6]] + [scene[6]]
        out = rasterize_gaussians(*leaves, W, H, sh_degree=3, backgrounds=bg, backend=backend)
        assert out[3]["backend"] == backend
        loss = sum((o * w).sum() for o, w in zip(out[:3], weights))
        results[backend] = (out, torch.autograd.grad(loss, leaves[:6]))
    (ours, g_ours), (ref, g_ref) = results["torch"], results["gsplat"]
    for x, y in zip(ours[:3], ref[:3]):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)
    assert torch.equal(ours[3]["visible"], ref[3]["visible"])
    assert (ours[3]["radii"] - ref[3]["radii"]).abs().max() <= 1
    for name, x, y in zip(["means", "quats", "scales", "opacities", "colors", "viewmats"],
                          g_ours, g_ref):
        rel = (x - y).norm() / y.norm().clamp_min(1e-12)
        assert rel < 2e-2, f"{name}: relative gradient difference {rel:.3g}"
