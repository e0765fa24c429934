"""What a GPU run changes, checked on CPU: phase timings synchronised with the device where CUDA runs (and
untouched where it does not), the precision a run resolves to, and the settings that only CPU runs get."""

import sys

import pytest
import torch

from orchestrator.stages import timing


def fake_cuda(monkeypatch, initialized: bool) -> list[str]:
    """torch.cuda as the Stopwatch sees it, recording each synchronize."""
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    return calls


def test_a_phase_on_a_gpu_starts_and_ends_with_the_device_queue_drained(monkeypatch):
    calls = fake_cuda(monkeypatch, initialized=True)
    timings: dict[str, float] = {}
    watch = timing.Stopwatch(timings)
    with watch("logprobs"):
        calls.append("work")
    assert calls == ["sync", "work", "sync"]
    assert timings["logprobs"] >= 0.0


def test_a_phase_where_cuda_never_started_does_not_synchronize(monkeypatch):
    calls = fake_cuda(monkeypatch, initialized=False)
    timings: dict[str, float] = {}
    with timing.Stopwatch(timings)("generation"):
        pass
    with timing.Stopwatch(timings)("generation"):
        pass
    assert calls == [] and set(timings) == {"generation"}


def test_the_stopwatch_never_imports_torch_itself(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as in a process that never imported torch
    timings: dict[str, float] = {}
    with timing.Stopwatch(timings)("prepare"):
        pass
    assert "prepare" in timings



# --------------------------------------------------------------------------- the precision a run resolves to


def gpu_config(precision: str = "auto", zero_stage: int = 2):
    from orchestrator.config import load_run_config

    return load_run_config(overrides=["scaling.use_gpu=true", f"deepspeed.precision={precision}",
                                      f"deepspeed.zero_stage={zero_stage}", "pipeline=sft:ce"])


def test_auto_precision_is_bf16_on_a_gpu_that_supports_it_and_fp32_elsewhere(monkeypatch):
    from orchestrator.config import DeepSpeedConfig
    from orchestrator.engine.deepspeed import resolved_precision, training_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolved_precision(DeepSpeedConfig(precision="auto"), use_gpu=True) == "bf16"
    assert resolved_precision(DeepSpeedConfig(precision="auto"), use_gpu=False) == "fp32"
    assert resolved_precision(DeepSpeedConfig(precision="fp32"), use_gpu=True) == "fp32"
    assert training_dtype(gpu_config("auto")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert training_dtype(gpu_config("auto")) == torch.float32


def test_bf16_engines_average_their_gradients_in_fp32(process_group):
    """DeepSpeed's own default for a bf16 engine is bf16 gradient communication."""
    from deepspeed.runtime.config import DeepSpeedConfig as ParsedDeepSpeedConfig

    from orchestrator.engine.deepspeed import deepspeed_json

    for zero_stage in (0, 2, 3):
        cfg = gpu_config("bf16", zero_stage)
        config = deepspeed_json(cfg.pipeline[0], cfg.deepspeed, use_gpu=True)
        assert config["bf16"]["enabled"] and config["communication_data_type"] == "fp32"
        assert ParsedDeepSpeedConfig(config).communication_data_type == torch.float32
    fp32 = gpu_config("fp32")
    assert "communication_data_type" not in deepspeed_json(fp32.pipeline[0], fp32.deepspeed, use_gpu=True)


def tiny_model():
    from orchestrator.config import ModelConfig
    from orchestrator.modeling.models import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelConfig(), "tiny")[0]


def test_a_zero_shot_cell_is_evaluated_in_the_dtype_trained_cells_are(monkeypatch):
    """Parameters cast to bf16 as DeepSpeed casts a trained cell's; buffers (RoPE's inv_freq) stay fp32."""
    from types import SimpleNamespace

    from orchestrator.stages.evaluation import in_training_precision

    model = tiny_model()
    evaluated = in_training_precision(SimpleNamespace(cfg=gpu_config("bf16")), model)
    assert {p.dtype for p in evaluated.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in evaluated.buffers() if b.is_floating_point()} == {torch.float32}
    fp32 = in_training_precision(SimpleNamespace(cfg=gpu_config("fp32")), tiny_model())
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    engine = SimpleNamespace(zero_optimization_stage=lambda: 2)
    assert in_training_precision(SimpleNamespace(cfg=gpu_config("bf16")), engine) is engine


def test_the_zero3_handoff_casts_parameters_to_the_trained_dtype_and_keeps_buffers_fp32():
    """The module a ZeRO-3 bf16 stage hands to the next one: bf16 parameters (the trained values), fp32 buffers
    (RoPE's inv_freq as built, which DeepSpeed never casts)."""
    from orchestrator.engine.handoff import unpartitioned_copy

    model = tiny_model()
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    copy = unpartitioned_copy(model, state)
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    floating_buffers = [b for b in copy.buffers() if b.is_floating_point()]
    assert floating_buffers and {b.dtype for b in floating_buffers} == {torch.float32}
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in state.items())
    reference = dict(tiny_model().named_buffers())
    assert all(torch.equal(b, reference[name]) for name, b in copy.named_buffers())


