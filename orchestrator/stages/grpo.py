"""One GRPO stage (METHODS §4) on the same DeepSpeed workers as SFT.

Each optimizer step reads like the algorithm:
1. rollout: B prompts, G samples each, in one batched, KV-cached `generate` call; parse the answers;
2. score: the weighted reward terms (a batch-level term sees this worker's minibatch or, with
   `ccc_scope=global`, the whole step's batch gathered from all workers), then advantages;
3. fixed log-probs: the old policy's (only when `num_iterations > 1`) and the reference's (when β > 0),
   once per rollout batch;
4. policy update: `num_iterations` passes of the clipped objective, normalised over the GLOBAL batch.
Every phase is timed by one Stopwatch; each step's statistics are a StepStats, summed over the workers
once per logging window.

With images, each prompt's pixel inputs go into the generate call once (transformers encodes each image
once for its G samples) and are repeated per sample for the log-prob forwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from orchestrator.config import GRPOStage
from orchestrator.data.collate import chat_prompt_ids, micro_batch_indices
from orchestrator.engine.collectives import all_gather_objects, all_reduce_sum
from orchestrator.engine.deepspeed import full_parameters, optimizer_step
from orchestrator.engine.reference import REFERENCE_FILE, ReferencePolicy
from orchestrator.methods.answers import parse_answer
from orchestrator.methods.grpo import LOSS_AGGREGATIONS, group_advantages, grpo_loss_terms
from orchestrator.methods.rewards import RewardContext, compute_rewards, substitute_parse_failures
from orchestrator.modeling.forward import build_sequences, completion_mask, shared_prompt_logprobs, token_logprobs
from orchestrator.modeling.generation import accepts_logits_to_keep, decode_completions, generate
from orchestrator.modeling.last_layer import enable_last_layer_from
from orchestrator.stages.context import StageContext, start_engine
from orchestrator.stages.guards import StepGuard
from orchestrator.stages.timing import Stopwatch


def run_grpo_stage(ctx: StageContext, stage: GRPOStage, start_step: int = 0, resume_dir: str | None = None):
    """Train `stage.steps` GRPO steps; returns the engine (its module carries on to the next stage)."""
    # Prompt prefills need the last decoder layer at the last prompt position only; enabled before the
    # reference copy is made, so the copy's prefills skip the same work.
    enable_last_layer_from(ctx.model)
    reference = start_reference(ctx, stage, resume_dir)  # before the engine: ZeRO-3 partitions in place
    engine = start_engine(ctx, stage, resume_dir)
    prompts = PromptSource.from_train_split(ctx, stage)
    keep_only_completions = accepts_logits_to_keep(engine)
    window = StatsWindow()
    guard = StepGuard.for_stage(ctx, stage, start_step, resume_dir)
    for step in range(start_step, stage.steps):
        started = time.perf_counter()
        watch = window.watch
        batch = prompts.batch(step)
        with watch("generation"):
            rollout = generate_rollout(engine, ctx, stage, batch)
        with watch("reward"):
            scores = score_rollout(ctx, stage, batch, rollout, watch, step)
        with watch("logprobs"):
            forward = LogProbForward.for_rollout(ctx, stage, batch, rollout, keep_only_completions)
            old_logp, ref_logp = fixed_logprobs(engine, reference, forward, stage)
        totals = policy_update(engine, ctx, stage, forward, scores.advantages, old_logp, ref_logp, watch, guard)
        window.add(StepStats.of_worker(batch, rollout, scores, forward.mask, totals, stage), len(scores.targets))
        done = step + 1
        if ctx.log_due(done, stage.steps):
            with watch("collectives"):
                per_step = window.global_stats(ctx, list(scores.per_term))
        window.time_step(time.perf_counter() - started, ctx)
        if ctx.log_due(done, stage.steps):
            ctx.log(window.metrics(per_step, engine, ctx), ctx.global_step_offset + done)
            window = StatsWindow()
        guard.end_step(engine, done, stage.steps, reference)  # checkpoints when due, and stops here when asked to
    return engine


def start_reference(ctx: StageContext, stage: GRPOStage, resume_dir: str | None) -> ReferencePolicy | None:
    """The policy at the START of this stage, for the KL term (none at β = 0). A checkpoint stores it
    separately, so a resumed stage compares against the same reference."""
    if stage.beta <= 0:
        return None
    lora = ctx.cfg.model.lora.enabled
    weights = load_file(str(Path(resume_dir, REFERENCE_FILE))) if resume_dir is not None and not lora else None
    with ctx.stopwatch("deepspeed_init"):  # a copy, and a DeepSpeed engine under ZeRO-3
        return ReferencePolicy(ctx.model, ctx.cfg, stage, lora, weights)


# --------------------------------------------------------------------------- 1. rollout


@dataclass
class PromptBatch:
    """This worker's B prompts of one step, with what the rewards see of them."""

    prompt_ids: list[list[int]]
    targets: list[float]
    columns: dict[str, list]  # the dataset's other columns, per prompt
    pixels: Any  # ImageBatch, or None on the text path


