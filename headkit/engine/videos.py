"""Videos of a trained avatar: retargeting, re-enactment and novel views (``scripts/render.py``).

* **Retargeting** (``source`` given): the trained subject is driven by another subject's tracked
  stream. The source's per-frame deformation in its own head frame (``H_s⁻¹ v_s - template_s``)
  is added to the trained template and placed with the source's head pose (``head_pose=false``:
  the trained subject's first test pose, expression only), seen by the trained subject's first
  test camera; the source expression vector drives the expression-conditioned parts. Both
  subjects need the same mesh topology and expression size. ``source`` holds Hydra overrides of
  the ``data`` group of ``configs/train.yaml`` composed on top of the run's own data config, e.g.
  ``[data.generator.seed=1]`` (the synthetic generator with another motion) or
  ``[data=subject,data.root=DIR]``.
* **Re-enactment** (``reenact=DIR`` or ``blendshapes=CSV``, avatars tracked with
  ``video_preprocess.tracker=ict``): another ICT-tracked subject's expression weights, or a CSV of
  ARKit blendshape weights (face-capture export columns), drive the trained avatar's own head in
  the shared expression space, seen from its first test frame
  (:mod:`headkit.data.video.reenact`).
* **Novel views** (``novel_views`` frames, 0 for none): the trained subject's test frames with the
  tracked mesh rotated about the head centre by a yaw sweep of ``±max_yaw`` degrees (the paper
  rotates the FLAME vertices rather than its joint angles, which would leave the training range).

Frames go through the method's ``render_sequence`` (neural caching: cache + warp as deployed).
Each video is ``rendering | reference`` side by side.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from headkit.cameras import so3_exp
from headkit.data.dataset import FrameDataset
from headkit.data.image_io import to_uint8
from headkit.data.subject import Subject, SubjectError
from headkit.engine.evaluate import write_video
from headkit.engine.runs import find_latest_run, load_run
from headkit.fitting.scene import frame_head_poses

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def source_subject(cfg, overrides: list[str]) -> Subject:
    """The driving subject: the run's ``data`` config with Hydra ``overrides`` applied."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        base = compose("train", overrides=[o for o in overrides if o.startswith("data=")])
    data = base.data if any(o.startswith("data=") for o in overrides) else cfg.data
    data = OmegaConf.merge(data, OmegaConf.from_dotlist([o[len("data."):] for o in overrides
                                                         if o.startswith("data.")]))
    root = OmegaConf.create({"data": data, "paths": cfg.paths})
    return instantiate(root.data, _convert_="all")


def _frame(subject: Subject, t: int, **fields) -> dict[str, torch.Tensor]:
    """Frame ``t`` of ``subject`` as a one-frame batch, with ``fields`` (unbatched) replaced."""
    batch = FrameDataset(subject, "all").batch([t])
    batch.update({k: v[None] for k, v in fields.items()})
    return batch


def retarget_frames(target: Subject, source: Subject, transfer_head_pose: bool = True,
                    max_frames: int | None = None) -> Iterator[tuple[dict, np.ndarray]]:
    """``(batch, source image)`` per source frame: the target's mesh deformed and posed by the source."""
    if source.num_vertices != target.num_vertices:
        raise SubjectError(f"retargeting needs the same mesh topology: source '{source.name}' has "
                           f"{source.num_vertices} vertices, target '{target.name}' {target.num_vertices}")
    if source.expression_dim != target.expression_dim:
        raise SubjectError(f"retargeting needs the same expression size: source '{source.name}' has "
                           f"{source.expression_dim}, target '{target.name}' {target.expression_dim}")
    src_poses, tgt_poses = frame_head_poses(source).double(), frame_head_poses(target).double()
    src_template = torch.from_numpy(source.template_vertices).double()
    tgt_template = torch.from_numpy(target.template_vertices).double()
    anchor = int(target.test_ids[0])
    for t in range(min(source.num_frames, max_frames or source.num_frames)):
        H = src_poses[t] if transfer_head_pose else tgt_poses[anchor]
        v_src = torch.from_numpy(source.vertices[t]).double()
        offsets = (v_src - src_poses[t][:3, 3]) @ src_poses[t][:3, :3] - src_template  # head frame
        verts = (tgt_template + offsets) @ H[:3, :3].T + H[:3, 3]
        batch = _frame(target, anchor, vertices=verts.float(), head_pose=H.float(),
                       expression=torch.from_numpy(source.expressions[t]).float())
        batch["index"] = torch.tensor([t])
        yield batch, source.images[t]


