"""Subject folder round trip, FrameDataset keys, and the bad-input catalogue's data rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headkit.data.dataset import FRAME_KEYS, FrameDataset
from headkit.data.folder import load_subject_folder, write_subject_folder
from headkit.data.subject import SubjectError, holdout_split
from tests.conftest import make_tiny_subject


@pytest.fixture
def folder(tmp_path, tiny_subject):
    return write_subject_folder(tiny_subject, tmp_path / "subj")


def test_round_trip_preserves_every_field(folder, tiny_subject):
    back = load_subject_folder(folder)
    for key in ("faces", "template_vertices", "vertices", "expressions", "Ks", "camtoworlds",
                "times", "images", "masks", "train_ids", "test_ids", "uvs", "uv_faces", "head_poses"):
        np.testing.assert_allclose(getattr(back, key), getattr(tiny_subject, key), atol=1e-6, err_msg=key)
    np.testing.assert_allclose(back.extras["true_expressions"], tiny_subject.extras["true_expressions"])
    assert back.fps == tiny_subject.fps and back.name == "tiny" and back.meta == {"source": "test"}


def test_writer_refuses_to_overwrite(folder, tiny_subject):
    with pytest.raises(FileExistsError, match="not empty"):
        write_subject_folder(tiny_subject, folder)
    write_subject_folder(tiny_subject, folder, overwrite=True)


def test_dataset_items_have_fixed_keys_and_values(tiny_subject):
    ds = FrameDataset(tiny_subject, "test")
    assert len(ds) == 2
    item = ds[1]
    assert tuple(item) == FRAME_KEYS
    t = int(item["index"])
    assert t == tiny_subject.test_ids[1]
    assert item["image"].shape == (12, 16, 3) and item["image"].dtype == torch.float32
    assert torch.equal(item["image"], torch.from_numpy(tiny_subject.images[t]).float() / 255)
    assert item["mask"].shape == (12, 16, 1)
    assert torch.allclose(item["viewmat"] @ item["camtoworld"], torch.eye(4), atol=1e-6)
    batch = ds.batch([0, 1])
    assert batch["vertices"].shape == (2, 6, 3) and batch["time"].shape == (2,)


def test_expression_size_mismatch_names_config_key(tiny_subject):
    with pytest.raises(SubjectError, match=r"expression size 4.*model.expression_dim=100"):
        FrameDataset(tiny_subject, "train", expression_dim=100)


def test_missing_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(SubjectError, match="prepare_data.py"):
        load_subject_folder(tmp_path / "nope")


def test_missing_image_names_file_and_frame(folder):
    (folder / "images" / "00003.png").unlink()
    with pytest.raises(SubjectError, match=r"00003\.png \(frame 3\): image file is missing"):
        load_subject_folder(folder)


def test_truncated_image_names_file(folder):
    path = folder / "images" / "00002.png"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SubjectError, match=r"00002\.png \(frame 2\): cannot read image"):
        load_subject_folder(folder)


def test_image_size_mismatch_names_both_sizes(folder):
    import imageio.v3 as iio
    iio.imwrite(folder / "images" / "00001.png", np.zeros((10, 16, 3), np.uint8))
    with pytest.raises(SubjectError, match=r"00001\.png.*10x16.*12x16"):
        load_subject_folder(folder)


def test_missing_mask_errors_or_is_full_by_switch(folder):
    (folder / "masks" / "00000.png").unlink()
    with pytest.raises(SubjectError, match=r"masks/00000\.png"):
        load_subject_folder(folder)
    subject = load_subject_folder(folder, missing_mask="full")
    assert (subject.masks[0] == 255).all()


def _edit_tracking(folder, **changes):
    with np.load(folder / "tracking.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    np.savez(folder / "tracking.npz", **arrays)
    return arrays


def test_vertex_count_mismatch_names_both_counts(folder, tiny_subject):
    _edit_tracking(folder, vertices=tiny_subject.vertices[:, :5])
    with pytest.raises(SubjectError, match=r"tracking\.npz.*5 vertices.*template\.obj has 6"):
        load_subject_folder(folder)


@pytest.mark.parametrize("field", ["vertices", "expressions", "camtoworlds", "Ks"])
def test_nan_names_frame_and_field(folder, tiny_subject, field):
    arr = getattr(tiny_subject, field).copy()
    arr[4].flat[0] = np.nan
    _edit_tracking(folder, **{field: arr})
    with pytest.raises(SubjectError, match=rf"NaN/Inf in '{field}' at frame 4"):
        load_subject_folder(folder)


def test_degenerate_camera_names_frame(folder, tiny_subject):
    Ks = tiny_subject.Ks.copy()
    Ks[2, 0, 0] = 0
    _edit_tracking(folder, Ks=Ks)
    with pytest.raises(SubjectError, match="frame 2 has focal length <= 0"):
        load_subject_folder(folder)
    c2w = tiny_subject.camtoworlds.copy()
    c2w[1, :3, :3] *= 2
    _edit_tracking(folder, Ks=tiny_subject.Ks, camtoworlds=c2w)
    with pytest.raises(SubjectError, match="frame 1 camtoworld rotation is not a rotation"):
        load_subject_folder(folder)


def test_frame_count_mismatch_names_both_counts(folder):
    meta = json.loads((folder / "subject.json").read_text())
    meta["num_frames"] = 5
    (folder / "subject.json").write_text(json.dumps(meta))
    with pytest.raises(SubjectError, match=r"5 frames.*tracking for 6"):
        load_subject_folder(folder)


def test_malformed_json_names_file(folder):
    (folder / "subject.json").write_text("{not json")
    with pytest.raises(SubjectError, match=r"subject\.json: malformed JSON"):
        load_subject_folder(folder)


def test_split_without_test_frames_says_which_split():
    with pytest.raises(SubjectError, match="no test"):
        holdout_split(10, 0)
    with pytest.raises(SubjectError, match="no train"):
        holdout_split(10, 10)
    subject = make_tiny_subject()
    subject.test_ids = np.array([], np.int64)
    with pytest.raises(SubjectError, match="the test split has no frames"):
        subject.validate()
