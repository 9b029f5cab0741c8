"""Tests for headkit.render.mesh_raster against an independent float64 ray caster and hand cases."""

import pytest
import torch

from headkit.cameras import camtoworld_to_viewmat, intrinsics_from_fov, look_at, make_intrinsics
from headkit.mesh import icosphere
from headkit.render import MeshRaster, interpolate, rasterize_mesh

W, H = 64, 48


def ray_cast_reference(vertices, faces, camtoworld, K, width, height):
    """Möller–Trumbore in float64: nearest hit of every pixel-centre ray against every triangle.

    Returns face ids [H, W] (-1 = miss), barycentrics [H, W, 3] and camera-space depth [H, W].
    """
    v = vertices.double()
    c2w, K = camtoworld.double(), K.double()
    jj, ii = torch.meshgrid(torch.arange(width), torch.arange(height), indexing="xy")
    pix = torch.stack([jj + 0.5, ii + 0.5, torch.ones_like(jj, dtype=torch.float64)], -1).reshape(-1, 3)
    dirs_cam = pix @ torch.linalg.inv(K).t()  # camera z component = 1, so t = depth
    dirs = dirs_cam @ c2w[:3, :3].t()  # [P, 3]
    origin = c2w[:3, 3]
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]  # [F, 3]
    e1, e2 = b - a, c - a
    # Möller–Trumbore with the triple products rewritten as matmuls over all (ray, face) pairs:
    # det = e1·(d×e2) = d·(e2×e1), u·det = s·(d×e2) = d·(e2×s), w·det = d·(s×e1), t·det = e2·(s×e1).
    s = origin - a  # [F, 3]
    q = torch.cross(s, e1, dim=-1)
    det = dirs @ torch.cross(e2, e1, dim=-1).t()  # [P, F]
    ok = det.abs() > 1e-14
    inv_det = 1.0 / torch.where(ok, det, torch.ones_like(det))
    u = (dirs @ torch.cross(e2, s, dim=-1).t()) * inv_det
    w = (dirs @ q.t()) * inv_det
    t = (e2 * q).sum(-1) * inv_det
    hit = ok & (u >= 0) & (w >= 0) & (u + w <= 1) & (t > 0)
    t = torch.where(hit, t, torch.full_like(t, float("inf")))
    best_t, fmin = t.min(dim=1)
    best_f = torch.where(torch.isfinite(best_t), fmin, torch.full_like(fmin, -1))
    rows = torch.arange(len(dirs))
    best_uv = torch.stack([u[rows, fmin], w[rows, fmin]], -1)
    hitmask = best_f >= 0
    bary = torch.stack([1 - best_uv[:, 0] - best_uv[:, 1], best_uv[:, 0], best_uv[:, 1]], -1)
    bary = bary * hitmask[:, None]
    depth = torch.where(hitmask, best_t, torch.zeros_like(best_t))
    return best_f.view(height, width), bary.view(height, width, 3), depth.view(height, width)


def bumpy_sphere(seed=0):
    """Closed star-shaped mesh (radially perturbed icosphere, 1280 faces) with concavities."""
    v, f = icosphere(3)
    g = torch.Generator().manual_seed(seed)
    r = 1.0 + 0.25 * torch.rand(len(v), 1, generator=g) + 0.2 * torch.sin(4 * v[:, :1]) * torch.cos(3 * v[:, 1:2])
    return v * r, f


