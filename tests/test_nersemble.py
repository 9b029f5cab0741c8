"""NeRSemble Monocular FLAME Avatar benchmark (issue 12, item 3): the FLAME layer against a
textbook numpy reference, the reader on a tiny fixture in the toolkit's layout, errors that
name what is missing, a tiny training + evaluation through the real Hydra config, and the
submission zip's layout."""

from __future__ import annotations

import json
import pickle
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).parent))

import fixtures_nersemble as fx  # noqa: E402
from headkit.data.nersemble import (TEST_SEQUENCES, TRAIN_SEQUENCES, euler_xyz,  # noqa: E402
                                    load_nersemble_mono)
from headkit.data.subject import SubjectError  # noqa: E402
from headkit.headmodel import HeadModelError  # noqa: E402
from headkit.headmodel.flame import FLAME, load_flame_file  # noqa: E402

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
pytestmark = pytest.mark.usefixtures("one_intraop_thread")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    """One participant: 2 train sequences (4 and 5 frames) and 2 held-out ones (tracking only)."""
    return fx.write_benchmark(tmp_path_factory.mktemp("nersemble") / "bench")


def load(bench: dict, **kwargs):
    kwargs = {"train_sequences": fx.TRAIN, "test_sequences": fx.TEST, "num_test": 2, "num_workers": 1, **kwargs}
    return load_nersemble_mono(bench["root"], fx.PARTICIPANT, bench["flame_model"], **kwargs)


# ------------------------------------------------------------------------------ FLAME layer

def rodrigues_np(r: np.ndarray) -> np.ndarray:
    theta = np.linalg.norm(r)
    if theta < 1e-12:
        return np.eye(3)
    k = r / theta
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K


def flame_reference(m: dict, shape, expr, poses) -> np.ndarray:
    """FLAME by the textbook formulas, one joint and one vertex at a time where it is clearer."""
    dirs = np.concatenate([m["shapedirs"][..., :300], m["shapedirs"][..., 300:400]], -1)
    v_shaped = m["v_template"] + dirs @ np.concatenate([shape, expr])
    J = m["J_regressor"] @ v_shaped
    Rs = [rodrigues_np(p) for p in poses]
    feature = np.concatenate([(R - np.eye(3)).ravel() for R in Rs[1:]])
    v_posed = v_shaped + m["posedirs"] @ feature
    parents = m["kintree_table"][0]
    G = []
    for j in range(len(Rs)):
        local = np.eye(4)
        local[:3, :3] = Rs[j]
        local[:3, 3] = J[j] - (J[parents[j]] if j else 0)
        G.append(local if j == 0 else G[parents[j]] @ local)
    out = np.empty_like(v_posed)
    for i, v in enumerate(v_posed):
        T = sum(m["weights"][i, j] * G[j] @ np.block([[np.eye(3), -J[j][:, None]], [np.zeros((1, 3)), 1]])
                for j in range(len(G)))
        out[i] = T[:3, :3] @ v + T[:3, 3]
    return out


def test_flame_layer_matches_the_textbook_reference(tmp_path):
    m = fx.write_flame_pickle(tmp_path / "flame.pkl", seed=3)
    loaded = load_flame_file(tmp_path / "flame.pkl")  # sparse J_regressor read back dense
    assert np.allclose(loaded["J_regressor"], m["J_regressor"]) and loaded["f"].dtype == np.int64
    flame = FLAME(tmp_path / "flame.pkl").double()
    rng = np.random.default_rng(1)
    shape, expr = rng.normal(0, 1, 300), rng.normal(0, 1, 100)
    poses = rng.normal(0, 0.3, (5, 3))
    ref = flame_reference(m, shape, expr, poses)
    t = lambda a: torch.from_numpy(np.asarray(a))[None]  # noqa: E731
    got = flame(t(shape), t(expr), t(poses[0]), t(poses[1]), t(poses[2]), t(poses[3:].ravel()))[0].numpy()
    assert np.abs(got - ref).max() < 1e-7  # buffers are float32; the reference float64
    # invariants: zero parameters give the template; a root rotation rotates the whole mesh about J_0
    zero = flame(torch.zeros(1, 300, dtype=torch.float64), torch.zeros(1, 100, dtype=torch.float64))[0]
    assert torch.allclose(zero, flame.v_template, atol=1e-12)  # exactly the template
    r = np.array([0.2, -0.5, 0.3])
    rotated = flame(torch.zeros(1, 300, dtype=torch.float64), torch.zeros(1, 100, dtype=torch.float64),
                    t(r))[0].numpy()
    J0 = m["J_regressor"][0] @ m["v_template"]
    assert np.abs(rotated - ((m["v_template"] - J0) @ rodrigues_np(r).T + J0)).max() < 1e-7


