"""GraphAvatar assembled: forward pass, gradients, ablation switches, GGO, warm-up, losses,
configuration errors, the composed config end to end, the INSTA size bound, the ablation table."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from graphavatar.ggo import apply_pose_delta
from graphavatar.losses import GraphAvatarLoss
from graphavatar.model import GraphAvatar
from graphavatar.schedules import LRSchedule
from graphavatar.settings import ConfigValueError
from graphavatar.warmup import anchor_errors, fit_pseudo_gaussians, head_space_anchors, train_anchors
from headkit.cameras import so3_exp
from headkit.data.dataset import FrameDataset
from headkit.data.subject import Subject, SubjectError
from headkit.data.synthetic import generate_synthetic_subject
from headkit.mesh import icosphere
from headkit.metrics import model_size_mb, ssim
from tests.conftest import load_repo_module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_GENERATOR = dict(num_frames=8, width=32, height=32, num_test=2, num_vertices_target=300, expression_dim=4,
                      texture_resolution=32, supersample=1)
# Small but complete: every module present, CPU-cheap.
SMALL = dict(hierarchy={"factors": [4, 4]}, unet={"filters": [8, 8], "K": 2, "latent": 4},
             appearance={"sh_degree": 1}, neural_gaussians={"num_offsets": 2, "hidden_dim": 8},
             ggo={"num_heads": 2, "num_freqs": 4}, enhancer={"channels": [4, 8], "film_hidden": 4},
             warmup={"steps": 30, "fit_steps": 10, "lr": 0.01, "log_every": 10, "fit_sh_increase_every": 5},
             render={"background": [1.0, 1.0, 1.0]})


def small_model(subject, **changes) -> GraphAvatar:
    kwargs = {k: dict(v) for k, v in SMALL.items()}
    for key, value in changes.items():
        if isinstance(value, dict):
            kwargs.setdefault(key, {}).update(value)
        else:
            kwargs[key] = value
    torch.manual_seed(0)
    return GraphAvatar(subject, **kwargs)


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


@pytest.fixture(scope="module")
def subject() -> Subject:
    return generate_synthetic_subject(**TINY_GENERATOR)


@pytest.fixture(scope="module")
def noisy_subject() -> Subject:
    return generate_synthetic_subject(**TINY_GENERATOR, tracking_noise={"pose_rot_deg": 2.0, "pose_trans": 0.01,
                                                                        "expression": 0.3})


def train_batch(subject, positions=(0, 3)):
    return FrameDataset(subject, "train").batch(list(positions))


def step(model, batch, optimizer, i=0):
    outputs = model.get_outputs(batch)
    losses = model.get_loss_dict(outputs, batch, i)
    total = torch.stack(list(losses.values())).sum()
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return outputs, losses, total


def test_outputs_and_gradients_reach_every_module(subject):
    model = small_model(subject).train()
    batch = train_batch(subject)
    out = model.get_outputs(batch)
    B, H, W, E, V = 2, subject.height, subject.width, subject.expression_dim, subject.num_vertices
    assert out["image"].shape == out["coarse_image"].shape == (B, H, W, 3)
    assert out["depth"].shape == out["alpha"].shape == (B, H, W, 1)
    assert out["delta_expression"].shape == (B, E) and out["delta_pose"].shape == (B, 6)
    # anchors + kept children (at init every child has opacity 0.1 > 0, so all are kept)
    assert out["num_gaussians"].tolist() == [V * 3.0, V * 3.0]
    # zero-initialised GGO and enhancer: identity refinement, final image = coarse image
    assert out["delta_pose"].abs().max() == 0 and out["delta_expression"].abs().max() == 0
    torch.testing.assert_close(out["image"], out["coarse_image"])
    assert 0.05 < out["alpha"].mean() < 1.0

    losses = model.get_loss_dict(out, batch, 0)
    assert set(losses) >= {"final_l1", "final_dssim", "coarse", "alpha_bce"}
    torch.stack(list(losses.values())).sum().backward()
    for name, params in model.parameter_groups().items():
        grads = [p.grad for p in params if p.grad is not None]
        assert grads and max(g.abs().max().item() for g in grads) > 0, f"no gradient reaches {name}"
    # GGO's zero-initialised output layer is the one that learns first
    assert model.ggo.out_proj.weight.grad.abs().max() > 0
    assert model.enhancer.out.weight.grad.abs().max() > 0
    assert model.geometry.unet.head.lins[0].weight.grad.abs().max() > 0


def test_training_on_one_frame_lowers_the_loss(subject):
    model = small_model(subject).train()
    optimizer, scheduler = model.configure_optimizers()
    batch = train_batch(subject, (1,))
    totals = []
    for i in range(12):
        _, _, total = step(model, batch, optimizer, i)
        scheduler.step()
        totals.append(total.item())
    assert all(math.isfinite(t) for t in totals)
    assert min(totals[-3:]) < 0.8 * totals[0]
    # after a few steps the whole network takes part, including GGO's attention and time MLP
    for module in (model.ggo.time_mlp, model.ggo.query_proj, model.geometry.unet.enc[0]):
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in module.parameters())


@pytest.mark.parametrize("switch,attr", [("neural_gaussians", "neural"), ("ggo", "ggo"), ("enhancer", "enhancer")])
def test_each_ablation_switch_removes_its_module_and_still_trains(subject, switch, attr):
    full = small_model(subject)
    ablated = small_model(subject, **{switch: {"enabled": False}})
    assert getattr(ablated, attr) is None
    removed = sum(p.numel() for p in getattr(full, attr).parameters())
    assert sum(p.numel() for p in ablated.parameters()) == sum(p.numel() for p in full.parameters()) - removed
    assert not any(k.startswith(attr + ".") for k in ablated.stored_state_dict())
    optimizer, _ = ablated.configure_optimizers()
    before = [p.detach().clone() for p in ablated.parameters()]
    batch = train_batch(subject)
    out, losses, total = step(ablated.train(), batch, optimizer)
    assert total.item() == pytest.approx(sum(v.item() for v in losses.values()))
    assert any(not torch.equal(a, p) for a, p in zip(before, ablated.parameters()))
    for i in range(1, 4):
        later = step(ablated, batch, optimizer, i)[2]
    assert later.item() < total.item()  # it trains: the loss on the batch falls
    if switch == "neural_gaussians":
        assert out["num_gaussians"].tolist() == [float(subject.num_vertices)] * 2
    if switch == "enhancer":
        assert "coarse" not in losses  # the coarse image is the final image: not counted twice


def test_no_warmup_switch_skips_the_warmup(subject, tmp_path):
    from headkit.engine.method import TrainContext
    model = small_model(subject, warmup={"enabled": False})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.before_training(TrainContext(subject, FrameDataset(subject, "train"), torch.device("cpu"), tmp_path,
                                       None, False))
    assert not (tmp_path / "warmup.json").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ggo_pose_delta_changes_the_render_and_receives_gradient(subject):
    # no offset penalty: the gradient w.r.t. the delta must come from the render alone
    model = small_model(subject, neural_gaussians={"enabled": False},
                        loss={"ggo_reg": {"pose": 0.0, "expression": 0.0}}).train()
    batch = train_batch(subject, (2,))
    base = model.get_outputs(batch)["image"].detach()
    with torch.no_grad():  # a pure camera rotation of 0.03 rad about the camera's y axis
        model.ggo.out_proj.bias[subject.expression_dim + 1] = 0.03
    out = model.get_outputs(batch)
    expected = torch.tensor([0.0, 0.03, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(out["delta_pose"][0], expected)
    assert (out["image"] - base).abs().max() > 0.05
    # reference: GGO at zero, the camera itself rotated by the same delta (camtoworld · exp(Δξ))
    moved = {**batch, "camtoworld": apply_pose_delta(batch["camtoworld"], expected[None], side="right")}
    with torch.no_grad():
        model.ggo.out_proj.bias[subject.expression_dim + 1] = 0.0
        reference = model.get_outputs(moved)["image"]
        model.ggo.out_proj.bias[subject.expression_dim + 1] = 0.03
    torch.testing.assert_close(out["image"].detach(), reference, atol=1e-5, rtol=0)
    out["delta_pose"].retain_grad()
    losses = model.get_loss_dict(out, batch, 0)
    torch.stack(list(losses.values())).sum().backward()
    grad = out["delta_pose"].grad[0]
    assert grad[:3].abs().max() > 0 and grad[3:].abs().max() > 0  # rotation and translation
    # eval mode: test frames use the tracked camera (ggo.apply_on_test=false) ...
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.get_outputs(batch)["image"], base)
    # ... unless asked to refine them too: for a block (ggo_applied, restored after) or by the setting
    with model.ggo_applied(), torch.no_grad():
        torch.testing.assert_close(model.get_outputs(batch)["image"], reference, atol=1e-5, rtol=0)
    assert model.settings["ggo"]["apply_on_test"] is False
    with torch.no_grad():
        torch.testing.assert_close(model.get_outputs(batch)["image"], base)
    model.settings["ggo"]["apply_on_test"] = True
    with torch.no_grad():
        torch.testing.assert_close(model.get_outputs(batch)["image"], reference, atol=1e-5, rtol=0)


def test_ggo_on_test_frames_holds_the_last_training_time(subject):
    """ggo.apply_on_test: a test frame after the training range is refined with its own graph
    features and the last training frame's time (ggo.test_time=hold), or with its own time
    (extrapolate); hold is what the model does by default."""
    model = small_model(subject, ggo={"apply_on_test": True}).eval()
    assert model.settings["ggo"]["test_time"] == "hold"
    first, last = model.train_time_range
    assert (first, last) == (float(subject.times[subject.train_ids].min()), float(subject.times[subject.train_ids].max()))
    with torch.no_grad():
        torch.nn.init.normal_(model.ggo.out_proj.weight)  # offsets that depend on the time
    test = FrameDataset(subject, "test").batch([len(subject.test_ids) - 1])
    assert test["time"].item() > last
    at_last = {**test, "time": torch.full_like(test["time"], last)}
    with torch.no_grad():
        encoded = model.encode(test)
        held = model.refine(test, encoded)[2]["delta_pose"]
        torch.testing.assert_close(model.refine(at_last, encoded)[2]["delta_pose"], held)
        model.settings["ggo"]["test_time"] = "extrapolate"
        moved = model.refine(test, encoded)[2]["delta_pose"]
    assert (moved - held).abs().max() > 1e-4
    with pytest.raises(ConfigValueError, match=r"model\.ggo\.test_time"):
        small_model(subject, ggo={"test_time": "clamp"})


def test_ggo_head_side_and_shared_penalty_through_the_model(subject):
    # pose_side=head: the model refines camera-to-world as H exp(d) H^-1 c2w with the head pose H;
    # ggo_reg.target=shared: the penalty is on the running mean of the offsets, not each frame's.
    model = small_model(subject, neural_gaussians={"enabled": False}, ggo={"pose_side": "head"},
                        loss={"ggo_reg": {"pose": 5.0, "expression": 0.0, "target": "shared"}}).train()
    batch = train_batch(subject, (2,))
    with torch.no_grad():
        model.ggo.out_proj.bias[subject.expression_dim + 1] = 0.03
    out = model.get_outputs(batch)
    expected = torch.tensor([[0.0, 0.03, 0.0, 0.0, 0.0, 0.0]])
    with torch.no_grad():
        model.ggo.out_proj.bias[subject.expression_dim + 1] = 0.0
        moved = {**batch, "camtoworld": apply_pose_delta(batch["camtoworld"], expected, side="head",
                                                         head_poses=model.local_poses(batch))}
        reference = model.get_outputs(moved)["image"]
    torch.testing.assert_close(out["image"].detach(), reference, atol=1e-5, rtol=0)
    # one training forward so far with a 0.03 offset: the running mean is (1 - 0.99) of it
    torch.testing.assert_close(out["ggo_shared_pose"].detach(), 0.01 * expected[0], atol=1e-7, rtol=0)
    losses = model.get_loss_dict(out, batch, 0)
    assert losses["ggo_pose_reg"].item() == pytest.approx(5.0 * (0.01 * 0.03) ** 2 / 6, rel=1e-4)


def test_static_avatar_phase_leaves_ggo_pose_as_the_only_per_frame_freedom(subject):
    # ggo.static_avatar_steps=2: steps 0-1 train one static head (template in, no expression), so two
    # frames seen from the same camera and head pose render the same image; from step 2 on the tracked mesh returns.
    model = small_model(subject, ggo={"static_avatar_steps": 2}).train()
    perturb = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # non-zero heads, so the mesh and expression matter
            p.add_(0.05 * torch.randn(p.shape, generator=perturb))
    data = FrameDataset(subject, "train")
    batch = data.batch([0, 5])
    same_camera = {**batch, **{k: batch[k][:1].expand_as(batch[k]) for k in ("camtoworld", "head_pose", "time")}}

    def anchors_and_image(step_number):
        model.sample_train_batch(data, step_number, 1, torch.device("cpu"))
        out = model.get_outputs(same_camera)
        return out["anchor_offsets"].detach(), out["image"].detach()

    offsets, image = anchors_and_image(1)
    assert model.static_avatar
    torch.testing.assert_close(offsets[0], offsets[1])
    torch.testing.assert_close(image[0], image[1], atol=1e-5, rtol=0)
    offsets, image = anchors_and_image(2)
    assert not model.static_avatar
    assert (offsets[0] - offsets[1]).abs().max() > 1e-4
    model.eval()  # evaluation never renders the static head
    model.static_avatar = True
    with torch.no_grad():
        assert (model.get_outputs(same_camera)["anchor_offsets"][0] - offsets[1]).abs().max() > 1e-4


def test_head_and_world_input_spaces_render_the_same_initial_gaussians(subject):
    # At init every anchor sits on its vertex, isotropic, grey, opacity 0.1, in either frame, so
    # rendering in head space with viewmat @ head_pose must equal rendering in world space.
    kw = dict(neural_gaussians={"enabled": False}, ggo={"enabled": False}, enhancer={"enabled": False})
    head = small_model(subject, input_space="head", **kw).eval()
    world = small_model(subject, input_space="world", **kw).eval()
    batch = train_batch(subject, (0, 5))
    assert not torch.allclose(batch["head_pose"], torch.eye(4).expand(2, 4, 4))
    with torch.no_grad():
        a, b = head.get_outputs(batch), world.get_outputs(batch)
    torch.testing.assert_close(a["image"], b["image"], atol=2e-4, rtol=0)
    torch.testing.assert_close(a["depth"], b["depth"], atol=2e-4, rtol=0)


def test_warmup_reduces_the_anchor_to_pseudo_error(subject, tmp_path):
    from headkit.engine.method import TrainContext
    model = small_model(subject)
    train = FrameDataset(subject, "train")
    pseudo = fit_pseudo_gaussians(model, train, torch.device("cpu"), show_progress=False)
    assert pseudo.num_gaussians == subject.num_vertices  # one pseudo Gaussian per vertex

    def error():
        with torch.no_grad():
            errs = anchor_errors(head_space_anchors(model, train.batch(range(len(train)))), pseudo,
                                 model.edge_length)
        return sum(errs.values()).item()

    before = error()
    history = train_anchors(model, pseudo, train, torch.device("cpu"), show_progress=False)
    assert error() < 0.5 * before
    assert history["after"]["loss"] < history["before"]["loss"]
    # the full hook writes its summary to the run folder
    model.before_training(TrainContext(subject, train, torch.device("cpu"), tmp_path, None, False))
    summary = json.loads((tmp_path / "warmup.json").read_text())
    assert summary["anchor_steps"] == 30 and summary["pseudo_fit_steps"] == 10
    errors = summary["anchor_errors"]  # means of steps 1-10 and 21-30 (warmup.log_every=10)
    assert errors["after"]["loss"] < errors["before"]["loss"]
    assert errors["before"]["loss"] == pytest.approx(sum(errors["before"][k] for k in errors["before"] if k != "loss"),
                                                     rel=1e-5)  # warmup.weights are all 1


def test_warmup_l1_and_world_space_comparison(subject):
    model = small_model(subject, input_space="world", warmup={"loss": "l1", "steps": 10, "log_every": 5})
    train = FrameDataset(subject, "train")
    pseudo = fit_pseudo_gaussians(model, train, torch.device("cpu"), show_progress=False)
    batch = train.batch([4])
    # world-space anchors brought back to the head frame equal the head-space model's anchors at init
    head_model = small_model(subject, input_space="head")
    with torch.no_grad():
        a, b = head_space_anchors(model, batch), head_space_anchors(head_model, batch)
    torch.testing.assert_close(a["means"], b["means"], atol=1e-5, rtol=0)
    # warmup.loss=l1: mean absolute differences, by hand
    everything = train.batch(range(len(train)))

    def l1_errors():
        with torch.no_grad():
            anchors = head_space_anchors(model, everything)
            return anchors, anchor_errors(anchors, pseudo, model.edge_length, "l1")

    anchors, before = l1_errors()
    assert before["means"].item() == pytest.approx(
        ((anchors["means"] - pseudo.means) / model.edge_length).abs().mean().item(), rel=1e-5)
    assert before["opacities"].item() == pytest.approx((anchors["opacities"] - pseudo.opacities).abs().mean().item(),
                                                       rel=1e-5)
    history = train_anchors(model, pseudo, train, torch.device("cpu"), show_progress=False)
    after = l1_errors()[1]
    assert sum(after.values()).item() < 0.9 * sum(before.values()).item()
    assert history["after"]["loss"] < history["before"]["loss"]  # steps 6-10 against steps 1-5
    assert history["after"]["loss"] == pytest.approx(sum(history["after"][k] for k in before), rel=1e-5)  # weights 1


def test_loss_terms_hand_values_and_lpips_skipped_once(caplog):
    loss = GraphAvatarLoss(lpips_weights="/nonexistent/alexnet.pth")
    images = torch.full((1, 16, 16, 3), 0.5)
    outputs = {"image": images, "coarse_image": images, "alpha": torch.full((1, 16, 16, 1), 0.5),
               "anchor_offsets": torch.zeros(1, 4, 3), "anchor_scales": torch.ones(1, 4, 3)}
    targets, masks = torch.full_like(images, 0.25), torch.ones(1, 16, 16, 1)
    with caplog.at_level(logging.WARNING, logger="graphavatar.losses"):
        terms = loss(outputs, targets, masks, step=0, edge_length=1.0, has_enhancer=True)
        loss(outputs, targets, masks, step=1, edge_length=1.0, has_enhancer=True)
    assert "final_lpips" not in terms and loss.lpips_unavailable
    assert sum("LPIPS" in r.getMessage() for r in caplog.records) == 1
    assert terms["final_l1"].item() == pytest.approx(0.8 * 0.25)
    assert terms["alpha_bce"].item() == pytest.approx(0.1 * math.log(2.0), rel=1e-5)
    # D-SSIM is 3DGS's zero-padded ("same") SSIM: exactly 0 for identical images, and weighted 0.2
    dssim = 1.0 - ssim(images, targets, border="same").item()
    assert 0.01 < dssim < 1.0
    assert terms["final_dssim"].item() == pytest.approx(0.2 * dssim, rel=1e-5)
    assert terms["coarse"].item() == pytest.approx(0.1 * (0.8 * 0.25 + 0.2 * dssim), rel=1e-5)
    same = loss(outputs, images, masks, step=2, edge_length=1.0, has_enhancer=True)
    assert same["final_dssim"].item() == pytest.approx(0.0, abs=1e-6) and same["final_l1"].item() == 0.0
    hinged = GraphAvatarLoss(lpips=0.0, scale_hinge={"weight": 2.0, "max": 0.5})
    terms = hinged(outputs, targets, masks, step=0, edge_length=1.0, has_enhancer=False)
    assert "coarse" not in terms and terms["scale_hinge"].item() == pytest.approx(2.0 * 0.5)
    # GGO offset penalty: translation measured as an angle (divided by the camera distance)
    reg = GraphAvatarLoss(lpips=0.0, ggo_reg={"pose": 3.0, "expression": 0.5}, translation_unit=2.0)
    deltas = {"delta_pose": torch.tensor([[0.1, 0.0, 0.0, 0.2, 0.0, 0.0]]),
              "delta_expression": torch.tensor([[0.2, 0.0]])}
    terms = reg({**outputs, **deltas}, targets, masks, step=0, edge_length=1.0, has_enhancer=True)
    assert terms["ggo_pose_reg"].item() == pytest.approx(3.0 * (0.01 + 0.01) / 6)
    assert terms["ggo_expression_reg"].item() == pytest.approx(0.5 * 0.04 / 2)
    # target=shared: only the part shared by all frames is penalised (the per-frame offsets are free)
    shared = GraphAvatarLoss(lpips=0.0, ggo_reg={"pose": 3.0, "expression": 0.5, "target": "shared"},
                             translation_unit=2.0)
    both = {**deltas, "ggo_shared_pose": torch.tensor([0.0, 0.1, 0.0, 0.0, 0.0, 0.4]),
            "ggo_shared_expression": torch.tensor([0.0, 0.1])}
    terms = shared({**outputs, **both}, targets, masks, step=0, edge_length=1.0, has_enhancer=True)
    assert terms["ggo_pose_reg"].item() == pytest.approx(3.0 * (0.01 + 0.04) / 6)
    assert terms["ggo_expression_reg"].item() == pytest.approx(0.5 * 0.01 / 2)
    with pytest.raises(ValueError, match="target"):
        GraphAvatarLoss(ggo_reg={"target": "frames"})


def test_optimizer_groups_and_schedules(subject):
    model = small_model(subject, optim={"lr": {"ggo": 3e-4}, "schedule": "exponential", "final_ratio": 0.01,
                                        "max_steps": 10})
    optimizer, scheduler = model.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"unets": 1e-3, "neural_anchors": 1e-2, "neural_mlps": 2e-3, "ggo": 3e-4, "enhancer": 1e-3}
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.01 ** 0.5)
    # a checkpoint of this 10-step schedule loaded into a 20-step run (an extended run) takes the new length
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    assert saved["scheduler"]["lr_lambdas"][0]["max_steps"] == 10
    for length in (20, 10):
        model2 = small_model(subject, optim={"lr": {"ggo": 3e-4}, "schedule": "exponential", "final_ratio": 0.01,
                                             "max_steps": length})
        optimizer2, scheduler2 = model2.configure_optimizers()
        optimizer2.load_state_dict(saved["optimizer"])  # as resume_or_start does: optimizer first
        scheduler2.load_state_dict(saved["scheduler"])
        assert scheduler2.lr_lambdas[0].max_steps == length and scheduler2.last_epoch == 5
        lrs = [g["lr"] for g in optimizer2.param_groups]
        assert lrs == pytest.approx([base * 0.01 ** (5 / length) for base in (1e-3, 1e-2, 2e-3, 3e-4, 1e-3)])
        assert scheduler2.get_last_lr() == lrs
        if length == 10:  # the same length: the stored rates, bit for bit
            assert lrs == [g["lr"] for g in optimizer.param_groups]
        optimizer2.step()
        scheduler2.step()
        assert optimizer2.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.01 ** (6 / length))
    assert LRSchedule("cosine", 0.1, 10)(5) == pytest.approx(0.55)
    assert LRSchedule("cosine", 0.1, 10)(20) == pytest.approx(0.1)
    assert LRSchedule("constant", 0.1, 10)(7) == 1.0


def test_invalid_values_name_the_key(subject):
    with pytest.raises(ConfigValueError, match=r"model\.optim\.lr\.unets"):
        small_model(subject, optim={"lr": {"unets": -1e-3}})
    with pytest.raises(ConfigValueError, match=r"model\.neural_gaussians\.num_offsets"):
        small_model(subject, neural_gaussians={"num_offsets": 0})
    small_model(subject, neural_gaussians={"enabled": False, "num_offsets": 0})  # unused when disabled
    with pytest.raises(ConfigValueError, match=r"model\.ggo\.enabld"):
        small_model(subject, ggo={"enabld": False})
    with pytest.raises(ConfigValueError, match=r"model\.ggo\.static_avatar_steps"):
        small_model(subject, ggo={"static_avatar_steps": -1})
    with pytest.raises(ConfigValueError, match=r"model\.ggo\.rounds=0: must be an integer >= 1"):
        small_model(subject, ggo={"rounds": 0})
    with pytest.raises(ConfigValueError, match=r"model\.ggo\.frequency_spacing"):
        small_model(subject, ggo={"frequency_spacing": "log"})
    assert small_model(subject, ggo={"frequency_spacing": "linear"}).ggo.frequency_spacing == "linear"
    with pytest.raises(ConfigValueError, match=r"model\.warmup\.loss"):
        small_model(subject, warmup={"loss": "huber"})
    with pytest.raises(ConfigValueError, match=r"model\.input_space"):
        small_model(subject, input_space="camera")
    with pytest.raises(ValueError, match="width"):  # zero image size is rejected by the data source
        generate_synthetic_subject(**{**TINY_GENERATOR, "width": 0})


def test_expression_size_mismatch_names_the_config_key(subject):
    small_model(subject, expression_dim=subject.expression_dim)
    with pytest.raises(SubjectError, match=r"expression size 4 .*model\.expression_dim=7"):
        small_model(subject, expression_dim=7)


def test_ggo_tracking_errors_against_the_truth(noisy_subject):
    from graphavatar.evaluation import ggo_tracking_errors, rotation_errors_deg, tracking_errors
    R = so3_exp(torch.tensor([0.0, 0.0, 0.1]))
    assert rotation_errors_deg(R, torch.eye(3)).item() == pytest.approx(math.degrees(0.1), rel=1e-4)
    model = small_model(noisy_subject)
    errors = ggo_tracking_errors(model, noisy_subject, torch.device("cpu"))
    s = noisy_subject
    ids = s.train_ids
    true_c2w, c2w = s.extras["true_camtoworlds"][ids], s.camtoworlds[ids]
    expected_trans = np.linalg.norm(c2w[:, :3, 3] - true_c2w[:, :3, 3], axis=-1).mean()
    expected_expr = np.linalg.norm(s.expressions[ids] - s.extras["true_expressions"][ids], axis=-1).mean()
    assert errors["ggo_trans_err_before"] == pytest.approx(expected_trans, rel=1e-4)
    assert errors["ggo_expr_err_before"] == pytest.approx(expected_expr, rel=1e-4)
    assert errors["ggo_rot_err_deg_before"] > 0.1
    # the shared offset is removed in the avatar's (head's) frame, not the world's
    head = torch.from_numpy(np.asarray(s.head_poses[ids], np.float32)) if s.head_poses is not None else \
        model.frame_head_poses(FrameDataset(s, "train").batch(list(range(len(ids)))))
    args = [torch.from_numpy(np.asarray(a, np.float32)) for a in
            (c2w, true_c2w, s.expressions[ids], s.extras["true_expressions"][ids])]
    in_head, in_world = tracking_errors(*args, local_poses=head), tracking_errors(*args)
    assert errors["ggo_rot_err_deg_zero_mean_before"] == pytest.approx(in_head["rot_err_deg_zero_mean"], rel=1e-4)
    assert abs(in_head["rot_err_deg_zero_mean"] - in_world["rot_err_deg_zero_mean"]) > 1e-3
    # zero-initialised GGO: refined == tracked
    for key in ("rot_err_deg", "trans_err", "expr_err"):
        assert errors[f"ggo_{key}_after"] == pytest.approx(errors[f"ggo_{key}_before"], rel=1e-4, abs=1e-4)
    without_truth = Subject(**{**s.__dict__, "extras": {}})
    assert "ggo_errors_unavailable_reason" in ggo_tracking_errors(model, without_truth, torch.device("cpu"))


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_composed_config_trains_end_to_end(tmp_path):
    from graphavatar.evaluation import tracking_errors
    from headkit.engine.trainer import train
    gen = [f"data.generator.{k}={v}" for k, v in TINY_GENERATOR.items()]
    cfg = _compose(gen + [
        f"paths.data_dir={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", "trainer.max_steps=3",
        "trainer.progress=false", "trainer.device=cpu", "eval.video=false", "eval.timing_repeats=2",
        "model.unet.filters=[8,8]", "model.unet.K=2", "model.enhancer.channels=[4,8]",
        "model.warmup.steps=4", "model.warmup.fit_steps=4", "model.warmup.log_every=2",
        "data.generator.tracking_noise.pose_rot_deg=1.0"])
    assert cfg.experiment_name == "synthetic_subject"
    metrics = train(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["steps"] == 3 and written["method"] == "GraphAvatar" and metrics["psnr"] == written["psnr"]
    # references computed outside the trainer from the run's checkpoint and the subject's truth
    from headkit.engine.runs import load_run
    run = load_run(tmp_path / "run", device="cpu")
    s, model, test = run.subject, run.model, FrameDataset(run.subject, "test")
    with torch.no_grad():
        outs = [model.get_outputs(test.batch([i])) for i in range(len(test))]
    mses = [((o["image"].clamp(0, 1).double() - test.batch([i])["image"].double()) ** 2).mean().item()
            for i, o in enumerate(outs)]
    assert written["l2"] == pytest.approx(np.mean(mses), rel=1e-4)
    assert written["psnr"] == pytest.approx(np.mean([10 * np.log10(1 / m) for m in mses]), rel=1e-4)
    assert written["num_gaussians"] == pytest.approx(np.mean([o["num_gaussians"].item() for o in outs]))
    assert s.num_vertices <= written["num_gaussians"] <= s.num_vertices * 3  # anchors + up to k=2 children each
    stored = model.stored_state_dict()
    assert written["model_size_mb"] == pytest.approx(sum(t.numel() * t.element_size() for t in stored.values()) / 2**20)
    ids = s.train_ids
    tracked, true = s.camtoworlds[ids].astype(np.float64), s.extras["true_camtoworlds"][ids].astype(np.float64)
    cos = (np.einsum("nij,nij->n", tracked[:, :3, :3], true[:, :3, :3]) - 1) / 2
    assert written["ggo_rot_err_deg_before"] == pytest.approx(np.degrees(np.arccos(np.clip(cos, -1, 1))).mean(),
                                                              rel=1e-3)
    assert written["ggo_trans_err_before"] == pytest.approx(
        np.linalg.norm(tracked[:, :3, 3] - true[:, :3, 3], axis=-1).mean(), rel=1e-4)
    assert 0.2 < written["ggo_rot_err_deg_before"] < 3.0  # data.generator.tracking_noise.pose_rot_deg=1.0
    # benchmarks/ggo_errors.py re-scores the run: the avatar's frame as metrics.json, and the world frame
    from .conftest import load_repo_module
    rescored = load_repo_module("benchmarks/ggo_errors.py").run_errors(str(tmp_path / "run"))
    for tag in ("before", "after"):
        assert rescored[f"avatar_rot_{tag}"] == pytest.approx(written[f"ggo_rot_err_deg_zero_mean_{tag}"], rel=1e-5)
        assert rescored[f"avatar_centre_mm_{tag}"] == pytest.approx(written[f"ggo_centre_err_mm_zero_mean_{tag}"],
                                                                   rel=1e-5)
    world = tracking_errors(*(torch.from_numpy(np.asarray(a, np.float32)) for a in (
        tracked, true, s.expressions[ids], s.extras["true_expressions"][ids])))
    assert rescored["world_rot_before"] == pytest.approx(world["rot_err_deg_zero_mean"], rel=1e-4)
    # benchmarks/ggo_heldout_truth.py: its tracked-camera score is the run's held-out PSNR; with the
    # true test cameras in the run's gauge the frames are rendered from elsewhere
    heldout = load_repo_module("benchmarks/ggo_heldout_truth.py").heldout_psnrs(str(tmp_path / "run"))
    assert heldout["tracked"] == pytest.approx(written["psnr"], rel=1e-5)
    assert heldout["true_aligned"] != pytest.approx(heldout["tracked"], abs=1e-3)
    assert heldout["ggo_on_test"] != pytest.approx(heldout["tracked"], abs=1e-3)  # GGO refines the test frames
    assert (tmp_path / "run" / "warmup.json").is_file()
    assert any((tmp_path / "data").glob("mesh_hierarchy/*.npz"))  # hierarchy cached with the data


def test_insta_experiment_model_fits_the_papers_size(tmp_path):
    import fast_simplification

    from headkit.engine.trainer import build_method
    cfg = _compose(["experiment=insta_subject", "data.root=/nonexistent", f"paths.data_dir={tmp_path}"])
    assert cfg.model.expression_dim == 100 and cfg.model.unet.K == 6 and list(cfg.model.enhancer.channels) == [32, 64, 128]
    v, f = icosphere(5)
    pts, faces = fast_simplification.simplify(v.numpy().astype(np.float64), f.numpy().astype(np.int32),
                                              target_count=10042)
    assert pts.shape[0] == 5023
    T, rng = 2, np.random.default_rng(0)
    verts = (pts[None] * 0.1 + rng.normal(0, 1e-3, (T, 5023, 3))).astype(np.float32)
    c2w = np.tile(np.eye(4, dtype=np.float32), (T, 1, 1))
    c2w[:, 2, 3] = -1.0
    K = np.array([[1000, 0, 256], [0, 1000, 256], [0, 0, 1]], np.float32)
    fake = Subject(name="flame_like", faces=np.asarray(faces, np.int64), template_vertices=(pts * 0.1).astype(np.float32),
                   vertices=verts, expressions=np.zeros((T, 100), np.float32), Ks=np.tile(K, (T, 1, 1)),
                   camtoworlds=c2w, times=np.linspace(0, 1, T, dtype=np.float32),
                   images=np.zeros((T, 512, 512, 3), np.uint8), masks=np.zeros((T, 512, 512), np.uint8),
                   train_ids=np.array([0]), test_ids=np.array([1]))
    model = build_method(cfg, fake)
    size = model_size_mb(model.stored_state_dict())
    assert 2.0 < size <= 10.8  # the paper's 10.8 MB
    assert all(not t.is_sparse for t in model.stored_state_dict().values())  # no template data stored


def test_ablation_table_reads_a_multirun_folder(tmp_path, capsys):
    mod = load_repo_module("scripts/ablation_table.py")
    for i, (name, psnr) in enumerate([("full", 27.5), ("no_ggo", 27.1), ("no_enhancer", 26.0)]):
        run = tmp_path / str(i)
        run.mkdir()
        (run / "config.yaml").write_text(f"ablation_name: {name}\nexperiment_name: synthetic_subject\n")
        (run / "metrics.json").write_text(json.dumps({"l2": 0.002, "psnr": psnr, "ssim": 0.9, "lpips": None,
                                                      "time_per_frame_ms": 90.0, "model_size_mb": 0.9}))
    (tmp_path / "3").mkdir()  # a run that did not finish: listed as missing, not a crash
    (tmp_path / "3" / "config.yaml").write_text("ablation_name: no_neural\n")
    rows = mod.collect(tmp_path)
    assert [r["ablation"] for r in rows] == ["no_neural", "no_ggo", "no_enhancer", "full"]
    text = mod.markdown_table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| Method") and "PSNR" in lines[0] and "Size (MB)" in lines[0]
    assert "| w/o GGO " in text.replace("Graph-guided Optimization", "GGO") or "w/o Graph-guided" in text
    full = next(line for line in lines if line.startswith("| Full"))
    assert "27.50" in full and "n/a" in full and "0.0900" in full  # time in seconds, LPIPS missing
    assert mod.main([str(tmp_path)]) == 0
    assert (tmp_path / "ablation_table.md").read_text().strip() == text.strip()
