"""Static 3DGS fitter (headkit.fitting) on scenes rendered from known Gaussians."""

import json
import math

import numpy as np
import pytest
import torch

from headkit.cameras import camtoworld_to_viewmat, intrinsics_from_fov, look_at, quat_to_rotmat, so3_exp
from headkit.data.subject import Subject
from headkit.fitting import (DEFAULT_DENSIFY, DensityControl, FitLog, FrameOrder, densify_and_prune, estimate_rigid,
                             fit_static_gaussians, initial_parameters, initial_points, knn_scales, make_optimizer,
                             position_lr, reset_opacity, scene_cameras, scene_scale_of)
from headkit.render.gaussians import rasterize_gaussians

SH_C0 = 0.28209479177387814


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def random_rigid(T, seed):
    g = torch.Generator().manual_seed(seed)
    poses = torch.eye(4).repeat(T, 1, 1)
    poses[:, :3, :3] = so3_exp(0.4 * torch.randn(T, 3, generator=g))
    poses[:, :3, 3] = 0.05 * torch.randn(T, 3, generator=g)
    return poses


def gaussian_scene(N=30, size=32, yaws=(-30, -10, 10, 30, -20, 0, 20), num_test=3, head_poses=None,
                   store_head_poses=True, seed=0):
    """A subject whose frames are renders of N known Gaussians (degree-0 SH, white background).

    The last ``num_test`` views (yaws between the training ones) are held out. With
    ``head_poses`` the Gaussians live in head coordinates and frame t sees them posed by
    ``head_poses[t]``; the mesh 'vertices' are the Gaussian centres, posed the same way.
    """
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(N, 3, generator=g) - 0.5) * 0.5
    truth = {"means": means, "quats": torch.nn.functional.normalize(torch.randn(N, 4, generator=g), dim=-1),
             "scales": torch.rand(N, 3, generator=g) * 0.06 + 0.06,
             "opacities": torch.rand(N, generator=g) * 0.3 + 0.65,
             "sh": ((torch.rand(N, 3, generator=g) - 0.5) / SH_C0)[:, None]}
    T = len(yaws)
    angles = torch.tensor(yaws, dtype=torch.float32) * math.pi / 180
    eyes = torch.stack([1.5 * torch.sin(angles), 0.3 * torch.cos(3 * angles), 1.5 * torch.cos(angles)], -1)
    camtoworlds = look_at(eyes, torch.zeros(T, 3))
    Ks = intrinsics_from_fov(30.0, size, size)[None].repeat(T, 1, 1)
    poses = torch.eye(4).repeat(T, 1, 1) if head_poses is None else head_poses
    images, _, alphas, _ = rasterize_gaussians(
        truth["means"], truth["quats"], truth["scales"], truth["opacities"], truth["sh"],
        camtoworld_to_viewmat(camtoworlds) @ poses, Ks, size, size, sh_degree=0, backgrounds=torch.ones(T, 3))
    posed = means @ poses[:, :3, :3].transpose(1, 2) + poses[:, None, :3, 3]
    subject = Subject(
        name="gaussians", faces=np.array([[0, 1, 2], [0, 2, 3]]), template_vertices=means.numpy(),
        vertices=posed.numpy(), expressions=np.zeros((T, 1), np.float32), Ks=Ks.numpy(),
        camtoworlds=camtoworlds.numpy(), times=np.linspace(0, 1, T).astype(np.float32),
        images=(images.clamp(0, 1) * 255 + 0.5).byte().numpy(),
        masks=(alphas[..., 0] * 255 + 0.5).byte().numpy(),
        train_ids=np.arange(T - num_test), test_ids=np.arange(T - num_test, T),
        head_poses=poses.numpy() if (head_poses is not None and store_head_poses) else None)
    return subject.validate(), truth


FAST_LRS = {"means": 5e-4, "means_final": 5e-5, "sh_dc": 0.05, "opacities": 0.1, "scales": 0.03, "quats": 0.01}


