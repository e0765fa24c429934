"""One GRPO stage (METHODS §4) on the same DeepSpeed workers as SFT.

Each optimizer step reads like the algorithm:
1. rollout: B prompts, G samples each, in one batched, KV-cached `generate` call; parse the answers;
2. score: the weighted reward terms (a batch-level term sees this worker's minibatch or, with
   `ccc_scope=global`, the whole step's batch gathered from all workers), then advantages; with dynamic
   sampling, groups whose rewards all agree are replaced by groups of further prompts (1 and 2 again);
3. fixed log-probs: the old policy's (only when `num_iterations > 1`, or for a KL placed in the reward) and
   the reference's (when β > 0), once per rollout batch; a KL in the reward then enters the advantages;
4. policy update: `num_iterations` passes of the clipped objective, normalised over the GLOBAL batch;
5. the reference: β's next value (adaptive control) and, every `ref_sync_every` steps, a refreshed reference.
Every phase is timed by one Stopwatch; each step's statistics are a StepStats, summed over the workers
once per logging window.

With images, each prompt's pixel inputs go into the generate call once (transformers encodes each image
once for its G samples) and are repeated per sample for the log-prob forwards.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from orchestrator.config import GRPOStage
from orchestrator.data.collate import chat_prompt_ids, micro_batch_indices, stream_indices
from orchestrator.engine.collectives import all_gather_objects, all_reduce_sum
from orchestrator.engine.deepspeed import full_parameters, optimizer_step
from orchestrator.engine.reference import REFERENCE_FILE, REFERENCE_STATE_FILE, ReferencePolicy
from orchestrator.methods.answers import parse_answer
from orchestrator.methods.grpo import (
    KL_CONTROLLERS,
    LOSS_AGGREGATIONS,
    grpo_loss_terms,
    sequence_kl,
    step_advantages,
    zero_spread_groups,
)
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
        sampled = sample_step(engine, ctx, stage, prompts, step, watch)
        with watch("logprobs"):
            forward = LogProbForward.for_rollout(ctx, stage, sampled.batch, sampled.rollout, keep_only_completions)
            old_logp, ref_logp = fixed_logprobs(engine, reference, forward, stage)
        if reference is not None and stage.kl_placement == "reward":
            with watch("reward"):
                sampled.scores = kl_in_reward(ctx, stage, sampled.scores, forward.mask, old_logp, ref_logp,
                                              reference.kl_coef)
        scores = sampled.scores
        totals = policy_update(engine, ctx, stage, forward, scores.advantages, old_logp, ref_logp, watch, guard,
                               kl_coef=loss_kl_coef(stage, reference), mask=loss_mask(forward, sampled.rollout, stage))
        window.add(StepStats.of_worker(sampled, forward.mask, totals, stage), len(scores.targets))
        done = step + 1
        if reference is not None:
            steer_reference(reference, engine, ctx, stage, totals, done, watch)
        if ctx.log_due(done, stage.steps):
            with watch("collectives"):
                per_step = window.global_stats(ctx, list(scores.per_term))
        window.time_step(time.perf_counter() - started, ctx)
        if ctx.log_due(done, stage.steps):
            ctx.log({**window.metrics(per_step, engine, ctx), **kl_coef_metrics(stage, reference)},
                    ctx.global_step_offset + done)
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
    state_file = Path(resume_dir, REFERENCE_STATE_FILE) if resume_dir is not None else None
    kl_coef = json.loads(state_file.read_text())["kl_coef"] if state_file is not None and state_file.exists() else None
    with ctx.stopwatch("deepspeed_init"):  # a copy, and a DeepSpeed engine under ZeRO-3
        return ReferencePolicy(ctx.model, ctx.cfg, stage, lora, weights, kl_coef=kl_coef)


def loss_kl_coef(stage: GRPOStage, reference: ReferencePolicy | None) -> float:
    """β of the KL term in the loss: the reference's current β when the KL is placed there, else 0."""
    return reference.kl_coef if reference is not None and stage.kl_placement == "loss" else 0.0


