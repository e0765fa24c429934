"""The TRL side: `trl.SFTTrainer` / `trl.GRPOTrainer` in a subprocess (`python -m orchestrator.bench _trl`)
with torch's thread count set to the project's number of CPUs, each optimizer step timed by a
TrainerCallback (on_step_begin -> on_step_end). The subprocess gets the project's weights, examples and
sample order through a JSON spec and writes its rates to a JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.bench.arithmetic import best_window_rate, step_rates
from orchestrator.bench.settings import RAY_WORKER_NICENESS
from orchestrator.bench.workload import encoded_train, sft_step_indices
from orchestrator.stages.timing import synchronize_cuda

DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_trl(kind: str, spec: dict[str, Any], out_dir: Path, threads: int) -> dict[str, Any]:
    """TRL's `kind` ("sft" or "grpo") run of `spec` in a subprocess on `threads` threads -> its rates."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = out_dir / f"trl-{kind}-spec.json", out_dir / f"trl-{kind}-result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}
    if spec["settings"].get("device", "cpu") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    for name in DISTRIBUTED_ENV:  # one process: a caller's process group must not become TRL's
        env.pop(name, None)
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


def main_trl(argv: list[str]) -> int:
    """The subprocess: `KIND SPEC_PATH RESULT_PATH`."""
    kind, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    result = trl_sft(spec) if kind == "sft" else trl_grpo(spec)
    Path(result_path).write_text(json.dumps(result))
    return 0


def step_timer():
    """A TrainerCallback timing each optimizer step (on_step_begin -> on_step_end) into its `times`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize_cuda()  # on a GPU: the step's own kernels, not the previous one's
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize_cuda()
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def _device_args(s: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments of the bench's device: on CPU fp32 and the per-tensor AdamW loop; on a GPU bf16
    autocast (fp32 weights, as DeepSpeed keeps fp32 master weights) and torch's fused AdamW, the project's."""
    gpu = s.get("device", "cpu") == "cuda"
    return {"optim": "adamw_torch_fused" if gpu else "adamw_torch", "bf16": s.get("precision") == "bf16",
            "fp16": False, "use_cpu": not gpu}


def _peak_memory(rates: dict[str, Any]) -> dict[str, Any]:
    """`rates` with the GPU memory peak of the training, in GiB (nothing on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rates["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return rates


def _load_for_trl(spec: dict[str, Any]):
    import torch

    from orchestrator.config import RunConfig
    from orchestrator.modeling.models import load_model_and_tokenizer

    torch.set_num_threads(spec["threads"])
    cfg = RunConfig.model_validate(spec["config"])
    model, tokenizer = load_model_and_tokenizer(cfg.model, spec["model_source"])  # the same weights as the workers
    return cfg, model, tokenizer


# --------------------------------------------------------------------------- SFT


def _sft_dataset(cfg, spec: dict[str, Any]):
    """The project's encoded SFT examples in its order, step-major and rank-minor: rank r = micro-step r."""
    from datasets import Dataset

    s = spec["settings"]
    _, _, examples = encoded_train(cfg, spec["model_source"])
    order = sft_step_indices(len(examples), cfg.seed, s["sft_steps"], s["sft_micro_batch"], s["workers"])
    flat = [i for step in order for rank in step for i in rank]
    return Dataset.from_dict({
        "input_ids": [examples[i][0] for i in flat],
        "completion_mask": [[int(t != -100) for t in examples[i][1]] for i in flat],
    })


def _sft_args(cfg, spec: dict[str, Any]):
    from trl import SFTConfig

    s, stage = spec["settings"], cfg.pipeline[0]
    return SFTConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=s["sft_micro_batch"],
        gradient_accumulation_steps=s["workers"], max_steps=s["sft_steps"], learning_rate=stage.lr,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=stage.weight_decay, max_grad_norm=stage.max_grad_norm,
        **_device_args(s), report_to="none", save_strategy="no",
        logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0, seed=cfg.seed, data_seed=cfg.seed,
        completion_only_loss=True, gradient_checkpointing=False, padding_free=False, max_length=None,
        dataset_num_proc=None, train_sampling_strategy="sequential",
    )


def _count_batches(trainer) -> list[tuple[int, int]]:
    """Wrap the trainer's collator to record (supervised, processed) tokens of each micro-batch it builds."""
    seen: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        labels = batch["labels"]
        seen.append((int((labels[:, 1:] != -100).sum()), int(batch["input_ids"].numel())))
        return batch

    trainer.data_collator = counting_collator
    return seen


def _sft_rates(times: list[float], seen: list[tuple[int, int]], s: dict[str, Any]) -> dict[str, Any]:
    """Rates over the timed steps; tokens summed over each step's micro-batches (one per project worker)."""
    per_step, warmup = s["workers"], s["sft_warmup"]
    supervised = [sum(x[0] for x in seen[i * per_step : (i + 1) * per_step]) for i in range(len(times))]
    processed = [sum(x[1] for x in seen[i * per_step : (i + 1) * per_step]) for i in range(len(times))]
    rates = step_rates(times, s["sft_micro_batch"] * s["workers"], supervised, warmup)
    rates["processed_tokens_per_s"] = sum(processed[warmup:]) / sum(times[warmup:])
    rates["supervised_tokens"] = float(sum(supervised[warmup:]))
    rates["best_window_samples_per_s"] = best_window_rate(times, s["sft_micro_batch"] * s["workers"], warmup, warmup)
    rates["step_times"] = times
    return rates


