"""A run's storage as one filesystem, on a local folder and on a real S3 API (moto's server on loopback):
files, folders shipped with a manifest, checkpoint quarantine, the metrics spool, and what workers get."""

import json
from pathlib import Path

import pytest

from orchestrator.engine.checkpoints import STATE_FILE, quarantine_incomplete, verify_checkpoint, write_manifest
from orchestrator.engine.storage import MANIFEST, Storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "storage"))
    return Storage(request.getfixturevalue("s3_bucket") + "/runs")


def test_files_and_folders(storage):
    assert not storage.exists("a/b.txt") and storage.list("a") == []
    storage.write_text("one", "a", "b.txt")
    storage.write_text("two", "a", "b.txt")  # replaced whole
    assert storage.read_text("a/b.txt") == "two" and storage.size("a", "b.txt") == 3
    storage.write_bytes(b"xyz", "a", "sub", "c.bin")
    assert storage.list("a") == ["b.txt", "sub"] and storage.is_dir("a", "sub")
    assert storage.files("a") == {"b.txt": 3, "sub/c.bin": 3}
    storage.move("a/sub", "a/sub.moved")  # a folder: S3 cannot rename one, so it is copied then deleted
    assert storage.files("a") == {"b.txt": 3, "sub.moved/c.bin": 3}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.read_text("a", "nope.txt")
    storage.delete("a")
    assert not storage.exists("a") and storage.child("x", "y").uri() == storage.uri("x", "y")


def test_a_folder_ships_with_its_manifest_and_arrives_checked(storage, tmp_path):
    source = tmp_path / "source"
    (source / "deep").mkdir(parents=True)
    (source / "train.parquet").write_bytes(b"rows" * 100)
    (source / "deep" / "meta.json").write_text('{"name": "x"}')
    fingerprint = storage.upload_folder(source, "_shared", "data")
    manifest = json.loads(storage.read_text("_shared", "data", MANIFEST))
    assert set(manifest) == {"train.parquet", "deep/meta.json"} and manifest["train.parquet"]["size"] == 400
    copy = storage.download_folder(tmp_path / "copy", "_shared", "data")
    assert (copy / "train.parquet").read_bytes() == b"rows" * 100 and len(fingerprint) == 16
    storage.write_bytes(b"ROWS" * 100, "_shared", "data", "train.parquet")  # same size, other bytes
    with pytest.raises(OSError, match="train.parquet differs from the original"):
        storage.download_folder(tmp_path / "copy2", "_shared", "data")


def fake_checkpoint(folder: Path, world_size: int = 1) -> Path:
    (folder / "ckpt").mkdir(parents=True)
    (folder / "ckpt" / "model.pt").write_bytes(b"w" * 40)
    (folder / STATE_FILE).write_text(json.dumps({"stage_index": 0, "step": 5, "world_size": world_size}))
    write_manifest(folder, 0)
    return folder


def test_incomplete_checkpoints_are_set_aside_in_storage(storage, tmp_path):
    for name in ("checkpoint_1", "checkpoint_2"):
        storage.upload_folder(fake_checkpoint(tmp_path / name), "run", name)
    storage.write_bytes(b"w" * 7, "run", "checkpoint_2", "ckpt", "model.pt")  # cut short by a full disk
    assert verify_checkpoint(storage.child("run", "checkpoint_2")) == ["ckpt/model.pt has 7 bytes, not 40"]
    assert quarantine_incomplete(storage.child("run")) == ["checkpoint_2.incomplete"]
    assert storage.list("run") == ["checkpoint_1", "checkpoint_2.incomplete"]
    assert verify_checkpoint(storage.child("run", "checkpoint_1")) == []
    assert quarantine_incomplete(storage.child("run")) == []  # idempotent


