"""The one training loop both methods share: ``train(cfg) -> metrics``.

It builds the subject and the method from their ``_target_`` configs, runs the method's
``before_training`` hook (GraphAvatar's warm-up), optimises the sum of the method's loss dict,
logs to TensorBoard and ``scalars.jsonl``, checkpoints atomically, resumes from the newest valid
checkpoint, stops cleanly on a non-finite loss or gradient (after checkpointing the last good
state), and finally evaluates on the test split into ``metrics.json``.

Resuming (``trainer.resume=true run_dir=RUN``): the config must match the saved one except for
:data:`RESUME_MAY_CHANGE`, so a finished run can be extended with a larger ``trainer.max_steps``
(GraphAvatar's LR schedule then spans the new length). Corrupt checkpoints are skipped with a
logged warning (it reaches Hydra's ``train.log``); if none is readable the run stops with
:class:`~headkit.engine.checkpoint.NothingToResume` naming them, never restarting from step 0
over the old run. A run folder whose run failed before its first step is reused by the retry
(:data:`headkit.engine.rundir.NOT_STARTED`).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from headkit.data.dataset import FrameDataset
from headkit.engine.checkpoint import (CheckpointManager, CorruptCheckpointWarning, NothingToResume,
                                       make_checkpoint_state, resume_or_start)
from headkit.engine.guards import NonFiniteError, check_finite, check_finite_grads, device_from_string, explain_oom
from headkit.engine.logging import RunLogger, save_image
from headkit.engine.method import Method, TrainContext, check_expression_dim
from headkit.engine.rundir import (CONFIG_NAME, METRICS_NAME, check_config_compatible, load_config,
                                   make_run_dir, mark_not_started, mark_started, save_config,
                                   write_metrics)
from headkit.engine.seed import seed_everything
from headkit.engine.threads import ThreadPolicy, check_setting
from headkit.errors import InvalidConfigValue
from headkit.lpips_net import prepare_lpips_weights
from headkit.progress import progress

log = logging.getLogger(__name__)

#: config keys that may change when a run is resumed. ``model.optim.max_steps`` is GraphAvatar's
#: LR-schedule length, ``${trainer.max_steps}`` by default: extending a run changes both, and the
#: schedule follows the new length (:class:`graphavatar.schedules.ScheduledLR`).
RESUME_MAY_CHANGE = ("trainer.max_steps", "model.optim.max_steps", "trainer.resume", "trainer.device",
                     "trainer.progress", "trainer.progress_seconds",
                     "trainer.log_every", "trainer.image_every", "trainer.ckpt_every", "trainer.num_threads",
                     "eval.*",
                     "paths.*", "run_dir")

#: what to do when a resume cannot continue the run (command-line spelling)
RESUME_HINT = ("restore a readable checkpoint in the run's checkpoints/ folder, or start a new run: "
               "leave out trainer.resume=true or pass another run_dir=")


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
    check_setting(OmegaConf.select(cfg, "trainer.num_threads"))
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


def resume_run(run_dir: Path, manager: CheckpointManager, model: Method, optimizer, scheduler,
               max_steps: int) -> int:
    """Continue the run in ``run_dir`` (``trainer.resume=true``): load the newest readable
    checkpoint and return its step, or 0 when the run has none yet.

    Skipped corrupt checkpoints are logged (so they reach Hydra's ``train.log``, not only
    stderr). Raises :class:`NothingToResume` when every checkpoint is unreadable, or when the
    run finished (``metrics.json``) but its checkpoints are gone: restarting from step 0 would
    silently replace it. Raises :class:`InvalidConfigValue` when ``trainer.max_steps`` is
    below the steps already done.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorruptCheckpointWarning)
        try:
            start = resume_or_start(manager, model, optimizer, scheduler)
            if start == 0 and not manager.checkpoints() and (run_dir / METRICS_NAME).is_file():
                raise NothingToResume(f"cannot resume {run_dir}: it holds a finished run ({METRICS_NAME}) "
                                      f"but no checkpoint in {manager.directory}")
        except NothingToResume as exc:
            exc.hint = RESUME_HINT
            raise
        finally:
            for warning in caught:
                log.warning("%s", warning.message)
    if start == 0 and not manager.checkpoints() and (run_dir / CONFIG_NAME).is_file():
        log.warning("trainer.resume=true: %s holds no checkpoint yet; starting from step 0", manager.directory)
    if start > max_steps:
        raise InvalidConfigValue(f"invalid config value trainer.max_steps={max_steps}: the run in {run_dir} "
                                 f"has already done {start} steps; pass trainer.max_steps={start} or more")
    return start


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


def _open_run(cfg: DictConfig) -> tuple[Path, bool]:
    """The run folder and whether an existing run is continued (its config checked against
    ``cfg``); a fresh run gets its ``config.yaml`` and the not-started marker."""
    resume = bool(cfg.trainer.resume)
    root = resolve_run_dir(cfg)
    # a folder whose run stopped before its first step is cleared and reused (rundir.NOT_STARTED)
    run_dir = make_run_dir(root, resume=resume, hint=f"trainer.resume=true run_dir={root} continues it")
    continuing = resume and (run_dir / CONFIG_NAME).is_file()
    if continuing:  # its config.yaml is replaced only once a checkpoint has loaded
        check_config_compatible(load_config(run_dir), cfg, ignore=RESUME_MAY_CHANGE)
    else:
        mark_not_started(run_dir)
        save_config(run_dir, cfg)
    return run_dir, continuing