def trl_sft(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from trl import SFTTrainer

    cfg, model, tokenizer = _load_for_trl(spec)
    dataset = _sft_dataset(cfg, spec)
    trainer = SFTTrainer(model=model, args=_sft_args(cfg, spec), train_dataset=dataset, processing_class=tokenizer)
    seen = _count_batches(trainer)
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    rates = _sft_rates(timer.times, seen, spec["settings"])
    rates["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rates["threads"] = torch.get_num_threads()
    return _peak_memory(rates)


# --------------------------------------------------------------------------- GRPO


def _grpo_dataset(cfg, s: dict[str, Any]):
    """(the prompts and targets in the project's order as chat messages, the built dataset)."""
    from datasets import Dataset

    from orchestrator.data import build_dataset
    from orchestrator.data.collate import micro_batch_indices

    built = build_dataset(cfg.data)
    train = built.load("train")
    prompts, targets = train.column("prompt").to_pylist(), train.column("target").to_pylist()
    steps, world, B = s["grpo_steps"], s["workers"], s["grpo_prompts"]
    seed = cfg.seed  # stage index 0
    flat = [int(i) for st in range(steps) for r in range(world)
            for i in micro_batch_indices(len(prompts), seed, st, 0, 1, r, world, B)]
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": prompts[i]}] for i in flat],
        "target": [float(targets[i]) for i in flat],
    })
    return dataset, built


def _mae_reward(stage, built):
    """The project's MAE reward as a TRL reward function."""
    from orchestrator.methods.answers import parse_answer
    from orchestrator.methods.rewards import mae_reward

    label_range = max(built.label_max - built.label_min, 1e-12)

    def mae(completions, target, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [mae_reward(parse_answer(t), y, form=stage.mae_reward_form, label_range=label_range,
                           scale=stage.mae_scale)
                for t, y in zip(texts, target)]

    return mae


def _grpo_args(cfg, spec: dict[str, Any]):
    from trl import GRPOConfig

    s, stage = spec["settings"], cfg.pipeline[0]
    B, G, world = s["grpo_prompts"], s["grpo_group"], s["workers"]
    return GRPOConfig(
        output_dir=spec["out_dir"], per_device_train_batch_size=B * G * world, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=stage.max_new_tokens, temperature=stage.temperature, top_p=stage.top_p,
        top_k=0, beta=stage.beta, num_iterations=1, epsilon=stage.epsilon_low, epsilon_high=stage.epsilon_high,
        loss_type="dapo", scale_rewards="group" if stage.scale_rewards else "none", learning_rate=stage.lr,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=stage.weight_decay, max_grad_norm=stage.max_grad_norm,
        max_steps=s["grpo_steps"], shuffle_dataset=False, use_vllm=False, **_device_args(s),
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=cfg.seed,
        gradient_checkpointing=False, log_completions=False,
    )


def _grpo_rates(times: list[float], log_history: list[dict[str, Any]], s: dict[str, Any]) -> dict[str, Any]:
    """Rates over the timed steps; tokens are the mean completion length TRL logged over them."""
    samples_per_step, w = s["grpo_prompts"] * s["grpo_group"] * s["workers"], s["grpo_warmup"]
    lengths = [h["completions/mean_length"] for h in log_history if "completions/mean_length" in h]
    timed_lengths = lengths[w:] or lengths
    length = sum(timed_lengths) / len(timed_lengths) if timed_lengths else float("nan")
    rates = step_rates(times, samples_per_step, None, w)
    rates["best_window_samples_per_s"] = best_window_rate(times, samples_per_step, w, w)
    rates["step_times"] = times
    rates["tokens_per_s"] = rates["samples_per_s"] * length
    rates["completion_length"] = length
    return rates


def trl_grpo(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from trl import GRPOTrainer

    cfg, model, tokenizer = _load_for_trl(spec)
    dataset, built = _grpo_dataset(cfg, spec["settings"])
    args = _grpo_args(cfg, spec)
    # TRL builds its reference model from the policy's path: give the in-memory model one (same weights).
    saved = Path(spec["out_dir"]) / "policy"
    model.save_pretrained(saved, safe_serialization=True)
    model.config._name_or_path = str(saved)
    trainer = GRPOTrainer(model=model, reward_funcs=[_mae_reward(cfg.pipeline[0], built)], args=args,
                          train_dataset=dataset, processing_class=tokenizer)
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    rates = _grpo_rates(timer.times, trainer.state.log_history, spec["settings"])
    rates["threads"] = torch.get_num_threads()
    return _peak_memory(rates)
