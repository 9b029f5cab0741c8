"""INSTA and NBS/metrical-tracker parsers on tiny fixtures written in the real on-disk layouts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_realdata import (  # noqa: E402
    INSTA_CORRUPTIONS, NBS_CORRUPTIONS, OCTAHEDRON_FACES, write_insta_fixture, write_nbs_fixture)
from headkit.data.insta import load_insta, resize_frames  # noqa: E402
from headkit.data.nbs import load_nbs  # noqa: E402
from headkit.data.subject import SubjectError  # noqa: E402


def project(points: np.ndarray, c2w: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent pinhole projection: world ``[N, 3]`` → pixels ``[N, 2]``, depths ``[N]``."""
    w2c = np.linalg.inv(c2w.astype(np.float64))
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    return cam[:, :2] / cam[:, 2:3] * np.diag(K)[:2] + K[:2, 2], cam[:, 2]


def assert_opencv_view(subject, t: int) -> None:
    """The head lies in front of camera t, near the image centre, world +x to the right of -x
    and world +y (up) above -y (image rows grow downwards)."""
    pixels, depths = project(subject.vertices[t], subject.camtoworlds[t], subject.Ks[t])
    assert (depths > 0.5).all()
    assert np.abs(pixels.mean(0) - [subject.width / 2, subject.height / 2]).max() < 12
    assert pixels[0, 0] > pixels[1, 0]  # vertex 0 = +x, vertex 1 = -x
    assert pixels[2, 1] < pixels[3, 1]  # vertex 2 = +y (up), vertex 3 = -y


# ------------------------------------------------------------------------------------ INSTA

def test_insta_reads_every_field(tmp_path):
    truth = write_insta_fixture(tmp_path / "subj", num_test=2)
    s = load_insta(tmp_path / "subj", num_test=2)
    assert s.name == "subj" and s.meta["source"] == "insta"
    assert s.meta["split_files"] == ["transforms_train.json", "transforms_test.json"]
    np.testing.assert_array_equal(s.faces, OCTAHEDRON_FACES)
    np.testing.assert_allclose(s.template_vertices, truth["canonical"], atol=1e-7)
    np.testing.assert_allclose(s.vertices, truth["vertices"], atol=1e-7)
    np.testing.assert_allclose(s.expressions, truth["expressions"], atol=1e-6)
    np.testing.assert_allclose(s.Ks, truth["Ks"], atol=1e-6)
    np.testing.assert_allclose(s.camtoworlds, truth["camtoworlds"], atol=1e-6)
    np.testing.assert_array_equal(s.images, truth["images"])
    np.testing.assert_array_equal(s.masks, truth["masks"])  # the alpha channel
    np.testing.assert_allclose(s.times, np.arange(6) / 5, atol=1e-7)
    np.testing.assert_array_equal(s.train_ids, [0, 1, 2, 3])
    np.testing.assert_array_equal(s.test_ids, [4, 5])
    assert s.uvs is None and s.expression_dim == 5 and s.num_vertices == 6
    for t in range(s.num_frames):
        assert_opencv_view(s, t)


def test_insta_opengl_transforms_are_converted(tmp_path):
    truth = write_insta_fixture(tmp_path / "gl", convention="opengl")
    s = load_insta(tmp_path / "gl", num_test=2, camera_convention="opengl")
    np.testing.assert_allclose(s.camtoworlds, truth["camtoworlds"], atol=1e-6)
    assert_opencv_view(s, 0)
    wrong = load_insta(tmp_path / "gl", num_test=2)  # read as OpenCV: the head is behind the camera
    assert (project(wrong.vertices[0], wrong.camtoworlds[0], wrong.Ks[0])[1] < 0).all()


def test_insta_split_files_are_honoured_even_when_shuffled(tmp_path):
    truth = write_insta_fixture(tmp_path / "s", shuffle=True, seed=3)
    s = load_insta(tmp_path / "s", num_test=2)
    numbers = np.array(s.meta["frame_numbers"])
    np.testing.assert_array_equal(numbers, np.arange(6))  # frames sorted by number
    np.testing.assert_array_equal(numbers[s.test_ids], truth["test_numbers"])
    np.testing.assert_allclose(s.camtoworlds, truth["camtoworlds"], atol=1e-6)
    last = load_insta(tmp_path / "s", num_test=2, split="last")
    np.testing.assert_array_equal(last.test_ids, [4, 5])


