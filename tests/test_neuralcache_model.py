"""Neural caching end to end: inputs, variants, training, execution modes, evaluation tables."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from headkit.cameras import so3_exp, so3_log
from headkit.data.dataset import FrameDataset
from headkit.data.synthetic import generate_synthetic_subject
from headkit.engine.trainer import train
from headkit.plot import line_plot_svg, nice_ticks
from neuralcache.evaluate import EXTRA_ROWS, TABLE1_COLUMNS, Stream, build_stream, generator_rows, naive_row, score
from neuralcache.inputs import FrameEncoder, delayed_gaussian_filter, render_uv_maps, spherical_uvs, warp_images
from neuralcache.model import VARIANTS, WARPS, ExplicitWarpKind, ImplicitWarpKind, NeuralCache, build_warp
from neuralcache.scheduler import ParallelRenderer, SequentialRenderer, plan_frame
from neuralcache.warp import ExplicitWarp, ImplicitWarp
from tests.conftest import load_repo_module, make_tiny_subject

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
SMALL = dict(texture={"resolution": 32, "num_levels": 2}, generator={"channels": [12, 16, 16]},
             warp={"mlp_dim": 4}, explicit_warp={"hidden_channels": 8, "mlp_dim": 4})
SYNTH = dict(num_frames=14, width=32, height=32, num_test=4, num_vertices_target=300, texture_resolution=64,
             supersample=1, hair=False, accessories=False)


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


@pytest.fixture(scope="module")
def subject():
    return generate_synthetic_subject(**SYNTH)


def _model(subject, variant="ours", **kw):
    torch.manual_seed(0)
    return NeuralCache(subject, variant=variant, **{**SMALL, **kw})


# ---------------------------------------------------------------- inputs
def _ray_triangle_uv(origin, direction, tri, tri_uv):
    """Möller-Trumbore intersection; returns (t, uv) or None."""
    e1, e2 = tri[1] - tri[0], tri[2] - tri[0]
    p = np.cross(direction, e2)
    det = e1 @ p
    if abs(det) < 1e-12:
        return None
    s = origin - tri[0]
    u = (s @ p) / det
    q = np.cross(s, e1)
    v = (direction @ q) / det
    t = (e2 @ q) / det
    if u < -1e-9 or v < -1e-9 or u + v > 1 + 1e-9 or t <= 0:
        return None
    return t, (1 - u - v) * tri_uv[0] + u * tri_uv[1] + v * tri_uv[2]


def test_uv_maps_match_a_hand_ray_cast():
    s = make_tiny_subject(num_frames=3, num_test=1, width=16, height=12)
    verts = torch.from_numpy(s.vertices[:1])
    viewmat = torch.linalg.inv(torch.from_numpy(s.camtoworlds[:1]))
    K = torch.from_numpy(s.Ks[:1])
    uvs, uv_faces = torch.from_numpy(s.uvs), torch.from_numpy(s.uv_faces)
    maps, masks = render_uv_maps(verts, torch.from_numpy(s.faces), uvs, uv_faces, viewmat, K, 16, 12)
    assert maps.shape == (1, 12, 16, 2) and masks.shape == (1, 12, 16)
    cam = np.linalg.inv(viewmat[0].double().numpy())
    Kd = K[0].double().numpy()
    world = verts[0].double().numpy()
    checked = 0
    for i, j in [(6, 8), (5, 7), (7, 9), (4, 10), (0, 0), (11, 15)]:
        d_cam = np.linalg.solve(Kd, [j + 0.5, i + 0.5, 1.0])
        origin, direction = cam[:3, 3], cam[:3, :3] @ d_cam
        hits = [h for f in range(len(s.faces)) if (h := _ray_triangle_uv(
            origin, direction, world[s.faces[f]], s.uvs[s.uv_faces[f]].astype(np.float64))) is not None]
        if not hits:
            assert masks[0, i, j] == 0 and maps[0, i, j].abs().max() == 0
            continue
        checked += 1
        assert masks[0, i, j] == 1
        np.testing.assert_allclose(maps[0, i, j].numpy(), min(hits, key=lambda h: h[0])[1], atol=1e-4)
    assert checked >= 3


def test_spherical_fallback_uvs_and_encoder_uses_them():
    verts = torch.from_numpy(make_tiny_subject().template_vertices)
    faces = torch.from_numpy(make_tiny_subject().faces)
    uvs, uv_faces = spherical_uvs(verts, faces)
    assert uvs.min() >= 0 and uvs.max() <= 1
    np.testing.assert_allclose(uvs[4].numpy(), [0.5, 0.5], atol=1e-6)  # +z (the face) -> centre
    np.testing.assert_allclose(uvs[2, 1].item(), 1.0, atol=1e-6)  # +y (top) -> v = 1
    spans = uvs[uv_faces][..., 0]
    assert (spans.amax(1) - spans.amin(1)).max() <= 0.5  # no face interpolates across the seam
    enc = FrameEncoder(make_tiny_subject(with_uvs=False))
    assert enc.uv_how.startswith("spherical")
    broken = make_tiny_subject()
    broken.uvs[0, 0] = 1.5
    with pytest.raises(ValueError, match="template uvs must be finite and in"):
        FrameEncoder(broken)


def test_delayed_gaussian_filter_is_causal_size_5():
    T = 20
    x = torch.zeros(T, 1, dtype=torch.float64)
    x[8] = 1.0
    y = delayed_gaussian_filter(x, size=5, sigma=1.0)[:, 0]
    assert torch.equal(torch.nonzero(y).flatten(), torch.arange(8, 13))  # only t0 .. t0+4
    assert int(y.argmax()) == 10  # the centre tap lands 2 frames late
    w = torch.exp(-0.5 * torch.arange(-2.0, 3.0, dtype=torch.float64) ** 2)
    torch.testing.assert_close(y[8:13], w / w.sum())
    ramp = torch.arange(T, dtype=torch.float64)[:, None]
    torch.testing.assert_close(delayed_gaussian_filter(ramp)[4:], ramp[4:] - 2)  # pure 2-frame delay
    future = ramp.clone()
    future[12:] += 5
    torch.testing.assert_close(delayed_gaussian_filter(future)[:12], delayed_gaussian_filter(ramp)[:12])


def test_recentring_is_an_exact_pixel_shift_of_uv_maps_and_targets(subject):
    enc = FrameEncoder(subject, stabilize={"recentre": True})
    batch = FrameDataset(subject, "all").batch([3])
    batch["head_pose"] = torch.from_numpy(subject.head_poses[3:4])
    centres_cam, S = enc.camera_transforms(batch)
    assert torch.equal(S[0, :2, :2], torch.eye(2)) and torch.equal(S[0, :2, 2], S[0, :2, 2].round())
    proj = (S[0] @ batch["K"][0] @ (centres_cam[0] / centres_cam[0, 2]))[:2]
    assert (proj - 16).abs().max() <= 0.5
    S = S.clone()
    S[0, 0, 2], S[0, 1, 2] = 2.0, -1.0  # a visible shift, same exactness argument
    moved, _ = render_uv_maps(batch["vertices"], enc.faces, enc.uvs, enc.uv_faces, batch["viewmat"],
                              S @ batch["K"], 32, 32)
    plain, _ = render_uv_maps(batch["vertices"], enc.faces, enc.uvs, enc.uv_faces, batch["viewmat"], batch["K"], 32, 32)
    torch.testing.assert_close(warp_images(plain, S)[0, 2:-2, 3:-3], moved[0, 2:-2, 3:-3], atol=1e-5, rtol=0)
    shifted = warp_images(batch["image"], S, torch.ones(3))
    assert torch.equal(shifted[0, :-1, 2:], batch["image"][0, 1:, :-2])  # exact, no blur
    assert torch.equal(shifted[0, -1], torch.ones(32, 3))  # uncovered pixels take the background


def test_pose_is_zero_for_a_frontal_head_and_tracks_yaw(subject):
    enc = FrameEncoder(subject)
    batch = FrameDataset(subject, "all").batch([0, 1])
    yaw = torch.tensor([0.0, 0.3])
    R = so3_exp(torch.stack([torch.zeros(2), yaw, torch.zeros(2)], -1))
    batch["head_pose"] = torch.eye(4).repeat(2, 1, 1)
    batch["head_pose"][:, :3, :3] = R
    batch["viewmat"][:, :3, :3] = torch.tensor([[1.0, 0, 0], [0, -1, 0], [0, 0, -1]])  # frontal camera
    batch["viewmat"][:, :3, 3] = torch.tensor([0.0, 0.0, 1.0])
    inputs = enc(batch)
    torch.testing.assert_close(inputs.params.poses[0], torch.zeros(3), atol=1e-6, rtol=0)
    assert inputs.params.poses[1].norm().item() == pytest.approx(0.3, abs=1e-5)
    # p: the camera (world origin + 1 along +z) seen from the head centre, frontal axes
    torch.testing.assert_close(inputs.params.cam_positions[0], torch.tensor([0.0, 0.0, 1.0]) - enc.centroid,
                               atol=1e-5, rtol=0)
    assert inputs.view_dirs[0, 2] > 0.99  # the camera is in front of the face (+z of the head)
    assert inputs.params.pose_shs.shape == (2, 9)


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_trains_with_gradients_everywhere(subject, variant):
    model = _model(subject, variant, warp_distance=2)
    optimizer, _ = model.configure_optimizers()
    train_set = FrameDataset(subject, "train")
    for step in range(2):
        batch = model.sample_train_batch(train_set, step, 2, "cpu")
        if model.warp is not None:
            assert torch.equal(batch["index"] - batch["prev_index"], batch["warp_distance"])
        elif variant == "dnr_plus_plus":
            assert torch.equal(batch["index"] - batch["prev_index"], torch.ones(2, dtype=torch.int64))
        losses = model.get_loss_dict(model.get_outputs(batch), batch, step)
        total = torch.stack(list(losses.values())).sum()
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        groups = {"texture": model.texture, "generator": model.generator}
        if model.warp is not None:
            groups["warp"] = model.warp
            assert set(losses) >= {"texture", "image", "image_current"}
        for name, module in groups.items():
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            assert grads and sum(g.abs().sum() for g in grads) > 0, f"{variant}: no gradient reaches {name}"
            assert all(torch.isfinite(g).all() for g in grads)
        optimizer.step()


def test_warp_output_shape_and_it_uses_the_deltas(subject):
    model = _model(subject).eval()
    data = FrameDataset(subject, "all")
    with torch.no_grad():
        src, new = model.encoder(model.frame_batch(data, [2], "cpu")), model.encoder(model.frame_batch(data, [3], "cpu"))
        _, cache = model.make_cache(src)
        out = model.warp_frame(cache, new)
        assert out.shape == (1, 32, 32, 3)
        for field in ("poses", "cam_positions", "expressions", "pose_shs"):
            changed = model.encoder(model.frame_batch(data, [3], "cpu"))
            setattr(changed.params, field, getattr(changed.params, field) + 0.5)
            assert not torch.allclose(model.warp_frame(cache, changed), out), f"W ignores Δ{field}"
        moved = model.encoder(model.frame_batch(data, [3], "cpu"))
        moved.params.uvs = torch.roll(moved.params.uvs, 3, dims=2)
        assert not torch.allclose(model.warp_frame(cache, moved), out), "W ignores ΔU"


def test_residual_warp_starts_as_the_naive_baseline_and_trains(subject):
    model = _model(subject, warp={"mlp_dim": 4, "residual_image": True})
    data = FrameDataset(subject, "all")
    model.eval()
    with torch.no_grad():
        src, new = model.encoder(model.frame_batch(data, [2], "cpu")), model.encoder(model.frame_batch(data, [3], "cpu"))
        generated, cache = model.make_cache(src)
        torch.testing.assert_close(cache.images, generated["images"])  # the cache carries G's image
        torch.testing.assert_close(model.warp_frame(cache, new), generated["images"].clamp(1e-4, 1 - 1e-4))
    model.train()
    optimizer, _ = model.configure_optimizers()
    batch = model.sample_train_batch(FrameDataset(subject, "train"), 0, 2, "cpu")
    losses = model.get_loss_dict(model.get_outputs(batch), batch, 0)
    optimizer.zero_grad()
    torch.stack(list(losses.values())).sum().backward()
    assert model.warp.w2[1].weight.grad.abs().sum() > 0  # the zero-initialised residual layer learns
    optimizer.step()
    with torch.no_grad():
        model.eval()
        assert not torch.allclose(model.warp_frame(cache, new), generated["images"].clamp(1e-4, 1 - 1e-4))


def test_warp_inputs_are_standardised_with_training_statistics(subject):
    model = _model(subject)
    stats = model.encoder.conditioning_statistics(subject)
    expr = subject.expressions[subject.train_ids].astype(np.float64)
    np.testing.assert_allclose(stats["expressions"][0].numpy(), expr.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["expressions"][2].numpy(), np.sqrt((np.diff(expr, axis=0) ** 2).mean(0)),
                               rtol=1e-5, atol=1e-6)
    cond = model.warp.cond
    torch.testing.assert_close(cond.delta_rms_pose_shs, stats["pose_shs"][2].clamp_min(1e-4))
    assert (cond.delta_rms_poses < cond.std_poses).all()  # consecutive deltas are small
    plain = _model(subject, standardize_warp_inputs=False).warp.cond
    assert torch.equal(plain.std_poses, torch.ones(3)) and torch.equal(plain.delta_rms_expressions, torch.ones(10))
    assert "warp.cond.delta_rms_poses" in model.state_dict()  # stored with the checkpoint


def test_appended_skip_modulation_keeps_the_skips_whole(subject):
    replace = _model(subject, warp={"mlp_dim": 4}).warp
    append = _model(subject, warp={"mlp_dim": 4, "skip_modulation": "append"}).warp
    assert append.w1[0].in_channels == replace.w1[0].in_channels + 9
    assert append.w2[1].in_channels == replace.w2[1].in_channels + 9
    feats, dhs = torch.randn(2, 16, 4, 4), torch.zeros(2, 9)
    out = append._modulate(feats, dhs)  # no pose change: the skip passes whole, the extra part is 0
    assert torch.equal(out[:, :16], feats) and out[:, 16:].abs().max() == 0
    assert replace._modulate(feats, dhs)[:, :9].abs().max() == 0


# ---------------------------------------------------------------- execution modes
def test_two_workers_equal_sequential_and_algorithm1_uses_the_planned_caches(subject):
    model = _model(subject, warp_distance=2).eval()
    frames, _, _ = build_stream(model, FrameDataset(subject, "test"), warmup=4)
    seq = [o for _, o in SequentialRenderer("cpu", model.make_worker, warp_distance=2).run(frames)]
    with ParallelRenderer(["cpu", "cpu"], model.make_worker, warp_distance=2) as r:
        par = list(r.run(frames))
    assert [t for t, _ in par] == list(range(len(frames)))
    assert all(torch.equal(o, seq[t]) for t, o in par)
    with ParallelRenderer(["cpu", "cpu"], model.make_worker, warp_distance=2, schedule="algorithm1") as r:
        online = [o for _, o in r.run(frames)]
    with torch.no_grad():
        for t in range(2, len(frames)):  # group j = t // 2 is warped from the cache of frame 2 (j - 1)
            _, cache = model.make_cache(frames[2 * (t // 2 - 1)]["inputs"])
            assert plan_frame(t, 2, 2, "algorithm1")[-1].op == "warp"
            torch.testing.assert_close(online[t], model.warp_frame(cache, frames[t]["inputs"]), atol=1e-6, rtol=0)


def test_naive_row_shows_the_previous_frames_image_and_table_keys(subject, tmp_path):
    model = _model(subject, "dnr_plus").eval()
    test = FrameDataset(subject, "test")
    metrics = model.evaluate(test, tmp_path, timing_repeats=2, stream_repeats=1, save_video=False, show_progress=False)
    rows = {r["model"]: r for r in metrics["tables"]["table1"]["rows"]}
    frames, scored, targets = build_stream(model, test, warmup=3)
    outs = [o for _, o in SequentialRenderer("cpu", model.make_worker, warp_distance=0).run(frames)]
    assert rows["DNR+ (naive)"]["psnr"] == pytest.approx(score([outs[p - 1] for p in scored], targets)["psnr"], abs=1e-5)
    assert rows["DNR+"]["psnr"] == pytest.approx(score([outs[p] for p in scored], targets)["psnr"], abs=1e-5)
    assert rows["DNR+ (naive)"]["psnr"] != rows["DNR+"]["psnr"]
    assert metrics["psnr"] == pytest.approx(rows["DNR+"]["psnr"])
    assert len(list((tmp_path / "test_renders").glob("*.png"))) == len(test)


def test_ours_table_rows_online_rows_and_warp_distance_plot(subject, tmp_path):
    model = _model(subject, warp_distance=1)
    metrics = model.evaluate(FrameDataset(subject, "test"), tmp_path, timing_repeats=2, stream_repeats=1,
                             save_video=False, save_images=False, show_progress=False)
    rows = metrics["tables"]["table1"]["rows"]
    assert [(r["model"], r["workers"]) for r in rows] == [
        ("Ours (1x warp)", 1), ("Ours (1x warp)", 2), ("Ours (2x warp)", 1), ("Ours (2x warp)", 2)]
    for row in rows:
        assert set(TABLE1_COLUMNS) <= set(row)
        assert all(math.isfinite(row[k]) for k in ("l1", "psnr", "ssim", "latency_ms", "fps"))
    # reference: every test frame warped by hand from the cache of the frame before it, scored by hand
    test = FrameDataset(subject, "test")
    frames, scored, targets = build_stream(model.eval(), test, warmup=4)  # evaluation's: max(2 * 2 - 1, 4 distances)
    with torch.no_grad():
        preds = [model.warp_frame(model.make_cache(frames[p - 1]["inputs"])[1], frames[p]["inputs"]).clamp(0, 1)
                 for p in scored]
    mses = [((a.double() - b.double()) ** 2).mean().item() for a, b in zip(preds, targets)]
    reference = {"psnr": float(np.mean([10 * np.log10(1 / m) for m in mses])), "l2": float(np.mean(mses)),
                 "l1": float(np.mean([(a.double() - b.double()).abs().mean().item() for a, b in zip(preds, targets)]))}
    for key, value in reference.items():
        assert rows[0][key] == pytest.approx(value, rel=1e-4), key
    assert rows[0]["psnr"] == rows[1]["psnr"]  # 1x warp: both schedules warp from frame t - 1
    assert [r["distance"] for r in metrics["tables"]["warp_distance"]["rows"]] == [1, 2, 3, 4]
    assert metrics["tables"]["warp_distance"]["rows"][0]["psnr"] == pytest.approx(rows[0]["psnr"], abs=1e-5)
    assert [r["rate"] for r in metrics["tables"]["online"]["rows"]] == ["15 fps", "30 fps"]
    assert metrics["flops_warp"] < metrics["flops_generator"] and metrics["latency_warp_ms"] > 0
    assert "PSNR vs warp distance" in (tmp_path / "warp_distance.svg").read_text()
    (ablation,) = metrics["tables"]["warp_ablation"]["rows"]  # Tables 3-4: the full model's row
    assert [ablation[k] for k in ("concat_uv", "use_pose", "use_camera", "use_mlp", "sh_pose", "sh_skips",
                                  "tex_sample", "exp", "cached")] == ["x"] * 6 + ["", "x", "C3,4,5"]
    for key, value in reference.items():  # the scores of the 1x warp, as computed by hand above
        assert ablation[key] == pytest.approx(value, rel=1e-4), key
    assert ablation["order"] == 7 * 10 + 3  # seven inputs ticked, three cached layers
    assert ablation["rel_latency"] == pytest.approx(metrics["latency_warp_ms"] / metrics["latency_generator_ms"])
    json.dumps(metrics)  # metrics.json-ready


def test_warp_ablation_row_ticks_the_switches():
    from neuralcache.evaluate import warp_ablation_row
    from neuralcache.warp import ImplicitWarp
    warp = ImplicitWarp(feature_channels=(16, 16, 12), expr_dim=5, use_uv=False, use_mlp=False,
                        modulate_skips=False, cached_layers=(3, 4))
    row = warp_ablation_row(warp, {"psnr": 25.0}, {"warp": 2.0, "generator": 8.0})
    assert [row[k] for k in ("concat_uv", "use_pose", "use_camera", "use_mlp", "sh_pose", "sh_skips", "tex_sample",
                             "exp")] == ["", "x", "x", "", "x", "", "", "x"]
    assert row["cached"] == "C3,4" and row["rel_latency"] == 0.25 and row["psnr"] == 25.0
    assert row["latency_ms"] == 2.0 and row["order"] == 4 * 10 + 2  # rows sort by inputs used, then layers
    # the ticks follow what the warp really reads: an input switched off leaves W's output unchanged
    subject = generate_synthetic_subject(**SYNTH)
    full = _model(subject).eval()
    data = FrameDataset(subject, "all")
    for switch, field in (("use_pose", "poses"), ("use_camera", "cam_positions"), ("use_expression", "expressions")):
        model = _model(subject, warp={"mlp_dim": 4, switch: False}).eval()
        ticked = warp_ablation_row(model.warp, {}, {"warp": 1.0, "generator": 1.0})
        assert ticked[{"use_pose": "use_pose", "use_camera": "use_camera", "use_expression": "exp"}[switch]] == ""
        with torch.no_grad():
            _, cache = model.make_cache(model.encoder(model.frame_batch(data, [2], "cpu")))
            new, changed = (model.encoder(model.frame_batch(data, [3], "cpu")) for _ in range(2))
            setattr(changed.params, field, getattr(changed.params, field) + 0.5)
            assert torch.equal(model.warp_frame(cache, changed), model.warp_frame(cache, new)), switch
    assert warp_ablation_row(full.warp, {}, {"warp": 1.0, "generator": 1.0})["use_pose"] == "x"


def test_config_errors_name_the_key(subject):
    with pytest.raises(ValueError, match="model.variant"):
        NeuralCache(subject, variant="dnr_pluss")
    with pytest.raises(ValueError, match="model.generator.chanels"):
        NeuralCache(subject, generator={"chanels": [8, 8, 8]})
    with pytest.raises(ValueError, match="model.warp: .*use_uvs"):
        NeuralCache(subject, **{**SMALL, "warp": {"use_uvs": False}})
    with pytest.raises(ValueError, match="model.optim.lr"):
        NeuralCache(subject, **SMALL, optim={"lr": -1.0})
    model = _model(subject)
    batch = FrameDataset(subject, "all").batch([0])
    batch["vertices"] = batch["vertices"][:, :-1]
    with pytest.raises(ValueError, match=r"frame\(s\) \[0\].*vertices"):
        model.encoder.uv_maps(batch)


def test_line_plot_svg_holds_the_data(tmp_path):
    assert nice_ticks(0.0, 1.0) == [0.0, 0.5, 1.0]  # steps of 1, 2 or 5 x 10^n covering the range
    assert nice_ticks(23.9, 27.06) == [23.0, 24.0, 25.0, 26.0, 27.0, 28.0]
    path = line_plot_svg(tmp_path / "p.svg", [1, 2, 3], {"PSNR": [30.5, 29.25, 28.0]}, title="t")
    text = path.read_text()
    assert text.startswith("<svg") and "30.5" in text and "29.25" in text and text.count("<circle") == 3


def test_composed_experiment_trains_end_to_end(tmp_path):
    overrides = ["experiment=neuralcache_synthetic", f"paths.data_dir={tmp_path / 'data'}",
                 f"run_dir={tmp_path / 'run'}", "trainer.max_steps=3", "trainer.progress=false",
                 "eval.video=false", "eval.timing_repeats=2", "model.generator.channels=[12,16,16,16,16]",
                 "model.texture.resolution=32", "model.texture.num_levels=2",
                 "model.evaluation.stream_repeats=1", "model.evaluation.ablation_distances=[1,2]",
                 f"eval.lpips_weights={tmp_path / 'no_alexnet.pth'}"]
    overrides += [f"data.generator.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in SYNTH.items()]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.model._target_ == "neuralcache.model.NeuralCache"
    with open_dict(cfg):
        cfg.trainer.ckpt_every = 3
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("psnr", "ssim", "l2", "l1", "lpips", "time_per_frame_ms", "fps", "model_size_mb", "tables",
                "flops_generator", "flops_warp", "latency_warp_ms", "warp_to_generator_latency"):
        assert key in saved, key
    assert saved["config_name"] == "neuralcache_synthetic" and saved["steps"] == 3
    primary = saved["tables"]["table1"]["rows"][0]  # the model's own mode: 1x warp, one worker
    assert [saved[k] for k in ("psnr", "ssim", "l1")] == [primary[k] for k in ("psnr", "ssim", "l1")]
    assert saved["warp_to_generator_latency"] == pytest.approx(saved["latency_warp_ms"] / saved["latency_generator_ms"])
    assert saved["fps"] == primary["fps"] and saved["time_per_frame_ms"] == saved["latency_warp_ms"]
    assert saved["lpips"] is None and "no_alexnet.pth" in saved["lpips_unavailable_reason"]  # null with why, never 0
    assert metrics["tables"]["table1"]["rows"][0]["model"] == "Ours (1x warp)"
    assert (tmp_path / "run" / "checkpoints").is_dir()
    # the finished run feeds the render script and the warp diagnosis through headkit.engine.runs.load_run
    from headkit.engine.runs import load_run
    run = load_run(tmp_path / "run", device="cpu")
    assert run.step == 3 and not run.model.training and run.checkpoint.parent.name == "checkpoints"
    import subprocess
    import sys
    script = Path(__file__).resolve().parents[1] / "scripts" / "render.py"
    proc = subprocess.run([sys.executable, str(script), f"run={tmp_path / 'run'}", "novel_views=3", "device=cpu",
                           f"out={tmp_path / 'r'}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "novel_views: 3 frames" in proc.stdout and (tmp_path / "r" / "novel_views.mp4").is_file()
    diagnosis = load_repo_module("benchmarks/nc_warp_diagnosis.py")
    rows = diagnosis.diagnose(tmp_path / "run", num_frames=3)
    assert set(rows) == {"test", "train"}
    # references: G's PSNR on the first three test frames by hand, and the data-only "target prev"
    test = FrameDataset(run.subject, "test")
    hand = lambda a, b: 10 * math.log10(1 / ((a.clamp(0, 1).double() - b.double()) ** 2).mean().item())  # noqa: E731
    with torch.no_grad():
        g = [hand(run.model.generate(run.model.encoder(run.model.frame_batch(test, [i], "cpu")))["images"],
                  test.batch([i])["image"]) for i in range(3)]
    assert rows["test"]["G"] == pytest.approx(np.mean(g), rel=1e-5)
    images = torch.from_numpy(run.subject.images[test.frame_ids[:3]]).float() / 255
    assert rows["test"]["target prev"] == pytest.approx(np.mean([hand(images[i - 1], images[i]) for i in (1, 2)]),
                                                        rel=1e-5)
    assert rows["test"]["W1"] != rows["test"]["W0"]  # warping one frame ahead is not the cached frame itself
    # --images: target | G | W1 | naive | two error maps per row, one row per chosen test frame
    from PIL import Image
    info = diagnosis.comparison_image(tmp_path / "run", tmp_path / "w1.png", [1, 2, 1])
    assert [r["frame"] for r in info] == [int(test.frame_ids[i]) for i in (1, 2, 1)]
    assert Image.open(tmp_path / "w1.png").size[0] == 6 * run.subject.width
    assert np.mean([r["naive"] for r in info[:2]]) == pytest.approx(rows["test"]["naive"], rel=1e-4)
    assert np.mean([r["W1"] for r in info[:2]]) == pytest.approx(rows["test"]["W1"], rel=1e-4)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(bare)
    (bare / "config.yaml").write_text((tmp_path / "run" / "config.yaml").read_text())
    with pytest.raises(FileNotFoundError, match="bare/checkpoints: no valid checkpoint"):
        load_run(bare)


def _script(name: str):
    return load_repo_module(f"scripts/{name}.py")


def test_retargeting_and_novel_views_render_videos(subject, tmp_path):
    from headkit.engine import videos as render
    source = generate_synthetic_subject(**{**SYNTH, "seed": 1})
    model = _model(subject, warp_distance=2).eval()
    frames = list(render.retarget_frames(subject, source, max_frames=5))
    assert len(frames) == 5
    # Same template and identity here, so transferring the source's deformation and head pose
    # reproduces the source's own tracked mesh.
    torch.testing.assert_close(frames[3][0]["vertices"][0], torch.from_numpy(source.vertices[3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(frames[3][0]["expression"][0], torch.from_numpy(source.expressions[3]))
    views = list(render.novel_view_frames(subject, num_frames=4, max_yaw_deg=20.0))
    turned = views[1][0]  # yaw = +20° at the quarter period
    rel = torch.linalg.inv(torch.from_numpy(subject.head_poses[int(subject.test_ids[1])])) @ turned["head_pose"][0]
    assert math.degrees(torch.linalg.norm(so3_log(rel[:3, :3])).item()) == pytest.approx(20.0, abs=1e-3)
    path, n = render.render_video(model, iter(frames), tmp_path / "retarget.mp4", fps=30)
    assert n == 5 and path == tmp_path / "retarget.mp4"  # imageio-ffmpeg is a dependency: a video, never None
    import imageio.v2 as imageio
    with imageio.get_reader(path) as reader:
        decoded = np.stack([frame for frame in reader])
    with torch.no_grad():  # rendering | reference, as render_video lays them out
        expected = np.stack([np.concatenate([render.to_uint8(img[0].clamp(0, 1).numpy()), ref], axis=1)
                             for img, (_, ref) in zip(model.render_sequence(b for b, _ in frames), frames)])
    assert decoded.shape == expected.shape == (5, 32, 64, 3)
    assert np.abs(decoded.astype(float) - expected).mean() < 6  # H.264 at quality 8: a few levels off
    with pytest.raises(Exception, match="same mesh topology"):
        next(render.retarget_frames(subject, generate_synthetic_subject(**{**SYNTH, "num_vertices_target": 200})))


def test_table_script_merges_runs_in_paper_order(tmp_path):
    table = _script("neuralcache_table")
    for i, rows in enumerate([[{"model": "Ours (1x warp)", "workers": 1, "psnr": 26.5, "order": 511}],
                              [{"model": "DNR+", "workers": 1, "psnr": 26.9, "order": 150},
                               {"model": "DNR+ (naive)", "workers": 1, "psnr": 25.0, "order": 140}]]):
        run = tmp_path / str(i)
        run.mkdir()
        (run / "config.yaml").write_text("{}\n")
        (run / "metrics.json").write_text(json.dumps({"tables": {"table1": {
            "title": "Table 1", "columns": ["model", "workers", "psnr"], "rows": rows}}}))
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "config.yaml").write_text("{}\n")  # an unfinished run
    tables, unfinished = table.gather([tmp_path])
    assert [r["model"] for r in tables["table1"]["rows"]] == ["DNR+ (naive)", "DNR+", "Ours (1x warp)"]
    assert unfinished == [str(tmp_path / "2")]
    assert table.main([str(tmp_path)]) == 0
    assert "| DNR+ (naive) | 1 | 25.00 |" in (tmp_path / "neuralcache_tables.md").read_text()


def test_warp_delta_uv_scale_is_inverse_rms_of_consecutive_training_frames(subject):
    model = _model(subject, cache_uv_maps=False)
    train = FrameDataset(subject, "train")
    ids = train.frame_ids
    pairs = [i for i in range(len(ids) - 1) if ids[i + 1] - ids[i] == 1]
    sq, n = torch.zeros(2, dtype=torch.float64), 0
    for i in pairs:  # every pair: the fixture has fewer than max_pairs
        b = train.batch([i, i + 1], "cpu")
        b["head_pose"] = model.track(subject)["head_pose"][torch.as_tensor(ids[[i, i + 1]])]
        b["head_centre"] = model.track(subject)["head_centre"][torch.as_tensor(ids[[i, i + 1]])]
        uvs, masks = model.encoder.uv_maps(b)
        both = masks[0].bool() & masks[1].bool()
        d = (uvs[1] - uvs[0])[both].double()
        sq, n = sq + d.square().sum(0), n + d.shape[0]
    expected = 1.0 / (sq / n).sqrt().float()
    torch.testing.assert_close(model.warp.cond.uv_delta_scale, expected, rtol=1e-4, atol=0)
    assert (expected > 10).all()  # UVs move by a small fraction of their range per frame
    raw = _model(subject, standardize_warp_inputs=False)
    assert torch.equal(raw.warp.cond.uv_delta_scale, torch.ones(2))


def test_warp_with_texture_sample_of_the_new_frame_trains_and_uses_it(subject):
    model = _model(subject, warp={"mlp_dim": 4, "use_texture": True})
    assert model.warp.w1[0].in_channels == _model(subject).warp.w1[0].in_channels + 16
    train_set = FrameDataset(subject, "train")
    batch = model.sample_train_batch(train_set, 0, 2, "cpu")
    model.get_loss_dict(model.get_outputs(batch), batch, 0)["image"].backward()
    assert model.warp.w1[0].weight.grad[:, 16:32].abs().sum() > 0  # the texture channels right after C3 (16)
    model.eval()
    with torch.no_grad():
        data = FrameDataset(subject, "all")
        src, new = model.encoder(model.frame_batch(data, [2], "cpu")), model.encoder(model.frame_batch(data, [3], "cpu"))
        _, cache = model.make_cache(src)
        image = model.warp_frame(cache, new)
        model.texture.levels[0].add_(1.0)  # the new frame's texture sample changes the image
        assert not torch.allclose(model.warp_frame(cache, new), image)
        # ... and only through use_texture: without it W never reads the texture, the image is unchanged
        plain = _model(subject).eval()
        _, plain_cache = plain.make_cache(src)
        plain_image = plain.warp_frame(plain_cache, new)
        plain.texture.levels[0].add_(1.0)
        assert torch.equal(plain.warp_frame(plain_cache, new), plain_image)
        with pytest.raises(ValueError, match="use_texture needs textures"):
            model.warp(cache, new.params)


# ---------------------------------------------------------------- registries
def test_warp_registry_builds_each_kind_with_its_cache_layout_and_names_unknown_ones(subject):
    expected = {"implicit": (ImplicitWarpKind, ImplicitWarp), "explicit": (ExplicitWarpKind, ExplicitWarp)}
    assert set(WARPS) == set(expected)
    channels, sizes = {3: 16, 4: 16, 5: 12}, {"pose_dim": 3, "expr_dim": 5, "cam_dim": 3, "sh_dim": 9}
    sections = {"warp": {"mlp_dim": 4, "cached_layers": [3, 4]}, "explicit_warp": {"hidden_channels": 8}}
    for name, (kind_class, net_class) in expected.items():
        kind, warp = build_warp(name, channels, 16, sizes, sections)
        assert isinstance(kind, kind_class) and type(warp) is net_class
        assert sum(v == name for v in (VARIANTS[n].warp for n in VARIANTS)) == 1  # a variant uses it
    with pytest.raises(ValueError, match=r"VARIANTS\['x'\]\.warp='flow'; expected one of \['explicit', 'implicit'\]"):
        build_warp("flow", channels, 16, sizes, sections, key="VARIANTS['x'].warp")
    with pytest.raises(ValueError, match="model.explicit_warp: .*bogus"):
        build_warp("explicit", channels, 16, sizes, {"explicit_warp": {"bogus": 1}})
    # what each kind caches: Table 4's layers for W, C3 and G's image for the explicit warp
    for variant, layers, has_image in (("ours", [3, 4, 5], False), ("explicit_warp", [3], True)):
        model = _model(subject, variant).eval()
        assert model.warp_kind is WARPS[VARIANTS[variant].warp]
        frame = model.encoder(model.frame_batch(FrameDataset(subject, "all"), [2], "cpu"))
        with torch.no_grad():
            out, cache = model.make_cache(frame)
        assert sorted(cache.features) == layers and (cache.images is not None) == has_image
        if has_image:
            assert torch.equal(cache.images, out["images"])
    assert _model(subject, "dnr").warp_kind is None


def test_extra_rows_registry_adds_the_naive_row_and_names_unknown_ones(subject):
    assert EXTRA_ROWS == {"naive": naive_row} and VARIANTS["dnr_plus"].extra_rows == ("naive",)
    outs = [torch.full((1, 16, 16, 3), v) for v in (0.1, 0.2, 0.3)]
    stream = Stream(frames=[{}] * 3, scored=[1, 2], targets=[torch.full((1, 16, 16, 3), 0.2)] * 2)
    row = naive_row({"model": "DNR+", "workers": 1, "distances": "0", "order": 150}, outs, stream)
    assert row["model"] == "DNR+ (naive)" and row["order"] == 140 and row["distances"] == "1 (shown late)"
    assert row["l1"] == pytest.approx(0.05)  # frames 1, 2 show outputs 0 and 1 (0.1 and 0.2 vs 0.2)
    model = _model(subject, "dnr_plus").eval()
    model.spec = dataclasses.replace(model.spec, extra_rows=("naive", "bogus"))
    frames, scored, targets = build_stream(model, FrameDataset(subject, "test"), warmup=1)
    with pytest.raises(ValueError, match=r"VARIANTS\['dnr_plus'\]\.extra_rows='bogus'; expected one of \['naive'\]"):
        generator_rows(model, Stream(frames, scored, targets), {"generator": 1.0}, "cpu", 0, 1)
