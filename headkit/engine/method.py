"""The interface every trainable avatar method implements (nerfstudio ``base_model`` style).

A method is an ``nn.Module`` built from a :class:`~headkit.data.Subject` (topology, expression
size and image size come from the data). The generic trainer (:mod:`headkit.engine.trainer`)
only ever calls the methods below, so GraphAvatar and the neural-cache model share one loop,
one checkpoint format and one evaluation, and differ only where their papers differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from headkit.data.dataset import FrameDataset
from headkit.data.subject import Subject


@dataclass
class TrainContext:
    """What :meth:`Method.before_training` may use: data, device, run folder and logger."""

    subject: Subject
    train_set: FrameDataset
    device: torch.device
    run_dir: Path
    logger: Any
    progress: bool = True


class Method(nn.Module):
    """Base class of avatar methods: outputs, a loss dict and a metrics dict per batch.

    Subclasses must implement :meth:`get_outputs`, :meth:`get_loss_dict` and
    :meth:`configure_optimizers`; the rest has sensible defaults.
    """

    #: expression size the model was built for (checked against the data)
    expression_dim: int = 0

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, Any]:
        """Return ``(optimizer, scheduler or None)``; the scheduler steps once per step."""
        raise NotImplementedError

    def get_outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Render a batch (keys of :data:`headkit.data.FRAME_KEYS`); must include ``image [B,H,W,3]``."""
        raise NotImplementedError

    def get_loss_dict(self, outputs: dict[str, Tensor], batch: dict[str, Tensor],
                      step: int) -> dict[str, Tensor]:
        """Weighted loss terms; the trainer optimises their sum and logs each."""
        raise NotImplementedError

    @torch.no_grad()
    def get_metrics_dict(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, float]:
        """Cheap training-time metrics (PSNR of the final image by default)."""
        from headkit.metrics import psnr
        return {"psnr": psnr(outputs["image"].clamp(0, 1), batch["image"]).mean().item()}

    def sample_train_batch(self, dataset: FrameDataset, step: int, batch_size: int,
                           device: torch.device) -> dict[str, Tensor]:
        """Random training frames (uses the global torch RNG, so resume reproduces the order)."""
        positions = torch.randint(len(dataset), (batch_size,)).tolist()
        return dataset.batch(positions, device)

    def before_training(self, context: TrainContext) -> None:
        """Hook run once before the first optimisation step of a fresh run (e.g. warm-up)."""

    def after_step(self, step: int, train_set: FrameDataset | None = None) -> list[torch.nn.Parameter] | None:
        """Hook run after each optimiser step (e.g. schedules that are not LR schedules), with the
        training frames. Returns the parameters it re-initialised, if any: the trainer drops their
        optimiser moments."""

    def target_image(self, batch: dict[str, Tensor]) -> Tensor:
        """The ground truth a render is scored against, ``[B,H,W,3]``: the frame as stored by
        default; methods that train against a mask-composited frame override this so that
        evaluation scores the same target."""
        return batch["image"]

    @torch.no_grad()
    def render_eval(self, batch: dict[str, Tensor]) -> Tensor:
        """The image shown for a test frame, ``[B,H,W,3]`` in [0, 1]."""
        return self.get_outputs(batch)["image"].clamp(0, 1)

    @torch.no_grad()
    def render_sequence(self, frames: Iterable[dict[str, Tensor]]) -> Iterator[Tensor]:
        """Render consecutive single-frame batches in order (videos, retargeting, novel views),
        yielding ``[1, H, W, 3]`` images; methods with temporal state (caches) override it."""
        for batch in frames:
            yield self.render_eval(batch)

    def stored_state_dict(self) -> dict[str, Tensor]:
        """What a deployment must store to render the avatar (model size is measured on it)."""
        return self.state_dict()

    def evaluate(self, dataset: FrameDataset, run_dir: Path, **kwargs) -> dict[str, Any]:
        """Evaluate on ``dataset`` (the test split); returns the metrics dict for ``metrics.json``."""
        from headkit.engine.evaluate import evaluate_method
        return evaluate_method(self, dataset, run_dir, **kwargs)


def check_expression_dim(model: Method, subject: Subject, key: str = "model.expression_dim") -> None:
    """Raise a clear error when the data's expression size differs from the model's config."""
    from headkit.data.subject import SubjectError
    if model.expression_dim and model.expression_dim != subject.expression_dim:
        raise SubjectError(f"subject '{subject.name}' has expression size {subject.expression_dim} "
                           f"but the config sets {key}={model.expression_dim}")

