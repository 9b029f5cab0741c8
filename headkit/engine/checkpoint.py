"""Atomic, pruned, corruption-tolerant checkpoints and resuming from them.

Files are ``DIR/ckpt_{step:08d}.pt`` (torch's zip format). Writing goes through a hidden temp
file, fsync and rename, so a kill mid-write leaves the previous checkpoints untouched and no
partial ``ckpt_*.pt``. Loading checks every zip member's CRC before unpickling, so truncated
*and* bit-flipped files are caught, and then loads with ``weights_only=True``.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from headkit.engine.files import atomic_open
from headkit.engine.seed import capture_rng_state, restore_rng_state
from headkit.errors import InvalidConfigValue


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint file is truncated, not a torch file, or fails its CRC check."""


class CorruptCheckpointWarning(RuntimeWarning):
    """Emitted when :meth:`CheckpointManager.latest_valid` skips a corrupt file."""


class NothingToResume(CheckpointError, InvalidConfigValue):
    """A resume that cannot continue the run: every checkpoint is unreadable (the message names
    each file and why), or the run has records but no checkpoint. Never a silent restart from
    step 0 over the old run. Also an :class:`~headkit.errors.InvalidConfigValue` (the request
    to resume cannot be honoured), so the scripts print it as one ``error:`` line; ``hint``
    says what to do."""

    hint: str | None = None


def _pid_alive(pid: str) -> bool:
    """Whether process ``pid`` exists (True when unsure, so nothing live gets deleted)."""
    if not pid.isdigit() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate it
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class CheckpointManager:
    """Saves and finds checkpoints in one folder.

    Args:
        directory: created if missing. Temp files left by killed writers (their process is
            gone) are removed here; one writer per folder is assumed.
        keep: numbered checkpoints kept after each save (oldest deleted); None keeps all.
            Named ones (:meth:`save_named`, e.g. ``best``) are never pruned.
        verify: check zip CRCs before loading (reads the file twice; cheap next to training).
    """

    def __init__(self, directory: str | Path, keep: int | None = 3, prefix: str = "ckpt",
                 verify: bool = True):
        if keep is not None and keep < 1:
            raise ValueError(f"CheckpointManager: keep must be >= 1 or None, got {keep}")
        self.directory = Path(directory)
        self.keep, self.prefix, self.verify = keep, prefix, verify
        self._pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.pt$")
        self.directory.mkdir(parents=True, exist_ok=True)
        for temp in self.directory.glob(".*.pt.tmp-*"):
            if not _pid_alive(temp.name.rsplit("-", 1)[-1]):  # a live writer's file stays
                temp.unlink(missing_ok=True)

    def path_for(self, step: int) -> Path:
        """File name of the checkpoint for ``step``."""
        return self.directory / f"{self.prefix}_{step:08d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Numbered checkpoints as ``(step, path)``, oldest first."""
        found = []
        for path in self.directory.iterdir():
            match = self._pattern.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, state: Mapping, step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step`` atomically, then prune.

        Pruning keeps this checkpoint and the ``keep - 1`` newest older ones. Files of later
        steps are left alone: after falling back past corrupt checkpoints they are the
        corrupt ones (overwritten when the run reaches their steps), and counting them would
        delete the good checkpoints just written.
        """
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        path = self.path_for(step)
        self._write(state, path)
        if self.keep is not None:
            older = [p for s, p in self.checkpoints() if s < step]
            for old in older[:max(0, len(older) - (self.keep - 1))]:
                old.unlink(missing_ok=True)
        return path

    def save_named(self, state: Mapping, name: str) -> Path:
        """Write ``DIR/{name}.pt`` atomically (e.g. ``best``); never pruned."""
        if self._pattern.match(f"{name}.pt") or "/" in name:
            raise ValueError(f"checkpoint name {name!r} clashes with numbered checkpoints or has '/'")
        path = self.directory / f"{name}.pt"
        self._write(state, path)
        return path

    @staticmethod
    def _write(state: Mapping, path: Path) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
        with atomic_open(path, "wb") as f:
            torch.save(dict(state), f)

    def load(self, path: str | Path, map_location: str | torch.device = "cpu") -> dict:
        """Load one checkpoint.

        Raises:
            CorruptCheckpoint: truncated, not a torch zip file, a CRC mismatch, unreadable.
            CheckpointError: it holds objects ``weights_only`` loading refuses (not corrupt:
                store plain types and tensors, as :func:`make_checkpoint_state` does).
        """
        path = Path(path)
        if self.verify:
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise CorruptCheckpoint(f"checkpoint {path} is unreadable: {exc}") from exc
            if bad is not None:
                raise CorruptCheckpoint(f"checkpoint {path} is corrupt: CRC mismatch in '{bad}'")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Weights only load failed" in str(exc):
                raise CheckpointError(f"checkpoint {path} holds objects that weights_only "
                                      f"loading refuses: {str(exc).splitlines()[-1]}") from exc
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {exc}") from exc
        except Exception as exc:  # torch reports damage as RuntimeError, EOFError, KeyError, ...
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {type(exc).__name__}: {exc}") from exc
        if not isinstance(state, dict):
            raise CorruptCheckpoint(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
        return state

    def latest_valid(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, as ``(path, state)``; None if there is none.

        Corrupt files are skipped with a :class:`CorruptCheckpointWarning` naming them (they
        are left on disk for inspection and are overwritten if their step is saved again).
        """
        return self._newest_loadable(map_location, [])

    def _newest_loadable(self, map_location, skipped: list[CorruptCheckpoint]) -> tuple[Path, dict] | None:
        """:meth:`latest_valid`, appending the error of each corrupt file to ``skipped``."""
        for _, path in reversed(self.checkpoints()):
            try:
                return path, self.load(path, map_location)
            except CorruptCheckpoint as exc:
                skipped.append(exc)
                warnings.warn(f"skipping {exc}; falling back to an older checkpoint",
                              CorruptCheckpointWarning, stacklevel=3)
        return None


