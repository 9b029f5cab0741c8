"""Render videos of a trained avatar: retargeting and novel views (neural caching Sec. 5.4-5.5).

    python scripts/render.py --run RUN_DIR [--source data.generator.seed=1 ...] [--out DIR]

* **Retargeting** (``--source`` given): the trained subject is driven by another subject's
  tracked stream. The source's per-frame deformation in its own head frame
  (``H_s⁻¹ v_s - template_s``) is added to the trained template and placed with the source's
  head pose (``--no-head-pose``: the trained subject's first test pose, expression only), seen
  by the trained subject's first test camera; the source expression vector drives the
  expression-conditioned parts. Both subjects need the same mesh topology and expression
  size. ``--source`` takes Hydra overrides of the ``data`` group of ``configs/train.yaml``
  composed on top of the run's own data config, e.g. ``data.generator.seed=1`` (the synthetic
  generator with another motion) or ``data=subject data.root=DIR``.
* **Re-enactment** (``--reenact DIR`` or ``--blendshapes CSV``, avatars tracked with
  ``video_preprocess.tracker=ict``): another ICT-tracked subject's expression weights, or a CSV of
  ARKit blendshape weights (face-capture export columns), drive the trained avatar's own head in
  the shared expression space, seen from its first test frame
  (:mod:`headkit.data.video.reenact`). Writes ``reenact.mp4`` (rendering | driving frame) or
  ``blendshapes.mp4``.
* **Novel views** (always): the trained subject's test frames with the tracked mesh rotated
  about the head centre by a yaw sweep of ``±--max-yaw`` degrees (the paper rotates the
  FLAME vertices rather than its joint angles, which would leave the training range).

Frames go through the method's ``render_sequence`` (neural caching: cache + warp as deployed).
Writes ``retarget.mp4`` (rendering | source frame) and ``novel_views.mp4`` (rendering | unturned test frame)
into ``--out`` (default ``RUN_DIR/renders``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from headkit.cameras import so3_exp
from headkit.data.dataset import FrameDataset
from headkit.data.image_io import to_uint8
from headkit.data.subject import Subject, SubjectError
from headkit.engine.evaluate import write_video
from headkit.engine.runs import find_latest_run, load_run
from headkit.gaussian_fit import frame_head_poses

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="run folder (default: the newest under outputs/train)")
    p.add_argument("--source", nargs="*", default=None,
                   help="Hydra overrides of the driving subject's data config, e.g. data.generator.seed=1")
    p.add_argument("--no-head-pose", action="store_true", help="retarget the expression only")
    p.add_argument("--reenact", help="another subject folder tracked with tracker=ict: its expression weights "
                                     "drive this avatar (cross-identity re-enactment)")
    p.add_argument("--blendshapes", help="CSV of ARKit blendshape weights (one row a frame) that drive this avatar")
    p.add_argument("--max-frames", type=int, default=120, help="driving frames to retarget")
    p.add_argument("--novel-views", type=int, default=60, help="frames of the novel-view sweep (0: none)")
    p.add_argument("--max-yaw", type=float, default=15.0,
                   help="yaw amplitude of the sweep, degrees (added to the tracked pose; beyond the "
                        "training views the renderer breaks down: try 30 on the synthetic subject)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output folder (default: RUN/renders)")
    args = p.parse_args(argv)
    run = Path(args.run) if args.run else find_latest_run("outputs/train")
    loaded = load_run(run, args.device)
    cfg, subject, model = loaded.cfg, loaded.subject, loaded.model
    out = Path(args.out) if args.out else run / "renders"
    out.mkdir(parents=True, exist_ok=True)
    if args.source is not None:
        source = source_subject(cfg, args.source)
        path, n = render_video(model, retarget_frames(subject, source, not args.no_head_pose, args.max_frames),
                               out / "retarget.mp4", source.fps)
        print(f"retargeting '{source.name}' -> '{subject.name}': {n} frames -> {path}")
    root = Path(cfg.data.root)
    if args.reenact:
        from headkit.data.folder import load_subject_folder

        driver = load_subject_folder(args.reenact)
        n = min(driver.num_frames, args.max_frames)
        path, n = render_video(model, reenact_frames(subject, root, driver.expressions[:n], driver.images[:n]),
                               out / "reenact.mp4", driver.fps)
        print(f"re-enactment '{driver.name}' -> '{subject.name}': {n} frames -> {path}")
    if args.blendshapes:
        from headkit.data.video.reenact import read_arkit_csv

        names = subject.meta.get("expression_names")
        if not names:
            raise SubjectError(f"{root}: the avatar was not tracked with video_preprocess.tracker=ict "
                               "(no expression_names in subject.json), so ARKit weights cannot drive it")
        weights = read_arkit_csv(args.blendshapes, names)[: args.max_frames]
        path, n = render_video(model, reenact_frames(subject, root, weights), out / "blendshapes.mp4", subject.fps)
        print(f"blendshapes {args.blendshapes} -> '{subject.name}': {n} frames -> {path}")
    if args.novel_views > 0:
        path, n = render_video(model, novel_view_frames(subject, args.novel_views, args.max_yaw),
                               out / "novel_views.mp4", subject.fps)
        print(f"novel views (yaw ±{args.max_yaw:g}°): {n} frames -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
