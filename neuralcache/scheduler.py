"""Sequential and parallel execution of neural caching (the paper's Section 4.1 and Algorithm 1).

A *worker* owns one device and the cache that lives on it. It does two things:

* ``worker.cache(frame)``: run the generator G on ``frame``, keep the resulting cache C_t (on
  its device, replacing the previous one) and return G's output for the frame;
* ``worker.warp(frame)``: run the warp W from its latest cache and return the output.

The renderers decide, for every frame index ``t``, which worker does what (a *plan*), feed
the workers through queues, and hand outputs back in input order. They never look inside
frames or outputs, so the model code is injected (``make_worker(device) -> worker``) and the
scheduling can be tested with fake workers. :class:`FunctionWorker` turns two functions into
a worker.

Plans (``schedule=``; ``k = warp_distance``):

``"cache_first"`` (default; the offline evaluation and the training objective): frame ``t`` is
    cached if ``t % (k + 1) == 0`` and its image is G's; frames ``t+1 .. t+k`` are warped from
    that cache. Cache group ``g = t // (k + 1)`` runs entirely on worker ``g % N``, so the cache
    never leaves its device and every frame gets exactly the same computation whatever the
    number of workers: parallel outputs equal sequential ones. ``k = 0`` is plain
    frame-parallel G (the DNR+/DNR++ baselines).

``"algorithm1"`` (the paper's online, latency-first mode): every frame after the first is
    *warped*; caches are computed alongside. With one worker (Figure 4 top): frames with
    ``t % k == 0`` are warped from the cache of frame ``t - k``, then cached; the others are
    warped from the latest cache (warp distances ``k, 1, .., k-1``). With ``N >= 2`` workers
    (Algorithm 1 generalised, Figure 4 bottom): the cache of group ``j = t // k`` is built on
    worker ``j % N`` while the frames of group ``j`` are warped on worker ``(j - 1) % N`` from
    the cache of frame ``(j - 1) k`` (distances ``k .. 2k-1``); roles rotate every group, and a
    new cache job waits on the cache-done queue until the previous one finished, exactly as
    the main thread of Algorithm 1 does (``cache_queue.get()`` before switching roles). Frame
    0 (nothing cached yet) is G's image.

Queues (Algorithm 1): one input queue per worker, a cache-done queue and an output queue;
the main thread reorders outputs by frame index, so frames come out in input order, each
exactly once.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

__all__ = ["Worker", "FunctionWorker", "WorkerError", "Job", "plan_frame", "SequentialRenderer",
           "ParallelRenderer", "THREAD_PREFIX"]

THREAD_PREFIX = "neuralcache-worker"
_SENTINEL = object()  # tells a worker thread to exit
_WAKE = object()  # wakes the main thread after a worker failed
_END = object()  # the input frames are exhausted


class Worker(Protocol):
    """One device's model: ``cache`` runs G and keeps C_t, ``warp`` runs W from it."""

    def cache(self, frame: Any) -> Any: ...

    def warp(self, frame: Any) -> Any: ...


class FunctionWorker:
    """A :class:`Worker` from two functions; the cache is whatever ``cache_fn`` returns second.

    ``cache_fn(frame) -> (output, cache)``; ``warp_fn(cache, frame) -> output``.
    """

    def __init__(self, cache_fn: Callable[[Any], tuple[Any, Any]], warp_fn: Callable[[Any, Any], Any]) -> None:
        self.cache_fn, self.warp_fn, self.state = cache_fn, warp_fn, None

    def cache(self, frame: Any) -> Any:
        """Run G, keep its cache, return its output."""
        output, self.state = self.cache_fn(frame)
        return output

    def warp(self, frame: Any) -> Any:
        """Warp ``frame`` from the kept cache."""
        if self.state is None:
            raise RuntimeError("warp requested before any frame was cached on this worker")
        return self.warp_fn(self.state, frame)


class WorkerError(RuntimeError):
    """A worker failed; names its device, the frame index and the operation."""

    def __init__(self, device: str, index: int | None, op: str, cause: BaseException) -> None:
        where = f"frame {index}" if index is not None else "setup"
        super().__init__(f"worker on device {device!r} failed in {op} ({where}): "
                         f"{type(cause).__name__}: {cause}")
        self.device, self.index, self.op, self.cause = device, index, op, cause


