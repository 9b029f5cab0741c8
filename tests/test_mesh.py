"""Tests for headkit.mesh: normals, areas, edges, adjacency, Laplacians, OBJ I/O, test shapes."""

import math

import pytest
import torch

from headkit.mesh import (
    ObjError,
    adjacency,
    edge_index,
    edges,
    face_areas,
    face_normals,
    icosphere,
    laplacian,
    load_obj,
    save_obj,
    uv_sphere,
    vertex_normals,
)

# Unit cube as 12 counter-clockwise (seen from outside) triangles.
CUBE_V = torch.tensor([[x, y, z] for x in (0.0, 1.0) for y in (0.0, 1.0) for z in (0.0, 1.0)])
CUBE_F = torch.tensor([
    [0, 1, 3], [0, 3, 2],  # x = 0
    [4, 6, 7], [4, 7, 5],  # x = 1
    [0, 4, 5], [0, 5, 1],  # y = 0
    [2, 3, 7], [2, 7, 6],  # y = 1
    [0, 2, 6], [0, 6, 4],  # z = 0
    [1, 5, 7], [1, 7, 3],  # z = 1
])
TET_V = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
TET_F = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])


@pytest.mark.parametrize("verts,faces", [(CUBE_V, CUBE_F), (TET_V, TET_F), icosphere(1), uv_sphere(6, 9)])
def test_normals_point_outward(verts, faces):
    centre = verts.mean(0)
    fn = face_normals(verts, faces)
    face_centres = verts[faces].mean(1)
    assert torch.allclose(fn.norm(dim=-1), torch.ones(len(faces)), atol=1e-6)
    assert ((fn * (face_centres - centre)).sum(-1) > 0).all()
    vn = vertex_normals(verts, faces)
    assert torch.allclose(vn.norm(dim=-1), torch.ones(len(verts)), atol=1e-6)
    assert ((vn * (verts - centre)).sum(-1) > 0).all()


def test_cube_hand_values_and_batching():
    fn = face_normals(CUBE_V, CUBE_F)
    expected = torch.tensor([[-1.0, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]])
    assert torch.allclose(fn, expected.repeat_interleave(2, 0))
    assert torch.allclose(face_areas(CUBE_V, CUBE_F), torch.full((12,), 0.5))
    # Hand count of the triangles (area 1/2 each) around a corner: vertex 0 and 7 lie in both
    # triangles of their three sides → the diagonal; vertex 1 lies in one triangle of x=0, one of
    # y=0 and both of z=1 → (-1, -1, 2).
    vn = vertex_normals(CUBE_V, CUBE_F)
    s3 = 1 / math.sqrt(3)
    assert torch.allclose(vn[0], torch.tensor([-s3, -s3, -s3]), atol=1e-6)
    assert torch.allclose(vn[7], torch.tensor([s3, s3, s3]), atol=1e-6)
    assert torch.allclose(vn[1], torch.tensor([-1.0, -1.0, 2.0]) / math.sqrt(6), atol=1e-6)
    # Batched vertices give per-batch results; scaling scales areas quadratically.
    batch = torch.stack([CUBE_V, 2 * CUBE_V])
    assert torch.allclose(face_areas(batch, CUBE_F)[1], torch.full((12,), 2.0))
    assert torch.allclose(vertex_normals(batch, CUBE_F)[1], vn, atol=1e-6)


def test_vertex_normals_are_area_weighted():
    # Vertex 0 is shared by a big triangle in the z=0 plane and a small one in the x=0 plane.
    verts = torch.tensor([[0.0, 0, 0], [3, 0, 0], [0, 3, 0], [0, 1, 0], [0, 0, 1]])
    faces = torch.tensor([[0, 1, 2], [0, 3, 4]])
    expected = torch.nn.functional.normalize(torch.tensor([0.5 * 1.0, 0.0, 4.5]), dim=0)  # 2·area·n
    assert torch.allclose(vertex_normals(verts, faces)[0], expected, atol=1e-6)


@pytest.mark.parametrize("subdivisions", [0, 1, 2])
def test_icosphere_counts_and_euler(subdivisions):
    v, f = icosphere(subdivisions)
    assert f.shape[0] == 20 * 4 ** subdivisions and v.shape[0] == 10 * 4 ** subdivisions + 2
    assert torch.allclose(v.norm(dim=-1), torch.ones(len(v)), atol=1e-6)
    e = edges(f)
    assert e.shape[0] * 2 == 3 * f.shape[0]  # closed manifold: every edge in two faces
    assert v.shape[0] - e.shape[0] + f.shape[0] == 2  # Euler characteristic of a sphere
    assert (e[:, 0] < e[:, 1]).all()
    assert len({tuple(r) for r in e.tolist()}) == e.shape[0]
    # Every edge is used by exactly two faces, once in each direction (consistent winding).
    directed = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).tolist()
    assert len(set(map(tuple, directed))) == len(directed)


def test_uv_sphere_counts():
    v, f = uv_sphere(5, 8)
    assert v.shape == (4 * 8 + 2, 3) and f.shape == (2 * 4 * 8, 3)
    assert edges(f).shape[0] * 2 == 3 * f.shape[0]


def test_edge_index_and_adjacency_on_tetrahedron():
    e = edges(TET_F)
    assert e.tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    ei = edge_index(TET_F)
    assert ei.shape == (2, 12)
    assert set(map(tuple, ei.t().tolist())) == {(a, b) for a in range(4) for b in range(4) if a != b}
    assert (ei[0].diff() >= 0).all()  # sorted by source
    A = adjacency(TET_F, 4).to_dense()
    assert torch.equal(A, torch.ones(4, 4) - torch.eye(4))


