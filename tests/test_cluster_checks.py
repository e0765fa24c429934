"""What a cluster's nodes cannot reach is refused before any MLflow run exists (runtime/preflight.check_cluster)."""

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports

from orchestrator.config import ConfigError, load_run_config
from orchestrator.runtime.preflight import check_cluster, filesystem_type

MOUNTS = """\
/dev/root / ext4 rw 0 0
tmpfs /tmp tmpfs rw 0 0
fs-1234.efs.us-west-2.amazonaws.com:/ /mnt/efs nfs4 rw 0 0
server:/export /mnt/nfs\\040share nfs rw 0 0
"""


def test_filesystem_type_takes_the_longest_mount_point():
    assert filesystem_type(Path("/mnt/efs/orchestrator/results"), MOUNTS) == "nfs4"
    assert filesystem_type(Path("/mnt/nfs share/x"), MOUNTS) == "nfs"
    assert filesystem_type(Path("/tmp/results"), MOUNTS) == "tmpfs"
    assert filesystem_type(Path("/home/me/results"), MOUNTS) == "ext4"
    assert filesystem_type(Path("/mnt/efsx"), MOUNTS) == "ext4"  # a prefix of a name is not its mount point


def test_one_machine_may_keep_everything_local(tmp_path):
    cfg = load_run_config(overrides=[f"storage_path={tmp_path}"])
    check_cluster(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}", spans_nodes=False)  # nothing refused


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/mlflow.db", "file:///{tmp}/mlruns", "{tmp}/mlruns"])
def test_a_local_tracking_store_is_refused_on_several_nodes(tmp_path, uri):
    cfg = load_run_config(overrides=["storage_path=s3://bucket/runs"])
    with pytest.raises(ConfigError, match="is a file on this machine.*MLFLOW_TRACKING_URI=http"):
        check_cluster(cfg, uri.format(tmp=tmp_path), spans_nodes=True)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """An MLflow server whose default artifact root is a folder of its own disk (no --serve-artifacts)."""
    root = tmp_path_factory.mktemp("server")
    port = free_ports(1)[0]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--default-artifact-root", (root / "artifacts").as_uri(), "--no-serve-artifacts"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "the MLflow server did not start"
            time.sleep(0.3)
    yield uri
    server.terminate()
    server.wait(timeout=60)


def test_file_artifact_roots_and_local_storage_are_refused_on_several_nodes(tracking_server, tmp_path):
    from mlflow import MlflowClient

    MlflowClient(tracking_server).create_experiment("file-roots")
    cfg = load_run_config(overrides=["storage_path=s3://bucket/runs", "tracking.experiment=file-roots"])
    with pytest.raises(ConfigError, match="keeps its artifacts at file:.*--serve-artifacts"):
        check_cluster(cfg, tracking_server, spans_nodes=True)
    fresh = load_run_config(overrides=[f"storage_path={tmp_path}", "tracking.experiment=not-created-yet"])
    with pytest.raises(ConfigError, match="on this machine's own disk.*s3://BUCKET/PREFIX"):
        check_cluster(fresh, tracking_server, spans_nodes=True)
    check_cluster(fresh.model_copy(update={"storage_path": "s3://bucket/runs"}), tracking_server, spans_nodes=True)