@dataclass
class PromptSource:
    """The training split's prompts and the resumable order in which each worker draws them."""

    ctx: StageContext
    stage: GRPOStage
    prompts: list[str]
    targets: np.ndarray
    columns: dict[str, list]
    images: list[bytes] | None
    seed: int

    @classmethod
    def from_train_split(cls, ctx: StageContext, stage: GRPOStage) -> PromptSource:
        train = ctx.dataset.load("train")
        # Reward terms see the row's other columns; image bytes stay out (a global-scope CCC would gather them).
        columns = {c: train.column(c).to_pylist() for c in train.column_names if c not in ("prompt", "image")}
        targets = np.asarray(train.column("target").to_pylist(), dtype=np.float64)
        return cls(ctx, stage, train.column("prompt").to_pylist(), targets, columns, ctx.image_column(train),
                   ctx.cfg.seed + 1000 * ctx.stage_index)

    def batch(self, step: int) -> PromptBatch:
        ctx = self.ctx
        idx = micro_batch_indices(len(self.prompts), self.seed, step, 0, 1, ctx.rank, ctx.world_size,
                                  self.stage.micro_batch_size)
        return PromptBatch(
            prompt_ids=[chat_prompt_ids(ctx.tokenizer, ctx.prompt_text(self.prompts[i])) for i in idx],
            targets=self.targets[idx].tolist(),
            columns={c: [values[i] for i in idx] for c, values in self.columns.items()},
            pixels=ctx.image_batch(self.images, idx),
        )


@dataclass
class Rollout:
    completions: list[list[int]]  # B·G token lists, prompt i's samples at i·G .. i·G + G − 1
    texts: list[list[str]]  # B groups of G decoded completions
    parsed: list[list[float | None]]  # the number in each, None for a parse failure


def generate_rollout(engine, ctx: StageContext, stage: GRPOStage, batch: PromptBatch) -> Rollout:
    """G samples per prompt in one generate call, decoded and parsed."""
    G = stage.group_size
    with full_parameters(engine) as module:
        completions = generate(
            module, ctx.tokenizer, batch.prompt_ids, max_new_tokens=stage.max_new_tokens, do_sample=True,
            temperature=stage.temperature, top_p=stage.top_p, num_return_sequences=G, device=ctx.device,
            images=batch.pixels,
        )
    flat = decode_completions(ctx.tokenizer, completions)
    texts = [flat[i * G : (i + 1) * G] for i in range(len(batch.prompt_ids))]
    return Rollout(completions, texts, [[parse_answer(t) for t in group] for group in texts])


# --------------------------------------------------------------------------- 2. score


@dataclass
class Scores:
    rewards: torch.Tensor  # [B·G] this worker's weighted rewards
    advantages: torch.Tensor  # [B·G] on the training device
    per_term: dict[str, list[list[float]]]  # each term's B x G values on this worker
    targets: list[float]  # the targets the batch-level terms saw (this worker's or the whole step's)