def test_laplacian_properties():
    v, f = icosphere(1)
    V = v.shape[0]
    L = laplacian(f, V).to_dense()
    assert torch.allclose(L, L.t())
    assert torch.allclose(L.sum(1), torch.zeros(V))
    assert torch.allclose(L @ torch.full((V,), 3.7), torch.zeros(V), atol=1e-5)
    # Degree on the diagonal: count each vertex's neighbours by hand from the edge list.
    degree = torch.zeros(V)
    for a, b in edges(f).tolist():
        degree[a] += 1
        degree[b] += 1
    assert torch.equal(torch.diagonal(L), degree)
    assert set(degree.tolist()) == {5.0, 6.0}  # icosphere: 12 valence-5, rest valence-6
    off = L - torch.diag(degree)
    assert set(off.unique().tolist()) <= {0.0, -1.0}
    # Normalised: unit diagonal, L D^{1/2} 1 = 0, entries -1/sqrt(d_i d_j), eigenvalues in [0, 2].
    Ln = laplacian(f, V, kind="normalized").to_dense()
    assert torch.allclose(torch.diagonal(Ln), torch.ones(V))
    assert torch.allclose(Ln @ degree.sqrt(), torch.zeros(V), atol=1e-5)
    a, b = edges(f)[0].tolist()
    assert math.isclose(Ln[a, b].item(), -1.0 / math.sqrt(degree[a] * degree[b]), rel_tol=1e-6)
    eig = torch.linalg.eigvalsh(Ln.double())
    assert eig.min() > -1e-9 and eig.max() < 2 + 1e-9
    with pytest.raises(ValueError, match="kind"):
        laplacian(f, V, kind="cotangent")


def test_laplacian_isolated_vertex_and_bad_faces():
    L = laplacian(TET_F, 5).to_dense()  # vertex 4 is in no face
    assert torch.equal(L[4], torch.zeros(5))
    assert laplacian(TET_F, 5, kind="normalized").to_dense()[4, 4] == 1.0
    with pytest.raises(ValueError, match="only 3 vertices"):
        adjacency(TET_F, 3)
    with pytest.raises(ValueError, match=r"\[F, 3\]"):
        edges(torch.tensor([[0, 1, 2, 3]]))


def test_obj_round_trip_with_uvs(tmp_path):
    v, f = icosphere(1)
    uvs = torch.rand(len(v) + 5, 2)
    uv_faces = torch.randint(0, len(uvs), f.shape)
    path = tmp_path / "mesh.obj"
    save_obj(path, v, f, uvs, uv_faces)
    mesh = load_obj(path)
    assert torch.equal(mesh["vertices"], v)  # 9 significant digits round-trip float32 exactly
    assert torch.equal(mesh["faces"], f)
    assert torch.equal(mesh["uvs"], uvs)
    assert torch.equal(mesh["uv_faces"], uv_faces)
    save_obj(path, v, f)
    plain = load_obj(path)
    assert plain["uvs"] is None and plain["uv_faces"] is None and torch.equal(plain["faces"], f)
    assert not (tmp_path / "mesh.obj.tmp").exists()


def test_obj_parses_quads_normals_negative_indices(tmp_path):
    text = """# a quad with uvs and normals, then a triangle with negative indices
mtllib x.mtl
o quad
v 0 0 0
v 1 0 0
v 1 1 0 0.5 0.5 0.5
v 0 1 0
vt 0 0
vt 1 0
vt 1 1 0
vt 0 1
vn 0 0 1
usemtl skin
s off
f 1/1/1 2/2/1 3/3/1 4/4/1
f -4/-4/1 -2/-2/1 -1/-1/1
"""
    path = tmp_path / "quad.obj"
    path.write_text(text)
    mesh = load_obj(path)
    assert mesh["vertices"].shape == (4, 3)
    assert mesh["faces"].tolist() == [[0, 1, 2], [0, 2, 3], [0, 2, 3]]
    assert mesh["uv_faces"].tolist() == [[0, 1, 2], [0, 2, 3], [0, 2, 3]]
    assert torch.equal(mesh["uvs"][2], torch.tensor([1.0, 1.0]))
    path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1//1 2//1 3//1\n")
    assert load_obj(path)["faces"].tolist() == [[0, 1, 2]] and load_obj(path)["uvs"] is None


@pytest.mark.parametrize("content,message", [
    ("v 0 0 0\nv 1 0 zero\n", r"bad\.obj:2: cannot parse"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n", r"bad\.obj:4: vertex index 9 out of range"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2\n", r"bad\.obj:4: a face needs at least 3"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 a 3\n", r"bad\.obj:4: bad face corner"),
    ("hello world\n", r"bad\.obj:1: unknown OBJ statement"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\n", r"bad\.obj: no faces"),
    ("", r"bad\.obj: no vertices"),
    ("v 0 0 nan\n", r"bad\.obj:1: non-finite"),
    ("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2/1 3/1\nf 1 2 3\n", r"bad\.obj: 1 of 2 triangles"),
])
def test_malformed_obj_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.obj"
    path.write_text(content)
    with pytest.raises(ObjError, match=message):
        load_obj(path)


def test_missing_obj_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.obj"):
        load_obj(tmp_path / "nope.obj")
