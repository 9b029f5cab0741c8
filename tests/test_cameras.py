"""Tests for headkit.cameras: look-at, intrinsics, projection, SO(3)/SE(3) maps, quaternions."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from headkit.cameras import (
    camtoworld_to_viewmat,
    intrinsics_from_fov,
    invert_rigid,
    look_at,
    make_intrinsics,
    perturb_pose,
    project_points,
    quat_to_rotmat,
    rotmat_to_quat,
    se3_exp,
    so3_exp,
    skew,
    so3_log,
    transform_points,
    viewmat_to_camtoworld,
)


def _random_axis_angles(n, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    axes = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    angles = lo + (hi - lo) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    return axes * angles


def test_look_at_target_on_optical_axis_at_image_centre():
    g = torch.Generator().manual_seed(1)
    eyes = torch.randn(8, 3, generator=g) * 3
    targets = torch.randn(8, 3, generator=g) * 0.5
    c2w = look_at(eyes, targets)
    R = c2w[:, :3, :3]
    assert torch.allclose(R.transpose(1, 2) @ R, torch.eye(3).expand(8, 3, 3), atol=1e-6)
    assert torch.allclose(torch.linalg.det(R), torch.ones(8), atol=1e-6)
    assert torch.allclose(c2w[:, :3, 3], eyes)
    W, H = 64, 48
    K = intrinsics_from_fov(40.0, W, H).expand(8, 3, 3)
    pix, depth = project_points(targets[:, None], camtoworld_to_viewmat(c2w), K)
    assert torch.allclose(pix[:, 0], torch.tensor([W / 2, H / 2]).expand(8, 2), atol=1e-4)
    assert torch.allclose(depth[:, 0], (targets - eyes).norm(dim=-1), atol=1e-5)


def test_look_at_up_vector_appears_up_in_image():
    # Camera on +z looking at the origin with world +y up: a point above the target must
    # project above the image centre (smaller v), a point at +x to the right (OpenGL-like view).
    c2w = look_at(torch.tensor([[0.0, 0.0, 5.0]]), torch.zeros(1, 3))
    expected = torch.tensor([[1.0, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 5], [0, 0, 0, 1]])
    assert torch.allclose(c2w[0], expected, atol=1e-6)
    K = intrinsics_from_fov(60.0, 32, 32)[None]
    pts = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    pix, _ = project_points(pts, camtoworld_to_viewmat(c2w), K)
    assert pix[0, 0, 1] < 16 and abs(pix[0, 0, 0] - 16) < 1e-5
    assert pix[0, 1, 0] > 16 and abs(pix[0, 1, 1] - 16) < 1e-5


def test_look_at_custom_up_and_broadcasting():
    # Looking along world +x with world +z up: image down (camera y) is world -z, right is -y.
    c2w = look_at(torch.zeros(3), torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]]),
                  torch.tensor([0.0, 0.0, 1.0]))
    assert c2w.shape == (2, 4, 4)
    assert torch.allclose(c2w[0, :3, :3], torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]]), atol=1e-6)
    assert torch.allclose(c2w[1, :3, 1], torch.tensor([0.0, 0, -1]), atol=1e-6)


def test_look_at_rejects_degenerate_inputs():
    with pytest.raises(ValueError, match="parallel"):
        look_at(torch.tensor([0.0, 5.0, 0.0]), torch.zeros(3))
    with pytest.raises(ValueError, match="coincides"):
        look_at(torch.zeros(2, 3), torch.zeros(2, 3))


def test_intrinsics_and_hand_computed_projection():
    K = intrinsics_from_fov(90.0, 200, 100)
    # tan(45°) = 1 → fy = H / 2.
    assert torch.allclose(K, torch.tensor([[50.0, 0, 100], [0, 50, 50], [0, 0, 1]]))
    K2 = make_intrinsics(100.0, 120.0, 30.0, 20.0)
    viewmat = torch.eye(4)
    viewmat[:3, 3] = torch.tensor([0.0, 0.0, 2.0])  # world origin 2 units in front
    pts = torch.tensor([[[0.0, 0.0, 0.0], [1.0, -0.5, 2.0], [0.2, 0.4, 0.0]]])
    pix, depth = project_points(pts, viewmat[None], K2[None])
    expected = torch.tensor([[30.0, 20.0], [30 + 100 * 1 / 4, 20 - 120 * 0.5 / 4], [30 + 10.0, 20 + 24.0]])
    assert torch.allclose(pix[0], expected, atol=1e-5)
    assert torch.allclose(depth[0], torch.tensor([2.0, 4.0, 2.0]))
    with pytest.raises(ValueError, match="fov_y_deg"):
        intrinsics_from_fov(0.0, 10, 10)
    # Batched tensors keep their batch shape.
    Ks = make_intrinsics(torch.tensor([1.0, 2.0]), 3.0, 4.0, 5.0)
    assert Ks.shape == (2, 3, 3) and Ks[1, 0, 0] == 2.0 and Ks[0, 1, 2] == 5.0


def test_rigid_inverse_and_transform_points():
    R = so3_exp(_random_axis_angles(5, 0.0, 3.0)).float()
    T = torch.eye(4).repeat(5, 1, 1)
    T[:, :3, :3] = R
    T[:, :3, 3] = torch.randn(5, 3)
    inv = invert_rigid(T)
    assert torch.allclose(inv, torch.linalg.inv(T), atol=1e-5)
    assert torch.allclose(camtoworld_to_viewmat(T), inv)
    assert torch.allclose(viewmat_to_camtoworld(inv), T, atol=1e-5)
    pts = torch.randn(5, 7, 3)
    hom = torch.cat([pts, torch.ones(5, 7, 1)], -1) @ T.transpose(1, 2)
    assert torch.allclose(transform_points(pts, T), hom[..., :3], atol=1e-5)


@pytest.mark.parametrize("lo,hi", [(0.0, 1e-6), (1e-6, 0.1), (0.1, 3.0), (math.pi - 1e-3, math.pi - 1e-9)])
def test_so3_exp_log_round_trip(lo, hi):
    w = _random_axis_angles(200, lo, hi)
    R = so3_exp(w)
    ref = torch.from_numpy(Rotation.from_rotvec(w.numpy()).as_matrix())
    assert torch.allclose(R, ref, atol=1e-12)
    assert torch.allclose(so3_log(R), w, atol=1e-9)
    # float32 keeps a useful accuracy too.
    assert torch.allclose(so3_log(so3_exp(w.float())), w.float(), atol=2e-5)


def test_so3_log_at_exactly_pi():
    for axis in torch.eye(3, dtype=torch.float64):
        R = so3_exp(axis * math.pi)
        w = so3_log(R)
        assert torch.allclose(w.abs(), axis * math.pi, atol=1e-7)  # ±axis·π are the same rotation
        assert torch.allclose(so3_exp(w), R, atol=1e-12)


def test_so3_exp_gradient_finite_and_correct_at_zero():
    w0 = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(so3_exp, (w0,))
    w_small = torch.full((1, 3), 1e-4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(so3_exp, (w_small,))
    w_big = _random_axis_angles(3, 0.2, 3.0).requires_grad_(True)
    assert torch.autograd.gradcheck(so3_exp, (w_big,))
    # At 0 the derivative of R w.r.t. ω_k is the generator [e_k]_x, also in float32.
    jac = torch.autograd.functional.jacobian(so3_exp, torch.zeros(3))  # [3, 3, 3]
    for k in range(3):
        assert torch.allclose(jac[..., k], skew(torch.eye(3)[k]))


def test_se3_exp_is_decoupled_and_perturb_pose_sides():
    xi = torch.tensor([0.1, -0.2, 0.3, 1.0, 2.0, 3.0], dtype=torch.float64)
    T = se3_exp(xi)
    assert torch.allclose(T[:3, :3], so3_exp(xi[:3]))
    assert torch.allclose(T[:3, 3], xi[3:])  # translation added as is (not V(ω) v)
    assert torch.allclose(T[3], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))
    c2w = look_at(torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    left, right = perturb_pose(c2w, xi, "left"), perturb_pose(c2w, xi, "right")
    assert torch.allclose(left, T @ c2w) and torch.allclose(right, c2w @ T)
    # A pure camera-frame shift along z moves the camera centre along its viewing axis.
    fwd = perturb_pose(c2w, torch.tensor([0, 0, 0, 0, 0, 0.5], dtype=torch.float64), "right")
    assert torch.allclose(fwd[:3, 3], c2w[:3, 3] + 0.5 * c2w[:3, 2])
    assert torch.allclose(perturb_pose(c2w, torch.zeros(6, dtype=torch.float64)), c2w)
    with pytest.raises(ValueError, match="side"):
        perturb_pose(c2w, xi, "middle")


def test_quaternion_round_trip_against_scipy():
    q_xyzw = Rotation.random(500, random_state=3).as_quat()  # scipy is scalar-last
    q_wxyz = torch.from_numpy(np.roll(q_xyzw, 1, axis=-1))
    R = quat_to_rotmat(q_wxyz)
    assert torch.allclose(R, torch.from_numpy(Rotation.from_quat(q_xyzw).as_matrix()), atol=1e-12)
    q_back = rotmat_to_quat(R)
    canon = torch.where(q_wxyz[:, :1] < 0, -q_wxyz, q_wxyz)
    assert torch.allclose(q_back, canon, atol=1e-12)
    # Unnormalised input is normalised inside.
    assert torch.allclose(quat_to_rotmat(q_wxyz * 3.7), R, atol=1e-12)
    # 180° rotations (w = 0) take the non-w branches of Shepperd's method.
    half = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0],
                         [0.0, 0.6, 0.0, 0.8]], dtype=torch.float64)
    back = rotmat_to_quat(quat_to_rotmat(half))
    assert torch.allclose(back.abs(), half.abs(), atol=1e-12)
