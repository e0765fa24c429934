"""One GRPO stage (METHODS §4): rollout, reward, advantage, clipped policy update — on the same
DeepSpeed workers as SFT.

Per optimizer step, each worker:
1. takes its B prompts and samples G completions each in ONE batched, KV-cached `generate` call;
2. parses them and computes the weighted reward terms (batch-level CCC over the worker's own
   minibatch, or over the whole step's batch gathered from all workers: `ccc_scope`);
3. turns rewards into group-normalised advantages;
4. computes old-policy (and, when beta > 0, reference) log-probs once per rollout batch;
5. runs `num_iterations` clipped-objective updates, normalising the loss over the GLOBAL batch.

With images, each prompt's pixel inputs go into the generate call once (transformers encodes each
image once for its G samples) and are repeated per sample for the log-prob forwards.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from orchestrator.config import GRPOStage
from orchestrator.data.collate import chat_prompt_ids, collate_prompts, micro_batch_indices, pad_batch
from orchestrator.engine.collectives import all_gather_objects, all_reduce_sum
from orchestrator.engine.deepspeed import build_engine, full_parameters, optimizer_step
from orchestrator.engine.reference import REFERENCE_FILE, ReferencePolicy
from orchestrator.methods.answers import parse_answer
from orchestrator.methods.grpo import group_advantages, grpo_loss_terms
from orchestrator.methods.rewards import RewardContext, compute_rewards
from orchestrator.modeling.generation import accepts_logits_to_keep, decode_completions, generate, prompt_prefill
from orchestrator.modeling.last_layer import enable_last_layer_from
from orchestrator.stages.context import StageContext
from orchestrator.stages.timing import Stopwatch


def token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, images=None, start: int = 0, keep: bool = False
) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t = start+1..T-1, shape [N, T-1-start]; `images` one row per sequence.
    `start` skips prompt positions that no row needs (the loss reads completion tokens only); with `keep`
    the model computes the LM head for the kept positions only (`logits_to_keep`), else full logits are
    sliced. log_softmax(x)[y] is computed as x[y] − logsumexp(x), never materialising [N, T, V] log-probs."""
    extra = images.inputs_for(input_ids) if images is not None else {}
    width = input_ids.shape[1] - start  # positions start..T-1; the last predicts nothing
    if keep and start > 0:
        extra["logits_to_keep"] = width
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, -width:-1, :].float()
    targets = input_ids[:, start + 1 :].unsqueeze(-1)
    return (logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1))


