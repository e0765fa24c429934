"""What every training step is checked for, the same way on every worker: a non-finite loss or gradient
norm (guard.on_nonfinite: fail, or skip the update), and a requested stop (ctx.stop: runtime/stopping.py).

A stage calls `StepGuard.optimizer_step(engine, loss)` where it would call engine.deepspeed.optimizer_step
(after each backward), and `StepGuard.end_step(...)` where it would checkpoint. At each optimizer update the
workers agree, in one collective of two numbers, whether any of them saw a non-finite loss or gradient this
step and whether a stop was requested; so they all skip the same updates and all stop after the same step
(a disagreement would leave one worker waiting in the next collective).

Skipping an update: under ZeRO-0 the gradients are dropped before the optimizer runs (AdamW leaves a
parameter without a gradient untouched; the lr schedule still advances). Under ZeRO-1..3 the gradients
live in DeepSpeed's partitions, and DeepSpeed itself skips an update whose gradient norm is not finite (it
counts it in engine.skipped_steps); an update it applied anyway fails the run rather than continue from
weights a non-finite loss touched."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator.engine.checkpoints import STATE_FILE
from orchestrator.engine.collectives import all_reduce_sum
from orchestrator.engine.deepspeed import optimizer_step

SKIPPED_METRIC = "train/skipped_steps"
STOPPED_METRIC = "orchestrator/stopped_at_step"  # in the stop checkpoint's report: how the driver learns of it


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm under guard.on_nonfinite=fail."""


class StopRequested(Exception):
    """Raised after the checkpoint of the step at which a requested stop was agreed on."""

    def __init__(self, stage_index: int, step: int, global_step: int, reason: str):
        self.stage_index, self.step, self.global_step, self.reason = stage_index, step, global_step, reason
        super().__init__(f"{reason}: stopped after stage {stage_index} step {step} (global step {global_step})")


def _grads_finite(engine) -> bool:
    """Whether this worker's ZeRO-0 gradients are all finite (one fused norm over them)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0)))


def skipped_before(resume_dir: str | None, stage_index: int) -> int:
    """Updates this stage skipped before the checkpoint it resumes from (0 when starting fresh)."""
    if resume_dir is None:
        return 0
    try:
        state = json.loads((Path(resume_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return 0
    return int(state.get("skipped_steps", 0)) if int(state.get("stage_index", -1)) == stage_index else 0


@dataclass
class StepGuard:
    ctx: Any  # StageContext
    label: str  # the stage as the pipeline writes it, e.g. grpo:ccc
    skipped: int = 0
    step: int = 0  # the step in the stage being trained (0-based)
    stop_reason: str | None = None
    _loss: float = field(default=0.0, repr=False)  # the current update's loss so far on this worker

    @classmethod
    def for_stage(cls, ctx, stage, start_step: int, resume_dir: str | None) -> StepGuard:
        return cls(ctx, stage.label(), skipped_before(resume_dir, ctx.stage_index), step=start_step)

    @property
    def policy(self) -> str:
        return self.ctx.cfg.guard.on_nonfinite

    def where(self) -> str:
        done = self.step + 1
        return f"stage {self.ctx.stage_index} ({self.label}) at step {done} (global step " \
               f"{self.ctx.global_step_offset + done})"

    def optimizer_step(self, engine, loss) -> None:
        """After a backward: accumulate its loss; at an update, agree with the other workers, then update,
        skip the update, or fail."""
        self._loss += float(loss)
        if not engine.is_gradient_accumulation_boundary():
            optimizer_step(engine)
            return
        zero0 = engine.zero_optimization_stage() == 0
        bad_here = not math.isfinite(self._loss) or (zero0 and not _grads_finite(engine))
        self._loss = 0.0
        bad, stop = self._agree(bad_here)
        before = getattr(engine, "skipped_steps", 0)
        if bad and zero0:
            self._non_finite("loss or gradient")
            if engine.bfloat16_enabled():  # its optimizer keeps fp32 copies of the gradients: dropping ours is no skip
                raise NonFiniteError(f"non-finite loss or gradient in {self.where()}: skip_step needs fp32 or "
                                     "deepspeed.zero_stage >= 1 under bf16")
            for p in engine.module.parameters():  # the update without gradients leaves every weight as it is
                p.grad = None
            engine.step()
            self.skipped += 1
        else:
            optimizer_step(engine)
            if getattr(engine, "skipped_steps", 0) > before:  # DeepSpeed found the gradient norm non-finite
                self._non_finite("loss" if bad else "gradient norm")
                self.skipped += 1
            elif bad:
                raise NonFiniteError(f"non-finite loss in {self.where()}, and DeepSpeed applied the update "
                                     "anyway (its gradient norm was finite): the run stops here")
        if stop and self.stop_reason is None:
            self.stop_reason = self._reason()

    def _agree(self, bad_here: bool) -> tuple[bool, bool]:
        """(any worker saw a non-finite value, a stop was requested): rank 0 reads the stop markers."""
        watcher = self.ctx.stop
        stop_here = self.ctx.rank == 0 and watcher is not None and watcher.requested()
        if self.ctx.world_size == 1:
            return bad_here, stop_here
        bad, stop = all_reduce_sum([float(bad_here), float(stop_here)], self.ctx.device)
        return bad > 0, stop > 0

    def _reason(self) -> str:
        watcher = self.ctx.stop
        return (watcher.reason if watcher is not None and watcher.reason else None) or "stop requested"

    def _non_finite(self, what: str) -> None:
        if self.policy == "fail":
            raise NonFiniteError(f"non-finite {what} in {self.where()} (guard.on_nonfinite=fail)")

    def end_step(self, engine, done: int, total: int, reference=None) -> None:
        """After the step's update: the checkpoint when due or when stopping, train/skipped_steps with the
        logs, then StopRequested when a stop was agreed on."""
        ctx = self.ctx
        global_step = ctx.global_step_offset + done
        if self.policy == "skip_step" and ctx.log_due(done, total):
            ctx.log({SKIPPED_METRIC: float(self.skipped)}, global_step)
        if ctx.checkpoint_due(done, total) or self.stop_reason:
            metrics = {"train/step": float(global_step), SKIPPED_METRIC: float(self.skipped)}
            if self.stop_reason:
                metrics[STOPPED_METRIC] = float(global_step)
            with ctx.stopwatch("checkpoint"):
                ctx.checkpoint(engine, done, metrics, reference)
        if self.stop_reason:
            raise StopRequested(ctx.stage_index, done, global_step, self.stop_reason)
        self.step = done