def steer_reference(reference: ReferencePolicy, engine, ctx: StageContext, stage: GRPOStage, totals: UpdateTotals,
                    done: int, watch: Stopwatch) -> None:
    """After a step's update: β for the next step (kl_control, from the step's KL over every worker's tokens) and,
    every ref_sync_every steps, the reference moved toward the policy. Every worker computes the same."""
    if stage.kl_control != "fixed":  # a fixed β needs no measurement
        with watch("collectives"):
            kl_sum, tokens = all_reduce_sum([totals.kl, totals.tokens], ctx.device)
        samples = stage.micro_batch_size * stage.group_size * ctx.world_size
        params = KL_CONTROLLERS.params_of(stage.kl_control, stage)
        reference.kl_coef = KL_CONTROLLERS[stage.kl_control](reference.kl_coef, kl_sum / max(tokens, 1.0), samples,
                                                             params)
    if stage.ref_sync_every is not None and done % stage.ref_sync_every == 0:
        reference.refresh(engine, stage.ref_sync_alpha)


def kl_coef_metrics(stage: GRPOStage, reference: ReferencePolicy | None) -> dict[str, float]:
    """train/kl_coef, the β the next step uses, when a controller moves it."""
    return {"train/kl_coef": reference.kl_coef} if reference is not None and stage.kl_control != "fixed" else {}


# --------------------------------------------------------------------------- 1. rollout


@dataclass
class PromptBatch:
    """This worker's B prompts of one step, with what the rewards see of them."""

    prompt_ids: list[list[int]]
    targets: list[float]
    columns: dict[str, list]  # the dataset's other columns, per prompt
    pixels: Any  # ImageBatch, or None on the text path
    indices: Any = None  # the prompts' rows in the training split


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
        """This worker's B prompts of `step`."""
        ctx = self.ctx
        return self.batch_of(micro_batch_indices(len(self.prompts), self.seed, step, 0, 1, ctx.rank, ctx.world_size,
                                                 self.stage.micro_batch_size))

    def extra_batch(self, step: int, draw: int) -> PromptBatch:
        """Dynamic sampling's extra draw `draw` (1, 2, ...) of `step`: B more prompts from the same seeded stream,
        at positions from EXTRA_PROMPTS_START that no step's own prompts reach, laid out by (step, draw, worker),
        so a resumed stage draws the same extra prompts."""
        ctx, B = self.ctx, self.stage.micro_batch_size
        slot = (step * self.stage.dynamic_sampling_max_draws + draw - 1) * ctx.world_size + ctx.rank
        return self.batch_of(stream_indices(len(self.prompts), self.seed, EXTRA_PROMPTS_START + slot * B, B))

    def batch_of(self, idx: np.ndarray) -> PromptBatch:
        ctx = self.ctx
        return PromptBatch(
            prompt_ids=[chat_prompt_ids(ctx.tokenizer, ctx.prompt_text(self.prompts[i])) for i in idx],
            targets=self.targets[idx].tolist(),
            columns={c: [values[i] for i in idx] for c, values in self.columns.items()},
            pixels=ctx.image_batch(self.images, idx),
            indices=idx,
        )


EXTRA_PROMPTS_START = 2**40  # stream position of dynamic sampling's first extra prompt, beyond any step's own


@dataclass
class Rollout:
    completions: list[list[int]]  # B·G token lists, prompt i's samples at i·G .. i·G + G − 1
    texts: list[list[str]]  # B groups of G decoded completions
    parsed: list[list[float | None]]  # the number in each, None for a parse failure
    truncated: list[bool] = field(default_factory=list)  # B·G: cut by max_new_tokens before an end-of-turn

    @classmethod
    def of_groups(cls, picks: list[tuple[Rollout, int]], group_size: int) -> Rollout:
        """The groups `picks` (a rollout, a group index in it) as one rollout, in that order."""
        G = group_size
        return cls(
            completions=[c for r, i in picks for c in r.completions[i * G : (i + 1) * G]],
            texts=[r.texts[i] for r, i in picks], parsed=[r.parsed[i] for r, i in picks],
            truncated=[t for r, i in picks for t in r.truncated[i * G : (i + 1) * G]],
        )


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
    eos = ctx.tokenizer.eos_token_id
    truncated = [len(c) >= stage.max_new_tokens and c[-1] != eos for c in completions]
    return Rollout(completions, texts, [[parse_answer(t) for t in group] for group in texts], truncated)


