import os

# One thread per process on CPU (oversubscription makes small-model steps far slower), and keep
# every test's Ray/MLflow state inside its own temporary folders.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import socket  # noqa: E402

import pytest  # noqa: E402


def free_ports(n: int) -> list[int]:
    """n TCP ports on loopback that nothing listens on right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group, as Ray Train gives each worker, for tests that build DeepSpeed engines
    without Ray. Left up for the whole session: DeepSpeed caches the group, and a destroyed one breaks
    the engines of every later test module."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_ports(1)[0]), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
        import deepspeed.comm.comm as ds_comm
        import deepspeed.utils.groups as ds_groups

        ds_comm.cdb, ds_groups._WORLD_GROUP = None, None  # nothing cached from another group
    yield


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module (starting one costs seconds), shut down after it."""
    import ray

    from orchestrator.runtime.ray_setup import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()
