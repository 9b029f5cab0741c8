"""The native (C kernel) Gaussian compositing against the torch compositing, the dense
reference and finite differences; its build cache; and the fallback to torch without a C
compiler."""

import logging

import pytest
import torch

from headkit.render import gaussians, gaussians_native, native_build
from headkit.render.gaussians import auto_backend, rasterize_gaussians
from headkit.render.gaussians_project import project_gaussians
from headkit.render.gaussians_torch import rasterize_tiles as torch_tiles
from tests.gaussian_reference import dense_render
from tests.test_gaussians import random_scene, tiny_scene

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

W, H = 48, 32


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """Build the kernel once for the module (skips the comparisons where no C compiler works)."""
    error = gaussians_native.native_load_error()
    if error is not None and "no C compiler" in error:
        pytest.skip(f"native kernel unavailable: {error}")
    assert error is None, error


def projected(scene, width=W, height=H, channels=None):
    """Projection of a :func:`random_scene` and features (colours, depth, 1) as the backends use."""
    means2d, conics, depths, radii = project_gaussians(*scene[:4], *scene[5:], width, height)
    colors = scene[4] if channels is None else scene[4][:, :channels]
    C, N = depths.shape
    feats = torch.cat([colors[None].expand(C, N, -1), depths[..., None],
                       torch.ones_like(depths)[..., None]], -1)
    return means2d, conics, scene[3], feats, depths, radii


def composite_with_grads(fn, inputs, width, height, tile_size, seed=0):
    """Image and gradients of a fixed random weighting of it w.r.t. means2d, conics,
    opacities and features."""
    means2d, conics, opacities, feats, depths, radii = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (means2d, conics, opacities, feats)]
    image = fn(*leaves[:3], leaves[3], depths.detach(), radii, width, height, tile_size=tile_size)
    weights = torch.rand(image.shape, generator=torch.Generator().manual_seed(seed))
    return image, torch.autograd.grad((image * weights).sum(), leaves)


def assert_grads_close(ours, ref, names=("means2d", "conics", "opacities", "features")):
    for name, x, y in zip(names, ours, ref):
        scale = y.abs().max()
        assert scale > 1e-3, name  # a gradient that is there to compare
        torch.testing.assert_close(x, y, atol=2e-5 * scale, rtol=1e-3, msg=name)


@pytest.mark.parametrize("tile_size", [1, 3, 4, 8, 16])
@pytest.mark.parametrize("case", ["random", "opaque", "wide"])
def test_matches_torch_compositing(case, tile_size):
    """Two cameras; 'opaque' saturates pixels (the T <= 1e-4 stop), 'wide' adds Gaussians
    spanning many tiles and 32 feature channels; small tiles leave many tiles empty."""
    scene = random_scene(n=400 if case == "opaque" else 200, seed=8, opaque=case == "opaque",
                         channels=32 if case == "wide" else 3, width=37, height=29)
    if case == "wide":
        scene[2][20:26] *= 8.0  # a few Gaussians covering much of the image
    inputs = projected(scene, 37, 29)
    ours, g_ours = composite_with_grads(gaussians_native.rasterize_tiles, inputs, 37, 29, tile_size)
    ref, g_ref = composite_with_grads(torch_tiles, inputs, 37, 29, 4)
    assert ours.shape == ref.shape == (2, 29, 37, inputs[3].shape[-1])
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    assert_grads_close(g_ours, g_ref)
    alphas = ours[..., -1]
    assert (alphas > 0).float().mean() > 0.3
    if case == "opaque":
        assert (alphas > 0.999).float().mean() > 0.05  # the stop rule is exercised
    else:
        assert (alphas == 0).any()  # pixels (and with small tiles, tiles) that nothing reaches
    if case == "wide":
        radii = inputs[5][:, 20:26].float()
        assert (radii > 3 * tile_size).any()


def test_rasterize_gaussians_native_matches_dense_reference_and_torch_gradients():
    scene = random_scene(n=300, seed=3, opaque=True, sh_degree=2)
    bg = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]])
    g = torch.Generator().manual_seed(0)
    weights = [torch.rand(2, H, W, k, generator=g) for k in (3, 1, 1)]
    results = {}
    for backend in ("native", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in scene + [bg]]
        out = rasterize_gaussians(*leaves[:7], W, H, sh_degree=2, backgrounds=leaves[7],
                                  backend=backend)
        assert out[3]["backend"] == backend
        loss = sum((o * w).sum() for o, w in zip(out[:3], weights))
        results[backend] = (out[:3], torch.autograd.grad(loss, leaves))
    ref = dense_render(*scene, W, H, sh_degree=2, backgrounds=bg)
    for x, y, z in zip(results["native"][0], ref, results["torch"][0]):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(x, z, atol=2e-5, rtol=1e-5)
    names = ["means", "quats", "scales", "opacities", "colors", "viewmats", "Ks", "bg"]
    for name, x, y in zip(names, results["native"][1], results["torch"][1]):
        scale = y.abs().max()
        torch.testing.assert_close(x, y, atol=1e-4 * scale, rtol=1e-3, msg=name)


