"""Head motion per frame of subject folders and the synthetic subject (issue #17, item 2a).

    python benchmarks/motion_stats.py data/demo_ict_128c            # + the default synthetic subject
    python benchmarks/motion_stats.py data/demo_ict_128c --no-synthetic
    python benchmarks/motion_stats.py data/demo_ict_128c --markdown benchmarks/motion_stats.md
    python benchmarks/motion_stats.py data/demo_ict_128c --experiment neuralcache_talking

Angular speed (geodesic angle between consecutive head-to-camera rotations) in degrees per
frame and translational speed of the head centre in mm per frame, percentiles 50/90/99 over all
consecutive frame pairs, and the same per second (see headkit/motion_stats.py). The synthetic
subject is headkit.data.synthetic.generate_synthetic_subject with its default settings;
``--experiment NAME`` adds the synthetic subject of ``configs/experiment/NAME.yaml`` (its
``data.generator`` settings, loaded from or cached under the data folder like training does).
"""

from __future__ import annotations

import argparse
import sys
import time

from headkit.motion_stats import PERCENTILES, motion_stats


def table(rows: list[dict]) -> str:
    cols = ["subject", "frames", "fps"]
    cols += [f"deg/frame p{p}" for p in PERCENTILES] + [f"mm/frame p{p}" for p in PERCENTILES]
    cols += [f"deg/s p{p}" for p in PERCENTILES] + [f"mm/s p{p}" for p in PERCENTILES]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [r["name"], str(r["frames"]), f"{r['fps']:.2f}"]
        vals += [f"{r[f'rot_deg_per_frame_p{p}']:.3f}" for p in PERCENTILES]
        vals += [f"{r[f'trans_mm_per_frame_p{p}']:.3f}" for p in PERCENTILES]
        vals += [f"{r[f'rot_deg_per_s_p{p}']:.1f}" for p in PERCENTILES]
        vals += [f"{r[f'trans_mm_per_s_p{p}']:.1f}" for p in PERCENTILES]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def experiment_subject(name: str):
    """The synthetic subject of ``experiment=name`` (train.py's composed ``data`` config)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from headkit.data.sources import synthetic_subject

    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}"])
    data = OmegaConf.to_container(cfg.data, resolve=True)
    if data.get("_target_") != "headkit.data.sources.synthetic_subject":
        raise SystemExit(f"experiment={name} does not use the synthetic subject ({data.get('_target_')})")
    return synthetic_subject(data["root"], data["generator"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", help="subject folders (headkit.data.folder layout)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the default synthetic subject")
    parser.add_argument("--experiment", action="append", default=[],
                        help="also the synthetic subject of configs/experiment/NAME.yaml (repeatable)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    rows = []
    for folder in args.folders:
        from headkit.data.folder import load_subject_folder
        subject = load_subject_folder(folder)
        rows.append({**motion_stats(subject), "name": f"{subject.name} ({folder})"})
    if not args.no_synthetic:
        from headkit.data.synthetic import generate_synthetic_subject
        start = time.perf_counter()
        subject = generate_synthetic_subject()
        print(f"generated the default synthetic subject in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        rows.append({**motion_stats(subject), "name": "synthetic (generator defaults)"})
    for name in args.experiment:
        rows.append({**motion_stats(experiment_subject(name)), "name": f"synthetic (experiment={name})"})
    text = table(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# Head motion per frame\n\n"
                    "`python benchmarks/motion_stats.py " + " ".join(args.folders)
                    + (" --no-synthetic" if args.no_synthetic else "")
                    + "".join(f" --experiment {n}" for n in args.experiment) + "`\n\n"
                    "Angular speed: geodesic angle between consecutive head-to-camera rotations. "
                    "Translational speed: displacement of the head centre (template centroid) in "
                    "camera coordinates. Percentiles over all consecutive frame pairs.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