def test_fit_recovers_known_gaussians_on_held_out_views():
    subject, truth = gaussian_scene()
    g = torch.Generator().manual_seed(1)
    init = truth["means"] + 0.02 * torch.randn(30, 3, generator=g)
    init_copy = init.clone()
    logged = []
    result = fit_static_gaussians(subject, init, steps=180, sh_degree=0, lrs=FAST_LRS, log_every=30,
                                  show_progress=False, callback=lambda step, s: logged.append(step))
    assert torch.equal(init, init_copy)  # the caller's tensor is not trained in place
    assert result.eval_metrics["num_frames"] == 3 and result.eval_metrics["psnr"] > 30.0
    assert logged == [30, 60, 90, 120, 150, 180] == [h[0] for h in result.history]
    losses = [h[1] for h in result.history]
    assert losses[-1] < 0.35 * losses[0]
    assert all(b < 1.1 * a for a, b in zip(losses, losses[1:]))  # monotone up to noise
    # one-to-one: no densification, activated and normalised outputs
    assert result.num_gaussians == 30 and result.sh.shape == (30, 1, 3)
    torch.testing.assert_close(result.quats.norm(dim=-1), torch.ones(30))
    assert (result.scales > 0).all() and ((result.opacities > 0) & (result.opacities < 1)).all()


def test_knn_scales_hand_checked():
    points = torch.tensor([[0.0, 0, 0], [1, 0, 0], [3, 0, 0], [6, 0, 0], [10, 0, 0]])
    expected = torch.tensor([math.sqrt((1 + 9 + 36) / 3), math.sqrt((1 + 4 + 25) / 3), math.sqrt((4 + 9 + 9) / 3),
                             math.sqrt((9 + 16 + 25) / 3), math.sqrt((16 + 49 + 81) / 3)])
    torch.testing.assert_close(knn_scales(points), expected)
    torch.testing.assert_close(knn_scales(points, chunk=2), expected)  # chunking changes nothing
    dup = torch.zeros(4, 3)
    torch.testing.assert_close(knn_scales(dup), torch.full((4,), math.sqrt(1e-7)))  # 3DGS's clamp
    torch.testing.assert_close(knn_scales(points[:2]), torch.tensor([1.0, 1.0]))  # fewer than k neighbours


def test_scene_scale_follows_3dgs_with_a_fallback_for_a_fixed_camera():
    eyes = torch.tensor([[-1.0, 0, 3], [1.0, 0, 3], [0.0, 0, 3]])
    viewmats = camtoworld_to_viewmat(look_at(eyes, torch.zeros(3, 3)))
    points = torch.tensor([[0.0, 0, 0], [0.2, 0, 0], [-0.2, 0, 0]])
    assert scene_scale_of(viewmats, points) == pytest.approx(1.1 * 1.0)  # max |centre - mean centre|
    fixed = viewmats[:1].repeat(3, 1, 1)
    assert scene_scale_of(fixed, points) == pytest.approx(1.1 * 0.2)  # points' extent instead


def _raw(means, scales, quats, opacities):
    N = len(means)
    return {"means": torch.tensor(means), "log_scales": torch.tensor(scales).log(), "quats": torch.tensor(quats),
            "opacity_logits": torch.logit(torch.tensor(opacities)),
            "sh_dc": torch.arange(N, dtype=torch.float32)[:, None, None].repeat(1, 1, 3),
            "sh_rest": torch.zeros(N, 3, 3)}


