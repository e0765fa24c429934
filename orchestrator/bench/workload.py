"""The work both sides do: the project's run config for a bench stage, and its SFT examples, their order
and token counts, which the TRL side reuses so that both train on the same tokens in the same order."""

from __future__ import annotations

from pathlib import Path

from orchestrator.bench.settings import BenchSettings

REPOSITORY = Path(__file__).resolve().parents[2]


def _shared_overrides(s: BenchSettings, name: str, experiment: str) -> list[str]:
    from orchestrator.config import resolve_path

    return [
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


def _sft_overrides(s: BenchSettings) -> list[str]:
    return [
        "pipeline=sft:ce", f"stages.sft.steps={s.sft_steps}", f"stages.sft.micro_batch_size={s.sft_micro_batch}",
        f"stages.sft.lr={s.sft_lr}", "stages.sft.warmup_steps=0", "stages.sft.lr_schedule=linear",
        f"tracking.log_every={s.sft_warmup}", f"checkpoint.every_steps={s.sft_steps}",
    ]


def _grpo_overrides(s: BenchSettings) -> list[str]:
    return [
        "pipeline=grpo:mae", f"stages.grpo.steps={s.grpo_steps}", f"stages.grpo.micro_batch_size={s.grpo_prompts}",
        f"stages.grpo.group_size={s.grpo_group}", f"stages.grpo.max_new_tokens={s.grpo_max_new_tokens}",
        f"stages.grpo.temperature={s.grpo_temperature}", f"stages.grpo.beta={s.grpo_beta}",
        "stages.grpo.num_iterations=1", f"stages.grpo.lr={s.grpo_lr}", "stages.grpo.warmup_steps=0",
        f"tracking.log_every={s.grpo_warmup}", f"checkpoint.every_steps={s.grpo_steps}",
    ]


def project_config(settings: BenchSettings, kind: str, name: str, experiment: str):
    """The project's run config for the bench's `kind` ("sft" or "grpo") stage, logged as `name`."""
    from orchestrator.config import load_run_config

    stage = _sft_overrides(settings) if kind == "sft" else _grpo_overrides(settings)
    base = Path(settings.base) if Path(settings.base).is_absolute() else REPOSITORY / settings.base
    return load_run_config(base, [*_shared_overrides(settings, name, experiment), *stage])


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


def encoded_train(cfg, model_source: str | None = None):
    """(built dataset, tokenizer, encoded train examples): each row's prompt and formatted answer encoded as
    the SFT stage's token objectives encode them, (input ids, labels with the prompt masked)."""
    from orchestrator.data import build_dataset
    from orchestrator.data.collate import encode_sft_example
    from orchestrator.methods.answers import answer_decimals, format_answer
    from orchestrator.modeling.models import load_tokenizer, resolve_source

    built = build_dataset(cfg.data)
    tokenizer = load_tokenizer(cfg.model, model_source or resolve_source(cfg.model))
    train = built.load("train")
    prompts, targets = train.column("prompt").to_pylist(), train.column("target").to_pylist()
    return built, tokenizer, [encode_sft_example(tokenizer, p, format_answer(t, answer_decimals(built.label_step)))
                               for p, t in zip(prompts, targets)]


def timed_sft_tokens(settings: BenchSettings, cfg, model_source: str) -> tuple[int, int]:
    """(supervised, processed) tokens in the project's timed SFT steps, counted from its own encoding and
    sample order: what both sides must have trained on."""
    s = settings
    _, _, examples = encoded_train(cfg, model_source)
    order = sft_step_indices(len(examples), cfg.seed, s.sft_steps, s.sft_micro_batch, s.workers)
    timed = [[batch_tokens([examples[i] for i in rank]) for rank in step] for step in order[s.sft_warmup :]]
    return sum(t[0] for step in timed for t in step), sum(t[1] for step in timed for t in step)