def test_flame_file_with_chumpy_arrays_loads_without_chumpy(tmp_path, monkeypatch):
    """FLAME 2020-style pickles keep arrays as chumpy.ch.Ch objects; read their ``x`` without chumpy."""
    import types
    model = fx.random_flame_model(3)
    ch = types.ModuleType("chumpy.ch")

    class Ch:  # pickled as chumpy.ch.Ch with chumpy's attributes
        def __init__(self, x):
            self.x, self._dirty_vars, self._itr = x, set(), None
    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch.Ch = Ch
    monkeypatch.setitem(sys.modules, "chumpy", types.ModuleType("chumpy"))
    monkeypatch.setitem(sys.modules, "chumpy.ch", ch)
    stored = {k: (Ch(v) if k in ("v_template", "shapedirs", "posedirs") else v) for k, v in model.items()}
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps(stored, protocol=2))
    monkeypatch.delitem(sys.modules, "chumpy.ch")
    monkeypatch.delitem(sys.modules, "chumpy")
    loaded = load_flame_file(path)
    for key in ("v_template", "shapedirs", "posedirs", "weights"):
        np.testing.assert_array_equal(loaded[key], model[key])
    bare = tmp_path / "bare.pkl"  # a Ch without its array
    bare.write_bytes(b"\x80\x02}q\x00(X\n\x00\x00\x00v_templateq\x01cchumpy.ch\nCh\nq\x02)\x81q\x03}q\x04bu.")
    with pytest.raises(HeadModelError, match=r"bare\.pkl: not a FLAME model file"):
        load_flame_file(bare)


def test_flame_file_errors_name_the_file(tmp_path):
    with pytest.raises(HeadModelError, match=r"missing\.pkl: FLAME model file not found.*data\.flame_model"):
        load_flame_file(tmp_path / "missing.pkl")
    # a derived chumpy expression (needs chumpy to evaluate): refused with one line saying so
    chumpy = tmp_path / "chumpy.pkl"
    chumpy.write_bytes(b"\x80\x02cchumpy.ch_ops\nadd\nq\x00)\x81q\x01.")
    with pytest.raises(HeadModelError, match=r"chumpy\.pkl: this FLAME pickle holds chumpy expressions"):
        load_flame_file(chumpy)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"v_template": __import__("os").getcwd}))  # a callable: refused
    with pytest.raises(HeadModelError, match=r"evil\.pkl: not a FLAME model file: it holds '(posix|os)\.getcwd'"):
        load_flame_file(evil)
    partial = tmp_path / "partial.pkl"
    partial.write_bytes(pickle.dumps({"v_template": np.zeros((3, 3))}))
    with pytest.raises(HeadModelError, match=r"partial\.pkl: not a FLAME model file \(missing shapedirs"):
        load_flame_file(partial)


# ---------------------------------------------------------------------------------- reader

def test_euler_xyz_is_intrinsic_like_scipy():
    rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    angles = np.random.default_rng(0).normal(0, 0.7, (5, 3))
    assert np.allclose(euler_xyz(angles), rotation.from_euler("XYZ", angles).as_matrix(), atol=1e-12)
    # independently of scipy: intrinsic XYZ is Rx(a) @ Ry(b) @ Rz(c)
    a, b, c = 0.3, -0.5, 0.8
    Rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    Ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    Rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    assert np.allclose(euler_xyz(np.array([[a, b, c]]))[0], Rx @ Ry @ Rz, atol=1e-12)


