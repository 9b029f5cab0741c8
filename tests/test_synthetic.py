"""Tests of the synthetic subject generator and the contact sheet (tiny sizes, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from headkit.cameras import camtoworld_to_viewmat, intrinsics_from_fov, look_at, so3_log
from headkit.data.contact_sheet import contact_sheet, save_contact_sheet, subject_frames
from headkit.data.subject import SubjectError
from headkit.data.synthetic import (build_synthetic_head, expression_trajectories, generate_synthetic_subject,
                                    head_motion, render_head, shade_blinn_phong)
from headkit.data.synthetic_head import EYE_X, EYE_Y, MOUTH_Y
from headkit.data.synthetic_motion import burst_events, head_bursts, parse_bursts
from headkit.data.synthetic_texture import MATERIALS
from headkit.render.mesh_raster import rasterize_mesh

TINY = dict(num_frames=12, width=48, height=48, num_vertices_target=400, texture_resolution=64,
            background=(0.2, 0.4, 0.6))


@pytest.fixture(scope="module")
def subject():
    return generate_synthetic_subject(**TINY, seed=0)


@pytest.fixture(scope="module")
def head():
    return build_synthetic_head(num_vertices_target=400, expression_dim=10, texture_resolution=64, seed=0)


def frontal_camera(width: int, distance: float = 1.0, x: float = 0.0):
    c2w = look_at(torch.tensor([x, 0.0, distance]), torch.tensor([0.0, 0.0, 0.0]))[None]
    return c2w, intrinsics_from_fov(20.0, width, width)[None]


def test_shapes_dtypes_split_and_meta(subject):
    T, V = 12, subject.num_vertices
    assert subject.images.shape == (T, 48, 48, 3) and subject.images.dtype == np.uint8
    assert subject.masks.shape == (T, 48, 48) and subject.masks.dtype == np.uint8
    assert subject.vertices.shape == (T, V, 3) and subject.vertices.dtype == np.float32
    assert subject.faces.dtype == np.int64 and subject.faces.max() == V - 1
    assert subject.expressions.shape == (T, 10) and subject.head_poses.shape == (T, 4, 4)
    assert subject.uvs.min() >= 0 and subject.uvs.max() <= 1 and subject.uv_faces.shape == subject.faces.shape
    np.testing.assert_allclose(subject.times, np.linspace(0, 1, T), atol=1e-7)
    np.testing.assert_array_equal(subject.test_ids, [11])  # last 10 %, at least one
    np.testing.assert_array_equal(subject.train_ids, np.arange(11))
    assert subject.meta["blendshape_names"][:3] == ["jaw_open", "smile_left", "smile_right"]
    assert subject.meta["settings"]["num_vertices_target"] == 400
    assert subject.meta["settings"]["background"] == [0.2, 0.4, 0.6]
    for key in ("true_camtoworlds", "true_expressions", "true_vertices", "true_head_poses"):
        assert subject.extras[key].shape[0] == T
    subject.validate()
    # The tracked vertices are the posed blendshape model.
    head = build_synthetic_head(400, 10, 64, seed=0)
    ref = head.skin_vertices(torch.from_numpy(subject.expressions), torch.from_numpy(subject.head_poses))
    np.testing.assert_allclose(subject.vertices, ref.numpy(), atol=1e-6)


def test_skin_is_closed_outward_and_uv_seam_is_cut(subject):
    faces, V = subject.faces, subject.num_vertices
    pairs = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    assert (counts == 2).all()  # every edge has exactly two faces: closed, manifold
    assert V - len(counts) + len(faces) == 2  # a sphere
    v = subject.template_vertices.astype(np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    assert np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6 > 1e-3  # positive volume: outward
    u = subject.uvs[subject.uv_faces][..., 0]
    assert (u.max(1) - u.min(1)).max() < 0.5  # no triangle spans the seam in UV space


def test_determinism_and_seeds(subject):
    again = generate_synthetic_subject(**TINY, seed=0)
    assert again.images.tobytes() == subject.images.tobytes()
    assert again.masks.tobytes() == subject.masks.tobytes()
    np.testing.assert_array_equal(again.vertices, subject.vertices)
    other = generate_synthetic_subject(**TINY, seed=1)
    assert np.abs(other.expressions - subject.expressions).max() > 0.1
    assert np.abs(other.head_poses - subject.head_poses).max() > 0.01
    assert (other.images != subject.images).mean() > 0.05
    tex0 = build_synthetic_head(400, 10, 64, seed=0).textures[0]
    tex1 = build_synthetic_head(400, 10, 64, seed=1).textures[0]
    assert (tex0 - tex1).abs().mean() > 0.005


def test_masks_match_images_and_are_antialiased(subject):
    bg = np.round(np.array([0.2, 0.4, 0.6]) * 255).astype(np.uint8)
    for t in range(subject.num_frames):
        fg = subject.masks[t] > 0
        assert 0.1 < fg.mean() < 0.8  # a head, and some background
        outside = subject.images[t][~fg]
        np.testing.assert_array_equal(outside, np.broadcast_to(bg, outside.shape))
        assert (np.abs(subject.images[t][subject.masks[t] == 255].astype(int) - bg).sum(-1) > 0).mean() > 0.99
    soft = (subject.masks > 0) & (subject.masks < 255)
    assert soft.any() and soft.mean() < 0.05  # anti-aliased boundary pixels only
    hard = generate_synthetic_subject(**{**TINY, "num_frames": 2, "num_test": 1}, soft_masks=False)
    assert set(np.unique(hard.masks)) <= {0, 255}


def test_blendshapes_are_localised(head):
    V = head.num_skin_vertices
    rest = head.rest_vertices[:V].numpy()
    x, y, z = rest.T
    moves = {n: np.linalg.norm(head.blendshapes[i, :V].numpy(), axis=-1)
             for i, n in enumerate(head.blendshape_names)}
    assert len(head.blendshape_names) == 10
    jaw = moves["jaw_open"]
    chin = (y < MOUTH_Y - 0.01) & (y > -0.11) & (z > 0.05)
    assert chin.any() and jaw[chin].mean() > 0.01  # the chin drops by centimetres
    assert jaw[y > 0.0].max() == 0.0  # eyes, brows, forehead and skull stay put
    for name, sign in (("blink_left", 1.0), ("blink_right", -1.0)):
        moved = moves[name] > 1e-5
        assert moves[name].max() > 0.005
        assert (sign * x[moved] > 0.01).all()
        assert (np.abs(sign * x[moved] - EYE_X) < 0.03).all() and (np.abs(y[moved] - EYE_Y) < 0.03).all()
    assert moves["smile_left"][x < -0.02].max() < 1e-4 and moves["smile_right"][x > 0.02].max() < 1e-4
    assert moves["brow_raise"][y < -0.03].max() < 1e-4
    for name, field in moves.items():
        assert field[z < -0.02].max() < 1e-4, name  # nothing moves the back of the head


def test_jaw_open_reveals_mouth_interior(head):
    c2w, K = frontal_camera(64)
    exprs = torch.zeros(2, 10)
    exprs[1, 0] = 1.0
    out = render_head(head, exprs, torch.eye(4).expand(2, 4, 4), c2w.expand(2, 4, 4), K.expand(2, 3, 3),
                      64, 64, supersample=1, return_aux=True)
    inner = [MATERIALS.index("teeth"), MATERIALS.index("tongue")]
    shown = [np.isin(out["materials"][i].numpy(), inner).sum() for i in range(2)]
    assert shown[0] == 0 and shown[1] >= 8
    # The lip band opens into a dark cavity: the pixels 1 cm under the lip line get dark.
    row = int(K[0, 1, 2] + K[0, 1, 1] * (0.01 - MOUTH_Y) / (1.0 - 0.09))
    mouth = out["images"][:, row - 1:row + 2, 28:36].mean((1, 2, 3))
    assert mouth[0] > 0.3 and mouth[1] < 0.15


def test_shading_is_view_dependent():
    n = torch.tensor([[0.0, 0.0, 1.0]])
    one = torch.ones(1, 1)
    light = (((0.0, 0.0, 1.0), 0.5),)
    colour, spec = shade_blinn_phong(torch.full((1, 3), 0.4), one * 0.5, one * 10, one, n, n, light, 0.2, 1.0)
    # N = L = V: diffuse 0.4 (0.2 + 0.5), highlight 0.5 * 0.5 * 1^10.
    assert torch.allclose(colour, torch.full((1, 3), 0.4 * 0.7 + 0.25)) and torch.allclose(spec, one * 0.25)
    tilted = torch.tensor([[math.sin(0.5), 0.0, math.cos(0.5)]])
    colour2, spec2 = shade_blinn_phong(torch.full((1, 3), 0.4), one * 0.5, one * 10, one, n, tilted, light,
                                       0.2, 1.0)
    assert torch.allclose(colour2 - spec2, colour - spec)  # Lambert ignores the viewer
    assert torch.allclose(spec2, one * 0.25 * math.cos(0.25) ** 10)


def test_render_highlights_move_with_the_camera(head):
    views = [frontal_camera(64, x=x) for x in (-0.45, 0.45)]
    c2w = torch.cat([v[0] for v in views])
    K = torch.cat([v[1] for v in views])
    exprs, poses = torch.zeros(2, 10), torch.eye(4).expand(2, 4, 4)
    out = render_head(head, exprs, poses, c2w, K, 64, 64, supersample=1, return_aux=True)
    lam = render_head(head, exprs, poses, c2w, K, 64, 64, supersample=1, specular=0.0, return_aux=True)
    assert lam["speculars"].abs().max() == 0
    fids = out["face_ids"].numpy()
    spec, img = out["speculars"].numpy(), lam["images"].numpy().mean(-1)
    common = np.intersect1d(fids[0][fids[0] >= 0], fids[1][fids[1] >= 0])
    per_face = lambda a, i, f: a[i][fids[i] == f].mean()  # noqa: E731
    dspec = np.array([per_face(spec, 1, f) - per_face(spec, 0, f) for f in common])
    ddiff = np.array([per_face(img, 1, f) - per_face(img, 0, f) for f in common])
    assert len(common) > 50
    assert np.abs(dspec).max() > 0.1  # the same surface shines differently from each side
    assert np.median(np.abs(ddiff)) < 0.03  # while its diffuse shade barely changes


def test_tracking_noise(subject):
    for key in ("camtoworlds", "expressions", "vertices", "head_poses"):
        np.testing.assert_array_equal(getattr(subject, key), subject.extras[f"true_{key}"])
    noise = dict(pose_rot_deg=1.0, pose_trans=0.005, expression=0.05)
    noisy = generate_synthetic_subject(**TINY, seed=0, tracking_noise=noise)
    truth = noisy.extras
    rel = np.linalg.inv(truth["true_camtoworlds"].astype(np.float64)) @ noisy.camtoworlds
    angles = np.degrees(so3_log(torch.from_numpy(noisy.camtoworlds[:, :3, :3] @ np.swapaxes(
        truth["true_camtoworlds"][:, :3, :3], 1, 2))).norm(dim=-1).numpy())
    assert 0.3 < np.sqrt((angles ** 2).mean()) < 4.0  # about sqrt(3) degrees
    assert np.abs(rel[:, :3, 3]).max() > 1e-3
    d_expr = noisy.expressions - truth["true_expressions"]
    assert 0.02 < d_expr.std() < 0.1
    assert np.abs(noisy.vertices - truth["true_vertices"]).max() > 1e-4
    np.testing.assert_array_equal(noisy.head_poses, truth["true_head_poses"])
    np.testing.assert_array_equal(noisy.images, subject.images)  # rendered from the truth


def test_motion_is_defined_in_seconds():
    t30, t60 = np.arange(90) / 30.0, np.arange(180) / 60.0
    np.testing.assert_allclose(head_motion(t60, seed=3)[::2], head_motion(t30, seed=3), atol=1e-12)
    names = ["jaw_open", "blink_left", "blink_right", "brow_raise", "bump_10"]
    np.testing.assert_allclose(expression_trajectories(t60, names, 3)[::2],
                               expression_trajectories(t30, names, 3), atol=1e-12)
    # A longer clip only appends: the shared prefix (incl. random blink events) is unchanged.
    np.testing.assert_allclose(expression_trajectories(np.arange(300) / 30.0, names, 3)[:90],
                               expression_trajectories(t30, names, 3), atol=1e-12)
    rotations = torch.from_numpy(head_motion(np.arange(0, 60, 0.1), seed=3)[:, :3, :3])
    rot = np.degrees(np.abs(so3_log(rotations).numpy()))
    assert 10 < rot.max() < 35
    small = dict(width=16, height=16, num_vertices_target=300, texture_resolution=32)
    a = generate_synthetic_subject(num_frames=4, fps=30.0, num_test=1, **small)
    b = generate_synthetic_subject(num_frames=7, fps=60.0, num_test=1, **small)
    np.testing.assert_array_equal(b.images[::2], a.images)
    np.testing.assert_allclose(b.vertices[::2], a.vertices, atol=1e-6)


def test_default_motion_is_unchanged_by_the_burst_option():
    """No bursts (the default) keeps today's poses bit for bit and the default subject's cache name."""
    t = np.arange(300) / 30.0
    poses = head_motion(t, seed=0)
    # fingerprint of the poses before head_bursts existed (the same code path, seed 0)
    assert poses[:, :3, :].sum() == pytest.approx(861.5204992176716, rel=1e-13)
    assert poses[123, 0, 2] == pytest.approx(0.25848167234566033, rel=1e-13)
    for off in (None, 0, {"rate_hz": 0.0, "deg": 30.0}):
        np.testing.assert_array_equal(head_motion(t, 0, bursts=off), poses)
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from headkit.data.sources import synthetic_cache_dir
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        gen = OmegaConf.to_container(compose("train").data.generator)
    assert "head_bursts" not in gen and synthetic_cache_dir("x", gen).name == "synthetic-7d835959cd"


def test_bursts_have_the_requested_rate_and_size():
    rate, deg, mm, hold = 0.5, 12.0, 6.0, 0.8
    starts, holds, offsets = burst_events(seed=1, t_end=4000.0, rate_hz=rate, deg=deg, mm=mm, hold_s=hold)
    assert len(starts) == pytest.approx(rate * 4000, rel=0.06)  # Poisson: 2000 ± 45
    assert np.all(np.diff(starts) > 0) and np.diff(starts).mean() == pytest.approx(1 / rate, rel=0.06)
    assert holds.mean() == pytest.approx(hold, rel=0.08)
    rot, trans = np.degrees(np.linalg.norm(offsets[:, :3], axis=1)), 1e3 * np.linalg.norm(offsets[:, 3:], axis=1)
    for size, want in ((rot, deg), (trans, mm)):
        assert size.min() >= 0.5 * want - 1e-9 and size.max() <= 1.5 * want + 1e-9
        assert size.mean() == pytest.approx(want, rel=0.03)
    # roll (axis weight 0.5) moves less than yaw and pitch
    assert np.abs(offsets[:, 2]).mean() < 0.7 * np.abs(offsets[:, :2]).mean()
    # one isolated burst: out by its offset in duration_s, at peak speed 1.5 |a| / d, then back to 0
    t = np.arange(0, 3000, 0.01)
    b = head_bursts(t, seed=2, rate_hz=0.001, deg=deg, mm=mm, duration_s=0.4, hold_s=0.5)
    starts, holds, offsets = burst_events(2, t.max() + 1.0, 0.001, deg, mm, 0.5)
    t0, h0, a0 = starts[0], holds[0], offsets[0]
    np.testing.assert_allclose(b[np.searchsorted(t, t0 + 0.4 + h0 / 2)], a0, atol=1e-12)
    speed = np.linalg.norm(np.diff(b[:, :3], axis=0), axis=1) / 0.01
    win = (t[1:] > t0) & (t[1:] < t0 + 0.4)
    assert speed[win].max() == pytest.approx(1.5 * np.linalg.norm(a0[:3]) / 0.4, rel=1e-3)
    assert np.all(b[(t > t0 + 0.8 + h0) & (t < starts[1])] == 0)


def test_bursts_are_seeded_and_defined_in_seconds():
    cfg = {"rate_hz": 0.6, "deg": 10.0, "mm": 5.0}
    t30, t60 = np.arange(300) / 30.0, np.arange(600) / 60.0
    a = head_motion(t30, 4, bursts=cfg)
    np.testing.assert_array_equal(a, head_motion(t30, 4, bursts=cfg))
    np.testing.assert_allclose(head_motion(t60, 4, bursts=cfg)[::2], a, atol=1e-12)
    np.testing.assert_allclose(head_motion(np.arange(900) / 30.0, 4, bursts=cfg)[:300], a, atol=1e-12)
    assert np.abs(a - head_motion(t30, 4)).max() > 0.01
    assert np.abs(a - head_motion(t30, 5, bursts=cfg)).max() > 0.01
    with pytest.raises(ValueError, match="unknown key.*speed"):
        parse_bursts({"rate_hz": 1.0, "speed": 2.0})
    with pytest.raises(ValueError, match="head_bursts.duration_s"):
        generate_synthetic_subject(**TINY, head_bursts={"rate_hz": 1.0, "duration_s": 0.0})


#: the demo clip's head speed (benchmarks/motion_stats.md, data/demo_ict_128c): deg/s and mm/s p50/p90/p99
REAL_TALKING_SPEEDS = {"rot_deg_per_s": (9.1, 27.9, 74.4), "trans_mm_per_s": (17.2, 45.0, 66.9)}


def test_talking_preset_matches_the_real_clip_speeds(head):
    """experiment=neuralcache_talking: every deg/s and mm/s percentile within 25 % of the real clip's."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from headkit.motion_stats import speed_stats
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        gen = OmegaConf.to_container(compose("train", overrides=["experiment=neuralcache_talking"]).data.generator)
    assert gen["fps"] == 30 and gen["num_frames"] == 300
    poses = head_motion(np.arange(gen["num_frames"]) / gen["fps"], gen["seed"], gen["head_rotation_deg"],
                        gen["head_translation"], gen["head_bursts"])
    # the camera is fixed, so head-to-camera speeds equal head-to-world ones
    centre = head.rest_vertices[:head.num_skin_vertices].double().mean(0).numpy()
    stats = speed_stats(poses, gen["fps"], centre)
    for key, targets in REAL_TALKING_SPEEDS.items():
        for p, want in zip((50, 90, 99), targets):
            assert stats[f"{key}_p{p}"] == pytest.approx(want, rel=0.25), (key, p)


