"""Per-frame face landmarks, blendshapes and person masks from MediaPipe Tasks (the ``video`` extra).

:class:`FaceLandmarker` runs MediaPipe's Tasks face landmarker (``face_landmarker.task``, found
by :mod:`.model_files`) in video mode: per face 478 landmarks (468 face-mesh points + 10 iris
points), 51 ARKit-named blendshape scores and a 4x4 facial transformation matrix (the canonical
face, in cm, to MediaPipe's metric camera space). Each landmark comes as ``(x, y, z)`` with
``x, y`` normalised by the image width/height and ``z`` a depth relative to the head centre on
the scale of ``x``; we return them in pixel units ``(x W, y H, z W)``: a weak-perspective 3D
shape whose axes are the image's (x right, y down, z away from the camera).

Only :class:`FaceLandmarker` and :class:`Segmenter` import MediaPipe; :func:`track_video` takes
any callable returning observations or plain ``[L, 3]`` arrays, so the pipeline is testable
without the extra.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from headkit.progress import progress
from .reader import VideoError, iter_frames, probe_video

log = logging.getLogger(__name__)

INSTALL_COMMAND = 'pip install -c constraints.txt -e ".[video]"'

# The blendshapes of face_landmarker.task (float16, version 1) in the model's output order, after
# its leading "_neutral" placeholder: the 52 ARKit names less "tongueOut".
BLENDSHAPE_NAMES: tuple[str, ...] = (
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft", "eyeBlinkRight",
    "eyeLookDownLeft", "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft",
    "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight", "eyeSquintLeft", "eyeSquintRight",
    "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft", "jawOpen", "jawRight", "mouthClose",
    "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft", "mouthFrownRight", "mouthFunnel",
    "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight", "mouthPressLeft", "mouthPressRight",
    "mouthPucker", "mouthRight", "mouthRollLower", "mouthRollUpper", "mouthShrugLower",
    "mouthShrugUpper", "mouthSmileLeft", "mouthSmileRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthUpperUpLeft", "mouthUpperUpRight", "noseSneerLeft", "noseSneerRight",
)
NEUTRAL_BLENDSHAPE = "_neutral"


class MissingExtraError(ImportError):
    """The optional ``video`` extra (MediaPipe) is not installed; the message says how to install it."""


def require_mediapipe():
    """Import and return ``mediapipe``, or raise :class:`MissingExtraError` with the install command."""
    try:
        import mediapipe
    except ImportError as exc:
        raise MissingExtraError(
            f"video preprocessing needs MediaPipe, the optional 'video' extra, which is not "
            f"installed ({exc}). Install it from the repository root with: {INSTALL_COMMAND}") from exc
    return mediapipe


def _mp_image(mp, frame: np.ndarray):  # frame: [H, W, 3] uint8 RGB
    """``frame`` as a MediaPipe SRGB image (raises ValueError on another shape or dtype)."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 RGB frame, got {list(frame.shape)} {frame.dtype}")
    return mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))


@dataclass
class FaceObservation:
    """One face seen in one frame.

    Attributes:
        landmarks: ``[L, 3]`` pixel-unit landmarks (x W, y H, z W); L = 478 from MediaPipe.
        blendshapes: ``[51]`` scores in [0, 1] named by :data:`BLENDSHAPE_NAMES`, or None.
        matrix: ``[4, 4]`` MediaPipe's facial transformation matrix, or None.
    """

    landmarks: np.ndarray
    blendshapes: np.ndarray | None = None
    matrix: np.ndarray | None = None


def _blendshape_scores(categories, task_path) -> np.ndarray:  # -> [51]
    """Scores of one face's blendshape categories, the leading ``_neutral`` dropped; raises
    :class:`VideoError` naming the model when its names are not :data:`BLENDSHAPE_NAMES`."""
    if categories and categories[0].category_name == NEUTRAL_BLENDSHAPE:
        categories = categories[1:]
    names = tuple(c.category_name for c in categories)
    if names != BLENDSHAPE_NAMES:
        raise VideoError(f"{task_path}: the face landmarker returns {len(names)} blendshapes that are not "
                         f"the {len(BLENDSHAPE_NAMES)} expected ones (first: {names[:3]})")
    return np.array([c.score for c in categories], np.float32)


