"""The CUDA path, checked on the CPU (issue 11, item 4): the auto backend's choice and reason,
float64 inputs to gsplat, ``render_backend`` in metrics, neural-cache inputs on the model's
device, and host-to-device copies kept out of timed regions.

No GPU is needed: a device other than the CPU is played by PyTorch's ``meta`` device, on
which a tensor left on the CPU fails exactly as it would against a CUDA model tensor.
"""

from __future__ import annotations

import importlib.util
import logging
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import headkit.render.gaussians as gaussians
from headkit.data.dataset import FrameDataset
from headkit.engine import evaluate as engine_evaluate
from headkit.render.gaussians import auto_backend, rasterize_gaussians, record_render_backends
from neuralcache import evaluate as nc_evaluate
from neuralcache.inputs import FrameInputs
from neuralcache.model import NeuralCache
from tests.conftest import make_tiny_subject

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")


def _scene(dtype=torch.float32, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * 0.3 + torch.tensor([0.0, 0.0, 3.0])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.1 + 0.02
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    colors = torch.rand(n, 3, generator=g)
    viewmats = torch.eye(4)[None]
    Ks = torch.tensor([[[30.0, 0.0, 12.0], [0.0, 30.0, 10.0], [0.0, 0.0, 1.0]]])
    return [t.to(dtype) for t in (means, quats, scales, opacities, colors, viewmats, Ks)]


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(gaussians, "_logged_backends", set())


# ---------------------------------------------------------------- which backend auto picks, and why

def test_auto_backend_without_cuda_is_native_and_says_why(no_cuda, monkeypatch):
    monkeypatch.setattr(gaussians, "native_load_error", lambda: None)
    assert auto_backend("cpu") == ("native", "native (no CUDA device)")
    assert auto_backend(torch.device("cpu")) == ("native", "native (no CUDA device)")
    assert auto_backend("cpu", torch.float64) == (
        "torch", "torch (no CUDA device; float64 inputs, the native kernel is float32)")
    monkeypatch.setattr(gaussians, "native_load_error", lambda: "no C compiler found")
    assert auto_backend("cpu") == (
        "torch", "torch (no CUDA device; native kernel unavailable: no C compiler found)")


def test_auto_backend_reasons_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gaussians, "native_load_error", lambda: None)
    assert auto_backend("cpu") == ("native", "native (tensors on cpu, not CUDA)")
    monkeypatch.setattr(gaussians, "_gsplat_load_error", lambda: None)
    assert auto_backend("cuda:0") == ("gsplat", "gsplat (CUDA)")
    monkeypatch.setattr(gaussians, "_gsplat_load_error", lambda: "gsplat not installed")
    assert auto_backend("cuda") == ("torch", "torch (gsplat not installed)")


