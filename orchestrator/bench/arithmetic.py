"""The bench's pure arithmetic: ratios, rates over timed steps, FLOP/s, the scaling run order and means,
and where a sweep's wall time went (grid overhead). No I/O; tested against hand-computed values."""

from __future__ import annotations

import math
from typing import Any

from orchestrator.bench.settings import BenchError

GRPO_PHASES = ("generation", "reward", "logprobs", "forward_backward", "optimizer")
# Metrics the stages log per optimizer step (window means); not run-level phases.
STEP_METRICS = {f"time/{p}_s" for p in (*GRPO_PHASES, "step", "collectives")}
COMPUTE_PHASES = ("train", "eval")
# Run-level totals that contain other phases: reported, never added into the overhead split.
TOTAL_PHASES = ("driver_total", "driver_fit", "worker_total")
UNSPLIT_FIT = "driver_fit, not split (no worker timings)"
UNNAMED = "unnamed (inside cells)"


def ratio(a: float | None, b: float | None) -> float:
    """a / b; nan when either is missing or b is 0."""
    if a is None or b is None or not b or any(isinstance(x, float) and math.isnan(x) for x in (a, b)):
        return float("nan")
    return a / b


def windows_to_totals(windows: list[tuple[float, float]], samples_per_window: float) -> tuple[float, float, float]:
    """Per-window (samples/s, tokens/s) rates of windows holding `samples_per_window` samples each
    -> (samples, tokens, seconds) summed over the windows: time_i = samples / rate_i."""
    samples = tokens = seconds = 0.0
    for sps, tps in windows:
        t = samples_per_window / sps
        samples += samples_per_window
        tokens += tps * t
        seconds += t
    return samples, tokens, seconds


def step_rates(step_times: list[float], samples_per_step: float, tokens_per_step: list[float] | None,
               warmup: int) -> dict[str, float]:
    """Rates over the timed steps (the first `warmup` dropped): samples/s, tokens/s, mean step seconds."""
    times = step_times[warmup:]
    if not times:
        raise BenchError(f"no timed steps: {len(step_times)} steps, {warmup} warm-up")
    seconds = sum(times)
    out = {"samples_per_s": samples_per_step * len(times) / seconds, "step_s": seconds / len(times),
           "steps": float(len(times))}
    if tokens_per_step is not None:
        out["tokens_per_s"] = sum(tokens_per_step[warmup : len(step_times)]) / seconds
    return out


def best_window_rate(step_times: list[float], samples_per_step: float, window: int, warmup: int) -> float:
    """The highest samples/s over consecutive windows of `window` timed steps (warm-up dropped, a partial
    last window ignored): on a shared machine the least contended stretch, the same estimator on both sides."""
    times = step_times[warmup:]
    rates = [
        samples_per_step * window / sum(times[i : i + window])
        for i in range(0, len(times) - window + 1, window)
    ]
    return max(rates) if rates else float("nan")


def train_flops_per_s(trainable_params: int, tokens_per_s: float) -> float:
    """Training FLOP/s by the 6·N·tokens rule (forward 2N, backward 4N per token; attention left out)."""
    return 6.0 * trainable_params * tokens_per_s


def matmul_flops_per_s(n: int, seconds: float) -> float:
    """An n×n by n×n matmul is 2n³ FLOPs."""
    return 2.0 * n**3 / seconds


# --------------------------------------------------------------------------- FLOPs per executed position


