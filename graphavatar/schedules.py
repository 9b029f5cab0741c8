"""Learning-rate schedules of GraphAvatar (``model.optim.schedule``): a factor of the base rate
as a function of the run's progress ``t`` in [0, 1]. A new schedule is one function and one
:data:`LR_SCHEDULES` entry."""

from __future__ import annotations

import math
from collections.abc import Callable

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


class LRSchedule:
    """Learning-rate factor per step (for ``LambdaLR``): the schedule named ``kind`` at
    ``t = step / max_steps``, held at its final value after ``max_steps``.

    Only plain values are attributes: ``LambdaLR.state_dict`` saves this object's ``__dict__``
    into every checkpoint, and a function there would make ``torch.load(weights_only=True)``
    refuse the checkpoint; the curve is looked up by name on each call."""

    def __init__(self, kind: str, final_ratio: float, max_steps: int) -> None:
        choose(LR_SCHEDULES, kind, "model.optim.schedule")  # an unknown name fails here, not mid-run
        self.kind, self.final_ratio, self.max_steps = kind, float(final_ratio), int(max_steps)

    def __call__(self, step: int) -> float:
        return LR_SCHEDULES[self.kind](min(step / self.max_steps, 1.0), self.final_ratio)