def test_insta_last_split_with_frame_gaps(tmp_path):
    numbers = [0, 1, 2, 4, 5, 7]
    truth = write_insta_fixture(tmp_path / "g", frame_numbers=numbers, split_files=False, shuffle=True)
    s = load_insta(tmp_path / "g", num_test=2)
    assert s.meta["split_files"] == ["transforms.json"]
    np.testing.assert_array_equal(s.meta["frame_numbers"], numbers)
    np.testing.assert_allclose(s.times, np.array(numbers) / 7, atol=1e-7)
    np.testing.assert_array_equal(s.test_ids, [4, 5])
    np.testing.assert_allclose(s.expressions, truth["expressions"], atol=1e-6)
    np.testing.assert_array_equal(s.images, truth["images"])


def test_insta_template_falls_back_to_first_frame(tmp_path):
    truth = write_insta_fixture(tmp_path / "nc", with_canonical=False)
    s = load_insta(tmp_path / "nc", num_test=2)
    np.testing.assert_allclose(s.template_vertices, truth["vertices"][0], atol=1e-7)
    write_insta_fixture(tmp_path / "c")
    first = load_insta(tmp_path / "c", num_test=2, template="first")
    assert first.meta["template"] == "meshes/00000.obj"
    np.testing.assert_allclose(first.template_vertices, first.vertices[0])


def test_insta_image_size_box_filters_and_scales_intrinsics(tmp_path):
    truth = write_insta_fixture(tmp_path / "r")
    s = load_insta(tmp_path / "r", num_test=2, image_size=(12, 16))
    boxed = truth["images"].reshape(6, 12, 2, 16, 2, 3).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(s.images.astype(np.float64) - boxed).max() <= 0.5 + 1e-9
    mboxed = truth["masks"].reshape(6, 12, 2, 16, 2).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(s.masks.astype(np.float64) - mboxed).max() <= 0.5 + 1e-9
    expect = truth["Ks"].copy()
    expect[:, :2] /= 2  # fx, cx, fy, cy halve; pixel centres at +0.5 map exactly
    np.testing.assert_allclose(s.Ks, expect, atol=1e-6)
    full = load_insta(tmp_path / "r", num_test=2)
    p_full = project(full.vertices[0], full.camtoworlds[0], full.Ks[0])[0]
    p_half = project(s.vertices[0], s.camtoworlds[0], s.Ks[0])[0]
    np.testing.assert_allclose(p_half, p_full / 2, atol=1e-4)


def test_resize_frames_upscales_bilinearly():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    masks = np.full((2, 4, 6), 200, np.uint8)
    Ks = np.tile(np.array([[5.0, 0, 3], [0, 6, 2], [0, 0, 1]]), (2, 1, 1))
    big, bmasks, bKs = resize_frames(images, masks, Ks, (8, 12))
    assert big.shape == (2, 8, 12, 3) and (bmasks == 200).all()
    np.testing.assert_allclose(bKs[0], [[10, 0, 6], [0, 12, 4], [0, 0, 1]])
    # align_corners=False bilinear: output pixel (1, 1) sits at input (0.25, 0.25) → 3/4·p00 + ...
    im = images.astype(np.float64)
    ref = (im[:, 0, 0] * 9 + im[:, 0, 1] * 3 + im[:, 1, 0] * 3 + im[:, 1, 1]) / 16
    assert np.abs(big[:, 1, 1].astype(float) - ref).max() <= 0.5 + 1e-9


def test_insta_split_needs_train_and_test_frames(tmp_path):
    write_insta_fixture(tmp_path / "few", split_files=False)
    with pytest.raises(SubjectError, match="no train"):
        load_insta(tmp_path / "few", num_test=350)
    with pytest.raises(SubjectError, match="no test"):
        load_insta(tmp_path / "few", num_test=0)


def test_insta_missing_root_says_how_to_make_one(tmp_path):
    with pytest.raises(SubjectError) as err:
        load_insta(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value) and "prepare_data.py" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SubjectError, match="no transforms.json"):
        load_insta(tmp_path / "empty")


INSTA_MESSAGES = {
    "missing_image": ["missing", "frame 2"],
    "missing_mesh": ["missing", "frame 2"],
    "missing_exp": ["missing", "frame 2"],
    "wrong_vertex_count": ["5 vertices", "has 6", "canonical.obj"],
    "nan_exp": ["NaN", "expressions", "frame 2"],
    "nan_vertices": ["vertices", "frame 2", "non-finite"],
    "nan_camera": ["NaN", "transform_matrix", "frame 2"],
    "image_size": ["26x32", "24x32", "frame 2"],
    "no_alpha": ["alpha", "frame 2"],
    "bad_json": ["malformed JSON"],
    "missing_key": ["mesh_path", "frames[2]"],
    "exp_size": ["6 expression", "has 5"],
}


