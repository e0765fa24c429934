"""One SFT stage on a DeepSpeed engine (METHODS §3): loss on answer tokens only.

Reads top to bottom like single-process pseudocode: encode the split, then for each optimizer
step fetch this worker's micro-batches, normalise the loss over the GLOBAL token count, backward,
step, log, checkpoint.
"""

from __future__ import annotations

import time

import torch

from orchestrator.config import SFTStage
from orchestrator.data.collate import IGNORE_INDEX, collate_sft, encode_sft_example, micro_batch_indices
from orchestrator.evaluate import format_answer
from orchestrator.losses import sft_loss
from orchestrator.stages.common import StageContext, all_reduce_sum, build_engine


def loss_params(stage: SFTStage) -> dict:
    if stage.loss == "ce":
        return {"digit_weight": stage.digit_weight}
    if stage.loss == "softlabel":
        return {"psi": stage.psi, "eta": stage.resolved_eta(), "lam": stage.softlabel_lambda}
    return {"tau": stage.tau, "alpha": stage.alpha, "place_value_weights": stage.place_value_weights}


def encode_split(tokenizer, table) -> list[tuple[list[int], list[int]]]:
    prompts = table.column("prompt").to_pylist()
    targets = table.column("target").to_pylist()
    return [encode_sft_example(tokenizer, p, format_answer(t)) for p, t in zip(prompts, targets)]


def run_sft_stage(ctx: StageContext, stage: SFTStage, start_step: int = 0, resume_dir: str | None = None):
    """Train `stage.steps` optimizer steps; returns the engine (its module carries on to the next stage)."""
    engine = build_engine(ctx.model, stage, ctx.cfg)
    if resume_dir is not None:
        engine.load_checkpoint(resume_dir, tag="ckpt", load_module_strict=True)
    examples = encode_split(ctx.tokenizer, ctx.dataset.load("train"))
    params = loss_params(stage)
    digit_ids = ctx.digit_token_ids.to(ctx.device)
    seed = ctx.cfg.seed + 1000 * ctx.stage_index
    every_ckpt = ctx.cfg.checkpoint.every_steps
    engine.train()

    window = {"loss": 0.0, "tokens": 0.0, "samples": 0.0, "time": 0.0, "steps": 0}
    for step in range(start_step, stage.steps):
        t0 = time.perf_counter()
        batches = [
            collate_sft(
                [examples[i] for i in micro_batch_indices(
                    len(examples), seed, step, k, stage.grad_accum, ctx.rank, ctx.world_size, stage.micro_batch_size
                )],
                ctx.tokenizer.pad_token_id,
            )
            for k in range(stage.grad_accum)
        ]
        # Token mean over the whole global batch, not per micro-batch: every worker needs the total.
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        (global_tokens,) = all_reduce_sum([local_tokens], ctx.device)
        # DeepSpeed averages gradients over workers and accumulation steps; undo that scaling.
        scale = ctx.world_size * stage.grad_accum / max(global_tokens, 1.0)
        step_loss = 0.0
        for batch in batches:
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shifted = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
            labels = batch["labels"][:, 1:].reshape(-1)
            loss_sum, _ = sft_loss(stage.loss, shifted, labels, digit_ids, **params)
            engine.backward(loss_sum * scale)
            engine.step()
            step_loss += float(loss_sum.detach())
        (global_loss,) = all_reduce_sum([step_loss], ctx.device)
        window["loss"] += global_loss / max(global_tokens, 1.0)
        window["tokens"] += global_tokens
        window["samples"] += stage.micro_batch_size * stage.grad_accum * ctx.world_size
        window["time"] += time.perf_counter() - t0
        window["steps"] += 1

        done = step + 1
        if done % ctx.cfg.tracking.log_every == 0 or done == stage.steps:
            metrics = {
                "train/loss": window["loss"] / window["steps"],
                "train/lr": engine.get_lr()[0],
                "train/tokens_per_s": window["tokens"] / window["time"],
                "train/samples_per_s": window["samples"] / window["time"],
                "train/stage": float(ctx.stage_index),
            }
            ctx.log(metrics, ctx.global_step_offset + done)
            window = {"loss": 0.0, "tokens": 0.0, "samples": 0.0, "time": 0.0, "steps": 0}
        if done % every_ckpt == 0 or done == stage.steps:
            ctx.checkpoint(engine, done, {"train/step": float(ctx.global_step_offset + done)})
    return engine
