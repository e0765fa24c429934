"""Joining or starting the Ray cluster, and the worker processes' environment."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

# glibc's malloc hands freed blocks above its mmap threshold (at most 32 MB) back to the OS and page-faults
# them in again on the next allocation; a training step frees and re-allocates the same large tensors every
# step (the tied embedding gradient alone is 113 MB for SmolLM2-135M). Workers keep freed memory in one
# heap instead: one arena, because Ray Train runs the training loop in a thread of its own, whose arena
# cannot hold such blocks without mmap. With the loop in a thread this shortens a SmolLM2-135M SFT step by
# about a quarter and lowers its peak resident memory by about a fifth; the tiny model is unaffected.
WORKER_MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def worker_env_vars(environ: Mapping[str, str], use_gpu: bool = False) -> dict[str, str]:
    """Environment of the Ray worker processes: for CPU training, one compute thread unless a stage asks for
    more and the malloc setting above unless the user already chose GLIBC_TUNABLES (workers then inherit it);
    GPU workers keep Ray's defaults for both (their large tensors live in CUDA's allocator, and their host
    threads, NCCL's among them, would share one malloc arena). Always: the driver's permission to run
    untested package versions (workers on other nodes do not inherit it)."""
    from orchestrator.compat import UNTESTED_VERSIONS_ENV

    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not use_gpu:
        env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        if "GLIBC_TUNABLES" not in environ:
            env["GLIBC_TUNABLES"] = WORKER_MALLOC_TUNABLES
    for passed_on in (UNTESTED_VERSIONS_ENV, VERBOSE_ENV):
        if passed_on in environ:
            env[passed_on] = environ[passed_on]
    return env


VERBOSE_ENV = "ORCHESTRATOR_VERBOSE"  # set by --verbose: Ray's own INFO lines and every worker's output
# "1" in a driver that started its own Ray cluster, and in that cluster's workers (Tune trials start runs too):
# such a cluster is this machine alone and never adds a node. A cluster joined through RAY_ADDRESS may.
LOCAL_CLUSTER_ENV = "ORCHESTRATOR_LOCAL_CLUSTER"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def init_ray(num_cpus: int | None = None, worker_output: bool = True, use_gpu: bool = False) -> None:
    """Join $RAY_ADDRESS if set, else start a cluster of this process's own (`address="local"`: a head
    started earlier by infra/ray-head-start.sh, or left behind by one, is never joined by accident),
    dashboard on loopback only. `worker_output=False` leaves the workers' output in Ray's log files
    (a sweep shows its own view instead) unless --verbose. `use_gpu`: the workers train on GPUs (their
    environment, worker_env_vars)."""
    import ray

    if ray.is_initialized():
        return
    log_to_driver = worker_output or verbose()
    env = {"env_vars": worker_env_vars(os.environ, use_gpu)}
    if os.environ.get("RAY_ADDRESS"):
        os.environ.pop(LOCAL_CLUSTER_ENV, None)
        # Inside `ray job submit`, Ray refuses a driver runtime_env that sets an env var the job's
        # runtime_env (--runtime-env-json) also sets; the job's value wins.
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job_vars = (job_config.get("runtime_env") or {}).get("env_vars") or {}
        env = {"env_vars": {k: v for k, v in env["env_vars"].items() if k not in job_vars}}
        ray.init(runtime_env=env, log_to_driver=log_to_driver)
        return
    os.environ[LOCAL_CLUSTER_ENV] = env["env_vars"][LOCAL_CLUSTER_ENV] = "1"
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=256 * 1024 * 1024,
        # The dashboard serves Ray's State API, which Train V2's placement-group cleaner polls every
        # second (it logs a warning per poll without it); loopback only.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=env,
        log_to_driver=log_to_driver,
    )


def worker_logs_dir() -> str:
    """Where Ray keeps the workers' output (on each node, under the same path), once Ray is initialised."""
    import ray

    context = ray.get_runtime_context()
    return str(Path(context.get_temp_dir()) / context.get_session_name() / "logs")


# Ray Train V2 knobs for short runs on one machine (set unless the user set them): the controller polls
# its workers every 2 s by default, so a finished run can wait up to 2 s to be noticed; the preemption
# watcher is one more actor process per run, for spot-instance drains a local cluster never sees.
RAY_TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def configure_ray_train() -> None:
    for key, value in RAY_TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
