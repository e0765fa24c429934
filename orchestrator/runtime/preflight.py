"""Every check that bad input can fail, run by the driver before Ray starts a worker."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError, RunConfig, resolve_storage
from orchestrator.data import build_dataset
from orchestrator.methods.answers import answer_decimals, format_answer
from orchestrator.modeling.models import (
    load_tokenizer,
    resolve_source,
)
from orchestrator.tracking.conventions import resolve_tracking_uri
from orchestrator.tracking.runs import check_tracking_store


def check_package_versions() -> None:
    """The packages whose internals orchestrator/compat.py patches are the versions it was written for:
    importing it checks, and a mismatch is refused here, before Ray starts, rather than in every worker."""
    try:
        import orchestrator.compat  # noqa: F401
    except RuntimeError as exc:  # compat.UntestedVersionError, raised by the import itself
        raise ConfigError(str(exc)) from None


def answer_token_length(tokenizer, label_min: float, label_max: float, label_step: float = 1.0) -> int:
    """Tokens of the longest answer in the label range, written as SFT writes it (at the label step's
    decimals), end-of-turn included."""
    decimals = answer_decimals(label_step)
    return 1 + max(
        len(tokenizer.encode(format_answer(v, decimals), add_special_tokens=False)) for v in (label_min, label_max)
    )


def check_generation_budgets(cfg: RunConfig, tokenizer, label_min: float, label_max: float,
                             label_step: float = 1.0) -> None:
    """Refuse a max_new_tokens that cannot hold the answer: every sample would be a parse failure.
    A pipeline ending in sft:rvtc answers through its head at evaluation, so only its GRPO budgets count
    (it has none: rvtc is last). The tokenizer of a vision-language source answers in the same text."""
    needed = answer_token_length(tokenizer, label_min, label_max, label_step)
    ends_in_head = bool(cfg.pipeline) and cfg.pipeline[-1].answers_through_head()
    budgets = [] if ends_in_head else [("eval.max_new_tokens", cfg.eval.max_new_tokens)]
    budgets += [
        (f"pipeline.{i}.max_new_tokens", s.max_new_tokens) for i, s in enumerate(cfg.pipeline) if s.kind == "grpo"
    ]
    for field, value in budgets:
        if value < needed:
            answer = format_answer(label_max, answer_decimals(label_step))
            raise ConfigError(
                f"{field}={value} cannot hold the answer {answer!r}: it takes {needed} tokens "
                f"(end of turn included) with this model's tokenizer; set {field}>={needed}"
            )


def check_rewards(cfg: RunConfig) -> None:
    """Every GRPO reward term must resolve (a registered name or an importable module:function)."""
    from orchestrator.methods.rewards import resolve_reward

    for i, stage in enumerate(cfg.pipeline):
        for j, term in enumerate(getattr(stage, "rewards", [])):
            try:
                resolve_reward(term.name)
            except ValueError as exc:
                raise ConfigError(f"pipeline.{i}.rewards.{j}.name: {exc}") from None


# What `from_pretrained` reads weights from (safetensors first; a .bin only through torch.load(weights_only=True)).
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)


def check_storage(cfg: RunConfig) -> None:
    """A local storage_path must be a folder that can be created: Ray Train would otherwise fail on it only
    after the cluster has started and the MLflow run exists. Remote URIs are Ray Train's to check."""
    storage = resolve_storage(cfg.storage_path)
    if "://" in storage:
        return
    path = Path(storage)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"storage_path {cfg.storage_path!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"storage_path {cfg.storage_path!r}: {existing} is not writable")


