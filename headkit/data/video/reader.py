"""Reading video files frame by frame, with errors that name the file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..subject import SubjectError


class VideoError(SubjectError):
    """Bad video input (unreadable file, no face, too many dropped frames); names the file."""


@dataclass
class VideoInfo:
    """What the container says about a video: frame rate and frame size in pixels."""

    path: Path
    fps: float
    width: int
    height: int
    duration: float | None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's metadata with imageio's ffmpeg plugin; raise :class:`VideoError` naming
    the file when it is missing, not a video, or uses a codec ffmpeg cannot decode."""
    import imageio.v3 as iio

    path = Path(path)
    if path.is_dir():
        raise VideoError(f"{path}: a folder, not a video file")
    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    try:
        meta = iio.immeta(path, plugin="FFMPEG")
    except Exception as exc:  # imageio/ffmpeg raise OSError, RuntimeError, ... for bad files
        raise VideoError(f"{path}: cannot read video (unsupported codec or not a video file: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    width, height = (int(s) for s in meta.get("size", (0, 0)))
    fps = float(meta.get("fps") or 0.0)
    if width <= 0 or height <= 0:
        raise VideoError(f"{path}: video reports no frame size ({meta.get('size')})")
    if not np.isfinite(fps) or fps <= 0:
        raise VideoError(f"{path}: video reports no frame rate ({meta.get('fps')})")
    duration = meta.get("duration")
    return VideoInfo(path, fps, width, height, float(duration) if duration else None)


def iter_frames(path: str | os.PathLike, stride: int = 1, max_frames: int | None = None
                ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame_number, frame [H, W, 3] uint8)`` for every ``stride``-th frame.

    Stops after ``max_frames`` yielded frames (``None``: the whole clip). A decoding failure,
    or a file without a single frame, raises :class:`VideoError` naming the file (and frame).
    """
    import imageio.v3 as iio

    if stride < 1:
        raise ValueError(f"frame stride must be >= 1, got {stride}")
    path = Path(path)
    yielded, number = 0, -1
    try:
        for number, frame in enumerate(iio.imiter(path, plugin="FFMPEG")):
            if max_frames is not None and yielded >= max_frames:
                break
            if number % stride:
                continue
            frame = np.asarray(frame)
            if frame.ndim == 2:
                frame = np.repeat(frame[..., None], 3, axis=-1)
            yield number, np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
            yielded += 1
    except VideoError:
        raise
    except Exception as exc:
        raise VideoError(f"{path}: cannot decode frame {number + 1} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if number < 0:
        raise VideoError(f"{path}: the video has no frames")