@pytest.mark.parametrize("corrupt", INSTA_CORRUPTIONS)
def test_insta_bad_input_names_the_file(tmp_path, corrupt):
    truth = write_insta_fixture(tmp_path / corrupt, corrupt=corrupt)
    with pytest.raises(SubjectError) as err:
        load_insta(tmp_path / corrupt, num_test=2)
    msg = str(err.value)
    assert str(truth["corrupt_path"]) in msg, msg
    for fragment in INSTA_MESSAGES[corrupt]:
        assert fragment in msg, (fragment, msg)


def test_insta_image_without_alpha_can_be_all_foreground(tmp_path):
    truth = write_insta_fixture(tmp_path / "na", corrupt="no_alpha")
    s = load_insta(tmp_path / "na", num_test=2, missing_mask="full")
    assert (s.masks[2] == 255).all()
    np.testing.assert_array_equal(s.masks[3], truth["masks"][3])
    np.testing.assert_array_equal(s.images[2], truth["images"][2])


# -------------------------------------------------------------------------------------- NBS

@pytest.mark.parametrize("variant", ["numpy", "torch_tensors", "numpy1_pickles", "tracker_elsewhere"])
def test_nbs_reads_every_field(tmp_path, variant):
    kw = {"tensor_values": variant == "torch_tensors", "numpy1_names": variant == "numpy1_pickles"}
    tracker = tmp_path / "tracker" if variant == "tracker_elsewhere" else None
    truth = write_nbs_fixture(tmp_path / "nbs", tracker_root=tracker, **kw)
    s = load_nbs(tmp_path / "nbs", num_test=2, tracker_root=tracker)
    assert s.meta["source"] == "nbs" and s.name == "nbs"
    np.testing.assert_array_equal(s.faces, OCTAHEDRON_FACES)
    np.testing.assert_allclose(s.template_vertices, truth["canonical"], atol=1e-7)
    np.testing.assert_allclose(s.vertices, truth["vertices"], atol=0)
    # concat(exp, eyes, eyelids, jaw), checked part by part
    parts = truth["parts"]
    np.testing.assert_array_equal(s.expressions[:, 0:5], parts["exp"])
    np.testing.assert_array_equal(s.expressions[:, 5:17], parts["eyes"])
    np.testing.assert_array_equal(s.expressions[:, 17:19], parts["eyelids"])
    np.testing.assert_array_equal(s.expressions[:, 19:25], parts["jaw"])
    assert s.meta["expression_slices"] == {"exp": [0, 5], "eyes": [5, 17], "eyelids": [17, 19],
                                           "jaw": [19, 25]}
    np.testing.assert_allclose(s.camtoworlds, truth["camtoworlds"], atol=1e-5)  # inverse of [R|t]
    np.testing.assert_allclose(s.Ks, truth["Ks"], atol=0)
    assert (s.height, s.width) == (24, 32)  # img_size is (h, w)
    np.testing.assert_array_equal(s.images, truth["images"])
    np.testing.assert_array_equal(s.masks, truth["masks"])
    np.testing.assert_allclose(s.times, np.arange(6) / 5, atol=1e-7)
    np.testing.assert_array_equal(s.test_ids, [4, 5])
    for t in range(s.num_frames):
        assert_opencv_view(s, t)


def test_nbs_expression_parts_are_configurable(tmp_path):
    truth = write_nbs_fixture(tmp_path / "e")
    s = load_nbs(tmp_path / "e", num_test=2, expression_parts=("jaw", "exp"))
    np.testing.assert_array_equal(s.expressions,
                                  np.concatenate([truth["parts"]["jaw"], truth["parts"]["exp"]], 1))


def test_nbs_img_size_order_matters_for_non_square_frames(tmp_path):
    write_nbs_fixture(tmp_path / "o")
    with pytest.raises(SubjectError) as err:
        load_nbs(tmp_path / "o", num_test=2, img_size_order="wh")  # GraphAvatar's reading
    msg = str(err.value)
    assert "head_neck_imgs/00000.png" in msg and "24x32" in msg and "32x24" in msg