def test_finite_differences_tiny_scene():
    """Directional derivatives of a weighted image sum: analytic (native backward) against
    central differences, on 5 large, half-transparent Gaussians over an 8x8 image (smooth
    there: alphas far from 1/255 and 0.999). float64 inputs, float32 kernel: the step is large
    enough that float32 rounding stays far below the tolerance."""
    dt = torch.float64
    scene = tiny_scene(dt)
    means, quats, scales, opacities, colors, viewmats, Ks = (scene[k] for k in (
        "means", "quats", "scales", "opacities", "colors", "viewmats", "Ks"))
    g = torch.Generator().manual_seed(1)
    weights = [torch.rand(1, 8, 8, k, generator=g, dtype=dt) for k in (3, 1, 1)]

    def loss(means, scales, opacities, colors):
        out = rasterize_gaussians(means, quats, scales, opacities, colors, viewmats, Ks, 8, 8,
                                  backend="native", tile_size=4)
        assert out[3]["backend"] == "native"
        return sum((o * w).sum() for o, w in zip(out[:3], weights))

    inputs = [t.clone().requires_grad_(True) for t in (means, scales, opacities, colors)]
    grads = torch.autograd.grad(loss(*inputs), inputs)
    for i, name in enumerate(["means", "scales", "opacities", "colors"]):
        direction = torch.randn(inputs[i].shape, generator=g, dtype=dt)
        eps = 1e-3 * inputs[i].detach().abs().mean()
        plus = [t.detach() + (eps * direction if j == i else 0) for j, t in enumerate(inputs)]
        minus = [t.detach() - (eps * direction if j == i else 0) for j, t in enumerate(inputs)]
        numeric = (loss(*plus) - loss(*minus)).item() / (2 * eps.item())
        analytic = (grads[i] * direction).sum().item()
        assert abs(analytic) > 1e-2, name
        assert analytic == pytest.approx(numeric, rel=2e-3, abs=1e-3), name


def test_threads_give_the_same_bits_and_nothing_visible_gives_zeros():
    scene = random_scene(n=300, seed=4, opaque=True)
    inputs = projected(scene)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(composite_with_grads(gaussians_native.rasterize_tiles, inputs, W, H, 8))
    finally:
        torch.set_num_threads(before)
    (one, g_one), (two, g_two) = results
    assert torch.equal(one, two) and all(torch.equal(x, y) for x, y in zip(g_one, g_two))

    far = [t.clone() for t in scene]
    far[0] = far[0] * 0.1 + torch.tensor([0.0, 0.0, -10.0])  # behind both cameras
    image, grads = composite_with_grads(gaussians_native.rasterize_tiles, projected(far), W, H, 8)
    assert (image == 0).all() and all((x == 0).all() for x in grads)


def test_auto_on_cpu_picks_native_for_float32_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_backend("cpu") == ("native", "native (no CUDA device)")
    assert auto_backend("cpu", torch.float64) == (
        "torch", "torch (no CUDA device; float64 inputs, the native kernel is float32)")
    scene = random_scene(n=50, seed=5)
    assert rasterize_gaussians(*scene, W, H)[3]["backend"] == "native"
    assert rasterize_gaussians(*[t.double() for t in scene], W, H)[3]["backend"] == "torch"
    # float64 with backend="native": projected in float64, composited in float32, cast back
    out64 = rasterize_gaussians(*[t.double() for t in scene], W, H, backend="native")
    out32 = rasterize_gaussians(*scene, W, H, backend="native")
    assert out64[0].dtype == torch.float64 and out64[3]["backend"] == "native"
    torch.testing.assert_close(out64[0].float(), out32[0], atol=1e-5, rtol=0)


@pytest.fixture
def no_compiler(monkeypatch):
    """No C compiler and no cached library: the kernel cannot be built."""
    monkeypatch.setattr(native_build, "find_compiler", lambda: None)
    monkeypatch.setattr(gaussians_native, "_warned", False)
    monkeypatch.setattr(gaussians, "_logged_backends", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gaussians_native._library.cache_clear()
    yield
    gaussians_native._library.cache_clear()


def test_without_a_compiler_falls_back_to_torch_with_one_warning(no_compiler, caplog):
    scene = random_scene(n=200, seed=6)
    inputs = projected(scene)
    with caplog.at_level(logging.WARNING):
        ours = [composite_with_grads(gaussians_native.rasterize_tiles, inputs, W, H, 4)
                for _ in range(2)]
    ref = composite_with_grads(torch_tiles, inputs, W, H, 4)
    for image, grads in ours:
        assert torch.equal(image, ref[0]) and all(torch.equal(x, y) for x, y in zip(grads, ref[1]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["native Gaussian compositing unavailable (no C compiler found ($CC, cc, "
                        "gcc)); using the torch code"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="headkit.render.gaussians"):
        for backend in ("native", "native", "auto"):
            assert rasterize_gaussians(*scene, W, H, backend=backend)[3]["backend"] == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        "Gaussian splatting (backend=native) renders with torch (backend='native': native kernel "
        "unavailable: no C compiler found ($CC, cc, gcc))",
        "Gaussian splatting (backend=auto) renders with torch (no CUDA device; native kernel "
        "unavailable: no C compiler found ($CC, cc, gcc))"]


def test_build_cache_is_keyed_atomic_and_reports_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADKIT_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "twice.c"
    source.write_text("int twice(int x) { return 2 * x; }\n")
    lib = native_build.load_library(source)
    assert lib.twice(21) == 42
    built = sorted((tmp_path / "cache" / "native").iterdir())
    assert len(built) == 1 and built[0].name.startswith("twice-")  # no temporary files left
    assert built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    assert native_build.build_library(source) == built[0] and built[0].stat().st_mtime_ns == mtime
    source.write_text("int twice(int x) { return x + x; }\n")  # another source, another build
    assert native_build.build_library(source) != built[0]

    source.write_text("int broken(int x) { return x +; }\n")
    with pytest.raises(native_build.NativeBuildError, match="failed to build twice.c: .*error"):
        native_build.build_library(source)
    assert len(list((tmp_path / "cache" / "native").iterdir())) == 2


def test_every_backend_has_a_default_tile_size():
    assert set(gaussians.DEFAULT_TILE_SIZES) | {"auto"} == set(gaussians.BACKENDS)
