"""The bench's two runs: `run_bench` (the same SFT and GRPO work by the project, then by TRL, with the
checks that they did the same work) and `run_scaling` (the project alone on 1 worker against N)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

from orchestrator.bench.arithmetic import ratio, scaling_order, train_flops_per_s
from orchestrator.bench.machine import better_peak, describe_gpu, describe_machine, device_peak, load_average
from orchestrator.bench.project import project_grpo, project_sft
from orchestrator.bench.settings import RAY_WORKER_NICENESS, TRL_VERSION, BenchError, BenchSettings, same_global_batch
from orchestrator.bench.trl_side import run_trl
from orchestrator.bench.workload import project_config, timed_sft_tokens

BENCH_EXPERIMENT = "bench"
WORKS = (("sft", "SFT"), ("grpo", "GRPO"))


def run_bench(settings: BenchSettings, out_dir: Path, log=print) -> dict[str, Any]:
    """The same SFT and GRPO work by the project, then by TRL, between two measurements of the matmul peak."""
    from orchestrator.modeling.models import resolve_source

    _run_at_normal_priority()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    configs = {kind: project_config(settings, kind, f"bench-{kind}-{stamp}", BENCH_EXPERIMENT) for kind, _ in WORKS}
    model_source = resolve_source(configs["sft"].model)
    expected_tokens = timed_sft_tokens(settings, configs["sft"], model_source)
    loads = {"start": load_average()}
    log(f"[bench] matmul peak ({settings.device})")
    peak_before = device_peak(settings.device, settings.threads)
    project = _project_side(settings, configs, loads, log)
    _stop_ray()
    trl = _trl_side(settings, configs, model_source, out_dir, loads, log)
    peak = better_peak(peak_before, device_peak(settings.device, settings.threads))
    result = _bench_result(settings, configs["sft"], project, trl, peak, loads, expected_tokens)
    if settings.shape is not None:
        result["gpu"] = _gpu_figures(settings, configs["sft"], model_source, project, trl, peak)
        result["notes"][-1] = _gpu_comparison_note(settings, project, trl, result["gpu"])
    return result


def _gpu_comparison_note(s: BenchSettings, project: dict[str, Any], trl: dict[str, Any], gpu: dict[str, Any]) -> str:
    """bench --gpu: what is identical on both sides, and every known difference between them."""
    return (
        f"Identical on both sides: the weights (random-init, {s.shape} shape), one {s.device} device, the tokenized "
        f"SFT batches in the same order ({s.few_shot}-shot prompts, {gpu['sft_mean_length']:.0f} tokens on average), "
        f"the GRPO prompts in the same order, torch's fused AdamW and the schedule. Not identical: the project "
        f"trains bf16 weights with DeepSpeed's fp32 master copy (ZeRO-{s.zero_stage}, fp32 gradient averaging), "
        f"TRL fp32 weights under bf16 autocast; GRPO completions are sampled (mean length: project "
        f"{project['grpo']['completion_length']:.1f}, TRL {trl['grpo']['completion_length']:.1f} tokens; no vLLM); "
        f"the project runs its SFT's last decoder layer and LM head only from the first supervised position, TRL at "
        f"every position, and the MFU of both sides counts the project's executed FLOPs (TRL's extra work is not "
        f"counted); the project runs each GRPO prompt once for its G samples, TRL once per sample; TRL's SFT step "
        f"also computes entropy and token accuracy for its logs; data collation is inside the project's timed step."
    )


def _gpu_figures(s: BenchSettings, sft_cfg, model_source: str, project: dict[str, Any], trl: dict[str, Any],
                 peak: dict[str, float]) -> dict[str, Any]:
    """bench --gpu: SFT model-FLOP utilization of both sides (the FLOPs the project executes at each real
    position of its timed batches, over each side's timed seconds, against the matmul peak measured in this
    run), the GPU memory peaks, the sequence lengths and the share of generation in the project's GRPO step."""
    from orchestrator.bench.arithmetic import training_flops, utilization
    from orchestrator.bench.shapes import Shape
    from orchestrator.bench.workload import timed_sft_rows

    rows = timed_sft_rows(s, sft_cfg, model_source)
    flops = training_flops(Shape.of(s.shape), rows)
    trl_seconds = sum(trl["sft"]["step_times"][s.sft_warmup :])
    grpo = project["grpo"]
    return {
        "shape": s.shape, "gpu": describe_gpu(), "sft_flops": flops, "peak": peak["peak"],
        "peak_dtype": peak.get("dtype", "fp32"), "matmul_n": peak["matmul_n"],
        "sft_mean_length": sum(length for length, _ in rows) / len(rows),
        "project_mfu": utilization(flops, project["sft"]["seconds"], peak["peak"]),
        "trl_mfu": utilization(flops, trl_seconds, peak["peak"]),
        "generation_share": ratio(grpo["phases"].get("generation"), grpo["step_s"]),
        "grpo_step_ratio": ratio(trl["grpo"].get("step_s"), grpo["step_s"]),
        "peak_memory_gib": {f"{side} {kind}": sides[kind].get("peak_memory_gib")
                            for side, sides in (("project", project), ("TRL", trl)) for kind in ("sft", "grpo")},
    }


