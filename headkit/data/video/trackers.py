"""Head geometry from a clip's landmarks: ``video_preprocess.tracker`` picks one of ``TRACKERS``.

- ``ict`` (default): the ICT-FaceKit full head (face, scalp, ears, neck; about 11k vertices with
  the default regions) fitted to MediaPipe's landmarks (:mod:`.ict_fit`); expressions are the
  kit's 53 ARKit-named blendshape weights, shared by every subject tracked this way; masks are
  cut below the fitted neck (:mod:`.head_mask`).
- ``mediapipe_mesh``: MediaPipe's 468-vertex face lifted to 3D (:mod:`.align`), expressions a
  PCA of one clip's deformations, the selfie masks as they are (the earlier pipeline, kept for
  comparison).

A tracker is built once per clip (it loads its assets, so a missing kit fails before any video is
read) and then called with the smoothed landmarks; it returns a :class:`HeadTrack`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .align import align_frames, fit_head_poses, lift_landmarks, to_head_space
from .expressions import fit_expression_pca
from .landmarks import TrackedVideo
from .mesh_topology import CanonicalFace
from .model_files import KEY
from .smoothing import gaussian_smooth, smooth_poses

log = logging.getLogger(__name__)


@dataclass
class HeadTrack:
    """What a tracker gives the subject folder. ``T`` frames, ``V`` vertices, ``E`` expressions."""

    vertices: np.ndarray  # [T, V, 3] camera space of the uncropped video
    head_poses: np.ndarray  # [T, 4, 4] head to camera
    template: np.ndarray  # [V, 3] the subject's neutral head, head coordinates
    faces: np.ndarray  # [F, 3]
    uvs: np.ndarray | None  # [U, 2]
    uv_faces: np.ndarray | None  # [F, 3]
    expressions: np.ndarray  # [T, E]
    K: np.ndarray  # [3, 3] intrinsics of the uncropped video
    expression_names: list[str] | None = None
    neck: tuple[np.ndarray, np.ndarray] | None = None  # neck-loop vertex ids [N], its edges [M, 2]
    landmark_error_px: np.ndarray | None = None  # [T] mean reprojection error per frame
    meta: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # extra .npz files to write


def fit_head_track(landmarks: np.ndarray,  # [T, V, 3] pixel units (smoothed)
                   frame_numbers: np.ndarray,  # [T]
                   train_ids: np.ndarray,  # [N]
                   canonical: CanonicalFace, K: np.ndarray,  # [3, 3]
                   settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lifted vertices, head poses and the subject's template.

    Per pass: weak-perspective robust similarity to the reference (its scale and centroid,
    smoothed over time, fix each frame's depth), 3D lifting, then a robust rigid fit of the
    reference to the lifted points (the head pose, smoothed). Pass 1 uses the generic canonical
    face; the mean head-space shape of the training frames (the subject's own face, in the
    canonical frame) replaces it for pass 2, so the subject's identity no longer biases the poses.
    Returns ``vertices [T, V, 3]`` (world), ``head_poses [T, 4, 4]``, ``template [V, 3]``.
    """
    reference = canonical.vertices
    loss, iterations, sigma = settings.robust_loss, settings.robust_iterations, settings.pose_sigma
    for _ in range(2):
        scales, rotations, translations = align_frames(landmarks, reference, loss, iterations)
        anchors = scales[:, None] * (rotations @ reference.mean(0)) + translations  # fitted centroids [T, 3]
        scales = np.exp(gaussian_smooth(np.log(scales), frame_numbers, sigma))
        anchors = gaussian_smooth(anchors, frame_numbers, sigma)
        vertices = lift_landmarks(landmarks, scales, anchors, K)
        head_poses = smooth_poses(fit_head_poses(vertices, reference, loss, iterations), frame_numbers, sigma)
        reference = to_head_space(vertices, head_poses)[train_ids].mean(0)
    return vertices, head_poses, reference


class MediaPipeMeshTracker:
    """``tracker: mediapipe_mesh``: the canonical face's topology, lifted landmarks, PCA expressions."""

    def __init__(self, settings, canonical: CanonicalFace, head_model=None):  # head_model: unused
        self.settings, self.canonical = settings, canonical

    def __call__(self, landmarks: np.ndarray,  # [T, L, 3] pixel units, smoothed
                 tracked: TrackedVideo, train_ids: np.ndarray, K: np.ndarray) -> HeadTrack:
        s, V = self.settings, self.canonical.num_vertices
        vertices, head_poses, template = fit_head_track(landmarks[:, :V], tracked.frame_numbers, train_ids,
                                                        self.canonical, K, s)
        deformations = to_head_space(vertices, head_poses) - template
        pca = fit_expression_pca(deformations[train_ids], s.expression_dim, s.whiten_expressions,
                                 key=f"{KEY}.expression_dim")
        return HeadTrack(
            vertices=vertices, head_poses=head_poses, template=template, faces=self.canonical.faces,
            uvs=self.canonical.uvs, uv_faces=self.canonical.faces, expressions=pca.encode(deformations), K=K,
            meta={"topology": self.canonical.source, "units": "metres, assuming the canonical face's size",
                  "expression": "whitened PCA of head-space deformations (expression_basis.npz)",
                  "expression_explained_variance": pca.explained.round(5).tolist()},
            files={"expression_basis.npz": {"mean": pca.mean, "basis": pca.basis, "stds": pca.stds,
                                            "explained": pca.explained, "whiten": np.asarray(pca.whiten)}})


