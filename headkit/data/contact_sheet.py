"""Contact sheets: many frames (or masks) tiled into one labelled uint8 image for a quick look."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """``[N, H, W]`` or ``[N, H, W, 1|3|4]`` uint8/float (in [0, 1]) -> ``[N, H, W, 3]`` uint8."""
    arr = np.asarray(images)
    if hasattr(images, "detach"):  # a torch tensor
        arr = images.detach().cpu().numpy()
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"contact_sheet: images must be [N, H, W], [N, H, W, 1], [N, H, W, 3] or "
                         f"[N, H, W, 4], got shape {list(arr.shape)}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"contact_sheet: images must be uint8 or float in [0, 1], got {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError("contact_sheet: images contain NaN or Inf")
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def subject_frames(subject, num: int = 16) -> tuple[np.ndarray, list[str]]:
    """Pick ``num`` frames spread over a :class:`~headkit.data.subject.Subject` for a sheet.

    Returns ``(images [n, H, W, 3] uint8, labels)``; labels give the frame index and mark test
    frames with ``*``. When the subject has a ``jaw_open`` expression channel (the synthetic
    head), its most open frame replaces the nearest pick so the mouth interior is on the sheet.
    """
    T = subject.num_frames
    ids = np.unique(np.linspace(0, T - 1, min(num, T)).round().astype(int))
    names = list(subject.meta.get("blendshape_names", []))
    if "jaw_open" in names and len(ids) > 1:
        widest = int(np.argmax(subject.expressions[:, names.index("jaw_open")]))
        if widest not in ids:
            ids[np.argmin(np.abs(ids - widest))] = widest
            ids = np.sort(ids)
    test = set(np.asarray(subject.test_ids).tolist())
    return subject.images[ids], [f"{i}{'*' if i in test else ''}" for i in ids]


def contact_sheet(
    images,  # [N, H, W, 3] / [N, H, W] uint8 or float in [0, 1] (numpy or torch), or a Subject
    cols: int = 4,
    labels: Sequence[str] | None = None,
    pad: int = 2,
    pad_value: int = 255,
) -> np.ndarray:
    """Tile ``N`` images row-major into a grid of ``cols`` columns.

    The result is ``[rows·(H + pad + L) + pad, cols·(W + pad) + pad, 3]`` uint8.

    Float images are taken as [0, 1] and rounded to uint8; single-channel images (masks) become
    grey. With ``labels`` (one string per image), a text strip of height ``L`` (about 12 px) is
    drawn under each tile with Pillow's default font. Missing cells of the last row stay
    ``pad_value``. A :class:`~headkit.data.subject.Subject` is shown through
    :func:`subject_frames` (16 frames, labelled unless ``labels`` is given).
    """
    if hasattr(images, "images") and hasattr(images, "num_frames"):
        images, frame_labels = subject_frames(images)
        labels = frame_labels if labels is None else labels
    tiles = _to_uint8(images)
    n, h, w, _ = tiles.shape
    if n == 0:
        raise ValueError("contact_sheet: no images given")
    if cols < 1:
        raise ValueError(f"contact_sheet: cols must be >= 1, got {cols}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"contact_sheet: {len(labels)} labels for {n} images")
    cols = min(cols, n)
    rows = -(-n // cols)
    strip = 12 if labels is not None else 0
    sheet = np.full((rows * (h + pad + strip) + pad, cols * (w + pad) + pad, 3), pad_value, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        y0, x0 = pad + r * (h + pad + strip), pad + c * (w + pad)
        sheet[y0:y0 + h, x0:x0 + w] = tiles[k]
    if labels is not None:
        from PIL import Image, ImageDraw, ImageFont

        img = Image.fromarray(sheet)
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default()
        ink = (0, 0, 0) if pad_value > 127 else (255, 255, 255)
        for k, text in enumerate(labels):
            r, c = divmod(k, cols)
            draw.text((pad + c * (w + pad) + 1, pad + r * (h + pad + strip) + h), str(text)[: max(1, w // 6)],
                      fill=ink, font=font)
        sheet = np.asarray(img).copy()
    return sheet


def save_contact_sheet(path: str | os.PathLike, images, cols: int = 4, labels: Sequence[str] | None = None,
                       pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Write :func:`contact_sheet` of ``images`` (or a Subject) to ``path`` (PNG or any imageio
    format); return it.

    Parent folders are created; the file is written to a temporary name and renamed, so an
    interrupted write never leaves a truncated image behind.
    """
    import imageio.v3 as iio

    sheet = contact_sheet(images, cols=cols, labels=labels, pad=pad, pad_value=pad_value)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext or '.png'}"
    iio.imwrite(tmp, sheet)
    os.replace(tmp, path)
    return sheet
