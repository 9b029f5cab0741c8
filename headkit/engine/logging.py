"""Run logging (TensorBoard events + a JSON-lines scalar log) and image files (progress bars and
lines live in :mod:`headkit.progress`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from headkit.engine.files import atomic_write_text, to_jsonable

SCALARS_NAME = "scalars.jsonl"


def _check_image(tag: str, image: Tensor) -> Tensor:
    """``[H, W, 3]``/``[H, W, 1]``/``[H, W]`` float image as a CPU ``[H, W, C]`` tensor in [0, 1].

    Values are clamped for display only (renders may overshoot); the data is not changed.
    """
    image = torch.as_tensor(image).detach().cpu()
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image '{tag}': expected [H, W, 3], [H, W, 1] or [H, W], got "
                         f"{tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image '{tag}': expected floats in [0, 1], got {image.dtype}")
    return image.float().clamp(0.0, 1.0)


def save_image(path: str | os.PathLike, image: Tensor) -> Path:  # image: [H, W, 3] in [0, 1]
    """Write a float image as an 8-bit PNG (rounded, not truncated); creates the folder."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (_check_image(path.name, image).numpy() * 255.0 + 0.5).astype(np.uint8)
    iio.imwrite(path, pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    return path


def _step_of(line: str) -> int | None:
    """The step of a scalars.jsonl line; None for a blank or torn line (a killed writer)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class RunLogger:
    """TensorBoard writer plus ``run_dir/scalars.jsonl`` (one JSON object per ``scalars`` call).

    Events go to ``run_dir/tb``. ``scalars.jsonl`` lets tests and scripts read curves without
    TensorBoard: each line is ``{"step": s, "time": unix_seconds, name: value, ...}``, with
    NaN/Inf written as null. ``purge_step`` (when resuming) drops events and JSON lines at or
    after that step, so a resumed run's curves do not overlap the killed run's tail.
    ``enabled=False`` makes every method a no-op (e.g. on non-main processes).
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 purge_step: int | None = None, flush_secs: int = 30):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        jsonl_path = self.run_dir / SCALARS_NAME
        if purge_step is not None and jsonl_path.is_file():
            kept = [line for line in jsonl_path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) < purge_step]
            atomic_write_text(jsonl_path, "".join(line + "\n" for line in kept))
        self._jsonl = open(jsonl_path, "a", buffering=1)  # line-buffered: whole lines reach disk
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, so only when used
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step,
                                         flush_secs=flush_secs)

    def scalars(self, values: Mapping[str, float | Tensor], step: int, prefix: str = "") -> None:
        """Log named scalars (floats or one-element tensors) at ``step``; tag = prefix + name."""
        if not self.enabled:
            return
        row = {}
        for k, v in values.items():
            v = torch.as_tensor(v).detach()
            if v.numel() != 1:
                raise ValueError(f"scalar '{prefix}{k}' at step {step} has {v.numel()} elements")
            row[f"{prefix}{k}"] = float(v.float().item())
        if self._writer is not None:
            for tag, value in row.items():
                self._writer.add_scalar(tag, value, step)
        line = {"step": int(step), "time": time.time(), **to_jsonable(row)}
        self._jsonl.write(json.dumps(line, allow_nan=False) + "\n")

    def image(self, tag: str, image: Tensor, step: int) -> None:  # image: [H, W, 3] in [0, 1]
        """Log one image to TensorBoard."""
        if self.enabled and self._writer is not None:
            self._writer.add_image(tag, _check_image(tag, image), step, dataformats="HWC")

    def images(self, images: Mapping[str, Tensor], step: int) -> None:  # values: [H, W, 3]
        """Log several named images at one step."""
        for tag, image in images.items():
            self.image(tag, image, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Log text (e.g. the resolved config) to TensorBoard."""
        if self.enabled and self._writer is not None:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        """Push buffered events and lines to disk."""
        if self._writer is not None:
            self._writer.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        """Flush and close; further calls are no-ops."""
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._writer = self._jsonl = None
        self.enabled = False

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_scalars(run_dir: str | os.PathLike) -> list[dict]:
    """All rows of ``run_dir/scalars.jsonl``; a malformed line raises ValueError with its number."""
    path = Path(run_dir) / SCALARS_NAME
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line: {exc}") from exc
    return rows
