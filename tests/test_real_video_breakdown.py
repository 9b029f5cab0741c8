"""benchmarks/real_video_breakdown.py: its frame groups and face region on hand-made cases."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from headkit.data.video.ict_fit import FACE_OVAL
from tests.conftest import load_repo_module

breakdown = load_repo_module("benchmarks/real_video_breakdown.py")
face_mask, parse_ranges, rotation_gap_deg = breakdown.face_mask, breakdown.parse_ranges, breakdown.rotation_gap_deg


def test_parse_ranges_reads_inclusive_ranges_and_single_frames():
    assert parse_ranges("2-4,7") == {2, 3, 4, 7}
    assert parse_ranges(None) == set() and parse_ranges("") == set()


def test_face_mask_fills_the_oval_of_the_contour_landmarks():
    landmarks = np.full((478, 2), -100.0)  # every other landmark far away: only the oval counts
    angles = np.linspace(0, 2 * np.pi, len(FACE_OVAL), endpoint=False)
    landmarks[list(FACE_OVAL)] = np.stack([32 + 20 * np.cos(angles), 30 + 20 * np.sin(angles)], axis=1)
    mask = face_mask(landmarks, 64, 64)
    assert mask[30, 32] and not mask[5, 5] and not mask[30, 55]
    polygon_area = 0.5 * len(FACE_OVAL) * 20 ** 2 * np.sin(2 * np.pi / len(FACE_OVAL))
    assert abs(mask.sum() - polygon_area) < 0.03 * polygon_area


def test_rotation_gap_is_the_angle_to_the_nearest_reference_pose():
    angles = [0.0, 10.0, 30.0, 12.0]  # degrees about a tilted axis, frames 0..3
    axis = np.array([0.3, 0.9, 0.3]) / np.linalg.norm([0.3, 0.9, 0.3])
    poses = np.tile(np.eye(4), (4, 1, 1))
    poses[:, :3, :3] = Rotation.from_rotvec(np.radians(angles)[:, None] * axis).as_matrix()
    poses[:, :3, 3] = np.random.default_rng(0).normal(size=(4, 3))  # translations do not count
    gap = rotation_gap_deg(poses, np.array([2, 3]), np.array([0, 1]))
    np.testing.assert_allclose(gap, [20.0, 2.0], atol=1e-4)
