"""The video pipeline with ``tracker: ict``: subject folder, head-and-neck masks, errors.

A synthetic open head (an ellipsoid cut at the neck) stands in for the ICT kit; the landmarks come
from a fake tracker that sees it under known poses, or from the real MediaPipe models when their
files are present (then the correspondence is registered to MediaPipe's real canonical face).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import Delaunay

from headkit.data.folder import load_subject_folder
from headkit.data.video.correspondence import NAMED_PAIRS
from headkit.data.video.mesh_topology import CanonicalFace
from headkit.data.video.preprocess import VideoSettings, preprocess_video
from headkit.data.video.trackers import read_head_model
from headkit.headmodel import HeadModel, HeadModelError
from tests.test_ict_fit import synthesise_clip, synthetic_head
from tests.test_mediapipe_tasks import mediapipe_models  # noqa: F401  (fixture: the real model files)
from tests.test_video_preprocess import astronaut_frames, fake_segmenter, write_clip

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def open_head() -> tuple[HeadModel, np.ndarray]:
    """The synthetic head with its triangles below ``y = 0.08`` removed (a neck opening), as a
    :class:`HeadModel`; and the 468 vertex ids the fake landmarks sit on."""
    model, perm = synthetic_head()
    faces = model.faces[(model.neutral[model.faces][..., 1] < 0.08).all(1)]
    V = len(model.neutral)
    ids = perm[model.neutral[perm, 1] < 0.06][:468]  # landmarks on the kept surface
    landmark_vertices = model.landmark_vertices.copy()
    for kit, mp in NAMED_PAIRS:
        landmark_vertices[kit] = ids[mp]
    head = HeadModel(
        neutral=model.neutral, expressions=model.expressions, expression_names=list(model.expression_names),
        identities=model.identities, faces=faces, uvs=np.random.default_rng(0).uniform(size=(V, 2)).astype(np.float32),
        uv_faces=faces.copy(), vertex_ids=np.arange(V), landmark_vertices=landmark_vertices,
        regions=("synthetic",), source="synthetic test head")
    return head, ids


class SyntheticHeadTracker:
    """Fake landmarker: 478 pixel-unit landmarks of the synthetic head per frame (the last 10,
    'iris', copies of the first)."""

    def __init__(self, landmarks: np.ndarray):  # [T, 468, 3]
        self.landmarks, self.calls = landmarks, 0

    def __call__(self, frame: np.ndarray) -> list[np.ndarray]:
        t, self.calls = self.calls, self.calls + 1
        return [np.concatenate([self.landmarks[t], self.landmarks[t, :10]])]


def write_ict_subject(tmp_path, frames: int = 10, **overrides):
    """The synthetic head's clip through ``preprocess_video`` with ``tracker=ict`` (``overrides``:
    other settings): ``(head, truth, summary)``."""
    head, ids = open_head()
    landmarks, truth, K = synthesise_clip(head, ids, T=frames, focal=500.0, size=(320, 240))
    video = write_clip(tmp_path / "clip.mp4", frames, 320, 240)
    canonical = CanonicalFace(vertices=head.neutral[ids].astype(np.float64),
                              faces=Delaunay(head.neutral[ids, :2]).simplices.astype(np.int64),
                              uvs=np.zeros((468, 2), np.float32), source="test")
    settings = VideoSettings(tracker="ict", focal_px=500.0, image_size=48, sheet_frames=4, landmark_sigma=0.0,
                             num_identities=3, cache_dir=str(tmp_path / "cache"),
                             ict_fit={"fit_focal": False, "smooth_pose": 0.0, "smooth_expression": 0.0,
                                      "expression_reg": 1e-5, "identity_reg": 1e-6, "contour_weight": 1.0,
                                      "joint_steps": 400, "lr": 0.02}, **overrides)
    summary = preprocess_video(video, tmp_path / "out", canonical, settings, tracker=SyntheticHeadTracker(landmarks),
                               segmenter=lambda crop: np.ones(crop.shape[:2], np.float32), head_model=head)
    return head, truth, summary


def test_neck_cut_switch_keeps_the_person_mask(tmp_path):
    write_ict_subject(tmp_path, frames=4, neck_cut=False)
    s = load_subject_folder(tmp_path / "out")
    # The segmenter said all foreground and the crops lie inside the frame: nothing is cut.
    assert (s.masks == 255).all() and s.meta["settings"]["neck_cut"] is False


def test_reenactment_poses_the_targets_head_with_the_driving_weights(tmp_path):
    head, _, _ = write_ict_subject(tmp_path, frames=6)
    subject = load_subject_folder(tmp_path / "out")
    from headkit.engine import videos as render
    weights = np.zeros((3, len(head.expression_names)), np.float32)
    weights[1, 2] = 1.0
    frames = list(render.reenact_frames(subject, tmp_path / "out", weights))
    assert len(frames) == 3
    pose = subject.head_poses[int(subject.test_ids[0])].astype(np.float64)
    local = subject.template_vertices + head.expressions[2]  # the target's head, shape 2 at full weight
    expected = local @ pose[:3, :3].T + pose[:3, 3]
    np.testing.assert_allclose(frames[1][0]["vertices"][0].numpy(), expected, atol=1e-4)  # float16 basis
    np.testing.assert_allclose(frames[1][0]["expression"][0].numpy(), weights[1])


def test_ict_pipeline_writes_the_full_head_subject(tmp_path):
    head, truth, summary = write_ict_subject(tmp_path)
    s = load_subject_folder(tmp_path / "out")
    assert summary["tracker"] == "ict" and summary["landmark_error_px"] < 2.0  # registration slides points ~1 mm
    assert s.num_vertices == len(head.neutral) and np.array_equal(s.faces, head.faces)
    assert s.expression_dim == len(head.expression_names) and s.meta["expression_names"] == head.expression_names
    for t in range(10):  # the tracked poses are the true ones
        relative = s.head_poses[t, :3, :3].T @ truth.rotations[t]
        assert np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1))) < 1.0
    assert np.abs(s.expressions - truth.expressions).mean() < 0.05  # a bump below the landmarks is unseen
    # Masks: all foreground from the segmenter, cut below the projected neck opening.
    hom = np.einsum("tij,tvj->tvi", s.Ks.astype(np.float64), s.vertices.astype(np.float64))
    pixels = hom[..., :2] / hom[..., 2:]
    neck_y = pixels[:, head.neutral[:, 1] > 0.07, 1].max(1)  # lowest projected neck vertices
    for t in range(10):
        below = int(np.ceil(neck_y[t])) + 1
        if below < 48:
            assert s.masks[t, below:].max() == 0
        x, y = pixels[t].mean(0).round().astype(int)
        assert s.masks[t, y, x] == 255  # the head above it is kept
    assert (s.masks == 0).mean() > 0.1  # the segmenter said all foreground: the cut removed the rest
    model_file = read_head_model(tmp_path / "out")
    assert model_file["expressions"].shape == (len(head.expression_names), len(head.neutral), 3)
    np.testing.assert_allclose(model_file["template"], s.template_vertices, atol=1e-6)
    assert (tmp_path / "out" / "contact_sheet.png").is_file()


def test_missing_kit_fails_before_the_video_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv("HEADKIT_ICT_FACEKIT", raising=False)
    video = write_clip(tmp_path / "clip.mp4", 4)
    head, ids = open_head()
    canonical = CanonicalFace(vertices=head.neutral[ids].astype(np.float64), faces=np.zeros((0, 3), np.int64),
                              uvs=np.zeros((468, 2), np.float32))
    calls = []
    settings = VideoSettings(tracker="ict", head_model_dir=str(tmp_path / "no-kit"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(HeadModelError, match=r"no-kit.*video_preprocess\.head_model_dir"):
        preprocess_video(video, tmp_path / "out", canonical, settings, tracker=lambda f: calls.append(f) or [],
                         segmenter=fake_segmenter)
    assert not calls and not (tmp_path / "out").exists()


def test_unknown_tracker_and_fit_keys_are_named():
    with pytest.raises(ValueError, match=r"video_preprocess\.tracker='flame'"):
        VideoSettings(tracker="flame")
    with pytest.raises(ValueError, match=r"video_preprocess\.ict_fit"):
        VideoSettings(ict_fit={"robust_pixels": 2.0})


def test_ict_pipeline_on_a_real_clip_with_the_real_models(tmp_path, mediapipe_models):  # noqa: F811
    """MediaPipe's real landmarks, blendshapes and canonical face, fitted with the synthetic head."""
    import imageio.v3 as iio

    from headkit.data.video.mesh_topology import load_canonical_face

    angles = 5 * np.sin(np.arange(8) / 2.0)
    frames = astronaut_frames(angles, np.ones(8), size=192)
    iio.imwrite(tmp_path / "astronaut.mp4", frames, plugin="FFMPEG", fps=8)
    head, _ = open_head()
    summary = preprocess_video(tmp_path / "astronaut.mp4", tmp_path / "out", load_canonical_face(mediapipe_models[0]),
                               VideoSettings(tracker="ict", image_size=64, sheet_frames=4, num_identities=3,
                                             cache_dir=str(tmp_path / "cache"),
                                             ict_fit={"rigid_steps": 60, "joint_steps": 60}),
                               head_model=head)
    s = load_subject_folder(tmp_path / "out")
    assert summary["dropped"] == 0 and s.num_frames == 8 and s.num_vertices == len(head.neutral)
    assert s.meta["tracker"] == "ict" and np.isfinite(s.vertices).all()
    assert s.meta["correspondence_residual_mm"]["mean_mm"] > 0  # registered to the real canonical face
    # MediaPipe's smile scores initialise the fit: names reach the subject.
    assert len(s.meta["expression_names"]) == s.expression_dim
    assert (s.masks > 0).any()