def test_densify_rules_on_hand_built_gradient_stats():
    # scene_scale 1, percent_dense 0.01: "big" means max scale > 0.01
    q = [1.0, 0.0, 0.0, 0.0]
    rot = [math.cos(0.4), 0.0, 0.0, math.sin(0.4)]  # 0.8 rad about z
    params = _raw(
        means=[[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0], [4, 0, 0], [5, 0, 0], [6, 0, 0]],
        scales=[[0.005] * 3, [0.05, 0.02, 0.01], [0.005] * 3, [0.005] * 3, [0.005] * 3, [0.005] * 3, [0.2] * 3],
        quats=[q, rot, q, q, q, q, q],
        opacities=[0.5, 0.5, 0.001, 0.5, 0.5, 0.5, 0.5])
    #        A clone  B split  C prune  D low grad  E never seen  F huge on screen  G huge in world
    grads = torch.tensor([1e-3, 1e-3, 0.0, 1e-4, float("nan"), 0.0, 0.0])
    radii = torch.tensor([3.0, 5.0, 1.0, 2.0, 0.0, 30.0, 8.0])
    new, sources, is_new, counts = densify_and_prune(params, grads, radii, scene_scale=1.0,
                                                     generator=torch.Generator().manual_seed(7))
    assert counts == {"cloned": 1, "split": 1, "pruned": 1, "num_gaussians": 8}
    assert sources.tolist() == [0, 3, 4, 5, 6, 0, 1, 1]  # kept in order, clones, split children
    assert is_new.tolist() == [False] * 5 + [True] * 3
    for name in params:  # clones are exact copies
        assert torch.equal(new[name][5], params[name][0])
    # split children: scales / (0.8 * 2), means = parent + R (s * eps) with the generator's eps
    torch.testing.assert_close(new["log_scales"][6:].exp(), torch.tensor([[0.05, 0.02, 0.01]] * 2) / 1.6)
    eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(7))
    R = quat_to_rotmat(torch.tensor(rot))
    expected = torch.tensor([1.0, 0, 0]) + (torch.tensor([0.05, 0.02, 0.01]) * eps) @ R.T
    torch.testing.assert_close(new["means"][6:], expected)
    assert torch.equal(new["sh_dc"][6:, 0, 0], torch.tensor([1.0, 1.0]))  # features copied from B
    # with a screen-size limit (3DGS: after the first opacity reset) F and G go too
    new, sources, _, counts = densify_and_prune(params, grads, radii, scene_scale=1.0, max_screen_size=20.0)
    assert sources.tolist() == [0, 3, 4, 0, 1, 1] and counts["pruned"] == 3


def test_densify_mode_changes_the_number_of_gaussians():
    subject, truth = gaussian_scene(N=20, yaws=(-20, 0, 20, 10), num_test=1)
    # an opacity reset due at the last step falls outside density control (first half of the run)
    options = {"start": 2, "every": 5, "stop": 100, "grad_threshold": 0.0, "reset_opacity_every": 22}
    result = fit_static_gaussians(subject, truth["means"], steps=22, sh_degree=0, densify=True,
                                  densify_options=options, log_every=11, show_progress=False)
    # steps 5 and 10 (< 22 // 2) densify every Gaussian (threshold 0): clones and splits only add
    assert result.num_gaussians > 20 * 2
    assert all(t.shape[0] == result.num_gaussians for t in (result.quats, result.scales, result.opacities, result.sh))
    assert math.isfinite(result.eval_metrics["psnr"]) and result.opacities.max() > 0.05
    # pruning: opacities start at 0.1, just above min_opacity 0.09; those that fell in the first
    # steps are pruned at step 3; a huge gradient threshold means no growth, so N can only shrink
    options = {**options, "grad_threshold": 1e9, "min_opacity": 0.09, "every": 3}
    result = fit_static_gaussians(subject, truth["means"], steps=8, sh_degree=0, densify=True,
                                  densify_options=options, lrs={"opacities": 0.05}, log_every=4,
                                  show_progress=False)
    assert 0 < result.num_gaussians < 20


def test_head_space_cameras_equal_viewmat_times_head_pose():
    poses = random_rigid(7, seed=3)
    subject, truth = gaussian_scene(head_poses=poses)
    viewmats, Ks = scene_cameras(subject, head_space=True)
    expected = np.linalg.inv(subject.camtoworlds.astype(np.float64)) @ poses.numpy().astype(np.float64)
    np.testing.assert_allclose(viewmats.numpy(), expected, atol=1e-5)
    world, _ = scene_cameras(subject, head_space=False)
    np.testing.assert_allclose(world.numpy(), np.linalg.inv(subject.camtoworlds.astype(np.float64)), atol=1e-5)
    # the head-space cameras see the head-space Gaussians exactly as the frames show them
    renders, _, _, _ = rasterize_gaussians(truth["means"], truth["quats"], truth["scales"], truth["opacities"],
                                           truth["sh"], viewmats, Ks, 32, 32, sh_degree=0,
                                           backgrounds=torch.ones(7, 3))
    assert (renders.clamp(0, 1) - torch.from_numpy(subject.images) / 255.0).abs().max() < 1.0 / 255
    # without stored head poses they come from a Kabsch fit of template -> tracked vertices
    estimated, _ = gaussian_scene(head_poses=poses, store_head_poses=False)
    assert estimated.head_poses is None
    viewmats_kabsch, _ = scene_cameras(estimated, head_space=True)
    torch.testing.assert_close(viewmats_kabsch, viewmats, atol=1e-5, rtol=0)