def _run_at_normal_priority() -> None:
    """Ray starts its workers at niceness 15 by default; on a machine shared with other work that starves
    both sides. The bench runs the project's workers, and TRL, at normal priority (RAY_worker_niceness
    is Ray's own setting; an explicit value in the environment is kept and used for TRL as well)."""
    os.environ.setdefault("RAY_worker_niceness", "0")


def _project_side(s: BenchSettings, configs: dict[str, Any], loads: dict[str, float], log) -> dict[str, Any]:
    log(f"[bench] project SFT: {s.sft_steps} steps x {s.sft_micro_batch} samples x {s.workers} worker(s)")
    sft = project_sft(s, configs["sft"].name, BENCH_EXPERIMENT)
    loads["after project SFT"] = load_average()
    log(f"[bench] project GRPO: {s.grpo_steps} steps, B={s.grpo_prompts}, G={s.grpo_group}")
    grpo = project_grpo(s, configs["grpo"].name, BENCH_EXPERIMENT)
    loads["after project GRPO"] = load_average()
    return {"sft": sft, "grpo": grpo}


def _stop_ray() -> None:
    """Ray's idle daemons would otherwise share the CPUs with TRL."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _trl_side(s: BenchSettings, configs: dict[str, Any], model_source: str, out_dir: Path,
              loads: dict[str, float], log) -> dict[str, Any]:
    scratch = out_dir / "trl-output"
    common = {"model_source": model_source, "threads": s.threads, "settings": dataclasses.asdict(s),
              "out_dir": str(scratch)}
    results = {}
    for kind, label in WORKS:
        log(f"[bench] TRL {label} (subprocess)")
        results[kind] = run_trl(kind, {**common, "config": configs[kind].model_dump(mode="json")}, out_dir, s.threads)
        loads[f"after TRL {label}"] = load_average()
    shutil.rmtree(scratch, ignore_errors=True)
    return results


# --------------------------------------------------------------------------- the result of run_bench


def _bench_result(s: BenchSettings, sft_cfg, project: dict[str, Any], trl: dict[str, Any], peak: dict[str, float],
                  loads: dict[str, float], expected_tokens: tuple[int, int]) -> dict[str, Any]:
    import torch

    supervised, processed = expected_tokens
    p_sft, t_sft = project["sft"], trl["sft"]
    checks = [_load_note(loads), *_token_warnings(p_sft, t_sft, supervised)]
    p_sft["processed_tokens_per_s"] = processed / p_sft["seconds"]
    processed_per_sample = processed / ((s.sft_steps - s.sft_warmup) * s.sft_micro_batch * s.workers)
    params = int(t_sft["trainable_params"])
    return {
        "mode": s.mode,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": describe_machine() + (f", {describe_gpu()}" if s.device == "cuda" else ""),
        "model": _model_description(sft_cfg, params, s.shape),
        "trl_version": TRL_VERSION,
        "torch_version": torch.__version__,
        "zero_stage": sft_cfg.deepspeed.zero_stage,
        "settings": {**dataclasses.asdict(s), "threads": s.threads},
        "load_average": loads,
        "sft": {"describe": _describe_sft(s), "project": p_sft, "trl": t_sft},
        "grpo": {"describe": _describe_grpo(s), "project": project["grpo"], "trl": trl["grpo"]},
        "flops": _flops(peak, params, p_sft, t_sft, processed_per_sample),
        "notes": checks + [_comparison_note(s, project, trl, supervised)],
    }


def _describe_sft(s: BenchSettings) -> str:
    return (f"{s.sft_steps - s.sft_warmup} timed of {s.sft_steps} steps, batch {s.sft_micro_batch * s.workers}, "
            f"lr {s.sft_lr:g}")


def _describe_grpo(s: BenchSettings) -> str:
    return (f"B={s.grpo_prompts}, G={s.grpo_group}, {s.grpo_max_new_tokens} new tokens, β={s.grpo_beta:g}, "
            f"{s.grpo_steps - s.grpo_warmup} timed of {s.grpo_steps} steps")


def _model_description(cfg, params: int, shape: str | None = None) -> str:
    if shape is not None:
        return f"random-init {shape} shape ({params:,} parameters), `{cfg.data.name}` data"
    if cfg.model.source != "tiny":
        return f"{cfg.model.source} ({params:,} parameters), `{cfg.data.name}` data"
    tiny = cfg.model.tiny
    return (f"tiny random-init {tiny.architecture} ({tiny.hidden_size} hidden, {tiny.num_layers} layers, "
            f"{params:,} parameters), `{cfg.data.name}` data")


def _flops(peak: dict[str, float], params: int, p_sft: dict[str, Any], t_sft: dict[str, Any],
           processed_per_sample: float) -> dict[str, float]:
    """Training FLOP/s of both SFT runs by 6 × parameters × processed tokens, beside the matmul peak."""
    processed_per_s = p_sft["processed_tokens_per_s"]
    return {
        **peak, "params": params, "tokens_per_s": processed_per_s,
        "achieved": train_flops_per_s(params, processed_per_s),
        "trl_achieved": train_flops_per_s(params, t_sft["processed_tokens_per_s"]),
        # at the best window's rate (same tokens per sample as the timed steps on average)
        "best_achieved": train_flops_per_s(params, p_sft["best_window_samples_per_s"] * processed_per_sample),
        "trl_best_achieved": train_flops_per_s(params, t_sft["best_window_samples_per_s"] * processed_per_sample),
    }


def _load_note(loads: dict[str, float]) -> str:
    cpus = os.cpu_count() or 1
    load_text = ", ".join(f"{k} {v:.1f}" for k, v in loads.items())
    if max(loads.values()) > 1.5 * cpus:
        return (f"WARNING: the machine was busy with other work (1-minute load average: {load_text}; "
                f"{cpus} CPUs): these numbers are contended; the best-window ratios are the steadier figure. "
                "Rerun on a quiet machine.")
    return f"1-minute load average during the bench: {load_text} ({cpus} CPUs)."


def _token_warnings(p_sft: dict[str, Any], t_sft: dict[str, Any], expected_supervised: int) -> list[str]:
    """Warnings where either side's timed SFT steps held other supervised tokens than the project's batches."""
    warnings = []
    if abs(t_sft["supervised_tokens"] - expected_supervised) > 0.5:
        warnings.append(f"WARNING: TRL trained on {t_sft['supervised_tokens']:.0f} supervised tokens in the timed "
                        f"steps, the project's batches hold {expected_supervised}.")
    if abs(p_sft["supervised_tokens"] - expected_supervised) > 0.01 * expected_supervised:
        warnings.append(f"WARNING: the project's logged tokens ({p_sft['supervised_tokens']:.0f}) differ from the "
                        f"expected {expected_supervised} supervised tokens.")
    return warnings


def _comparison_note(s: BenchSettings, project: dict[str, Any], trl: dict[str, Any], supervised: int) -> str:
    """What is identical on both sides, and every known difference between them."""
    return (
        f"Identical on both sides: weights, tokenized SFT batches in the same order ({supervised:,} supervised "
        f"tokens in the timed steps, checked on both sides), GRPO prompts in the same order, optimizer and schedule. "
        f"Not identical: GRPO completions are sampled (mean length: project "
        f"{project['grpo']['completion_length']:.1f}, TRL {trl['grpo']['completion_length']:.1f} tokens); TRL's SFT "
        f"step also computes entropy and token accuracy "
        f"for its logs; data collation is inside the project's timed step and outside TRL's; the project's "
        f"AdamW is torch's fused kernel, TRL's (`adamw_torch`) the per-tensor loop (the same update); the "
        f"project runs each GRPO prompt once for its G samples (prefill and log-prob forwards), TRL once per "
        f"sample (the same log-probs); the project's SFT runs the last decoder layer's queries, attention and "
        f"MLP only from the first supervised position of a batch, TRL at every position (the same loss and "
        f"gradients; compute efficiency still counts 6 × parameters × processed tokens); "
        f"{grad_average_text(project['sft'], s.workers)}the project's workers run with malloc setting "
        f"{_worker_malloc()}, TRL with {os.environ.get('GLIBC_TUNABLES', 'glibc default')} (set GLIBC_TUNABLES "
        f"to give both sides the same). TRL runs at the "
        f"niceness of the project's Ray workers ({os.environ.get('RAY_worker_niceness', RAY_WORKER_NICENESS)})."
    )


def grad_average_text(project_sft: dict[str, Any], workers: int) -> str:
    """How the project's workers averaged their SFT gradients (the run's tag), against TRL's one process."""
    how = project_sft.get("grad_average")
    if workers < 2 or not how:
        return ""
    return f"the project's {workers} workers average their gradients ({how}), TRL's one process has none to average; "