# --------------------------------------------------------------------------- 2. score


@dataclass
class Scores:
    rewards: torch.Tensor  # [B·G] this worker's weighted rewards
    advantages: torch.Tensor  # [B·G] on the training device
    per_term: dict[str, list[list[float]]]  # each term's B x G values on this worker
    targets: list[float]  # the targets the batch-level terms saw (this worker's or the whole step's)


def score_rollout(ctx: StageContext, stage: GRPOStage, batch: PromptBatch, rollout: Rollout, watch,
                  step: int, draw: int = 0) -> Scores:
    """Weighted reward terms (on the answers after the stage's parse-failure policy, each worker substituting
    its own), then the advantages. `draw`: dynamic sampling's extra draw (0: the step's own prompts), which
    seeds the parse-failure substitution apart."""
    ds, G = ctx.dataset, stage.group_size
    seed = (ctx.cfg.seed, ctx.stage_index, step, ctx.rank) + ((draw,) if draw else ())
    parsed = substitute_parse_failures(rollout.parsed, stage.reward_parse_failure, ds.label_min, ds.label_max, seed)
    lengths = [[len(c) for c in rollout.completions[i * G : (i + 1) * G]] for i in range(len(rollout.texts))]
    texts, targets, columns, lo, hi = rollout.texts, batch.targets, batch.columns, 0, None
    if stage.ccc_scope == "global" and ctx.world_size > 1:
        with watch("collectives"):
            (parsed, targets, texts, lengths), columns, offsets = global_rollout(
                parsed, batch.targets, rollout.texts, lengths, batch.columns
            )
        lo, hi = offsets[ctx.rank], offsets[ctx.rank + 1]
    reward_ctx = RewardContext(texts=texts, parsed=parsed, targets=targets, label_min=ds.label_min,
                               label_max=ds.label_max, label_step=ds.label_step, stage=stage, columns=columns,
                               lengths=lengths)
    total, per_term = compute_rewards([(t.name, t.weight) for t in stage.rewards], reward_ctx)
    hi = len(total) if hi is None else hi
    rewards = torch.tensor([r for group in total[lo:hi] for r in group], dtype=torch.float32)
    mine = {name: values[lo:hi] for name, values in per_term.items()}
    return Scores(rewards, advantages_of(ctx, stage, rewards, mine), mine, targets)


def reward_weights(stage: GRPOStage, **extra: float) -> dict[str, float]:
    """Each reward term's weight (a term named twice counts with both), and `extra` terms'."""
    weights: dict[str, float] = defaultdict(float)
    for term in stage.rewards:
        weights[term.name] += term.weight
    return {**weights, **extra}


def advantages_of(ctx: StageContext, stage: GRPOStage, rewards: torch.Tensor, per_term: dict[str, list],
                  **extra_weights: float) -> torch.Tensor:
    """This worker's advantages on the training device: the stage's reward combination, baseline, scaling and
    clipping (a batch-level statistic summed over the workers)."""
    def reduce(values: list[float]) -> list[float]:
        return all_reduce_sum(values, ctx.device) if ctx.world_size > 1 else values

    return step_advantages(
        rewards, per_term, reward_weights(stage, **extra_weights), stage.group_size,
        combination=stage.reward_combination, scale=stage.scale_rewards, baseline=stage.advantage_baseline,
        clip=(stage.advantage_clip_low, stage.advantage_clip_high), reduce=reduce,
    ).to(ctx.device)


KL_PENALTY_TERM = "kl_penalty"  # the reward term of a KL placed in the reward: −KL of each completion


