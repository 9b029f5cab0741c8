"""CPU threads for training: ``trainer.num_threads: auto`` uses the cores nobody else is using.

Why (measured on the 2-core CPU machine, ``benchmarks/train_step.md``, "Threads and the OpenMP
wait policy"): torch's OpenMP threads either spin between operations (libgomp's default) or
sleep at once (``OMP_WAIT_POLICY=PASSIVE``). A training step is hundreds of small operations, so
on a quiet machine two sleeping threads are slower than one (a wake-up per operation: 8.8
against 12 steps/s on the default experiment), while two spinning threads are the fastest (15.4
steps/s). When another job keeps a core busy, spinning threads fight it for that core and the run
is 2-4x slower than with one thread. So the trainer keeps libgomp's spinning and chooses the
number of threads from the cores that are free: all usable cores on a quiet machine, fewer when
other processes are busy, checked again every ``check_seconds`` so a job that starts next to a
run (or ends) changes its thread count.

The load of *other* processes is the busy time of the usable CPUs (``/proc/stat``) minus this
process's own CPU time, over the time since the last check; where ``/proc/stat`` is missing
(macOS, Windows) ``auto`` uses every usable core. ``null`` keeps torch's default and an integer
fixes the count, as before; neither is changed during the run. The thread count can change the
last bits of reductions, so a run that must repeat bit for bit should fix it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from headkit.errors import InvalidConfigValue

log = logging.getLogger(__name__)

#: a core counts as taken once other processes use more than this fraction of it
#: (``threads = int(cpus - others + ROUND_UP)``)
ROUND_UP = 0.25


def affinity_cpus() -> Optional[set[int]]:
    """The CPUs this process may run on (its affinity mask), or None where that is unknown."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return None


def usable_cpus() -> int:
    """The most threads to use: the affinity mask's CPUs, capped by a cgroup v2 CPU quota and by
    ``OMP_NUM_THREADS`` when the user set it (e.g. for jobs that share a machine)."""
    cpus = affinity_cpus()
    count = len(cpus) if cpus is not None else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(float(quota) / float(period))))
    except (OSError, ValueError):
        pass
    try:
        count = min(count, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        pass
    return max(1, count)


@dataclass
class CpuSample:
    """Busy seconds of the affinity mask's CPUs (all processes), this process's CPU seconds, wall time."""

    busy: float
    own: float
    wall: float


def sample_cpu(stat_path: str = "/proc/stat") -> Optional[CpuSample]:
    """Now's :class:`CpuSample`, or None where ``stat_path`` cannot be read."""
    try:
        lines = Path(stat_path).read_text().splitlines()
    except OSError:
        return None
    cpus = affinity_cpus()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()) or (cpus is not None and int(name[3:]) not in cpus):
            continue
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy
        values = [int(v) for v in fields[:8]]
        busy += sum(values) - values[3] - values[4]
    return CpuSample(busy / tick, time.process_time(), time.perf_counter())


def others_busy(before: CpuSample, after: CpuSample) -> float:
    """Cores kept busy by other processes between two samples (never below 0)."""
    wall = max(after.wall - before.wall, 1e-6)
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / wall)


def threads_for(others: float, cpus: int, limit: Optional[int] = None) -> int:
    """Threads for ``cpus`` cores of which ``others`` are busy: the free ones, at least 1 and at
    most ``limit`` (default ``cpus``). ``cpus`` are the cores whose load was measured (the
    affinity mask); ``limit`` the cap of :func:`usable_cpus` (a cgroup quota, ``OMP_NUM_THREADS``),
    so a 2-CPU quota on a 64-core host counts the host's free cores, not 2 minus their load."""
    return max(1, min(cpus if limit is None else limit, int(cpus - others + ROUND_UP)))


def check_setting(setting, key: str = "trainer.num_threads") -> None:
    """Raise :class:`InvalidConfigValue` naming ``key`` unless ``setting`` is None, ``"auto"`` or
    an int >= 1."""
    if not (setting is None or setting == "auto"
            or (isinstance(setting, int) and not isinstance(setting, bool) and setting >= 1)):
        raise InvalidConfigValue(f"invalid config value {key}={setting!r}: must be null, auto or an integer >= 1")


class ThreadPolicy:
    """``trainer.num_threads`` (or ``key``, e.g. ``fit_3dgs.py``'s ``num_threads``): ``null``
    (torch's default), an integer, or ``auto`` (the free cores, re-checked every ``check_seconds``
    by :meth:`update`)."""

    def __init__(self, setting: Union[None, int, str], check_seconds: float = 5.0,
                 stat_path: str = "/proc/stat", key: str = "trainer.num_threads"):
        check_setting(setting, key)
        self.setting, self.check_seconds, self.stat_path, self.key = setting, float(check_seconds), stat_path, key
        self.cpus = usable_cpus()  # the most threads
        watched = affinity_cpus()  # the cores whose load sample_cpu measures
        self.watched = len(watched) if watched is not None else self.cpus
        self._last: Optional[CpuSample] = None

    def start(self, probe_seconds: float = 0.2) -> int:
        """Set the first thread count (``auto``: from the load over ``probe_seconds``); return it."""
        if self.setting is None:
            return torch.get_num_threads()
        if self.setting != "auto":
            torch.set_num_threads(int(self.setting))
            return int(self.setting)
        first = sample_cpu(self.stat_path)
        if first is None:
            torch.set_num_threads(self.cpus)
            return self.cpus
        time.sleep(probe_seconds)
        self._last = sample_cpu(self.stat_path)
        others = others_busy(first, self._last)
        torch.set_num_threads(threads_for(others, self.watched, self.cpus))
        log.info("%s=auto: %d thread(s) (at most %d; %.2f of %d CPU(s) busy with other work)",
                 self.key, torch.get_num_threads(), self.cpus, others, self.watched)
        return torch.get_num_threads()

    def update(self) -> Optional[int]:
        """``auto`` only: at most every ``check_seconds``, follow the other processes' load since
        the last check; the new thread count when it changed, else None."""
        if self.setting != "auto" or self._last is None:
            return None
        if time.perf_counter() - self._last.wall < self.check_seconds:
            return None
        now = sample_cpu(self.stat_path)
        if now is None:
            return None
        others, self._last = others_busy(self._last, now), now
        threads = threads_for(others, self.watched, self.cpus)
        if threads == torch.get_num_threads():
            return None
        torch.set_num_threads(threads)
        log.info("%s=auto: now %d thread(s) (%.2f of %d CPU(s) busy with other work)",
                 self.key, threads, others, self.watched)
        return threads
