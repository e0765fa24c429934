"""Bench results as Markdown (against TRL, scaling, grid overhead), the files they are written to, and the
README's Performance section between its bench markers, generated from those files."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from orchestrator.bench.arithmetic import GRPO_PHASES, mean_step_s, ratio, round_ratios
from orchestrator.bench.settings import TRL_VERSION, BenchError

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
# The README's Performance section, in this order, from whichever of these results exist.
README_PARTS = (
    ("quick.md", "Against TRL, quick mode (`orchestrator bench --quick`)"),
    ("full.md", "Against TRL, full mode (`orchestrator bench --full`)"),
    ("scaling-full.md",
     "1 worker against 2 at the same global batch, SmolLM2-135M (`orchestrator bench --scaling --full`)"),
    ("scaling-quick.md",
     "1 worker against 2 at the same global batch, tiny model (`orchestrator bench --scaling --quick`)"),
    ("gpu-smollm2-135m.md", "GPU: against TRL on one GPU, SmolLM2-135M shape (`orchestrator bench --gpu`)"),
    ("gpu-qwen2.5-0.5b.md", "GPU: against TRL on one GPU, Qwen2.5-0.5B shape (`orchestrator bench --gpu`)"),
)
WORKS = (("sft", "SFT"), ("grpo", "GRPO"))


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _num(v: Any, digits: int = 1) -> str:
    return "—" if _missing(v) else f"{v:,.{digits}f}"


def _percent(a: float | None, b: float | None) -> str:
    """a as a percentage of b, two decimals."""
    return _num(100 * ratio(a, b), 2)


def _si(v: float | None) -> str:
    if _missing(v):
        return "—"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.2f} "


# --------------------------------------------------------------------------- against TRL


def _header(result: dict[str, Any]) -> str:
    s = result["settings"]
    if s.get("device") == "cuda":
        return (
            f"Measured by `orchestrator bench --gpu` on {result['when']} ({result['machine']}); project: "
            f"{s['workers']} Ray Train worker × {s['cpus_per_worker']:g} CPU + 1 GPU, DeepSpeed "
            f"ZeRO-{result.get('zero_stage', 2)}, {s['precision']}; TRL {result.get('trl_version', TRL_VERSION)}: "
            f"one process on the same GPU, bf16 autocast. Model: {result['model']}. Ratio = project / TRL "
            "(above 1: the project is faster)."
        )
    return (
        f"Measured by `orchestrator bench --{result['mode']}` on {result['when']} ({result['machine']}); "
        f"project: {s['workers']} Ray Train worker(s) × {s['cpus_per_worker']:g} CPU, "
        f"DeepSpeed ZeRO-{result.get('zero_stage', 2)}; "
        f"TRL {result.get('trl_version', TRL_VERSION)}: one process, torch threads = {s['threads']}. "
        f"Model: {result['model']}. Ratio = project / TRL (above 1: the project is faster)."
    )


def _throughput_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| work | project samples/s | TRL samples/s | ratio | project tokens/s | TRL tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in WORKS:
        row = result.get(key)
        if not row:
            continue
        p, t = row["project"], row["trl"]
        lines.append(
            f"| {label} ({row['describe']}) | {_num(p.get('samples_per_s'))} | {_num(t.get('samples_per_s'))} | "
            f"{_num(ratio(p.get('samples_per_s'), t.get('samples_per_s')), 2)} | {_num(p.get('tokens_per_s'), 0)} | "
            f"{_num(t.get('tokens_per_s'), 0)} |"
        )
    return lines


def _best_windows(result: dict[str, Any]) -> list[str]:
    """The best-window sentence, where both sides report a best window."""
    best = []
    for key, label in WORKS:
        row = result.get(key)
        if row and row["project"].get("best_window_samples_per_s") and row["trl"].get("best_window_samples_per_s"):
            p, t = row["project"]["best_window_samples_per_s"], row["trl"]["best_window_samples_per_s"]
            best.append(f"{label} {_num(p)} vs {_num(t)} (ratio {_num(ratio(p, t), 2)})")
    if not best:
        return []
    return ["Best window of timed steps (the least contended stretch, same window length on both sides), "
            "samples/s project vs TRL: " + "; ".join(best) + "."]


def _grpo_phase_table(grpo: dict[str, Any] | None) -> list[str]:
    """The project's GRPO step split into phases, the unnamed rest as `other`, and TRL's step beside it."""
    if not grpo or not grpo["project"].get("phases"):
        return []
    phases, step = grpo["project"]["phases"], grpo["project"].get("step_s")
    lines = ["", "Project GRPO step, per phase (mean seconds per optimizer step):", "",
             "| phase | s/step | share |", "|---|---:|---:|"]
    for name in GRPO_PHASES:
        if name in phases:
            share = _num(100 * ratio(phases[name], step), 1)
            lines.append(f"| {name.replace('_', ' ')} | {_num(phases[name], 4)} | {share}% |")
    if step:
        other = step - sum(phases.values())
        share = _num(100 * ratio(other, step), 1)
        lines.append(f"| other (batching, statistics, all-reduce) | {_num(other, 4)} | {share}% |")
        lines.append(f"| **step** | **{_num(step, 4)}** | 100% |")
    trl_step = grpo["trl"].get("step_s")
    if trl_step:
        lines.append(f"\nTRL GRPO step: {_num(trl_step, 4)} s.")
    return lines


def _compute_efficiency(flops: dict[str, Any] | None, threads: int) -> list[str]:
    """Achieved training FLOP/s of the SFT runs as a share of the machine's fp32 matmul peak."""
    if not flops:
        return []
    peak = flops["peak"]
    text = (
        f"Compute efficiency (project SFT): {_si(flops['achieved'])}FLOP/s achieved "
        f"(6 × {flops['params']:,} trainable parameters × {_num(flops['tokens_per_s'], 0)} processed tokens/s) "
        f"of a {_si(peak)}FLOP/s fp32 matmul peak ({flops['matmul_n']}² matmul, {threads} threads, best of "
        f"{flops['repeats']}): **{_percent(flops['achieved'], peak)}%**. "
        f"TRL SFT on the same count: {_percent(flops.get('trl_achieved'), peak)}%."
    )
    if flops.get("best_achieved"):
        text += (f" At the best windows' rates: project {_percent(flops['best_achieved'], peak)}%, "
                 f"TRL {_percent(flops.get('trl_best_achieved'), peak)}%.")
    return ["", text]


