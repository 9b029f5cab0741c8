"""Finding and re-evaluating finished runs (``scripts/eval.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from headkit.data.dataset import FrameDataset
from headkit.engine.checkpoint import CheckpointManager
from headkit.engine.guards import device_from_string
from headkit.engine.rundir import load_config, write_metrics
from headkit.engine.trainer import build_method


def find_latest_run(root: str | Path) -> Path:
    """The newest folder under ``root`` holding a ``config.yaml`` and a ``checkpoints/`` folder."""
    root = Path(root)
    runs = [p.parent for p in root.rglob("config.yaml") if (p.parent / "checkpoints").is_dir()]
    if not runs:
        raise FileNotFoundError(f"no finished run (config.yaml + checkpoints/) under {root}; "
                                f"train one with 'python scripts/train.py' or pass run=RUN_DIR")
    return max(runs, key=lambda p: (p / "config.yaml").stat().st_mtime)


@dataclass
class LoadedRun:
    """A finished run rebuilt from its folder: config, subject, method (newest valid checkpoint
    loaded, eval mode, on ``device``), and which checkpoint that was."""

    cfg: DictConfig
    subject: Any
    model: Any
    device: Any
    checkpoint: Path
    step: int


def load_run(run_dir: str | Path, device: str = "auto") -> LoadedRun:
    """Rebuild a run's subject and method from ``run_dir/config.yaml`` and load its newest valid
    checkpoint (scripts/eval.py, scripts/render.py, benchmarks/nc_warp_diagnosis.py)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir)
    dev = device_from_string(device)
    subject = instantiate(cfg.data, _convert_="all")
    model = build_method(cfg, subject).to(dev)
    found = CheckpointManager(run_dir / "checkpoints").latest_valid()
    if found is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no valid checkpoint")
    path, state = found
    model.load_state_dict(state["model"])
    return LoadedRun(cfg, subject, model.eval(), dev, path, int(state["step"]))


def evaluate_run(run_dir: str | Path, *, device: str = "auto", eval_cfg: DictConfig | dict | None = None,
                 show_progress: bool = True) -> dict[str, Any]:
    """Rebuild a run (:func:`load_run`), evaluate the test split, merge the result into the
    run's ``metrics.json`` and return it."""
    run = load_run(run_dir, device)
    ecfg = dict(eval_cfg or {})
    metrics = run.model.evaluate(FrameDataset(run.subject, "test"), Path(run_dir), device=run.device,
                                 with_lpips=bool(ecfg.get("lpips", True)), save_video=bool(ecfg.get("video", True)),
                                 timing_repeats=int(ecfg.get("timing_repeats", 20)),
                                 lpips_weights=ecfg.get("lpips_weights"), show_progress=show_progress)
    metrics.update({"checkpoint": str(run.checkpoint), "steps": run.step,
                    "config_name": str(run.cfg.get("experiment_name", "default")),
                    "method": type(run.model).__name__})
    write_metrics(run_dir, metrics, merge=True)
    return metrics