class Job(NamedTuple):
    """One unit of work for frame ``t``: ``op`` in {"cache", "warp"} on worker ``worker``;
    ``emit`` says whether its result is the frame's output."""

    worker: int
    op: str
    emit: bool


def plan_frame(t: int, warp_distance: int, num_workers: int, schedule: str = "cache_first") -> list[Job]:
    """The jobs of frame ``t`` under ``schedule`` (see the module docstring), in dispatch order.

    Exactly one job per frame has ``emit=True``.
    """
    k, n = warp_distance, num_workers
    if schedule == "cache_first":
        g = t // (k + 1)
        return [Job(g % n, "cache" if t % (k + 1) == 0 else "warp", True)]
    if schedule != "algorithm1":
        raise ValueError(f"unknown schedule {schedule!r}; expected 'cache_first' or 'algorithm1'")
    if t == 0:
        return [Job(0, "cache", True)]
    if n == 1:
        return [Job(0, "warp", True), Job(0, "cache", False)] if t % k == 0 else [Job(0, "warp", True)]
    j = t // k
    if j == 0:  # bootstrap: the first group warps from frame 0's cache on worker 0
        return [Job(0, "warp", True)]
    warp = Job((j - 1) % n, "warp", True)
    return [Job(j % n, "cache", False), warp] if t % k == 0 else [warp]


def _check_args(warp_distance: int, schedule: str) -> None:
    if schedule not in ("cache_first", "algorithm1"):
        raise ValueError(f"unknown schedule {schedule!r}; expected 'cache_first' or 'algorithm1'")
    if warp_distance < (1 if schedule == "algorithm1" else 0):
        raise ValueError(f"warp_distance must be >= {1 if schedule == 'algorithm1' else 0} "
                         f"for schedule {schedule!r}, got {warp_distance}")


def _make_workers(devices: list[str], make_worker: Callable[[str], Worker]) -> list[Worker]:
    workers = []
    for device in devices:
        try:
            workers.append(make_worker(device))
        except Exception as e:
            raise WorkerError(device, None, "make_worker", e) from e
    return workers


