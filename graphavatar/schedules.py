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
    ``t = step / max_steps``, held at its final value after ``max_steps``."""

    def __init__(self, kind: str, final_ratio: float, max_steps: int) -> None:
        self.kind, self.final_ratio, self.max_steps = kind, float(final_ratio), int(max_steps)
        self.curve = choose(LR_SCHEDULES, kind, "model.optim.schedule")

    def __call__(self, step: int) -> float:
        return self.curve(min(step / self.max_steps, 1.0), self.final_ratio)
