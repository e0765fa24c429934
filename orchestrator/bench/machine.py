"""The machine under the bench: its CPUs, its fp32 matmul peak and how busy it is."""

from __future__ import annotations

import os
import time
from pathlib import Path

from orchestrator.bench.arithmetic import matmul_flops_per_s


def describe_machine() -> str:
    """"<CPUs> CPUs, <CPU model name>"."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {cpu}"


def load_average() -> float:
    """The 1-minute load average: how much other work shares the CPUs."""
    return os.getloadavg()[0]


def matmul_peak(threads: int, n: int = 1024, repeats: int = 10) -> dict[str, float]:
    """The fp32 matmul FLOP/s of the fastest of `repeats` n×n matmuls on `threads` threads."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            torch.matmul(a, b)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
    return {"peak": matmul_flops_per_s(n, best), "matmul_n": n, "repeats": repeats}


def gpu_matmul_peak(n: int = 8192, repeats: int = 10, warmups: int = 3) -> dict[str, float]:
    """The bf16 matmul FLOP/s of the current GPU: the mean of `repeats` n×n products (random data) after
    `warmups`, timed between synchronisations."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmups):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeats
    del a, b
    torch.cuda.empty_cache()
    return {"peak": matmul_flops_per_s(n, seconds), "matmul_n": n, "repeats": repeats, "dtype": "bf16"}


def device_peak(device: str, threads: int) -> dict[str, float]:
    """The matmul peak the bench compares against: bf16 on a GPU, fp32 on the CPUs."""
    return gpu_matmul_peak() if device == "cuda" else matmul_peak(threads)


def describe_gpu() -> str | None:
    """"<GPU name>, <memory> GiB" of the current GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"


def better_peak(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The peak measured before and after the bench: the better of the two is the less contended."""
    return {**before, "peak": max(before["peak"], after["peak"]), "repeats": before["repeats"] + after["repeats"]}