def test_reader_gives_a_valid_subject_with_toolkit_geometry(bench):
    s = load(bench)
    assert s.num_frames == 9 and s.images.shape == (9, fx.SIZE, fx.SIZE, 3) and s.num_vertices == 162
    assert list(s.train_ids) == list(range(7)) and list(s.test_ids) == [7, 8]  # last 2 of the last train sequence
    assert s.meta["sequences"] == [fx.TRAIN[0]] * 4 + [fx.TRAIN[1]] * 5 and s.expressions.shape == (9, 109)
    # masks from the alpha maps, images background white
    assert s.masks[0, 16, 16] > 250 and s.masks[0, 0, 0] < 5 and (s.images[0, 0, 0] > 245).all()
    # geometry as the toolkit's FlameProvider: FLAME without root rotation, then scale * R_eulerXYZ v + t
    trk = dict(np.load(bench["participant_dir"] / "sequences" / fx.TRAIN[1] / "tracking" / "flame2023_tracking_v2.npz"))
    flame = FLAME(bench["flame_model"]).double()
    t = 1
    d = lambda k: torch.from_numpy(trk[k].astype(np.float64))  # noqa: E731
    v = flame(d("shape"), d("expression")[t:t + 1], None, d("neck")[t:t + 1], d("jaw")[t:t + 1],
              d("eyes")[t:t + 1])[0].numpy()
    R = euler_xyz(trk["rotation"][t:t + 1].astype(np.float64))[0]
    expected = 1.2 * v @ R.T + trk["translation"][t]
    assert np.abs(s.vertices[4 + t] - expected).max() < 1e-5
    assert np.allclose(s.head_poses[4 + t][:3, :3], R, atol=1e-6)
    assert np.allclose(s.expressions[4 + t], np.concatenate([trk["expression"][t], trk["jaw"][t], trk["eyes"][t]]))
    # the camera: a known world point projects where the calibration (world_2_cam, K) says
    point = np.array([0.05, -0.03, 0.02])
    w2c = np.array(fx.camera_params()["world_2_cam"][fx.TRAIN_SERIAL])
    cam = w2c[:3, :3] @ point + w2c[:3, 3]
    expected_px = fx.FOCAL * cam[:2] / cam[2] + fx.SIZE / 2
    c2w, K = s.camtoworlds[0].astype(np.float64), s.Ks[0].astype(np.float64)
    cam2 = np.linalg.inv(c2w) @ np.append(point, 1)
    assert np.allclose((K @ cam2[:3])[:2] / cam2[2], expected_px, atol=1e-4)
    # resizing scales K with the images
    half = load(bench, image_size=16)
    assert half.images.shape[1:3] == (16, 16) and np.allclose(half.Ks[0, :2], s.Ks[0, :2] / 2)


def test_sequence_split_and_every_nth(tmp_path):
    bench = fx.write_benchmark(tmp_path / "bench", test_videos=True)
    s = load(bench, split="sequences")
    assert len(s.train_ids) == 9 and len(s.test_ids) == 6 + 7
    assert s.meta["sequences"][9] == fx.TEST[0]
    thin = load(bench, every_nth=2)
    assert thin.num_frames == 2 + 3 and thin.meta["frame_in_sequence"] == [0, 2, 0, 2, 4]


