"""Learning-rate schedules (pure): a linear warm-up, then a registered decay.

Each schedule maps the progress through the decay phase (0 < p <= 1, reaching 1 at the stage's last
step) to a multiplier of the peak learning rate."""

from __future__ import annotations

import math
from collections.abc import Callable

from orchestrator.methods.registry import Registry

LR_SCHEDULES: Registry[Callable[[float], float]] = Registry("lr schedule")


@LR_SCHEDULES.register("linear", source="TRL's default")
def linear_decay(progress: float) -> float:
    return 1.0 - progress


@LR_SCHEDULES.register("cosine", source="Loshchilov & Hutter 2017 (SGDR), without restarts")
def cosine_decay(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@LR_SCHEDULES.register("constant")
def constant(progress: float) -> float:
    return 1.0


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warm-up over
    `warmup` steps, then the schedule's decay, which reaches its end after step `total`."""
    decay = LR_SCHEDULES[schedule]
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return decay(min(1.0, (step - warmup + 1) / (total - warmup)))
