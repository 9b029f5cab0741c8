"""MediaPipe Tasks: model-file resolution, the canonical face from the .task file, the real models.

Resolution and decoding tests need neither MediaPipe nor the network (downloads are file://
URLs). Tests of the real models find them in ``../shared/assets/mediapipe/`` relative to the
repository root (or through ``HEADKIT_FACE_LANDMARKER`` / ``HEADKIT_SELFIE_SEGMENTER``) and
skip when they or MediaPipe are absent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from headkit.data.video import model_files
from headkit.data.video.mesh_topology import (
    GEOMETRY_MEMBER, WireFormatError, load_canonical_face, read_geometry_metadata)
from headkit.data.video.model_files import (
    FACE_LANDMARKER, KNOWN_SEGMENTER_SHA256, ModelFile, ModelFileError, face_landmarker_path,
    resolve_model_file, selfie_segmenter_path)
from headkit.data.video.reader import VideoError

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "mediapipe"
ENV_VARS = ("HEADKIT_FACE_LANDMARKER", "HEADKIT_SELFIE_SEGMENTER")


def shared_model(env: str, name: str) -> Path:
    """The model file named by ``env`` if set, else the shared development copy."""
    return Path(os.environ.get(env) or SHARED_MODELS / name)


LANDMARKER = shared_model("HEADKIT_FACE_LANDMARKER", "face_landmarker.task")
SEGMENTER = shared_model("HEADKIT_SELFIE_SEGMENTER", "selfie_segmentation.tflite")
needs_landmarker = pytest.mark.skipif(not LANDMARKER.is_file(), reason=f"no face landmarker at {LANDMARKER}")


@pytest.fixture
def mediapipe_models(monkeypatch) -> tuple[Path, Path]:
    """``(face_landmarker.task, selfie segmenter)`` exported as ``HEADKIT_FACE_LANDMARKER`` /
    ``HEADKIT_SELFIE_SEGMENTER``; skips without MediaPipe or the files."""
    pytest.importorskip("mediapipe")
    for path in (LANDMARKER, SEGMENTER):
        if not path.is_file():
            pytest.skip(f"MediaPipe model file not found: {path}")
    monkeypatch.setenv("HEADKIT_FACE_LANDMARKER", str(LANDMARKER))
    monkeypatch.setenv("HEADKIT_SELFIE_SEGMENTER", str(SEGMENTER))
    return LANDMARKER, SEGMENTER


@pytest.fixture
def no_model_env(monkeypatch):
    """Neither model environment variable set."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def astronaut() -> np.ndarray:
    """scikit-image's public-domain astronaut portrait, ``[512, 512, 3]`` uint8."""
    import imageio.v3 as iio

    root = importlib.util.find_spec("skimage").submodule_search_locations[0]
    return np.ascontiguousarray(iio.imread(Path(root) / "data" / "astronaut.png")[..., :3])


# ----------------------------------------------------------------------------- model files

PAYLOAD = b"a tiny model\n" * 64
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def tiny_model(tmp_path: Path, url: str | None = None) -> ModelFile:
    """A ModelFile for ``PAYLOAD`` served from a local file:// URL."""
    source = tmp_path / "server" / "tiny.bin"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(PAYLOAD)
    return ModelFile(what="tiny model", key="landmarker_task", env="HEADKIT_FACE_LANDMARKER",
                     filename="tiny.bin", url=url or source.as_uri(), sha256=DIGEST)


