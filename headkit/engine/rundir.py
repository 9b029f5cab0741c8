"""The run directory: creation without clobbering, the saved config, and metrics.json.

A run directory holds ``config.yaml`` (resolved), TensorBoard events, ``scalars.jsonl``,
``checkpoints/``, rendered images and ``metrics.json``. Hydra may already have created it
(``hydra.run.dir``) and put its own ``.hydra/`` folder and ``*.log`` file there; those do not
count as a previous run. Neither does a run that stopped before its first optimisation step
(a bad data path, a crash in the warm-up): the trainer marks a new run folder with
:data:`NOT_STARTED` until the first step is done, and such a folder is cleared and reused.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import socket
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from headkit.engine.files import atomic_write_text, to_jsonable

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.json"
#: marker file of a run folder whose run has not completed an optimisation step yet
NOT_STARTED = ".not_started"

log = logging.getLogger(__name__)


def _hydra_run_dir(run_dir, resume, default):
    """``${hydra_run_dir:run_dir,resume,default}`` (configs/hydra/default.yaml): Hydra's own
    folder (``.hydra/``, the log) goes to ``run_dir`` when one is given and it is free or being
    resumed; otherwise to ``default`` (a dated folder), so Hydra never writes into another
    run's folder (the engine then picks ``run_dir-1``, see :func:`make_run_dir`)."""
    if run_dir is None:
        return default
    if resume or not holds_run(Path(str(run_dir))):
        return str(run_dir)
    return default


if not OmegaConf.has_resolver("hydra_run_dir"):
    OmegaConf.register_new_resolver("hydra_run_dir", _hydra_run_dir)


def _run_entries(path: Path) -> list[Path]:
    """Entries of ``path`` that belong to a run (everything but Hydra's bookkeeping)."""
    if not path.is_dir():
        return []
    return [p for p in path.iterdir() if p.name != ".hydra" and p.suffix != ".log"]