def _create(task, options, path, what: str):
    """``task.create_from_options(options)``; a model file MediaPipe cannot load is a
    :class:`VideoError` naming it."""
    try:
        return task.create_from_options(options)
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise VideoError(f"{path}: MediaPipe cannot load this {what} ({type(exc).__name__}: {first})") from exc


class FaceLandmarker:
    """MediaPipe Tasks face landmarker in video mode:
    ``landmarker(frame [H, W, 3] uint8 RGB, timestamp_ms) -> list[FaceObservation]``.

    Returns one observation per detected face (empty list: no face); ``max_faces > 1`` lets the
    caller pick the largest face when several are visible. Video mode needs strictly increasing
    timestamps: a timestamp that is not (or None) becomes the previous one + 1 ms, so the
    landmarker may be fed frames without times or clip after clip.
    """

    def __init__(self, task_path: str | os.PathLike, max_faces: int = 2,
                 min_face_detection_confidence: float = 0.5, min_face_presence_confidence: float = 0.5,
                 min_tracking_confidence: float = 0.5):
        self.mp = require_mediapipe()
        from mediapipe.tasks.python import BaseOptions, vision

        self.task_path, self.last_timestamp = task_path, -1
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(task_path)), running_mode=vision.RunningMode.VIDEO,
            num_faces=int(max_faces), min_face_detection_confidence=float(min_face_detection_confidence),
            min_face_presence_confidence=float(min_face_presence_confidence),
            min_tracking_confidence=float(min_tracking_confidence),
            output_face_blendshapes=True, output_facial_transformation_matrixes=True)
        self.landmarker = _create(vision.FaceLandmarker, options, task_path, "face landmarker model")

    def _next_timestamp(self, timestamp_ms: int | None) -> int:
        """``timestamp_ms``, or the previous timestamp + 1 when it is None or not larger."""
        wanted = self.last_timestamp + 1 if timestamp_ms is None else int(timestamp_ms)
        self.last_timestamp = max(wanted, self.last_timestamp + 1)
        return self.last_timestamp

    def __call__(self, frame: np.ndarray, timestamp_ms: int | None = None) -> list[FaceObservation]:
        # frame: [H, W, 3] uint8 RGB
        H, W = frame.shape[:2]
        result = self.landmarker.detect_for_video(_mp_image(self.mp, frame), self._next_timestamp(timestamp_ms))
        scale = np.array([W, H, W], np.float64)
        faces = []
        for k, points in enumerate(result.face_landmarks or []):
            shapes = result.face_blendshapes[k] if result.face_blendshapes else None
            matrices = result.facial_transformation_matrixes
            faces.append(FaceObservation(
                landmarks=np.array([[p.x, p.y, p.z] for p in points], np.float64) * scale,
                blendshapes=_blendshape_scores(shapes, self.task_path) if shapes else None,
                matrix=np.asarray(matrices[k], np.float64).reshape(4, 4) if matrices else None))
        return faces

    def close(self) -> None:
        """Release MediaPipe's graph."""
        self.landmarker.close()


class Segmenter:
    """MediaPipe Tasks selfie (person) segmentation:
    ``segmenter(frame [H, W, 3] uint8 RGB) -> [H, W]`` float32 person probability in [0, 1].

    The selfie segmenter models return one confidence mask, the person's.
    """

    def __init__(self, model_path: str | os.PathLike):
        self.mp = require_mediapipe()
        from mediapipe.tasks.python import BaseOptions, vision

        self.model_path = model_path
        options = vision.ImageSegmenterOptions(
            base_options=BaseOptions(model_asset_path=str(model_path)), running_mode=vision.RunningMode.IMAGE,
            output_confidence_masks=True, output_category_mask=False)
        self.segmenter = _create(vision.ImageSegmenter, options, model_path, "segmentation model")

    def __call__(self, frame: np.ndarray) -> np.ndarray:  # frame: [H, W, 3] uint8 RGB -> [H, W]
        masks = self.segmenter.segment(_mp_image(self.mp, frame)).confidence_masks or []
        if len(masks) != 1:
            raise VideoError(f"{self.model_path}: expected one (person) confidence mask from a selfie "
                             f"segmenter, got {len(masks)}")
        mask = np.array(masks[0].numpy_view(), np.float32).reshape(frame.shape[:2])
        return np.clip(mask, 0.0, 1.0)

    def close(self) -> None:
        """Release MediaPipe's graph."""
        self.segmenter.close()


