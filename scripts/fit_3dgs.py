"""Fit static 3D Gaussians to a subject: ``python scripts/fit_3dgs.py [data=...] [steps=...] [out=DIR]``."""

import hydra
from omegaconf import DictConfig

from headkit.cli import user_errors_exit
from headkit.gaussian_fit import fit_3dgs


@hydra.main(version_base="1.3", config_path="../configs", config_name="fit_3dgs")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; prints the test metrics and returns the test PSNR (for sweepers)."""
    with user_errors_exit():  # a missing subject folder, a failed download, ...: one "error:" line
        metrics = fit_3dgs(cfg)
    for key in ("psnr", "ssim", "lpips", "num_gaussians", "steps", "train_seconds", "time_per_frame_ms",
                "model_size_mb", "device", "run_dir"):
        print(f"{key:>18}: {metrics.get(key)}")
    if metrics.get("lpips") is None and metrics.get("lpips_unavailable_reason"):
        print(f"LPIPS unavailable: {metrics['lpips_unavailable_reason']}")
    return float(metrics["psnr"])


if __name__ == "__main__":
    main()
