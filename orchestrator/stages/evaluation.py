"""Evaluation inside the training workers: each worker generates greedily for its shard of the split,
rank 0 gathers the completions, parses them and computes the DIR metrics (METHODS §1–2).

A model with an rvtc head answers through the head instead (expected bin centre; nothing to parse, so
parse_fail_rate is 0), and its `completion` column holds the prediction in the answer format."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from orchestrator.data.collate import chat_prompt_ids, collate_prompts
from orchestrator.engine.collectives import all_gather_objects
from orchestrator.engine.deepspeed import full_parameters, training_dtype
from orchestrator.methods.answers import format_answer, resolve_parse_failures
from orchestrator.methods.metrics import collapsed, dir_metrics, evaluate_texts
from orchestrator.modeling.generation import decode_completions, generate
from orchestrator.stages.context import StageContext
from orchestrator.tracking.conventions import COLLAPSE_REASON_TAG, COLLAPSED_TAG, PREDICTIONS_LABEL_STEP


def eval_rows(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Which rows to evaluate: all, or a seeded subset when capped (same on every worker). The caller passes
    the data seed: every run of a sweep then scores the same items (METHODS §6)."""
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_samples])


def generate_split(ctx: StageContext, model, table: pa.Table) -> list[str]:
    """Completions for every row of `table`, in row order, on every worker's shard; rank 0 gets all."""
    ec = ctx.cfg.eval
    prompts = table.column("prompt").to_pylist()
    images = ctx.image_column(table)
    mine = list(range(ctx.rank, len(prompts), ctx.world_size))
    texts: dict[int, str] = {}
    for start in range(0, len(mine), ec.batch_size):
        rows = mine[start : start + ec.batch_size]
        ids = [chat_prompt_ids(ctx.tokenizer, ctx.prompt_text(prompts[i])) for i in rows]
        out = generate(
            model, ctx.tokenizer, ids, max_new_tokens=ec.max_new_tokens, device=ctx.device,
            images=ctx.image_batch(images, rows),
        )
        texts.update(zip(rows, decode_completions(ctx.tokenizer, out)))
    merged: dict[int, str] = {}
    for part in all_gather_objects(texts):
        merged.update(part)
    return [merged[i] for i in range(len(prompts))]


@torch.no_grad()
def predict_split(ctx: StageContext, model, head, table: pa.Table) -> list[float]:
    """rvtc predictions (Σ p_k · centre_k) for every row of `table`, in row order; rank 0 gets all."""
    from orchestrator.methods.rvtc import expected_values, head_logits

    prompts = table.column("prompt").to_pylist()
    images = ctx.image_column(table)
    centres = head.centres()
    mine = list(range(ctx.rank, len(prompts), ctx.world_size))
    preds: dict[int, float] = {}
    was_training = model.training
    model.eval()
    for start in range(0, len(mine), ctx.cfg.eval.batch_size):
        rows = mine[start : start + ctx.cfg.eval.batch_size]
        ids = [chat_prompt_ids(ctx.tokenizer, ctx.prompt_text(prompts[i])) for i in rows]
        batch = {k: v.to(ctx.device) for k, v in collate_prompts(ids, ctx.tokenizer.pad_token_id, side="right").items()}
        pixels = ctx.image_batch(images, rows)
        extra = pixels.inputs_for(batch["input_ids"]) if pixels is not None else {}
        values = expected_values(head_logits(model, head, **batch, **extra), centres)
        preds.update(zip(rows, values.tolist()))
    if was_training:
        model.train()
    merged: dict[int, float] = {}
    for part in all_gather_objects(preds):
        merged.update(part)
    return [merged[i] for i in range(len(prompts))]


def in_training_precision(ctx: StageContext, engine_or_model):
    """What to evaluate: a trained cell's engine as it is (its parameters in the dtype DeepSpeed trained them
    in), an untrained (zero-shot) cell's loaded model with its parameters cast to that same dtype, so every
    cell of a sweep is evaluated at one precision. Buffers stay fp32, as DeepSpeed keeps them."""
    if hasattr(engine_or_model, "zero_optimization_stage"):  # a DeepSpeed engine
        return engine_or_model
    dtype = training_dtype(ctx.cfg)
    for param in engine_or_model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return engine_or_model