def kl_in_reward(ctx: StageContext, stage: GRPOStage, scores: Scores, mask: torch.Tensor, sampling_logp: torch.Tensor,
                 ref_logp: torch.Tensor, kl_coef: float) -> Scores:
    """PPO-style RLHF's placement of the KL: each completion's reward minus β·(its KL to the reference, summed
    over its tokens, at the policy that sampled it), as one more term (`kl_penalty`, −KL, weight β); then the
    advantages again."""
    kl = sequence_kl(sampling_logp, ref_logp, mask, stage.kl_estimator).float().cpu()
    per_term = {**scores.per_term, KL_PENALTY_TERM: (-kl).view(-1, stage.group_size).tolist()}
    rewards = scores.rewards - kl_coef * kl
    advantages = advantages_of(ctx, stage, rewards, per_term, **{KL_PENALTY_TERM: kl_coef})
    return Scores(rewards, advantages, per_term, scores.targets)


def global_rollout(parsed: list[list[float | None]], targets: list[float], texts, lengths, columns):
    """All workers' minibatches in rank order, and where this worker's slice sits in it."""
    parts = all_gather_objects((parsed, targets, texts, lengths, columns))
    offsets = np.cumsum([0] + [len(p[1]) for p in parts])
    merged = [sum((p[i] for p in parts), []) for i in range(4)]
    merged_columns = {k: sum((p[4][k] for p in parts), []) for k in parts[0][4]}
    return merged, merged_columns, offsets


# --------------------------------------------------------------------------- 1-2 with dynamic sampling


@dataclass
class Sampled:
    """A step's training batch on this worker, and what its sampling saw."""

    batch: PromptBatch
    rollout: Rollout
    scores: Scores
    zero_spread: int  # groups of the step's own B prompts whose rewards all agree
    draws: int = 0  # dynamic sampling's extra draws of B prompts (the same on every worker)
    zero_spread_kept: int = 0  # agreeing groups in the batch trained on


def sample_step(engine, ctx: StageContext, stage: GRPOStage, prompts: PromptSource, step: int, watch) -> Sampled:
    """The step's rollout and scores: B prompts, G samples each; with dynamic sampling, the groups whose rewards
    all agree give way to groups of further prompts."""
    batch = prompts.batch(step)
    rollout, scores, agree = draw_groups(engine, ctx, stage, batch, step, watch)
    first = Sampled(batch, rollout, scores, zero_spread=int(agree.sum()), zero_spread_kept=int(agree.sum()))
    return refill(engine, ctx, stage, prompts, step, watch, first, agree) if stage.dynamic_sampling else first


def draw_groups(engine, ctx: StageContext, stage: GRPOStage, batch: PromptBatch, step: int, watch, draw: int = 0):
    """(rollout, scores, bool [B]: the groups whose rewards all agree) of one batch of prompts."""
    with watch("generation"):
        rollout = generate_rollout(engine, ctx, stage, batch)
    with watch("reward"):
        scores = score_rollout(ctx, stage, batch, rollout, watch, step, draw)
    return rollout, scores, agreeing_groups(stage, scores)


def agreeing_groups(stage: GRPOStage, scores: Scores) -> torch.Tensor:
    return zero_spread_groups(scores.rewards, scores.per_term, reward_weights(stage), stage.group_size,
                              stage.reward_combination)


def refill(engine, ctx: StageContext, stage: GRPOStage, prompts: PromptSource, step: int, watch, first: Sampled,
           agree: torch.Tensor) -> Sampled:
    """DAPO's dynamic sampling: while any worker lacks B groups whose rewards differ, every worker draws B more
    prompts (so all take the same draws and collectives), at most dynamic_sampling_max_draws times; then each keeps
    B groups, those that differ first, in draw order, and the batch is scored again (a batch-level term sees the
    batch trained on). Each worker keeps B prompts: the update's chunks and collectives stay aligned."""
    B = len(first.batch.prompt_ids)
    pool = [(first.batch, first.rollout, agree)]
    draws = 0
    while draws < stage.dynamic_sampling_max_draws and groups_missing(ctx, pool, B, watch) > 0:
        draws += 1
        batch = prompts.extra_batch(step, draws)
        rollout, _, agree = draw_groups(engine, ctx, stage, batch, step, watch, draws)
        pool.append((batch, rollout, agree))
    if draws == 0:
        return first
    chosen = sorted((bool(a), d, i) for d, (_, _, flags) in enumerate(pool) for i, a in enumerate(flags.tolist()))[:B]
    batch = prompts.batch_of(np.array([pool[d][0].indices[i] for _, d, i in chosen]))
    rollout = Rollout.of_groups([(pool[d][1], i) for _, d, i in chosen], stage.group_size)
    with watch("reward"):
        scores = score_rollout(ctx, stage, batch, rollout, watch, step, draws + 1)
    return Sampled(batch, rollout, scores, first.zero_spread, draws, int(agreeing_groups(stage, scores).sum()))


