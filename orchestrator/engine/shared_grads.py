"""Gradient averaging through shared memory, for data-parallel CPU workers on one machine.

On CPU, DeepSpeed averages the workers' gradients with gloo, which goes over TCP loopback even when
every worker runs on the same machine: the copies pass through the kernel, and gloo's threads take CPU
time the workers' compute needs. Workers on one machine can instead each write their gradients into a
row of one shared-memory file, meet at a barrier, and each sum the same rows in the same order: the
same average on every worker (bitwise), at memory speed. The barrier itself goes through the file too
(`SharedGradients.wait_for_every_worker`): gloo's costs a sleep and a wake-up per step.

`build_engine` uses it for ZeRO-0 on CPU when every worker of the group runs on this machine and the
shared-memory folder has room (`deepspeed.shared_memory_grads`, default on); DeepSpeed's own all-reduce
is then switched off for that engine, and `optimizer_step` averages before each optimizer step. ZeRO-1/2/3
partition gradients themselves and keep DeepSpeed's collectives."""

from __future__ import annotations

import mmap
import os
import platform
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
FILE_PREFIX = "orchestrator-grads-"
BYTES_PER_GRADIENT = 4  # fp32: the CPU path trains in fp32
CACHE_LINE = 64  # each worker's arrival count on a line of its own: no worker's write evicts another's


# x86-64 makes a process's stores visible to others in program order: a worker that reads another's
# arrival count also reads the row written before it (copies that use non-temporal stores, as glibc's
# memcpy does for large ones, end with a fence of their own). Other CPUs would need a fence Python cannot
# issue, so there the barrier stays gloo's.
SPIN_BARRIER = platform.machine().lower() in ("x86_64", "amd64")
YIELD_SECONDS = 1.0  # a wait longer than this (a checkpoint on one worker) polls every millisecond instead
BARRIER_TIMEOUT_S = 1800.0  # torch.distributed's default timeout: a worker that never comes is an error


def workers_share_this_machine() -> bool:
    """Whether every worker of the default process group runs on this machine (a collective call)."""
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return len(set(hosts)) == 1


def shared_memory_room(numel: int, world: int, folder: Path = SHM_DIR) -> bool:
    """Whether `folder` can hold the double buffer of `world` rows of `numel` fp32 gradients, with a
    quarter of its free space to spare (containers often give /dev/shm 64 MB)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    free = stats.f_bavail * stats.f_frsize
    return 2 * world * numel * BYTES_PER_GRADIENT <= 0.75 * free


def shared_gradients_for(params, folder: Path = SHM_DIR) -> "SharedGradients | None":
    """A SharedGradients for `params` when every worker runs on this machine and `folder` has room on
    every worker, else None (DeepSpeed's all-reduce stays). A collective call: every worker makes it."""
    numel = sum(p.numel() for p in params if p.requires_grad)
    fits = torch.tensor([int(shared_memory_room(numel, dist.get_world_size(), folder))])
    dist.all_reduce(fits, op=dist.ReduceOp.MIN)
    if not (workers_share_this_machine() and int(fits)):
        return None
    return SharedGradients(params, folder)


class SharedGradients:
    """The gradients of `params`, averaged over the default process group through one shared file.

    Two buffers used in turn: a worker writes step s's row into buffer s % 2 only after the barrier of
    step s-1, which every worker reaches only after it has read step s-2 from that same buffer, so one
    barrier per step is enough. The file is unlinked as soon as every worker has mapped it: nothing is
    left in the folder however the run ends."""

    def __init__(self, params, folder: Path = SHM_DIR):
        self.params = [p for p in params if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        name = [f"{FILE_PREFIX}{uuid.uuid4().hex}" if self.rank == 0 else None]
        dist.broadcast_object_list(name, src=0)
        path = Path(folder) / name[0]
        size = 2 * self.world * self.numel
        header = -(-self.world * CACHE_LINE // mmap.PAGESIZE) * mmap.PAGESIZE  # the arrival counts, then the rows
        if self.rank == 0:
            with open(path, "wb") as f:
                f.truncate(header + size * BYTES_PER_GRADIENT)
        dist.barrier()
        with open(path, "r+b") as f:
            self._mapping = mmap.mmap(f.fileno(), header + size * BYTES_PER_GRADIENT)
        counts = np.frombuffer(self._mapping, dtype=np.int64, count=self.world * CACHE_LINE // 8)
        self.arrivals = counts.reshape(self.world, -1)[:, 0]  # a view: worker r writes entry r only
        self.buffers = torch.frombuffer(self._mapping, dtype=torch.float32, count=size, offset=header)
        self.buffers = self.buffers.view(2, self.world, self.numel)
        dist.barrier()
        if self.rank == 0:
            path.unlink()
        self.turn = 0
        self.barriers_passed = 0

    def wait_for_every_worker(self) -> None:
        """A barrier through the shared file: post this worker's arrival count, then poll until every
        worker has posted it. Gloo's barrier sleeps, and waking a sleeping worker costs a millisecond or
        more on a VM, a large share of a small model's step; polling with sched_yield never sleeps yet
        lets any other runnable process on this CPU go first."""
        if not SPIN_BARRIER:
            dist.barrier()
            return
        self.barriers_passed += 1
        self.arrivals[self.rank] = self.barriers_passed
        started = time.monotonic()
        while self.arrivals.min() < self.barriers_passed:
            waited = time.monotonic() - started
            if waited < YIELD_SECONDS:
                os.sched_yield()
            elif waited < BARRIER_TIMEOUT_S:
                time.sleep(0.001)
            else:
                missing = [r for r in range(self.world) if self.arrivals[r] < self.barriers_passed]
                raise RuntimeError(f"gradient average: workers {missing} did not reach step barrier "
                                   f"{self.barriers_passed} within {BARRIER_TIMEOUT_S:.0f} s")

    def average_(self) -> None:
        """Replace each parameter's gradient by its mean over the workers (a missing one counts as 0).
        Each worker writes its gradient already divided by the number of workers (exact for 2, 4, 8...):
        the sum of the rows is then the mean, without a pass to divide it."""
        rows = self.buffers[self.turn]
        mine = rows[self.rank]
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                mine[offset : offset + n].zero_()
            else:
                torch.mul(p.grad.reshape(-1), 1.0 / self.world, out=mine[offset : offset + n])
            offset += n
        self.wait_for_every_worker()  # every worker's row is written
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p, dtype=torch.float32)
            # Every worker adds the same rows in the same order, straight into its gradient (elementwise
            # adds: several times faster than a reduction over the rows' dimension).
            part, grad = rows[:, offset : offset + n], p.grad.view(-1)
            if self.world == 1:
                grad.copy_(part[0])
            else:
                torch.add(part[0], part[1], out=grad)
                for k in range(2, self.world):
                    grad.add_(part[k])
            offset += n
        self.turn ^= 1
