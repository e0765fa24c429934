"""One SFT stage on a DeepSpeed engine (METHODS §3).

The stage drives any registered objective (orchestrator/methods/objectives/) the same way: the objective
prepares the model, encodes the training split and computes each micro-batch's summed loss; the stage
fetches this worker's micro-batches for each optimizer step, divides the loss by the GLOBAL normaliser
(answer tokens of the whole step's batch over all workers, or samples for `rvtc`), steps, logs, and
checkpoints.

Rows with images (a vision-language model on an image dataset) add the image placeholders to the prompt
(masked from the loss like the rest of it) and their pixel tensors to each micro-batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from orchestrator.config import SFTStage
from orchestrator.data.collate import micro_batch_indices, step_indices
from orchestrator.engine.collectives import all_reduce_sum
from orchestrator.engine.deepspeed import optimizer_step
from orchestrator.methods.objectives.base import SFTObjective, build_objective
from orchestrator.modeling.generation import accepts_logits_to_keep
from orchestrator.modeling.last_layer import enable_last_layer_from
from orchestrator.stages.context import StageContext, start_engine
from orchestrator.stages.guards import StepGuard
from orchestrator.stages.timing import Stopwatch


def run_sft_stage(ctx: StageContext, stage: SFTStage, start_step: int = 0, resume_dir: str | None = None):
    """Train `stage.steps` optimizer steps; returns the engine (its module carries on to the next stage)."""
    objective = build_objective(stage, ctx.digit_token_ids.to(ctx.device))
    objective.prepare(ctx.model, ctx.dataset)
    engine = start_engine(ctx, stage, resume_dir)
    keep_supervised = accepts_logits_to_keep(engine)
    enable_last_layer_from(engine)  # prompt positions then skip the last layer's queries and MLP too
    with ctx.stopwatch("data"):
        batches = SFTBatches.from_train_split(ctx, stage, objective)
    engine.train()
    window = LogWindow()
    guard = StepGuard.for_stage(ctx, stage, start_step, resume_dir)
    for step in range(start_step, stage.steps):
        started = time.perf_counter()
        step_loss, global_tokens = train_step(engine, objective, batches, step, keep_supervised, ctx.device, guard)
        window.add(step_loss, global_tokens)
        done = step + 1
        if ctx.log_due(done, stage.steps):
            # One collective per logging window, not per step: every worker's loss sum of every step.
            with window.watch("collectives"):
                global_losses = all_reduce_sum(window.loss_sums, ctx.device)
        window.time_step(time.perf_counter() - started, ctx)
        if ctx.log_due(done, stage.steps):
            ctx.log(window.metrics(global_losses, engine, stage, ctx), ctx.global_step_offset + done)
            window = LogWindow()
        guard.end_step(engine, done, stage.steps)  # checkpoints when due, and stops here when asked to
    return engine


@dataclass
class SFTBatches:
    """The encoded training split and the resumable sample order: which rows each worker trains on at each
    step is a pure function of (seed, step), so no worker needs another's batch."""

    ctx: StageContext
    stage: SFTStage
    objective: SFTObjective
    examples: list[Any]
    images: list[bytes] | None
    normaliser_counts: np.ndarray  # what each example adds to its global batch's loss normaliser
    seed: int

    @classmethod
    def from_train_split(cls, ctx: StageContext, stage: SFTStage, objective: SFTObjective) -> SFTBatches:
        train = ctx.dataset.load("train")
        examples = objective.encode(ctx.tokenizer, train, ctx.prompt_text)
        counts = objective.normaliser_counts(examples)
        seed = ctx.cfg.seed + 1000 * ctx.stage_index
        return cls(ctx, stage, objective, examples, ctx.image_column(train), counts, seed)

    def micro_batch(self, step: int, k: int) -> list[dict[str, torch.Tensor]]:
        """This worker's k-th micro-batch of the step, as `length_groups` padded sub-batches."""
        ctx, stage = self.ctx, self.stage
        idx = micro_batch_indices(
            len(self.examples), self.seed, step, k, stage.grad_accum, ctx.rank, ctx.world_size, stage.micro_batch_size
        )
        parts = []
        for group in length_groups([len(self.examples[i][0]) for i in idx], stage.length_groups):
            rows = idx[group]
            batch = self.objective.collate([self.examples[i] for i in rows], ctx.tokenizer.pad_token_id)
            pixels = ctx.image_batch(self.images, rows)
            if pixels is not None:
                batch.update(pixels.inputs_for(batch["input_ids"]))
            parts.append(batch)
        return parts

    def global_normaliser(self, step: int) -> float:
        """The step's loss normaliser over ALL workers; it follows from the sample order, which every worker
        knows, so no collective is needed before backward."""
        ctx, stage = self.ctx, self.stage
        everyone = step_indices(
            len(self.examples), self.seed, step, stage.grad_accum, ctx.world_size, stage.micro_batch_size
        )
        return float(self.normaliser_counts[everyone].sum())


