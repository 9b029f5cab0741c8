"""Finding and re-evaluating finished runs (``scripts/eval.py``).

An evaluation is written beside the training, never over it: into
``RUN/eval/<name or YYYY-MM-DD_HH-MM-SS>/`` (``metrics.json``, ``test_renders/``,
``test_side_by_side.mp4``); the run's own ``metrics.json`` and renders are left as training
wrote them unless ``overwrite=True``. Gatherers (``scripts/ablation_table.py``,
``scripts/neuralcache_table.py``, ``benchmarks/real_video.py``) read :func:`latest_metrics`
and skip evaluation folders with :func:`in_eval_folder`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from headkit.data.dataset import FrameDataset
from headkit.engine.checkpoint import CheckpointManager
from headkit.engine.guards import device_from_string
from headkit.engine.rundir import CONFIG_NAME, METRICS_NAME, load_config, read_metrics, write_metrics
from headkit.engine.trainer import build_method, evaluate_with_config
from headkit.errors import InvalidConfigValue

EVAL_DIRNAME = "eval"  # RUN/eval/<name>/ holds one evaluation each
TRAINING_SOURCE = "training"  # latest_metrics' label for the run's own metrics.json


class RunNotFound(FileNotFoundError):
    """No (finished) run where one was asked for; the message names the folder."""


def find_latest_run(root: str | Path) -> Path:
    """The newest folder under ``root`` holding a ``config.yaml`` and a ``checkpoints/`` folder."""
    root = Path(root)
    runs = [p.parent for p in root.rglob("config.yaml") if (p.parent / "checkpoints").is_dir()]
    if not runs:
        where = f"under {root}" if root.is_dir() else f"({root} does not exist)"
        raise RunNotFound(f"no finished run (config.yaml + checkpoints/) {where}; "
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
    if not run_dir.exists():
        raise RunNotFound(f"run folder {run_dir} does not exist")
    if not run_dir.is_dir():
        raise RunNotFound(f"{run_dir}: not a run folder (a file, not a folder)")
    if not (run_dir / "config.yaml").is_file():
        raise RunNotFound(f"{run_dir}: not a run folder (no config.yaml; scripts/train.py writes one)")
    cfg = load_config(run_dir)
    dev = device_from_string(device)
    subject = instantiate(cfg.data, _convert_="all")
    model = build_method(cfg, subject).to(dev)
    found = CheckpointManager(run_dir / "checkpoints").latest_valid()
    if found is None:
        raise RunNotFound(f"{run_dir / 'checkpoints'}: no valid checkpoint (none saved yet, or none readable)")
    path, state = found
    model.load_state_dict(state["model"])
    return LoadedRun(cfg, subject, model.eval(), dev, path, int(state["step"]))


def _eval_folder(run_dir: Path, name: str | None, now: datetime) -> Path:
    """Create ``run_dir/eval/<name or time>/``; when that folder already holds files the first
    free sibling ``NAME-1``, ``NAME-2``, ... is used instead, with a warning naming both."""
    name = now.strftime("%Y-%m-%d_%H-%M-%S") if name is None else str(name)
    if not name or name in {".", ".."} or Path(name).name != name:
        raise InvalidConfigValue(f"name={name!r}: an evaluation name must be a plain folder name "
                                 "(no '/', not '.' or '..')")
    candidate = run_dir / EVAL_DIRNAME / name
    folder, index = candidate, 0
    while True:
        try:
            folder.mkdir(parents=True)
            break
        except FileExistsError:
            if folder.is_dir() and not any(folder.iterdir()):
                break  # an empty folder holds no evaluation
        index += 1
        folder = candidate.with_name(f"{name}-{index}")
    if folder != candidate:
        warnings.warn(f"evaluation folder {candidate} already holds an evaluation; writing to {folder} "
                      "instead (pass another name, or overwrite=true to replace the run's own metrics)",
                      UserWarning, stacklevel=3)
    return folder


def evaluate_run(run_dir: str | Path, *, device: str = "auto", eval_cfg: DictConfig | dict | None = None,
                 show_progress: bool = True, name: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Rebuild a run (:func:`load_run`), evaluate its test split and write the result beside
    the training, never over it.

    Default: renders, video and ``metrics.json`` go to a fresh ``run_dir/eval/<name>/``
    (``name`` None = the current time, ``YYYY-MM-DD_HH-MM-SS``; a folder that already holds
    files is never reused, the first free ``NAME-1``, ``NAME-2``, ... is taken instead, with a
    warning); the training's own files stay byte-identical. ``overwrite=True``: the old
    behaviour, renders and video into ``run_dir`` itself and the metrics merged into its
    ``metrics.json`` (``name`` must then be None).

    With ``eval_cfg["lpips_download"]`` true (scripts/eval.py: configs/eval/default.yaml), LPIPS
    weights missing at their default place are downloaded first, once, into the torch hub cache
    (:func:`headkit.lpips_net.prepare_lpips_weights`; a failure leaves LPIPS unavailable with
    its reason, the evaluation goes on).

    The written metrics hold the evaluation's full metrics plus ``run_dir``, ``checkpoint``,
    ``steps``, ``config_name``, ``method`` and ``evaluated_at`` (local ISO time). Returns
    them with ``"eval_dir"`` added: the folder whose ``metrics.json`` was written.
    """
    if overwrite and name is not None:
        raise InvalidConfigValue(f"overwrite=true writes into the run folder itself; "
                         f"name={name!r} would be unused, pass one or the other")
    run_dir = Path(run_dir)
    run = load_run(run_dir, device)  # fails on a non-run folder before anything is created
    now = datetime.now()
    out_dir = run_dir if overwrite else _eval_folder(run_dir, name, now)
    metrics = evaluate_with_config(run.model, FrameDataset(run.subject, "test"), out_dir, run.device, eval_cfg,
                                   show_progress)
    metrics.update({"run_dir": str(run_dir), "checkpoint": str(run.checkpoint), "steps": run.step,
                    "config_name": str(run.cfg.get("experiment_name", "default")),
                    "method": type(run.model).__name__, "evaluated_at": now.isoformat(timespec="seconds")})
    write_metrics(out_dir, metrics, merge=overwrite)
    return {**metrics, "eval_dir": str(out_dir)}