def _run_steps(model: Method, optimizer, scheduler, data: tuple[FrameDataset, FrameDataset], run_dir: Path,
               logger: RunLogger, tcfg: DictConfig, start: int, device, save,
               threads: ThreadPolicy | None = None) -> None:
    """Optimise from step ``start`` to ``trainer.max_steps``: the sum of the loss dict, finite
    checks, logging, previews and checkpoints. ``data`` is ``(train set, preview set)``. On a
    non-finite value the last good state is saved (``save``) before the error goes on.
    ``threads`` (``trainer.num_threads=auto``) follows the other processes' load."""
    train_set, preview_set = data
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
                for restarted in model.after_step(step, train_set) or ():
                    optimizer.state.pop(restarted, None)  # re-initialised by the method: fresh moments
                if threads is not None:
                    threads.update()
                if step == start:
                    mark_started(run_dir)
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
                # free this step's tensors now, not when the next step's replace them (lower peak memory)
                del batch, outputs, losses, total
    except NonFiniteError:
        # parameters are still those before the failing step: keep them, then stop
        save(step, stopped_by="non-finite")
        logger.close()
        log.error("stopped at step %d on a non-finite value; last good state saved in %s", step, run_dir / "checkpoints")
        raise


def evaluate_with_config(model: Method, dataset: FrameDataset, out_dir: Path, device, eval_cfg,
                         show_progress: bool) -> dict[str, Any]:
    """``model.evaluate`` on ``dataset`` into ``out_dir`` with the settings of the ``eval`` config
    group (training's final evaluation and ``scripts/eval.py``). With ``eval.lpips_download``
    missing LPIPS weights are fetched once first (after training, so a run itself is unchanged)."""
    ecfg = dict(eval_cfg or {})
    if ecfg.get("lpips_download"):
        prepare_lpips_weights(ecfg)
    return model.evaluate(dataset, out_dir, device=device, with_lpips=bool(ecfg.get("lpips", True)),
                          save_video=bool(ecfg.get("video", True)), timing_repeats=int(ecfg.get("timing_repeats", 20)),
                          lpips_weights=ecfg.get("lpips_weights"), show_progress=show_progress)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train the configured method on the configured subject; return the final metrics dict."""
    validate_config(cfg)
    tcfg = cfg.trainer
    run_dir, continuing = _open_run(cfg)
    seed_everything(int(cfg.seed), deterministic=bool(tcfg.get("deterministic", False)))
    device = device_from_string(tcfg.device)
    threads = ThreadPolicy(tcfg.get("num_threads"))
    threads.start()

    subject = instantiate(cfg.data, _convert_="all")
    model = build_method(cfg, subject).to(device)
    train_set, test_set = FrameDataset(subject, "train"), FrameDataset(subject, "test")
    optimizer, scheduler = model.configure_optimizers()
    manager = CheckpointManager(run_dir / "checkpoints", keep=int(tcfg.keep_checkpoints))
    resume = bool(tcfg.resume)
    start = resume_run(run_dir, manager, model, optimizer, scheduler, int(tcfg.max_steps)) if resume else 0
    if continuing:
        save_config(run_dir, cfg)
    # resuming drops the records made after the checkpoint (a record of step k is logged when k
    # steps are done, so the checkpoint's own step stays); from step 0 it drops them all
    logger = RunLogger(run_dir, purge_step=(start + 1 if start else 0) if resume else None)
    log.info("run folder %s; %s on %s; %d train / %d test frames; starting at step %d",
             run_dir, type(model).__name__, device, len(train_set), len(test_set), start)

    def save(step: int, **extra) -> None:
        manager.save(make_checkpoint_state(step, model, optimizer, scheduler, config=cfg, **extra), step)

    began = time.perf_counter()
    if start == 0:
        model.before_training(TrainContext(subject, train_set, device, run_dir, logger, bool(tcfg.progress)))
    _run_steps(model, optimizer, scheduler, (train_set, test_set if len(test_set) else train_set), run_dir,
               logger, tcfg, start, device, save, threads)
    steps_done = int(tcfg.max_steps)
    if steps_done > start:
        save(steps_done)
    mark_started(run_dir)  # also a run of trainer.max_steps=0: it is finished
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # queued GPU work belongs to the training time
    train_seconds = time.perf_counter() - began

    metrics = evaluate_with_config(model, test_set, run_dir, device, cfg.get("eval"), bool(tcfg.progress))
    metrics.update({"config_name": str(cfg.get("experiment_name") or cfg.get("task_name", "train")),
                    "method": type(model).__name__, "steps": steps_done,
                    "train_seconds": round(train_seconds, 1), "subject": subject.name,
                    "run_dir": str(run_dir)})
    write_metrics(run_dir, metrics)
    logger.scalars({f"test/{k}": v for k, v in metrics.items() if isinstance(v, float)}, steps_done)
    logger.close()
    return metrics
