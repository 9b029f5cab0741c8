"""The one training loop both methods share: ``train(cfg) -> metrics``.

It builds the subject and the method from their ``_target_`` configs, runs the method's
``before_training`` hook (GraphAvatar's warm-up), optimises the sum of the method's loss dict,
logs to TensorBoard and ``scalars.jsonl``, checkpoints atomically, resumes from the newest valid
checkpoint, stops cleanly on a non-finite loss or gradient (after checkpointing the last good
state), and finally evaluates on the test split into ``metrics.json``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from headkit.data.dataset import FrameDataset
from headkit.engine.checkpoint import CheckpointManager, make_checkpoint_state, resume_or_start
from headkit.errors import InvalidConfigValue
from headkit.engine.guards import NonFiniteError, check_finite, check_finite_grads, device_from_string, explain_oom
from headkit.engine.logging import RunLogger, save_image
from headkit.progress import progress
from headkit.engine.method import Method, TrainContext, check_expression_dim
from headkit.engine.rundir import (check_config_compatible, load_config, make_run_dir, save_config,
                                   write_metrics)
from headkit.engine.seed import seed_everything

log = logging.getLogger(__name__)

#: config keys that may change when a run is resumed
RESUME_MAY_CHANGE = ("trainer.max_steps", "trainer.resume", "trainer.device", "trainer.progress",
                     "trainer.progress_seconds",
                     "trainer.log_every", "trainer.image_every", "trainer.ckpt_every", "trainer.num_threads",
                     "eval.*",
                     "paths.*", "run_dir")


class MissingConfigValue(ValueError):
    """A mandatory config value (``???``) was not set; the message names the keys."""


def check_missing(cfg: DictConfig) -> None:
    """Raise :class:`MissingConfigValue` naming every ``???`` key, e.g. ``data.root``."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise MissingConfigValue("missing config value(s): " + ", ".join(missing) + "; set them on the "
                                 "command line, e.g. " + " ".join(f"{k}=..." for k in missing))




#: trainer keys that must be integers, and their smallest allowed value
TRAINER_INT_MINIMUM = {"trainer.max_steps": 0, "trainer.batch_size": 1, "trainer.log_every": 1,
                       "trainer.ckpt_every": 1, "trainer.image_every": 1}


def validate_model_config(cfg: DictConfig) -> None:
    """Check ``cfg.model`` without data: the model class's ``check_config(settings)`` hook, when
    it has one (:meth:`graphavatar.model.GraphAvatar.check_config`), gets the resolved settings
    (its constructor's keyword arguments but ``subject``) and raises naming the bad key."""
    if cfg.get("model") is None or not cfg.model.get("_target_"):
        return
    # a partial: Hydra locates (and vets) the target and converts the settings, nothing is built
    partial = instantiate(cfg.model, _partial_=True, _convert_="all")
    check = getattr(getattr(partial, "func", None), "check_config", None)
    if callable(check):
        check(dict(partial.keywords))


