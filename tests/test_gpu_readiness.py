"""What a GPU run changes, checked on CPU: phase timings synchronised with the device where CUDA runs (and
untouched where it does not), the precision a run resolves to, and the settings that only CPU runs get."""

import sys

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