def write(path: Path, data: bytes = PAYLOAD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_resolution_order_config_then_env_then_cache(tmp_path, monkeypatch, no_model_env):
    model = tiny_model(tmp_path)
    cache = tmp_path / "cache"
    configured, from_env = write(tmp_path / "config.bin"), write(tmp_path / "env.bin")
    monkeypatch.setenv(model.env, str(from_env))
    assert resolve_model_file(model, str(configured), cache, DIGEST) == configured
    assert resolve_model_file(model, None, cache, DIGEST) == from_env
    assert resolve_model_file(model, "", cache, DIGEST) == from_env
    monkeypatch.delenv(model.env)
    assert not cache.exists()
    got = resolve_model_file(model, None, cache, DIGEST)  # absent: downloaded (file:// URL) and checked
    assert got == cache / "tiny.bin" and got.read_bytes() == PAYLOAD
    monkeypatch.setattr(model_files, "download_file", lambda *a, **k: pytest.fail("downloaded twice"))
    assert resolve_model_file(model, None, cache, DIGEST) == got


def test_wrong_checksum_names_the_file_and_both_digests(tmp_path, monkeypatch, no_model_env):
    model = tiny_model(tmp_path)
    bad = write(tmp_path / "bad.bin", b"not the model")
    found = hashlib.sha256(b"not the model").hexdigest()
    for configured in (str(bad), None):
        if configured is None:
            monkeypatch.setenv(model.env, str(bad))
        with pytest.raises(ModelFileError) as info:
            resolve_model_file(model, configured, tmp_path / "cache", DIGEST)
        message = str(info.value)
        assert str(bad) in message and DIGEST in message and found in message and "\n" not in message
        assert ("video_preprocess.landmarker_task" if configured else "$HEADKIT_FACE_LANDMARKER") in message
    assert resolve_model_file(model, None, tmp_path / "cache", None) == bad  # None: not checked
    monkeypatch.delenv(model.env)
    cached = write(tmp_path / "cache" / "tiny.bin", b"not the model")
    with pytest.raises(ModelFileError, match=rf"{cached}.*expected {DIGEST}, found {found}.*delete it"):
        resolve_model_file(model, None, tmp_path / "cache", DIGEST)


def test_named_file_that_does_not_exist_names_its_origin(tmp_path, monkeypatch, no_model_env):
    model = tiny_model(tmp_path)
    with pytest.raises(ModelFileError, match=r"absent\.bin.*not found.*video_preprocess\.landmarker_task"):
        resolve_model_file(model, str(tmp_path / "absent.bin"), tmp_path / "cache", DIGEST)
    monkeypatch.setenv(model.env, str(tmp_path / "gone.bin"))
    with pytest.raises(ModelFileError, match=r"gone\.bin.*\$HEADKIT_FACE_LANDMARKER"):
        resolve_model_file(model, None, tmp_path / "cache", DIGEST)


def test_offline_message_names_where_it_looked(tmp_path, monkeypatch, no_model_env):
    url = (tmp_path / "offline" / "face_landmarker.task").as_uri()
    monkeypatch.setattr(model_files, "FACE_LANDMARKER", replace(FACE_LANDMARKER, url=url))
    cache = tmp_path / "cache"
    with pytest.raises(ModelFileError) as info:
        face_landmarker_path(None, cache)
    message = str(info.value)
    for part in (str(cache / "face_landmarker.task"), "video_preprocess.landmarker_task", "$HEADKIT_FACE_LANDMARKER",
                 url, FACE_LANDMARKER.sha256):
        assert part in message, part
    assert "\n" not in message and not (cache / "face_landmarker.task").exists()
    assert not list(cache.glob(".*.part"))


def test_download_of_a_wrong_file_is_refused(tmp_path, monkeypatch, no_model_env):
    wrong = write(tmp_path / "server" / "face_landmarker.task", b"a different file")
    monkeypatch.setattr(model_files, "FACE_LANDMARKER", replace(FACE_LANDMARKER, url=wrong.as_uri()))
    with pytest.raises(ModelFileError, match=rf"wrong SHA-256 \(expected {FACE_LANDMARKER.sha256}"):
        face_landmarker_path(None, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


@needs_landmarker
def test_real_landmarker_is_downloaded_into_the_cache_and_verified(tmp_path, monkeypatch, no_model_env):
    monkeypatch.setattr(model_files, "FACE_LANDMARKER", replace(FACE_LANDMARKER, url=LANDMARKER.as_uri()))
    got = face_landmarker_path(None, tmp_path / "cache")
    assert got == tmp_path / "cache" / "face_landmarker.task" and got.stat().st_size == 3_758_596
    assert face_landmarker_path(str(LANDMARKER), tmp_path / "other") == LANDMARKER


def test_segmenter_checksum_choice(tmp_path, monkeypatch, no_model_env):
    other = write(tmp_path / "selfie_segmenter.tflite", b"a newer segmenter")
    with pytest.raises(ModelFileError, match=rf"selfie_segmenter\.tflite.*expected {KNOWN_SEGMENTER_SHA256}"):
        selfie_segmenter_path(str(other), tmp_path / "cache")
    assert selfie_segmenter_path(str(other), tmp_path / "cache", sha256=None) == other
    pinned = hashlib.sha256(b"a newer segmenter").hexdigest()
    assert selfie_segmenter_path(str(other), tmp_path / "cache", sha256=pinned) == other
    if SEGMENTER.is_file():
        assert selfie_segmenter_path(str(SEGMENTER), tmp_path / "cache") == SEGMENTER
    # The download (digest not published) is accepted unverified; a file:// URL stands in here.
    served = write(tmp_path / "server" / "seg.tflite", b"downloaded segmenter")
    monkeypatch.setattr(model_files, "SELFIE_SEGMENTER", replace(model_files.SELFIE_SEGMENTER, url=served.as_uri()))
    got = selfie_segmenter_path(None, tmp_path / "cache")
    assert got == tmp_path / "cache" / "selfie_segmenter.tflite" and got.read_bytes() == b"downloaded segmenter"


# ----------------------------------------------------------------------------- canonical face

def varint(value: int) -> bytes:
    """Protobuf base-128 varint."""
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


def tiny_metadata(packed: bool) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A GeometryPipelineMetadata of a 4-vertex, 2-triangle mesh (packed or one-by-one fields)."""
    buffer = np.array([[0, 0, 7, 0.5, 0.2], [4, 3, 3, 0.8, 0.1], [-4, 3, 3, 0.2, 0.1], [0, -9, 4, 0.5, 0.9]],
                      np.float32)
    triangles = np.array([[0, 1, 2], [0, 3, 1]])
    if packed:
        indices = b"".join(varint(int(i)) for i in triangles.ravel())
        mesh = delimited(3, buffer.astype("<f4").tobytes()) + delimited(4, indices)
    else:
        mesh = b"".join(tag(3, 5) + struct.pack("<f", v) for v in buffer.ravel())
        mesh += b"".join(tag(4, 0) + varint(int(i)) for i in triangles.ravel())
    mesh = tag(1, 0) + varint(0) + tag(2, 0) + varint(0) + mesh
    landmark = tag(1, 0) + varint(300) + tag(2, 5) + struct.pack("<f", 0.25)
    return delimited(1, mesh) + delimited(2, landmark) + tag(3, 0) + varint(1), buffer, triangles


@pytest.mark.parametrize("packed", [True, False])
def test_geometry_metadata_decoder_on_a_hand_made_message(tmp_path, packed):
    data, buffer, triangles = tiny_metadata(packed)
    meta = read_geometry_metadata(data)
    np.testing.assert_allclose(meta.vertices, buffer[:, :3])
    np.testing.assert_allclose(meta.uvs, buffer[:, 3:])
    np.testing.assert_array_equal(meta.triangles, triangles)
    np.testing.assert_allclose(meta.procrustes, [[300, 0.25]])
    task = tmp_path / "tiny.task"
    with zipfile.ZipFile(task, "w") as zf:
        zf.writestr(GEOMETRY_MEMBER, data)
    face = load_canonical_face(task)
    np.testing.assert_allclose(face.vertices, buffer[:, :3] * [0.01, -0.01, -0.01], atol=1e-7)
    np.testing.assert_allclose(face.uvs, np.stack([buffer[:, 3], 1 - buffer[:, 4]], -1), atol=1e-7)
    assert face.uvs[3, 1] < face.uvs[1, 1]  # the chin is below the eyes in UV space (v up)
    assert face.edges().shape == (5, 2) and "Apache-2.0" in face.source


def test_broken_task_files_name_the_file(tmp_path):
    data, _, _ = tiny_metadata(True)
    for name, content in (("truncated", data[:-7]), ("garbage", b"\x0a\xff\xff\xff\xff\x0f")):
        with pytest.raises(WireFormatError):
            read_geometry_metadata(content)
        task = tmp_path / f"{name}.task"
        with zipfile.ZipFile(task, "w") as zf:
            zf.writestr(GEOMETRY_MEMBER, content)
        with pytest.raises(VideoError, match=rf"{name}\.task.*{GEOMETRY_MEMBER}"):
            load_canonical_face(task)
    (tmp_path / "plain.task").write_bytes(b"not a zip")
    with pytest.raises(VideoError, match=r"plain\.task.*BadZipFile"):
        load_canonical_face(tmp_path / "plain.task")
    with zipfile.ZipFile(tmp_path / "other.task", "w") as zf:
        zf.writestr("face_detector.tflite", b"")
    with pytest.raises(VideoError, match=r"other\.task.*KeyError"):
        load_canonical_face(tmp_path / "other.task")


@needs_landmarker
def test_canonical_face_from_the_real_task_file():
    face = load_canonical_face(LANDMARKER)
    assert face.vertices.shape == (468, 3) and face.faces.shape == (898, 3) and face.uvs.shape == (468, 2)
    assert face.faces.min() == 0 and face.faces.max() == 467 and len(np.unique(face.faces)) == 468
    width = np.ptp(face.vertices[:, 0])
    assert 0.14 < width < 0.17  # metres: a head ~15 cm wide
    v = face.vertices
    normals = np.cross(v[face.faces[:, 1]] - v[face.faces[:, 0]], v[face.faces[:, 2]] - v[face.faces[:, 0]])
    assert (normals[:, 2] < 0).mean() > 0.95  # outward: towards the camera (-z in head axes)
    assert v[152, 1] > v[10, 1] and v[1, 2] < v[152, 2]  # chin below forehead, nose tip in front
    assert face.uvs.min() >= 0 and face.uvs.max() <= 1
    assert face.uvs[10, 1] > face.uvs[152, 1]  # forehead above chin in UV space (v up)
    assert "Apache-2.0" in face.source and face.edges().shape[1] == 2


# ----------------------------------------------------------------------------- real models

def test_landmarker_on_a_real_face(mediapipe_models):
    from headkit.data.video.landmarks import BLENDSHAPE_NAMES, FaceLandmarker, FaceObservation

    image = astronaut()
    landmarker = FaceLandmarker(mediapipe_models[0], max_faces=2)
    try:
        faces = landmarker(image, 0)
        again = landmarker(image, 0)  # not increasing: bumped to 1 ms, no error
    finally:
        landmarker.close()
    assert len(faces) == 1 and len(again) == 1 and isinstance(faces[0], FaceObservation)
    face = faces[0]
    assert face.landmarks.shape == (478, 3) and face.blendshapes.shape == (len(BLENDSHAPE_NAMES),) == (51,)
    assert face.matrix.shape == (4, 4)
    R = face.matrix[:3, :3]
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=0.05)
    assert face.blendshapes[BLENDSHAPE_NAMES.index("mouthSmileLeft")] == pytest.approx(0.9, abs=0.05)
    assert face.blendshapes[BLENDSHAPE_NAMES.index("jawOpen")] < 0.2
    assert 120 < face.landmarks[:, 0].mean() < 380 and 60 < face.landmarks[:, 1].mean() < 280  # pixels


def test_segmenter_on_a_real_person(mediapipe_models):
    from headkit.data.video.landmarks import Segmenter

    image = astronaut()
    segmenter = Segmenter(mediapipe_models[1])
    try:
        mask = segmenter(image[:, :384])
    finally:
        segmenter.close()
    assert mask.shape == (512, 384) and mask.dtype == np.float32 and 0 <= mask.min() and mask.max() <= 1
    assert mask[200:260, 180:240].mean() > 0.9  # the face
    assert mask[:60, 300:].mean() < 0.1  # background, top right


def test_unloadable_model_names_the_file(tmp_path, mediapipe_models):
    from headkit.data.video.landmarks import FaceLandmarker, Segmenter

    junk = write(tmp_path / "junk.task", b"junk")
    for make in (FaceLandmarker, Segmenter):
        with pytest.raises(VideoError, match=r"junk\.task.*cannot load"):
            make(junk)
