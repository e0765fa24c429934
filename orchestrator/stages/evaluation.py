"""Evaluation inside the training workers: each worker generates greedily for its shard of the split,
rank 0 gathers the completions, parses them and computes the DIR metrics (METHODS §1–2)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from orchestrator.data.collate import chat_prompt_ids
from orchestrator.evaluate import evaluate_texts
from orchestrator.generation import decode_completions, generate
from orchestrator.stages.common import StageContext, all_gather_objects, full_parameters


def eval_rows(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Which rows to evaluate: all, or a seeded subset when capped (same on every worker)."""
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_samples])


def generate_split(ctx: StageContext, model, table: pa.Table) -> list[str]:
    """Completions for every row of `table`, in row order, on every worker's shard; rank 0 gets all."""
    ec = ctx.cfg.eval
    prompts = table.column("prompt").to_pylist()
    mine = list(range(ctx.rank, len(prompts), ctx.world_size))
    texts: dict[int, str] = {}
    for start in range(0, len(mine), ec.batch_size):
        rows = mine[start : start + ec.batch_size]
        ids = [chat_prompt_ids(ctx.tokenizer, prompts[i]) for i in rows]
        out = generate(model, ctx.tokenizer, ids, max_new_tokens=ec.max_new_tokens, device=ctx.device)
        texts.update(zip(rows, decode_completions(ctx.tokenizer, out)))
    merged: dict[int, str] = {}
    for part in all_gather_objects(texts):
        merged.update(part)
    return [merged[i] for i in range(len(prompts))]


def evaluate_model(ctx: StageContext, engine_or_model) -> tuple[dict[str, float], dict[str, pa.Table]]:
    """Metrics named `{split}/{region}/{metric}` and a predictions table per split (rank 0 only)."""
    ds = ctx.dataset
    metrics: dict[str, float] = {}
    predictions: dict[str, pa.Table] = {}
    train_targets = ds.train_targets()
    with full_parameters(engine_or_model) as model:
        for split in ctx.cfg.eval.splits:
            table = ds.load(split)
            table = table.take(eval_rows(table.num_rows, ctx.cfg.eval.max_samples, ctx.cfg.seed))
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
            predictions[split] = pa.table(
                {
                    "id": table.column("id"),
                    "target": table.column("target"),
                    "region": table.column("region"),
                    "completion": pa.array(texts, pa.string()),
                    "prediction": pa.array(parsed, pa.float64()),
                }
            )
    return metrics, predictions