def score_rollout(ctx: StageContext, stage: GRPOStage, batch: PromptBatch, rollout: Rollout, watch,
                  step: int) -> Scores:
    """Weighted reward terms (on the answers after the stage's parse-failure policy, each worker substituting
    its own), then group-relative advantages."""
    ds = ctx.dataset
    seed = (ctx.cfg.seed, ctx.stage_index, step, ctx.rank)
    parsed = substitute_parse_failures(rollout.parsed, stage.reward_parse_failure, ds.label_min, ds.label_max, seed)
    texts, targets, columns, lo, hi = rollout.texts, batch.targets, batch.columns, 0, None
    if stage.ccc_scope == "global" and ctx.world_size > 1:
        with watch("collectives"):
            (parsed, targets, texts), columns, offsets = global_rollout(parsed, batch.targets, rollout.texts,
                                                                        batch.columns)
        lo, hi = offsets[ctx.rank], offsets[ctx.rank + 1]
    reward_ctx = RewardContext(texts=texts, parsed=parsed, targets=targets, label_min=ds.label_min,
                               label_max=ds.label_max, label_step=ds.label_step, stage=stage, columns=columns)
    total, per_term = compute_rewards([(t.name, t.weight) for t in stage.rewards], reward_ctx)
    hi = len(total) if hi is None else hi
    rewards = torch.tensor([r for group in total[lo:hi] for r in group], dtype=torch.float32)
    advantages = group_advantages(rewards, stage.group_size, scale=stage.scale_rewards).to(ctx.device)
    mine = {name: values[lo:hi] for name, values in per_term.items()}
    return Scores(rewards, advantages, mine, targets)


def global_rollout(parsed: list[list[float | None]], targets: list[float], texts, columns):
    """All workers' minibatches in rank order, and where this worker's slice sits in it."""
    parts = all_gather_objects((parsed, targets, texts, columns))
    offsets = np.cumsum([0] + [len(p[1]) for p in parts])
    merged = [sum((p[i] for p in parts), []) for i in range(3)]
    merged_columns = {k: sum((p[3][k] for p in parts), []) for k in parts[0][3]}
    return merged, merged_columns, offsets


# --------------------------------------------------------------------------- 3. fixed log-probs


@dataclass
class LogProbForward:
    """How this rollout's log-probs are computed: the samples split into `grad_accum` chunks, each
    chunk's log-probs from a model (of the distribution the rollout sampled, at the stage's temperature, for
    the policy, the old policy and the reference alike), and the mask of completion tokens in the same layout."""

    chunks: list[np.ndarray]
    chunk_pixels: list[Any]
    mask: torch.Tensor
    logprobs: Callable[[Any, np.ndarray, Any], torch.Tensor]  # (model, chunk rows, chunk pixels) -> log-probs

    def all_chunks(self, model) -> torch.Tensor:
        return torch.cat([self.logprobs(model, c, px) for c, px in zip(self.chunks, self.chunk_pixels)])

    @classmethod
    def for_rollout(cls, ctx: StageContext, stage: GRPOStage, batch: PromptBatch, rollout: Rollout, keep: bool):
        """`keep`: the model takes `logits_to_keep`, so the LM head runs only where log-probs are read."""
        G, B = stage.group_size, len(batch.prompt_ids)
        chunks = np.array_split(np.arange(B * G), stage.grad_accum)
        sample_pixels = batch.pixels.repeat(G) if batch.pixels is not None else None  # row j: prompt j // G
        chunk_pixels = [sample_pixels.select(c) if sample_pixels is not None else None for c in chunks]
        pad_id = ctx.tokenizer.pad_token_id
        # Prompt-shared forwards on the text path; images (placeholder expansion) and ZeRO-3 (parameters
        # gathered per forward call) take the per-row path.
        if stage.shared_prompt_forward and ctx.processor is None and ctx.cfg.deepspeed.zero_stage < 3:
            # Each prompt runs once per chunk and its cache serves its G samples; log-probs and the mask are
            # laid out per completion token.
            width = max(1, max(len(c) for c in rollout.completions))
            mask = completion_mask(rollout.completions, width).to(ctx.device)

            def logprobs(model, c, px):
                return shared_prompt_logprobs(model, batch.prompt_ids, rollout.completions, c.tolist(), G, pad_id,
                                              width, keep, ctx.device, temperature=stage.temperature)

            return cls(chunks, chunk_pixels, mask, logprobs)
        input_ids, attention_mask, mask = build_sequences(batch.prompt_ids, rollout.completions, G, pad_id)
        # The loss reads completion tokens only: log-probs start at the shortest prompt's last token (the first
        # position that predicts a completion token in any row). On the image path the model may expand
        # placeholders, so every position is kept there.
        start = min(len(p) for p in batch.prompt_ids) - 1 if batch.pixels is None else 0
        input_ids, attention_mask = input_ids.to(ctx.device), attention_mask.to(ctx.device)

        def logprobs(model, c, px):
            return token_logprobs(model, input_ids[c], attention_mask[c], px, start=start, keep=keep,
                                  temperature=stage.temperature)

        return cls(chunks, chunk_pixels, mask[:, start:].to(ctx.device), logprobs)


