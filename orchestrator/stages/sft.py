"""One SFT stage on a DeepSpeed engine (METHODS §3): loss on answer tokens only.

Reads top to bottom like single-process pseudocode: encode the split, then for each optimizer
step fetch this worker's micro-batches, normalise the loss over the GLOBAL token count, backward,
step, log, checkpoint.

Rows with images (a vision-language model on an image dataset) add the image placeholders to the
prompt (masked from the loss like the rest of it) and their pixel tensors to each micro-batch.
`rvtc` trains a K-bin head on the last prompt token instead of the answer tokens; its normaliser is
the global sample count.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from orchestrator.config import SFTStage
from orchestrator.data.collate import (
    IGNORE_INDEX,
    chat_prompt_ids,
    collate_rvtc,
    collate_sft,
    encode_sft_example,
    micro_batch_indices,
    step_indices,
    supervised_counts,
)
from orchestrator.engine.collectives import all_reduce_sum
from orchestrator.engine.deepspeed import build_engine, optimizer_step
from orchestrator.methods.answers import format_answer
from orchestrator.methods.losses import sft_loss
from orchestrator.methods.rvtc import attach_rvtc_head, head_logits, nearest_bins, rvtc_loss
from orchestrator.modeling.generation import accepts_logits_to_keep
from orchestrator.modeling.last_layer import KEYWORD as LAST_LAYER_FROM
from orchestrator.modeling.last_layer import enable_last_layer_from, takes_last_layer_from
from orchestrator.stages.context import StageContext
from orchestrator.stages.timing import Stopwatch


def loss_params(stage: SFTStage) -> dict:
    if stage.loss == "ce":
        return {"digit_weight": stage.digit_weight}
    if stage.loss == "softlabel":
        return {"psi": stage.psi, "eta": stage.resolved_eta(), "lam": stage.softlabel_lambda}
    if stage.loss == "rvtc":
        return {}
    return {"tau": stage.tau, "alpha": stage.alpha, "place_value_weights": stage.place_value_weights}


def encode_split(tokenizer, table, prompt_text=lambda p: p) -> list[tuple[list[int], list[int]]]:
    prompts = table.column("prompt").to_pylist()
    targets = table.column("target").to_pylist()
    return [encode_sft_example(tokenizer, prompt_text(p), format_answer(t)) for p, t in zip(prompts, targets)]


def encode_rvtc_split(tokenizer, table, centres, prompt_text=lambda p: p) -> list[tuple[list[int], int]]:
    """(prompt ids ending in the assistant header, nearest bin of the target) per row."""
    prompts = table.column("prompt").to_pylist()
    bins = nearest_bins(torch.tensor(table.column("target").to_pylist(), dtype=torch.float64), centres).tolist()
    return [(chat_prompt_ids(tokenizer, prompt_text(p)), b) for p, b in zip(prompts, bins)]


def supervised_logits(model, batch: dict[str, torch.Tensor], keep_only_supervised: bool = True):
    """(logits [N, V], labels [N]) at the N positions that predict a supervised label, for right-padded
    rows. With `keep_only_supervised` the LM head runs only from the first position any row supervises
    (`logits_to_keep`): prompt positions before it never reach the vocabulary projection, nor, on a model
    with `enable_last_layer_from`, the last decoder layer's queries and MLP. Either way only the supervised
    positions reach the loss; ignored positions add nothing to any loss's sum or count, so the loss is the
    one computed from full logits (tests/test_stage_maths.py)."""
    labels = batch["labels"][:, 1:]  # labels[:, t] is predicted by the logits at position t
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    start = 0
    if keep_only_supervised:
        rows_supervise = (labels != IGNORE_INDEX).any(0).nonzero()
        start = int(rows_supervise[0]) if len(rows_supervise) else labels.shape[1]
        inputs["logits_to_keep"] = labels.shape[1] + 1 - start  # positions start..T-1; T-1 predicts nothing
        if takes_last_layer_from(model):
            inputs[LAST_LAYER_FROM] = start
    logits = model(**inputs).logits
    logits = logits[:, -(labels.shape[1] + 1 - start) : -1, :]  # positions start..T-2
    labels = labels[:, start:]
    supervised = labels != IGNORE_INDEX
    return logits[supervised].float(), labels[supervised]


def length_groups(lengths, groups: int) -> list[np.ndarray]:
    """Positions of a micro-batch's rows in at most `groups` runs of similar length (sorted by length,
    near-equal counts), so each run is padded only to its own longest row. The rows and the loss sum
    stay the same; only padding goes."""
    if groups <= 1:
        return [np.arange(len(lengths))]
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [run for run in np.array_split(order, min(groups, len(order))) if len(run)]


def micro_batch_loss(model, parts, loss: str, params: dict, digit_ids, head=None, keep_supervised=True, device=None):
    """The summed loss of one micro-batch given as padded sub-batches: one backward follows, whatever
    the number of parts (DeepSpeed reduces gradients once per micro-batch)."""
    total = torch.zeros((), device=device)
    for batch in parts:
        batch = {k: v.to(device) for k, v in batch.items()} if device is not None else batch
        if head is None:
            logits, labels = supervised_logits(model, batch, keep_supervised)
            part, _ = sft_loss(loss, logits, labels, digit_ids, **params)
        else:
            inputs = {k: v for k, v in batch.items() if k != "bins"}
            part, _ = rvtc_loss(head_logits(model, head, **inputs), batch["bins"])
        total = total + part
    return total


def run_sft_stage(ctx: StageContext, stage: SFTStage, start_step: int = 0, resume_dir: str | None = None):
    """Train `stage.steps` optimizer steps; returns the engine (its module carries on to the next stage)."""
    head = None
    if stage.loss == "rvtc":
        # Before the engine: the head's parameters join the optimizer and the checkpoint.
        head = attach_rvtc_head(ctx.model, stage.rvtc_bins, ctx.dataset.label_min, ctx.dataset.label_max)
    watch = ctx.stopwatch
    with watch("deepspeed_init"):
        engine = build_engine(ctx.model, stage, ctx.cfg)
    if resume_dir is not None:
        with watch("checkpoint_load"):
            engine.load_checkpoint(resume_dir, tag="ckpt", load_module_strict=True)
    keep_supervised = accepts_logits_to_keep(engine)
    enable_last_layer_from(engine)  # prompt positions then skip the last layer's queries and MLP too
    with watch("data"):
        train = ctx.dataset.load("train")
        if head is None:
            examples = encode_split(ctx.tokenizer, train, ctx.prompt_text)
        else:
            examples = encode_rvtc_split(ctx.tokenizer, train, head.centres(), ctx.prompt_text)
        images = ctx.image_column(train)
    params = loss_params(stage)
    digit_ids = ctx.digit_token_ids.to(ctx.device)
    seed = ctx.cfg.seed + 1000 * ctx.stage_index
    every_ckpt = ctx.cfg.checkpoint.every_steps
    engine.train()
    step_timings: dict[str, float] = {}  # per logging window
    step_watch = Stopwatch(step_timings)

    def micro_batch(step: int, k: int) -> list[dict[str, torch.Tensor]]:
        """This worker's k-th micro-batch of the step, as `length_groups` padded sub-batches."""
        idx = micro_batch_indices(
            len(examples), seed, step, k, stage.grad_accum, ctx.rank, ctx.world_size, stage.micro_batch_size
        )
        collate = collate_sft if head is None else collate_rvtc
        parts = []
        for group in length_groups([len(examples[i][0]) for i in idx], stage.length_groups):
            rows = idx[group]
            batch = collate([examples[i] for i in rows], ctx.tokenizer.pad_token_id)
            pixels = ctx.image_batch(images, rows)
            if pixels is not None:
                batch.update(pixels.inputs_for(batch["input_ids"]))
            parts.append(batch)
        return parts

    # The loss is a mean over the whole global batch, not per micro-batch. Its normaliser, the step's
    # supervised-token count over ALL workers (one target per sample for rvtc), follows from the sample
    # order, which every worker knows: no collective is needed before backward.
    counts = supervised_counts(examples) if head is None else np.ones(len(examples), dtype=np.int64)
    window = {"loss_sums": [], "tokens": [], "time": 0.0}
    for step in range(start_step, stage.steps):
        t0 = time.perf_counter()
        batches = [micro_batch(step, k) for k in range(stage.grad_accum)]
        everyone = step_indices(len(examples), seed, step, stage.grad_accum, ctx.world_size, stage.micro_batch_size)
        global_tokens = float(counts[everyone].sum())
        # DeepSpeed averages gradients over workers and accumulation steps; undo that scaling.
        scale = ctx.world_size * stage.grad_accum / max(global_tokens, 1.0)
        step_loss = 0.0
        for parts in batches:
            loss_sum = micro_batch_loss(engine, parts, stage.loss, params, digit_ids, head, keep_supervised, ctx.device)
            engine.backward(loss_sum * scale)
            optimizer_step(engine)
            step_loss += float(loss_sum.detach())
        window["loss_sums"].append(step_loss)
        window["tokens"].append(global_tokens)

        done = step + 1
        log_now = done % ctx.cfg.tracking.log_every == 0 or done == stage.steps
        if log_now:
            # One collective per logging window, not per step: every worker's loss sum of every step.
            with step_watch("collectives"):
                global_losses = all_reduce_sum(window["loss_sums"], ctx.device)
        took = time.perf_counter() - t0
        window["time"] += took
        watch.add("train", took)

        if log_now:
            steps = len(window["tokens"])
            samples = steps * stage.micro_batch_size * stage.grad_accum * ctx.world_size
            metrics = {
                "train/loss": sum(g / max(t, 1.0) for g, t in zip(global_losses, window["tokens"])) / steps,
                "train/lr": engine.get_lr()[0],
                "train/tokens_per_s": sum(window["tokens"]) / window["time"],
                "train/samples_per_s": samples / window["time"],
                "train/stage": float(ctx.stage_index),
                "time/step_s": window["time"] / steps,
                **{f"time/{k}_s": v / steps for k, v in step_timings.items()},
            }
            ctx.log(metrics, ctx.global_step_offset + done)
            window = {"loss_sums": [], "tokens": [], "time": 0.0}
            step_timings.clear()
        if done % every_ckpt == 0 or done == stage.steps:
            with watch("checkpoint"):
                ctx.checkpoint(engine, done, {"train/step": float(ctx.global_step_offset + done)})
    return engine
