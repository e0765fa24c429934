"""The per-step guard of stages/guards.py on real DeepSpeed engines (one process): a non-finite loss fails
the run naming the stage and step, or skips the update leaving every weight as it was; a requested stop
checkpoints the step and stops."""

import json
from types import SimpleNamespace

import pytest
import torch

from orchestrator.config import load_run_config
from orchestrator.engine.checkpoints import STATE_FILE
from orchestrator.stages.guards import SKIPPED_METRIC, STOPPED_METRIC, NonFiniteError, StepGuard, StopRequested


def engine_and_ctx(zero_stage: int, policy: str, stop=None, grad_accum: int = 1):
    from orchestrator.engine.deepspeed import build_engine
    from orchestrator.modeling.models import load_model_and_tokenizer

    cfg = load_run_config(overrides=[
        f"deepspeed.zero_stage={zero_stage}", "deepspeed.shared_memory_grads=false", "model.tiny.hidden_size=32",
        "model.tiny.intermediate_size=64", "pipeline=sft:ce", f"pipeline.0.grad_accum={grad_accum}",
        "pipeline.0.lr=1e-2", "pipeline.0.warmup_steps=0", f"guard.on_nonfinite={policy}",
        "checkpoint.every_steps=100", "tracking.log_every=1",
    ])
    model, tokenizer = load_model_and_tokenizer(cfg.model, "tiny")
    engine = build_engine(model, cfg.pipeline[0], cfg)
    logged, saved = [], []
    ctx = SimpleNamespace(
        cfg=cfg, stage_index=0, rank=0, world_size=1, device=torch.device("cpu"), stop=stop, global_step_offset=40,
        log=lambda metrics, step: logged.append((step, metrics)),
        log_due=lambda done, total: True, checkpoint_due=lambda done, total: done % 100 == 0 or done == total,
        checkpoint=lambda engine, done, metrics, reference=None: saved.append((done, metrics)),
        stopwatch=lambda phase: __import__("contextlib").nullcontext(),
    )
    ids = torch.tensor([tokenizer.encode("<answer>42</answer>", add_special_tokens=False)])
    return engine, ctx, ids, logged, saved


def weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def train_step(engine, guard, ids, poison: bool) -> None:
    """One update through the guard; `poison` makes this step's loss NaN (and so its gradients)."""
    loss = engine(input_ids=ids, labels=ids).loss
    if poison:
        loss = loss * float("nan")
    engine.backward(loss)
    guard.optimizer_step(engine, loss.detach())


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_nonfinite_loss_fails_the_run_naming_the_stage_and_step(process_group, zero_stage):
    engine, ctx, ids, _, _ = engine_and_ctx(zero_stage, "fail")
    guard = StepGuard.for_stage(ctx, ctx.cfg.pipeline[0], start_step=2, resume_dir=None)
    with pytest.raises(NonFiniteError, match=r"non-finite .* in stage 0 \(sft:ce\) at step 3 \(global step 43\)"):
        train_step(engine, guard, ids, poison=True)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_skip_step_leaves_every_weight_as_it_was_and_counts_the_skip(process_group, zero_stage):
    engine, ctx, ids, logged, _ = engine_and_ctx(zero_stage, "skip_step")
    guard = StepGuard.for_stage(ctx, ctx.cfg.pipeline[0], start_step=0, resume_dir=None)
    before = weights(engine)
    train_step(engine, guard, ids, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(engine)))  # no update, no NaN in the weights
    assert guard.skipped == 1
    guard.end_step(engine, 1, 10)
    assert logged == [(41, {SKIPPED_METRIC: 1.0})]
    train_step(engine, guard, ids, poison=False)  # the next finite step trains as usual
    after = weights(engine)
    assert not all(torch.equal(a, b) for a, b in zip(before, after)) and all(torch.isfinite(w).all() for w in after)
    assert guard.skipped == 1


def test_a_gradient_norm_that_deepspeed_finds_nonfinite_fails_under_fail(process_group):
    """A finite loss whose gradients are not (ZeRO-2: DeepSpeed skips such an update and counts it)."""
    engine, ctx, ids, _, _ = engine_and_ctx(2, "fail")
    guard = StepGuard.for_stage(ctx, ctx.cfg.pipeline[0], start_step=0, resume_dir=None)
    loss = engine(input_ids=ids, labels=ids).loss
    loss.register_hook(lambda grad: grad * float("inf"))  # the backward pass overflows, the loss does not
    engine.backward(loss)
    with pytest.raises(NonFiniteError, match="non-finite gradient norm in stage 0"):
        guard.optimizer_step(engine, loss.detach())


def test_accumulated_micro_batches_are_judged_together_at_the_update(process_group):
    engine, ctx, ids, _, _ = engine_and_ctx(0, "skip_step", grad_accum=2)
    guard = StepGuard.for_stage(ctx, ctx.cfg.pipeline[0], start_step=0, resume_dir=None)
    before = weights(engine)
    train_step(engine, guard, ids, poison=True)  # the first micro-batch: no update yet, nothing decided
    assert guard.skipped == 0
    train_step(engine, guard, ids, poison=False)
    assert guard.skipped == 1 and all(torch.equal(a, b) for a, b in zip(before, weights(engine)))


def test_a_requested_stop_checkpoints_the_step_then_stops(process_group):
    stop = SimpleNamespace(requested=lambda: True, reason="SIGTERM to the driver (pid 1)")
    engine, ctx, ids, _, saved = engine_and_ctx(0, "fail", stop=stop)
    guard = StepGuard.for_stage(ctx, ctx.cfg.pipeline[0], start_step=6, resume_dir=None)
    train_step(engine, guard, ids, poison=False)
    with pytest.raises(StopRequested, match=r"SIGTERM to the driver \(pid 1\): stopped after stage 0 step 7"):
        guard.end_step(engine, 7, 30)
    assert saved == [(7, {"train/step": 47.0, SKIPPED_METRIC: 0.0, STOPPED_METRIC: 47.0})]


def test_no_stop_means_checkpoints_only_when_due(process_group):
    stop = SimpleNamespace(requested=lambda: False, reason=None)
    engine, ctx, ids, _, saved = engine_and_ctx(0, "fail", stop=stop)
    guard = StepGuard.for_stage(ctx, ctx.cfg.pipeline[0], start_step=0, resume_dir=None)
    train_step(engine, guard, ids, poison=False)
    guard.end_step(engine, 1, 30)
    assert saved == [] and guard.step == 1


def test_the_skipped_count_continues_from_the_checkpoint_of_the_same_stage(tmp_path):
    from orchestrator.stages.guards import skipped_before

    (tmp_path / STATE_FILE).write_text(json.dumps({"stage_index": 1, "step": 20, "skipped_steps": 3}))
    assert skipped_before(str(tmp_path), 1) == 3
    assert skipped_before(str(tmp_path), 2) == 0 and skipped_before(None, 1) == 0
