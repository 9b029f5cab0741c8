"""Errors a person can read: what the scripts print when the input, not the code, is wrong.

``scripts/train.py``, ``eval.py``, ``prepare_data.py`` and ``fit_3dgs.py`` run their work inside
:func:`user_errors_exit`; an error of the classes :func:`user_errors` lists (a bad or missing
config value, a config that differs from the run being resumed, a missing or broken subject
folder or video, a failed download, a missing optional extra, a run that is not there, ...)
becomes one line on stderr, ``error: <message>``, sometimes followed by ``hint: <what to do>``,
and exit code :data:`EXIT_CODE`. Everything else (a bug) still goes to Hydra with its
traceback, and ``HYDRA_FULL_ERROR=1`` shows the traceback of user errors too.

Hydra itself reports what never reaches a script: an override it cannot parse or apply
(``model.unet.filterz=3`` for a key that does not exist: "Could not override ...").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

#: exit status of a reported user error (argparse's, for "the command line was wrong")
EXIT_CODE = 2


@cache
def user_errors() -> tuple[type[BaseException], ...]:
    """The project's error classes that describe bad input, not a bug. Imported on first use,
    i.e. only when something went wrong, so a script does not pay for imports it may not need."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    from headkit.data.subject import SubjectError  # also VideoError, ModelFileError
    from headkit.data.video.landmarks import MissingExtraError
    from headkit.download import DownloadError
    from headkit.engine.checkpoint import CheckpointError
    from headkit.engine.rundir import ConfigMismatch
    from headkit.engine.runs import RunNotFound
    from headkit.engine.trainer import MissingConfigValue
    from headkit.errors import InvalidConfigValue
    from headkit.headmodel import HeadModelError

    return (MissingConfigValue, InvalidConfigValue, ConfigMismatch, SubjectError,
            HeadModelError, DownloadError, MissingExtraError, RunNotFound, CheckpointError,
            ConfigKeyError, ConfigAttributeError, MissingMandatoryValue)


def full_error() -> bool:
    """``HYDRA_FULL_ERROR=1``: show tracebacks instead of one line (Hydra's own switch)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def describe(exc: BaseException) -> tuple[str, str | None]:
    """``(message, hint or None)`` for a user error, each a single line."""
    from omegaconf.errors import OmegaConfBaseException

    from headkit.engine.rundir import ConfigMismatch

    if isinstance(exc, ConfigMismatch):
        changes = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in exc.differences)
        return (f"the config differs from the run being resumed in {len(exc.differences)} key(s) "
                f"(saved -> new): {changes}",
                "resume with the saved values, or start a new run: leave out trainer.resume=true "
                "or pass another run_dir=")
    if isinstance(exc, OmegaConfBaseException) and getattr(exc, "full_key", None):
        first = str(getattr(exc, "msg", None) or exc).strip().splitlines()[0]
        return (f"config key {exc.full_key}: {first}",
                "'--cfg job' after the script's arguments prints the composed config")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__, getattr(exc, "hint", None)


def report(exc: BaseException) -> None:
    """Print ``error: ...`` (and ``hint: ...``) to stderr and exit with :data:`EXIT_CODE`."""
    message, hint = describe(exc)
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(EXIT_CODE)


def _cause(exc: BaseException, errors: tuple[type[BaseException], ...]) -> BaseException | None:
    """The user error a Hydra ``InstantiationException`` wraps (``data.root`` of a missing
    subject folder fails inside ``instantiate(cfg.data)``), or None."""
    from hydra.errors import InstantiationException

    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc if isinstance(exc, errors) else None


@contextmanager
def user_errors_exit(*extra: type[BaseException]) -> Iterator[None]:
    """Run the block; turn a user error (:func:`user_errors` plus ``extra``, e.g. the broader
    :data:`headkit.data.prepare.USER_ERRORS`) into one ``error:`` line and exit code 2, unless
    ``HYDRA_FULL_ERROR=1``. Other exceptions pass through untouched."""
    from hydra.errors import InstantiationException

    try:
        yield
    except InstantiationException as exc:
        cause = _cause(exc, user_errors() + extra)
        if cause is None or full_error():
            raise
        report(cause)
    except (*user_errors(), *extra) as exc:  # evaluated only when something was raised
        if full_error():
            raise
        report(exc)