class SequentialRenderer:
    """All of a plan's jobs on one worker, in the calling thread (the latency mode).

    Same API as :class:`ParallelRenderer`; with ``schedule="cache_first"`` its outputs are the
    reference the parallel renderer must reproduce.
    """

    def __init__(self, device: str, make_worker: Callable[[str], Worker], warp_distance: int = 1,
                 schedule: str = "cache_first") -> None:
        _check_args(warp_distance, schedule)
        self.device, self.warp_distance, self.schedule = device, warp_distance, schedule
        self.worker = _make_workers([device], make_worker)[0]
        self.latencies_s: list[float] = []

    def run(self, frames: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, output)`` for every frame, in order. ``latencies_s[t]`` is the time
        from taking frame ``t`` to having its output; a cache job that follows the output (the
        ``"algorithm1"`` plan) is not part of it, as it runs while the next input is awaited."""
        self.latencies_s = []
        for t, frame in enumerate(frames):
            start, output = time.perf_counter(), None
            for job in plan_frame(t, self.warp_distance, 1, self.schedule):
                try:
                    result = getattr(self.worker, job.op)(frame)
                except Exception as e:
                    raise WorkerError(self.device, t, job.op, e) from e
                if job.emit:
                    output = result
                    self.latencies_s.append(time.perf_counter() - start)
            yield t, output

    def close(self) -> None:
        """Nothing to release (no threads); for API symmetry."""

    def __enter__(self) -> SequentialRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Run:
    """One :meth:`ParallelRenderer.run`: its queues, frames dispatched and output, outputs
    waiting for their turn (with their dispatch and arrival times), cache jobs in flight."""

    stop: threading.Event
    in_qs: list[queue.Queue]  # one per worker
    cache_q: queue.Queue  # cache-done notices
    out_q: queue.Queue  # (t, output)
    max_caches: int  # cache jobs allowed in flight
    caches_in_flight: int = 0
    dispatched: int = 0
    next_out: int = 0
    pending: dict[int, Any] = field(default_factory=dict)
    starts: dict[int, float] = field(default_factory=dict)
    arrivals: dict[int, float] = field(default_factory=dict)


class ParallelRenderer:
    """Algorithm 1: one thread per device, alternating caching and warping.

    Args:
        devices: one worker per entry (``["cuda:0", "cuda:1"]``; ``["cpu", "cpu"]`` in tests).
        make_worker: builds the worker of a device (called here, in the constructor).
        warp_distance: ``k``, warps per cache.
        schedule: ``"cache_first"`` or ``"algorithm1"`` (module docstring).
        max_in_flight: frames dispatched but not yet yielded (default ``N * (k + 1)``); 1 is
            Algorithm 1's strict "post frame t, wait for its output" loop.
        join_timeout_s: how long :meth:`close` waits for each thread (a thread busy inside a
            long G call finishes that call first).

    Use it as a context manager (or call :meth:`close`): leaving the block - normally, by an
    exception, or by Ctrl-C - stops the workers, drains the queues and joins the threads. A
    worker exception reaches the caller as :class:`WorkerError` naming the device. After
    ``close()`` an unfinished ``run`` generator ends.
    """

    def __init__(self, devices: list[str], make_worker: Callable[[str], Worker], warp_distance: int = 1,
                 schedule: str = "cache_first", max_in_flight: int | None = None,
                 join_timeout_s: float = 10.0, poll_s: float = 0.05) -> None:
        if not devices:
            raise ValueError("ParallelRenderer needs at least one device")
        _check_args(warp_distance, schedule)
        self.devices = [str(d) for d in devices]
        self.warp_distance, self.schedule = warp_distance, schedule
        self.max_in_flight = max_in_flight or len(devices) * (warp_distance + 1)
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.join_timeout_s, self.poll_s = join_timeout_s, poll_s
        self.workers = _make_workers(self.devices, make_worker)
        self.latencies_s: list[float] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._running = False
        self._lock = threading.Lock()

    # ---- worker side -------------------------------------------------------------------
    def _worker_loop(self, i: int, stop: threading.Event, in_q: queue.Queue, cache_q: queue.Queue,
                     out_q: queue.Queue) -> None:
        worker = self.workers[i]
        while True:
            item = in_q.get()
            if item is _SENTINEL or stop.is_set():
                return
            t, frame, job = item
            try:
                result = getattr(worker, job.op)(frame)
            except BaseException as e:  # noqa: BLE001 - everything must reach the caller
                error = WorkerError(self.devices[i], t, job.op, e)
                error.__cause__ = e
                with self._lock:
                    if self._error is None:  # the first failure is the one reported
                        self._error = error
                stop.set()
                out_q.put(_WAKE)
                cache_q.put(_WAKE)
                return
            if job.op == "cache":
                cache_q.put((i, t))
            if job.emit:
                out_q.put((t, result))

    # ---- main side ---------------------------------------------------------------------
    def _get(self, q: queue.Queue, stop: threading.Event) -> Any:
        """Blocking get that raises the worker error, or returns ``_SENTINEL`` once closed."""
        while True:
            if self._error is not None:
                raise self._error
            if stop.is_set():
                return _SENTINEL
            try:
                item = q.get(timeout=self.poll_s)
            except queue.Empty:
                continue
            if item is not _WAKE:
                return item

    def run(self, frames: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, output)`` for every frame of ``frames``, in input order.

        ``latencies_s[t]`` is the time from taking frame ``t`` from ``frames`` to the main
        thread receiving its output (waits for a cache slot and queueing included). Outputs
        must be complete when a worker returns them: synchronise CUDA inside the worker.
        """
        if self._closed:
            raise RuntimeError("ParallelRenderer is closed")
        if self._running:
            raise RuntimeError("ParallelRenderer.run is already in progress")
        run = self._start()
        self.latencies_s = []
        source = iter(frames)
        exhausted = False
        try:
            while True:
                if (yield from self._emit_ready(run)):
                    return  # closed by the consumer while it held an output
                if exhausted and run.next_out == run.dispatched:
                    self._drain_caches(run)
                    return
                if not exhausted and run.dispatched - run.next_out < self.max_in_flight:
                    frame = next(source, _END)
                    exhausted = frame is _END
                    if not exhausted and not self._dispatch(run, frame):
                        return
                    continue
                if not self._receive(run):
                    return
        finally:
            self._shutdown()

    def _start(self) -> _Run:
        """Fresh queues and one started thread per worker for a :meth:`run`."""
        n = len(self.devices)
        run = _Run(stop=threading.Event(), in_qs=[queue.Queue() for _ in range(n)], cache_q=queue.Queue(),
                   out_q=queue.Queue(), max_caches=n if self.schedule == "cache_first" else max(1, n - 1))
        self._error, self._stop, self._queues = None, run.stop, run.in_qs + [run.cache_q, run.out_q]
        self._running = True
        self._threads = [
            threading.Thread(target=self._worker_loop, args=(i, run.stop, run.in_qs[i], run.cache_q, run.out_q),
                             name=f"{THREAD_PREFIX}-{i}-{d}", daemon=True)
            for i, d in enumerate(self.devices)]
        for th in self._threads:
            th.start()
        return run

    def _emit_ready(self, run: _Run) -> Iterator[tuple[int, Any]]:
        """Yield the received outputs that are next in input order; returns True when the run
        was stopped (closed) while the consumer held one."""
        while run.next_out in run.pending:
            t = run.next_out
            self.latencies_s.append(run.arrivals.pop(t) - run.starts.pop(t))
            yield t, run.pending.pop(t)
            run.next_out += 1
            if self._error is not None:
                raise self._error
            if run.stop.is_set():
                return True
        return False

    def _cache_done(self, run: _Run) -> bool:
        """Wait for one cache job to complete; False when the run was stopped meanwhile."""
        if self._get(run.cache_q, run.stop) is _SENTINEL:
            return False
        run.caches_in_flight -= 1
        return True

    def _drain_caches(self, run: _Run) -> None:
        """Let trailing cache jobs (no output of their own) finish, so their errors surface here
        instead of vanishing with the threads."""
        while run.caches_in_flight > 0:
            if not self._cache_done(run):
                return

    def _dispatch(self, run: _Run, frame: Any) -> bool:
        """Queue the jobs of the next frame; False when the run was stopped meanwhile."""
        t = run.dispatched
        run.starts[t] = time.perf_counter()
        for job in plan_frame(t, self.warp_distance, len(self.devices), self.schedule):
            if job.op == "cache":
                # Algorithm 1: wait for caching to complete before a new cache job.
                while run.caches_in_flight >= run.max_caches:
                    if not self._cache_done(run):
                        return False
                run.caches_in_flight += 1
            run.in_qs[job.worker].put((t, frame, job))
        run.dispatched += 1
        return True

    def _receive(self, run: _Run) -> bool:
        """Wait for one output and hold it until its turn; False when the run was stopped."""
        item = self._get(run.out_q, run.stop)
        if item is _SENTINEL:
            return False
        t, output = item
        if t in run.pending or t < run.next_out:
            raise RuntimeError(f"frame {t} was output twice")  # a worker bug, never silent
        run.pending[t] = output
        run.arrivals[t] = time.perf_counter()
        # Cache completions are consumed lazily; keep the count honest meanwhile.
        while True:
            try:
                item = run.cache_q.get_nowait()
            except queue.Empty:
                break
            if item is not _WAKE:
                run.caches_in_flight -= 1
        return True

    def _shutdown(self) -> None:
        """Stop the workers, drain the queues, join the threads (idempotent)."""
        if not self._running:
            return
        self._stop.set()
        for q in self._queues:
            while True:
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
        for q in self._queues[:len(self.devices)]:
            q.put(_SENTINEL)
        deadline = time.monotonic() + self.join_timeout_s
        for th in self._threads:
            th.join(timeout=max(0.0, deadline - time.monotonic()))
        alive = [th.name for th in self._threads if th.is_alive()]
        self._running = False
        if alive:
            warnings.warn(f"worker threads still busy after {self.join_timeout_s} s: {alive}; they "
                          "exit when their current job returns", RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        """Stop and join every worker thread; later ``run`` calls raise."""
        self._closed = True
        self._shutdown()

    def __enter__(self) -> ParallelRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
