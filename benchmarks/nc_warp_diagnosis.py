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

``--images FILE`` also writes a PNG for 3 test frames of the first run (the fastest, median and
slowest head motion between t-1 and t, or ``--image-frames``), one row each, columns
target t | G(t) | W1 | naive (G(t-1)) | |W1 - target| | |naive - target| (mean absolute RGB
error times ``--gain``, default 4, clipped; the same scale for both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from headkit.cameras import project_points
from headkit.data.dataset import FrameDataset
from headkit.engine.runs import load_run
from headkit.metrics import psnr
from headkit.motion_stats import frame_speeds, head_to_camera
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


IMAGE_COLUMNS = ["target t", "G(t)", "W1 (cache t-1)", "naive G(t-1)", "|W1-target|", "|naive-target|"]


def pick_image_frames(dataset: FrameDataset, deg: np.ndarray) -> list[int]:
    """Test-split positions ``i >= 1`` (frame ``i - 1`` is the previous video frame) with the
    fastest, median and slowest head rotation between ``t-1`` and ``t`` (``deg[f]``: degrees from
    frame ``f`` to ``f + 1``, :func:`headkit.motion_stats.frame_speeds`)."""
    ids = dataset.frame_ids
    pos = [i for i in range(1, len(ids)) if ids[i] - ids[i - 1] == 1]
    order = sorted(pos, key=lambda i: deg[ids[i] - 1])
    return [order[-1], order[len(order) // 2], order[0]]


@torch.no_grad()
def comparison_image(run_dir: str | Path, out: str | Path, positions: list[int] | None = None,
                     gain: float = 4.0) -> list[dict]:
    """Write the ``--images`` PNG (see the module docstring); returns one dict per row with the
    frame id, the head rotation from t-1 (deg) and the PSNRs of G, W1 and naive."""
    from PIL import Image, ImageDraw

    run = load_run(run_dir, device="cpu")
    subject, model = run.subject, run.model
    if model.warp is None:
        raise SystemExit(f"--images: {run_dir} has no warp (a DNR baseline); give a warp run first")
    dataset = FrameDataset(subject, "test")
    deg, _ = frame_speeds(head_to_camera(subject))
    positions = positions or pick_image_frames(dataset, deg)
    rows, info = [], []
    for i in positions:
        prev_b, cur_b = (model.frame_batch(dataset, [j], "cpu") for j in (i - 1, i))
        prev, cur = model.encoder(prev_b), model.encoder(cur_b)
        p_gen, p_cache = model.make_cache(prev)
        gen, _ = model.make_cache(cur)
        target, g, w1, naive = (x.clamp(0, 1)[0] for x in
                                (cur.images, gen["images"], model.warp_frame(p_cache, cur), p_gen["images"]))
        err = lambda x: ((x - target).abs().mean(-1, keepdim=True) * gain).clamp(0, 1).expand_as(x)  # noqa: E731
        rows.append(torch.cat([target, g, w1, naive, err(w1), err(naive)], 1))
        fid = int(dataset.frame_ids[i])
        info.append({"frame": fid, "deg_from_prev": float(deg[fid - 1]),
                     **{k: psnr(x[None], target[None]).item() for k, x in (("G", g), ("W1", w1), ("naive", naive))}})
    grid = (torch.cat(rows, 0).numpy() * 255).round().astype(np.uint8)
    W = rows[0].shape[1] // len(IMAGE_COLUMNS)
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + 14 + 12 * len(rows)), "white")
    canvas.paste(Image.fromarray(grid), (0, 14))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(IMAGE_COLUMNS):
        draw.text((c * W + 2, 1), name + (f" x{gain:g}" if "|" in name else ""), fill="black")
    for r, row in enumerate(info):
        draw.text((2, grid.shape[0] + 16 + 12 * r),
                  f"row {r + 1}: frame {row['frame']}, head turned {row['deg_from_prev']:.2f} deg since t-1; "
                  f"PSNR G {row['G']:.2f}, W1 {row['W1']:.2f}, naive {row['naive']:.2f} dB", fill="black")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return info


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally append) a markdown table per run; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--frames", type=int, default=30, help="frames per split")
    p.add_argument("--out", help="append the markdown to this file")
    p.add_argument("--images", help="write the W1-vs-naive PNG of the first run's test frames here")
    p.add_argument("--image-frames", type=int, nargs=3, help="test-split positions for --images")
    p.add_argument("--gain", type=float, default=4.0, help="error-map amplification for --images")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["| run | split | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for run in args.runs:
        for split, row in diagnose(run, args.frames).items():
            cells = ["n/a" if row[c] is None else f"{row[c]:.2f}" for c in COLUMNS]
            lines.append(f"| {Path(run).name} | {split} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.images:
        for row in comparison_image(args.runs[0], args.images, args.image_frames, args.gain):
            print(f"{args.images}: frame {row['frame']} ({row['deg_from_prev']:.2f} deg from t-1): "
                  f"PSNR G {row['G']:.2f}, W1 {row['W1']:.2f}, naive {row['naive']:.2f}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
