"""The GPU path: `pytest -m gpu` on a CUDA machine (infra/gpu/device-check.sh runs it on the H200).

Each test takes its device as a parameter. Its `cuda` case is marked `gpu` and skipped, with the reason shown,
where no CUDA device is; where it is cheap, a `cpu` case runs the same body in fp32 on the CPUs, so what builds
the configs, batches and assertions runs in the ordinary suite and the device run does not find Python errors.
Numerics use a random-init model of SmolLM2-135M's shape on the GPU (its 2-layer miniature on CPU); runs under
Ray Train use the tiny model of ablations/runs/cpu.yaml."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import free_ports

REPOSITORY = Path(__file__).resolve().parents[1]
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ON_GPU = pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_CUDA], id="cuda")
ON_CPU = pytest.param("cpu", id="cpu")
BF16_LOSS_TOLERANCE = 2e-2  # relative: bf16 keeps 8 bits of mantissa through 30 layers


# --------------------------------------------------------------------------- building blocks


def one_rank_group(device: str) -> None:
    """A one-process group as Ray Train gives each worker (NCCL on a GPU, gloo on CPU); an existing one is kept."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_ports(1)[0]), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    ds_comm.cdb, ds_groups._WORLD_GROUP = None, None  # nothing cached from another group


def run_config(device: str, *overrides: str):
    """ablations/runs/cpu.yaml on `device`: bf16 on a GPU, fp32 on CPU."""
    from orchestrator.config import load_run_config

    gpu = device == "cuda"
    return load_run_config(REPOSITORY / "ablations/runs/cpu.yaml", [
        f"scaling.use_gpu={str(gpu).lower()}", f"deepspeed.precision={'bf16' if gpu else 'fp32'}",
        "deepspeed.shared_memory_grads=false", *overrides,
    ])


@pytest.fixture(scope="module")
def shape_dir(tmp_path_factory):
    """Random-init model folders of real shapes, written once per module: {device: folder}."""
    from orchestrator.bench.shapes import write_model

    root = tmp_path_factory.mktemp("shapes")
    return lambda device: write_model("smollm2-135m" if device == "cuda" else "smollm2-tiny", root)


def stage_context(cfg, device: str, model, logged: list, checkpoint=None):
    """What the worker loop gives a stage, in this process (no Ray)."""
    from orchestrator.data import build_dataset
    from orchestrator.modeling.models import digit_token_ids, load_tokenizer, resolve_source
    from orchestrator.stages.context import StageContext

    tokenizer = load_tokenizer(cfg.model, resolve_source(cfg.model))
    return StageContext(
        cfg=cfg, model=model.to(device), tokenizer=tokenizer, digit_token_ids=digit_token_ids(tokenizer),
        dataset=build_dataset(cfg.data), rank=0, world_size=1, device=torch.device(device), stage_index=0,
        global_step_offset=0, log=lambda metrics, step: logged.append((step, dict(metrics))),
        checkpoint=checkpoint or (lambda *args, **kwargs: None),
    )


def sft_micro_batch(cfg, tokenizer, dataset, rows: int = 8):
    """The first `rows` training examples as the SFT stage encodes and collates them (ce objective)."""
    from orchestrator.methods.objectives.base import build_objective
    from orchestrator.modeling.models import digit_token_ids

    objective = build_objective(cfg.pipeline[0], digit_token_ids(tokenizer))
    objective.prepare(None, dataset)
    examples = objective.encode(tokenizer, dataset.load("train").slice(0, rows), lambda p: p)
    return objective, objective.collate(examples, tokenizer.pad_token_id)


def logged(metrics: list, key: str) -> list[float]:
    return [m[key] for _, m in metrics if key in m]


# --------------------------------------------------------------------------- under Ray Train, to the end


PIPELINE_CASES = {"zero2": (2, False), "zero3": (3, False), "zero2-lora": (2, True)}


