"""Finding (and, once, downloading) the MediaPipe model files of the video pipeline.

From ``mediapipe`` 1.0 on the wheels ship no model files, so each model is resolved in order:

1. the config value (``video_preprocess.landmarker_task`` / ``video_preprocess.segmenter_model``,
   a path);
2. the environment variable (``HEADKIT_FACE_LANDMARKER`` / ``HEADKIT_SELFIE_SEGMENTER``);
3. ``<cache_dir>/<file name>``, downloaded from MediaPipe's model storage when absent.

Checksums. The face landmarker is pinned: every copy (given, cached or downloaded) must have
the SHA-256 of MediaPipe's ``face_landmarker.task`` float16 version 1. The segmenter has two
public variants and only one digest is known here:

* a segmenter file given by config or environment must have ``video_preprocess.segmenter_sha256``,
  by default the digest of MediaPipe's general ``selfie_segmentation.tflite`` (the file the
  ``mediapipe==0.10.21`` wheel shipped). Set that key to another file's digest to pin it, or to
  ``null`` to accept any file (explicit choice, no silent fallback);
* the file downloaded into the cache is MediaPipe's newer ``selfie_segmenter.tflite`` from
  ``.../selfie_segmenter/float16/latest/``. MediaPipe publishes no checksum for it and ``latest``
  may change, so it is **not verified**: the download is logged with the digest it had, which
  can be pinned through ``segmenter_sha256`` by passing the file as ``segmenter_model``.

Every failure (missing file, wrong checksum, offline) is one :class:`ModelFileError` line naming
the file, where it was looked for and how to get it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ...download import DownloadError, check_sha256, download_file, sha256_of
from .reader import VideoError

log = logging.getLogger(__name__)
KEY = "video_preprocess"


class ModelFileError(VideoError):
    """A model file is missing, unreadable or has the wrong checksum; names the file, where it was
    looked for and how to get it."""


@dataclass(frozen=True)
class ModelFile:
    """One downloadable model file and where the user can point to it.

    Attributes:
        what: the model's name in messages.
        key: its settings key under ``video_preprocess`` (a path, or null).
        env: the environment variable that may hold its path.
        filename: its name in the cache folder.
        url: where it is downloaded from.
        sha256: the digest every copy must have, or None when no digest is published.
        size: its size in bytes (progress bar), when known.
    """

    what: str
    key: str
    env: str
    filename: str
    url: str
    sha256: str | None
    size: int | None = None


FACE_LANDMARKER = ModelFile(
    what="MediaPipe face landmarker", key="landmarker_task", env="HEADKIT_FACE_LANDMARKER",
    filename="face_landmarker.task",
    url="https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/1/"
        "face_landmarker.task",
    sha256="64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff", size=3_758_596)

SELFIE_SEGMENTER = ModelFile(
    what="MediaPipe selfie segmenter", key="segmenter_model", env="HEADKIT_SELFIE_SEGMENTER",
    filename="selfie_segmenter.tflite",
    url="https://storage.googleapis.com/mediapipe-models/image_segmenter/selfie_segmenter/float16/latest/"
        "selfie_segmenter.tflite",
    sha256=None)  # MediaPipe publishes no digest for "latest": a download is not verified

# MediaPipe's general selfie_segmentation.tflite as shipped in the mediapipe==0.10.21 wheel
# (249,505 bytes): the default digest a segmenter file given by config or environment must have.
KNOWN_SEGMENTER_SHA256 = "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c"


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a hex SHA-256 digest (64 hex digits)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)


def _how_to_get(model: ModelFile, cache_file: Path) -> str:
    """The advice every message ends with."""
    digest = f" (SHA-256 {model.sha256})" if model.sha256 else ""
    return (f"get it from {model.url}{digest} and set {KEY}.{model.key}=PATH or {model.env}=PATH, "
            f"or copy it to {cache_file}")


def _verify(path: Path, expected: str | None, model: ModelFile, origin: str, advice: str) -> Path:
    """Return ``path`` when its SHA-256 is ``expected`` (or ``expected`` is None); else raise
    :class:`ModelFileError` naming the file, its origin, both digests and ``advice``."""
    if expected is not None:
        try:
            check_sha256(path, expected, f"{model.what} ({origin})")
        except DownloadError as exc:
            raise ModelFileError(f"{exc}; {advice}") from exc
    return path


def _explicit(model: ModelFile, configured: str | os.PathLike | None) -> tuple[Path, str] | None:
    """``(path, origin)`` of the file named by the config value or else the environment; None
    when neither names one. A named file that does not exist raises naming it and its origin."""
    if configured not in (None, ""):
        path, origin = Path(configured).expanduser(), f"{KEY}.{model.key}"
    elif os.environ.get(model.env):
        path, origin = Path(os.environ[model.env]).expanduser(), f"${model.env}"
    else:
        return None
    if not path.is_file():
        raise ModelFileError(f"{path}: {model.what} not found (named by {origin}); point {origin} at the "
                             f"file or unset it to use the cached download ({model.url})")
    return path, origin


def _download(model: ModelFile, cache_file: Path) -> Path:
    """Download ``model`` into ``cache_file``; one line naming all places looked in when that fails."""
    log.info("downloading the %s (%s) into %s", model.what, model.url, cache_file)
    try:
        download_file(model.url, cache_file, sha256=model.sha256, desc=model.filename, size_hint=model.size)
    except DownloadError as exc:
        raise ModelFileError(
            f"{cache_file}: {model.what} not found ({KEY}.{model.key} is null, ${model.env} is unset, "
            f"not in the cache) and downloading it failed ({exc}); {_how_to_get(model, cache_file)}") from exc
    if model.sha256 is None:
        log.warning("%s: downloaded the %s without a checksum to check (MediaPipe publishes none); its "
                    "SHA-256 is %s", cache_file, model.what, sha256_of(cache_file))
    return cache_file


def resolve_model_file(model: ModelFile, configured: str | os.PathLike | None, cache_dir: str | os.PathLike,
                       explicit_sha256: str | None = None) -> Path:
    """Path of ``model``: ``configured`` (a config value) > ``$model.env`` > ``<cache_dir>/<filename>``
    (downloaded when absent). A file given by config or environment must have ``explicit_sha256``
    (None: not checked); a cached or downloaded one ``model.sha256`` (None: not checked)."""
    cache_file = Path(cache_dir) / model.filename
    given = _explicit(model, configured)
    if given is not None:
        path, origin = given
        return _verify(path, explicit_sha256, model, origin,
                       f"use the right file or {_how_to_get(model, cache_file)}")
    if cache_file.is_file():
        return _verify(cache_file, model.sha256, model, "cached", "delete it to download it again")
    return _download(model, cache_file)


def face_landmarker_path(configured: str | os.PathLike | None, cache_dir: str | os.PathLike) -> Path:
    """``face_landmarker.task`` (``video_preprocess.landmarker_task`` > ``$HEADKIT_FACE_LANDMARKER``
    > ``<cache_dir>/face_landmarker.task``, downloaded when absent); always checksum-verified."""
    return resolve_model_file(FACE_LANDMARKER, configured, cache_dir, explicit_sha256=FACE_LANDMARKER.sha256)


def selfie_segmenter_path(configured: str | os.PathLike | None, cache_dir: str | os.PathLike,
                          sha256: str | None = KNOWN_SEGMENTER_SHA256) -> Path:
    """The selfie segmenter (``video_preprocess.segmenter_model`` > ``$HEADKIT_SELFIE_SEGMENTER`` >
    ``<cache_dir>/selfie_segmenter.tflite``, downloaded when absent). A given file must have
    ``sha256`` (``video_preprocess.segmenter_sha256``; None accepts any); the downloaded one is
    not verified because its digest is not published (see the module docstring)."""
    return resolve_model_file(SELFIE_SEGMENTER, configured, cache_dir, explicit_sha256=sha256)