def make_checkpoint_state(step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                          scheduler=None, config=None, **extra) -> dict:
    """The standard checkpoint dict: ``step`` (optimisation steps completed), ``model``,
    ``optimizer``, ``scheduler`` state dicts, ``rng`` (:func:`capture_rng_state`), ``config``
    (a plain container) and any ``extra`` entries (which should be tensors or plain types)."""
    if config is not None:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
    return {
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "config": config,
        **extra,
    }


def resume_or_start(manager: CheckpointManager, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler=None, *,
                    restore_rng: bool = True) -> int:
    """Load model/optimizer/scheduler/RNG from the newest valid checkpoint; return its step.

    Returns 0 when there is no checkpoint at all (a fresh start). The returned value is the
    number of steps already done, so a loop ``for step in range(start, total)`` continues
    where the checkpoint left off. Corrupt files are skipped with a
    :class:`CorruptCheckpointWarning`; when *every* checkpoint is corrupt,
    :class:`NothingToResume` names each file and its fault instead of starting over. A
    checkpoint lacking a needed entry raises :class:`CheckpointError` naming the file and the key.
    """
    skipped: list[CorruptCheckpoint] = []
    found = manager._newest_loadable("cpu", skipped)
    if found is None:
        if skipped:
            raise NothingToResume(f"cannot resume: none of the {len(skipped)} checkpoint(s) in "
                                  f"{manager.directory} can be read: " + "; ".join(map(str, skipped)))
        return 0
    path, state = found
    wanted = {"step": True, "model": True, "optimizer": optimizer is not None,
              "scheduler": scheduler is not None, "rng": restore_rng}
    for key, needed in wanted.items():
        if needed and state.get(key) is None:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry to resume from")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: model weights do not fit the model: {exc}") from exc
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        restore_rng_state(state["rng"])
    return int(state["step"])