def random_cameras(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    eyes = dirs * (2.8 + 0.6 * torch.rand(n, 1, generator=g))
    c2w = look_at(eyes, 0.1 * torch.randn(n, 3, generator=g))
    Ks = intrinsics_from_fov(45.0, W, H).expand(n, 3, 3).clone()
    Ks[:, 0, 2] += torch.randn(n, generator=g)  # off-centre principal points
    return c2w, Ks


def test_matches_ray_casting_reference():
    verts, faces = bumpy_sphere()
    c2w, Ks = random_cameras(3)
    raster = rasterize_mesh(verts.expand(3, -1, -1), faces, camtoworld_to_viewmat(c2w), Ks, W, H)
    assert raster.face_ids.shape == (3, H, W) and raster.face_ids.dtype == torch.int64
    assert raster.bary.shape == (3, H, W, 3) and raster.depth.shape == (3, H, W)
    for b in range(3):
        ref_f, ref_bary, ref_depth = ray_cast_reference(verts, faces, c2w[b], Ks[b], W, H)
        agree = raster.face_ids[b] == ref_f
        assert agree.float().mean() >= 0.995, f"camera {b}: {agree.float().mean():.4f}"
        both = agree & (ref_f >= 0)
        assert both.sum() > 0.3 * H * W  # the mesh fills a good part of the frame
        assert (ref_f >= 0).sum() < H * W  # ... and background is tested too
        assert torch.allclose(raster.depth[b][both].double(), ref_depth[both], atol=1e-4)
        assert torch.allclose(raster.bary[b][both].double(), ref_bary[both], atol=1e-4)
        bg = raster.face_ids[b] < 0
        assert (raster.depth[b][bg] == 0).all() and (raster.bary[b][bg] == 0).all()


def test_chunking_and_backface_culling_do_not_change_a_closed_mesh():
    verts, faces = bumpy_sphere(1)
    c2w, Ks = random_cameras(1, seed=5)
    vm = camtoworld_to_viewmat(c2w)
    full = rasterize_mesh(verts[None], faces, vm, Ks, W, H)
    chunked = rasterize_mesh(verts[None], faces, vm, Ks, W, H, max_fragments=3000)
    culled = rasterize_mesh(verts[None], faces, vm, Ks, W, H, cull_backfaces=True)
    for other in (chunked, culled):
        assert torch.equal(other.face_ids, full.face_ids)
        assert torch.equal(other.depth, full.depth)
    # Inside-out winding: every visible triangle now faces away and is culled.
    flipped = rasterize_mesh(verts[None], faces.flip(1), vm, Ks, W, H, cull_backfaces=True)
    front = rasterize_mesh(verts[None], faces.flip(1), vm, Ks, W, H)
    assert torch.equal(front.face_ids, full.face_ids)
    assert (flipped.face_ids[full.face_ids >= 0] != full.face_ids[full.face_ids >= 0]).all()


def _single_triangle_scene(z=2.0):
    """Fronto-parallel triangle whose projection has corners (1,1), (6.9,1), (1,6.9) in an 8x8 image."""
    K = make_intrinsics(10.0, 10.0, 4.0, 4.0)
    corners = torch.tensor([[1.0, 1.0], [6.9, 1.0], [1.0, 6.9]], dtype=torch.float64)
    xy = (corners - 4.0) * z / 10.0
    verts = torch.cat([xy, torch.full((3, 1), z, dtype=torch.float64)], dim=1)
    return verts, K.double(), torch.eye(4, dtype=torch.float64)


def test_single_triangle_exact_coverage_and_barycentrics():
    verts, K, viewmat = _single_triangle_scene()
    faces = torch.tensor([[0, 1, 2]])
    raster = rasterize_mesh(verts[None], faces, viewmat[None], K[None], 8, 8)
    # Pixel centre (j + .5, i + .5) is inside iff j >= 1, i >= 1, (j + .5) + (i + .5) <= 7.9.
    expected = torch.tensor([[1 if (j >= 1 and i >= 1 and i + j <= 6) else 0 for j in range(8)]
                             for i in range(8)], dtype=torch.bool)
    assert torch.equal(raster.face_ids[0] == 0, expected)
    assert torch.equal(raster.face_ids[0] == -1, ~expected)
    assert torch.allclose(raster.depth[0][expected], torch.full((int(expected.sum()),), 2.0, dtype=torch.float64))
    # Pixel (i=2, j=3): centre (3.5, 2.5); fronto-parallel → screen barycentrics.
    l1, l2 = 2.5 / 5.9, 1.5 / 5.9
    expect = torch.tensor([1 - l1 - l2, l1, l2], dtype=torch.float64)
    assert torch.allclose(raster.bary[0, 2, 3], expect, atol=1e-12)
    assert raster.bary.dtype == torch.float64  # output follows the vertices' dtype


def test_tilted_triangle_barycentrics_are_perspective_correct():
    # Strongly tilted triangle: the 3D point Σ bary_k v_k must lie on the pixel-centre ray and
    # its z must equal the reported depth. (Screen-space barycentrics would fail this.)
    verts = torch.tensor([[-1.0, -1.0, 1.5], [1.5, -0.5, 6.0], [-0.5, 1.2, 3.0]], dtype=torch.float64)
    K = make_intrinsics(20.0, 20.0, 8.0, 8.0).double()
    raster = rasterize_mesh(verts[None], torch.tensor([[0, 1, 2]]), torch.eye(4, dtype=torch.float64)[None],
                            K[None], 16, 16)
    i, j = torch.nonzero(raster.face_ids[0] == 0, as_tuple=True)
    assert len(i) > 40
    points = raster.bary[0, i, j] @ verts  # [P, 3]
    assert torch.allclose(points[:, 2], raster.depth[0, i, j], atol=1e-10)
    u = 20.0 * points[:, 0] / points[:, 2] + 8.0
    v = 20.0 * points[:, 1] / points[:, 2] + 8.0
    assert torch.allclose(u, j.double() + 0.5, atol=1e-9)
    assert torch.allclose(v, i.double() + 0.5, atol=1e-9)
    assert torch.allclose(raster.bary[0, i, j].sum(-1), torch.ones(len(i), dtype=torch.float64))
    spread = (raster.bary[0, i, j] - raster.bary[0, i, j].mean(0)).abs().max()
    assert spread > 0.1  # non-trivial barycentrics


@pytest.mark.parametrize("near_first", [True, False])
def test_z_test_picks_the_nearer_of_two_overlapping_triangles(near_first):
    near_v, K, viewmat = _single_triangle_scene(z=2.0)
    far_v, _, _ = _single_triangle_scene(z=3.0)
    far_v[:, :2] *= 1.2  # bigger footprint than the near one
    verts = torch.cat([near_v, far_v]) if near_first else torch.cat([far_v, near_v])
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    near_id = 0 if near_first else 1
    raster = rasterize_mesh(verts[None], faces, viewmat[None], K[None], 8, 8)
    alone_near = rasterize_mesh(near_v[None], faces[:1], viewmat[None], K[None], 8, 8)
    covered = alone_near.face_ids[0] == 0
    assert (raster.face_ids[0][covered] == near_id).all()
    assert torch.allclose(raster.depth[0][covered], torch.tensor(2.0, dtype=torch.float64))
    others = (raster.face_ids[0] >= 0) & ~covered
    assert others.any() and (raster.face_ids[0][others] == 1 - near_id).all()


def test_near_plane_culls_whole_triangle():
    verts, K, viewmat = _single_triangle_scene(z=2.0)
    verts[0, 2] = 0.005  # one corner in front of the near plane
    raster = rasterize_mesh(verts[None], torch.tensor([[0, 1, 2]]), viewmat[None], K[None], 8, 8, near=0.01)
    assert (raster.face_ids == -1).all()
    # ... and behind the camera entirely, nothing either.
    raster = rasterize_mesh(-verts[None], torch.tensor([[0, 1, 2]]), viewmat[None], K[None], 8, 8)
    assert (raster.face_ids == -1).all()


def test_batch_of_two_cameras_equals_single_renders():
    verts, faces = bumpy_sphere(2)
    c2w, Ks = random_cameras(2, seed=3)
    vm = camtoworld_to_viewmat(c2w)
    moved = verts + torch.tensor([0.0, 0.1, 0.0])
    batch_v = torch.stack([verts, moved])
    both = rasterize_mesh(batch_v, faces, vm, Ks, W, H)
    assert not torch.equal(both.face_ids[0], both.face_ids[1])
    for b in range(2):
        one = rasterize_mesh(batch_v[b:b + 1], faces, vm[b:b + 1], Ks[b:b + 1], W, H)
        assert torch.equal(one.face_ids[0], both.face_ids[b])
        assert torch.equal(one.depth[0], both.depth[b])
    # [V, 3] vertices broadcast over the cameras.
    shared = rasterize_mesh(verts, faces, vm, Ks, W, H)
    assert torch.equal(shared.face_ids[0], both.face_ids[0])


def test_interpolate_matches_manual_combination_and_uv_faces():
    verts, faces = bumpy_sphere(3)
    c2w, Ks = random_cameras(2, seed=7)
    raster = rasterize_mesh(verts, faces, camtoworld_to_viewmat(c2w), Ks, W, H)
    colours = torch.rand(len(verts), 3)
    out = interpolate(colours, faces, raster)
    assert out.shape == (2, H, W, 3)
    b, i, j = torch.nonzero(raster.face_ids >= 0, as_tuple=True)
    manual = (raster.bary[b, i, j, :, None] * colours[faces[raster.face_ids[b, i, j]]]).sum(1)
    assert torch.allclose(out[b, i, j], manual, atol=1e-6)
    assert (out[raster.face_ids < 0] == 0).all()
    # Interpolating the world positions gives the hit points: on the pixel rays, at the depth.
    world = interpolate(verts, faces, raster)[b, i, j]  # [P, 3]
    vm = camtoworld_to_viewmat(c2w)[b]
    cam = (vm[:, :3, :3] @ world[:, :, None])[..., 0] + vm[:, :3, 3]
    assert torch.allclose(cam[:, 2], raster.depth[b, i, j], atol=1e-5)
    uv = (Ks[b] @ cam[:, :, None])[..., 0]
    assert torch.allclose(uv[:, :2] / uv[:, 2:], torch.stack([j + 0.5, i + 0.5], -1).float(), atol=1e-3)
    # A separate index array (uv_faces into uvs) with the same face order.
    perm = torch.randperm(len(verts))
    uvs = colours[:, :2][perm.argsort()]  # uvs[perm[v]] == colours[v, :2]
    uv_faces = perm[faces]
    assert torch.allclose(interpolate(uvs, uv_faces, raster), out[..., :2], atol=1e-6)
    # Per-batch attributes.
    per_batch = torch.stack([colours, 1 - colours])
    out_b = interpolate(per_batch, faces, raster)
    assert torch.allclose(out_b[0], out[0], atol=1e-6)
    assert torch.allclose(out_b[1][raster.face_ids[1] >= 0], 1 - out[1][raster.face_ids[1] >= 0], atol=1e-5)


def test_interpolate_gradients_wrt_attrs_and_bary():
    verts, K, viewmat = _single_triangle_scene()
    raster = rasterize_mesh(verts[None], torch.tensor([[0, 1, 2]]), viewmat[None], K[None], 8, 8)
    attrs = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    bary = raster.bary.clone().requires_grad_(True)

    def f(a, bc):
        return interpolate(a, torch.tensor([[0, 1, 2]]), MeshRaster(raster.face_ids, bc, raster.depth))

    assert torch.autograd.gradcheck(f, (attrs, bary))
    # d(sum out)/d(attrs[k]) = Σ over covered pixels of bary_k: non-zero and known in closed form.
    (grad,) = torch.autograd.grad(f(attrs, raster.bary).sum(), attrs)
    expect = raster.bary[0][raster.face_ids[0] == 0].sum(0)
    assert torch.allclose(grad, expect[:, None].expand(3, 2))
    assert (grad > 0).all()


def test_bary_and_depth_gradients_reach_vertices():
    verts, K, viewmat = _single_triangle_scene()
    verts = verts.clone().requires_grad_(True)

    def f(v):
        r = rasterize_mesh(v[None], torch.tensor([[0, 1, 2]]), viewmat[None], K[None], 8, 8)
        return r.bary, r.depth

    assert torch.autograd.gradcheck(f, (verts,), atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    verts, faces = icosphere(0)
    vm, K = torch.eye(4)[None], intrinsics_from_fov(40, 8, 8)[None]
    with pytest.raises(ValueError, match="viewmats"):
        rasterize_mesh(verts[None], faces, torch.eye(4), K, 8, 8)
    with pytest.raises(ValueError, match="Ks"):
        rasterize_mesh(verts[None], faces, vm, K[0], 8, 8)
    with pytest.raises(ValueError, match="only 12 vertices"):
        rasterize_mesh(verts[None], faces + 5, vm, K, 8, 8)
    bad = verts.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"vertices contain NaN/Inf in batch elements \[0\]"):
        rasterize_mesh(bad[None], faces, vm, K, 8, 8)
    with pytest.raises(ValueError, match="image size"):
        rasterize_mesh(verts[None], faces, vm, K, 0, 8)
    raster = rasterize_mesh(verts[None] + torch.tensor([0, 0, 4.0]), faces, vm, K, 8, 8)
    with pytest.raises(ValueError, match="batch"):
        interpolate(torch.rand(3, 12, 2), faces, raster)
    with pytest.raises(ValueError, match="only 3 rows"):
        interpolate(torch.rand(12, 2), faces[:3], raster)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    verts, faces = bumpy_sphere()
    c2w, Ks = random_cameras(2)
    vm = camtoworld_to_viewmat(c2w)
    cpu = rasterize_mesh(verts, faces, vm, Ks, W, H)
    gpu = rasterize_mesh(verts.cuda(), faces.cuda(), vm.cuda(), Ks.cuda(), W, H)
    assert (gpu.face_ids.cpu() == cpu.face_ids).float().mean() > 0.999
    same = gpu.face_ids.cpu() == cpu.face_ids
    assert torch.allclose(gpu.depth.cpu()[same], cpu.depth[same], atol=1e-5)
    assert torch.allclose(gpu.bary.cpu()[same], cpu.bary[same], atol=1e-4)