def test_untracked_geometry_shows_in_the_mask(subject):
    T, s = subject.num_frames, 2
    K = torch.from_numpy(subject.Ks).clone()
    K[:, :2] *= s
    raster = rasterize_mesh(torch.from_numpy(subject.vertices), torch.from_numpy(subject.faces),
                            camtoworld_to_viewmat(torch.from_numpy(subject.camtoworlds)), K, 96, 96)
    tracked = (raster.face_ids >= 0).float().view(T, 48, s, 48, s).mean((2, 4)).numpy()
    mask = subject.masks / 255.0
    assert (mask[tracked > 0] > 0).all()  # the skin is inside the foreground
    extra = (mask > 0.5) & (tracked == 0)  # hair volume, fringe, earrings
    assert extra.sum(axis=(1, 2)).min() >= 20
    bald = generate_synthetic_subject(**{**TINY, "num_frames": 2, "num_test": 1}, hair=False,
                                      accessories=False)
    assert bald.masks.astype(float).sum() < subject.masks[:2].astype(float).sum() * 0.97


def test_more_blendshapes_than_designed():
    head = build_synthetic_head(400, 14, 64, seed=0)
    assert head.blendshape_names[10:] == ["bump_10", "bump_11", "bump_12", "bump_13"]
    V = head.num_skin_vertices
    for k in range(10, 14):
        field = head.blendshapes[k, :V].norm(dim=-1)
        assert 0.001 < field.max() < 0.005 and (field > 1e-4).float().mean() < 0.3