def pipeline_config(device: str, tmp_path: Path, zero_stage: int, lora: bool):
    """`sft:ce -> grpo:ccc` on one worker, evaluated at the end: a few steps of each stage."""
    return run_config(
        device, "pipeline=sft:ce -> grpo:ccc", "stages.sft.steps=6", "stages.grpo.steps=3",
        "stages.grpo.micro_batch_size=4", "eval.max_samples=16", "eval.splits=[val]", "tracking.log_every=1",
        "checkpoint.every_steps=3",
        f"deepspeed.zero_stage={zero_stage}", f"model.lora.enabled={str(lora).lower()}", "model.lora.r=8",
        "scaling.num_workers=1", "scaling.cpus_per_worker=2", f"name=gpu-{zero_stage}{'-lora' if lora else ''}",
        f"storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_pipeline_configs_pass_every_check_before_ray_for_the_gpu_and_the_cpu(case, tmp_path):
    """What the driver checks before Ray starts (data, model, generation budgets, tracking store) holds for the
    GPU runs' configs too, here on CPU."""
    from orchestrator.runtime.preflight import prepare_run

    zero_stage, lora = PIPELINE_CASES[case]
    gpu = pipeline_config("cuda", tmp_path, zero_stage, lora)
    assert gpu.scaling.use_gpu and gpu.deepspeed.precision == "bf16" and gpu.deepspeed.zero_stage == zero_stage
    assert [s.label() for s in gpu.pipeline] == ["sft:ce", "grpo:ccc"] and gpu.model.lora.enabled == lora
    prepare_run(gpu)
    cpu = pipeline_config("cpu", tmp_path, zero_stage, lora)
    assert not cpu.scaling.use_gpu and cpu.deepspeed.precision == "fp32"


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_sft_then_grpo_on_one_gpu_worker_runs_to_the_end_with_evaluation(case, tmp_path):
    from orchestrator.runtime.driver import run_training
    from orchestrator.tracking.conventions import PRECISION_TAG, tracking_client

    zero_stage, lora = PIPELINE_CASES[case]
    outcome = run_training(pipeline_config("cuda", tmp_path, zero_stage, lora))
    run = tracking_client(outcome.tracking_uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[PRECISION_TAG] == "bf16"
    metrics = run.data.metrics
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "val/all/mae" in metrics
    assert 0 < metrics["gpu/peak_allocated_gib"] < 20
    client = tracking_client(outcome.tracking_uri)
    kl = [m.value for m in client.get_metric_history(outcome.run_id, "train/kl")]
    assert kl and all(torch.isfinite(torch.tensor(kl)))


# --------------------------------------------------------------------------- numerics, in this process


@pytest.mark.parametrize("device", [ON_CPU, ON_GPU])
def test_step0_sft_loss_on_the_device_equals_the_cpu_fp32_loss(device, shape_dir):
    """The first micro-batch's loss through a DeepSpeed engine (bf16 on a GPU) against the same weights in
    fp32 on CPU, per supervised token."""
    from orchestrator.engine.deepspeed import build_engine
    from orchestrator.modeling.models import load_model_and_tokenizer
    from orchestrator.stages.sft import micro_batch_loss

    one_rank_group(device)
    cfg = run_config(device, f"model.source={shape_dir(device)}", "pipeline=sft:ce", "data.prompt_style=full")
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    ctx = stage_context(cfg, "cpu", model, [])
    objective, batch = sft_micro_batch(cfg, tokenizer, ctx.dataset)
    tokens = float((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        expected = float(micro_batch_loss(copy.deepcopy(model).eval(), objective, [batch])) / tokens
    engine = build_engine(model.to(device), cfg.pipeline[0], cfg)
    objective.digit_token_ids = objective.digit_token_ids.to(device)
    with torch.no_grad():
        engine.eval()
        got = float(micro_batch_loss(engine, objective, [batch], True, torch.device(device))) / tokens
    tolerance = BF16_LOSS_TOLERANCE if device == "cuda" else 1e-5
    assert abs(got - expected) <= tolerance * abs(expected), (got, expected)


@pytest.mark.parametrize("device,zero_stage", [
    pytest.param("cpu", 2, id="cpu-zero2"),
    pytest.param("cuda", 2, marks=[pytest.mark.gpu, NEEDS_CUDA], id="cuda-zero2"),
    pytest.param("cuda", 3, marks=[pytest.mark.gpu, NEEDS_CUDA], id="cuda-zero3"),
])
def test_a_grpo_first_pipeline_starts_at_kl_zero_with_the_reference_in_the_engines_dtype(device, zero_stage,
                                                                                            monkeypatch):
    from orchestrator.engine.deepspeed import training_dtype
    from orchestrator.modeling.models import load_model_and_tokenizer
    from orchestrator.stages import grpo

    one_rank_group(device)
    cfg = run_config(device, "pipeline=grpo:ccc", "stages.grpo.steps=1", "stages.grpo.micro_batch_size=4",
                     "stages.grpo.max_new_tokens=8", "stages.grpo.beta=0.04", "tracking.log_every=1",
                     f"deepspeed.zero_stage={zero_stage}", "checkpoint.every_steps=100")
    references = []
    start_reference = grpo.start_reference
    monkeypatch.setattr(grpo, "start_reference", lambda *a: references.append(start_reference(*a)) or references[-1])
    model, _ = load_model_and_tokenizer(cfg.model)
    metrics: list = []
    grpo.run_grpo_stage(stage_context(cfg, device, model, metrics), cfg.pipeline[0])
    reference = references[0].model
    frozen = getattr(reference, "module", reference)
    assert {p.dtype for p in frozen.parameters()} == {training_dtype(cfg)}
    assert {b.dtype for b in frozen.buffers() if b.is_floating_point()} <= {torch.float32}
    (kl,) = logged(metrics, "train/kl")
    assert abs(kl) < 1e-6, kl


@pytest.mark.parametrize("device", [ON_CPU, ON_GPU])
def test_an_sft_stage_resumed_from_its_checkpoint_trains_as_the_uninterrupted_one(device, tmp_path):
    """Four steps in one go, against two steps, a DeepSpeed checkpoint (bf16 with its fp32 master weights on a
    GPU), and the last two steps from it in a fresh engine."""
    from orchestrator.modeling.models import load_model_and_tokenizer
    from orchestrator.stages.sft import run_sft_stage

    one_rank_group(device)
    cfg = run_config(device, "pipeline=sft:ce", "stages.sft.steps=4", "stages.sft.warmup_steps=0",
                     "stages.sft.micro_batch_size=8", "tracking.log_every=1", "checkpoint.every_steps=2",
                     "deepspeed.zero_stage=2")

    def save(engine, step, metrics, reference=None):
        engine.save_checkpoint(str(tmp_path / f"step{step}"), tag="ckpt")

    whole: list = []
    run_sft_stage(stage_context(cfg, device, load_model_and_tokenizer(cfg.model)[0], whole, save), cfg.pipeline[0])
    resumed: list = []
    run_sft_stage(stage_context(cfg, device, load_model_and_tokenizer(cfg.model)[0], resumed), cfg.pipeline[0],
                  start_step=2, resume_dir=str(tmp_path / "step2"))
    expected, got = logged(whole, "train/loss")[2:], logged(resumed, "train/loss")
    assert len(got) == 2
    tolerance = 1e-2 if device == "cuda" else 1e-6
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=tolerance, atol=0.0)


@pytest.mark.parametrize("device", [ON_CPU, ON_GPU])
def test_last_layer_trimming_matches_the_full_forward(device, shape_dir):
    """sdpa (bf16 on a GPU), left and right padding: the trimmed last layer and LM head give the full
    forward's logits at every real position from the first kept one."""
    from orchestrator.data.collate import collate_prompts
    from orchestrator.modeling.last_layer import KEYWORD, enable_last_layer_from
    from orchestrator.modeling.models import load_model_and_tokenizer

    cfg = run_config(device, f"model.source={shape_dir(device)}")
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model = model.to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    assert enable_last_layer_from(model)
    rows = [tokenizer.encode("What is the rating of this film? " * k, add_special_tokens=False) for k in (3, 5, 8)]
    start = 10
    for side in ("left", "right"):
        batch = {k: v.to(device) for k, v in collate_prompts(rows, tokenizer.pad_token_id, side=side).items()}
        width = batch["input_ids"].shape[1]
        with torch.no_grad():
            full = model(**batch).logits[:, start:].float()
            trimmed = model(**batch, logits_to_keep=width - start, **{KEYWORD: start}).logits.float()
        real = batch["attention_mask"][:, start:].bool()
        tolerance = 5e-2 if device == "cuda" else 1e-4
        torch.testing.assert_close(trimmed[real], full[real], rtol=tolerance, atol=tolerance)


# --------------------------------------------------------------------------- no hidden host waits


def syncs_in_project_code(call, device: str) -> tuple[list[str], list[str]]:
    """Run `call` with torch's CUDA sync debugging on: (syncs from a line of orchestrator/, syncs elsewhere).
    On CPU there is nothing to wait for: `call` just runs."""
    if device != "cuda":
        call()
        return [], []
    package = str(REPOSITORY / "orchestrator")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchronizing" in str(w.message)]
    return [s for s in syncs if s.startswith(package)], [s for s in syncs if not s.startswith(package)]


def on_device(model, device: str):
    return model.to(device, torch.bfloat16 if device == "cuda" else torch.float32)


@pytest.mark.parametrize("device", [ON_CPU, ON_GPU])
def test_one_sft_micro_batch_has_no_host_wait_in_the_projects_code(device, shape_dir):
    from orchestrator.modeling.last_layer import enable_last_layer_from
    from orchestrator.modeling.models import load_model_and_tokenizer
    from orchestrator.stages.sft import micro_batch_loss

    cfg = run_config(device, f"model.source={shape_dir(device)}", "pipeline=sft:ce", "data.prompt_style=full")
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model = on_device(model, device)
    enable_last_layer_from(model)
    ctx = stage_context(cfg, device, model, [])
    objective, batch = sft_micro_batch(cfg, tokenizer, ctx.dataset)
    objective.digit_token_ids = objective.digit_token_ids.to(device)
    ours, others = syncs_in_project_code(
        lambda: micro_batch_loss(model, objective, [batch], True, torch.device(device)).backward(), device)
    print(f"host waits outside orchestrator/: {others}")
    assert not ours, ours


@pytest.mark.parametrize("device", [ON_CPU, ON_GPU])
def test_one_grpo_chunk_has_no_host_wait_in_the_projects_code(device):
    from orchestrator.methods.grpo import grpo_loss_terms
    from orchestrator.modeling.models import load_model_and_tokenizer
    from orchestrator.stages.grpo import LogProbForward, PromptBatch, Rollout

    cfg = run_config(device, "pipeline=grpo:ccc", "stages.grpo.group_size=2", "stages.grpo.grad_accum=1")
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    model = on_device(model, device)
    stage = cfg.pipeline[0]
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in ("1939 | 71 min", "2001 | 120 min")]
    completions = [tokenizer.encode(f"<answer>{v}</answer>", add_special_tokens=False) for v in (50, 61, 7, 88)]
    batch = PromptBatch(prompt_ids=prompts, targets=[50.0, 70.0], columns={}, pixels=None)
    rollout = Rollout(completions=completions, texts=[["", ""], ["", ""]], parsed=[[50.0, 61.0], [7.0, 88.0]])
    ctx = SimpleNamespace(tokenizer=tokenizer, device=torch.device(device), cfg=cfg, processor=None)
    forward = LogProbForward.for_rollout(ctx, stage, batch, rollout, True)
    chunk = forward.chunks[0]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], device=device)
    index = torch.as_tensor(chunk).to(device)

    def chunk_step():
        logp = forward.logprobs(model, chunk, None)
        out = grpo_loss_terms(logp, logp.detach(), logp.detach(), advantages[index], forward.mask[index],
                              beta=stage.beta)
        out["loss_sum"].backward()

    ours, others = syncs_in_project_code(chunk_step, device)
    print(f"host waits outside orchestrator/: {others}")
    assert not ours, ours