def reenact_frames(target: Subject, root: Path, weights: np.ndarray,  # [N, E]
                   references: np.ndarray | None = None,  # [N, H, W, 3] driving frames
                   ) -> Iterator[tuple[dict, np.ndarray]]:
    """``(batch, reference)``: the target's ICT head driven by ``weights`` at its first test pose."""
    from headkit.data.video.reenact import reenacted_vertices
    from headkit.data.video.trackers import read_head_model

    anchor = int(target.test_ids[0])
    pose = frame_head_poses(target)[anchor].float()
    vertices = reenacted_vertices(read_head_model(root), weights, pose.double().numpy())
    for t, verts in enumerate(vertices):
        batch = _frame(target, anchor, vertices=torch.from_numpy(verts), head_pose=pose,
                       expression=torch.from_numpy(weights[t]).float())
        batch["index"] = torch.tensor([t])
        yield batch, references[t] if references is not None else target.images[anchor]


def novel_view_frames(subject: Subject, num_frames: int = 60, max_yaw_deg: float = 15.0) -> Iterator[tuple[dict, np.ndarray]]:
    """``(batch, test image)``: test frames (cycled) with the mesh turned by a yaw sweep about the head centre."""
    poses = frame_head_poses(subject).double()
    centroid = torch.from_numpy(subject.template_vertices).double().mean(0)
    test = [int(t) for t in subject.test_ids]
    for i in range(num_frames):
        t = test[i % len(test)]
        yaw = math.radians(max_yaw_deg) * math.sin(2 * math.pi * i / max(num_frames, 1))
        R = so3_exp(torch.tensor([0.0, yaw, 0.0], dtype=torch.float64))
        centre = poses[t][:3, :3] @ centroid + poses[t][:3, 3]
        turn = torch.eye(4, dtype=torch.float64)
        turn[:3, :3], turn[:3, 3] = R, centre - R @ centre
        verts = torch.from_numpy(subject.vertices[t]).double() @ R.T + turn[:3, 3]
        batch = _frame(subject, t, vertices=verts.float(), head_pose=(turn @ poses[t]).float())
        batch["index"] = torch.tensor([i])
        yield batch, subject.images[t]


def render_video(model, frames: Iterator[tuple[dict, np.ndarray]], path: Path, fps: float) -> tuple[Path | None, int]:
    """Render ``frames`` through ``model.render_sequence``; write ``[rendering | reference]`` frames."""
    device = next(model.parameters()).device
    refs: list[np.ndarray] = []

    def batches():
        for batch, ref in frames:
            refs.append(ref)
            yield {k: v.to(device) for k, v in batch.items()}

    video = []
    for image in model.render_sequence(batches()):
        video.append(np.concatenate([to_uint8(image[0].clamp(0, 1).cpu().numpy()), refs.pop(0)], axis=1))
    return write_video(path, video, fps=fps), len(video)


@torch.no_grad()  # scoped: a caller (e.g. a test) keeps autograd afterwards
def render_videos(cfg: DictConfig) -> dict[str, Any]:
    """Every video ``cfg`` asks for (``configs/render.yaml``); returns ``{name: {"path", "frames"}}``."""
    run = Path(cfg.run) if cfg.run else find_latest_run(f"{cfg.paths.output_dir}/train")
    loaded = load_run(run, cfg.device)
    subject, model = loaded.subject, loaded.model
    out = Path(cfg.out) if cfg.out else run / "renders"
    out.mkdir(parents=True, exist_ok=True)
    jobs = []  # (name, frames, fps)
    if cfg.source:
        source = source_subject(loaded.cfg, [str(o) for o in cfg.source])
        jobs.append(("retarget", retarget_frames(subject, source, bool(cfg.head_pose), cfg.max_frames), source.fps))
    root = Path(loaded.cfg.data.root) if loaded.cfg.data.get("root") else None
    if cfg.reenact:
        from headkit.data.folder import load_subject_folder

        driver = load_subject_folder(cfg.reenact)
        n = min(driver.num_frames, cfg.max_frames)
        jobs.append(("reenact", reenact_frames(subject, root, driver.expressions[:n], driver.images[:n]), driver.fps))
    if cfg.blendshapes:
        jobs.append(("blendshapes", reenact_frames(subject, root, blendshape_weights(subject, root, cfg)), subject.fps))
    if cfg.novel_views > 0:
        jobs.append(("novel_views", novel_view_frames(subject, cfg.novel_views, cfg.max_yaw), subject.fps))
    written = {}
    for name, frames, fps in jobs:
        path, n = render_video(model, frames, out / f"{name}.mp4", fps)
        written[name] = {"path": str(path) if path else None, "frames": n}
    return written


def blendshape_weights(subject: Subject, root: Path | None, cfg: DictConfig) -> np.ndarray:  # [N, E]
    """The rows of ``cfg.blendshapes`` (ARKit CSV) in the avatar's expression order."""
    from headkit.data.video.reenact import read_arkit_csv

    names = subject.meta.get("expression_names")
    if not names:
        raise SubjectError(f"{root}: the avatar was not tracked with video_preprocess.tracker=ict "
                           "(no expression_names in subject.json), so ARKit weights cannot drive it")
    return read_arkit_csv(cfg.blendshapes, names)[: cfg.max_frames]
