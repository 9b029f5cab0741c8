"""Train an avatar: ``python scripts/train.py [experiment=NAME] [key=value ...]``."""

import hydra
from omegaconf import DictConfig

from headkit.cli import user_errors_exit
from headkit.engine.evaluate import format_report
from headkit.engine.trainer import train

COLUMNS = ["psnr", "ssim", "l2", "lpips", "time_per_frame_ms", "fps", "model_size_mb", "device"]


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; prints the test metrics and returns PSNR (for sweepers)."""
    with user_errors_exit():  # bad config values, data, resume mismatch: one "error:" line, exit code 2
        metrics = train(cfg)
    print(format_report(metrics, COLUMNS))  # + method tables, e.g. the neural cache's Table 1
    print(f"run folder: {metrics['run_dir']}")
    return float(metrics["psnr"])


if __name__ == "__main__":
    main()
