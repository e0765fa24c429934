"""Learning-rate schedules (pure): a linear warm-up, then a registered decay.

Each schedule maps the progress through the decay phase, p = (step − warmup) / (total − warmup) for the
0-based optimizer step, to a multiplier of the peak learning rate: the first step after warm-up runs at the
peak (p = 0) and the last at a small positive lr (p = 1 − 1 / (total − warmup)), as the decay of
transformers' `get_linear_schedule_with_warmup`; p = 1 (a factor of 0 for linear and cosine) only past the
stage's end."""

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
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of a stage of `total` steps:
    linear warm-up over `warmup` steps ((step + 1) / warmup), then the schedule's decay from the peak."""
    decay = LR_SCHEDULES[schedule]
    if warmup and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return decay(min(1.0, (step - warmup) / (total - warmup)))
