"""Stage hand-off, LoRA and the GRPO reference policy on real DeepSpeed engines (one process, gloo).

What must hold: the module handed to the next stage computes exactly what the finished stage's
engine computes (ZeRO-3 shards gathered, LoRA merged), and the reference reproduces the stage's
starting policy whichever way it is held."""


import copy

import pytest
import torch

from orchestrator.config import load_run_config
from orchestrator.engine.deepspeed import build_engine, clip_averaged_gradients_, full_parameters
from orchestrator.engine.handoff import gathered_state_dict, handoff_module
from orchestrator.engine.reference import ReferencePolicy
from orchestrator.methods.schedules import lr_factor
from orchestrator.modeling.models import (
    add_lora_adapters,
    build_digit_tokenizer,
    is_lora_model,
    load_model_and_tokenizer,
)

pytestmark = pytest.mark.usefixtures("process_group")  # a one-process gloo group (tests/conftest.py)


def cfg_for(zero: int, lora: bool = False):
    return load_run_config(
        overrides=[
            f"deepspeed.zero_stage={zero}", f"model.lora.enabled={str(lora).lower()}", "model.lora.r=4",
            "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "pipeline=sft:ce -> grpo:ccc",
            "pipeline.0.lr=1e-2",
        ]
    )


INPUT = torch.tensor([build_digit_tokenizer().encode("<answer>42</answer>", add_special_tokens=False)])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad(), full_parameters(model) as module:
        return module(input_ids=INPUT).logits.detach().clone()


def train_one_step(engine):
    out = engine(input_ids=INPUT, labels=INPUT)
    engine.backward(out.loss)
    engine.step()


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_engine_steps_are_textbook_adamw(zero):
    """The engine's fused AdamW under ZeRO-0/2/3 moves the weights as torch's per-tensor AdamW loop, with
    the same warm-up/decay schedule and gradient clipping, does on a copy of the model."""
    cfg = cfg_for(zero)
    stage = cfg.pipeline[0].model_copy(
        update={"warmup_steps": 2, "steps": 4, "weight_decay": 0.1, "max_grad_norm": 0.5}
    )
    model, _ = load_model_and_tokenizer(cfg.model, "tiny")
    plain = copy.deepcopy(model)
    engine = build_engine(model, stage, cfg)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=stage.lr, weight_decay=stage.weight_decay, foreach=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, stage.warmup_steps, stage.steps, stage.lr_schedule)
    )
    assert any(g.get("fused") for g in engine.optimizer.param_groups)
    for _ in range(3):
        train_one_step(engine)
        plain(input_ids=INPUT, labels=INPUT).loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), stage.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    assert torch.allclose(logits_of(engine), logits_of(plain), atol=1e-5)


@pytest.mark.parametrize("kind, updates, optimizer_steps", [
    ("grpo", {"num_iterations": 2, "grad_accum": 2}, 6),  # 3 rollouts x 2 updates, each of 2 chunks
    ("sft", {"grad_accum": 2}, 3),  # 3 steps, each of 2 micro-batches
])
def test_the_lr_schedule_spans_the_optimizer_steps_the_stage_takes(kind, updates, optimizer_steps):
    """The stage calls engine.step() once per chunk (micro-batch), DeepSpeed steps the optimizer and the
    schedule at each accumulation boundary: a linear decay without warm-up over the stage's 6 (GRPO) or 3 (SFT)
    optimizer steps runs at lr · (1 − k / n) for k = 0..n−1, never at 0."""
    cfg = cfg_for(0)
    stage = next(s for s in cfg.pipeline if s.kind == kind).model_copy(
        update={"steps": 3, "warmup_steps": 0, "lr_schedule": "linear", "lr": 1.0, **updates}
    )
    model, _ = load_model_and_tokenizer(cfg.model, "tiny")
    engine = build_engine(model, stage, cfg)
    lrs = []
    for _ in range(optimizer_steps):
        lrs.append(engine.get_lr()[0])
        for _ in range(stage.grad_accum):
            train_one_step(engine)
    assert lrs == pytest.approx([1 - k / optimizer_steps for k in range(optimizer_steps)])
    assert engine.get_lr()[0] == 0.0  # past the stage's last step


def module_with_grads(*grads: list[float]) -> torch.nn.Module:
    module = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(len(g))) for g in grads])
    for p, g in zip(module, grads):
        p.grad = torch.tensor(g)
    return module


def test_clipping_by_hand():
    """Norm of (3, 4, 0) is 5: a limit of 1 scales by 1 / (5 + 1e-6); a limit of 10 leaves them alone."""
    module = module_with_grads([3.0, 4.0], [0.0])
    clip_averaged_gradients_(module, 1.0)
    assert torch.allclose(module[0].grad, torch.tensor([0.6, 0.8])) and module[1].grad.tolist() == [0.0]
    module = module_with_grads([3.0, 4.0], [0.0])
    clip_averaged_gradients_(module, 10.0)
    assert module[0].grad.tolist() == [3.0, 4.0]


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_is_deepspeeds_without_its_collective(max_norm, monkeypatch):
    """The same gradients as DeepSpeed's fp32 clipping, and no all-reduce; a ZeRO-0 fp32 engine uses it."""
    from deepspeed.runtime.utils import clip_grad_norm_

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=g).flatten().tolist(), torch.randn(7, generator=g).tolist()]
    theirs, ours = module_with_grads(*grads), module_with_grads(*grads)
    clip_grad_norm_(list(theirs.parameters()), max_norm)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("a collective"))
    clip_averaged_gradients_(ours, max_norm)
    for a, b in zip(theirs.parameters(), ours.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)
    monkeypatch.undo()
    model, _ = load_model_and_tokenizer(cfg_for(0).model, "tiny")
    engine = build_engine(model, cfg_for(0).pipeline[0], cfg_for(0))
    assert engine.clip_fp32_gradients.func is clip_averaged_gradients_


