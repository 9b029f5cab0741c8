"""Algorithm 1 scheduler: order, completeness, plans, error propagation, shutdown, determinism."""

from __future__ import annotations

import copy
import random
import threading
import time

import pytest
import torch

from neuralcache.generators import DNRPlus
from neuralcache.scheduler import (THREAD_PREFIX, FunctionWorker, Job, ParallelRenderer,
                                   SequentialRenderer, WorkerError, plan_frame)
from neuralcache.texture import NeuralTexture
from neuralcache.warp import Cache, FrameParams, ImplicitWarp, pose_sh


def _worker_threads() -> list[threading.Thread]:
    return [th for th in threading.enumerate() if th.name.startswith(THREAD_PREFIX)]


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    """Every test must end with all worker threads joined."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; two worker threads already fill the two cores
    yield
    torch.set_num_threads(before)
    assert _worker_threads() == []


class FakeWorker:
    """Records which cache each warp used; sleeps a random time per call."""

    def __init__(self, device: str, seed: int, max_delay: float = 0.003, fail_at: int | None = None):
        self.device, self.rng, self.max_delay, self.fail_at = device, random.Random(seed), max_delay, fail_at
        self.cached = None

    def _work(self, frame):
        time.sleep(self.rng.uniform(0, self.max_delay))
        if frame == self.fail_at:
            raise ValueError(f"boom at {frame}")

    def cache(self, frame):
        self._work(frame)
        self.cached = frame
        return ("G", frame, self.device)

    def warp(self, frame):
        self._work(frame)
        return ("W", frame, self.cached)


def _expected_source(t: int, k: int, n: int, schedule: str) -> tuple[str, int]:
    """Independent statement of the plans: (network, frame whose cache is used)."""
    if schedule == "cache_first":
        return ("G", t) if t % (k + 1) == 0 else ("W", t - t % (k + 1))
    if t == 0:
        return ("G", 0)
    if n == 1:
        return ("W", t - k) if t % k == 0 else ("W", t - t % k)
    return ("W", max(0, (t // k - 1) * k))


def test_plans_by_hand():
    assert [plan_frame(t, 2, 2) for t in range(7)] == [
        [Job(0, "cache", True)], [Job(0, "warp", True)], [Job(0, "warp", True)],
        [Job(1, "cache", True)], [Job(1, "warp", True)], [Job(1, "warp", True)], [Job(0, "cache", True)]]
    # Algorithm 1, two workers, two warps per cache: roles alternate every group.
    assert [plan_frame(t, 2, 2, "algorithm1") for t in range(6)] == [
        [Job(0, "cache", True)], [Job(0, "warp", True)],
        [Job(1, "cache", False), Job(0, "warp", True)], [Job(0, "warp", True)],
        [Job(0, "cache", False), Job(1, "warp", True)], [Job(1, "warp", True)]]
    # One device: warp first (low latency), then refresh the cache.
    assert plan_frame(2, 2, 1, "algorithm1") == [Job(0, "warp", True), Job(0, "cache", False)]
    for schedule, k in (("cache_first", 0), ("cache_first", 3), ("algorithm1", 1), ("algorithm1", 3)):
        for n in (1, 2, 3):
            assert all(sum(j.emit for j in plan_frame(t, k, n, schedule)) == 1 for t in range(20))
    with pytest.raises(ValueError, match="unknown schedule"):
        plan_frame(0, 1, 1, "round_robin")


@pytest.mark.parametrize("schedule,k", [("cache_first", 0), ("cache_first", 2), ("algorithm1", 1), ("algorithm1", 2)])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_random_delays_keep_order_and_every_frame_once(schedule, k, n):
    for seed in range(3):
        devices = [f"dev{i}" for i in range(n)]
        with ParallelRenderer(devices, lambda d: FakeWorker(d, seed * 10 + int(d[3:])), warp_distance=k,
                              schedule=schedule) as r:
            outs = list(r.run(range(17)))
        assert [t for t, _ in outs] == list(range(17))
        for t, (net, frame, source) in outs:
            assert frame == t
            assert (net, t if net == "G" else source) == _expected_source(t, k, n, schedule), (t, net, source)
        assert len(r.latencies_s) == 17 and all(x >= 0 for x in r.latencies_s)
        seq = SequentialRenderer("dev0", lambda d: FakeWorker(d, seed), warp_distance=k, schedule=schedule)
        seq_outs = [(t, o[:2]) for t, o in seq.run(range(17))]
        if schedule == "cache_first" or n == 1:  # same computation per frame as sequential
            assert seq_outs == [(t, o[:2]) for t, o in outs]


def test_worker_error_reaches_caller_with_device_and_threads_are_joined():
    def make(d):
        return FakeWorker(d, 0, fail_at=5 if d == "cpu:1" else None)
    r = ParallelRenderer(["cpu:0", "cpu:1"], make, warp_distance=0)  # odd frames on cpu:1
    got = []
    with pytest.raises(WorkerError, match=r"device 'cpu:1' failed in cache \(frame 5\): ValueError: boom at 5") as info:
        for t, _ in r.run(range(50)):
            got.append(t)
            time.sleep(0.02)  # a slow consumer: the failure happens while it holds an output
    assert info.value.device == "cpu:1" and info.value.index == 5
    assert isinstance(info.value.__cause__, ValueError)
    assert got == list(range(len(got))) and len(got) <= 5
    assert _worker_threads() == []
    # A failing cache job that emits nothing (Algorithm 1) still reaches the caller.
    with ParallelRenderer(["a", "b"], lambda d: FakeWorker(d, 0, fail_at=4 if d == "a" else None),
                          warp_distance=2, schedule="algorithm1") as r:
        with pytest.raises(WorkerError, match=r"device 'a' failed in cache \(frame 4\)"):
            list(r.run(range(5)))
    with pytest.raises(WorkerError, match="'cpu:1' failed in make_worker"):
        ParallelRenderer(["cpu:0", "cpu:1"], lambda d: 1 / 0 if d == "cpu:1" else FakeWorker(d, 0))
    with pytest.raises(WorkerError, match="'cpu' failed in warp \\(frame 1\\)"):
        list(SequentialRenderer("cpu", lambda d: FakeWorker(d, 0, fail_at=1)).run(range(3)))


def test_close_mid_stream_joins_everything():
    r = ParallelRenderer(["a", "b"], lambda d: FakeWorker(d, 1), warp_distance=1)
    stream = r.run(range(1000))
    assert [next(stream)[0] for _ in range(3)] == [0, 1, 2]
    assert len(_worker_threads()) == 2
    r.close()
    assert _worker_threads() == []
    assert list(stream) == []  # the stream ends after close
    with pytest.raises(RuntimeError, match="closed"):
        next(r.run(range(3)))


def test_interrupts_stop_and_join_workers():
    def frames():
        yield from range(6)
        raise KeyboardInterrupt  # Ctrl-C while the main thread feeds frames
    with pytest.raises(KeyboardInterrupt):
        with ParallelRenderer(["a", "b"], lambda d: FakeWorker(d, 2), warp_distance=1) as r:
            for _ in r.run(frames()):
                pass
    assert _worker_threads() == []
    with pytest.raises(KeyboardInterrupt):
        with ParallelRenderer(["a", "b"], lambda d: FakeWorker(d, 3, max_delay=0.02), warp_distance=1) as r:
            for t, _ in r.run(range(1000)):
                if t == 3:
                    raise KeyboardInterrupt  # Ctrl-C in the consumer
    assert _worker_threads() == []


def test_two_workers_overlap_in_time():
    """Work that releases the GIL (sleep here; CUDA kernels or MKL in practice) runs concurrently."""
    class Slow:
        def cache(self, frame):
            time.sleep(0.04)
            return frame

        def warp(self, frame):
            return frame

    start = time.perf_counter()
    list(SequentialRenderer("a", lambda d: Slow(), warp_distance=0).run(range(8)))
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    with ParallelRenderer(["a", "b"], lambda d: Slow(), warp_distance=0) as r:
        list(r.run(range(8)))
    assert time.perf_counter() - start < 0.8 * sequential


def _real_worker_factory(H=32, W=32):
    """Tiny texture + DNR+ + implicit warp, copied onto each 'device' like real GPUs."""
    torch.manual_seed(0)
    tex = NeuralTexture(num_channels=16, resolution=32, num_levels=2)
    G = DNRPlus(channels=(12, 16, 16))
    Wp = ImplicitWarp(tuple(G.feature_channels.values()), expr_dim=4, mlp_dim=4)
    modules = torch.nn.ModuleList([tex, G, Wp]).eval()

    def make(device: str) -> FunctionWorker:
        tex_d, G_d, W_d = copy.deepcopy(modules).to(device)

        @torch.no_grad()
        def cache_fn(frame):
            params = frame["params"].to(device)
            out = G_d(tex_d(params.uvs, params.masks, frame["dirs"].to(device)), return_features=True)
            return out["images"], Cache(out["features"], params)

        @torch.no_grad()
        def warp_fn(cache, frame):
            return W_d(cache, frame["params"].to(device))["images"]

        return FunctionWorker(cache_fn, warp_fn)

    g = torch.Generator().manual_seed(1)
    frames = []
    for _ in range(7):
        params = FrameParams(torch.randn(1, 6, generator=g), torch.randn(1, 3, generator=g),
                             torch.randn(1, 4, generator=g), pose_sh(0.2 * torch.randn(1, 3, generator=g)),
                             torch.rand(1, H, W, 2, generator=g), (torch.rand(1, H, W, generator=g) > 0.2).float())
        frames.append({"params": params, "dirs": torch.randn(1, 3, generator=g)})
    return make, frames


@pytest.mark.parametrize("k", [1, 2])
def test_real_modules_on_two_cpu_devices_equal_sequential(k):
    make, frames = _real_worker_factory()
    seq = [o for _, o in SequentialRenderer("cpu", make, warp_distance=k).run(frames)]
    with ParallelRenderer(["cpu", "cpu"], make, warp_distance=k) as r:
        par = list(r.run(frames))
    assert [t for t, _ in par] == list(range(len(frames)))
    for t, out in par:
        assert out.shape == (1, 32, 32, 3)
        assert torch.equal(out, seq[t]), f"frame {t} differs"
    # Warped frames really come from W (not a copy of the cached frame's image).
    assert not torch.allclose(seq[1], seq[0])
