"""Data edge cases of the subject folder (issue 11, item 3): RGBA frames, missing masks, empty splits."""

from __future__ import annotations

import json
import logging

import imageio.v3 as iio
import numpy as np
import pytest

from headkit.data.dataset import FrameDataset
from headkit.data.folder import load_subject_folder, write_subject_folder
from headkit.data.image_io import composite_alpha, read_rgb
from headkit.data.sources import subject_folder
from headkit.data.subject import SubjectError
from tests.conftest import make_tiny_subject

LOGGER = "headkit.data.folder"


@pytest.fixture
def folder(tmp_path, tiny_subject):
    return write_subject_folder(tiny_subject, tmp_path / "subj")


def _rgba(height=12, width=16, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    img[0, 0] = [200, 100, 0, 128]  # half transparent
    img[0, 1] = [10, 20, 30, 0]  # fully transparent
    img[0, 2] = [10, 20, 30, 255]  # opaque
    return img


def _expected(img: np.ndarray, bg) -> np.ndarray:
    a = img[..., 3:].astype(np.float64) / 255.0
    return np.floor(img[..., :3] * a + 255.0 * np.asarray(bg) * (1 - a) + 0.5).astype(np.uint8)


def _edit_meta(folder, **changes):
    meta = json.loads((folder / "subject.json").read_text())
    meta.update(changes)
    (folder / "subject.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------- RGBA frames

def test_composite_alpha_hand_values():
    img = np.array([[[200, 100, 0, 128], [10, 20, 30, 0], [10, 20, 30, 255]]], np.uint8)
    np.testing.assert_array_equal(composite_alpha(img), [[[227, 177, 127], [255, 255, 255], [10, 20, 30]]])
    np.testing.assert_array_equal(composite_alpha(img, (0.0, 0.0, 0.0)), [[[100, 50, 0], [0, 0, 0], [10, 20, 30]]])
    with pytest.raises(ValueError, match="background must be 3 values"):
        composite_alpha(img, (2.0, 0.0, 0.0))


def test_read_rgb_composites_instead_of_dropping_alpha(tmp_path):
    img = _rgba()
    iio.imwrite(tmp_path / "a.png", img)
    np.testing.assert_array_equal(read_rgb(tmp_path / "a.png"), _expected(img, (1, 1, 1)))
    assert read_rgb(tmp_path / "a.png")[0, 1].tolist() == [255, 255, 255]  # not black


def test_rgba_frame_is_composited_over_white_with_one_warning_naming_it(folder, tiny_subject, caplog):
    img = _rgba()
    iio.imwrite(folder / "images" / "00002.png", img)
    iio.imwrite(folder / "images" / "00004.png", _rgba(seed=2))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        subject = load_subject_folder(folder)
    np.testing.assert_array_equal(subject.images[2], _expected(img, (1, 1, 1)))
    assert subject.images[2][0, 1].tolist() == [255, 255, 255]
    for t in (0, 1, 3, 5):  # RGB frames untouched
        np.testing.assert_array_equal(subject.images[t], tiny_subject.images[t])
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "images/00002.png" in warnings[0] and "images/00004.png" in warnings[0]
    assert "2 of 6 frames are RGBA" in warnings[0] and "[1.0, 1.0, 1.0]" in warnings[0]
    assert "00003.png" not in warnings[0]


def test_rgba_background_comes_from_the_subject_then_the_config(folder):
    img = _rgba()
    iio.imwrite(folder / "images" / "00001.png", img)
    _edit_meta(folder, meta={"source": "test", "settings": {"background": [0.0, 0.0, 0.0]}})
    np.testing.assert_array_equal(load_subject_folder(folder).images[1], _expected(img, (0, 0, 0)))
    bg = (0.2, 0.4, 0.6)  # data.background wins over the subject's own
    np.testing.assert_array_equal(subject_folder(folder, background=list(bg)).images[1], _expected(img, bg))
    with pytest.raises(SubjectError, match=r"data\.background must be 3 values"):
        subject_folder(folder, background=[1.0, 2.0])
    _edit_meta(folder, meta={"settings": {"background": "white"}})
    with pytest.raises(SubjectError, match=r"subject\.json: meta\.settings\.background must be 3 values"):
        load_subject_folder(folder)


def test_no_warning_without_rgba_frames(folder, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_subject_folder(folder)
    assert not [r for r in caplog.records if r.name == LOGGER]


# ---------------------------------------------------------------- missing masks

def test_missing_mask_error_names_the_switch(folder):
    (folder / "masks" / "00003.png").unlink()
    with pytest.raises(SubjectError, match=r"masks/00003\.png \(frame 3\): mask file is missing.*"
                                           r"data\.missing_mask=full"):
        load_subject_folder(folder)


def test_frames_filled_by_missing_mask_full_are_listed_once(folder, caplog):
    (folder / "masks" / "00000.png").unlink()
    (folder / "masks" / "00003.png").unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        subject = subject_folder(folder, missing_mask="full")
    assert (subject.masks[0] == 255).all() and (subject.masks[3] == 255).all()
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1, warnings
    assert "masks/00000.png, masks/00003.png" in warnings[0]
    assert "2 of 6 frames have no mask file" in warnings[0] and "data.missing_mask=full" in warnings[0]


# ---------------------------------------------------------------- empty splits

@pytest.mark.parametrize("empty, other", [("test", "train"), ("train", "test")])
def test_empty_split_names_subject_json_and_the_split(folder, tiny_subject, empty, other):
    ids = {"train": tiny_subject.train_ids.tolist(), "test": tiny_subject.test_ids.tolist()}
    _edit_meta(folder, split={empty: [], other: ids[other]})
    with pytest.raises(SubjectError, match=rf"subject\.json: the {empty} split has no frames "
                                           rf"\('split' lists 0 {empty} and {len(ids[other])} {other} frames of 6\)"):
        load_subject_folder(folder)


def test_split_missing_a_key_or_overlapping_names_subject_json(folder):
    _edit_meta(folder, split={"train": [0, 1, 2, 3]})
    with pytest.raises(SubjectError, match=r"subject\.json: the test split has no frames"):
        load_subject_folder(folder)
    _edit_meta(folder, split={"train": [0, 1, 2, 3], "test": [3, 4]})
    with pytest.raises(SubjectError, match=r"subject\.json \('split'\): train and test splits overlap"):
        load_subject_folder(folder)
    _edit_meta(folder, split=[0, 1])
    with pytest.raises(SubjectError, match=r"subject\.json: 'split' must be"):
        load_subject_folder(folder)


def test_dataset_empty_split_says_where_splits_come_from():
    subject = make_tiny_subject()
    subject.test_ids = np.array([], np.int64)
    with pytest.raises(SubjectError, match=r"the test split has no frames \(6 frames in all; .*subject\.json"):
        FrameDataset(subject, "test")
