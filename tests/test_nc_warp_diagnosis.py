"""The mesh-flow warp of benchmarks/nc_warp_diagnosis.py moves content with the mesh."""

from __future__ import annotations

import torch

from headkit.cameras import intrinsics_from_fov
from tests.conftest import load_repo_module

diagnosis = load_repo_module("benchmarks/nc_warp_diagnosis.py")


def _frame(shift_x: float, K: torch.Tensor) -> dict:
    # A fronto-parallel quad at depth 2 covering the view, translated along camera x.
    verts = torch.tensor([[-2.0, -2.0, 2.0], [2.0, -2.0, 2.0], [2.0, 2.0, 2.0], [-2.0, 2.0, 2.0]])
    verts[:, 0] += shift_x
    return {"vertices": verts[None], "viewmat": torch.eye(4)[None], "K": K[None]}


def test_mesh_flow_warp_is_identity_without_motion_and_shifts_with_the_mesh():
    H = W = 16
    K = intrinsics_from_fov(40.0, W, H)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    image = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(0))
    still = diagnosis.mesh_flow_warp(image, _frame(0.0, K), _frame(0.0, K), faces)
    torch.testing.assert_close(still, image, atol=1e-5, rtol=0)
    one_px = 2.0 / float(K[0, 0])  # a translation that moves the quad's projection by 1 pixel
    moved = diagnosis.mesh_flow_warp(image, _frame(0.0, K), _frame(one_px, K), faces)
    torch.testing.assert_close(moved[:, :, 1:], image[:, :, :-1], atol=1e-4, rtol=0)