def check_model_source(cfg: RunConfig, model_source: str, dataset) -> None:
    """Refuse here what every worker would refuse after Ray has started: a text-only model on a dataset of
    images, and a local directory that is not a loadable model for this task (config.json unreadable or
    without model_type, an architecture that is not a causal LM, or a vision-language model of a kind this
    project drives; no weights). Models built here or packaged are known good; a hub id is checked where
    it downloads."""
    from orchestrator.config import VLM_SMOLLM2_SOURCE
    from orchestrator.modeling.models import SMOLLM2_SOURCE, ModelError, vision_kind

    kind = vision_kind(cfg.model, model_source)
    if dataset.has_images and kind is None:
        raise ConfigError(
            f"dataset {dataset.meta['name']!r} has images but model.source={cfg.model.source!r} is text-only; "
            "use a vision-language source (model.tiny.architecture=qwen2-vl|smolvlm, smolvlm-smollm2-135m)"
        )
    path = Path(model_source)
    if cfg.model.source in ("tiny", SMOLLM2_SOURCE, VLM_SMOLLM2_SOURCE) or not path.is_dir():
        return
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model path {path}: config.json is not readable JSON ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ModelError(f"model path {path}: config.json names no model_type; is it a Hugging Face model directory?")
    if not (cfg.model.trust_remote_code and "auto_map" in config):  # custom code declares its own classes
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        )

        if model_type not in CONFIG_MAPPING_NAMES:
            hint = ""
            if "auto_map" in config:
                hint = " (it ships its own code; set model.trust_remote_code=true only if you trust it)"
            raise ModelError(f"model path {path}: model_type {model_type!r} is unknown to transformers{hint}")
        if kind is not None and model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise ModelError(f"model path {path} holds a {model_type!r} model, not a vision-language model")
        if kind is None and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ModelError(
                f"model path {path} holds a {model_type!r} model, which is not a causal language model "
                "(AutoModelForCausalLM cannot load it); the policy generates its answers, so it must be one"
            )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"model path {path} has no weights: none of {', '.join(WEIGHT_FILES)}")


def check_ray_address(timeout_s: float = 5.0) -> None:
    """$RAY_ADDRESS must answer: `ray.init` waits on an address where nothing listens for minutes, and it
    runs after the MLflow run is created. `auto`/`local` and a driver already connected are left to Ray."""
    import socket

    address = (os.environ.get("RAY_ADDRESS") or "").strip()
    if not address or address in ("auto", "local"):
        return
    ray = sys.modules.get("ray")  # not imported for the check alone
    if ray is not None and ray.is_initialized():
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"RAY_ADDRESS={address!r} is not host:port (or ray://host:port, auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"RAY_ADDRESS={address!r}: no Ray cluster answers at {host}:{port} ({exc.strerror or exc}); "
            "start one (infra/ray-head-start.sh) or unset RAY_ADDRESS for a local cluster"
        ) from None


def check_experiment(uri: str, name: str) -> None:
    """An experiment deleted in the MLflow UI keeps its name, and MLflow refuses new runs in it. A local
    store that does not exist yet is not created by this check."""
    from orchestrator.tracking.conventions import sqlite_path, tracking_client

    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return

    exp = tracking_client(uri).get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise ConfigError(
            f"tracking.experiment {name!r} was deleted in {uri}; restore it "
            f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or choose another name"
        )


# Filesystem types a folder may live on and still be the same folder on every node.
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "gpfs", "beegfs", "9p", "efs")


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts (longest mount point that contains it)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown"
    best, kind = "", "unknown"
    resolved = str(path.resolve())
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def cluster_spans_nodes(cfg: RunConfig) -> bool:
    """Whether the run's workers may run on another machine than this driver: the Ray cluster has more
    than one node, or (an autoscaling cluster still at its head) the workers need GPUs the head lacks."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        return True
    return cfg.scaling.use_gpu and not any(n.get("Resources", {}).get("GPU") for n in nodes)


def cluster_gpus() -> float | None:
    """The GPUs of the Ray cluster this process is connected to (None when Ray is not up here)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_can_grow() -> bool:
    """Whether the cluster may add nodes: one joined through RAY_ADDRESS may autoscale; one this driver (or the
    sweep whose trial this is) started itself is this machine alone (runtime.ray_setup.init_ray)."""
    from orchestrator.runtime.ray_setup import LOCAL_CLUSTER_ENV

    return os.environ.get(LOCAL_CLUSTER_ENV) != "1"