def test_errors_name_what_is_missing(bench, tmp_path):
    with pytest.raises(SubjectError, match=r"nowhere: NeRSemble benchmark folder not found \(data\.root\)"):
        load_nersemble_mono(tmp_path / "nowhere", 393, bench["flame_model"])
    with pytest.raises(SubjectError, match=r"mono_flame_avatar/404: participant 404 not found.*found: 393"):
        load_nersemble_mono(bench["root"], 404, bench["flame_model"])
    with pytest.raises(HeadModelError, match=r"none\.pkl: FLAME model file not found"):
        load_nersemble_mono(bench["root"], fx.PARTICIPANT, tmp_path / "none.pkl", train_sequences=fx.TRAIN)
    # the default train sequences are the benchmark's 18: the first one absent here is named
    with pytest.raises(SubjectError, match=r"sequence 'EXP-3-cheeks\+nose' not found \(listed in data\.train_sequences\)"):
        load_nersemble_mono(bench["root"], fx.PARTICIPANT, bench["flame_model"])
    # held-out videos are not in the download: split=sequences names the missing file
    with pytest.raises(SubjectError, match=r"FREE/images/cam_222200037\.mp4: video of camera 222200037 not found"):
        load(bench, split="sequences")
    with pytest.raises(SubjectError, match=r"no camera 123"):
        load(bench, serial="123")
    with pytest.raises(SubjectError, match=r"num_test=5 of the 5 frames of the last train sequence"):
        load(bench, num_test=5)


def test_broken_tracking_and_frame_counts_are_named(tmp_path):
    bench = fx.write_benchmark(tmp_path / "bench")
    npz = bench["participant_dir"] / "sequences" / fx.TRAIN[1] / "tracking" / "flame2023_tracking_v2.npz"
    good = dict(np.load(npz))
    np.savez(npz, **{k: v for k, v in good.items() if k != "jaw"})
    with pytest.raises(SubjectError, match=r"flame2023_tracking_v2\.npz: FLAME tracking lacks jaw"):
        load(bench)
    np.savez(npz, **{**good, "jaw": good["jaw"][:-1]})
    with pytest.raises(SubjectError, match=r"'jaw' has shape \[4, 3\], expected \[5, 3\]"):
        load(bench)
    bad = {**good, "expression": good["expression"].copy()}
    bad["expression"][2, 0] = np.nan
    np.savez(npz, **bad)
    with pytest.raises(SubjectError, match=r"NaN/Inf in 'expression' at frame 2"):
        load(bench)
    np.savez(npz, **{k: (v if k in ("shape", "scale") else v[:-1]) for k, v in good.items()})
    with pytest.raises(SubjectError, match=r"EXP-2-eyes: frame counts differ \(images: 5, alpha_maps: 5, tracking: 4\)"):
        load(bench)


# ------------------------------------------------------------------- training + submission

def compose_tiny(bench: dict, run_dir: Path, data_dir: Path):
    overrides = [
        "experiment=nersemble_subject", f"data.root={bench['root']}", f"data.participant={fx.PARTICIPANT}",
        f"data.flame_model={bench['flame_model']}", f"data.train_sequences=[{','.join(fx.TRAIN)}]",
        f"data.test_sequences=[{','.join(fx.TEST)}]", "data.num_test=2", "data.num_workers=1",
        f"paths.data_dir={data_dir}", f"run_dir={run_dir}", "trainer.max_steps=2", "trainer.progress=false",
        "trainer.device=cpu", "eval.video=false", "eval.timing_repeats=1", "eval.lpips=false",
        "model.hierarchy.factors=[4,4]", "model.unet.filters=[4,4]", "model.unet.K=2", "model.unet.latent=4",
        "model.appearance.sh_degree=0", "model.neural_gaussians.hidden_dim=8", "model.enhancer.channels=[4,8]",
        "model.warmup.steps=2", "model.warmup.fit_steps=2", "model.warmup.log_every=1",
        "model.warmup.fit_sh_increase_every=1", "trainer.log_every=1", "trainer.ckpt_every=2",
        "trainer.image_every=2", "model.render.backend=torch"]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train", overrides=overrides)