def test_estimate_rigid_and_initial_points():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(15, 3, generator=g)
    poses = random_rigid(4, seed=5)
    poses[0, :3, :3] = poses[0, :3, :3] @ so3_exp(torch.tensor([0.0, 0.0, 3.1]))  # near pi
    dst = src @ poses[:, :3, :3].transpose(1, 2) + poses[:, None, :3, 3]
    torch.testing.assert_close(estimate_rigid(src, dst), poses, atol=1e-5, rtol=0)
    subject, truth = gaussian_scene(head_poses=random_rigid(7, seed=4))
    torch.testing.assert_close(initial_points(subject, True), truth["means"])  # template, head frame
    torch.testing.assert_close(initial_points(subject, True, init_frame=5), truth["means"], atol=1e-5, rtol=0)
    first = int(subject.train_ids[0])
    torch.testing.assert_close(initial_points(subject, False), torch.from_numpy(subject.vertices[first]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(initial_points(subject, False, init_frame=2), torch.from_numpy(subject.vertices[2]))
    with pytest.raises(IndexError, match="init_frame=9.*7 frames"):
        initial_points(subject, True, init_frame=9)


def test_bad_arguments_are_named():
    subject, truth = gaussian_scene(N=5, yaws=(0, 10), num_test=1)
    with pytest.raises(KeyError, match="lrs: unknown key.*'mean'"):
        fit_static_gaussians(subject, truth["means"], steps=1, lrs={"mean": 1.0})
    with pytest.raises(ValueError, match="init_means must be"):
        fit_static_gaussians(subject, truth["means"][:, :2], steps=1)
    with pytest.raises(ValueError, match="densify_options.every"):
        fit_static_gaussians(subject, truth["means"], steps=1, densify_options={"every": -1})
    with pytest.raises(ValueError, match="lrs.means_final"):
        fit_static_gaussians(subject, truth["means"], steps=1, lrs={"means_final": 0.0})
    with pytest.raises(ValueError, match="init_colors must be"):
        fit_static_gaussians(subject, truth["means"], steps=1, init_colors=torch.ones(4, 3))


def test_fit_3dgs_writes_a_complete_run_folder(tmp_path):
    from hydra import compose, initialize_config_dir

    from headkit.data.folder import write_subject_folder
    from headkit.fitting import fit_3dgs
    from headkit.ply import load_ply

    subject, _ = gaussian_scene(N=12, yaws=(-20, 0, 20, 10), num_test=1)
    write_subject_folder(subject, tmp_path / "subject")
    configs = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose("fit_3dgs", overrides=[
            "data=subject", f"data.root={tmp_path / 'subject'}", f"out={tmp_path / 'run'}", "steps=4",
            "log_every=2", "sh_degree=1", "progress=false", "lpips=false", "device=cpu"])
    metrics = fit_3dgs(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text())["psnr"] == pytest.approx(metrics["psnr"])
    assert metrics["num_gaussians"] == 12 and metrics["lpips"] is None and metrics["lpips_unavailable_reason"]
    gaussians = load_ply(run / "gaussians.ply")
    assert gaussians["means"].shape == (12, 3) and gaussians["sh"].shape == (12, 4, 3)
    assert (gaussians["normals"].norm(dim=-1) > 0.99).sum() >= 4  # mesh normals where faces exist
    import imageio.v3 as iio
    assert iio.imread(run / "render_vs_gt.png").shape == (32, 64, 3)
    assert (run / "config.yaml").is_file() and (run / "scalars.jsonl").is_file()
    # a second run with the same out= goes to a sibling folder, never over the first
    with pytest.warns(UserWarning, match="already holds a run"):
        metrics2 = fit_3dgs(cfg)
    assert metrics2["run_dir"] == str(tmp_path / "run-1")


def test_old_import_paths_give_the_fitting_package_objects():
    import headkit.fitting as fitting
    import headkit.gaussian_densify as old_densify
    import headkit.gaussian_fit as old_fit
    for name in old_fit.__all__:
        assert getattr(old_fit, name) is getattr(fitting, name), name
    assert old_densify.densify_and_prune is fitting.densify_and_prune
    assert old_densify.DEFAULT_DENSIFY is fitting.DEFAULT_DENSIFY
    assert old_fit._remap_optimizer is old_densify._remap_optimizer is fitting.remap_optimizer


def test_position_lr_decays_log_linearly_from_the_first_to_the_last_step():
    lrs = {"means": 1e-3, "means_final": 1e-5}
    assert position_lr(1, 11, lrs, 2.0) == pytest.approx(2e-3)
    assert position_lr(6, 11, lrs, 2.0) == pytest.approx(2e-4)  # halfway in log space
    assert position_lr(11, 11, lrs, 2.0) == pytest.approx(2e-5)
    assert position_lr(1, 1, lrs, 1.0) == pytest.approx(1e-3)  # a one-step run stays at the start


def test_frame_order_takes_every_frame_once_per_epoch():
    order = FrameOrder(5, torch.Generator().manual_seed(0))
    first = torch.cat([order.take(2), order.take(2)])
    assert len(set(first.tolist())) == 4  # no repeats within an epoch
    rest = order.take(2)  # one left from epoch 1, then a fresh permutation
    assert sorted(first.tolist() + rest[:1].tolist()) == list(range(5))


def test_fit_log_reports_window_means_every_log_every_steps_and_at_the_end():
    seen = []
    log = FitLog(5, 2, callback=lambda step, s: seen.append((step, s)), show_progress=False)
    for step, (loss, value) in zip(log.bar, [(1.0, 10.0), (3.0, 20.0), (5.0, 30.0), (7.0, 40.0), (9.0, 50.0)]):
        log.record(loss, value)
        log.flush(step, num_gaussians=4, sh_degree=0, lr_means=0.1)
    assert log.history == [(2, 2.0, 15.0), (4, 6.0, 35.0), (5, 9.0, 50.0)]
    assert [step for step, _ in seen] == [2, 4, 5]
    assert seen[0][1] == {"loss": 2.0, "psnr": 15.0, "num_gaussians": 4, "sh_degree": 0, "lr_means": 0.1}


def test_density_control_acts_in_the_first_half_and_resets_opacities():
    means = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    params = initial_parameters(means, None, 0, 0.5, torch.device("cpu"))
    optimizer = make_optimizer(params, {"means": 1e-3, "scales": 1e-3, "quats": 1e-3, "opacities": 1e-3,
                                        "sh_dc": 1e-3, "sh_rest": 1e-3}, 1.0)
    control = DensityControl({**DEFAULT_DENSIFY, "stop": 100}, steps=10, num_gaussians=4, scene_scale=1.0,
                             generator=None, device=torch.device("cpu"))
    assert control.active(4) and not control.active(5)  # stop = min(100, 10 // 2)
    sum(p.sum() for p in params.values()).backward()
    optimizer.step()
    means_moments = optimizer.state[params["means"]]["exp_avg"].clone()
    reset = reset_opacity(optimizer, params)
    torch.testing.assert_close(torch.sigmoid(reset["opacity_logits"]), torch.full((4,), 0.01))
    assert not optimizer.state[reset["opacity_logits"]]["exp_avg"].any()  # moments restart (3DGS)
    assert reset["means"] is params["means"]  # the other parameters and their state are untouched
    assert torch.equal(optimizer.state[reset["means"]]["exp_avg"], means_moments) and means_moments.any()
