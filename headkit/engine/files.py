"""Crash-safe file writes and JSON-safe conversion for run artefacts."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory entry to disk so a preceding rename survives a power loss.

    Silently skipped where directories cannot be opened (Windows).
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_for(path: str | os.PathLike) -> Path:
    """Hidden temp name beside ``path`` (``.NAME.tmp-PID``): same filesystem, so the final
    ``os.replace`` is atomic, and it never matches globs for the real files."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temp file that replaces ``path`` only after the block finishes without error.

    Sequence: write temp, flush, fsync, ``os.replace``, fsync the folder. A crash or kill at
    any point leaves either the old ``path`` or the new one, never a partial file; on an
    exception the temp file is removed and the exception propagates.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def to_jsonable(obj, nonfinite: dict | None = None, key: str = ""):
    """Convert metrics-like values to plain JSON types.

    Tensors and numpy values become numbers or lists, paths/devices/dtypes strings, OmegaConf
    containers plain ones. NaN and +-Inf become ``None`` (strict JSON has no NaN); when
    ``nonfinite`` is a dict, ``nonfinite[dotted_key] = "nan" | "inf" | "-inf"`` records why.

    Raises:
        TypeError: for a value with no JSON form, naming its dotted key.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if math.isfinite(value):
            return value
        if nonfinite is not None:
            nonfinite[key or "<value>"] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        array = obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj
        return to_jsonable(array.tolist() if array.ndim else array.item(), nonfinite, key)
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # omegaconf is a dependency; the guard keeps this helper standalone
        pass
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, nonfinite, f"{key}.{k}" if key else str(k))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, nonfinite, f"{key}.{i}" if key else str(i)) for i, v in enumerate(obj)]
    raise TypeError(f"cannot write '{key or '<value>'}' as JSON: unsupported type {type(obj).__name__}")
