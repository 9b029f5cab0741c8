"""Train an avatar: ``python scripts/train.py [experiment=NAME] [key=value ...]``."""

import sys

import hydra
from omegaconf import DictConfig

from headkit.engine.evaluate import format_report
from headkit.engine.trainer import MissingConfigValue, train

COLUMNS = ["psnr", "ssim", "l2", "lpips", "time_per_frame_ms", "fps", "model_size_mb", "device"]


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; prints the test metrics and returns PSNR (for sweepers)."""
    try:
        metrics = train(cfg)
    except MissingConfigValue as exc:  # e.g. experiment=insta_subject without data.root
        sys.exit(f"error: {exc}")
    print(format_report(metrics, COLUMNS))  # + method tables, e.g. the neural cache's Table 1
    print(f"run folder: {metrics['run_dir']}")
    return float(metrics["psnr"])


if __name__ == "__main__":
    main()
