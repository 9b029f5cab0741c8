"""Progress for long work: a tqdm bar on a terminal, log lines anywhere else.

Kept free of the run engine and of torch, so data preparation and downloads can report progress
without importing either.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from typing import Any


def progress_enabled() -> bool:
    """Bars are shown only on a terminal and when ``HEADKIT_NO_PROGRESS`` is unset or ``0``."""
    if os.environ.get("HEADKIT_NO_PROGRESS", "") not in ("", "0"):
        return False
    return sys.stderr.isatty()


def _duration(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``12s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class LineProgress:
    """Progress as log lines, for output that is not a terminal (a file, a pipe, a cluster job).

    Iterates like the tqdm bar it stands in for and accepts the same ``set_postfix``. A line
    ``desc step/total (pct%) rate it/s, elapsed, ETA | postfix`` goes to the ``headkit.progress``
    logger (INFO: the console and the run's ``train.log`` under Hydra) when at least ``every``
    items *and* ``min_seconds`` have passed since the last line, whichever comes later, and in any
    case after ``max_seconds``, so a slow run still reports at least once a minute; and once at
    the end. ``initial`` counts items done before (a resumed run); rates use this session only.
    """

    logger = logging.getLogger("headkit.progress")

    def __init__(self, iterable: Iterable, desc: str | None = None, total: int | None = None, initial: int = 0,
                 every: int = 1, min_seconds: float = 15.0, max_seconds: float = 60.0, unit: str = "it"):
        self.iterable, self.desc = iterable, desc or "progress"
        self.total = total if total is not None else (len(iterable) + initial if hasattr(iterable, "__len__") else None)
        self.initial, self.n = initial, initial
        self.every, self.min_seconds, self.max_seconds = max(1, int(every)), min_seconds, max_seconds
        self.postfix: dict[str, Any] = {}
        self.unit = unit
        self._start = self._last_time = time.perf_counter()
        self._last_n, self._closed = initial, False

    def set_postfix(self, **values: Any) -> None:
        """Values shown after ``|`` on the next line (as tqdm's ``set_postfix``)."""
        self.postfix = values

    def line(self, elapsed: float) -> str:
        """The text of one progress line after ``elapsed`` seconds of this session."""
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc} {self.n}" + (f"/{self.total} ({100.0 * self.n / max(self.total, 1):.0f}%)"
                                            if self.total else "")]
        parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1.0 / rate:.2f} s/{self.unit}")
        parts.append(f"{_duration(elapsed)} elapsed")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        text = ", ".join(parts)
        if self.postfix:
            text += " | " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done; log a line when one is due."""
        self.n += n
        now = time.perf_counter()
        due = (self.n - self._last_n >= self.every and now - self._last_time >= self.min_seconds) \
            or now - self._last_time >= self.max_seconds
        if due and self.n != self.total:
            self._emit(now)

    def close(self) -> None:
        """The final line (once), unless nothing happened since the last one."""
        if not self._closed and (self.n > self._last_n or self.n == self.initial):
            self._emit(time.perf_counter())
        self._closed = True

    def _emit(self, now: float) -> None:
        self.logger.info(self.line(now - self._start))
        self._last_time, self._last_n = now, self.n

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()


def progress(iterable: Iterable | int, desc: str | None = None, enabled: bool | None = None,
             every: int = 1, min_seconds: float = 15.0, **tqdm_kwargs):
    """A tqdm bar over ``iterable`` (an int ``n`` means ``range(n)``) on a terminal; elsewhere,
    or when bars are disabled, a :class:`LineProgress` that logs a line every ``every`` items or
    ``min_seconds``, whichever comes later (and at least once a minute). ``enabled=None``
    follows :func:`progress_enabled`."""
    if isinstance(iterable, int):
        iterable = range(iterable)
    if enabled is None:
        enabled = progress_enabled()
    if not enabled:
        return LineProgress(iterable, desc, total=tqdm_kwargs.get("total"), initial=tqdm_kwargs.get("initial", 0),
                            every=every, min_seconds=min_seconds, unit=tqdm_kwargs.get("unit", "it"))
    from tqdm import tqdm  # only a bar needs it

    return tqdm(iterable, desc=desc, dynamic_ncols=True, **tqdm_kwargs)