def unit_square_uvs(uvs: np.ndarray) -> np.ndarray:  # [U, 2] -> [U, 2]
    """UDIM tiles side by side squeezed into [0, 1]^2: ``u / n`` for ``n`` tiles along ``u`` (the ICT
    kit puts the face in tile 1001 and scalp, ears and neck in tile 1002), ``v`` likewise."""
    tiles = np.maximum(np.ceil(uvs.max(0)), 1.0)
    return (uvs / tiles).astype(np.float32)


def load_head_model(settings):
    """The ICT head model the settings name (kit resolved by config > env > data dir > download)."""
    from ...headmodel import load_ict_face_model, resolve_ict_kit

    kit = resolve_ict_kit(settings.head_model_dir, settings.data_dir)
    return load_ict_face_model(kit, regions=tuple(settings.head_regions), num_identities=settings.num_identities,
                               cache_dir=settings.cache_dir)


class IctTracker:
    """``tracker: ict``: the ICT-FaceKit head fitted to the landmarks (see the module docstring)."""

    def __init__(self, settings, canonical: CanonicalFace, head_model=None):
        from .correspondence import load_or_register
        from .head_mask import neck_loop

        self.settings = settings
        self.model = head_model if head_model is not None else load_head_model(settings)
        self.corr = load_or_register(canonical.vertices, self.model, settings.cache_dir)
        self.neck = neck_loop(self.model.faces, self.model.neutral) if settings.neck_cut else None

    def __call__(self, landmarks: np.ndarray,  # [T, L, 3] pixel units, smoothed
                 tracked: TrackedVideo, train_ids: np.ndarray, K: np.ndarray) -> HeadTrack:
        from .ict_fit import IctFitSettings, fit_ict_clip, posed_vertices

        s, model = self.settings, self.model
        fit_settings = IctFitSettings(num_identities=s.num_identities, **dict(s.ict_fit or {}))
        track = fit_ict_clip(landmarks, model, self.corr, K, tracked.blendshapes, list(tracked.blendshape_names),
                             fit_settings)
        K_fit = K.copy()
        K_fit[0, 0] = K_fit[1, 1] = track.focal
        template = model.vertices(identities=track.identity)
        error = track.residual_px.mean(1)
        return HeadTrack(
            vertices=posed_vertices(model, track), head_poses=track.head_poses, template=template,
            faces=model.faces, uvs=unit_square_uvs(model.uvs), uv_faces=model.uv_faces,
            expressions=track.expressions, K=K_fit,
            expression_names=list(model.expression_names), neck=self.neck, landmark_error_px=error,
            meta={"topology": model.source, "head_regions": list(model.regions),
                  "units": "metres (the kit's head size, scaled by the fitted identity)",
                  "expression": "ICT-FaceKit blendshape weights in [0, 1] (ARKit names: expression_names)",
                  "correspondence_residual_mm": self.corr.summary(),
                  "landmark_error_px": {"mean": round(float(error.mean()), 3),
                                        "max_frame": round(float(error.max()), 3)},
                  "fitted_focal_px": round(track.focal, 2), "prior_focal_px": round(float(K[0, 0]), 2),
                  "identity": track.identity.round(4).tolist()},
            files={"head_model.npz": {"template": template.astype(np.float32),
                                      "expressions": model.expressions.astype(np.float16),
                                      "expression_names": np.array(model.expression_names),
                                      "identity": track.identity.astype(np.float32)}})


TRACKERS = {"ict": IctTracker, "mediapipe_mesh": MediaPipeMeshTracker}


def make_tracker(settings, canonical: CanonicalFace, head_model=None):
    """The tracker ``settings.tracker`` names, with its assets loaded."""
    return TRACKERS[settings.tracker](settings, canonical, head_model)


def read_head_model(folder: str | Path) -> dict[str, np.ndarray]:
    """A subject folder's ``head_model.npz`` (``tracker: ict``): its template, the kit's expression
    basis ``[E, V, 3]`` and names; for re-enactment with another subject's expression weights."""
    path = Path(folder) / "head_model.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; only subjects tracked with video_preprocess.tracker=ict "
                                "carry a head model")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
