"""Mesh hierarchy (COMA D/U matrices) for GraphAvatar: shapes, exactness, nearest-point, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphavatar import sampling
from graphavatar.sampling import build_mesh_hierarchy, closest_point_barycentrics
from headkit.mesh import icosphere


def plane_grid(nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """A flat, open ``nx x ny`` grid in the z = 0 plane, two triangles per cell."""
    x, y = np.meshgrid(np.linspace(0.0, 1.0, nx), np.linspace(0.0, 0.8, ny))
    verts = np.stack([x.ravel(), y.ravel(), np.zeros(nx * ny)], axis=1)
    idx = np.arange(nx * ny).reshape(ny, nx)
    a, b = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
    c, d = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return verts, faces


def open_sphere_with_isolated(num_isolated: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """An icosphere with a cap cut off (a hole) plus vertices in no face (like iris landmarks)."""
    v, f = icosphere(3)
    v, f = v.numpy().astype(np.float64), f.numpy()
    f = f[v[f].mean(axis=1)[:, 2] < 0.6]
    extra = np.random.default_rng(0).normal(size=(num_isolated, 3)) * 0.2
    return np.concatenate([v, extra]), f


@pytest.fixture(scope="module")
def sphere_hierarchy():
    v, f = icosphere(3)  # 642 vertices
    return build_mesh_hierarchy(v, f, factors=(4, 4))


def check_structure(h) -> None:
    """Invariants every hierarchy must satisfy."""
    for l in range(h.num_levels - 1):
        down, up = h.downs[l].to_dense(), h.ups[l].to_dense()
        n_fine, n_coarse = h.num_vertices[l], h.num_vertices[l + 1]
        assert down.shape == (n_coarse, n_fine) and up.shape == (n_fine, n_coarse)
        # D copies one fine vertex per coarse vertex, and the coarse mesh keeps their positions.
        assert torch.equal(down.sum(1), torch.ones(n_coarse))
        assert torch.equal((down != 0).sum(1), torch.ones(n_coarse, dtype=torch.long))
        assert torch.equal(down @ h.vertices[l], h.vertices[l + 1])
        # U: convex barycentric weights, and D·U = I (a survivor is its coarse vertex).
        assert (up >= 0).all()
        torch.testing.assert_close(up.sum(1), torch.ones(n_fine), atol=1e-6, rtol=0)
        torch.testing.assert_close(down @ up, torch.eye(n_coarse), atol=1e-6, rtol=0)
        # Every U row uses the corners of one coarse face (or its own survivor).
        faces = set(map(tuple, h.faces[l + 1].sort(dim=1).values.tolist()))
        on_face = [t in faces for t in map(tuple, h.up_vertices[l].sort(dim=1).values.tolist())]
        is_survivor = torch.zeros(n_fine, dtype=torch.bool)
        is_survivor[h.parents[l]] = True
        assert all(on_face[i] or is_survivor[i] for i in range(n_fine))
        assert (h.up_vertices[l][h.parents[l]] == torch.arange(n_coarse)[:, None]).all()
    for l in range(h.num_levels):
        ei = h.edge_indices[l]
        pairs = set(map(tuple, ei.t().tolist()))
        assert all((b, a) in pairs for a, b in pairs)  # both directions
        f = h.faces[l].tolist()
        expect = {(a, b) for t in f for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0]))}
        assert pairs == expect | {(b, a) for a, b in expect}


def test_closest_point_barycentrics_hand_cases():
    a, b, c = np.array([0.0, 0, 0]), np.array([1.0, 0, 0]), np.array([0.0, 1, 0])
    pts = np.array([
        [0.2, 0.3, 5.0],  # above the interior -> its projection
        [-1.0, -1.0, 0.0],  # beyond vertex a
        [2.0, -0.5, 0.0],  # beyond vertex b
        [0.5, -2.0, 1.0],  # below edge ab -> (0.5, 0, 0)
        [1.0, 1.0, 0.0],  # beyond edge bc -> (0.5, 0.5, 0)
        [-3.0, 0.25, 0.0],  # left of edge ac -> (0, 0.25, 0)
    ])
    n = len(pts)
    w = closest_point_barycentrics(pts, np.tile(a, (n, 1)), np.tile(b, (n, 1)), np.tile(c, (n, 1)))
    expect = np.array([[0.5, 0.2, 0.3], [1, 0, 0], [0, 1, 0], [0.5, 0.5, 0], [0, 0.5, 0.5],
                       [0.75, 0, 0.25]])
    np.testing.assert_allclose(w, expect, atol=1e-12)


def test_sphere_levels_structure(sphere_hierarchy):
    h = sphere_hierarchy
    assert h.num_levels == 3 and h.factors == (4.0, 4.0)
    assert h.num_vertices[0] == 642
    # Per-level factors: ~642/4 then ~/4 again.
    assert abs(h.num_vertices[1] - 642 / 4) <= 10 and abs(h.num_vertices[2] - 642 / 16) <= 6
    check_structure(h)


def test_up_sampling_finds_the_nearest_coarse_point(sphere_hierarchy):
    h = sphere_hierarchy
    fine, coarse, cf = h.vertices[0].double(), h.vertices[1].double(), h.faces[1]
    placed = h.ups[0].to_dense().double() @ coarse
    dist = (placed - fine).norm(dim=-1)
    # Reference: dense barycentric samples of every coarse triangle (a subset of the surface, so
    # its minimum distance can only be larger than the true one).
    s = torch.linspace(0, 1, 15, dtype=torch.float64)
    u, v = torch.meshgrid(s, s, indexing="ij")
    keep = (u + v) <= 1
    bary = torch.stack([1 - u[keep] - v[keep], u[keep], v[keep]], -1)  # [S, 3]
    samples = torch.einsum("sk,fkc->fsc", bary, coarse[cf]).reshape(-1, 3)
    ref = torch.cdist(fine, samples).min(dim=1).values
    assert (dist <= ref + 1e-6).all()  # U stores float32 weights
    assert (ref - dist).max() < 0.03  # and the samples are dense enough to come close


def test_linear_fields_are_reproduced_exactly_on_a_plane():
    v, f = plane_grid(13, 11)
    h = build_mesh_hierarchy(v, f, factors=(3, 2), preserve_border=True)
    check_structure(h)
    rng = np.random.default_rng(1)
    A, b = torch.tensor(rng.normal(size=(3, 5))), torch.tensor(rng.normal(size=5))
    for l in range(2):
        x = h.vertices[l].double() @ A + b
        back = h.ups[l].to_dense().double() @ (h.downs[l].to_dense().double() @ x)
        torch.testing.assert_close(back, x, atol=1e-5, rtol=0)


def test_smooth_fields_on_a_sphere_survive_down_and_up(sphere_hierarchy):
    h = sphere_hierarchy
    A = torch.tensor([[1.0, -2.0], [0.5, 0.3], [-1.0, 1.0]])
    x = h.vertices[0] @ A
    back = h.ups[0].to_dense() @ (h.downs[0].to_dense() @ x)
    # The coarse surface lies within a fraction of a coarse edge of the sphere.
    err = (back - x).norm(dim=-1).max() / x.norm(dim=-1).max()
    assert err < 0.05
    # A coarse-level smooth signal goes up and comes back unchanged (D U = I).
    y = h.vertices[1] @ A
    torch.testing.assert_close(h.downs[0].to_dense() @ (h.ups[0].to_dense() @ y), y)


def test_open_mesh_with_isolated_vertices():
    v, f = open_sphere_with_isolated(5)
    h = build_mesh_hierarchy(v, f, factors=(4, 2))
    check_structure(h)
    for l in (1, 2):  # coarse levels only keep vertices that are in faces
        assert set(np.unique(h.faces[l].numpy())) == set(range(h.num_vertices[l]))
    isolated = slice(v.shape[0] - 5, None)
    torch.testing.assert_close(h.ups[0].to_dense()[isolated].sum(1), torch.ones(5))
    assert h.edge_indices[0].max() < v.shape[0] - 5  # isolated vertices have no edges


def test_cache_hit_returns_identical_matrices(tmp_path, monkeypatch):
    v, f = icosphere(2)
    first = build_mesh_hierarchy(v, f, factors=(4,), cache_dir=tmp_path)
    files = list(tmp_path.glob("mesh_hierarchy_*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

    def boom(*args, **kwargs):
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(sampling, "_compute", boom)
    second = build_mesh_hierarchy(v.numpy(), f.numpy(), factors=[4], cache_dir=tmp_path)
    for a, b in zip(first.downs + first.ups, second.downs + second.ups):
        assert torch.equal(a.to_dense(), b.to_dense())
    for a, b in zip(first.vertices + first.faces, second.vertices + second.faces):
        assert torch.equal(a, b)
    # Different factors are a different cache entry.
    monkeypatch.undo()
    build_mesh_hierarchy(v, f, factors=(3,), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("mesh_hierarchy_*.npz"))) == 2


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path):
    v, f = icosphere(2)
    good = build_mesh_hierarchy(v, f, factors=(4,), cache_dir=tmp_path)
    path = next(tmp_path.glob("mesh_hierarchy_*.npz"))
    path.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable"):
        again = build_mesh_hierarchy(v, f, factors=(4,), cache_dir=tmp_path)
    assert torch.equal(good.ups[0].to_dense(), again.ups[0].to_dense())
    build_mesh_hierarchy(v, f, factors=(4,), cache_dir=tmp_path)  # rewritten: no warning now


def test_bad_input_is_named():
    v, f = icosphere(1)
    with pytest.raises(ValueError, match="faces index vertices"):
        build_mesh_hierarchy(v, f + 100)
    with pytest.raises(ValueError, match="factors"):
        build_mesh_hierarchy(v, f, factors=(1.0,))
    with pytest.raises(ValueError, match=r"\[V, 3\]"):
        build_mesh_hierarchy(v[:, :2], f)
    with pytest.raises(ValueError, match="NaN"):
        build_mesh_hierarchy(v * float("nan"), f)
    with pytest.raises(ValueError, match="level 1 -> 2"):
        build_mesh_hierarchy(v, f, factors=(4, 8))  # 80 faces -> 20 -> 2: too coarse