def groups_missing(ctx: StageContext, pool: list, B: int, watch) -> int:
    """Groups whose rewards differ that the workers still lack for B each, summed over the workers."""
    missing = max(B - sum(int((~agree).sum()) for _, _, agree in pool), 0)
    if ctx.world_size == 1:
        return missing
    with watch("collectives"):
        return int(all_reduce_sum([float(missing)], ctx.device)[0])


# --------------------------------------------------------------------------- 3. fixed log-probs


@dataclass
class LogProbForward:
    """How this rollout's log-probs are computed: the samples split into `grad_accum` chunks, each
    chunk's log-probs from a model (of the distribution the rollout sampled, at the stage's temperature, for
    the policy, the old policy and the reference alike), and the mask of completion tokens in the same layout."""

    chunks: list[np.ndarray]
    chunk_pixels: list[Any]
    mask: torch.Tensor
    # (model, chunk rows, chunk pixels, entropy=None) -> log-probs, or (log-probs, entropy) with `entropy`
    logprobs: Callable[..., Any]

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

            def logprobs(model, c, px, entropy=None):
                return shared_prompt_logprobs(model, batch.prompt_ids, rollout.completions, c.tolist(), G, pad_id,
                                              width, keep, ctx.device, temperature=stage.temperature, entropy=entropy)

            return cls(chunks, chunk_pixels, mask, logprobs)
        input_ids, attention_mask, mask = build_sequences(batch.prompt_ids, rollout.completions, G, pad_id)
        # The loss reads completion tokens only: log-probs start at the shortest prompt's last token (the first
        # position that predicts a completion token in any row). On the image path the model may expand
        # placeholders, so every position is kept there.
        start = min(len(p) for p in batch.prompt_ids) - 1 if batch.pixels is None else 0
        input_ids, attention_mask = input_ids.to(ctx.device), attention_mask.to(ctx.device)

        def logprobs(model, c, px, entropy=None):
            return token_logprobs(model, input_ids[c], attention_mask[c], px, start=start, keep=keep,
                                  temperature=stage.temperature, entropy=entropy)

        return cls(chunks, chunk_pixels, mask[:, start:].to(ctx.device), logprobs)


@torch.no_grad()
def fixed_logprobs(engine, reference: ReferencePolicy | None, forward: LogProbForward, stage: GRPOStage):
    """(old-policy log-probs, reference log-probs), each None where not needed. With one update per rollout
    the policy has not moved since it sampled: its old log-probs are the update's own, detached (ratio 1),
    so no separate forward is needed, unless a KL placed in the reward needs them before the update."""
    kl_in_reward_needs_them = reference is not None and stage.kl_placement == "reward"
    old_logp = forward.all_chunks(engine) if stage.num_iterations > 1 or kl_in_reward_needs_them else None
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
    entropy: float = 0.0  # token-weighted
    tokens: float = 0.0
    global_normaliser: float = 1.0


def loss_mask(forward: LogProbForward, rollout: Rollout, stage: GRPOStage) -> torch.Tensor:
    """The completion tokens the loss reads: all, or with mask_truncated_completions all but those of completions
    cut by max_new_tokens (DAPO's overlong filtering)."""
    if not stage.mask_truncated_completions:
        return forward.mask
    kept = torch.tensor([not t for t in rollout.truncated], dtype=forward.mask.dtype, device=forward.mask.device)
    return forward.mask * kept.unsqueeze(1)


