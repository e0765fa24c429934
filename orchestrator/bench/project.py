"""The project side: the real SFT and GRPO stages through `run_training` (Ray Train, DeepSpeed), their
throughput read back from the metrics the stages log. The first log window is the warm-up: not timed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from orchestrator.bench.arithmetic import GRPO_PHASES, STEP_METRICS, windows_to_totals
from orchestrator.bench.settings import BenchSettings
from orchestrator.bench.workload import project_config


def _metric_history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _discard_run_storage(cfg) -> None:
    from orchestrator.config import resolve_storage

    shutil.rmtree(Path(resolve_storage(cfg.storage_path)) / cfg.name, ignore_errors=True)


def _train(settings: BenchSettings, kind: str, name: str, experiment: str):
    """(config, outcome, tracking client) of one project run of the bench's `kind` stage."""
    from orchestrator.runtime.driver import run_training
    from orchestrator.tracking.conventions import tracking_client

    cfg = project_config(settings, kind, name, experiment)
    outcome = run_training(cfg)
    return cfg, outcome, tracking_client(outcome.tracking_uri)


def project_sft(settings: BenchSettings, name: str, experiment: str) -> dict[str, Any]:
    """Rates of the project's SFT stage over its timed log windows (train/samples_per_s, train/tokens_per_s)."""
    from orchestrator.tracking.conventions import stage_tag

    cfg, outcome, client = _train(settings, "sft", name, experiment)
    sps = _metric_history(client, outcome.run_id, "train/samples_per_s")
    tps = _metric_history(client, outcome.run_id, "train/tokens_per_s")
    if len(sps) < 2:
        raise RuntimeError(f"project SFT run {outcome.run_id} logged {len(sps)} throughput windows; need 2 or more")
    per_window = settings.sft_warmup * settings.sft_micro_batch * settings.workers
    samples, tokens, seconds = windows_to_totals(list(zip(sps, tps))[1:], per_window)
    _discard_run_storage(cfg)
    run = client.get_run(outcome.run_id)
    timings = {k: v for k, v in run.data.metrics.items() if k.startswith("time/")}
    return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds,
            "best_window_samples_per_s": max(sps[1:]), "supervised_tokens": tokens, "run_id": outcome.run_id,
            "run_timings": timings, "grad_average": run.data.tags.get(stage_tag(0, "grad_average")),
            **_device_memory(run)}


def _device_memory(run) -> dict[str, float]:
    """The GPU memory peak the run's rank 0 logged (runtime/worker.py), in GiB; nothing on CPU."""
    peak = run.data.metrics.get("gpu/peak_allocated_gib")
    return {} if peak is None else {"peak_memory_gib": peak}


def _timed_mean(client, run_id: str, key: str) -> float | None:
    """The mean of a metric's timed windows; None when it logged none."""
    values = _metric_history(client, run_id, key)[1:]
    return sum(values) / len(values) if values else None


def project_grpo(settings: BenchSettings, name: str, experiment: str) -> dict[str, Any]:
    """Rates of the project's GRPO stage from its per-step time/* metrics (window means), and its phase split."""
    cfg, outcome, client = _train(settings, "grpo", name, experiment)
    step = _metric_history(client, outcome.run_id, "time/step_s")[1:]
    if not step:
        raise RuntimeError(f"project GRPO run {outcome.run_id} logged no timed windows")
    mean_step = sum(step) / len(step)  # equal windows: the mean of window means
    phase_means = {phase: _timed_mean(client, outcome.run_id, f"time/{phase}_s") for phase in GRPO_PHASES}
    phases = {phase: mean for phase, mean in phase_means.items() if mean is not None}
    length = _timed_mean(client, outcome.run_id, "train/completion_length")
    length = float("nan") if length is None else length
    samples = settings.grpo_prompts * settings.grpo_group * settings.workers
    _discard_run_storage(cfg)
    run = client.get_run(outcome.run_id)
    timings = {k: v for k, v in run.data.metrics.items() if k.startswith("time/") and k not in STEP_METRICS}
    return {"samples_per_s": samples / mean_step, "tokens_per_s": samples * length / mean_step, "step_s": mean_step,
            "best_window_samples_per_s": samples / min(step),
            "phases": phases, "completion_length": length, "run_id": outcome.run_id, "run_timings": timings,
            **_device_memory(run)}
