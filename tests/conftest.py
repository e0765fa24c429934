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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback (moto's server, one per test session): {endpoint, the AWS variables}. Each
    test takes its own bucket through `s3_bucket`."""
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    port = free_ports(1)[0]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "moto_server did not start"
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    yield env
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture()
def s3_bucket(s3_server, monkeypatch, request):
    """s3://BUCKET for this test (the AWS variables set in this process), on the session's S3 server."""
    import re
    import uuid

    import boto3

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}"