def _gpu_efficiency(gpu: dict[str, Any]) -> list[str]:
    """bench --gpu: SFT MFU of both sides against the bf16 peak, generation's share, the memory peaks."""
    memory = ", ".join(f"{name} {_num(v, 2)} GiB" for name, v in gpu["peak_memory_gib"].items())
    return ["", (
        f"SFT model-FLOP utilization, against the {_si(gpu['peak'])}FLOP/s {gpu.get('peak_dtype', 'bf16')} matmul "
        f"peak measured in this run ({gpu.get('matmul_n', 8192)}³ products): project "
        f"**{_percent(gpu['project_mfu'], 1)}%**, TRL {_percent(gpu['trl_mfu'], 1)}% "
        f"({_si(gpu['sft_flops'])}FLOPs in the timed steps: every matmul and causal attention at each real position "
        f"where the project executes it, backward twice the forward; sequences of {_num(gpu['sft_mean_length'], 0)} "
        f"tokens on average). GRPO: generation is {_percent(gpu['generation_share'], 1)}% of the project's step; "
        f"TRL's step takes {_num(gpu['grpo_step_ratio'], 2)}× the project's. Peak GPU memory: {memory}."
    )]


def render_markdown(result: dict[str, Any]) -> str:
    """The bench result as Markdown: throughput rows, the project's GRPO phase split, the FLOP/s line (bench
    --gpu: MFU, generation's share, memory)."""
    gpu = result.get("gpu")
    efficiency = _gpu_efficiency(gpu) if gpu else _compute_efficiency(result.get("flops"),
                                                                       result["settings"]["threads"])
    lines = [
        _header(result),
        "",
        *_throughput_table(result),
        "",
        "SFT tokens are supervised (answer) tokens; GRPO tokens are generated completion tokens.",
        *_best_windows(result),
        *_grpo_phase_table(result.get("grpo")),
        *efficiency,
        *(f"\n{note}" for note in result.get("notes", [])),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- scaling


def _round_suffix(run: dict[str, Any], rounds: int) -> str:
    return f", round {run['round']}" if rounds > 1 else ""


def _scaling_header(result: dict[str, Any], rounds: int, many: int) -> str:
    rows = result["runs"]
    text = (
        f"Measured by `orchestrator bench --scaling --{result['mode']}"
        f"{f' --rounds {rounds}' if rounds > 1 else ''}` on {result['when']} ({result['machine']}); "
        f"model: {result['model']}. Same global batch on every row (SFT {result['sft_global']} samples, GRPO "
        f"{result['grpo_global']} prompts × {result['grpo_group']} samples per optimizer step); the project only "
        f"(Ray Train + DeepSpeed). Ratio = step time with {many} workers / with 1 (at most 1: the "
        f"second worker does not slow a step)"
    )
    if rounds > 1:
        order = ", ".join(str(r["workers"]) for r in rows)
        return text + f"; {rounds} rounds, in the order {order} workers, and the ratio of the mean step times."
    return text + "."


def _scaling_table(result: dict[str, Any], rounds: int, many: int) -> list[str]:
    """One row per run, then the ratio of the mean step times."""
    rows = result["runs"]
    lines = [
        "| workers × CPUs, ZeRO stage | SFT s/step | SFT samples/s | GRPO s/step | GRPO samples/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        zero = r.get("zero_stage", result.get("zero_stage"))
        label = f"{r['workers']} × {r['cpus_per_worker']:g}, ZeRO-{zero}" + _round_suffix(r, rounds)
        lines.append(f"| {label} | {_num(r['sft_step_s'], 3)} | {_num(r['sft_samples_per_s'])} "
                     f"| {_num(r['grpo_step_s'], 3)} | {_num(r['grpo_samples_per_s'])} |")
    sft_ratio = ratio(mean_step_s(rows, many, "sft_step_s"), mean_step_s(rows, 1, "sft_step_s"))
    grpo_ratio = ratio(mean_step_s(rows, many, "grpo_step_s"), mean_step_s(rows, 1, "grpo_step_s"))
    lines.append(f"| **ratio {many}/1** | **{_num(sft_ratio, 2)}** | | **{_num(grpo_ratio, 2)}** | |")
    if rounds > 1:
        sft, grpo = (", ".join(_num(v, 2) for v in round_ratios(rows, many, key))
                     for key in ("sft_step_s", "grpo_step_s"))
        lines += ["", f"Ratio in each round: SFT {sft}; GRPO {grpo}."]
    return lines


def _scaling_phase_table(rows: list[dict[str, Any]], rounds: int) -> list[str]:
    """GRPO phases per run, for the phases every run logged."""
    phases = [ph for ph in GRPO_PHASES if all(ph in r["grpo_phases"] for r in rows)]
    if not phases:
        return []
    lines = ["", "GRPO step, per phase (s/step):", "",
             "| workers | " + " | ".join(ph.replace("_", " ") for ph in phases) + " |",
             "|---|" + "---:|" * len(phases)]
    for r in rows:
        name = f"{r['workers']}" + _round_suffix(r, rounds)
        lines.append(f"| {name} | " + " | ".join(_num(r["grpo_phases"][ph], 4) for ph in phases) + " |")
    return lines


def render_scaling(result: dict[str, Any]) -> str:
    """Markdown: step time of the same global batch on 1 worker (all CPUs) and on N single-CPU workers,
    one row per run; the ratio is of the mean step times over the rounds."""
    rows = result["runs"]
    many = max(r["workers"] for r in rows)
    rounds = max(r.get("round", 1) for r in rows)
    lines = [
        _scaling_header(result, rounds, many),
        "",
        *_scaling_table(result, rounds, many),
        *_scaling_phase_table(rows, rounds),
    ]
    if result.get("notes"):
        lines += [""] + result["notes"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- grid overhead


def render_grid(name: str, g: dict[str, Any]) -> str:
    """A sweep's wall time against its compute, and the overhead split by phase (from `grid_overhead`)."""
    lines = [
        f"## Grid overhead: sweep {name!r}",
        "",
        f"- cells: {g['cells']}; sweep wall time {_num(g['wall_s'], 1)} s; in-worker compute "
        f"(time/train_s + time/eval_s) summed over cells {_num(g['compute_s'], 1)} s",
        f"- wall / compute: **{_num(g['wall_over_compute'], 2)}**",
    ]
    if g.get("totals"):
        lines.append("- summed over cells: "
                     + ", ".join(f"time/{k}_s {_num(v, 1)} s" for k, v in sorted(g["totals"].items())))
    if g["phases"]:
        lines += ["", "| overhead phase | s (all cells) | share of overhead |", "|---|---:|---:|"]
        for phase, seconds in g["phases"].items():
            lines.append(f"| {phase} | {_num(seconds, 2)} | {_num(100 * g['shares'][phase], 1)}% |")
        lines.append(f"| **total** | **{_num(g['overhead_s'], 2)}** | 100% |")
    else:
        lines.append("- no run-level time/<phase>_s metrics in these cells: the overhead cannot be split")
    if g["missing"]:
        which = sorted({p for v in g["missing"].values() for p in v})
        lines += ["", (
            f"- missing in {len(g['missing'])} of {g['cells']} cells: "
            + ", ".join(f"time/{p}_s" for p in which)
            + " (logged by runtime.driver.log_run_timings); the compute sum covers what was logged"
        )]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files and the README


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
    (out_dir / f"{kind}{result['mode']}.json").write_text(json.dumps(result, indent=2, default=str))
    return out_dir / f"{kind}{result['mode']}.md", text


def replace_readme_section(text: str, body: str) -> str:
    """`text` with everything between the bench markers replaced by `body`; the rest kept byte for byte."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < 0:
        raise BenchError(f"README has no {README_START} ... {README_END} markers; add them where the section goes")
    if end < start or text.count(README_START) != 1 or text.count(README_END) != 1:
        raise BenchError("README must hold exactly one bench:start marker followed by one bench:end marker")
    head = text[: start + len(README_START)]
    return head + "\n" + body.strip("\n") + "\n" + text[end:]


def readme_body(out_dir: Path) -> str:
    """The Performance section: each result in `README_PARTS` that `out_dir` holds, under its title."""
    parts = [(out_dir / name, title) for name, title in README_PARTS if (out_dir / name).is_file()]
    if not parts:
        raise BenchError(f"no bench result in {out_dir}; run `orchestrator bench --quick` first")
    return "\n".join(f"#### {title}\n\n{path.read_text()}" for path, title in parts)


def write_readme(readme: Path, out_dir: Path) -> None:
    readme.write_text(replace_readme_section(readme.read_text(), readme_body(out_dir)))