def check_gpu_workers(cfg: RunConfig, gpus: float | None, can_grow: bool) -> None:
    """Ray Train starts a run only once every worker has its GPU: on a cluster that cannot add nodes, more GPU
    workers than it has GPUs would wait forever, silently. A cluster that may autoscale is left to do so."""
    if not cfg.scaling.use_gpu or can_grow or gpus is None or cfg.scaling.num_workers <= gpus:
        return
    fix = f"set scaling.num_workers<={int(gpus)}" if gpus >= 1 else "set scaling.use_gpu=false"
    raise ConfigError(
        f"scaling.num_workers={cfg.scaling.num_workers} GPU workers, but this Ray cluster has {gpus:g} GPU(s) and "
        f"cannot add nodes (this process started it on this machine): Ray Train would wait for the missing GPUs "
        f"forever; {fix}, or join a cluster with more GPUs (RAY_ADDRESS)"
    )


def check_cluster(cfg: RunConfig, tracking_uri: str, spans_nodes: bool) -> None:
    """A run's GPU workers must fit a cluster that cannot grow (check_gpu_workers). On a cluster of several
    machines, everything the workers write must be reachable from every node: refused here, before any MLflow
    run is created, are a local tracking store, an experiment whose artifacts go to a file path, and a
    storage_path on this machine's own disk."""
    check_gpu_workers(cfg, cluster_gpus() if cfg.scaling.use_gpu else None, cluster_can_grow())
    if not spans_nodes:
        return
    from orchestrator.engine.storage import is_uri
    from orchestrator.tracking.conventions import sqlite_path, tracking_client

    server_hint = ("start a tracking server (infra/mlflow/start-server.sh) and set "
                   "MLFLOW_TRACKING_URI=http://HOST:5000; it serves the artifacts too")
    if sqlite_path(tracking_uri) is not None or not is_uri(tracking_uri) or tracking_uri.startswith("file:"):
        raise ConfigError(
            f"the MLflow store {tracking_uri} is a file on this machine, but the run's workers may run on other "
            f"nodes of the Ray cluster, which cannot write to it: {server_hint}"
        )
    exp = tracking_client(tracking_uri).get_experiment_by_name(cfg.tracking.experiment)
    root = exp.artifact_location if exp is not None else ""
    if root.startswith(("file:", "/")):
        raise ConfigError(
            f"experiment {cfg.tracking.experiment!r} keeps its artifacts at {root}, a folder that each node would "
            "write on its own disk; use a new experiment (tracking.experiment=...) on a server started with "
            "--serve-artifacts (infra/mlflow/start-server.sh), whose experiments get mlflow-artifacts: roots"
        )
    storage = resolve_storage(cfg.storage_path)
    if not is_uri(storage) and filesystem_type(Path(storage)) not in NETWORK_FILESYSTEMS:
        raise ConfigError(
            f"storage_path {cfg.storage_path!r} ({storage}) is on this machine's own disk "
            f"({filesystem_type(Path(storage))}), but the run's workers may run on other nodes: use s3://BUCKET/PREFIX "
            "or a network filesystem mounted at the same path on every node (NFS, EFS)"
        )


@dataclass
class PreparedRun:
    """What a run needs before Ray starts, each piece checked: the built dataset, a model source the
    workers can load, the tracking store."""

    cfg: RunConfig
    dataset: Any  # BuiltDataset
    model_source: str
    tracking_uri: str


def prepare_run(cfg: RunConfig) -> PreparedRun:
    """Every check that bad input can fail, and the (cached) data build; no training compute."""
    check_package_versions()
    check_rewards(cfg)
    check_ray_address()
    check_storage(cfg)
    built = build_dataset(cfg.data)
    model_source = resolve_source(cfg.model)
    check_model_source(cfg, model_source, built)
    check_generation_budgets(cfg, load_tokenizer(cfg.model, model_source), built.label_min, built.label_max,
                             built.label_step)
    uri = resolve_tracking_uri(cfg)
    check_tracking_store(uri)
    check_experiment(uri, cfg.tracking.experiment)
    return PreparedRun(cfg, built, model_source, uri)
