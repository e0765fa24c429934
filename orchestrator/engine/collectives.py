"""Collectives over the worker group; no-ops outside a process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum scalars across workers in one collective (no-op outside a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
