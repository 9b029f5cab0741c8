"""Learning-rate schedules of GraphAvatar (``model.optim.schedule``): a factor of the base rate
as a function of the run's progress ``t`` in [0, 1]. A new schedule is one function and one
:data:`LR_SCHEDULES` entry.

The schedule's length is ``model.optim.max_steps`` (by default ``${trainer.max_steps}``, the
run's length). When a finished run is extended (``trainer.resume=true trainer.max_steps=LONGER``)
the schedule follows the new length: :class:`ScheduledLR` keeps the configured length when it
loads a checkpoint's scheduler state, which holds the old one."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from headkit.registry import choose


def constant(t: float, final_ratio: float) -> float:
    """1 throughout."""
    return 1.0


def exponential(t: float, final_ratio: float) -> float:
    """``final_ratio ** t``: log-linear decay from 1 to ``final_ratio``."""
    return final_ratio ** t


def cosine(t: float, final_ratio: float) -> float:
    """Half a cosine from 1 down to ``final_ratio``."""
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


LR_SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "constant": constant, "exponential": exponential, "cosine": cosine}


def round_starts(max_steps: int, rounds: int) -> list[int]:
    """The first step of each round after the first when ``max_steps`` are split into ``rounds``
    equal rounds: ``ceil(k · max_steps / rounds)``, ``k = 1 .. rounds - 1`` (where :class:`LRSchedule`
    starts again, and ``model.ggo.rounds`` restarts the model)."""
    return [math.ceil(k * max_steps / rounds) for k in range(1, rounds)]


class LRSchedule:
    """Learning-rate factor per step (for ``LambdaLR``): the schedule named ``kind`` at
    ``t = step / max_steps``, held at its final value after ``max_steps``.

    With ``rounds`` > 1 (``model.ggo.rounds``) the steps are split into that many equal rounds
    (:func:`round_starts`) and the schedule starts again from the top in each: ``t`` is the
    progress through the current round.

    Only plain values are attributes: ``LambdaLR.state_dict`` saves this object's ``__dict__``
    into every checkpoint, and a function there would make ``torch.load(weights_only=True)``
    refuse the checkpoint; the curve is looked up by name on each call."""

    def __init__(self, kind: str, final_ratio: float, max_steps: int, rounds: int = 1) -> None:
        choose(LR_SCHEDULES, kind, "model.optim.schedule")  # an unknown name fails here, not mid-run
        self.kind, self.final_ratio, self.max_steps, self.rounds = kind, float(final_ratio), int(max_steps), int(rounds)

    def __call__(self, step: int) -> float:
        bounds = [0, *round_starts(self.max_steps, self.rounds), self.max_steps]
        k = max(i for i in range(len(bounds) - 1) if bounds[i] <= step)  # the current round
        t = min((step - bounds[k]) / (bounds[k + 1] - bounds[k]), 1.0)  # progress through it
        return LR_SCHEDULES[self.kind](t, self.final_ratio)


class ScheduledLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` over :class:`LRSchedule` factors whose length is the configured one.

    ``LambdaLR.load_state_dict`` restores every schedule's ``__dict__`` from the checkpoint,
    ``max_steps`` included, so a run resumed with a longer ``trainer.max_steps`` would keep
    decaying over the old length (and sit at ``final_ratio`` for the whole extension). Here the
    values given at construction (length and rounds) win over the loaded ones, and the optimiser's current rates
    are recomputed for the loaded step with them. Load the optimiser's state first (as
    :func:`headkit.engine.checkpoint.resume_or_start` does): it holds the rates of the old
    length. With an unchanged length the recomputed rates are bit-identical to the stored ones.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        configured = [dict(vars(fn)) for fn in self.lr_lambdas]  # length and rounds as configured now
        super().load_state_dict(state_dict)
        for fn, values in zip(self.lr_lambdas, configured):
            vars(fn).update(values)
        rates = [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)]
        for group, rate in zip(self.optimizer.param_groups, rates):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
