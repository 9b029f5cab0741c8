"""Per-frame face landmarks and person masks from MediaPipe (the optional ``video`` extra).

MediaPipe's legacy FaceMesh solution runs offline from the wheel (its detector and landmark
models ship inside ``mediapipe==0.10.21``); with ``refine_landmarks`` it returns 478 landmarks
(468 face-mesh points + 10 iris points). Each landmark comes as ``(x, y, z)`` with ``x, y``
normalised by the image width/height and ``z`` a depth relative to the head centre on the scale
of ``x``; we return them in pixel units ``(x W, y H, z W)``: a weak-perspective 3D shape whose
axes are the image's (x right, y down, z away from the camera).

Only :class:`FaceTracker` and :class:`Segmenter` import MediaPipe; :func:`track_video` takes any
callable with the same interface, so the pipeline is testable without the extra.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .reader import iter_frames

log = logging.getLogger(__name__)

INSTALL_COMMAND = 'pip install -c constraints.txt -e ".[video]"'


class MissingExtraError(ImportError):
    """The optional ``video`` extra (MediaPipe) is not installed; the message says how to install it."""


def require_mediapipe():
    """Import and return ``mediapipe``, or raise :class:`MissingExtraError` with the install command."""
    try:
        import mediapipe
    except ImportError as exc:
        raise MissingExtraError(
            f"video preprocessing needs MediaPipe, the optional 'video' extra, which is not "
            f"installed ({exc}). Install it from the repository root with:\n    {INSTALL_COMMAND}\n"
            f"(it pins numpy<2 and protobuf<5; a separate virtual environment keeps it apart)") from exc
    return mediapipe


class FaceTracker:
    """MediaPipe FaceMesh in video mode: ``tracker(frame [H, W, 3] uint8) -> list of [L, 3]``.

    Returns one pixel-unit landmark array per detected face (empty list: no face).
    ``max_faces > 1`` lets the caller pick the largest face when several are visible.
    """

    def __init__(self, max_faces: int = 2, refine_landmarks: bool = True,
                 min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5):
        mp = require_mediapipe()
        self.mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False, max_num_faces=int(max_faces), refine_landmarks=bool(refine_landmarks),
            min_detection_confidence=float(min_detection_confidence),
            min_tracking_confidence=float(min_tracking_confidence))

    def __call__(self, frame: np.ndarray) -> list[np.ndarray]:  # frame: [H, W, 3] uint8 RGB
        H, W = frame.shape[:2]
        result = self.mesh.process(np.ascontiguousarray(frame))
        faces = []
        for face in result.multi_face_landmarks or []:
            pts = np.array([[p.x, p.y, p.z] for p in face.landmark], np.float64)
            faces.append(pts * np.array([W, H, W], np.float64))
        return faces

    def close(self) -> None:
        """Release MediaPipe's graph."""
        self.mesh.close()


class Segmenter:
    """MediaPipe selfie (person) segmentation: ``segmenter(frame [H, W, 3] uint8) -> [H, W]``
    foreground probability in [0, 1]. ``model_selection`` 0 is the general 256x256 model,
    1 the faster landscape 144x256 one."""

    def __init__(self, model_selection: int = 0):
        mp = require_mediapipe()
        self.model = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=int(model_selection))

    def __call__(self, frame: np.ndarray) -> np.ndarray:  # frame: [H, W, 3] uint8 RGB
        mask = self.model.process(np.ascontiguousarray(frame)).segmentation_mask
        return np.clip(np.asarray(mask, np.float32), 0.0, 1.0)

    def close(self) -> None:
        """Release MediaPipe's graph."""
        self.model.close()


def largest_face(faces: list[np.ndarray]) -> int:
    """Index of the face whose 2D landmark bounding box has the largest area."""
    areas = [float(np.prod(f[:, :2].max(0) - f[:, :2].min(0))) for f in faces]
    return int(np.argmax(areas))


@dataclass
class TrackedVideo:
    """Landmarks of the frames where a face was found.

    Attributes:
        frame_numbers: ``[T]`` video frame numbers of the kept frames.
        landmarks: ``[T, L, 3]`` pixel-unit landmarks (x, y in pixels; z on the scale of x).
        dropped: frame numbers without a face.
        multi_face: frame numbers where several faces were seen (the largest was kept).
        num_read: frames read (after the stride).
    """

    frame_numbers: np.ndarray
    landmarks: np.ndarray
    dropped: list[int] = field(default_factory=list)
    multi_face: list[int] = field(default_factory=list)
    num_read: int = 0


def track_video(path: str | os.PathLike, tracker: Callable[[np.ndarray], list[np.ndarray]],
                stride: int = 1, max_frames: int | None = None) -> TrackedVideo:
    """Run ``tracker`` on every ``stride``-th frame of the video at ``path``.

    Frames without a face are dropped (listed in ``dropped``); where several faces are found,
    the largest is kept and the frame listed in ``multi_face`` (one warning for the clip).
    """
    numbers, landmarks, dropped, multi = [], [], [], []
    num_read = 0
    for number, frame in iter_frames(path, stride, max_frames):
        num_read += 1
        faces = tracker(frame)
        if not faces:
            dropped.append(number)
            continue
        if len(faces) > 1:
            multi.append(number)
        numbers.append(number)
        landmarks.append(faces[largest_face(faces)])
    if multi:
        log.warning("%s: several faces in %d frames (the largest is tracked): %s", path, len(multi), multi)
    sizes = {lm.shape for lm in landmarks}
    if len(sizes) > 1:
        raise ValueError(f"{path}: the tracker returned landmark arrays of different shapes {sorted(sizes)}")
    return TrackedVideo(
        frame_numbers=np.asarray(numbers, np.int64),
        landmarks=np.stack(landmarks) if landmarks else np.zeros((0, 0, 3)),
        dropped=dropped, multi_face=multi, num_read=num_read)