def _worker_malloc() -> str:
    """The malloc setting init_ray gives the project's workers: the user's GLIBC_TUNABLES, else the project's."""
    from orchestrator.runtime.ray_setup import WORKER_MALLOC_TUNABLES

    return os.environ.get("GLIBC_TUNABLES", WORKER_MALLOC_TUNABLES)


# --------------------------------------------------------------------------- scaling


def run_scaling(settings: BenchSettings, log=print, rounds: int = 1) -> dict[str, Any]:
    """The project's SFT and GRPO steps at one global batch: 1 worker with every CPU, then
    `settings.workers` workers with one share each; `rounds` times, in `scaling_order`."""
    import torch

    if rounds < 1:
        raise BenchError(f"--rounds must be 1 or more, got {rounds}")
    _run_at_normal_priority()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    loads = {"start": load_average()}
    runs = []
    for k, workers in enumerate(scaling_order(settings.workers, rounds)):
        round_no = k // 2 + 1
        runs.append(_scaling_run(same_global_batch(settings, workers), round_no, rounds, stamp, log))
        loads[f"after round {round_no} {workers} worker(s)" if rounds > 1 else f"after {workers} worker(s)"] = (
            load_average())
    cfg = project_config(settings, "sft", "bench-scaling", BENCH_EXPERIMENT)
    model = cfg.model.source if cfg.model.source != "tiny" else f"tiny random-init {cfg.model.tiny.architecture}"
    load_text = ", ".join(f"{k} {v:.1f}" for k, v in loads.items())
    return {
        "mode": settings.mode, "when": time.strftime("%Y-%m-%d %H:%M"), "machine": describe_machine(),
        "model": f"{model}, `{cfg.data.name}` data", "torch_version": torch.__version__,
        "zero_stage": cfg.deepspeed.zero_stage, "sft_global": settings.sft_micro_batch * settings.workers,
        "grpo_global": settings.grpo_prompts * settings.workers, "grpo_group": settings.grpo_group, "runs": runs,
        "notes": [f"1-minute load average: {load_text} ({os.cpu_count()} CPUs)."],
    }


def _scaling_run(s: BenchSettings, round_no: int, rounds: int, stamp: str, log) -> dict[str, Any]:
    """One round's project SFT and GRPO runs on `s.workers` workers: step times and rates."""
    workers = s.workers
    log(f"[bench] project, round {round_no}/{rounds}, {workers} worker(s) x {s.cpus_per_worker:g} CPU: "
        f"SFT micro-batch {s.sft_micro_batch}, GRPO B={s.grpo_prompts}")
    sft = project_sft(s, f"bench-scaling-sft-{workers}w-r{round_no}-{stamp}", BENCH_EXPERIMENT)
    grpo = project_grpo(s, f"bench-scaling-grpo-{workers}w-r{round_no}-{stamp}", BENCH_EXPERIMENT)
    return {
        "round": round_no, "workers": workers, "cpus_per_worker": s.cpus_per_worker, "zero_stage": s.zero_stage,
        "sft_step_s": sft["seconds"] / (s.sft_steps - s.sft_warmup), "sft_samples_per_s": sft["samples_per_s"],
        "grpo_step_s": grpo["step_s"], "grpo_samples_per_s": grpo["samples_per_s"], "grpo_phases": grpo["phases"],
    }