@pytest.mark.parametrize("zero, lora", [(2, False), (3, False), (2, True), (3, True)])
def test_handoff_module_computes_what_the_engine_computed(zero, lora):
    cfg = cfg_for(zero, lora)
    model, _ = load_model_and_tokenizer(cfg.model, "tiny")
    engine = build_engine(add_lora_adapters(model, cfg.model.lora), cfg.pipeline[0], cfg)
    before = logits_of(engine)
    for _ in range(3):
        train_one_step(engine)
    after = logits_of(engine)
    assert not torch.allclose(before, after)  # the step changed something worth handing over
    plain = handoff_module(engine)
    assert not is_lora_model(plain) and all(p.numel() > 0 for p in plain.parameters())
    assert torch.allclose(logits_of(plain), after, atol=1e-5)


def test_lora_trains_only_adapters_and_disabling_them_gives_the_base():
    cfg = cfg_for(2, lora=True)
    model, _ = load_model_and_tokenizer(cfg.model, "tiny")
    base = logits_of(model)
    adapted = add_lora_adapters(model, cfg.model.lora)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    engine = build_engine(adapted, cfg.pipeline[1], cfg)
    for _ in range(2):
        train_one_step(engine)
    reference = ReferencePolicy(adapted, cfg, cfg.pipeline[1], lora=True)
    with reference.forward_model(engine) as ref:
        assert torch.allclose(logits_of(ref), base, atol=1e-6)  # adapters off = the stage's start
    assert not torch.allclose(logits_of(engine), base)
    assert reference.state_dict() is None  # nothing extra to checkpoint


@pytest.mark.parametrize("zero", [2, 3])
def test_reference_is_the_frozen_start_and_survives_a_checkpoint(zero):
    cfg = cfg_for(zero)
    model, _ = load_model_and_tokenizer(cfg.model, "tiny")
    start = logits_of(model)
    reference = ReferencePolicy(model, cfg, cfg.pipeline[1], lora=False)  # before the engine partitions `model`
    engine = build_engine(model, cfg.pipeline[1], cfg)
    for _ in range(2):
        train_one_step(engine)
    with reference.forward_model(engine) as ref:
        assert torch.allclose(logits_of(ref), start, atol=1e-6)
        assert not any(p.requires_grad for p in ref.parameters())
    saved = reference.state_dict()
    assert all(v.numel() > 0 for v in saved.values())  # gathered, not ZeRO-3 shards
    fresh, _ = load_model_and_tokenizer(cfg.model, "tiny")
    restored = ReferencePolicy(fresh, cfg, cfg.pipeline[1], lora=False, weights=saved)
    with restored.forward_model(engine) as ref:
        assert torch.allclose(logits_of(ref), start, atol=1e-6)


def test_the_reference_takes_the_dtype_deepspeed_gives_the_policy():
    """DeepSpeed's bf16 engine casts the policy's parameters (not its buffers) to bf16: the reference copy is
    cast the same way, so at the stage's first step the policy and the reference compute the same log-probs
    and the KL term is 0 (an fp32 reference would differ by bf16's rounding)."""
    from orchestrator.engine.reference import engine_dtype
    from orchestrator.methods.grpo import kl_estimate
    from orchestrator.modeling.forward import token_logprobs

    cfg = cfg_for(2)
    assert engine_dtype(cfg, cfg.pipeline[1]) == torch.float32  # CPU: fp32
    gpu = load_run_config(overrides=["scaling.use_gpu=true", "deepspeed.precision=bf16", "pipeline=grpo:ccc"])
    assert engine_dtype(gpu, gpu.pipeline[0]) == torch.bfloat16
    model, _ = load_model_and_tokenizer(cfg.model, "tiny")
    reference = ReferencePolicy(model, cfg, cfg.pipeline[1], lora=False, dtype=torch.bfloat16)
    with reference.forward_model(None) as ref:
        assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
        assert {b.dtype for b in ref.buffers()} == {b.dtype for b in model.buffers()}  # buffers as they were
        policy = copy.deepcopy(model)
        for p in policy.parameters():  # what DeepSpeed's bf16 engine does to the policy
            p.data = p.data.to(torch.bfloat16)
        mask = torch.ones_like(INPUT)
        with torch.no_grad():
            kl = kl_estimate(token_logprobs(policy, INPUT, mask), token_logprobs(ref, INPUT, mask), "k3")
            fp32_kl = kl_estimate(token_logprobs(policy, INPUT, mask), token_logprobs(model, INPUT, mask), "k3")
    assert torch.equal(kl, torch.zeros_like(kl))
    assert fp32_kl.abs().max() > 0  # the fp32 start weights would not match the bf16 policy


def test_gathered_state_dict_matches_the_unpartitioned_weights():
    cfg = cfg_for(3)
    model, _ = load_model_and_tokenizer(cfg.model, "tiny")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    engine = build_engine(model, cfg.pipeline[0], cfg)
    state = gathered_state_dict(engine)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
