"""The in-memory subject: one person's tracked video, whatever its on-disk source.

Every parser (the project's own subject folder, the synthetic generator, INSTA, NBS) returns a
:class:`Subject`; :class:`headkit.data.FrameDataset` serves its frames as dicts with fixed keys.
Topology comes from the data: nothing here assumes a vertex count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class SubjectError(ValueError):
    """Bad subject data; the message names the file, frame or field and what is wrong."""


@dataclass
class Subject:
    """One tracked video of one head, held in memory as numpy arrays.

    Geometry lives in world coordinates; cameras follow OpenCV (x right, y down, z forward).
    ``T`` frames, ``V`` template vertices, ``F`` faces, ``E`` expression coefficients.

    Attributes:
        name: subject identifier.
        faces: ``[F, 3]`` int64 triangle vertex indices (shared by every frame).
        template_vertices: ``[V, 3]`` float32 neutral/canonical mesh.
        vertices: ``[T, V, 3]`` float32 tracked mesh per frame, world space.
        expressions: ``[T, E]`` float32 tracked expression coefficients.
        Ks: ``[T, 3, 3]`` float32 intrinsics in pixels.
        camtoworlds: ``[T, 4, 4]`` float32 camera-to-world (OpenCV).
        times: ``[T]`` float32 normalised time in [0, 1].
        images: ``[T, H, W, 3]`` uint8 RGB.
        masks: ``[T, H, W]`` uint8 foreground (255) / background (0).
        train_ids / test_ids: frame indices of each split (disjoint, both non-empty).
        fps: frame rate of the video.
        uvs: optional ``[Vt, 2]`` float32 texture coordinates in [0, 1] (v up, OBJ convention).
        uv_faces: optional ``[F, 3]`` int64 indices into ``uvs`` per face corner.
        head_poses: optional ``[T, 4, 4]`` float32 rigid head-to-world transform of the tracked
            head (vertices already include it); needed by pose-conditioned models.
        extras: extra per-frame arrays, e.g. ground truth of the synthetic subject
            (``true_camtoworlds``, ``true_expressions``, ``true_vertices``, ``true_head_poses``).
        meta: free-form metadata (source, generator settings, ...).
    """

    name: str
    faces: np.ndarray
    template_vertices: np.ndarray
    vertices: np.ndarray
    expressions: np.ndarray
    Ks: np.ndarray
    camtoworlds: np.ndarray
    times: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    train_ids: np.ndarray
    test_ids: np.ndarray
    fps: float = 30.0
    uvs: np.ndarray | None = None
    uv_faces: np.ndarray | None = None
    head_poses: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        """Number of frames ``T``."""
        return int(self.images.shape[0])

    @property
    def num_vertices(self) -> int:
        """Template vertex count ``V``."""
        return int(self.template_vertices.shape[0])

    @property
    def expression_dim(self) -> int:
        """Expression size ``E``."""
        return int(self.expressions.shape[1])

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return int(self.images.shape[2])

    def validate(self, source: str = "<memory>") -> "Subject":
        """Check shapes, finiteness, cameras and splits; raise :class:`SubjectError` naming the problem.

        ``source`` names where the data came from (a folder or file) for the messages.
        Returns ``self`` so parsers can ``return subject.validate(path)``.
        """
        T = self.num_frames
        V = self.num_vertices
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise SubjectError(f"{source}: faces must be [F, 3], got {list(self.faces.shape)}")
        if self.faces.size and (self.faces.min() < 0 or self.faces.max() >= V):
            raise SubjectError(f"{source}: face indices out of range for {V} template vertices")
        per_frame = {
            "vertices": self.vertices, "expressions": self.expressions, "Ks": self.Ks,
            "camtoworlds": self.camtoworlds, "times": self.times, "masks": self.masks,
        }
        if self.head_poses is not None:
            per_frame["head_poses"] = self.head_poses
        per_frame.update({f"extras.{k}": v for k, v in self.extras.items()})
        for key, arr in per_frame.items():
            if arr.shape[0] != T:
                raise SubjectError(
                    f"{source}: {T} images but {arr.shape[0]} entries in '{key}' (frame counts differ)")
        if self.vertices.shape[1:] != (V, 3):
            raise SubjectError(
                f"{source}: tracked vertices have shape {list(self.vertices.shape[1:])} per frame, "
                f"template has {V} vertices")
        if self.masks.shape[1:] != self.images.shape[1:3]:
            raise SubjectError(f"{source}: masks {list(self.masks.shape[1:])} vs images "
                               f"{list(self.images.shape[1:3])}")
        for key in ("vertices", "expressions", "Ks", "camtoworlds", "times"):
            arr = getattr(self, key)
            bad = ~np.isfinite(arr.reshape(T, -1)).all(axis=1)
            if bad.any():
                raise SubjectError(f"{source}: NaN/Inf in '{key}' at frame {int(np.flatnonzero(bad)[0])}")
        check_cameras(self.Ks, self.camtoworlds, source)
        check_split(self.train_ids, self.test_ids, T, source)
        if self.uvs is not None and (self.uv_faces is None or self.uv_faces.shape != self.faces.shape):
            raise SubjectError(f"{source}: uvs given without uv_faces of shape {list(self.faces.shape)}")
        return self


def check_cameras(Ks: np.ndarray, camtoworlds: np.ndarray, source: str) -> None:
    """Raise :class:`SubjectError` on a degenerate camera (focal <= 0, non-rotation matrix).

    Ks: ``[T, 3, 3]``; camtoworlds: ``[T, 4, 4]``.
    """
    for t in range(Ks.shape[0]):
        if Ks[t, 0, 0] <= 0 or Ks[t, 1, 1] <= 0:
            raise SubjectError(f"{source}: frame {t} has focal length <= 0 "
                               f"(fx={Ks[t, 0, 0]:.4g}, fy={Ks[t, 1, 1]:.4g})")
    R = camtoworlds[:, :3, :3].astype(np.float64)
    err = np.abs(R @ np.swapaxes(R, 1, 2) - np.eye(3)).reshape(len(R), -1).max(axis=1)
    det = np.linalg.det(R)
    bad = (err > 1e-3) | (det < 0.5)
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        raise SubjectError(f"{source}: frame {t} camtoworld rotation is not a rotation "
                           f"(|R R^T - I|={err[t]:.3g}, det={det[t]:.3g})")


def check_split(train_ids: np.ndarray, test_ids: np.ndarray, num_frames: int, source: str) -> None:
    """Raise :class:`SubjectError` when a split is empty, out of range or overlapping; the
    message names ``source`` (where the split comes from) and which split."""
    for name, ids in (("train", train_ids), ("test", test_ids)):
        if len(ids) == 0:
            other = len(test_ids) if name == "train" else len(train_ids)
            raise SubjectError(f"{source}: the {name} split has no frames ({num_frames} frames in all, "
                               f"{other} in the {'test' if name == 'train' else 'train'} split; check "
                               f"the split settings of the source)")
        if ids.min() < 0 or ids.max() >= num_frames:
            raise SubjectError(f"{source}: {name} split indexes beyond {num_frames} frames")
    if np.intersect1d(train_ids, test_ids).size:
        raise SubjectError(f"{source}: train and test splits overlap")


def holdout_split(num_frames: int, num_test: int, source: str = "<memory>") -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last ``num_test`` frames for testing (the convention of INSTA/NBS and ours)."""
    if not 0 < num_test < num_frames:
        raise SubjectError(f"{source}: holding out {num_test} test frames of {num_frames} leaves "
                           f"{'no test' if num_test <= 0 else 'no train'} frames")
    ids = np.arange(num_frames)
    return ids[: num_frames - num_test], ids[num_frames - num_test:]
