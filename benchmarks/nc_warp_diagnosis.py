"""What a neural-cache run's warp recovers of the motion between frames, and what it could.

    python benchmarks/nc_warp_diagnosis.py RUN_DIR [RUN_DIR ...] [--frames 30] [--out FILE]

For consecutive frames ``(t-1, t)`` of the test and train splits it reports mean PSNR against
frame ``t``'s target of:

* ``G``: the run's generator on frame t itself (the quality a warp could at best keep);
* ``W0``: the warp from the cache of frame t to frame t (no motion to bridge);
* ``W1``: the warp from the cache of frame t-1 (what the 1x-warp mode shows);
* ``naive``: G's image of frame t-1 shown for frame t;
* ``G flow``: G's image of frame t-1 moved to frame t by the mesh-induced optical flow (the
  tracked mesh's vertices projected in both frames, interpolated over frame t's raster;
  zero flow off the mesh): an upper bound for a purely geometric warp of the mesh region;
* ``target flow`` / ``target prev``: the same flow applied to the target of frame t-1, and
  the target of t-1 itself, measuring how much of the frame-to-frame change is mesh motion.

Warp columns are n/a for runs without a warp (DNR baselines).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from headkit.cameras import project_points
from headkit.data.dataset import FrameDataset
from headkit.engine.runs import load_run
from headkit.metrics import psnr
from headkit.render.mesh_raster import interpolate, rasterize_mesh

COLUMNS = ["G", "W0", "W1", "naive", "G flow", "target flow", "target prev"]


def mesh_flow_warp(image: torch.Tensor, before: dict, after: dict, faces: torch.Tensor) -> torch.Tensor:
    """``image [1, H, W, C]`` of frame ``before`` resampled into frame ``after`` along the flow
    of the tracked mesh (pixels off the mesh keep their place)."""
    H, W = image.shape[1:3]
    raster = rasterize_mesh(after["vertices"], faces, after["viewmat"], after["K"], W, H)
    src, _ = project_points(before["vertices"], before["viewmat"], before["K"])  # [1, V, 2] pixels
    src = interpolate(src, faces, raster)  # [1, H, W, 2]: where each pixel of `after` was
    xs, ys = torch.meshgrid(torch.arange(W) + 0.5, torch.arange(H) + 0.5, indexing="xy")
    base = torch.stack([xs, ys], -1)[None].to(src)
    src = torch.where((raster.face_ids >= 0)[..., None], src, base)
    grid = torch.stack([src[..., 0] / W * 2 - 1, src[..., 1] / H * 2 - 1], -1)
    out = F.grid_sample(image.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.permute(0, 2, 3, 1)


@torch.no_grad()
def diagnose(run_dir: str | Path, num_frames: int = 30) -> dict[str, dict[str, float | None]]:
    """``{split: {column: mean PSNR or None}}`` for a run (see the module docstring)."""
    run = load_run(run_dir, device="cpu")
    subject, model = run.subject, run.model
    faces = torch.as_tensor(subject.faces, dtype=torch.int64)
    score = lambda a, b: psnr(a.clamp(0, 1), b).mean().item()  # noqa: E731
    result = {}
    for split in ("test", "train"):
        dataset = FrameDataset(subject, split)
        ids = dataset.frame_ids
        sums = {c: [] for c in COLUMNS}
        prev = None
        for i in range(min(len(dataset), num_frames)):
            batch = model.frame_batch(dataset, [i], "cpu")
            cur = model.encoder(batch)
            if model.warp is not None:
                gen, cache = model.make_cache(cur)
                sums["W0"].append(score(model.warp_frame(cache, cur), cur.images))
            else:
                gen, cache = model.generate(cur), None
            sums["G"].append(score(gen["images"], cur.images))
            if prev is not None and ids[i] - ids[i - 1] == 1:
                p_batch, p_inputs, p_gen, p_cache = prev
                if p_cache is not None:
                    sums["W1"].append(score(model.warp_frame(p_cache, cur), cur.images))
                sums["naive"].append(score(p_gen["images"], cur.images))
                sums["G flow"].append(score(mesh_flow_warp(p_gen["images"], p_batch, batch, faces), cur.images))
                sums["target flow"].append(score(mesh_flow_warp(p_inputs.images, p_batch, batch, faces), cur.images))
                sums["target prev"].append(score(p_inputs.images, cur.images))
            prev = (batch, cur, gen, cache)
        result[split] = {c: (sum(v) / len(v) if v else None) for c, v in sums.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally append) a markdown table per run; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--frames", type=int, default=30, help="frames per split")
    p.add_argument("--out", help="append the markdown to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["| run | split | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for run in args.runs:
        for split, row in diagnose(run, args.frames).items():
            cells = ["n/a" if row[c] is None else f"{row[c]:.2f}" for c in COLUMNS]
            lines.append(f"| {Path(run).name} | {split} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
