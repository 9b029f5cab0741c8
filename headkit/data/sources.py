"""Config-facing subject sources: each returns a validated :class:`Subject`.

These are the ``_target_`` functions of ``configs/data/*.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .folder import load_subject_folder, write_subject_folder
from .subject import Subject

log = logging.getLogger(__name__)


def synthetic_cache_dir(root: str | os.PathLike, generator: dict[str, Any]) -> Path:
    """Folder that caches the synthetic subject built with ``generator`` settings.

    The name carries a hash of the settings and the generator version, so changing either never
    reuses a stale cache.
    """
    from .synthetic import GENERATOR_VERSION

    blob = json.dumps({"version": GENERATOR_VERSION, **dict(generator)}, sort_keys=True, default=str).encode()
    return Path(root) / f"synthetic-{hashlib.sha1(blob).hexdigest()[:10]}"


def synthetic_subject(root: str | os.PathLike, generator: dict[str, Any] | None = None,
                      regenerate: bool = False) -> Subject:
    """Load the synthetic subject cached under ``root``, generating (and caching) it if absent.

    The folder is written to a temporary sibling and renamed, so an interrupted generation never
    leaves a half-written cache behind.
    """
    from .contact_sheet import save_contact_sheet
    from .synthetic import generate_synthetic_subject

    generator = dict(generator or {})
    folder = synthetic_cache_dir(root, generator)
    if (folder / "subject.json").is_file() and not regenerate:
        return load_subject_folder(folder)
    log.info("generating the synthetic subject into %s", folder)
    subject = generate_synthetic_subject(**generator)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_subject_folder(subject, tmp)
    save_contact_sheet(tmp / "contact_sheet.png", subject, cols=8)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return subject


def subject_folder(root: str | os.PathLike, missing_mask: str = "error",
                   background: Any = None) -> Subject:
    """Load the project's own subject folder (see :mod:`headkit.data.folder`).

    ``missing_mask``: ``"error"`` or ``"full"`` (frames without a mask file are all
    foreground; they are listed in a warning). ``background``: RGB in [0, 1] that RGBA frames
    are composited over (``+data.background=[r,g,b]``); None uses ``subject.json``'s
    ``meta.settings.background``, else white.
    """
    return load_subject_folder(root, missing_mask=missing_mask, background=background)
