"""The bench's fixed work per mode (`BenchSettings`), how it splits over workers, and the checks that
refuse bad input before any compute starts."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass

MODES = ("quick", "full")
TRL_VERSION = "1.16.0"
INSTALL_HINT = "install it with `make bench` (or `pip install -e '.[bench]'`)"
RAY_WORKER_NICENESS = 15  # Ray's default for worker processes (the raylet's worker_niceness)

# The project's DeepSpeed ZeRO stage on the CPU bench, whatever the number of workers: over gloo, ZeRO-1/2's
# partitioned gradient reduce and parameter all-gather cost more than ZeRO-0's one all-reduce, and 135M
# parameters need no partitioning. `--zero-stage` benches another stage.
BENCH_ZERO_STAGE = 0

# Project workers per mode when --workers is not given (at most the CPUs). The tiny model gains little from a
# second thread, so it runs faster as 2 single-threaded workers than as 1 worker with 2 threads.
# SmolLM2-135M's 2 threads in one worker already come close to the matmul peak, so a second worker hardly
# shortens its step, and one worker leaves the gradient average (540 MB of fp32 gradients) out of the
# comparison with TRL.
DEFAULT_WORKERS = {"quick": 2, "full": 1}


class BenchError(ValueError):
    """Bad input to the bench (unknown mode, TRL missing, no such sweep): one line, exit status 2."""


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
    device: str = "cpu"  # "cuda": one GPU per project worker, and TRL on that GPU (bench --gpu)
    precision: str = "fp32"  # deepspeed.precision on the project side; TRL's bf16 flag follows it
    shape: str | None = None  # bench --gpu: the random-init model shape (bench.shapes)
    sft_overrides: tuple[str, ...] = ()  # overrides of the SFT run only (its data)
    grpo_overrides: tuple[str, ...] = ()
    few_shot: int = 0  # bench --gpu: answered examples before each SFT prompt (sequences of 512+ tokens)

    @property
    def threads(self) -> int:
        return max(1, int(self.workers * self.cpus_per_worker))


# The CPU modes bench on `movies`, the data the README's figures were measured on (the CPU ablations' base
# moved to diamonds later): a step's cost depends on the prompt and answer lengths, so the data stays put.
CPU_BENCH_DATA = ("data.name=movies", "data.label_step=null")


def _two_worker_settings(mode: str, zero_stage: int) -> BenchSettings:
    """The work of `mode` as per-worker shares of the global batch on 2 single-CPU workers."""
    common = dict(workers=2, cpus_per_worker=1.0, grpo_temperature=1.0, grpo_beta=0.04, zero_stage=zero_stage)
    if mode == "quick":
        return BenchSettings(
            mode=mode, base="ablations/runs/cpu.yaml", overrides=CPU_BENCH_DATA,
            sft_steps=110, sft_warmup=10, sft_micro_batch=16, sft_lr=3e-3,
            grpo_steps=22, grpo_warmup=2, grpo_prompts=8, grpo_group=4, grpo_max_new_tokens=24, grpo_lr=1e-4,
            **common,
        )
    return BenchSettings(
        mode=mode, base="ablations/runs/cpu.yaml",
        overrides=(*CPU_BENCH_DATA, "model.source=smollm2-135m", "data.prompt_style=full"),
        sft_steps=12, sft_warmup=2, sft_micro_batch=4, sft_lr=5e-5,
        grpo_steps=6, grpo_warmup=1, grpo_prompts=4, grpo_group=4, grpo_max_new_tokens=16, grpo_lr=1e-6,
        **common,
    )


GPU_SHAPES = ("smollm2-135m", "qwen2.5-0.5b")  # bench --gpu's default shapes, in run order
GPU_ZERO_STAGE = 2  # ablations/runs/gpu.yaml's


def gpu_settings(shape: str, device: str = "cuda", zero_stage: int = GPU_ZERO_STAGE, tiny: bool = False,
                 cpus: int | None = None) -> BenchSettings:
    """`bench --gpu`: one project worker on one GPU (bf16, DeepSpeed ZeRO-`zero_stage`) against TRL on the same
    GPU, on a random-init model of `shape`. SFT at the paper's micro-batch on few-shot prompts of 512+ tokens;
    GRPO at the paper's B, G and budget on the plain prompts. `tiny` (with shape smollm2-tiny): the same code
    path at a size a CPU runs in seconds. `device="cpu"` runs it all in fp32 on CPU (tests)."""
    if device not in ("cuda", "cpu"):
        raise BenchError(f"--device must be cuda or cpu, got {device!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise BenchError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}")
    cpus = cpus or os.cpu_count() or 1
    common = dict(mode=f"gpu-{shape}", base="ablations/runs/cpu.yaml", workers=1, zero_stage=zero_stage,
                  cpus_per_worker=float(max(1, min(8, cpus // 2))), device=device, shape=shape,
                  precision="bf16" if device == "cuda" else "fp32", grpo_temperature=1.0, grpo_beta=0.04)
    if tiny:
        return BenchSettings(
            overrides=("data.prompt_style=full",), sft_steps=4, sft_warmup=2, sft_micro_batch=4, sft_lr=1e-4,
            grpo_steps=4, grpo_warmup=2, grpo_prompts=2, grpo_group=2, grpo_max_new_tokens=16, grpo_lr=1e-5,
            few_shot=1, **common,
        )
    return BenchSettings(
        overrides=("data.prompt_style=full",), sft_steps=15, sft_warmup=3, sft_micro_batch=16, sft_lr=2e-5,
        grpo_steps=8, grpo_warmup=2, grpo_prompts=8, grpo_group=4, grpo_max_new_tokens=32, grpo_lr=1e-5,
        few_shot=6, **common,
    )


def settings_for(mode: str, workers: int | None = None, cpus: int | None = None,
                 zero_stage: int = BENCH_ZERO_STAGE) -> BenchSettings:
    """The bench's fixed work per mode: the global batch of an optimizer step is the same whatever the
    number of project workers (`--workers` changes each worker's share); TRL accumulates one
    micro-batch per project worker, so a step is the same work on both sides."""
    if mode not in MODES:
        raise BenchError(f"unknown bench mode {mode!r}; allowed: {', '.join(MODES)}")
    if zero_stage not in (0, 1, 2, 3):
        raise BenchError(f"--zero-stage must be 0, 1, 2 or 3, got {zero_stage}")
    cpus = cpus or os.cpu_count() or 1
    workers = min(DEFAULT_WORKERS[mode], cpus) if workers is None else workers
    return same_global_batch(_two_worker_settings(mode, zero_stage), workers, cpus)


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