def loss_options(stage: GRPOStage) -> dict[str, Any]:
    """The stage's choices of grpo_loss_terms, besides β."""
    return dict(
        kl_estimator=stage.kl_estimator, eps_low=stage.epsilon_low, eps_high=stage.epsilon_high,
        aggregation=stage.loss_aggregation, max_completion_length=stage.max_new_tokens,
        importance_ratio=stage.importance_ratio, clip_ratio_c=stage.clip_ratio_c, entropy_coef=stage.entropy_coef,
        top_entropy_fraction=stage.top_entropy_fraction,
    )


def policy_update(engine, ctx: StageContext, stage: GRPOStage, forward: LogProbForward, advantages: torch.Tensor,
                  old_logp, ref_logp, watch: Stopwatch, guard: StepGuard | None = None, *,
                  kl_coef: float | None = None, mask: torch.Tensor | None = None) -> UpdateTotals:
    """`num_iterations` passes of the clipped objective over the rollout, one optimizer step per chunk. `kl_coef`:
    β of the KL term in the loss (default the stage's); `mask`: the tokens the loss reads (default all completion
    tokens). The policy's entropy comes from the same forward's logits: with a graph only for an entropy bonus."""
    mask = forward.mask if mask is None else mask
    beta = stage.beta if kl_coef is None else kl_coef
    local_norm = float(LOSS_AGGREGATIONS[stage.loss_aggregation].normaliser(mask, stage.max_new_tokens))
    with watch("collectives"):
        (global_norm,) = all_reduce_sum([local_norm], ctx.device)
    scale = ctx.world_size * stage.grad_accum / max(global_norm, 1.0)
    totals = UpdateTotals(global_normaliser=global_norm)
    entropy = "differentiable" if stage.entropy_coef > 0 else "detached"
    for _ in range(stage.num_iterations):
        for c, px in zip(forward.chunks, forward.chunk_pixels):
            with watch("forward_backward"):
                logp, token_entropy = forward.logprobs(engine, c, px, entropy=entropy)
                out = grpo_loss_terms(
                    logp, logp.detach() if stage.num_iterations == 1 else old_logp[c],
                    None if ref_logp is None else ref_logp[c], advantages[c], mask[c], beta=beta,
                    entropy=token_entropy, **loss_options(stage),
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
            totals.entropy += float(out["entropy_mean"]) * weight
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
    zero_spread_groups: float = 0.0  # of the step's own groups
    groups: float = 0.0
    draws: float = 0.0  # dynamic sampling's extra draws (the same on every worker)
    zero_spread_kept: float = 0.0  # agreeing groups trained on (dynamic sampling out of draws)
    truncated: float = 0.0  # completions cut by max_new_tokens
    entropy: float = 0.0  # the policy's mean token entropy on this worker
    term_sums: dict[str, float] = field(default_factory=dict)  # each reward term's sum over samples

    @classmethod
    def of_worker(cls, sampled: Sampled, mask: torch.Tensor, totals: UpdateTotals, stage: GRPOStage) -> StepStats:
        batch, rollout, scores = sampled.batch, sampled.rollout, sampled.scores
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
            zero_spread_groups=float(sampled.zero_spread), groups=float(len(batch.targets)),
            draws=float(sampled.draws), zero_spread_kept=float(sampled.zero_spread_kept),
            truncated=float(sum(rollout.truncated)), entropy=totals.entropy / tokens,
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
            "zero_spread_groups": self.zero_spread_groups / max(self.groups, 1.0),
            "truncated_rate": self.truncated / n,
            "entropy": self.entropy / w,
            "dynamic_sampling/draws": self.draws / w,
            "dynamic_sampling/zero_spread_kept": self.zero_spread_kept / max(self.groups, 1.0),
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
        sampling_off = not ctx.cfg.pipeline[ctx.stage_index].dynamic_sampling
        metrics = {f"train/{k}": float(np.nanmean([row[k] for row in rows])) for k in rows[0]
                   if not (sampling_off and k.startswith("dynamic_sampling/"))}
        metrics["train/effective_batch_prompts"] = float(np.mean(self.prompts))
        metrics.update({f"time/{k}_s": v / len(rows) for k, v in self.phases.items()})
        metrics["train/lr"] = engine.get_lr()[0]
        metrics["train/stage"] = float(ctx.stage_index)
        return metrics
