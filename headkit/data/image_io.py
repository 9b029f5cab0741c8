"""Image reading and writing with errors that name the file (and frame) at fault."""

from __future__ import annotations

import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from .subject import SubjectError


def _where(path: str | os.PathLike, frame: int | None) -> str:
    return f"{path}" + (f" (frame {frame})" if frame is not None else "")


def read_image(path: str | os.PathLike, *, frame: int | None = None,
               expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image file as uint8 ``[H, W, C]`` (C = 1, 3 or 4).

    Raises :class:`SubjectError` naming the file (and frame) when it is missing, truncated or
    unreadable, or when its ``(height, width)`` differs from ``expected_size``.
    """
    where = _where(path, frame)
    if not Path(path).is_file():
        raise SubjectError(f"{where}: image file is missing")
    try:
        img = np.asarray(iio.imread(path))
    except Exception as exc:  # imageio raises many types for corrupt files
        raise SubjectError(f"{where}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3, 4):
        raise SubjectError(f"{where}: unsupported image shape {list(img.shape)}")
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise SubjectError(f"{where}: unsupported image dtype {img.dtype}")
    if expected_size is not None and tuple(img.shape[:2]) != tuple(expected_size):
        raise SubjectError(f"{where}: image is {img.shape[0]}x{img.shape[1]} (HxW) but the "
                           f"metadata says {expected_size[0]}x{expected_size[1]}")
    return img


#: background an RGBA frame is composited over unless the subject or config names another
DEFAULT_BACKGROUND = (1.0, 1.0, 1.0)


def composite_alpha(image: np.ndarray,  # [H, W, 4] uint8, straight (not premultiplied) alpha
                    background: tuple[float, float, float] | np.ndarray = DEFAULT_BACKGROUND) -> np.ndarray:
    """Composite an RGBA image over a constant ``background`` (RGB in [0, 1]): uint8 ``[H, W, 3]``.

    Straight alpha (PNG's convention): ``out = rgb * a + 255 * background * (1 - a)`` with
    ``a = alpha / 255``, rounded to the nearest integer. Fully opaque pixels are unchanged.
    """
    bg = np.asarray(background, np.float32).reshape(-1)
    if image.ndim != 3 or image.shape[-1] != 4:
        raise ValueError(f"composite_alpha: expected an [H, W, 4] image, got {list(image.shape)}")
    if bg.shape != (3,) or not np.all((bg >= 0) & (bg <= 1)):
        raise ValueError(f"composite_alpha: background must be 3 values in [0, 1], got {background!r}")
    a = image[..., 3:].astype(np.float32) / 255.0
    out = image[..., :3].astype(np.float32) * a + (255.0 * bg) * (1.0 - a)
    return (np.clip(out, 0.0, 255.0) + 0.5).astype(np.uint8)


def to_rgb(image: np.ndarray, background: tuple[float, float, float] | np.ndarray = DEFAULT_BACKGROUND) -> np.ndarray:
    """uint8 ``[H, W, 3]`` from a :func:`read_image` result: grey is expanded, RGBA is
    composited over ``background`` with :func:`composite_alpha` (never dropped)."""
    if image.shape[-1] == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=-1))
    if image.shape[-1] == 4:
        return composite_alpha(image, background)
    return np.ascontiguousarray(image[..., :3])


def read_rgb(path: str | os.PathLike, *, frame: int | None = None,
             expected_size: tuple[int, int] | None = None,
             background: tuple[float, float, float] | np.ndarray = DEFAULT_BACKGROUND) -> np.ndarray:
    """Read an RGB image as uint8 ``[H, W, 3]``.

    Grey is expanded; an RGBA (matted) image is composited over ``background`` (straight
    alpha, white by default, :func:`composite_alpha`), so a matted frame does not show black
    where the others show the background. Readers of many frames should use
    :func:`read_image` + :func:`to_rgb` to learn which frames had alpha and say so
    (as :func:`headkit.data.folder.load_subject_folder` does).
    """
    return to_rgb(read_image(path, frame=frame, expected_size=expected_size), background)


def read_mask(path: str | os.PathLike, *, frame: int | None = None,
              expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a foreground mask as uint8 ``[H, W]`` (first channel; alpha if RGBA)."""
    img = read_image(path, frame=frame, expected_size=expected_size)
    return np.ascontiguousarray(img[..., 3] if img.shape[-1] == 4 else img[..., 0])


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a float image in [0, 1] (or uint8) to uint8, rounding."""
    if image.dtype == np.uint8:
        return image
    return (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an image (uint8, or float in [0, 1]) atomically: temp file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    img = to_uint8(np.asarray(image))
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    iio.imwrite(tmp, img, extension=path.suffix)
    os.replace(tmp, path)
