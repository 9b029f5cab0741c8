"""GraphAvatar (AAAI'25) assembled as a :class:`headkit.engine.Method`.

Per batch of tracked frames (paper Fig. 2)::

    tracked mesh --(positions, normals)--> geometric U-Net encoder --> z_g ┐
                                           appearance U-Net encoder --> z_a ┤
    normalised time ------------------------------------------------------> GGO --> Δe, Δξ
    e' = e + Δe;  camtoworld' = camtoworld · exp(Δξ)                          (so(3) × R³)
    decoders(z, skips, e') --> anchors: μ = vertex + offset, rotation, scale, SH colour, opacity
    neural Gaussians(anchors, view direction from the refined camera, e') --> k per anchor,
        opacity <= threshold masked out
    rasterize(anchors + neural Gaussians, refined camera) --> coarse image, depth, alpha
    enhancer(coarse image, depth) --> final image

Coordinate frame (``input_space``): the paper feeds the tracked mesh as is (world space). With
``input_space="head"`` (default) the mesh is first brought into the head's own frame with the
tracked head pose (``subject.head_poses``, or a Kabsch fit of the template to the frame's
vertices when the source has none), all Gaussians live in that frame and are rendered with
``viewmat' · head_pose``. The image is identical for the same Gaussians; what changes is that
the U-Nets see (almost) pose-free inputs, so they need not learn the rigid motion, and the
neural Gaussians' offsets turn with the head. It is also the frame of the warm-up's pseudo
Gaussians (:mod:`graphavatar.warmup`). ``input_space="world"`` is the paper's literal version.

GGO on test frames (``ggo.apply_on_test``, default false): GGO is conditioned on the normalised
time, and test frames come after the training range (held-out tail of the video), so its
offsets there are extrapolations of a per-frame correction learned for other frames. By
default test frames are rendered from their tracked expression and camera, as a deployed avatar
driven by new tracking would be. That makes GGO's offsets ambiguous with the avatar itself (a
camera offset shared by all training frames equals moving every Gaussian), so an unpenalised GGO
drifts and misaligns every test render (measured on the synthetic subject: 0.05-0.08 degrees,
1.5-2.5 mm, -1 to -1.4 dB); ``loss.ggo_reg`` (on by default, not in the paper) penalises the
offsets so shared corrections move into the avatar and GGO keeps the per-frame ones. With
``apply_on_test`` GGO refines the test frames too, from their own graph features and the time
code of the last training frame (``ggo.test_time: hold``, :func:`graphavatar.ggo.ggo_times`):
where tracking drifts, the frames just after the training range share much of its last frames'
error (``experiment=ggo_drift``, ``benchmarks/ggo_drift.md``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from headkit.cameras import head_poses, invert_rigid, transform_points
from headkit.data.dataset import FrameDataset
from headkit.data.subject import Subject, SubjectError
from headkit.encodings import eval_sh
from headkit.engine.method import Method, TrainContext
from headkit.losses import composite_over_background
from headkit.mesh import vertex_normals
from headkit.render.gaussians import rasterize_gaussians

from .enhancer import DepthEnhancer
from .ggo import GraphGuidedOptimization, apply_pose_delta, ggo_times
from .graph_unet import AppearanceHead, GeometryHead
from .losses import GraphAvatarLoss
from .neural_gaussians import NeuralGaussians
from .sampling import build_mesh_hierarchy
from .schedules import LRSchedule, ScheduledLR, round_starts
from .settings import ConfigValueError, defaults, section

log = logging.getLogger(__name__)

__all__ = ["GraphAvatar", "depth_normalisation"]


def depth_normalisation(subject: Subject) -> tuple[float, float]:
    """Enhancer depth normalisation ``(offset, scale)`` derived from the data.

    ``offset``: median distance from the camera centre to the tracked mesh's centroid over the
    training frames (the typical depth of the head); ``scale``: the template's radius (largest
    vertex distance from its centroid), the head's depth extent. Depth ``offset ± scale`` then
    maps to ``±1``; background pixels (rendered depth 0) map to ``-offset / scale``, far from it.
    """
    ids = np.asarray(subject.train_ids)
    centres = subject.camtoworlds[ids, :3, 3].astype(np.float64)
    heads = subject.vertices[ids].astype(np.float64).mean(axis=1)
    offset = float(np.median(np.linalg.norm(centres - heads, axis=-1)))
    template = subject.template_vertices.astype(np.float64)
    scale = float(np.linalg.norm(template - template.mean(0), axis=-1).max())
    return offset, max(scale, 1e-6)


class GraphAvatar(Method):
    """Graph U-Nets → anchor + neural Gaussians → splatting → depth-aware enhancer.

    Built from a :class:`Subject` (template topology, expression size, image size, depth
    range). Every other argument is one section of ``configs/model/graphavatar.yaml``, the file
    that holds the keys and defaults (:func:`graphavatar.settings.defaults`). ``*.enabled``
    switches give the paper's ablations (``warmup``, ``neural_gaussians``, ``ggo``,
    ``enhancer``); a disabled module has no parameters at all.

    Args:
        subject: the training subject.
        expression_dim: ``None`` takes the data's size; an integer is checked against it (the
            error names ``model.expression_dim``).
        input_space: ``"head"`` or ``"world"`` (module docstring).
    """

    @staticmethod
    def check_config(settings: dict) -> None:
        """Check the constructor's arguments but ``subject`` (the resolved ``model`` config) without
        any data, so training reports a bad key or value before the subject is loaded
        (:func:`headkit.engine.trainer.validate_model_config`); raises :class:`ConfigValueError`
        naming the key, e.g. ``model.optim.lr.unets``."""
        sections = defaults()
        known = {"expression_dim", "input_space", *sections}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigValueError(f"unknown config key(s) {', '.join('model.' + k for k in unknown)}; "
                                   f"known: {sorted(known)}")
        for name in sections:
            section(name, settings.get(name), sections)
        if settings.get("input_space", "head") not in ("head", "world"):
            raise ConfigValueError(f"invalid config value model.input_space={settings['input_space']!r}: "
                                   "must be 'head' or 'world'")
        dim = settings.get("expression_dim")
        if dim is not None and not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1):
            raise ConfigValueError(f"invalid config value model.expression_dim={dim!r}: "
                                   "must be null or an integer >= 1")

    def __init__(self, subject: Subject, expression_dim: int | None = None, input_space: str = "head",
                 hierarchy: dict | None = None, unet: dict | None = None, geometry: dict | None = None,
                 appearance: dict | None = None, neural_gaussians: dict | None = None, ggo: dict | None = None,
                 enhancer: dict | None = None, render: dict | None = None, warmup: dict | None = None,
                 loss: dict | None = None, optim: dict | None = None) -> None:
        super().__init__()
        given = dict(hierarchy=hierarchy, unet=unet, geometry=geometry, appearance=appearance,
                     neural_gaussians=neural_gaussians, ggo=ggo, enhancer=enhancer, render=render,
                     warmup=warmup, loss=loss, optim=optim)
        sections = defaults()
        self.settings = {name: section(name, value, sections) for name, value in given.items()}
        cfg = self.settings
        if expression_dim is not None and int(expression_dim) != subject.expression_dim:
            raise SubjectError(f"subject '{subject.name}' has expression size {subject.expression_dim} "
                               f"but the config sets model.expression_dim={expression_dim}")
        if input_space not in ("head", "world"):
            raise ConfigValueError(f"invalid config value model.input_space={input_space!r}: must be 'head' or 'world'")
        if subject.width < 1 or subject.height < 1:
            raise ConfigValueError(f"subject '{subject.name}' has image size {subject.width}x{subject.height}; "
                                   f"need a positive width and height (data image size)")
        E, V = subject.expression_dim, subject.num_vertices
        self.expression_dim, self.input_space = E, input_space
        self.width, self.height = subject.width, subject.height
        self.head_poses_given = subject.head_poses is not None

        hierarchy = build_mesh_hierarchy(subject.template_vertices, subject.faces, cfg["hierarchy"]["factors"],
                                         cache_dir=cfg["hierarchy"]["cache_dir"],
                                         preserve_border=cfg["hierarchy"]["preserve_border"])
        unet = cfg["unet"]
        unet_kw = dict(filters=tuple(unet["filters"]), K=unet["K"], latent=unet["latent"],
                       bottleneck=unet["bottleneck"], skip=unet["skip"], head_init=unet["head_init"])
        self.geometry = GeometryHead(hierarchy, expression_dim=E, num_freqs=unet["num_freqs"], **cfg["geometry"],
                                     **unet_kw)
        self.appearance = AppearanceHead(hierarchy, expression_dim=E, num_freqs=unet["num_freqs"],
                                         **cfg["appearance"], **unet_kw)
        self.sh_degree = cfg["appearance"]["sh_degree"]
        self.edge_length = hierarchy.mean_edge_length(0)
        neural = cfg["neural_gaussians"]
        self.neural = None
        if neural["enabled"]:
            self.neural = NeuralGaussians(V, E, **{k: v for k, v in neural.items() if k != "enabled"})
        ggo = cfg["ggo"]
        self.ggo = None
        if ggo["enabled"]:
            self.ggo = GraphGuidedOptimization(2 * unet["latent"], E, num_heads=ggo["num_heads"],
                                               num_freqs=ggo["num_freqs"], frequency_spacing=ggo["frequency_spacing"],
                                               dropout=ggo["dropout"],
                                               shared_momentum=ggo["shared_momentum"])
        enhancer = cfg["enhancer"]
        self.enhancer = None
        if enhancer["enabled"]:
            offset, scale = depth_normalisation(subject)
            self.enhancer = DepthEnhancer(
                tuple(enhancer["channels"]), enhancer["film_hidden"],
                depth_offset=offset if enhancer["depth_offset"] is None else enhancer["depth_offset"],
                depth_scale=scale if enhancer["depth_scale"] is None else enhancer["depth_scale"],
                precision=enhancer["precision"])
        # Data-derived constants: rebuilt with the model, never stored (non-persistent buffers).
        self.register_buffer("background", torch.tensor(cfg["render"]["background"], dtype=torch.float32),
                             persistent=False)
        self.register_buffer("template", torch.from_numpy(np.asarray(subject.template_vertices, np.float32)),
                             persistent=False)
        self.loss_fn = GraphAvatarLoss(**cfg["loss"], translation_unit=depth_normalisation(subject)[0])
        train_times = np.asarray(subject.times, np.float32)[subject.train_ids]
        self.train_time_range = (float(train_times.min()), float(train_times.max()))  # for ggo.test_time
        self.static_avatar = False  # set per training batch by sample_train_batch (ggo.static_avatar_steps)
        # ggo.rounds: the initial values, restored at the start of each later round, and the cameras
        # and expressions refined by the rounds so far (per subject frame; checkpointed)
        self.initial_state = None
        if self.ggo is not None and cfg["ggo"]["rounds"] > 1:
            self.initial_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            self.register_buffer("baked_camtoworlds", torch.tensor(np.asarray(subject.camtoworlds), dtype=torch.float32))
            self.register_buffer("baked_expressions", torch.tensor(np.asarray(subject.expressions), dtype=torch.float32))

    # ----------------------------------------------------------------------------- stages
    def frame_head_poses(self, batch: dict[str, Tensor]) -> Tensor:
        """Tracked head-to-world poses ``[B, 4, 4]`` (:func:`headkit.cameras.head_poses`): the data's,
        else Kabsch template → vertices."""
        return head_poses(batch["head_pose"] if self.head_poses_given else None, self.template, batch["vertices"])

    def local_poses(self, batch: dict[str, Tensor]) -> Tensor:
        """Local (Gaussian) frame to world ``[B, 4, 4]``: the head pose, or identity for ``world``."""
        if self.input_space == "world":
            return torch.eye(4, device=batch["vertices"].device).expand(batch["vertices"].shape[0], 4, 4)
        return self.frame_head_poses(batch)

    def sample_train_batch(self, dataset: FrameDataset, step: int, batch_size: int,
                           device: torch.device) -> dict[str, Tensor]:
        """Random training frames; also decides whether this step trains a static avatar.

        ``ggo.static_avatar_steps`` (not in the paper; 0 = off): for the first N steps the U-Nets
        see the template instead of the tracked mesh and the decoders no expression, so the
        avatar is one static head and GGO's pose offsets are the only per-frame freedom. Slowly
        drifting tracking errors (``experiment=ggo_drift``) must then be corrected by GGO, as in
        bundle adjustment, before the U-Nets can absorb them as per-frame deformations. The step
        comes from the trainer, so a resumed run continues in the right phase."""
        ggo = self.settings["ggo"]
        self.static_avatar = self.ggo is not None and step < ggo["static_avatar_steps"]
        return super().sample_train_batch(dataset, step, batch_size, device)

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """Both U-Net encoders on the tracked mesh in the local frame: bottlenecks and skips
        (on the template in every frame while a static avatar is trained)."""
        poses = self.local_poses(batch)
        vertices = batch["vertices"]
        if self.input_space == "head":
            vertices = transform_points(vertices, invert_rigid(poses))
        if self.training and self.static_avatar:
            vertices = self.template.expand_as(vertices)
        normals = vertex_normals(vertices, self.geometry.faces)
        z_geo, skips_geo = self.geometry.encode(vertices, normals)
        z_app, skips_app = self.appearance.encode(vertices, normals)
        return {"vertices": vertices, "poses": poses, "z_geo": z_geo, "skips_geo": skips_geo,
                "z_app": z_app, "skips_app": skips_app}

    def refine(
        self,
        batch: dict[str, Tensor],  # camtoworld [B,4,4], expression [B,E], time [B]
        encoded: dict[str, Any],  # from encode()
        apply: bool = True,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """GGO: ``(camtoworlds' [B,4,4], expressions' [B,E], offsets)``; ``offsets`` holds
        ``delta_expression [B,E]`` and ``delta_pose [B,6]`` (zero when GGO is disabled or
        ``apply`` is false) and, when GGO ran, ``ggo_shared_expression [E]`` and
        ``ggo_shared_pose [6]``, the part shared by all training frames (for ``ggo_reg.target``)."""
        c2w, expr = batch["camtoworld"], batch["expression"]
        if self.initial_state is not None and apply:  # ggo.rounds: refine what earlier rounds refined
            c2w, expr = self.baked_camtoworlds[batch["index"]], self.baked_expressions[batch["index"]]
        if self.ggo is None or not apply:
            b = c2w.shape[0]
            return c2w, expr, {"delta_expression": expr.new_zeros(b, self.expression_dim),
                               "delta_pose": expr.new_zeros(b, 6)}
        times = ggo_times(batch["time"], self.train_time_range, self.settings["ggo"]["test_time"])
        out = self.ggo(times, torch.cat([encoded["z_geo"], encoded["z_app"]], dim=-1))
        d_expr, d_pose = out["delta_expressions"], out["delta_poses"]
        refined = apply_pose_delta(c2w, d_pose, side=self.settings["ggo"]["pose_side"], head_poses=encoded["poses"])
        return refined, expr + d_expr, {"delta_expression": d_expr, "delta_pose": d_pose,
                                        "ggo_shared_expression": out["shared_expression"],
                                        "ggo_shared_pose": out["shared_pose"]}

    def anchors(self, encoded: dict[str, Any], expressions: Tensor) -> dict[str, Tensor]:  # [B, E]
        """Anchor Gaussians in the local frame: ``means, offsets, scales [B,V,3]``,
        ``quats [B,V,4]``, ``sh [B,V,K,3]``, ``opacities [B,V]``."""
        geo = self.geometry.decode(encoded["z_geo"], encoded["skips_geo"], expressions)
        app = self.appearance.decode(encoded["z_app"], encoded["skips_app"], expressions)
        return {"means": encoded["vertices"] + geo["offsets"], "offsets": geo["offsets"], "quats": geo["quats"],
                "scales": geo["scales"], "sh": app["sh_coeffs"], "opacities": app["opacities"]}

    def rasterize(
        self,
        anchors: dict[str, Tensor],  # from anchors(): [B, V, ...]
        children: dict[str, Tensor] | None,  # from NeuralGaussians: [B, V·k, ...] and mask [B, V·k]
        viewmats: Tensor,  # [B, 4, 4] local frame -> camera
        Ks: Tensor,  # [B, 3, 3]
        centres: Tensor,  # [B, 3] camera centres in the local frame
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Splat anchors (SH evaluated towards ``centres [B,3]``) and kept neural Gaussians.

        Frames are rendered one by one since each keeps a different number of neural Gaussians.
        Returns ``colors [B,H,W,3]``, ``depths [B,H,W,1]`` (alpha-weighted z), ``alphas [B,H,W,1]``
        and ``counts [B]`` (Gaussians rasterized).
        """
        r = self.settings["render"]
        outs, counts = [], []
        for b in range(viewmats.shape[0]):
            means = anchors["means"][b]
            colors = torch.clamp_min(eval_sh(anchors["sh"][b], means - centres[b]) + 0.5, 0.0)
            parts = [(means, anchors["quats"][b], anchors["scales"][b], anchors["opacities"][b], colors)]
            if children is not None:
                keep = children["mask"][b]
                parts.append(tuple(children[k][b][keep] for k in ("means", "quats", "scales", "opacities", "colors")))
            m, q, s, o, c = (torch.cat(x, dim=0) for x in zip(*parts))
            outs.append(rasterize_gaussians(m, q, s, o, c, viewmats[b:b + 1], Ks[b:b + 1], self.width, self.height,
                                            backgrounds=self.background[None], near_plane=r["near_plane"],
                                            backend=r["backend"], tile_size=r["tile_size"])[:3])
            counts.append(float(m.shape[0]))
        colors, depths, alphas = (torch.cat(x, dim=0) for x in zip(*outs))
        return colors, depths, alphas, torch.tensor(counts, device=colors.device)

    def splat(
        self,
        anchors: dict[str, Tensor],  # from anchors(): [B, V, ...]
        camtoworlds: Tensor,  # [B, 4, 4] (refined) cameras
        poses: Tensor,  # [B, 4, 4] local (Gaussian) frame to world
        Ks: Tensor,  # [B, 3, 3]
        expressions: Tensor,  # [B, E] for the neural Gaussians
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The pre-enhancer image of ``anchors`` and their neural Gaussians seen from ``camtoworlds``:
        ``colors, depths, alphas, counts`` as :meth:`rasterize` returns them."""
        cam_to_local = invert_rigid(poses) @ camtoworlds  # the camera in the Gaussians' frame
        centres = cam_to_local[:, :3, 3]
        children = None
        if self.neural is not None:
            children = self.neural(anchors["means"], anchors["quats"], anchors["scales"], centres, expressions)
        return self.rasterize(anchors, children, invert_rigid(cam_to_local), Ks, centres)

    @contextlib.contextmanager
    def ggo_applied(self, apply: bool = True) -> Iterator[None]:
        """Within the block, eval-mode renders apply GGO's refinement (``apply``) or not, whatever
        ``ggo.apply_on_test`` says; the setting is restored after (scoring the training frames as
        the model learnt them: benchmarks/real_video.py, benchmarks/ggo_camera_check.py)."""
        ggo = self.settings["ggo"]
        before, ggo["apply_on_test"] = ggo["apply_on_test"], bool(apply)
        try:
            yield
        finally:
            ggo["apply_on_test"] = before

    # ----------------------------------------------------------------------------- Method API
    def get_outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Render a batch: ``image, coarse_image [B,H,W,3]``, ``depth, alpha [B,H,W,1]``,
        ``num_gaussians [B]``, ``delta_expression [B,E]``, ``delta_pose [B,6]``, plus the anchors'
        ``anchor_offsets, anchor_scales [B,V,3]`` (for the hinge penalties)."""
        apply_ggo = self.training or self.settings["ggo"]["apply_on_test"]
        encoded = self.encode(batch)
        c2w, expressions, offsets = self.refine(batch, encoded, apply_ggo)
        if self.training and self.static_avatar:
            expressions = torch.zeros_like(expressions)
        anchors = self.anchors(encoded, expressions)
        coarse, depths, alphas, counts = self.splat(anchors, c2w, encoded["poses"], batch["K"], expressions)
        image = self.enhancer(coarse, depths) if self.enhancer is not None else coarse
        return {"image": image, "coarse_image": coarse, "depth": depths, "alpha": alphas,
                "num_gaussians": counts, **offsets,
                "anchor_offsets": anchors["offsets"], "anchor_scales": anchors["scales"]}

    def target_image(self, batch: dict[str, Tensor]) -> Tensor:
        """Training targets ``[B,H,W,3]``: the images, or (``render.composite_gt``) the images
        composited over the background colour with the masks (for real data whose background
        is not the render background)."""
        if self.settings["render"]["composite_gt"]:
            return composite_over_background(batch["image"], batch["mask"], self.background)
        return batch["image"]

    def get_loss_dict(self, outputs: dict[str, Tensor], batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Paper eq. 11-12 (see :class:`~graphavatar.losses.GraphAvatarLoss`)."""
        return self.loss_fn(outputs, self.target_image(batch), batch["mask"], step, self.edge_length,
                            has_enhancer=self.enhancer is not None)

    @torch.no_grad()
    def get_metrics_dict(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, float]:
        """PSNR of the final and coarse images, and the mean number of Gaussians rasterized."""
        from headkit.metrics import psnr
        targets = self.target_image(batch)
        return {"psnr": psnr(outputs["image"].clamp(0, 1), targets).mean().item(),
                "psnr_coarse": psnr(outputs["coarse_image"].clamp(0, 1), targets).mean().item(),
                "num_gaussians": outputs["num_gaussians"].mean().item()}

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Parameters per optimiser group (``optim.lr`` keys); disabled modules have none."""
        groups = {"unets": list(self.geometry.parameters()) + list(self.appearance.parameters())}
        if self.neural is not None:
            groups["neural_anchors"] = [self.neural.features, self.neural.offsets]
            groups["neural_mlps"] = [p for name, p in self.neural.named_parameters()
                                     if name.startswith("mlp_")]
        if self.ggo is not None:
            groups["ggo"] = list(self.ggo.parameters())
        if self.enhancer is not None:
            groups["enhancer"] = list(self.enhancer.parameters())
        return groups

    def round_starts(self) -> list[int]:
        """The steps at which ``ggo.rounds`` starts a new round (:func:`~graphavatar.schedules.round_starts`,
        where the LR schedule starts again); empty without rounds."""
        if self.initial_state is None:
            return []
        return round_starts(self.settings["optim"]["max_steps"], self.settings["ggo"]["rounds"])

    def after_step(self, step: int, train_set: FrameDataset | None = None) -> list[torch.nn.Parameter]:
        """``ggo.rounds`` (not in the paper): when step ``step + 1`` starts a new round, the training
        frames' cameras and expressions as GGO refines them now (and the test frames', where GGO
        refines those: ``ggo.apply_on_test``) become the ones the next round refines, and the
        whole model (GGO included) goes back to its initial values, as if it were trained again
        from scratch on the refined tracking (an avatar learnt from drifted frames
        holds the poses where they were when it was learnt: ``benchmarks/ggo_drift.md``). The
        warm-up is not run again. Returns the parameters whose optimiser moments the trainer drops
        (all of them)."""
        if step + 1 not in self.round_starts():
            return []
        from .evaluation import training_frame_tracking
        splits = ("train", "test") if self.settings["ggo"]["apply_on_test"] else ("train",)
        for split in splits:  # bake what renders refine: the test frames too where GGO refines them
            refined = training_frame_tracking(self, train_set.subject, self.baked_camtoworlds.device, split=split)
            self.baked_camtoworlds[refined["ids"]] = refined["c2w_after"]
            self.baked_expressions[refined["ids"]] = refined["expr_after"]
        self.load_state_dict(self.initial_state, strict=False)  # all but the baked tracking
        self.ggo.shared_offset.zero_()
        log.info("GGO round %d of %d starts at step %d: tracking refined, model re-initialised",
                 self.round_starts().index(step + 1) + 2, self.settings["ggo"]["rounds"], step + 1)
        return list(self.parameters())

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, Any]:
        """Adam (fused; multi-tensor where the device has no fused kernel) with one group per module
        (``optim.lr``) and one LR schedule for all of them, over
        ``optim.max_steps`` steps (the run's ``trainer.max_steps`` unless set apart); a resumed
        run with another length follows the new one (:class:`~graphavatar.schedules.ScheduledLR`)."""
        o = self.settings["optim"]
        groups = [{"params": params, "lr": float(o["lr"][name]), "name": name}
                  for name, params in self.parameter_groups().items()]
        # Fused Adam (one kernel per step instead of a dozen ops per parameter; issue #15: ~4x faster
        # optimiser step on CPU, equal to the per-parameter Adam to float rounding) on CPU and CUDA;
        # elsewhere multi-tensor Adam, bit-identical to the per-parameter one.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                    for group in groups for p in group["params"])
        optimizer = torch.optim.Adam(groups, fused=True) if fused else torch.optim.Adam(groups, foreach=True)
        schedule = LRSchedule(o["schedule"], o["final_ratio"], o["max_steps"],
                              self.settings["ggo"]["rounds"] if self.ggo is not None else 1)
        return optimizer, ScheduledLR(optimizer, schedule)

    def before_training(self, context: TrainContext) -> None:
        """The warm-up (``warmup.enabled``): pseudo Gaussians, then anchors trained toward them."""
        if self.settings["warmup"]["enabled"] and self.settings["warmup"]["steps"] > 0:
            from .warmup import run_warmup
            run_warmup(self, context)

    def evaluate(self, dataset: FrameDataset, run_dir: Path, **kwargs) -> dict[str, Any]:
        """The generic test-split evaluation plus GGO's tracking errors on the training frames
        (``ggo_*`` keys, when the subject holds the true cameras/expressions) and the mean number
        of Gaussians rasterized per test frame."""
        from .evaluation import count_gaussians, ggo_tracking_errors
        metrics = super().evaluate(dataset, run_dir, **kwargs)
        device = kwargs.get("device") or next(self.parameters()).device
        metrics["num_gaussians"] = count_gaussians(self, dataset, device)
        if self.ggo is not None:
            metrics.update(ggo_tracking_errors(self, dataset.subject, device))
        return metrics
