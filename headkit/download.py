"""Downloading files: streamed, checksummed, atomic.

:func:`download_file` streams a URL (``http(s)://`` or ``file://``, through :mod:`urllib`) into a
hidden ``.NAME.part`` file next to the destination, shows a progress bar (hidden when
``HEADKIT_NO_PROGRESS=1`` or off a terminal, see :func:`headkit.engine.logging.progress_enabled`),
checks the SHA-256 when one is given and renames the file into place, so an interrupted or
corrupt download never leaves a file under the final name.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

CHUNK = 1 << 20
TIMEOUT_S = 60.0


class DownloadError(OSError):
    """A download failed (offline, HTTP error, checksum mismatch); the message names the URL
    (or file) and the destination in one line."""


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str, what: str) -> None:
    """Raise :class:`DownloadError` naming ``what`` (the file's role), the file and both digests
    when the SHA-256 of ``path`` is not ``expected``."""
    found = sha256_of(path)
    if found != expected.lower():
        raise DownloadError(f"{path}: {what} has the wrong SHA-256 (expected {expected.lower()}, found {found})")


def _progress_bar(total: int | None, desc: str):
    """A byte-counting bar (lines without a terminal), from :func:`headkit.progress.progress`."""
    from .progress import progress

    return progress(iter(()), desc=desc, total=total, unit="B", unit_scale=True, unit_divisor=1024)


def _stream(url: str, part: Path, desc: str, size_hint: int | None) -> str:
    """Copy ``url`` into ``part`` chunk by chunk with a progress bar; return the bytes' SHA-256
    (hashed on the way, so a large download is not read a second time)."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(part, "wb") as out:
        length = response.headers.get("Content-Length")
        bar = _progress_bar(int(length) if length else size_hint, desc)
        try:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        finally:
            bar.close()
    return digest.hexdigest()


def download_file(url: str, dest: str | os.PathLike, sha256: str | None = None, desc: str = "",
                  size_hint: int | None = None) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    The bytes go to ``dest.with_name('.' + dest.name + '.part')`` first; with ``sha256`` the
    digest is checked before the atomic rename (a mismatch deletes the partial file). ``desc``
    labels the progress bar and ``size_hint`` (bytes) sizes it when the server sends no length.
    Raises :class:`DownloadError` (one line naming the URL and ``dest``) when offline, on an
    HTTP error or on a checksum mismatch.
    """
    dest = Path(dest)
    part = dest.with_name(f".{dest.name}.part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        found = _stream(url, part, desc or dest.name, size_hint)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"cannot download {url} to {dest} ({type(exc).__name__}: {reason})") from exc
    if sha256 is not None and found != sha256.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(f"downloaded {url} to {dest} with the wrong SHA-256 "
                            f"(expected {sha256.lower()}, found {found}); the partial file was deleted")
    os.replace(part, dest)
    return dest