# --------------------------------------------------------------------------- GPU workers on a cluster that cannot grow


def test_more_gpu_workers_than_a_fixed_cluster_has_gpus_are_refused():
    from orchestrator.config import ConfigError
    from orchestrator.runtime.preflight import check_gpu_workers

    four = gpu_config().model_copy(update={"scaling": gpu_config().scaling.model_copy(update={"num_workers": 4})})
    with pytest.raises(ConfigError, match=r"num_workers=4 GPU workers, but this Ray cluster has 1 GPU.*"
                                          r"set scaling.num_workers<=1"):
        check_gpu_workers(four, gpus=1.0, can_grow=False)
    with pytest.raises(ConfigError, match=r"has 0 GPU.*set scaling.use_gpu=false"):
        check_gpu_workers(four, gpus=0.0, can_grow=False)
    check_gpu_workers(four, gpus=4.0, can_grow=False)  # they fit
    check_gpu_workers(four, gpus=0.0, can_grow=True)  # an autoscaling cluster adds its GPU nodes on demand
    check_gpu_workers(four, gpus=None, can_grow=False)  # Ray not up in this process: nothing to compare with
    cpu = four.model_copy(update={"scaling": four.scaling.model_copy(update={"use_gpu": False})})
    check_gpu_workers(cpu, gpus=0.0, can_grow=False)


class FakeRay:
    """`ray` as init_ray uses it, recording ray.init's keywords."""

    def __init__(self):
        self.calls: list[dict] = []

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.calls.append(kwargs)


def test_a_cluster_started_here_is_marked_fixed_for_the_driver_and_its_workers(monkeypatch):
    from orchestrator.runtime import ray_setup
    from orchestrator.runtime.preflight import cluster_can_grow

    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(ray_setup.LOCAL_CLUSTER_ENV, "0")  # restored (removed) after the test
    ray_setup.init_ray(num_cpus=2)
    assert fake.calls[-1]["address"] == "local"
    assert fake.calls[-1]["runtime_env"]["env_vars"][ray_setup.LOCAL_CLUSTER_ENV] == "1"  # Tune trials see it too
    assert not cluster_can_grow()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # joined: it may autoscale
    ray_setup.init_ray()
    assert ray_setup.LOCAL_CLUSTER_ENV not in fake.calls[-1]["runtime_env"]["env_vars"]
    assert cluster_can_grow()