def _stopped(owner: str) -> bool:
    """Whether the process named by a :data:`NOT_STARTED` marker (``host pid``) has stopped: it
    is this process (an earlier call that failed) or a process of this host that is gone. A
    process of another host (a shared file system) counts as running, so is one still alive
    (e.g. in a long warm-up): its folder is never cleared under it."""
    host, _, pid = owner.partition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def not_started(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds only a run that stopped before its first optimisation step: it
    has the :data:`NOT_STARTED` marker of a process that is no longer running, and neither a
    checkpoint nor ``metrics.json``."""
    path = Path(path)
    marker = path / NOT_STARTED
    if not marker.is_file() or (path / METRICS_NAME).exists():
        return False
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.glob("*.pt")):
        return False
    try:
        owner = marker.read_text().splitlines()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return False
    return _stopped(owner)


def holds_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a previous run: anything but Hydra's ``.hydra/`` and ``*.log``,
    unless it is a run that never started (:func:`not_started`)."""
    return bool(_run_entries(Path(path))) and not not_started(path)


def mark_not_started(run_dir: str | os.PathLike) -> None:
    """Mark ``run_dir`` as holding a run of this process with no optimisation step done yet (the
    trainer, before it writes anything else there), so a failed start does not block the folder."""
    atomic_write_text(Path(run_dir) / NOT_STARTED, f"{socket.gethostname()} {os.getpid()}\n"
                      "no optimisation step done yet: once this process has stopped, the next run "
                      "given this folder clears and reuses it\n")


def mark_started(run_dir: str | os.PathLike) -> None:
    """Remove the :data:`NOT_STARTED` marker (after the first optimisation step)."""
    (Path(run_dir) / NOT_STARTED).unlink(missing_ok=True)


def _clear(path: Path) -> None:
    """Delete the run files of ``path`` (not Hydra's ``.hydra/`` and ``*.log``)."""
    for entry in _run_entries(path):
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _reuse_if_not_started(path: Path) -> None:
    if not_started(path):
        log.info("run folder %s holds a run that stopped before its first step; reusing it", path)
        _clear(path)


def make_run_dir(root: str | os.PathLike, name: str | None = None, *, overwrite: bool = False,
                 resume: bool = False, hint: str | None = None) -> Path:
    """Create (or pick) the folder for a run, never silently reusing a previous run's.

    The candidate is ``root/name``, or ``root`` itself when ``name`` is None (a folder given
    by Hydra). If it holds no run yet (missing, empty, or only Hydra's ``.hydra/`` and
    ``*.log``) it is used; so is one whose run stopped before its first step
    (:func:`not_started`), after its run files are deleted. Otherwise:

    * ``resume=True``: it is returned as is, to continue from its checkpoints;
    * ``overwrite=True``: its run files are deleted first (only if it has a ``config.yaml``,
      i.e. it is recognisably a run folder; anything else is refused);
    * neither: the first free sibling ``NAME-1``, ``NAME-2``, ... is created and a warning
      names both folders, followed by ``hint`` (the caller's own way to continue the run,
      spelled as its command line takes it, e.g. ``trainer.resume=true run_dir=...``).

    Returns the run folder, created.
    """
    if overwrite and resume:
        raise ValueError("make_run_dir: overwrite=True and resume=True contradict each other")
    root = Path(root)
    candidate = root / name if name is not None else root
    _reuse_if_not_started(candidate)
    entries = _run_entries(candidate)
    if entries and resume:
        return candidate
    if entries and overwrite:
        if not (candidate / CONFIG_NAME).is_file():
            raise FileExistsError(f"refusing to overwrite {candidate}: it has no {CONFIG_NAME}, so "
                                  "it does not look like a run folder; delete it by hand")
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        return candidate
    if entries:
        index = 1
        while holds_run(candidate.with_name(f"{candidate.name}-{index}")):
            index += 1
        fresh = candidate.with_name(f"{candidate.name}-{index}")
        _reuse_if_not_started(fresh)
        warnings.warn(f"run folder {candidate} already holds a run; writing to {fresh} instead"
                      + (f" ({hint})" if hint else ""), UserWarning, stacklevel=2)
        candidate = fresh
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def save_config(run_dir: str | os.PathLike, cfg: DictConfig | Mapping) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` atomically; returns the path."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    path = Path(run_dir) / CONFIG_NAME
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(dict(cfg))))
    return path


def load_config(run_dir: str | os.PathLike) -> DictConfig:
    """Read ``run_dir/config.yaml``; FileNotFoundError names the path when it is absent."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no saved config at {path}")
    return OmegaConf.load(path)


class ConfigMismatch(ValueError):
    """Resuming with a config that differs from the saved one; ``differences`` lists
    ``(dotted_key, saved_value, new_value)``; a missing side is the string ``"<absent>"``."""

    def __init__(self, differences: list[tuple[str, object, object]]):
        self.differences = differences
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in differences)
        super().__init__(f"config differs from the saved run in {len(differences)} key(s) "
                         f"(saved -> new):\n{lines}")


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    flat = {}
    for k, v in items:
        flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    if not flat and prefix:  # keep empty containers visible
        flat[prefix] = obj
    return flat


def _ignored(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in patterns)


def check_config_compatible(saved_cfg: DictConfig | Mapping, cfg: DictConfig | Mapping,
                            ignore: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigMismatch` unless the two resolved configs agree.

    Both are flattened to dotted keys (``model.graph.k``, list items as ``a.b.0``).
    ``ignore`` holds keys that may change on resume (e.g. ``trainer.max_steps``, ``device``):
    an entry matches the key itself, everything under it, or is an fnmatch glob
    (``logging.*``).
    """
    def plain(c):
        return OmegaConf.to_container(c, resolve=True) if isinstance(c, (DictConfig, ListConfig)) else c

    old, new = _flatten(plain(saved_cfg)), _flatten(plain(cfg))
    absent = "<absent>"
    differences = [(k, old.get(k, absent), new.get(k, absent)) for k in sorted(set(old) | set(new))
                   if not _ignored(k, ignore) and old.get(k, absent) != new.get(k, absent)]
    if differences:
        raise ConfigMismatch(differences)


def write_metrics(run_dir: str | os.PathLike, metrics: Mapping, *, merge: bool = False) -> Path:
    """Write ``run_dir/metrics.json`` atomically (temp file, fsync, rename).

    Values go through :func:`~headkit.engine.files.to_jsonable`: tensors become numbers,
    ``None`` stays ``null``, and NaN/Inf become ``null`` with the reason recorded under
    ``"_nonfinite": {key: "nan"|"inf"|"-inf"}`` (and a warning), so the file is strict JSON.
    ``merge=True`` updates an existing file's top-level keys instead of replacing it.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"write_metrics expects a mapping, got {type(metrics).__name__}")
    path = Path(run_dir) / METRICS_NAME
    nonfinite: dict[str, str] = {}
    data = to_jsonable(metrics, nonfinite)
    if merge and path.is_file():
        data = {**read_metrics(run_dir), **data}
    if nonfinite:
        warnings.warn(f"{path}: non-finite values written as null: {nonfinite}", RuntimeWarning,
                      stacklevel=2)
        data["_nonfinite"] = {**data.get("_nonfinite", {}), **nonfinite}
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    return path


def read_metrics(run_dir: str | os.PathLike) -> dict:
    """Load ``run_dir/metrics.json``; errors name the file."""
    path = Path(run_dir) / METRICS_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no metrics file at {path}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
