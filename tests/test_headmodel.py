"""headkit.headmodel: the ICT Face Model loader on a small generated kit in the ICT layout, the
HeadModel container, resolving/downloading the kit, and (when present) the real kit."""

from __future__ import annotations

import json
import logging
import os
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from headkit.headmodel import (DEFAULT_REGIONS, ICT_COMMIT, ICT_REGIONS, HeadModel, HeadModelError,
                               load_ict_face_model, resolve_ict_kit)
from headkit.headmodel import ict

NX, NY = 12, 16                       # grid columns and rows: 192 vertices
RANGES = {"face": (0, 95), "head_neck": (96, 143), "teeth": (144, NX * NY - 1)}
NAMES = [f"shape{i:02d}_{'LR'[i % 2]}" for i in range(52)] + ["jawOpen"]
NUM_IDENTITIES = 3
TRIANGLE_ROW = NY - 2                 # the last row of cells is written as triangle pairs
CONVERT = np.array([0.01, -0.01, -0.01])


def _write_obj(path: Path, vertices: np.ndarray,  # [N, 3]
               uvs: np.ndarray,                    # [U, 2]
               polygons: list[list[tuple[int, int]]]) -> None:
    """An OBJ like the ICT kit's: header, mtllib, v, vt, vn, usemtl, 1-based 'f v/vt' polygons."""
    lines = ["# generated test kit", "mtllib ICTFaceModelMaterial.mtl"]
    lines += [f"v {x:.17g} {y:.17g} {z:.17g}" for x, y, z in vertices]
    lines += [f"vt {u:.17g} {v:.17g}" for u, v in uvs]
    lines += ["vn 0 0 1", "usemtl M_Face"]
    lines += ["f " + " ".join(f"{v + 1}/{t + 1}" for v, t in poly) for poly in polygons]
    path.write_text("\n".join(lines) + "\n")


def _grid_polygons(uv_of: np.ndarray) -> tuple[list, np.ndarray]:  # uv_of: [N]
    """Counter-clockwise (seen from +z, the ICT viewer) quads, the last row as triangle pairs;
    and the expected fan triangles [T, 3] in file order."""
    polygons, expected = [], []
    for r in range(NY - 1):
        for c in range(NX - 1):
            a, b, d, e = r * NX + c, r * NX + c + 1, (r + 1) * NX + c + 1, (r + 1) * NX + c
            quads = [[a, b, d], [a, d, e]] if r == TRIANGLE_ROW else [[a, b, d, e]]
            for poly in quads:
                polygons.append([(v, int(uv_of[v])) for v in poly])
                expected += [[poly[0], poly[i], poly[i + 1]] for i in range(1, len(poly) - 1)]
    return polygons, np.array(expected)