def test_gpu_workers_keep_rays_thread_and_malloc_defaults(monkeypatch):
    from orchestrator.runtime.ray_setup import worker_env_vars

    gpu = worker_env_vars({}, use_gpu=True)
    assert not {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLIBC_TUNABLES"} & set(gpu)
    assert gpu["TOKENIZERS_PARALLELISM"] == "false"
    passed_on = worker_env_vars({"ORCHESTRATOR_UNTESTED_VERSIONS": "1"}, use_gpu=True)
    assert passed_on["ORCHESTRATOR_UNTESTED_VERSIONS"] == "1"
    cpu = worker_env_vars({})
    assert cpu["OMP_NUM_THREADS"] == "1" and "GLIBC_TUNABLES" in cpu
    from orchestrator.runtime import ray_setup

    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(ray_setup.LOCAL_CLUSTER_ENV, "0")
    ray_setup.init_ray(use_gpu=True)
    assert "OMP_NUM_THREADS" not in fake.calls[-1]["runtime_env"]["env_vars"]


def test_device_memory_is_reported_for_a_gpu_and_not_for_a_cpu(monkeypatch):
    from orchestrator.stages.timing import device_memory_metrics

    assert device_memory_metrics(torch.device("cpu")) == {}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 4 * 2**30)
    assert device_memory_metrics(torch.device("cuda", 0)) == {"gpu/peak_allocated_gib": 3.0,
                                                              "gpu/peak_reserved_gib": 4.0}


def test_an_sft_batch_goes_to_the_device_with_its_labels_left_on_the_host():
    """supervised_logits reads the labels to choose the positions that reach the LM head: on the host that read
    does not wait for the GPU."""
    from orchestrator.stages.sft import to_device

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.full((2, 3), -100)}
    moved = to_device(batch, torch.device("meta"))
    assert moved["input_ids"].device.type == "meta" and moved["labels"].device.type == "cpu"
    assert to_device(batch, None) is batch


def test_supervised_logits_pick_the_same_rows_as_a_boolean_mask_with_host_labels():
    from orchestrator.data.collate import collate_sft
    from orchestrator.modeling.forward import supervised_logits

    model = tiny_model()
    batch = collate_sft([([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), ([5, 6, 7], [-100, 6, 7])], pad_token_id=0)
    logits, labels = supervised_logits(model, batch, keep_only_supervised=True)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(logits, full[mask].float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, batch["labels"][:, 1:][mask])


# --------------------------------------------------------------------------- ZeRO-3 generation without its hooks


def zero3_engine():
    from orchestrator.config import load_run_config
    from orchestrator.engine.deepspeed import build_engine
    from orchestrator.modeling.models import load_model_and_tokenizer

    cfg = load_run_config(overrides=["deepspeed.zero_stage=3", "model.tiny.hidden_size=32",
                                     "model.tiny.intermediate_size=64", "pipeline=sft:ce", "pipeline.0.lr=1e-2"])
    model, tokenizer = load_model_and_tokenizer(cfg.model, "tiny")
    return build_engine(model, cfg.pipeline[0], cfg), tokenizer


def train_once(engine, ids) -> float:
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def test_zero3_generation_runs_without_deepspeeds_hooks_and_training_goes_on_as_before(process_group):
    """Inside full_parameters the ZeRO-3 module has no DeepSpeed hooks and generates what it generates with them;
    after it the hooks are back and the next training steps are those of an engine that never generated."""
    import deepspeed

    from orchestrator.engine.deepspeed import full_parameters
    from orchestrator.modeling.generation import generate

    engine, tokenizer = zero3_engine()
    offload = engine.optimizer.parameter_offload
    hooks = (len(offload.forward_hooks), len(offload.backward_hooks))
    assert hooks[0] > 0
    prompt = [tokenizer.encode("1939 | 71 min", add_special_tokens=False)]
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        with_hooks = generate(engine.module, tokenizer, prompt, max_new_tokens=6)
    with full_parameters(engine) as module:
        assert (len(offload.forward_hooks), len(offload.backward_hooks)) == (0, 0)
        without_hooks = generate(module, tokenizer, prompt, max_new_tokens=6)
    assert without_hooks == with_hooks
    assert (len(offload.forward_hooks), len(offload.backward_hooks)) == hooks
    ids = torch.tensor([tokenizer.encode("<answer>42</answer>", add_special_tokens=False)])
    fresh, _ = zero3_engine()
    assert [train_once(engine, ids) for _ in range(3)] == [train_once(fresh, ids) for _ in range(3)]