def largest_face(faces: list[FaceObservation]) -> int:
    """Index of the face whose 2D landmark bounding box has the largest area."""
    areas = [float(np.prod(f.landmarks[:, :2].max(0) - f.landmarks[:, :2].min(0))) for f in faces]
    return int(np.argmax(areas))


def as_observation(face: FaceObservation | np.ndarray) -> FaceObservation:
    """An observation as is; a plain ``[L, 3]`` landmark array as one without blendshapes/matrix."""
    return face if isinstance(face, FaceObservation) else FaceObservation(np.asarray(face, np.float64))


def takes_timestamp(tracker: Callable) -> bool:
    """Whether ``tracker`` accepts a second positional argument (the frame's time in ms)."""
    try:
        params = list(inspect.signature(tracker).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: frame only
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


@dataclass
class TrackedVideo:
    """Landmarks (and, from MediaPipe, blendshapes and matrices) of the frames where a face was found.

    Attributes:
        frame_numbers: ``[T]`` video frame numbers of the kept frames.
        landmarks: ``[T, L, 3]`` pixel-unit landmarks (x, y in pixels; z on the scale of x).
        dropped: frame numbers without a face.
        multi_face: frame numbers where several faces were seen (the largest was kept).
        num_read: frames read (after the stride).
        blendshapes: ``[T, 51]`` scores named by ``blendshape_names``; None when the tracker gives none.
        matrices: ``[T, 4, 4]`` facial transformation matrices; None when the tracker gives none.
        blendshape_names: names of the ``blendshapes`` columns (empty without blendshapes).
    """

    frame_numbers: np.ndarray
    landmarks: np.ndarray
    dropped: list[int] = field(default_factory=list)
    multi_face: list[int] = field(default_factory=list)
    num_read: int = 0
    blendshapes: np.ndarray | None = None
    matrices: np.ndarray | None = None
    blendshape_names: tuple[str, ...] = ()


def _stack_optional(values: list[np.ndarray | None]) -> np.ndarray | None:
    """``np.stack(values)`` when every frame has one, else None."""
    return np.stack(values) if values and all(v is not None for v in values) else None


def track_video(path: str | os.PathLike, tracker: Callable[..., list[FaceObservation | np.ndarray]],
                stride: int = 1, max_frames: int | None = None) -> TrackedVideo:
    """Run ``tracker`` on every ``stride``-th frame of the video at ``path``.

    ``tracker(frame)`` or ``tracker(frame, timestamp_ms)`` (when it takes a second argument; the
    time is ``round(frame_number * 1000 / fps)``) returns :class:`FaceObservation`s or plain
    ``[L, 3]`` arrays. Frames without a face are dropped (listed in ``dropped``); where several
    faces are found, the largest is kept and the frame listed in ``multi_face`` (one warning).
    """
    fps = probe_video(path).fps if takes_timestamp(tracker) else None
    numbers, kept, dropped, multi = [], [], [], []
    num_read = 0
    for number, frame in progress(iter_frames(path, stride, max_frames), desc="track landmarks", unit="frame"):
        num_read += 1
        faces = tracker(frame) if fps is None else tracker(frame, round(number * 1000 / fps))
        faces = [as_observation(f) for f in faces]
        if not faces:
            dropped.append(number)
            continue
        if len(faces) > 1:
            multi.append(number)
        numbers.append(number)
        kept.append(faces[largest_face(faces)])
    if multi:
        log.warning("%s: several faces in %d frames (the largest is tracked): %s", path, len(multi), multi)
    sizes = {o.landmarks.shape for o in kept}
    if len(sizes) > 1:
        raise ValueError(f"{path}: the tracker returned landmark arrays of different shapes {sorted(sizes)}")
    blendshapes = _stack_optional([o.blendshapes for o in kept])
    if blendshapes is not None and blendshapes.shape[1] != len(BLENDSHAPE_NAMES):
        raise ValueError(f"{path}: the tracker returned {blendshapes.shape[1]} blendshape scores per face, "
                         f"not the {len(BLENDSHAPE_NAMES)} of BLENDSHAPE_NAMES")
    return TrackedVideo(
        frame_numbers=np.asarray(numbers, np.int64),
        landmarks=np.stack([o.landmarks for o in kept]) if kept else np.zeros((0, 0, 3)),
        dropped=dropped, multi_face=multi, num_read=num_read, blendshapes=blendshapes,
        matrices=_stack_optional([o.matrix for o in kept]),
        blendshape_names=BLENDSHAPE_NAMES if blendshapes is not None else ())