def test_the_metrics_spool_lives_in_storage_and_resends_from_there(storage, tmp_path):
    """While the store is unreachable the queue is mirrored into the run's storage; a logger started on
    another node finds it there, and `orchestrator resend` takes its URI."""
    from mlflow import MlflowClient

    from orchestrator.tracking.logger import SPOOL_NAME, RunLogger, TrackingUnavailable, resend_spool

    dead = "http://127.0.0.1:9"  # nothing listens
    first = RunLogger(dead, "run-1", storage.uri("run"), retry_s=0.05, max_retry_s=0.1)
    first.log_metrics({"train/loss": 1.5}, 10)
    first.set_tag("k", "v")
    with pytest.raises(TrackingUnavailable, match=SPOOL_NAME):
        first.close(flush_timeout_s=0.5)
    lines = storage.read_text("run", SPOOL_NAME).splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["metric", "tag"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    with storage.fs.open_output_stream(storage.path("run", SPOOL_NAME)) as out:  # the same entries, for run_id
        out.write("".join(json.dumps({**json.loads(x), "run_id": run_id}) + "\n" for x in lines).encode())
    assert resend_spool(storage.uri("run", SPOOL_NAME), tracking_uri=uri) == 2
    assert client.get_run(run_id).data.metrics == {"train/loss": 1.5} and not storage.exists("run", SPOOL_NAME)


def test_workers_get_the_dataset_through_storage_never_a_driver_path(storage, tmp_path, monkeypatch):
    from orchestrator.config import DataConfig
    from orchestrator.data import build_dataset, load_built
    from orchestrator.runtime.shipping import folder_on_this_node, ship_dataset

    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path / "driver"))
    built = build_dataset(DataConfig(name="movies", train_size=300, max_per_label=2, many_threshold=10,
                                     few_threshold=3))
    shipped = ship_dataset(storage, built)
    assert str(tmp_path / "driver") not in json.dumps(shipped.to_dict()) or storage.is_local
    node_cache = tmp_path / "other-node-cache"
    local = folder_on_this_node(shipped.to_dict(), node_cache)
    assert (local == Path(storage.path(shipped.folder))) if storage.is_local else local.is_relative_to(node_cache)
    again = load_built(local)
    assert again.meta == built.meta and again.load("test").equals(built.load("test"))
    assert folder_on_this_node(shipped.to_dict(), node_cache) == local  # downloaded once per node
    assert ship_dataset(storage, built) == shipped  # shipped once per content
    lost = {**shipped.to_dict(), "folder": "_shared/datasets/gone"}
    with pytest.raises(FileNotFoundError, match="storage_path must be shared by every node"):
        folder_on_this_node(lost, node_cache)


def test_models_reach_each_node_by_kind(storage, tmp_path, monkeypatch):
    from orchestrator.config import ModelConfig
    from orchestrator.modeling.models import ModelError
    from orchestrator.runtime import shipping

    cfg = ModelConfig()
    assert shipping.ship_model(storage, cfg, "tiny", same_machine=False).kind == "tiny"
    assert shipping.ship_model(storage, cfg, "org/model", same_machine=False).to_dict()["source"] == "org/model"
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights" * 10)
    ref = shipping.ship_model(storage, cfg, str(folder), same_machine=False)
    assert ref.kind == "shipped" and str(folder) not in json.dumps(ref.to_dict())
    arrived = Path(shipping.model_on_this_node(ref.to_dict(), cfg, tmp_path / "node-cache"))
    assert (arrived / "model.safetensors").read_bytes() == b"weights" * 10
    on_this_machine = shipping.ship_model(storage, cfg, str(folder), same_machine=True)
    assert on_this_machine.kind == ("local" if storage.is_local else "shipped")

    # A packaged model is prepared on each node and must come out as the driver prepared it.
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "model.safetensors").write_bytes(b"dequantised")
    packaged = shipping.ship_model(storage, ModelConfig(source="smollm2-135m"), str(prepared), same_machine=False)
    monkeypatch.setattr("orchestrator.modeling.models.resolve_source", lambda cfg: str(prepared))
    assert shipping.model_on_this_node(packaged.to_dict(), ModelConfig(source="smollm2-135m")) == str(prepared)
    (prepared / MANIFEST).unlink()
    (prepared / "model.safetensors").write_bytes(b"dequantisee")  # same size, other bytes: another version
    with pytest.raises(ModelError, match="differs from the driver's"):
        shipping.model_on_this_node(packaged.to_dict(), ModelConfig(source="smollm2-135m"))