def test_arkit_csv_drives_the_kit_shapes(tmp_path):
    from headkit.data.video.reenact import ReenactError, read_arkit_csv, reenacted_vertices

    names = ["browInnerUp_L", "browInnerUp_R", "eyeBlink_L", "eyeBlink_R", "jawOpen"]
    path = tmp_path / "capture.csv"
    path.write_text("Timecode,BlendShapeCount,EyeBlinkLeft,EyeBlinkRight,JawOpen,BrowInnerUp,HeadYaw\n"
                    "00:00:00:00.000,52,0.5,0.25,0.75,0.2,0.1\n00:00:00:01.000,52,0,0,1,0,0\n")
    weights = read_arkit_csv(path, names)
    np.testing.assert_allclose(weights, [[0.2, 0.2, 0.5, 0.25, 0.75], [0, 0, 0, 0, 1]])
    head = {"template": np.zeros((4, 3), np.float32), "expressions": np.zeros((5, 4, 3), np.float32)}
    head["expressions"][4, :, 1] = 0.01  # jawOpen moves every vertex 1 cm down
    pose = np.eye(4)
    pose[:3, 3] = [0, 0, 1]
    verts = reenacted_vertices(head, weights, pose)
    np.testing.assert_allclose(verts[1], [[0, 0.01, 1]] * 4, atol=1e-7)
    with pytest.raises(ReenactError, match="3 expressions.*5"):
        reenacted_vertices(head, weights[:, :3], pose)
    bad = tmp_path / "bad.csv"
    bad.write_text("Timecode,HeadYaw\n0,0\n")
    with pytest.raises(ReenactError, match=r"bad\.csv: no ARKit blendshape column"):
        read_arkit_csv(bad, names)
    bad.write_text("JawOpen\nhalf\n")
    with pytest.raises(ReenactError, match=r"bad\.csv: row 2"):
        read_arkit_csv(bad, names)


def test_udim_tiles_are_packed_into_the_unit_square():
    from headkit.data.video.trackers import unit_square_uvs

    uvs = np.array([[0.2, 0.5], [1.9, 0.99], [0.0, 0.0]], np.float32)  # the kit: face in tile 1, head in 2
    np.testing.assert_allclose(unit_square_uvs(uvs), [[0.1, 0.5], [0.95, 0.99], [0.0, 0.0]])
    np.testing.assert_allclose(unit_square_uvs(uvs[[0, 2]]), uvs[[0, 2]])  # one tile: unchanged