def in_eval_folder(path: str | Path) -> bool:
    """True when ``path`` lies inside a run's evaluation folder ``RUN/eval/...`` (``RUN``
    holding a ``config.yaml`` or ``metrics.json``), so gatherers that ``rglob`` for runs do not
    take ``RUN/eval/<name>/`` for a run of its own."""
    return any(parent.name == EVAL_DIRNAME and ((parent.parent / CONFIG_NAME).is_file()
                                                 or (parent.parent / METRICS_NAME).is_file())
               for parent in Path(path).parents)


def latest_metrics(run_dir: str | Path) -> tuple[dict, str]:
    """The run's newest metrics and where they came from.

    The newest ``run_dir/eval/*/metrics.json`` (by its ``evaluated_at``, else the file's
    mtime) with the label ``"eval/<name>"``; without any, the training's
    ``run_dir/metrics.json`` with the label ``"training"``. When ``evaluate_run(...,
    overwrite=True)`` re-evaluated the run in place after the newest evaluation folder, the
    run's own file is the newest and is labelled ``"training (re-evaluated)"``. Errors
    (missing file, invalid JSON) name the file (:func:`~headkit.engine.rundir.read_metrics`).
    """
    run_dir = Path(run_dir)
    candidates = []
    for path in (run_dir / EVAL_DIRNAME).glob(f"*/{METRICS_NAME}"):
        metrics = read_metrics(path.parent)
        mtime = path.stat().st_mtime
        stamp = str(metrics.get("evaluated_at") or datetime.fromtimestamp(mtime).isoformat(timespec="seconds"))
        candidates.append(((stamp, mtime), metrics, f"{EVAL_DIRNAME}/{path.parent.name}"))
    own = run_dir / METRICS_NAME
    if own.is_file() or not candidates:
        metrics = read_metrics(run_dir)  # FileNotFoundError naming it when there is nothing at all
        if metrics.get("evaluated_at"):  # re-evaluated in place (overwrite=True)
            key = (str(metrics["evaluated_at"]), own.stat().st_mtime)
            candidates.append((key, metrics, f"{TRAINING_SOURCE} (re-evaluated)"))
        else:
            candidates.append((("", 0.0), metrics, TRAINING_SOURCE))  # older than any evaluation
    _, metrics, source = max(candidates, key=lambda c: c[0])
    return metrics, source


def find_runs(roots: str | Path | list[str | Path]) -> list[Path]:
    """Every run folder under ``roots`` (a folder or a list; each may itself be a run), sorted.

    A run folder holds a ``config.yaml`` (not Hydra's ``.hydra/config.yaml``) or a
    ``metrics.json``; ``RUN/eval/<name>/`` folders are not runs (:func:`in_eval_folder`). The
    gatherers (``scripts/table.py``, ``ablation_table.py``, ``neuralcache_table.py``) share it.

    Raises:
        FileNotFoundError: a root is not a folder (the message names it).
    """
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    found: set[Path] = set()
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder (pass run or multirun folders, e.g. "
                                    f"outputs/train/multirun_<date_time>)")
        found |= {p.parent for p in root.rglob(METRICS_NAME) if not in_eval_folder(p)}
        found |= {p.parent for p in root.rglob(CONFIG_NAME)
                  if ".hydra" not in p.relative_to(root).parts and not in_eval_folder(p)}
    return sorted(found)


def _select(container: Any, key: str) -> Any:
    """``container``'s value at the dotted ``key`` (None when absent or not resolvable)."""
    for part in key.split("."):
        if isinstance(container, dict) and part in container:
            container = container[part]
        elif isinstance(container, list) and part.isdigit() and int(part) < len(container):
            container = container[int(part)]
        else:
            return None
    return container


@lru_cache(maxsize=256)
def _load_yaml(path: str, mtime_ns: int) -> Any:
    """A parsed config file, cached per path and modification time (gatherers ask it many keys)."""
    config = OmegaConf.load(path)
    OmegaConf.set_readonly(config, True)
    return config


def run_value(run_dir: str | Path, key: str, metrics: dict | None = None) -> Any:
    """A run's value for the dotted ``key``: its ``config.yaml`` (e.g. ``ablation_name``,
    ``model.variant``, ``seed``), else ``metrics`` (e.g. ``subject``, ``method``), else an
    override ``key=value`` in ``.hydra/overrides.yaml`` (e.g. ``ablation``); None if none has it."""
    run_dir = Path(run_dir)
    config = run_dir / CONFIG_NAME
    if config.is_file():
        try:
            value = OmegaConf.select(_load_yaml(str(config), config.stat().st_mtime_ns), key, default=None,
                                     throw_on_resolution_failure=False)
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=False)
        except Exception:  # an unreadable config: fall through to the other sources
            value = None
        if value is not None:
            return value
    if metrics and _select(metrics, key) is not None:
        return _select(metrics, key)
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        for item in OmegaConf.load(overrides):
            name, _, value = str(item).lstrip("+~").partition("=")
            if name == key and value:
                return value
    return None
