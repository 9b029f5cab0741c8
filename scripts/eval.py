"""Evaluate a run on its test split: ``python scripts/eval.py [run=RUN_DIR] [name=NAME] [overwrite=true]``.

Writes beside the training, never over it: ``RUN/eval/<name or YYYY-MM-DD_HH-MM-SS>/`` gets
``metrics.json``, ``test_renders/`` and the video; ``overwrite=true`` replaces the run's own
(see :func:`headkit.engine.runs.evaluate_run`).
"""

import hydra
from omegaconf import DictConfig

from headkit.cli import user_errors_exit
from headkit.engine.evaluate import format_report
from headkit.engine.runs import evaluate_run, find_latest_run

COLUMNS = ["config_name", "psnr", "ssim", "l2", "lpips", "time_per_frame_ms", "fps", "model_size_mb",
           "model_size_fp16_mb", "device"]


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: evaluate ``run`` (or the newest run), print a table and where it went."""
    name = None if cfg.name is None else str(cfg.name)
    with user_errors_exit():  # no such run, its data gone, ...: one "error:" line, exit code 2
        run_dir = cfg.run or find_latest_run(f"{cfg.paths.output_dir}/train")
        metrics = evaluate_run(run_dir, device=cfg.device, eval_cfg=cfg.eval, name=name,
                               overwrite=bool(cfg.overwrite))
    print(format_report(metrics, COLUMNS))  # + method tables, e.g. the neural cache's Table 1
    print(f"metrics written to {metrics['eval_dir']}/metrics.json")


if __name__ == "__main__":
    main()