def length_groups(lengths, groups: int) -> list[np.ndarray]:
    """Positions of a micro-batch's rows in at most `groups` runs of similar length (sorted by length,
    near-equal counts), so each run is padded only to its own longest row. The rows and the loss sum
    stay the same; only padding goes."""
    if groups <= 1:
        return [np.arange(len(lengths))]
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [run for run in np.array_split(order, min(groups, len(order))) if len(run)]


def train_step(engine, objective: SFTObjective, batches: SFTBatches, step: int, keep_supervised: bool, device,
               guard: StepGuard | None = None):
    """One optimizer step: (this worker's summed loss, the global normaliser). The guard checks the loss and
    gradients before the update (stages/guards.py)."""
    stage, ctx = batches.stage, batches.ctx
    micro_batches = [batches.micro_batch(step, k) for k in range(stage.grad_accum)]
    global_tokens = batches.global_normaliser(step)
    # DeepSpeed averages gradients over workers and accumulation steps; undo that scaling.
    scale = ctx.world_size * stage.grad_accum / max(global_tokens, 1.0)
    step_loss = 0.0
    for parts in micro_batches:
        loss_sum = micro_batch_loss(engine, objective, parts, keep_supervised, device)
        engine.backward(loss_sum * scale)
        if guard is None:
            optimizer_step(engine)
        else:
            guard.optimizer_step(engine, loss_sum.detach())
        step_loss += float(loss_sum.detach())
    return step_loss, global_tokens


def micro_batch_loss(model, objective: SFTObjective, parts, keep_supervised: bool = True, device=None):
    """The summed loss of one micro-batch given as padded sub-batches: one backward follows, whatever the
    number of parts (DeepSpeed reduces gradients once per micro-batch)."""
    total = torch.zeros((), device=device)
    for batch in parts:
        total = total + objective.batch_loss(model, to_device(batch, device), keep_supervised)
    return total


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """A collated batch on the training device, copied without waiting for the device's queue; the labels stay
    on the host, where modeling.forward.supervised_logits reads which positions it needs (on a GPU, reading
    them there would wait for every kernel queued so far)."""
    if device is None:
        return batch
    return {k: v if k == "labels" else v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class LogWindow:
    """The steps since the last log: per-step loss sums and normalisers, wall time, and phase timings."""

    loss_sums: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.watch = Stopwatch(self.phases)

    def add(self, loss_sum: float, global_tokens: float) -> None:
        self.loss_sums.append(loss_sum)
        self.tokens.append(global_tokens)

    def time_step(self, seconds: float, ctx: StageContext) -> None:
        self.seconds += seconds
        ctx.stopwatch.add("train", seconds)

    def metrics(self, global_losses: list[float], engine, stage: SFTStage, ctx: StageContext) -> dict[str, float]:
        steps = len(self.tokens)
        samples = steps * stage.micro_batch_size * stage.grad_accum * ctx.world_size
        return {
            "train/loss": sum(g / max(t, 1.0) for g, t in zip(global_losses, self.tokens)) / steps,
            "train/lr": engine.get_lr()[0],
            "train/tokens_per_s": sum(self.tokens) / self.seconds,
            "train/samples_per_s": samples / self.seconds,
            "train/stage": float(ctx.stage_index),
            "time/step_s": self.seconds / steps,
            **{f"time/{k}_s": v / steps for k, v in self.phases.items()},
        }