def test_nbs_template_from_first_ply(tmp_path):
    truth = write_nbs_fixture(tmp_path / "t", with_canonical=False)
    s = load_nbs(tmp_path / "t", num_test=2)
    np.testing.assert_array_equal(s.faces, OCTAHEDRON_FACES)  # from the PLY's face element
    np.testing.assert_allclose(s.template_vertices, truth["vertices"][0], atol=0)


NBS_MESSAGES = {
    "missing_image": ["6 tracked frames", "5 images"],
    "missing_mask": ["missing", "frame 2"],
    "missing_mesh": ["missing", "frame 2"],
    "missing_frame": ["6 images", "5 tracked frames"],
    "wrong_vertex_count": ["5 vertices", "has 6"],
    "nan_exp": ["NaN", "flame.eyes", "frame 2"],
    "nan_camera": ["NaN", "opencv.t", "frame 2"],
    "nan_vertices": ["NaN", "vertices", "frame 2"],
    "image_size": ["24x32", "28x32", "frame 2"],
    "missing_key": ["flame.eyelids"],
    "truncated_frame": ["cannot read"],
    "unsafe_pickle": ["trust_pickle", "allow-list"],
}


@pytest.mark.parametrize("corrupt", NBS_CORRUPTIONS)
def test_nbs_bad_input_names_the_file(tmp_path, corrupt):
    truth = write_nbs_fixture(tmp_path / corrupt, corrupt=corrupt)
    with pytest.raises(SubjectError) as err:
        load_nbs(tmp_path / corrupt, num_test=2)
    msg = str(err.value)
    assert str(truth["corrupt_path"]) in msg, msg
    for fragment in NBS_MESSAGES[corrupt]:
        assert fragment in msg, (fragment, msg)


def test_nbs_trusted_pickle_and_missing_mask_switches(tmp_path):
    truth = write_nbs_fixture(tmp_path / "u", corrupt="unsafe_pickle")
    s = load_nbs(tmp_path / "u", num_test=2, trust_pickle=True)
    np.testing.assert_array_equal(s.expressions, truth["expressions"])
    truth = write_nbs_fixture(tmp_path / "m", corrupt="missing_mask")
    s = load_nbs(tmp_path / "m", num_test=2, missing_mask="full")
    assert (s.masks[2] == 255).all()
    np.testing.assert_array_equal(s.masks[1], truth["masks"][1])


def test_nbs_missing_folders_and_short_videos(tmp_path):
    with pytest.raises(SubjectError) as err:
        load_nbs(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err.value) and "prepare_data.py" in str(err.value)
    write_nbs_fixture(tmp_path / "n", tracker_root=tmp_path / "trk")
    with pytest.raises(SubjectError, match="tracker_root"):
        load_nbs(tmp_path / "n", num_test=2)  # checkpoint/ is not under root
    with pytest.raises(SubjectError, match="no train"):
        load_nbs(tmp_path / "n", tracker_root=tmp_path / "trk")  # 6 frames, 500 held out


def test_map_frames_fails_fast_and_reraises():
    from headkit.data.insta import map_frames

    import time

    ran = []

    def fn(t: int) -> None:  # frame 0 is bad; each other frame takes 10 ms to "read"
        ran.append(t)
        if t == 0:
            raise SubjectError("frame 0 is bad")
        time.sleep(0.01)

    with pytest.raises(SubjectError, match="frame 0 is bad"):
        map_frames(fn, 200, num_workers=1)
    assert len(ran) < 100  # pending frames were cancelled, not all read


def test_nbs_image_size_scales_each_axis(tmp_path):
    truth = write_nbs_fixture(tmp_path / "r")
    s = load_nbs(tmp_path / "r", num_test=2, image_size=(12, 16))
    assert s.images.shape == (6, 12, 16, 3) and s.masks.shape == (6, 12, 16)
    boxed = truth["masks"].reshape(6, 12, 2, 16, 2).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(s.masks.astype(np.float64) - boxed).max() <= 0.5 + 1e-9
    expect = truth["Ks"].copy()
    expect[:, :2] /= 2
    np.testing.assert_allclose(s.Ks, expect, atol=1e-6)
    square = load_nbs(tmp_path / "r", num_test=2, image_size=12)  # 24x32 → 12x12: per-axis scales
    np.testing.assert_allclose(square.Ks[:, 0, 0], truth["Ks"][:, 0, 0] * 12 / 32, rtol=1e-6)
    np.testing.assert_allclose(square.Ks[:, 1, 2], truth["Ks"][:, 1, 2] * 12 / 24, rtol=1e-6)