def forward_flops(shape, length: int, kept_from: int) -> float:
    """Forward FLOPs of a decoder-only model (bench.shapes.Shape) on one row of `length` real tokens whose
    last decoder layer (but its keys and values) and LM head run only from position `kept_from` on, as the
    project's SFT runs them (modeling/last_layer.py, logits_to_keep): every matmul at the positions where it
    executes, and causal attention (each query against the keys up to it). Padding is not counted."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    kept = max(0, length - kept_from)
    keys_values = 2 * shape.hidden * 2 * kv
    queries_out_mlp = 2 * shape.hidden * 2 * q + 2 * 3 * shape.hidden * shape.intermediate
    attention_per_pair = 4 * q  # q·k and the weighted sum of v, per (query, key) pair
    full_pairs = length * (length + 1) // 2
    kept_pairs = full_pairs - kept_from * (kept_from + 1) // 2 if kept else 0
    full_layers = (shape.layers - 1) * (length * (keys_values + queries_out_mlp) + full_pairs * attention_per_pair)
    last_layer = length * keys_values + kept * queries_out_mlp + kept_pairs * attention_per_pair
    return float(full_layers + last_layer + kept * 2 * shape.hidden * shape.vocab)


def training_flops(shape, rows: list[tuple[int, int]]) -> float:
    """Forward and backward FLOPs (backward: twice the forward's) of rows given as (length, kept_from)."""
    return 3.0 * sum(forward_flops(shape, length, kept_from) for length, kept_from in rows)


def utilization(flops: float, seconds: float, peak: float) -> float:
    """FLOPs done in `seconds` as a share of the peak FLOP/s (MFU: model FLOPs utilization)."""
    return ratio(flops / seconds, peak) if seconds else float("nan")


# --------------------------------------------------------------------------- scaling (1 worker against N)


def scaling_order(workers: int, rounds: int) -> list[int]:
    """Worker counts in run order: 1 then `workers`, the order reversed every other round (1, N, N, 1, 1,
    N...), so that a load drifting steadily through the bench weighs on both counts alike."""
    return [w for r in range(rounds) for w in ((1, workers) if r % 2 == 0 else (workers, 1))]


def mean_step_s(runs: list[dict[str, Any]], workers: int, key: str) -> float:
    """The mean of `key` over the runs on `workers` workers (every round)."""
    values = [r[key] for r in runs if r["workers"] == workers]
    return sum(values) / len(values)


def round_ratios(runs: list[dict[str, Any]], workers: int, key: str) -> list[float]:
    """`key` on `workers` workers over `key` on 1, round by round."""
    by_run = {(r.get("round", 1), r["workers"]): r[key] for r in runs}
    return [ratio(by_run[(k, workers)], by_run[(k, 1)]) for k in sorted({k for k, _ in by_run})]


# --------------------------------------------------------------------------- grid overhead


def run_phases(metrics: dict[str, float]) -> dict[str, float]:
    """A cell's run-level phases, {phase: seconds}, from its `time/<phase>_s` metrics (per-step metrics
    and missing values left out)."""
    return {
        k[len("time/") : -len("_s")]: float(v)
        for k, v in metrics.items()
        if k.startswith("time/") and k.endswith("_s") and k not in STEP_METRICS
        and v is not None and not math.isnan(float(v))
    }


def unaccounted_in_cell(phases: dict[str, float]) -> tuple[float | None, float]:
    """(the fit left unsplit, the rest) of what a cell's driver_total holds beyond its named phases. The fit
    stays one lump (None when split) where no worker-side timings reached the store."""
    rest = phases["driver_total"] - sum(v for k, v in phases.items() if k not in TOTAL_PHASES)
    if "worker_total" in phases or "driver_fit" not in phases:
        return None, rest
    fit = max(0.0, phases["driver_fit"] - phases.get("worker_start", 0.0) - phases.get("teardown", 0.0))
    return fit, rest - fit


def _add(into: dict[str, float], key: str, value: float) -> None:
    into[key] = into.get(key, 0.0) + value


def grid_overhead(wall_s: float, cells: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Sweep wall time against the cells' in-worker compute, and where the rest went.

    `cells` maps a cell name to its logged metrics; run-level phases are `time/<phase>_s` metrics
    (the GRPO stage's per-step time/* metrics are not). Compute is time/train_s + time/eval_s where
    logged; every other phase is overhead, summed over cells, with its share of the overhead total. The
    totals (driver_total, driver_fit, worker_total) hold other phases: summed apart, and what a cell's
    driver_total holds beyond its named phases is reported as `unnamed (inside cells)`."""
    compute, unnamed = 0.0, 0.0
    overheads: dict[str, float] = {}
    totals: dict[str, float] = {}
    missing: dict[str, list[str]] = {}
    for name, metrics in cells.items():
        phases = run_phases(metrics)
        absent = [p for p in COMPUTE_PHASES if p not in phases]
        if absent:
            missing[name] = absent
        for phase, value in phases.items():
            if phase in TOTAL_PHASES:
                _add(totals, phase, value)
            elif phase in COMPUTE_PHASES:
                compute += value
            else:
                _add(overheads, phase, value)
        if "driver_total" in phases:
            unsplit_fit, rest = unaccounted_in_cell(phases)
            if unsplit_fit is not None:
                _add(overheads, UNSPLIT_FIT, unsplit_fit)
            unnamed += max(0.0, rest)
    if unnamed > 0.01:
        overheads[UNNAMED] = unnamed
    overhead = sum(overheads.values())
    largest_first = sorted(overheads.items(), key=lambda kv: -kv[1])
    return {
        "wall_s": wall_s,
        "cells": len(cells),
        "compute_s": compute,
        "wall_over_compute": ratio(wall_s, compute),
        "overhead_s": overhead,
        "totals": totals,
        "phases": dict(largest_first),
        "shares": {k: ratio(v, overhead) for k, v in largest_first},
        "missing": missing,
    }
