"""Evaluate a run on its test split: ``python scripts/eval.py [run=RUN_DIR]``."""

import hydra
from omegaconf import DictConfig

from headkit.engine.evaluate import format_report
from headkit.engine.runs import evaluate_run, find_latest_run

COLUMNS = ["config_name", "psnr", "ssim", "l2", "lpips", "time_per_frame_ms", "fps", "model_size_mb",
           "model_size_fp16_mb", "device"]


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: evaluate ``run`` (or the newest run) and print a table."""
    run_dir = cfg.run or find_latest_run(f"{cfg.paths.output_dir}/train")
    metrics = evaluate_run(run_dir, device=cfg.device, eval_cfg=cfg.eval)
    print(format_report(metrics, COLUMNS))  # + method tables, e.g. the neural cache's Table 1
    print(f"metrics written to {run_dir}/metrics.json")


if __name__ == "__main__":
    main()
