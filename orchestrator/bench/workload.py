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
        f"scaling.use_gpu={'true' if s.device == 'cuda' else 'false'}",
        f"deepspeed.zero_stage={s.zero_stage}",
        f"deepspeed.precision={s.precision}",
        "eval.splits=[val]",
        "eval.max_samples=8",
    ]


def _sft_overrides(s: BenchSettings) -> list[str]:
    return [
        "pipeline=sft:ce", f"stages.sft.steps={s.sft_steps}", f"stages.sft.micro_batch_size={s.sft_micro_batch}",
        f"stages.sft.lr={s.sft_lr}", "stages.sft.warmup_steps=0", "stages.sft.lr_schedule=linear",
        f"tracking.log_every={s.sft_warmup}", f"checkpoint.every_steps={s.sft_steps}", *s.sft_overrides,
    ]


def _grpo_overrides(s: BenchSettings) -> list[str]:
    return [
        "pipeline=grpo:mae", f"stages.grpo.steps={s.grpo_steps}", f"stages.grpo.micro_batch_size={s.grpo_prompts}",
        f"stages.grpo.group_size={s.grpo_group}", f"stages.grpo.max_new_tokens={s.grpo_max_new_tokens}",
        f"stages.grpo.temperature={s.grpo_temperature}", f"stages.grpo.beta={s.grpo_beta}",
        "stages.grpo.num_iterations=1", f"stages.grpo.lr={s.grpo_lr}", "stages.grpo.warmup_steps=0",
        f"tracking.log_every={s.grpo_warmup}", f"checkpoint.every_steps={s.grpo_steps}", *s.grpo_overrides,
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


def first_kept_position(labels_rows: list[list[int]]) -> int:
    """The position from which the SFT stage runs the LM head (and the last layer's queries and MLP) for a
    padded batch of these label rows: the first position predicting a supervised label in any row
    (modeling.forward.supervised_logits)."""
    return min(next(i for i, t in enumerate(labels) if t != -100) for labels in labels_rows) - 1


def timed_sft_rows(settings: BenchSettings, cfg, model_source: str) -> list[tuple[int, int]]:
    """(length, first kept position) of every row in the project's timed SFT steps, its batch split into
    length groups and trimmed as the stage runs it: the FLOPs per executed position (bench.arithmetic)."""
    from orchestrator.stages.sft import length_groups

    s = settings
    _, _, examples = encoded_train(cfg, model_source)
    order = sft_step_indices(len(examples), cfg.seed, s.sft_steps, s.sft_micro_batch, s.workers)
    rows = []
    for step in order[s.sft_warmup :]:
        for rank in step:
            for group in length_groups([len(examples[i][0]) for i in rank], cfg.pipeline[0].length_groups):
                members = [examples[rank[int(j)]] for j in group]
                kept_from = first_kept_position([labels for _, labels in members])
                rows.extend((len(ids), kept_from) for ids, _ in members)
    return rows


# --------------------------------------------------------------------------- bench --gpu


def few_shot_prompt(examples: list[tuple[str, str]], question: str) -> str:
    """`question` after answered examples (prompt, formatted answer): a long-context prompt of the same task."""
    shown = "\n\n".join(f"{prompt}\n{answer}" for prompt, answer in examples)
    return f"Examples of the task, each with its answer:\n\n{shown}\n\nNow answer this one.\n{question}"


def write_few_shot_manifest(built, shots: int, path: Path) -> Path:
    """A text-only manifest (data.name=manifest) of `built`'s splits, each prompt preceded by `shots` answered
    training examples (the next rows of the training split, wrapping around): the same task at 5x the length."""
    import json

    from orchestrator.methods.answers import answer_decimals, format_answer

    train = built.load("train")
    shown = list(zip(train.column("prompt").to_pylist(), train.column("target").to_pylist()))
    decimals = answer_decimals(built.label_step)
    answers = [(p, format_answer(t, decimals)) for p, t in shown]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for split in ("train", "val", "test"):
            table = built.load(split)
            for i, (prompt, target) in enumerate(zip(table.column("prompt").to_pylist(),
                                                     table.column("target").to_pylist())):
                examples = [answers[(i + 1 + k) % len(answers)] for k in range(shots)]
                out.write(json.dumps({"prompt": few_shot_prompt(examples, prompt), "target": target,
                                      "split": split}) + "\n")
    return path


def gpu_workload(settings: BenchSettings, work_dir: Path) -> BenchSettings:
    """`settings` with what `bench --gpu` writes first: the random-init model of its shape (both stages) and,
    for the SFT stage, the few-shot manifest of the GRPO stage's data."""
    import dataclasses

    from orchestrator.bench.shapes import write_model
    from orchestrator.data import build_dataset

    model = write_model(settings.shape, work_dir / "models")
    plain = project_config(settings, "grpo", "bench-gpu-data", "bench")
    manifest = write_few_shot_manifest(build_dataset(plain.data), settings.few_shot,
                                       work_dir / "data" / f"few-shot-{settings.few_shot}.jsonl")
    data = ("data.name=manifest", f"data.manifest.path={manifest}",
            f"data.label_step={build_dataset(plain.data).label_step}")
    return dataclasses.replace(settings, overrides=(*settings.overrides, f"model.source={model}"),
                               sft_overrides=(*settings.sft_overrides, *data))