@torch.no_grad()
def fixed_logprobs(engine, reference: ReferencePolicy | None, forward: LogProbForward, stage: GRPOStage):
    """(old-policy log-probs, reference log-probs), each None where not needed. With one update per rollout
    the policy has not moved since it sampled: its old log-probs are the update's own, detached (ratio 1),
    so no separate forward is needed."""
    old_logp = forward.all_chunks(engine) if stage.num_iterations > 1 else None
    ref_logp = None
    if reference is not None:
        with reference.forward_model(engine) as ref_model:
            ref_logp = forward.all_chunks(ref_model)
    return old_logp, ref_logp


# --------------------------------------------------------------------------- 4. policy update


@dataclass
class UpdateTotals:
    """Sums over this worker's update passes, for the step's statistics."""

    loss: float = 0.0
    kl: float = 0.0  # token-weighted
    clipped: float = 0.0  # token-weighted
    tokens: float = 0.0
    global_normaliser: float = 1.0


def policy_update(engine, ctx: StageContext, stage: GRPOStage, forward: LogProbForward, advantages: torch.Tensor,
                  old_logp, ref_logp, watch: Stopwatch, guard: StepGuard | None = None) -> UpdateTotals:
    """`num_iterations` passes of the clipped objective over the rollout, one optimizer step per chunk."""
    mask = forward.mask
    local_norm = float(LOSS_AGGREGATIONS[stage.loss_aggregation].normaliser(mask))
    with watch("collectives"):
        (global_norm,) = all_reduce_sum([local_norm], ctx.device)
    scale = ctx.world_size * stage.grad_accum / max(global_norm, 1.0)
    totals = UpdateTotals(global_normaliser=global_norm)
    for _ in range(stage.num_iterations):
        for c, px in zip(forward.chunks, forward.chunk_pixels):
            with watch("forward_backward"):
                logp = forward.logprobs(engine, c, px)
                out = grpo_loss_terms(
                    logp, logp.detach() if old_logp is None else old_logp[c],
                    None if ref_logp is None else ref_logp[c], advantages[c], mask[c],
                    beta=stage.beta, kl_estimator=stage.kl_estimator, eps_low=stage.epsilon_low,
                    eps_high=stage.epsilon_high, aggregation=stage.loss_aggregation,
                )
                engine.backward(out["loss_sum"] * scale)
            with watch("optimizer"):  # the guard checks the loss and gradients first (stages/guards.py)
                if guard is None:
                    optimizer_step(engine)
                else:
                    guard.optimizer_step(engine, out["loss_sum"].detach())
            weight = float(mask[c].sum())
            totals.loss += float(out["loss_sum"].detach())
            totals.kl += float(out["kl_mean"]) * weight
            totals.clipped += float(out["clip_fraction"]) * weight
            totals.tokens += weight
    return totals


# --------------------------------------------------------------------------- statistics


