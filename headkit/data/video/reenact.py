"""Driving an ICT-tracked avatar with other expression weights: another subject's track, or a CSV
of ARKit blendshape weights (the columns of ARKit face-capture exports such as Live Link Face:
``EyeBlinkLeft, ..., JawOpen, ...``, one row a frame).

Every subject tracked with ``video_preprocess.tracker=ict`` shares the kit's expression space, so a
weight vector means the same motion on any of them: the target's own neutral head plus the kit's
blendshapes times the driving weights (``head_model.npz`` in the target's folder holds both). This
is cross-identity re-enactment without any deformation transfer.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .ict_fit import blendshape_init


class ReenactError(ValueError):
    """Driving data that cannot drive this avatar; the message names the file and the problem."""


def arkit_name(column: str) -> str:
    """ARKit spelling of a CSV column: ``EyeBlinkLeft`` (export style) -> ``eyeBlinkLeft``."""
    column = column.strip()
    return column[:1].lower() + column[1:]


def read_arkit_csv(path: str | os.PathLike, expression_names: list[str]) -> np.ndarray:  # -> [N, E]
    """Expression weights ``[N, E]`` (the model's order) from an ARKit blendshape CSV.

    Columns are matched by ARKit name, any capitalisation of the first letter; other columns
    (timecode, head and eye rotations) are ignored. ``browInnerUp`` and ``cheekPuff`` drive both
    sides of the kit's split shapes. Raises :class:`ReenactError` naming the file when it has no
    row, no blendshape column, or a value that is not a number.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise ReenactError(f"{path}: cannot read the blendshape CSV ({exc})") from exc
    if len(rows) < 2:
        raise ReenactError(f"{path}: no data rows (expected a header of ARKit names and one row per frame)")
    header = [arkit_name(c) for c in rows[0]]
    known = {n.rsplit("_", 1)[0] if n.endswith(("_L", "_R")) else n for n in expression_names}
    used = [j for j, name in enumerate(header)
            if name in known or name.removesuffix("Left") in known or name.removesuffix("Right") in known]
    if not used:
        raise ReenactError(f"{path}: no ARKit blendshape column (e.g. JawOpen, EyeBlinkLeft) in the header")
    values = np.empty((len(rows) - 1, len(used)))
    for i, row in enumerate(rows[1:]):
        try:
            values[i] = [float(row[j]) for j in used]
        except (ValueError, IndexError) as exc:
            raise ReenactError(f"{path}: row {i + 2}: {exc}") from exc
    return blendshape_init(values, [header[j] for j in used], expression_names).astype(np.float32)


def reenacted_vertices(head_model: dict[str, np.ndarray],  # head_model.npz of the target
                       weights: np.ndarray,  # [N, E] driving weights
                       pose: np.ndarray,  # [4, 4] head to world, where the avatar is shown
                       ) -> np.ndarray:  # -> [N, V, 3] world
    """The target's neutral head deformed by the kit's blendshapes with ``weights``, placed by ``pose``."""
    basis = head_model["expressions"].astype(np.float32)  # [E, V, 3]
    if weights.shape[1] != basis.shape[0]:
        raise ReenactError(f"the driving weights have {weights.shape[1]} expressions, the avatar's head model "
                           f"{basis.shape[0]}")
    local = head_model["template"][None] + np.tensordot(weights.astype(np.float32), basis, 1)
    return (local @ pose[:3, :3].T.astype(np.float32) + pose[:3, 3].astype(np.float32)).astype(np.float32)