def evaluate_model(ctx: StageContext, engine_or_model) -> tuple[dict[str, float], dict[str, pa.Table]]:
    """Metrics named `{split}/{region}/{metric}` and a predictions table per split (rank 0 only)."""
    engine_or_model = in_training_precision(ctx, engine_or_model)
    ds = ctx.dataset
    metrics: dict[str, float] = {}
    predictions: dict[str, pa.Table] = {}
    train_targets = ds.train_targets()
    from orchestrator.methods.rvtc import find_rvtc_head

    with full_parameters(engine_or_model) as model:
        head = find_rvtc_head(model)
        for split in ctx.cfg.eval.splits:
            table = ds.load(split)
            table = table.take(eval_rows(table.num_rows, ctx.cfg.eval.max_samples, ctx.cfg.data.seed))
            if head is not None:
                values = predict_split(ctx, model, head, table)
                if ctx.rank == 0:
                    metrics.update(head_metrics(ctx, split, values, table, train_targets))
                    answers = [format_answer(v, decimals=4) for v in values]
                    predictions[split] = prediction_table(table, answers, values, values, ds.label_step)
                continue
            texts = generate_split(ctx, model, table)
            if ctx.rank != 0:
                continue
            targets = np.asarray(table.column("target").to_pylist(), dtype=np.float64)
            split_metrics, parsed = evaluate_texts(
                texts,
                targets,
                train_targets,
                label_step=ds.label_step,
                many=ds.many,
                few=ds.few,
                policy=ctx.cfg.eval.parse_failure,
                label_min=ds.label_min,
                label_max=ds.label_max,
                seed=ctx.cfg.seed,
            )
            metrics.update({f"{split}/{k}": v for k, v in split_metrics.items()})
            # The values the metrics scored (the parse-failure policy applied, NaN where it excluded one): the
            # tables' bootstrap recomputes the metrics from these.
            scored, kept = resolve_parse_failures(parsed, targets, ctx.cfg.eval.parse_failure, ds.label_min,
                                                  ds.label_max, ctx.cfg.seed)
            scored[~kept] = np.nan
            predictions[split] = prediction_table(table, texts, parsed, scored.tolist(), ds.label_step)
    return metrics, predictions


def head_metrics(ctx: StageContext, split: str, values: list[float], table: pa.Table, train_targets) -> dict:
    """The same DIR metrics for head predictions; every prediction is a number, so none fails to parse."""
    ds = ctx.dataset
    targets = np.asarray(table.column("target").to_pylist(), dtype=np.float64)
    preds = np.asarray(values, dtype=np.float64)
    out = dir_metrics(preds, targets, train_targets, label_step=ds.label_step, many=ds.many, few=ds.few)
    out["all/parse_fail_rate"] = 0.0
    return {f"{split}/{k}": v for k, v in out.items()}


def prediction_table(table: pa.Table, texts: list[str], values: list, scored: list, label_step: float) -> pa.Table:
    """Per evaluated item: the completion, the parsed number (`prediction`, null on a parse failure) and the
    value the metrics scored (`scored`); the label step (GM's error floor) in the schema's metadata."""
    columns = {
        "id": table.column("id"),
        "target": table.column("target"),
        "region": table.column("region"),
        "completion": pa.array(texts, pa.string()),
        "prediction": pa.array(values, pa.float64()),
        "scored": pa.array(scored, pa.float64()),
    }
    return pa.table(columns).replace_schema_metadata({PREDICTIONS_LABEL_STEP: repr(float(label_step))})


def collapse_tags(predictions: dict[str, pa.Table]) -> dict[str, str]:
    """The run's collapse tags from its test predictions, by the rule the tables mark cells with (METHODS §6:
    fewer than 3 distinct scored values, or their std below 5% of the labels'): collapsed "true" with the
    reason, or "false"; none without a test split."""

    table = predictions.get("test")
    if table is None:
        return {}
    scored = np.asarray(table.column("scored").to_pylist(), dtype=np.float64)
    reason = collapsed(scored, np.asarray(table.column("target").to_pylist(), dtype=np.float64))
    return {COLLAPSED_TAG: "false"} if reason is None else {COLLAPSED_TAG: "true", COLLAPSE_REASON_TAG: reason}
