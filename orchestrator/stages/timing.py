"""Wall-clock phases of a run, summed per phase."""

from __future__ import annotations

import contextlib
import sys
import time


def synchronize_cuda() -> None:
    """Wait for the GPU work queued so far. CUDA kernels run asynchronously: without this, a phase's time
    holds the launches of its kernels, and their execution lands in whichever later phase waits for them.
    A no-op in a process that has not started CUDA (every CPU run), and torch is never imported for it."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Stopwatch:
    """Seconds per phase, summed: `with watch("phase"):` adds the block's wall time to timings[phase],
    `watch.add(phase, s)` a duration measured elsewhere. Runs log them as time/<phase>_s. On a GPU the block
    starts and ends with the device's queue drained, so each phase is charged with its own kernels."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    def add(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, phase: str):
        synchronize_cuda()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize_cuda()
            self.add(phase, time.perf_counter() - t0)


def device_memory_metrics(device) -> dict[str, float]:
    """The most GPU memory this process's tensors held at once (`gpu/peak_allocated_gib`) and torch's caching
    allocator reserved (`gpu/peak_reserved_gib`) on `device`; nothing for a CPU device."""
    if getattr(device, "type", "cpu") != "cuda":
        return {}
    import torch

    gib = float(2**30)
    return {"gpu/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "gpu/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib}