@dataclass
class StepStats:
    """One step's statistics on one worker, as numbers whose sum over the workers gives the step's picture:
    sums over samples (rewards, parse failures) and per-worker means (advantage std, KL, ...) that become
    means over the workers."""

    reward_sum: float
    reward_square_sum: float
    samples: float
    advantage_std: float
    kl: float
    clip_fraction: float
    parse_failures: float
    completion_length: float
    prediction_std: float  # of this worker's parsed answers
    target_std: float
    loss: float
    term_sums: dict[str, float] = field(default_factory=dict)  # each reward term's sum over samples

    @classmethod
    def of_worker(cls, batch: PromptBatch, rollout: Rollout, scores: Scores, mask: torch.Tensor,
                  totals: UpdateTotals, stage: GRPOStage) -> StepStats:
        parsed = [p for group in rollout.parsed for p in group]
        ok = [p for p in parsed if p is not None]
        rewards, advantages, tokens = scores.rewards, scores.advantages, max(totals.tokens, 1.0)
        return cls(
            reward_sum=float(rewards.sum()), reward_square_sum=float((rewards**2).sum()),
            samples=float(rewards.numel()),
            advantage_std=float(advantages.std()) if advantages.numel() > 1 else 0.0,
            kl=totals.kl / tokens, clip_fraction=totals.clipped / tokens,
            parse_failures=float(len(parsed) - len(ok)), completion_length=float(mask.sum()) / len(parsed),
            prediction_std=float(np.std(ok)) if len(ok) > 1 else 0.0,
            target_std=float(np.std(batch.targets)) if len(batch.targets) > 1 else 0.0,
            loss=totals.loss / max(totals.global_normaliser, 1.0) / stage.num_iterations,
            term_sums={name: float(np.sum([r for group in values for r in group]))
                       for name, values in scores.per_term.items()},
        )

    def vector(self) -> list[float]:
        """The numbers in a fixed order (the fields, then the reward terms), for one all-reduce."""
        return [getattr(self, f.name) for f in fields(self) if f.name != "term_sums"] + list(self.term_sums.values())

    @classmethod
    def from_vector(cls, values: list[float], term_names: list[str]) -> StepStats:
        n = len(fields(cls)) - 1
        return cls(*values[:n], term_sums=dict(zip(term_names, values[n:])))

    def metrics(self, world_size: int) -> dict[str, float]:
        """The logged statistics of a step whose numbers were summed over `world_size` workers."""
        w, n = float(world_size), max(self.samples, 1.0)
        mean = self.reward_sum / n
        return {
            "reward/mean": mean,
            "reward/std": float(np.sqrt(max(self.reward_square_sum / n - mean**2, 0.0))),
            "advantage/std": self.advantage_std / w,
            "kl": self.kl / w,
            "clip_fraction": self.clip_fraction / w,
            "parse_fail_rate": self.parse_failures / n,
            "completion_length": self.completion_length / w,
            "pred_std_over_label_std": self.prediction_std / self.target_std if self.target_std > 0 else float("nan"),
            "loss": self.loss,
            **{f"reward/{name}": value / n for name, value in self.term_sums.items()},
        }


@dataclass
class StatsWindow:
    """The steps since the last log: each step's StepStats, the prompts its batch-level rewards saw, wall time
    and phase timings."""

    steps: list[StepStats] = field(default_factory=list)
    prompts: list[float] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.watch = Stopwatch(self.phases)

    def add(self, stats: StepStats, prompts_seen: int) -> None:
        self.steps.append(stats)
        self.prompts.append(float(prompts_seen))

    def time_step(self, seconds: float, ctx: StageContext) -> None:
        self.watch.add("step", seconds)
        ctx.stopwatch.add("train", seconds)

    def global_stats(self, ctx: StageContext, term_names: list[str]) -> list[StepStats]:
        """Every step's statistics summed over the workers: one collective per logging window, not per step."""
        summed = all_reduce_sum([v for stats in self.steps for v in stats.vector()], ctx.device)
        width = len(self.steps[0].vector())
        return [StepStats.from_vector(summed[i : i + width], term_names) for i in range(0, len(summed), width)]

    def metrics(self, per_step: list[StepStats], engine, ctx: StageContext) -> dict[str, float]:
        rows = [stats.metrics(ctx.world_size) for stats in per_step]
        metrics = {f"train/{k}": float(np.nanmean([row[k] for row in rows])) for k in rows[0]}
        metrics["train/effective_batch_prompts"] = float(np.mean(self.prompts))
        metrics.update({f"time/{k}_s": v / len(rows) for k, v in self.phases.items()})
        metrics["train/lr"] = engine.get_lr()[0]
        metrics["train/stage"] = float(ctx.stage_index)
        return metrics