def shared_prompt_logprobs(
    model, prompt_ids: list[list[int]], completions: list[list[int]], rows, group_size: int, pad_id: int,
    width: int, keep: bool = True, device: torch.device | None = None,
) -> torch.Tensor:
    """log p(completion token k | prompt, completion_<k) for the samples `rows`, shape [len(rows), width]:
    column k is completion token k (values past a completion's end are padding, masked by the caller).

    The G samples of a prompt share it, so each distinct prompt runs through the model ONCE (left-padded,
    with a key/value cache) and its cache is repeated for its samples; only the completion tokens run per
    sample. Same log-probs and gradients as `token_logprobs` on the full rows (the prompt's states get
    the summed gradient of its samples), at a fraction of the compute when prompts are longer than
    completions, as they are for GRPO here."""
    owners = [j // group_size for j in rows]
    distinct = {p: i for i, p in enumerate(sorted(set(owners)))}  # prompt index -> its row in the prefill
    prompts = collate_prompts([prompt_ids[p] for p in distinct], pad_id)  # left-padded: all end at one column
    p_ids, p_mask = prompts["input_ids"].to(device), prompts["attention_mask"].to(device)
    out = prompt_prefill(model, p_ids, p_mask, keep_last=keep)
    select = torch.tensor([distinct[o] for o in owners], device=p_ids.device)
    cache = out.past_key_values
    cache.batch_select_indices(select)  # one cache row per sample (differentiable indexing)
    samples = [completions[j] for j in rows]
    c_mask = completion_mask(samples, width).long().to(p_ids.device)
    c_ids = pad_batch([s + [pad_id] * (width - len(s)) for s in samples], pad_id).to(p_ids.device)
    c_pos = p_mask.sum(-1)[select].unsqueeze(1) + torch.arange(width, device=p_ids.device)
    logits = model(
        input_ids=c_ids, attention_mask=torch.cat([p_mask[select], c_mask], 1), position_ids=c_pos,
        past_key_values=cache, use_cache=True,
    ).logits
    # Completion token 0 is predicted by the prompt's last position, token k by completion position k-1.
    logits = torch.cat([out.logits[:, -1:][select], logits[:, : width - 1]], 1).float()
    return logits.gather(-1, c_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_mask(completions: list[list[int]], width: int) -> torch.Tensor:
    """[N, width] float: 1 on each completion's tokens (the layout of `shared_prompt_logprobs`)."""
    mask = torch.zeros((len(completions), width))
    for i, c in enumerate(completions):
        mask[i, : len(c)] = 1.0
    return mask


def build_sequences(prompt_ids: list[list[int]], completions: list[list[int]], group_size: int, pad_id: int):
    """Right-padded prompt+completion rows and the mask of completion positions (aligned to t = 1..T-1)."""
    rows, comp_mask = [], []
    for j, completion in enumerate(completions):
        prompt = prompt_ids[j // group_size]
        rows.append(prompt + completion)
        comp_mask.append([0] * len(prompt) + [1] * len(completion))
    input_ids = pad_batch(rows, pad_id)
    attention_mask = pad_batch([[1] * len(r) for r in rows], 0)
    mask = pad_batch(comp_mask, 0)[:, 1:].float()
    return input_ids, attention_mask, mask


def step_statistics(g: list[float], world_size: int, term_names: list[str]) -> dict[str, float]:
    """One step's logged statistics from the workers' summed vector (laid out as in run_grpo_stage):
    sums over samples become means, per-worker means become the mean over workers."""
    w = float(world_size)
    n = max(g[2], 1.0)
    mean = g[0] / n
    stats = {
        "reward/mean": mean,
        "reward/std": float(np.sqrt(max(g[1] / n - mean**2, 0.0))),
        "advantage/std": g[3] / w,
        "kl": g[4] / w,
        "clip_fraction": g[5] / w,
        "parse_fail_rate": g[6] / n,
        "completion_length": g[7] / w,
        "pred_std_over_label_std": (g[8] / g[9]) if g[9] > 0 else float("nan"),
        "loss": g[10],
    }
    for k, name in enumerate(term_names):
        stats[f"reward/{name}"] = g[11 + k] / n
    return stats


def global_rollout(parsed: list[list[float | None]], targets: list[float], texts, columns):
    """All workers' minibatches in rank order, and where this worker's slice sits in it."""
    parts = all_gather_objects((parsed, targets, texts, columns))
    offsets = np.cumsum([0] + [len(p[1]) for p in parts])
    merged = [sum((p[i] for p in parts), []) for i in range(3)]
    merged_columns = {k: sum((p[3][k] for p in parts), []) for k in parts[0][3]}
    return merged, merged_columns, offsets


def run_grpo_stage(ctx: StageContext, stage: GRPOStage, start_step: int = 0, resume_dir: str | None = None):
    # Prompt prefills need the last decoder layer at the last prompt position only; enabled before the
    # reference copy is made, so the copy's prefills skip the same work.
    enable_last_layer_from(ctx.model)
    reference = None
    if stage.beta > 0:
        # The reference is the policy at the START of this stage; a checkpoint stores it separately.
        lora = ctx.cfg.model.lora.enabled
        saved = Path(resume_dir or "", REFERENCE_FILE)
        weights = load_file(str(saved)) if resume_dir is not None and not lora else None
        with ctx.stopwatch("deepspeed_init"):  # a copy, and a DeepSpeed engine under ZeRO-3
            reference = ReferencePolicy(ctx.model, ctx.cfg, stage, lora, weights)
    with ctx.stopwatch("deepspeed_init"):
        engine = build_engine(ctx.model, stage, ctx.cfg)
    if resume_dir is not None:
        with ctx.stopwatch("checkpoint_load"):
            engine.load_checkpoint(resume_dir, tag="ckpt")
    ctx.extra["reference"] = reference
    keep = accepts_logits_to_keep(engine)
    # Prompt-shared forwards on the text path; images (placeholder expansion) and ZeRO-3 (parameters
    # gathered per forward call) take the per-row path.
    shared_prompts = (
        stage.shared_prompt_forward and ctx.processor is None and ctx.cfg.deepspeed.zero_stage < 3
    )

    ds = ctx.dataset
    train = ds.load("train")
    prompts = train.column("prompt").to_pylist()
    targets_all = np.asarray(train.column("target").to_pylist(), dtype=np.float64)
    images = ctx.image_column(train)
    # Reward terms see the row's other columns; image bytes stay out (a global-scope CCC would all-gather them).
    extra_cols = [c for c in train.column_names if c not in ("prompt", "image")]
    columns_all = {c: train.column(c).to_pylist() for c in extra_cols}
    B, G = stage.micro_batch_size, stage.group_size
    seed = ctx.cfg.seed + 1000 * ctx.stage_index
    terms = [(t.name, t.weight) for t in stage.rewards]
    tok = ctx.tokenizer
    timings: dict[str, float] = defaultdict(float)
    window_local: list[list[float]] = []  # per step: this worker's sums, reduced once per log window
    window_prompts: list[float] = []
    watch = Stopwatch(timings)

    for step in range(start_step, stage.steps):
        t_step = time.perf_counter()
        idx = micro_batch_indices(len(prompts), seed, step, 0, 1, ctx.rank, ctx.world_size, B)
        prompt_ids = [chat_prompt_ids(tok, ctx.prompt_text(prompts[i])) for i in idx]
        pixels = ctx.image_batch(images, idx)  # None on the text path
        targets = targets_all[idx].tolist()
        columns = {c: [columns_all[c][i] for i in idx] for c in extra_cols}

        # 1. rollout: B prompts x G samples, one generate call
        t0 = time.perf_counter()
        with full_parameters(engine) as module:
            completions = generate(
                module, tok, prompt_ids, max_new_tokens=stage.max_new_tokens, do_sample=True,
                temperature=stage.temperature, top_p=stage.top_p, num_return_sequences=G, device=ctx.device,
                images=pixels,
            )
        texts_flat = decode_completions(tok, completions)
        texts = [texts_flat[i * G : (i + 1) * G] for i in range(B)]
        parsed = [[parse_answer(t) for t in group] for group in texts]
        timings["generation"] += time.perf_counter() - t0

        # 2. rewards (batch-level terms see the worker's minibatch or the global one)
        t0 = time.perf_counter()
        if stage.ccc_scope == "global" and ctx.world_size > 1:
            with watch("collectives"):
                (g_parsed, g_targets, g_texts), g_columns, offsets = global_rollout(parsed, targets, texts, columns)
            lo, hi = offsets[ctx.rank], offsets[ctx.rank + 1]
        else:
            g_parsed, g_targets, g_texts, g_columns, lo, hi = parsed, targets, texts, columns, 0, B
        rctx = RewardContext(
            texts=g_texts, parsed=g_parsed, targets=g_targets, label_min=ds.label_min, label_max=ds.label_max,
            stage=stage, columns=g_columns,
        )
        total, per_term = compute_rewards(terms, rctx)
        rewards = torch.tensor([r for group in total[lo:hi] for r in group], dtype=torch.float32)
        advantages = group_advantages(rewards, G, scale=stage.scale_rewards).to(ctx.device)
        timings["reward"] += time.perf_counter() - t0

        # 3. old-policy and reference log-probs, once per rollout batch
        t0 = time.perf_counter()
        chunks = np.array_split(np.arange(B * G), stage.grad_accum)
        sample_pixels = pixels.repeat(G) if pixels is not None else None  # row j shows prompt j // G's image
        chunk_pixels = [sample_pixels.select(c) if sample_pixels is not None else None for c in chunks]
        if shared_prompts:
            # Each prompt runs once per chunk and its cache serves its G samples; log-probs and the mask
            # are laid out per completion token.
            width = max(1, max(len(c) for c in completions))
            mask = completion_mask(completions, width).to(ctx.device)

            def logprobs(model, c, px):
                return shared_prompt_logprobs(
                    model, prompt_ids, completions, c.tolist(), G, tok.pad_token_id, width, keep, ctx.device
                )
        else:
            input_ids, attention_mask, mask = build_sequences(prompt_ids, completions, G, tok.pad_token_id)
            # The loss reads completion tokens only: log-probs start at the shortest prompt's last token (the
            # first position that predicts a completion token in any row). On the image path the model may
            # expand placeholders, so every position is kept there.
            start = min(len(p) for p in prompt_ids) - 1 if pixels is None else 0
            mask = mask[:, start:]
            input_ids, attention_mask, mask = input_ids.to(ctx.device), attention_mask.to(ctx.device), mask.to(ctx.device)

            def logprobs(model, c, px):
                return token_logprobs(model, input_ids[c], attention_mask[c], px, start=start, keep=keep)

        with torch.no_grad():
            # With one update per rollout the policy has not moved since it sampled: its old log-probs are
            # the update's own log-probs, detached (ratio 1), so no separate forward is needed.
            old_logp = None
            if stage.num_iterations > 1:
                old_logp = torch.cat([logprobs(engine, c, px) for c, px in zip(chunks, chunk_pixels)])
            ref_logp = None
            if reference is not None:
                with reference.forward_model(engine) as ref_model:
                    ref_logp = torch.cat([logprobs(ref_model, c, px) for c, px in zip(chunks, chunk_pixels)])
        timings["logprobs"] += time.perf_counter() - t0

        # 4. clipped-objective updates, normalised over the whole step's batch across workers
        local_norm = float(mask.sum()) if stage.loss_aggregation == "token_mean" else float(B * G)
        with watch("collectives"):
            (global_norm,) = all_reduce_sum([local_norm], ctx.device)
        scale = ctx.world_size * stage.grad_accum / max(global_norm, 1.0)
        stats = defaultdict(float)
        for _ in range(stage.num_iterations):
            t0 = time.perf_counter()
            for c, px in zip(chunks, chunk_pixels):
                logp = logprobs(engine, c, px)
                out = grpo_loss_terms(
                    logp, logp.detach() if old_logp is None else old_logp[c],
                    None if ref_logp is None else ref_logp[c], advantages[c], mask[c],
                    beta=stage.beta, kl_estimator=stage.kl_estimator, eps_low=stage.epsilon_low,
                    eps_high=stage.epsilon_high, aggregation=stage.loss_aggregation,
                )
                engine.backward(out["loss_sum"] * scale)
                t1 = time.perf_counter()
                timings["forward_backward"] += t1 - t0
                optimizer_step(engine)
                timings["optimizer"] += time.perf_counter() - t1
                t0 = time.perf_counter()
                weight = float(mask[c].sum())
                stats["loss"] += float(out["loss_sum"].detach())
                stats["kl"] += float(out["kl_mean"]) * weight
                stats["clip"] += float(out["clip_fraction"]) * weight
                stats["tokens"] += weight

        # 5. statistics for this step (summed over workers so rank 0 logs the global picture)
        flat_parsed = [p for group in parsed for p in group]
        ok = [p for p in flat_parsed if p is not None]
        local = [
            float(rewards.sum()), float((rewards**2).sum()), float(rewards.numel()),
            float(advantages.std()) if advantages.numel() > 1 else 0.0,
            stats["kl"] / max(stats["tokens"], 1.0), stats["clip"] / max(stats["tokens"], 1.0),
            float(len(flat_parsed) - len(ok)), float(mask.sum()) / (B * G),
            float(np.std(ok)) if len(ok) > 1 else 0.0, float(np.std(targets)) if len(targets) > 1 else 0.0,
            stats["loss"] / max(global_norm, 1.0) / stage.num_iterations,
        ]
        for name, values in per_term.items():
            vals = [r for group in values[lo:hi] for r in group]
            local.append(float(np.sum(vals)))
        window_local.append(local)
        window_prompts.append(float(len(g_targets)))

        done = step + 1
        log_now = done % ctx.cfg.tracking.log_every == 0 or done == stage.steps
        if log_now:
            # One collective per logging window, not per step: every step's statistics from every worker.
            with watch("collectives"):
                summed = all_reduce_sum([v for row in window_local for v in row], ctx.device)
            width = len(window_local[0])
            per_step = [step_statistics(summed[i : i + width], ctx.world_size, list(per_term)) for i in range(0, len(summed), width)]
        took = time.perf_counter() - t_step
        timings["step"] += took
        ctx.stopwatch.add("train", took)

        if log_now:
            metrics = {f"train/{k}": float(np.nanmean([row[k] for row in per_step])) for k in per_step[0]}
            metrics["train/effective_batch_prompts"] = float(np.mean(window_prompts))
            steps_in_window = len(per_step)
            metrics.update({f"time/{k}_s": v / steps_in_window for k, v in timings.items()})
            metrics["train/lr"] = engine.get_lr()[0]
            metrics["train/stage"] = float(ctx.stage_index)
            ctx.log(metrics, ctx.global_step_offset + done)
            window_local.clear()
            window_prompts.clear()
            timings.clear()
        if done % ctx.cfg.checkpoint.every_steps == 0 or done == stage.steps:
            with ctx.stopwatch("checkpoint"):
                ctx.checkpoint(engine, done, {"train/step": float(ctx.global_step_offset + done)})
    return engine
