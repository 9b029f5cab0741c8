"""Where a real-footage avatar's error comes from: per-frame PSNR, split by what the frame holds.

    python benchmarks/real_video_breakdown.py RUN_DIR [RUN_DIR ...] [--occluded 60-230] [--out FILE]

For every held-out frame and evenly spaced training frames of each run (finished
``scripts/train.py`` folders on subjects prepared from one clip) it computes the PSNR of the
final and the pre-enhancer image over the whole image and inside the face: the filled face
oval of MediaPipe's landmarks (``subject.extras["landmarks"]``, the same 36 contour points the
ICT fit weights), identical for every tracker since all subjects of a clip share the landmarks
and crops. Frames are grouped by

* head pose against the training frames: a held-out frame's head rotation is "seen" when some
  training frame's rotation lies within ``--pose-deg`` degrees of it (geodesic angle between the
  tracked head-to-camera rotations), else "beyond" (the avatar must extrapolate the pose, and
  long hair, which hangs by gravity rather than turning with the head, is where it fails);
* occlusion (``--occluded``, frame ranges marked by eye, e.g. hands over the face): a head
  model cannot render what covers the head, so these frames bound any training-frame score.

Poses and groups come from the first run's subject (``--poses-from`` to choose another), so
every run is scored on the same frames. PSNR of a group is the mean of per-frame PSNRs, as the
runs' own metrics average them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.path import Path as Polygon

from graphavatar.evaluation import rotation_errors_deg
from headkit.data.dataset import FrameDataset
from headkit.data.video.ict_fit import FACE_OVAL
from headkit.engine.runs import load_run
from headkit.metrics import psnr


def parse_ranges(text: str | None) -> set[int]:
    """``"60-230,300"`` -> the frame numbers it names (inclusive ranges)."""
    frames: set[int] = set()
    for part in filter(None, (text or "").split(",")):
        lo, _, hi = part.partition("-")
        frames.update(range(int(lo), int(hi or lo) + 1))
    return frames


def face_mask(landmarks: np.ndarray, height: int, width: int) -> np.ndarray:  # [L, 2] pixels -> [H, W] bool
    """Pixels whose centres lie inside the face oval of MediaPipe's landmarks."""
    ys, xs = np.mgrid[0:height, 0:width]
    centres = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)
    return Polygon(landmarks[list(FACE_OVAL)]).contains_points(centres).reshape(height, width)


def rotation_gap_deg(poses: np.ndarray, queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per query frame, the geodesic angle (degrees) to the nearest reference frame's head rotation."""
    r = torch.from_numpy(np.asarray(poses[:, :3, :3], dtype=np.float64))
    angles = rotation_errors_deg(r[queries][:, None], r[references][None])  # [Q, R]
    return angles.min(dim=1).values.numpy()


@torch.no_grad()
def frame_scores(run, frames: list[int]) -> dict[int, dict[str, float]]:
    """PSNR of the final and pre-enhancer image, whole and inside the face oval, per frame."""
    subject, scores = run.subject, {}
    landmarks = np.asarray(subject.extras["landmarks"])
    for split in ("train", "test"):
        data = FrameDataset(subject, split)
        ids = [int(i) for i in (subject.train_ids if split == "train" else subject.test_ids)]
        for pos, frame in enumerate(ids):
            if frame not in frames:
                continue
            batch = data.batch([pos], run.device)
            out = run.model.get_outputs(batch)
            target = run.model.target_image(batch)[0]
            face = torch.from_numpy(face_mask(landmarks[frame], subject.height, subject.width))
            row = {}
            for key, image in (("final", out["image"][0]), ("coarse", out["coarse_image"][0])):
                image = image.clamp(0, 1)
                row[key] = psnr(image, target).item()
                row[f"{key}_face"] = psnr(image[face][None], target[face][None]).item()  # [1, N, 3]
            scores[frame] = row
    return scores


def group_rows(name: str, scores: dict[int, dict[str, float]], groups: dict[str, list[int]]) -> list[str]:
    """Markdown rows: mean PSNRs per group for one run."""
    rows = []
    for label, frames in groups.items():
        if not frames:
            continue
        mean = {k: np.mean([scores[f][k] for f in frames]) for k in ("final", "coarse", "final_face", "coarse_face")}
        rows.append(f"| {name} | {label} | {len(frames)} | {mean['final']:.2f} | {mean['coarse']:.2f} | "
                    f"{mean['final_face']:.2f} | {mean['coarse_face']:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished training run folders (same clip)")
    p.add_argument("--train-frames", type=int, default=40, help="training frames scored (evenly spaced)")
    p.add_argument("--occluded", help="frame ranges where something covers the head, e.g. 60-230")
    p.add_argument("--pose-deg", type=float, default=5.0, help="a pose within this of a training pose is 'seen'")
    p.add_argument("--poses-from", help="run whose subject gives the head poses (default: the first)")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    runs = [load_run(Path(r), "cpu") for r in args.runs]
    ref = runs[0] if args.poses_from is None else load_run(Path(args.poses_from), "cpu")
    subject, occluded = ref.subject, parse_ranges(args.occluded)
    train, test = np.asarray(subject.train_ids), np.asarray(subject.test_ids)
    train = train[np.linspace(0, len(train) - 1, min(args.train_frames, len(train))).round().astype(int)]
    poses = np.asarray(subject.head_poses)
    gap = rotation_gap_deg(poses, test, np.asarray(subject.train_ids))
    groups = {
        f"held-out, pose seen (<= {args.pose_deg:g} deg from a training pose)": [int(f) for f, g in zip(test, gap) if g <= args.pose_deg],
        f"held-out, pose beyond (> {args.pose_deg:g} deg)": [int(f) for f, g in zip(test, gap) if g > args.pose_deg],
        "held-out, all": [int(f) for f in test],
        "training, not occluded": [int(f) for f in train if int(f) not in occluded],
        "training, occluded": [int(f) for f in train if int(f) in occluded],
        "training, all": [int(f) for f in train],
    }
    wanted = set(int(f) for f in test) | set(int(f) for f in train)
    lines = ["| run | frames | n | PSNR | PSNR before enh. | face PSNR | face PSNR before enh. |",
             "|---|---|---|---|---|---|---|"]
    for path, run in zip(args.runs, runs):
        lines += group_rows(Path(path).name, frame_scores(run, wanted), groups)
    lines += ["", f"Held-out rotation gap to the nearest training pose: median {np.median(gap):.1f} deg, "
              f"max {gap.max():.1f} deg; occluded frames (marked): {args.occluded or 'none'}."]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