@pytest.fixture
def kit(tmp_path):
    """A 192-vertex kit in the ICT FaceXModel layout and the values written into it."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "kit" / "FaceXModel"
    folder.mkdir(parents=True)
    rows, cols = np.divmod(np.arange(NX * NY), NX)
    x, y = cols - 5.5, rows - 7.5
    neutral = np.stack([x, y, 3.0 - 0.01 * (x ** 2 + y ** 2)], 1)  # cm, y up, bulging to +z
    neutral += rng.normal(0, 0.01, neutral.shape)
    grid_uvs = np.stack([cols / (NX - 1), rows / (NY - 1)], 1)
    uv_of = rng.permutation(NX * NY)   # vertex -> its UV index, UVs stored shuffled
    uvs = np.concatenate([np.empty_like(grid_uvs), rng.random((10, 2))])  # 10 unused UVs
    uvs[uv_of] = grid_uvs
    polygons, triangles = _grid_polygons(uv_of)
    _write_obj(folder / ict.NEUTRAL_NAME, neutral, uvs, polygons)
    deltas = rng.normal(0, 0.5, (len(NAMES) + NUM_IDENTITIES,) + neutral.shape)
    mode_names = NAMES + [f"identity{j:03d}" for j in range(NUM_IDENTITIES)]
    for name, delta in zip(mode_names, deltas):
        _write_obj(folder / f"{name}.obj", neutral + delta, uvs, polygons)
    landmarks = rng.integers(0, NX * NY, 68)
    (folder / ict.INDICES_NAME).write_text(json.dumps(
        {"expressions": NAMES, "idx_to_landmark_verts": landmarks.tolist(), "other": [1, 2]}))
    return types.SimpleNamespace(folder=folder, neutral=neutral, deltas=deltas, uv_of=uv_of,
                                 grid_uvs=grid_uvs, triangles=triangles, landmarks=landmarks)


def _load(kit_dir, regions=tuple(RANGES), **kwargs) -> HeadModel:
    """The test kit loaded with the test region table."""
    return load_ict_face_model(kit_dir, regions=regions, region_ranges=RANGES, progress=False,
                               **kwargs)


def test_neutral_and_modes_in_metres_and_opencv_axes(kit):
    model = _load(kit.folder)
    np.testing.assert_array_equal(model.neutral, (kit.neutral * CONVERT).astype(np.float32))
    assert model.neutral.dtype == np.float32 and model.expressions.dtype == np.float32
    np.testing.assert_allclose(model.expressions, kit.deltas[:len(NAMES)] * CONVERT, atol=1e-7)
    np.testing.assert_allclose(model.identities, kit.deltas[len(NAMES):] * CONVERT, atol=1e-7)
    assert model.expression_names == NAMES and model.num_expressions == 53
    assert model.num_identities == NUM_IDENTITIES and model.num_vertices == NX * NY
    np.testing.assert_array_equal(model.vertex_ids, np.arange(NX * NY))
    np.testing.assert_array_equal(model.landmark_vertices, kit.landmarks)
    assert model.regions == tuple(RANGES) and str(kit.folder) in model.source
    assert "3 identity modes" in model.source


def test_quads_split_into_two_triangles_with_aligned_uvs(kit):
    model = _load(kit.folder)
    quads = (NY - 2) * (NX - 1)
    assert len(model.faces) == 2 * quads + 2 * (NX - 1)
    np.testing.assert_array_equal(model.faces, kit.triangles)
    a, b, d, e = 0, 1, NX + 1, NX  # the first quad abde -> abd, ade
    np.testing.assert_array_equal(model.faces[:2], [[a, b, d], [a, d, e]])
    assert model.faces.dtype == np.int64 and model.uv_faces.shape == model.faces.shape
    assert len(model.uvs) == NX * NY  # the 10 unused UVs are dropped
    np.testing.assert_allclose(model.uvs[model.uv_faces], kit.grid_uvs[model.faces], atol=1e-7)
    v = model.neutral[model.faces]
    normal = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]).sum(0)
    assert normal[2] < -0.99 * np.linalg.norm(normal)  # towards the camera after the flip


def test_region_selection_reindexes(kit):
    full = _load(kit.folder)
    for regions in (("face", "head_neck"), ("teeth", "face"), "head_neck"):
        model = _load(kit.folder, regions=regions)
        names = (regions,) if isinstance(regions, str) else regions
        mask = np.zeros(NX * NY, bool)
        for name in names:
            mask[RANGES[name][0]:RANGES[name][1] + 1] = True
        np.testing.assert_array_equal(model.vertex_ids, np.flatnonzero(mask))
        np.testing.assert_array_equal(model.neutral, full.neutral[mask])
        np.testing.assert_array_equal(model.expressions, full.expressions[:, mask])
        keep = mask[full.faces].all(1)
        np.testing.assert_array_equal(model.vertex_ids[model.faces], full.faces[keep])
        np.testing.assert_allclose(model.uvs[model.uv_faces], full.uvs[full.uv_faces[keep]])
        remap = np.full(NX * NY, -1)
        remap[mask] = np.arange(mask.sum())
        np.testing.assert_array_equal(model.landmark_vertices, remap[kit.landmarks])
        assert model.regions == tuple(names)
    with pytest.raises(HeadModelError, match="nose.*valid: face, head_neck, teeth"):
        _load(kit.folder, regions=("face", "nose"))


def test_vertices_composition(kit):
    model = _load(kit.folder)
    rng = np.random.default_rng(1)
    e, b = rng.normal(size=53).astype(np.float32), rng.normal(size=3).astype(np.float32)
    want = model.neutral + np.einsum("e,evc->vc", e, model.expressions) \
        + np.einsum("k,kvc->vc", b, model.identities)
    np.testing.assert_allclose(model.vertices(e, b), want, atol=1e-5)
    np.testing.assert_array_equal(model.vertices(), model.neutral)
    short = model.vertices(identities=b[:2])
    np.testing.assert_allclose(short, model.neutral + b[0] * model.identities[0]
                               + b[1] * model.identities[1], atol=1e-5)
    batch = rng.normal(size=(4, 53)).astype(np.float32)
    out = model.vertices(batch, b)
    assert out.shape == (4, NX * NY, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[2], model.vertices(batch[2], b), atol=1e-5)
    with pytest.raises(HeadModelError, match="expressions: 52 coefficients"):
        model.vertices(e[:52])
    with pytest.raises(HeadModelError, match="identities: 4 coefficients"):
        model.vertices(identities=np.zeros(4))


def test_identity_count(kit, caplog):
    assert _load(kit.folder, num_identities=2).num_identities == 2
    for j in range(NUM_IDENTITIES):
        (kit.folder / f"identity{j:03d}.obj").unlink()
    with caplog.at_level(logging.WARNING, logger="headkit.headmodel.ict"):
        model = _load(kit.folder)
    assert model.num_identities == 0 and model.identities.shape == (0, NX * NY, 3)
    assert "no identity OBJs" in caplog.text
    assert model.vertices(np.zeros(53)).shape == (NX * NY, 3)


def test_cache_hit_does_not_parse(kit, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _load(kit.folder, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("parsed despite a cache hit")
    monkeypatch.setattr(ict, "parse_obj_vertices", fail)
    monkeypatch.setattr(ict, "parse_obj_mesh", fail)
    again = _load(kit.folder.parent, cache_dir=cache)  # the parent folder is accepted too
    for name in ("neutral", "expressions", "identities", "faces", "uvs", "uv_faces"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert _load(kit.folder, regions=("face",), cache_dir=cache).num_vertices == 96


def test_cache_follows_file_changes_and_corruption(kit, tmp_path):
    cache = tmp_path / "cache"
    _load(kit.folder, cache_dir=cache)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.warns(RuntimeWarning, match="corrupt head-model cache"):
        model = _load(kit.folder, cache_dir=cache)
    np.testing.assert_array_equal(model.neutral, (kit.neutral * CONVERT).astype(np.float32))
    assert _load(kit.folder, cache_dir=cache).num_vertices == NX * NY  # rewritten, no warning
    jaw = kit.folder / "jawOpen.obj"
    jaw.write_text(jaw.read_text() + "# edited\n")
    _load(kit.folder, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2  # the changed file made a new key


def test_save_and_load_round_trip(kit, tmp_path):
    model = _load(kit.folder, regions=("face", "teeth"))
    path = model.save(tmp_path / "out" / "ict.npz")
    assert not list(path.parent.glob(".*tmp*"))
    loaded = HeadModel.load(path)
    for name, value in vars(model).items():
        got = getattr(loaded, name)
        if isinstance(value, np.ndarray):
            assert got.dtype == value.dtype
            np.testing.assert_array_equal(got, value)
        else:
            assert got == value
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"junk")
    with pytest.raises(HeadModelError, match="bad.npz"):
        HeadModel.load(bad)


def test_missing_folder_says_what_to_fetch(tmp_path):
    with pytest.raises(HeadModelError) as info:
        load_ict_face_model(tmp_path / "nowhere")
    message = str(info.value)
    for part in ("nowhere", "ICT-VGL/ICT-FaceKit", ICT_COMMIT, "FaceXModel",
                 "video_preprocess.head_model_dir", "HEADKIT_ICT_FACEKIT"):
        assert part in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeadModelError, match="empty: missing vertex_indices.json"):
        load_ict_face_model(tmp_path / "empty")


def test_missing_indices_and_expression(kit):
    (kit.folder / f"{NAMES[7]}.obj").unlink()
    name = NAMES[7]
    with pytest.raises(HeadModelError, match=rf"{name}\.obj: missing expression OBJ '{name}'"):
        _load(kit.folder)
    (kit.folder / ict.INDICES_NAME).unlink()
    with pytest.raises(HeadModelError, match=r"FaceXModel/vertex_indices\.json: missing"):
        _load(kit.folder)


@pytest.mark.parametrize("damage, pattern", [
    (lambda text: text.replace("v ", "v abc ", 3), r"jawOpen\.obj: unreadable 'v' line"),
    (lambda text: "\n".join(text.splitlines()[:50]), r"jawOpen\.obj: 48 vertices, .* has 192"),
    (lambda text: text[:len(text) // 6], r"jawOpen\.obj: ('v' line \d+ has fewer|\d+ vertices)"),
    (lambda text: text.replace("\nv ", "\nv 1 2\n#", 1), r"jawOpen\.obj: 'v' line \d+ has fewer"),
    (lambda text: "", r"jawOpen\.obj: no 'v' lines"),
])
def test_broken_mode_obj_is_named(kit, damage, pattern):
    path = kit.folder / "jawOpen.obj"
    path.write_text(damage(path.read_text()))
    with pytest.raises(HeadModelError, match=pattern):
        _load(kit.folder)


def test_wrong_vertex_count_names_both_counts(kit):
    path = kit.folder / "identity001.obj"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line for i, line in enumerate(lines) if i != 5) + "\n")
    with pytest.raises(HeadModelError, match=r"identity001\.obj: 191 vertices, .* has 192"):
        _load(kit.folder)


def test_broken_neutral_faces_are_named(kit):
    path = kit.folder / ict.NEUTRAL_NAME
    text = path.read_text()
    path.write_text(text.replace("f 1/", "f 999/", 1))
    with pytest.raises(HeadModelError, match="generic_neutral_mesh.obj: face vertex index"):
        _load(kit.folder)
    path.write_text(text.replace("/", "//"))
    with pytest.raises(HeadModelError, match="generic_neutral_mesh.obj: faces without texture"):
        _load(kit.folder)


def test_resolve_order(kit, tmp_path, monkeypatch):
    monkeypatch.delenv("HEADKIT_ICT_FACEKIT", raising=False)
    assert resolve_ict_kit(str(kit.folder.parent), tmp_path) == kit.folder
    with pytest.raises(HeadModelError, match="gone.*video_preprocess.head_model_dir"):
        resolve_ict_kit(str(tmp_path / "gone"), tmp_path)
    monkeypatch.setenv("HEADKIT_ICT_FACEKIT", str(kit.folder))
    assert resolve_ict_kit(None, tmp_path) == kit.folder
    monkeypatch.setenv("HEADKIT_ICT_FACEKIT", str(tmp_path / "gone"))
    with pytest.raises(HeadModelError, match="gone.*env HEADKIT_ICT_FACEKIT"):
        resolve_ict_kit("", tmp_path)
    monkeypatch.delenv("HEADKIT_ICT_FACEKIT")
    data = tmp_path / "data"
    (data / "ICT-FaceKit" / "FaceXModel").mkdir(parents=True)
    assert resolve_ict_kit(None, data) == data / "ICT-FaceKit" / "FaceXModel"
    with pytest.raises(HeadModelError, match="not found.*downloading is off"):
        resolve_ict_kit(None, tmp_path / "other", download=False)


def _patch_download(monkeypatch, fake):
    """Route headkit.download.download_file to ``fake``; returns the DownloadError class."""
    import headkit.download as download

    monkeypatch.setattr(download, "download_file", fake)
    return download.DownloadError


def test_download_failure_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv("HEADKIT_ICT_FACEKIT", raising=False)
    calls = []

    def offline(url, dest, sha256=None, desc="", size_hint=None):
        calls.append((url, dest))
        raise error("network unreachable")
    error = _patch_download(monkeypatch, offline)
    with pytest.raises(HeadModelError) as info:
        resolve_ict_kit(None, tmp_path / "data")
    message = str(info.value)
    assert calls == [(f"https://codeload.github.com/ICT-VGL/ICT-FaceKit/zip/{ICT_COMMIT}",
                      tmp_path / "data" / "ICT-FaceKit.zip")]
    for part in ("network unreachable", str(tmp_path / "data" / "ICT-FaceKit" / "FaceXModel"),
                 "video_preprocess.head_model_dir", "HEADKIT_ICT_FACEKIT", ICT_COMMIT):
        assert part in message


def test_download_extracts_only_facexmodel(kit, tmp_path, monkeypatch):
    monkeypatch.delenv("HEADKIT_ICT_FACEKIT", raising=False)

    def fake(url, dest, sha256=None, desc="", size_hint=None):
        dest.parent.mkdir(parents=True, exist_ok=True)
        top = f"ICT-FaceKit-{ICT_COMMIT}"
        with zipfile.ZipFile(dest, "w") as archive:
            archive.writestr(f"{top}/README.md", "readme")
            archive.writestr(f"{top}/FaceXModel/", "")
            for path in kit.folder.iterdir():
                archive.write(path, f"{top}/FaceXModel/{path.name}")
        return dest
    _patch_download(monkeypatch, fake)
    data = tmp_path / "data"
    folder = resolve_ict_kit(None, data)
    assert folder == data / "ICT-FaceKit" / "FaceXModel"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in kit.folder.iterdir())
    assert sorted(p.name for p in data.iterdir()) == ["ICT-FaceKit"]  # zip and temp gone
    assert _load(folder).num_identities == NUM_IDENTITIES


def test_progress_bar_goes_through_headkit_progress(kit, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    import headkit.progress
    monkeypatch.setenv("HEADKIT_NO_PROGRESS", "0")
    monkeypatch.setattr(headkit.progress, "progress_enabled", lambda: True)
    load_ict_face_model(kit.folder, regions=("face",), region_ranges=RANGES)
    assert "ICT Face Model OBJs" in capsys.readouterr().err
    monkeypatch.setenv("HEADKIT_NO_PROGRESS", "1")
    load_ict_face_model(kit.folder, regions=("face",), region_ranges=RANGES)
    assert "ICT Face Model OBJs" not in capsys.readouterr().err


def _real_kit() -> Path | None:
    """The real kit from env HEADKIT_ICT_FACEKIT or ../shared/assets/ICT-FaceKit, if present."""
    candidates = [os.environ.get("HEADKIT_ICT_FACEKIT", ""),
                  Path(__file__).resolve().parents[2] / "shared" / "assets" / "ICT-FaceKit"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.mark.skipif(_real_kit() is None, reason="the ICT-FaceKit FaceXModel folder is not here")
def test_real_kit(tmp_path):
    start = time.perf_counter()
    model = load_ict_face_model(_real_kit(), cache_dir=tmp_path)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    cached = load_ict_face_model(_real_kit(), cache_dir=tmp_path)
    warm = time.perf_counter() - start
    print(f"ICT kit load: cold {cold:.2f} s, cached {warm:.3f} s ({model.source})")
    assert model.num_expressions == 53 and "jawOpen" in model.expression_names
    assert model.regions == DEFAULT_REGIONS
    assert model.num_vertices == ICT_REGIONS["head_neck"][1] + 1 == 11248
    np.testing.assert_array_equal(cached.expressions, model.expressions)
    assert 0.22 < np.ptp(model.neutral[:, 0]) < 0.28  # head width in metres
    v = model.neutral[model.faces]
    normals = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    on_face = (model.vertex_ids[model.faces] <= ICT_REGIONS["face"][1]).all(1)
    mean = normals[on_face].sum(0)
    assert mean[2] < -0.9 * np.linalg.norm(mean)  # out of the face = towards the camera
    assert (model.landmark_vertices >= 0).all()
    nose = model.neutral[model.landmark_vertices[30]]
    assert nose[2] == pytest.approx(model.neutral[:, 2].min(), abs=0.01)  # nose tip is nearest