def test_trains_evaluates_and_writes_the_submission_zip(bench, tmp_path):
    from headkit.engine.nersemble_submission import read_zipped_video, submission_settings, write_submission
    from headkit.engine.trainer import train

    cfg = compose_tiny(bench, tmp_path / "run", tmp_path / "data")
    assert cfg.data._target_.endswith("load_nersemble_mono") and cfg.model.expression_dim == 109
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["steps"] == 2 and saved["num_test_frames"] == 2 and np.isfinite(saved["psnr"])
    assert metrics["psnr"] == saved["psnr"]

    settings = submission_settings(run=str(tmp_path / "run"), device="cpu", resolution=[32, 32],
                                   out=str(tmp_path / "sub" / "submission.zip"))
    result = write_submission(settings)
    assert result["issues"] == {}
    tracked = {seq: len(np.load(bench["participant_dir"] / "sequences" / seq / "tracking" /
                                "flame2023_tracking_v2.npz")["expression"]) for seq in fx.TEST}
    expected = {f"393/{seq}/cam_{serial}.mp4": tracked[seq] for seq in fx.TEST
                for serial in (fx.TRAIN_SERIAL, *fx.HOLD_OUT)}
    assert result["entries"] == expected
    pattern = re.compile(r"(\d+)/([\w\d\-_+]+)/cam_(\w+)\.mp4")  # the toolkit reader's file pattern
    with zipfile.ZipFile(result["zip"]) as zf:
        names = sorted(i.filename for i in zf.infolist() if not i.is_dir())
        assert names == sorted(expected)  # nothing else in the zip (the toolkit flags extra files)
        for name in names:
            p, seq, serial = pattern.match(name).groups()
            assert (int(p), seq in fx.TEST, serial in (fx.TRAIN_SERIAL, *fx.HOLD_OUT)) == (393, True, True)
            frames = read_zipped_video(zf, name, tmp_path)
            assert frames.shape == (expected[name], 32, 32, 3)
    # the hold-out cameras see the avatar from elsewhere: their videos differ from the training camera's
    with zipfile.ZipFile(result["zip"]) as zf:
        a = read_zipped_video(zf, f"393/FREE/cam_{fx.TRAIN_SERIAL}.mp4", tmp_path)
        b = read_zipped_video(zf, f"393/FREE/cam_{fx.HOLD_OUT[0]}.mp4", tmp_path)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5
    # a missing held-out tracking file is named
    gone = bench["participant_dir"] / "sequences" / fx.TEST[1] / "tracking" / "flame2023_tracking_v2.npz"
    moved = gone.with_suffix(".bak")
    gone.rename(moved)
    try:
        with pytest.raises(SubjectError, match=r"EMO-1-shout\+laugh/tracking/flame2023_tracking_v2\.npz: FLAME tracking"):
            write_submission(settings)
    finally:
        moved.rename(gone)


def test_scripts_report_what_is_missing_in_one_line(bench, tmp_path):
    from tests.test_cli_errors import error_line, run_script

    proc = run_script("train.py", tmp_path, "experiment=nersemble_subject", f"data.root={bench['root']}",
                      "data.participant=393", f"data.flame_model={tmp_path / 'flame2023.pkl'}")
    error_line(proc, "flame2023.pkl: FLAME model file not found", "data.flame_model")
    proc = run_script("nersemble_submission.py", tmp_path, f"run={tmp_path / 'no_run'}")
    error_line(proc, "no_run", "does not exist")


def test_configs_compose():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        plain = compose("train", overrides=["data=nersemble_mono"])  # CPU-sized GraphAvatar on the benchmark
        submission = compose("nersemble_submission", overrides=[])
    assert plain.data._target_.endswith("load_nersemble_mono") and plain.data.serial == fx.TRAIN_SERIAL
    assert tuple(plain.data.test_sequences) == TEST_SEQUENCES and tuple(plain.data.train_sequences) == TRAIN_SEQUENCES
    assert len(TRAIN_SEQUENCES) == 18 and plain.data.split == "last"
    assert submission.task_name == "nersemble_submission" and list(submission.serials) == [fx.TRAIN_SERIAL, *fx.HOLD_OUT]
    assert list(submission.resolution) == [512, 512] and submission.fps == 24.3 and submission.crf == 14