def validate_config(cfg: DictConfig) -> None:
    """Reject missing and invalid values early, before any data is loaded, with the offending
    key named: ``???`` values, the trainer's counts, and the model's settings."""
    check_missing(cfg)
    for key, minimum in TRAINER_INT_MINIMUM.items():
        value = OmegaConf.select(cfg, key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise InvalidConfigValue(f"invalid config value {key}={value!r}: must be an integer >= {minimum}")
    validate_model_config(cfg)


def resolve_run_dir(cfg: DictConfig) -> Path:
    """The run folder: ``cfg.run_dir`` if set, else Hydra's output folder, else ``outputs/train``."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not inside @hydra.main
        return Path(cfg.paths.output_dir) / "train"


def build_method(cfg: DictConfig, subject) -> Method:
    """Instantiate ``cfg.model`` for ``subject`` (plain containers, not DictConfigs)."""
    # a partial, so Hydra does not try to turn the Subject dataclass into a config node
    model = instantiate(cfg.model, _partial_=True, _convert_="all")(subject=subject)
    if not isinstance(model, Method):
        raise TypeError(f"model._target_ built a {type(model).__name__}, not a headkit Method")
    check_expression_dim(model, subject)
    return model


def _log_step(model: Method, optimizer, losses: dict, total, outputs: dict, batch: dict, logger: RunLogger,
              bar, step: int) -> None:
    """Scalars of one step to TensorBoard/``scalars.jsonl``, and the main ones onto the progress
    bar or line (loss, train PSNR)."""
    scalars = {f"loss/{k}": v.item() for k, v in losses.items()}
    scalars["loss/total"] = total.item()
    metrics = model.get_metrics_dict(outputs, batch)
    scalars.update({f"train/{k}": v for k, v in metrics.items()})
    scalars["train/lr"] = optimizer.param_groups[0]["lr"]
    logger.scalars(scalars, step)
    shown = {"loss": f"{total.item():.4f}"}
    if "psnr" in metrics:
        shown["psnr"] = f"{metrics['psnr']:.2f}"
    bar.set_postfix(**shown)


def preview_step(max_steps: int, image_every: int) -> int:
    """The step of the first preview: 2 % into the run (at most ``image_every``, at least 1), so a
    user has a picture to look at early."""
    return max(1, min(image_every, max_steps // 50))


@torch.no_grad()
def write_preview(model: Method, dataset: FrameDataset, run_dir: Path, logger: RunLogger, step: int,
                  device) -> Path:
    """``run_dir/preview.png``: render | ground truth of the dataset's first frame (the test
    split's when there is one), replaced atomically so a viewer never sees half a file; also
    logged to TensorBoard as ``preview``."""
    was_training = model.training
    model.eval()
    batch = dataset.batch([0], device)
    image = torch.cat([model.render_eval(batch)[0].clamp(0, 1), model.target_image(batch)[0]], dim=1)
    model.train(was_training)
    tmp = run_dir / "preview.tmp.png"
    save_image(tmp, image)
    os.replace(tmp, run_dir / "preview.png")
    logger.image("preview", image, step)
    return run_dir / "preview.png"


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the configured method on the configured subject; return the final metrics dict."""
    validate_config(cfg)
    tcfg = cfg.trainer
    run_dir = make_run_dir(resolve_run_dir(cfg), resume=bool(tcfg.resume))
    if tcfg.resume and (run_dir / "config.yaml").is_file():
        check_config_compatible(load_config(run_dir), cfg, ignore=RESUME_MAY_CHANGE)
    save_config(run_dir, cfg)
    seed_everything(int(cfg.seed), deterministic=bool(tcfg.get("deterministic", False)))
    device = device_from_string(tcfg.device)
    if tcfg.get("num_threads"):
        torch.set_num_threads(int(tcfg.num_threads))

    subject = instantiate(cfg.data, _convert_="all")
    model = build_method(cfg, subject).to(device)
    train_set = FrameDataset(subject, "train")
    test_set = FrameDataset(subject, "test")
    optimizer, scheduler = model.configure_optimizers()
    manager = CheckpointManager(run_dir / "checkpoints", keep=int(tcfg.keep_checkpoints))
    start = resume_or_start(manager, model, optimizer, scheduler) if tcfg.resume else 0
    logger = RunLogger(run_dir, purge_step=start or None)
    log.info("run folder %s; %s on %s; %d train / %d test frames; starting at step %d",
             run_dir, type(model).__name__, device, len(train_set), len(test_set), start)

    def save(step: int, **extra) -> None:
        manager.save(make_checkpoint_state(step, model, optimizer, scheduler, config=cfg, **extra), step)

    began = time.perf_counter()
    if start == 0:
        model.before_training(TrainContext(subject, train_set, device, run_dir, logger, bool(tcfg.progress)))
    preview_set = test_set if len(test_set) else train_set
    step = start
    try:
        with explain_oom(("data.generator.width/height or the data resolution",
                          "trainer.batch_size", "model size settings (e.g. neural Gaussians k)")):
            bar = progress(range(start, int(tcfg.max_steps)), desc="train", enabled=None if tcfg.progress else False,
                           initial=start, total=int(tcfg.max_steps), every=int(tcfg.log_every),
                           min_seconds=float(tcfg.get("progress_seconds", 15.0)))
            for step in bar:
                model.train()
                batch = model.sample_train_batch(train_set, step, int(tcfg.batch_size), device)
                outputs = model.get_outputs(batch)
                losses = model.get_loss_dict(outputs, batch, step)
                total = torch.stack([v for v in losses.values()]).sum()
                check_finite({**losses, "loss": total}, step)
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                check_finite_grads(model, step)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                model.after_step(step)
                if (step + 1) % tcfg.log_every == 0 or step == start:
                    _log_step(model, optimizer, losses, total, outputs, batch, logger, bar, step + 1)
                if (step + 1) % tcfg.image_every == 0:
                    logger.image("train/render_vs_gt", torch.cat([outputs["image"][0].detach().clamp(0, 1),
                                                                  batch["image"][0]], dim=1), step + 1)
                if step + 1 == preview_step(int(tcfg.max_steps), int(tcfg.image_every)) \
                        or (step + 1) % tcfg.image_every == 0:
                    write_preview(model, preview_set, run_dir, logger, step + 1, device)
                if (step + 1) % tcfg.ckpt_every == 0:
                    save(step + 1)
    except NonFiniteError:
        # parameters are still those before the failing step: keep them, then stop
        save(step, stopped_by="non-finite")
        logger.close()
        log.error("stopped at step %d on a non-finite value; last good state saved in %s", step, manager.directory)
        raise
    steps_done = int(tcfg.max_steps)
    if steps_done > start:
        save(steps_done)
    train_seconds = time.perf_counter() - began

    ecfg = cfg.get("eval", {}) or {}
    metrics = model.evaluate(test_set, run_dir, device=device, with_lpips=bool(ecfg.get("lpips", True)),
                             save_video=bool(ecfg.get("video", True)),
                             timing_repeats=int(ecfg.get("timing_repeats", 20)), lpips_weights=ecfg.get("lpips_weights"),
                             show_progress=bool(tcfg.progress))
    metrics.update({"config_name": str(cfg.get("experiment_name") or cfg.get("task_name", "train")),
                    "method": type(model).__name__, "steps": steps_done,
                    "train_seconds": round(train_seconds, 1), "subject": subject.name,
                    "run_dir": str(run_dir)})
    write_metrics(run_dir, metrics)
    logger.scalars({f"test/{k}": v for k, v in metrics.items() if isinstance(v, float)}, steps_done)
    logger.close()
    return metrics
