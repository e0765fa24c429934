"""Gradients averaged through shared memory: the mean over the workers, bitwise the same on every worker,
the same as gloo's all-reduce; nothing left in the folder; no room or several machines: not used."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_ports

from orchestrator.engine.shared_grads import FILE_PREFIX, SharedGradients, shared_gradients_for, shared_memory_room

WORLD = 2


def worker_grads(rank: int, step: int) -> list[torch.Tensor | None]:
    """Different gradients per worker and step; the last parameter has none on rank 1 at odd steps."""
    g = torch.Generator().manual_seed(100 * step + rank)
    grads = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g), torch.randn(2, 2, generator=g)]
    if rank == 1 and step % 2:
        grads[2] = None
    return grads


def run_worker(rank: int, port: int, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((3, 5), (7,), (2, 2))]
    shared = shared_gradients_for(params, folder)
    assert shared is not None
    results = []
    for step in range(3):  # both buffers, then the first again
        for p, g in zip(params, worker_grads(rank, step)):
            p.grad = None if g is None else g.clone()
        shared.average_()
        by_gloo = [torch.zeros_like(p) if g is None else g.clone() for p, g in zip(params, worker_grads(rank, step))]
        for t in by_gloo:
            dist.all_reduce(t)
            t.div_(WORLD)
        results.append(([p.grad.clone() for p in params], by_gloo))
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_workers_get_the_mean_gradient_and_leave_no_file(tmp_path):
    folder, out = tmp_path / "shm", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    mp.start_processes(run_worker, args=(free_ports(1)[0], str(folder), str(out)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    for step in range(3):
        expected = []
        for i in range(3):
            rows = [worker_grads(r, step)[i] for r in range(WORLD)]
            rows = [torch.zeros_like(rows[0]) if g is None else g for g in rows]
            expected.append((rows[0] + rows[1]) / 2)
        for rank in range(WORLD):
            shared, by_gloo = ranks[rank][step]
            for got, want, gloo in zip(shared, expected, by_gloo):
                assert torch.allclose(got, want, atol=1e-7)
                assert torch.allclose(got, gloo, atol=1e-6)
        for a, b in zip(ranks[0][step][0], ranks[1][step][0]):
            assert torch.equal(a, b)  # every worker steps from the same gradients
    assert not [f for f in os.listdir(folder) if f.startswith(FILE_PREFIX)]


def test_no_room_no_shared_memory(tmp_path):
    assert shared_memory_room(1000, 2, tmp_path)
    assert not shared_memory_room(10**15, 2, tmp_path)
    assert not shared_memory_room(1000, 2, tmp_path / "missing")


def test_workers_on_other_machines_keep_deepspeeds_all_reduce(tmp_path, monkeypatch, process_group):
    """In the session's one-process group the host check sees one machine; patched, it sees several."""
    import orchestrator.engine.shared_grads as shared_grads

    monkeypatch.setattr(shared_grads, "workers_share_this_machine", lambda: False)
    assert shared_gradients_for([torch.nn.Parameter(torch.zeros(4))], tmp_path) is None
    monkeypatch.undo()
    made = shared_gradients_for([torch.nn.Parameter(torch.zeros(4))], tmp_path)
    assert isinstance(made, SharedGradients) and not os.listdir(tmp_path)


def test_the_barrier_names_workers_that_never_come(tmp_path, monkeypatch, process_group):
    """A worker that never posts its arrival: the others give up after the timeout, naming it."""
    import numpy as np

    import orchestrator.engine.shared_grads as shared_grads

    if not shared_grads.SPIN_BARRIER:
        pytest.skip("this CPU keeps gloo's barrier")
    monkeypatch.setattr(shared_grads, "YIELD_SECONDS", 0.01)
    monkeypatch.setattr(shared_grads, "BARRIER_TIMEOUT_S", 0.05)
    shared = SharedGradients([torch.nn.Parameter(torch.zeros(4))], tmp_path)
    shared.wait_for_every_worker()  # alone: nobody to wait for
    shared.world, shared.arrivals = 3, np.array([1, 0, 1])  # as if workers 1 and 2 existed, 1 late
    shared.arrivals[2] = 2
    with pytest.raises(RuntimeError, match=r"workers \[1\] did not reach step barrier 2 within"):
        shared.wait_for_every_worker()


def test_other_cpus_keep_gloos_barrier(tmp_path, monkeypatch, process_group):
    import orchestrator.engine.shared_grads as shared_grads

    monkeypatch.setattr(shared_grads, "SPIN_BARRIER", False)
    calls = []
    monkeypatch.setattr(shared_grads.dist, "barrier", lambda: calls.append(1))
    param = torch.nn.Parameter(torch.zeros(4))
    shared = SharedGradients([param], tmp_path)
    param.grad = torch.arange(4.0)
    calls.clear()
    shared.average_()
    assert calls == [1] and torch.equal(param.grad, torch.arange(4.0)) and shared.barriers_passed == 0


def test_an_engine_keeps_its_shared_gradients_outside_deepspeeds_object(tmp_path, monkeypatch, process_group):
    """build_engine keeps an engine's SharedGradients in engine.deepspeed (`shared_gradients_of`), not on
    DeepSpeed's object, and turns DeepSpeed's all-reduce off; optimizer_step averages through it once a
    step. One worker: the mean is the gradient itself, so the weights follow an engine left to DeepSpeed."""
    import copy
    import functools

    import orchestrator.engine.deepspeed as engines
    import orchestrator.engine.shared_grads as shared_grads
    from orchestrator.config import load_run_config
    from orchestrator.modeling.models import build_digit_tokenizer, load_model_and_tokenizer

    cfg = load_run_config(overrides=[
        "deepspeed.zero_stage=0", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
        "pipeline=sft:ce", "pipeline.0.grad_accum=1", "pipeline.0.lr=1e-2",
    ])
    stage = cfg.pipeline[0]
    model, _ = load_model_and_tokenizer(cfg.model, "tiny")
    by_deepspeed = engines.build_engine(copy.deepcopy(model), stage, cfg)
    monkeypatch.setattr(engines, "uses_shared_memory_grads", lambda cfg: True)
    in_tmp = functools.partial(shared_grads.shared_gradients_for, folder=tmp_path)  # whatever /dev/shm's room
    monkeypatch.setattr(engines, "shared_gradients_for", in_tmp)
    start = [p.detach().clone() for p in model.parameters()]
    by_shared_memory = engines.build_engine(model, stage, cfg)

    shared = engines.shared_gradients_of(by_shared_memory)
    assert isinstance(shared, SharedGradients) and engines.shared_gradients_of(by_deepspeed) is None
    assert "shared_gradients" not in vars(by_shared_memory)
    assert by_shared_memory.enable_backward_allreduce is False and by_deepspeed.enable_backward_allreduce is True
    averages = []
    average = shared.average_
    monkeypatch.setattr(shared, "average_", lambda: (averages.append(1), average()))
    ids = torch.tensor([build_digit_tokenizer().encode("<answer>42</answer>", add_special_tokens=False)])
    for engine in (by_deepspeed, by_shared_memory):
        for _ in range(2):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engines.optimizer_step(engine)
    assert len(averages) == 2
    trained = list(by_shared_memory.module.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(start, trained))
    for p, q in zip(by_deepspeed.module.parameters(), trained):
        assert torch.equal(p, q)
