"""Frame-level dataset over a :class:`Subject` with fixed keys for every source."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .subject import Subject, SubjectError

FRAME_KEYS = ("index", "image", "mask", "vertices", "expression", "K", "camtoworld", "viewmat",
              "head_pose", "time")


def _rigid_inverse(mats: np.ndarray) -> np.ndarray:
    R, t = mats[..., :3, :3], mats[..., :3, 3:]
    out = np.zeros_like(mats)
    out[..., :3, :3] = np.swapaxes(R, -1, -2)
    out[..., :3, 3:] = -np.swapaxes(R, -1, -2) @ t
    out[..., 3, 3] = 1.0
    return out


class FrameDataset(Dataset):
    """Serve a subject's frames as dicts of tensors with the keys in :data:`FRAME_KEYS`.

    Per item: ``index`` (int64 scalar, frame index in the video), ``image [H,W,3]`` float32
    in [0, 1], ``mask [H,W,1]`` float32 in [0, 1] (soft at anti-aliased edges), ``vertices [V,3]``, ``expression [E]``,
    ``K [3,3]``, ``camtoworld [4,4]``, ``viewmat [4,4]`` (its inverse), ``head_pose [4,4]``
    (identity when the source has none), ``time`` (float32 scalar, normalised).

    Args:
        subject: the subject.
        split: ``"train"``, ``"test"`` or ``"all"``.
        expression_dim: when given, the data's expression size must equal it (the model's
            config key is named in the error).
    """

    def __init__(self, subject: Subject, split: str = "train", expression_dim: int | None = None,
                 expression_key: str = "model.expression_dim"):
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be train/test/all, got {split!r}")
        if expression_dim is not None and expression_dim != subject.expression_dim:
            raise SubjectError(f"subject '{subject.name}' has expression size {subject.expression_dim} "
                               f"but the config sets {expression_key}={expression_dim}")
        self.subject = subject
        self.split = split
        ids = {"train": subject.train_ids, "test": subject.test_ids,
               "all": np.arange(subject.num_frames)}[split]
        if len(ids) == 0:
            raise SubjectError(f"subject '{subject.name}': the {split} split has no frames "
                               f"({subject.num_frames} frames in all; the split comes from the source: "
                               f"'split' in a subject folder's subject.json, num_test for INSTA/NBS/synthetic)")
        self.frame_ids = np.asarray(ids, np.int64)
        self._viewmats = _rigid_inverse(subject.camtoworlds.astype(np.float64)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        s = self.subject
        t = int(self.frame_ids[i])
        head_pose = s.head_poses[t] if s.head_poses is not None else np.eye(4, dtype=np.float32)
        return {
            "index": torch.tensor(t, dtype=torch.int64),
            "image": torch.from_numpy(s.images[t]).float().div_(255.0),
            "mask": torch.from_numpy(s.masks[t]).float().div_(255.0).unsqueeze(-1),
            "vertices": torch.from_numpy(np.ascontiguousarray(s.vertices[t], dtype=np.float32)),
            "expression": torch.from_numpy(np.ascontiguousarray(s.expressions[t], dtype=np.float32)),
            "K": torch.from_numpy(np.ascontiguousarray(s.Ks[t], dtype=np.float32)),
            "camtoworld": torch.from_numpy(np.ascontiguousarray(s.camtoworlds[t], dtype=np.float32)),
            "viewmat": torch.from_numpy(self._viewmats[t]),
            "head_pose": torch.from_numpy(np.ascontiguousarray(head_pose, dtype=np.float32)),
            "time": torch.tensor(float(s.times[t]), dtype=torch.float32),
        }

    def batch(self, positions: list[int] | np.ndarray, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Stack the items at ``positions`` (indices into this split) into a batch on ``device``."""
        items = [self[int(p)] for p in positions]
        return {k: torch.stack([it[k] for it in items]).to(device) for k in FRAME_KEYS}