def test_bad_settings_raise_named_errors():
    with pytest.raises(SubjectError, match="no train"):
        generate_synthetic_subject(**{**TINY, "num_test": 12})
    with pytest.raises(ValueError, match="unknown key.*pose_rot"):
        generate_synthetic_subject(**TINY, tracking_noise=dict(pose_rot=1.0))
    with pytest.raises(ValueError, match="tracking_noise.expression"):
        generate_synthetic_subject(**TINY, tracking_noise=dict(expression=-1.0))
    with pytest.raises(ValueError, match="num_frames"):
        generate_synthetic_subject(**{**TINY, "num_frames": 1})
    with pytest.raises(ValueError, match="expression_dim"):
        generate_synthetic_subject(**TINY, expression_dim=0)
    with pytest.raises(ValueError, match="background"):
        generate_synthetic_subject(**{**TINY, "background": (0, 0, 2)})


def test_contact_sheet(tmp_path):
    rng = np.random.default_rng(0)
    floats = rng.random((5, 6, 7, 3)).astype(np.float32)
    sheet = contact_sheet(floats, cols=3, pad=1)
    assert sheet.shape == (2 * 7 + 1, 3 * 8 + 1, 3) and sheet.dtype == np.uint8
    np.testing.assert_array_equal(sheet[1 + 7:1 + 7 + 6, 1 + 8:1 + 8 + 7], np.round(floats[4] * 255))
    assert (sheet[8:14, 17:24] == 255).all()  # the empty sixth cell
    masks = (rng.random((2, 6, 7)) > 0.5).astype(np.uint8) * 255
    grey = contact_sheet(masks, cols=2, pad=0)
    np.testing.assert_array_equal(grey[:, :7, 0], masks[0])
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    labelled = contact_sheet(np.zeros((2, 20, 40, 3), np.uint8), cols=2, labels=["a1", "b2"])
    assert labelled.shape[0] == 20 + 12 + 4 and (labelled[22:34] < 128).any()  # text was drawn
    path = tmp_path / "sub" / "sheet.png"
    written = save_contact_sheet(path, floats, cols=3)
    import imageio.v3 as iio
    np.testing.assert_array_equal(iio.imread(path), written)
    with pytest.raises(ValueError, match="labels"):
        contact_sheet(floats, labels=["x"])
    with pytest.raises(ValueError, match="shape"):
        contact_sheet(np.zeros((2, 3)))


def test_contact_sheet_of_a_subject(subject):
    images, labels = subject_frames(subject, num=5)
    assert len(images) == 5 and labels[-1] == "11*"  # the last frame is a test frame
    widest = int(np.argmax(subject.expressions[:, 0]))
    assert str(widest) in [label.rstrip("*") for label in labels]
    sheet = contact_sheet(subject, cols=8)
    assert sheet.shape == (2 * (48 + 2 + 12) + 2, 8 * (48 + 2) + 2, 3)