def test_gsplat_probe_refuses_missing_and_unsupported_versions(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gsplat" else real_find_spec(name, *a))
    assert gaussians._probe_gsplat() == "gsplat not installed"
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    if real_find_spec("gsplat") is None:
        pytest.skip("gsplat is not installed here")
    monkeypatch.setattr(gaussians, "_gsplat_version", lambda: "1.4.0")
    why = gaussians._probe_gsplat()
    assert "gsplat 1.4.0 installed, 1.5.x needed" in why and "radii [C, N]" in why
    monkeypatch.setattr(gaussians, "_gsplat_version", lambda: "1.5.3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gaussians._probe_gsplat() == "CUDA is not available"


def test_pyproject_pins_gsplat_to_1_5():
    specifiers = pytest.importorskip("packaging.specifiers")
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.replace(" ", "").startswith("gsplat")]
    allowed = specifiers.SpecifierSet(spec[len("gsplat"):])
    assert {v: v in allowed for v in ("1.4.0", "1.5.0", "1.5.3", "1.6.0")} == {
        "1.4.0": False, "1.5.0": True, "1.5.3": True, "1.6.0": False}


def test_auto_logs_its_choice_once_and_records_it(no_cuda, fresh_log, caplog):
    scene = _scene()
    backend, reason = auto_backend("cpu")  # "native (no CUDA device)" where a C compiler works
    with caplog.at_level(logging.INFO, logger="headkit.render.gaussians"):
        with record_render_backends() as used:
            for _ in range(3):
                assert rasterize_gaussians(*scene, 24, 20)[3]["backend"] == backend
            rasterize_gaussians(*scene, 24, 20, backend="torch")
    msgs = [r.getMessage() for r in caplog.records if r.name == "headkit.render.gaussians"]
    assert msgs == [f"Gaussian splatting (backend=auto) renders with {reason}"]
    assert used == [reason, "torch (backend='torch')"]
    with record_render_backends() as later:
        pass
    assert later == []  # a finished recorder sees nothing more, a new one nothing earlier


# ---------------------------------------------------------------- float64 inputs

def test_float64_renders_like_float32_on_torch():
    c32, d32, a32, _ = rasterize_gaussians(*_scene(torch.float32), 24, 20, backend="torch")
    c64, d64, a64, _ = rasterize_gaussians(*_scene(torch.float64), 24, 20, backend="torch")
    assert c64.dtype == torch.float64 and c32.abs().sum() > 0
    torch.testing.assert_close(c64.float(), c32, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a64.float(), a32, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(d64.float(), d32, atol=1e-4, rtol=1e-4)


def _fake_gsplat(seen):
    """Stands in for ``gsplat.rasterization`` on the CPU: records the dtypes it is given and
    renders with the torch backend in gsplat's output format."""
    def rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *, near_plane,
                      far_plane, eps2d, sh_degree, packed, tile_size, backgrounds, render_mode, rasterize_mode):
        tensors = (means, quats, scales, opacities, colors, viewmats, Ks) + ((backgrounds,) if backgrounds is not None
                                                                            else ())
        seen.append({t.dtype for t in tensors})
        assert render_mode == "RGB+D" and not packed and eps2d == gaussians.EPS2D
        c, d, a, info = rasterize_gaussians(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                            sh_degree=sh_degree, backgrounds=backgrounds, near_plane=near_plane,
                                            far_plane=far_plane, backend="torch")
        return torch.cat([c, d], -1), a, {k: info[k] for k in ("radii", "means2d", "depths", "conics")}
    return rasterization


def test_gsplat_backend_casts_float64_to_float32_and_back():
    seen = []
    args = (24, 20, None, None, 0.01, 1e10, 16)  # width, height, sh_degree, backgrounds, near, far, tile
    c32, d32, a32, i32 = gaussians._call_gsplat(_fake_gsplat(seen), *_scene(torch.float32), *args)
    scene64 = _scene(torch.float64)
    bg = torch.tensor([[0.2, 0.3, 0.4]], dtype=torch.float64)
    c64, d64, a64, i64 = gaussians._call_gsplat(_fake_gsplat(seen), *scene64, 24, 20, None, bg, 0.01, 1e10, 16)
    assert seen == [{torch.float32}, {torch.float32}]  # the kernel only ever sees float32
    assert c64.dtype == d64.dtype == a64.dtype == i64["means2d"].dtype == torch.float64
    assert i64["backend"] == "gsplat"
    # float64 inputs that are float32 values give exactly the float32 image
    ref = c32 + (1 - a32) * bg.float()[:, None, None, :]
    torch.testing.assert_close(c64, ref.double(), atol=1e-6, rtol=0)
    assert torch.equal(a64, a32.double()) and torch.equal(d64, d32.double())
    # gradients flow back through the casts to the float64 leaves
    leaves = [t.clone().requires_grad_(True) for t in scene64]
    out = gaussians._call_gsplat(_fake_gsplat(seen), *leaves, *args)[0]
    out.sum().backward()
    assert leaves[0].grad is not None and leaves[0].grad.dtype == torch.float64


# ---------------------------------------------------------------- render_backend in metrics.json

class _SplatMethod(nn.Module):
    """A minimal evaluated method: a few Gaussians rendered into the batch's camera."""

    def __init__(self, subject, backend="auto"):
        super().__init__()
        means, quats, scales, opacities, colors, _, _ = _scene(n=20)
        self.means = nn.Parameter(means)
        self.register_buffer("rest", torch.cat([quats, scales, opacities[:, None], colors], -1))
        self.size, self.backend = (subject.width, subject.height), backend
        self.timed_batches = []

    def render_eval(self, batch):
        self.timed_batches.append(batch)
        q, s, o, c = self.rest.split([4, 3, 1, 3], -1)
        return rasterize_gaussians(self.means, q, s, o[:, 0], c, batch["viewmat"], batch["K"], *self.size,
                                   backend=self.backend)[0]

    def target_image(self, batch):
        return batch["image"]

    def stored_state_dict(self):
        return self.state_dict()


class _NoSplatMethod(_SplatMethod):
    def render_eval(self, batch):
        return batch["image"] * 0.5


def _tiny_eval(model, subject, tmp_path):
    return engine_evaluate.evaluate_method(model, FrameDataset(subject, "test"), tmp_path, with_lpips=False,
                                           save_images=False, save_video=False, timing_repeats=2, timing_warmup=1,
                                           show_progress=False)


def test_render_backend_is_in_the_metrics_of_a_tiny_evaluation(no_cuda, tmp_path):
    subject = make_tiny_subject()
    metrics = _tiny_eval(_SplatMethod(subject), subject, tmp_path)
    assert metrics["render_backend"] == auto_backend("cpu")[1]  # "native (no CUDA device)"
    metrics = _tiny_eval(_SplatMethod(subject, backend="torch"), subject, tmp_path)
    assert metrics["render_backend"] == "torch (backend='torch')"
    assert _tiny_eval(_NoSplatMethod(subject), subject, tmp_path)["render_backend"] is None


def test_evaluation_moves_the_timed_batch_before_time_fn(monkeypatch, tmp_path):
    subject = make_tiny_subject()
    model = _SplatMethod(subject)
    state = {"timing": False, "batch_calls_while_timing": 0}
    real_batch = FrameDataset.batch

    def batch(self, positions, device="cpu"):
        state["batch_calls_while_timing"] += state["timing"]
        return real_batch(self, positions, device)

    def fake_time_fn(fn, *, repeats, warmup, device):
        model.timed_batches.clear()
        state["timing"] = True
        fn()
        state["timing"] = False
        return {"median_ms": 1.0}

    monkeypatch.setattr(FrameDataset, "batch", batch)
    monkeypatch.setattr(engine_evaluate, "time_fn", fake_time_fn)
    _tiny_eval(model, subject, tmp_path)
    assert state["batch_calls_while_timing"] == 0
    (timed,) = model.timed_batches
    assert all(v.device == torch.device("cpu") for v in timed.values())


# ---------------------------------------------------------------- neural cache: inputs on the model's device

SMALL = dict(texture={"resolution": 32, "num_levels": 2}, generator={"channels": [12, 16, 16]},
             warp={"mlp_dim": 4}, explicit_warp={"hidden_channels": 8, "mlp_dim": 4})


@pytest.fixture(scope="module")
def nc_subject():
    return make_tiny_subject(num_frames=8, num_test=3, width=16, height=16)


@pytest.fixture
def nc_model(nc_subject):
    torch.manual_seed(0)
    model = NeuralCache(nc_subject, variant="ours", **SMALL).eval()
    # Rasterize (and memoise) every frame's UV maps on the CPU: the mesh rasterizer needs real data.
    model.frame_batch(FrameDataset(nc_subject, "all"), range(nc_subject.num_frames), "cpu")
    return model


def _frame_tensors(frame) -> list[torch.Tensor]:
    out = []
    for inputs in (frame["inputs"], frame["prev"]):
        out += [inputs.view_dirs, inputs.images, inputs.masks]
        out += [getattr(inputs.params, k) for k in inputs.params.__dataclass_fields__]
    return out


def _assert_stream_on(frames, targets, device):
    tensors = [t for f in frames for t in _frame_tensors(f)] + list(targets)
    assert tensors and {t.device for t in tensors} == {device}


def test_stream_inputs_are_built_on_the_models_device(nc_model, nc_subject):
    test = FrameDataset(nc_subject, "test")
    frames, scored, targets = nc_evaluate.build_stream(nc_model, test, warmup=2)
    _assert_stream_on(frames, targets, next(nc_model.parameters()).device)
    assert scored == [2, 3, 4]
    # A model on another device (meta plays CUDA): inputs are made there, and nothing
    # built on the CPU meets the encoder's buffers (that would raise a device mismatch).
    nc_model.to(META)
    assert next(nc_model.parameters()).device == META and nc_model.encoder.frontal.device == META
    frames, _, targets = nc_evaluate.build_stream(nc_model, test, warmup=2)
    _assert_stream_on(frames, targets, META)
    assert nc_evaluate.model_device(nc_model) == META


def test_network_latency_does_not_time_host_to_device_copies(nc_model, nc_subject, monkeypatch):
    frames, scored, _ = nc_evaluate.build_stream(nc_model, FrameDataset(nc_subject, "test"), warmup=1)
    copies = []  # (timed?, from, to) of every FrameInputs.to that changes device
    state = {"timing": False}
    real_to = FrameInputs.to

    def to(self, device):
        if self.view_dirs.device != torch.device(device):
            copies.append((state["timing"], str(self.view_dirs.device), str(device)))
        return real_to(self, device)

    def fake_time_fn(fn, *, repeats, warmup, device):
        state["timing"] = True
        try:
            fn()
        finally:
            state["timing"] = False
        return {"median_ms": 1.0}

    monkeypatch.setattr(FrameInputs, "to", to)
    monkeypatch.setattr(nc_evaluate, "time_fn", fake_time_fn)
    out = nc_evaluate.network_latencies(nc_model, frames[scored[0]], "meta", repeats=1)  # a worker on "meta"
    assert set(out) == {"generator", "warp"}
    assert copies and all(not timed for timed, _, _ in copies), copies  # copied, but never while timed
