"""Faults an overnight grid meets on a shared cluster, survived (CPU, loopback only).

The sweep driver killed mid-grid and resumed is tests/test_e2e_sweep.py; the tracking store going
away is tested here end to end and in tests/test_tracking.py unit by unit.
"""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import free_ports
from mlflow import MlflowClient
from test_e2e_train import make_cfg, metric_history

from orchestrator.runtime.driver import run_training

pytestmark = pytest.mark.e2e

SFT_60 = ["pipeline.0.steps=60", "pipeline.0.lr=3e-3", "pipeline.0.micro_batch_size=8",
          "checkpoint.every_steps=20", "tracking.log_every=10", "eval.max_samples=24"]


def run_id_named(client, name: str, timeout_s: float = 300) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        exp = client.get_experiment_by_name("orchestrator")
        if exp is not None:
            runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
            if runs:
                return runs[0].info.run_id
        time.sleep(1)
    raise TimeoutError(f"no run named {name}")


def registered_checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (its snapshot in the run's storage)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [int(c["metrics"]["train/step"]) for c in snapshot.get("checkpoint_results", [])]


def kill_a_worker_at(run_dir: Path, step: int, killed: list) -> None:
    """Once Ray Train has registered the checkpoint of `step`, SIGKILL one of the run's worker processes.
    Waiting for the registration, not for the step's log line, keeps the test from racing the controller:
    a checkpoint reported by the workers but not yet registered is not one a restart can use."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # this test's cluster, not another one on the machine
    deadline = time.time() + 300
    while time.time() < deadline:
        if step in registered_checkpoint_steps(run_dir):
            workers = list_actors(
                address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
            )
            if workers:
                pid = workers[-1]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, registered_checkpoint_steps(run_dir)))
                return
        time.sleep(0.1)


def test_a_killed_worker_restarts_from_its_checkpoint_into_the_same_run(tmp_path, ray_cluster):
    """A training worker SIGKILLed mid-stage: Ray Train restarts the worker group from the latest
    checkpoint (failure budget 1); the run ends as an uninterrupted one would, step for step, in the
    same MLflow run, with no step missing."""
    calm = run_training(make_cfg(tmp_path, "name=calm", *SFT_60))
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_at, args=(tmp_path / "results" / "faulty", 20, killed))
    killer.start()
    faulty = run_training(make_cfg(tmp_path, "name=faulty", *SFT_60), max_failures=1)
    killer.join()
    assert killed, "the worker was never killed"

    client = MlflowClient(faulty.tracking_uri)
    run = client.get_run(faulty.run_id)
    assert run.info.status == "FINISHED"
    # the restart used the latest checkpoint registered when the worker died (20, or 40 on a slow poll)
    latest = max(killed[0][1])
    assert run.data.tags["orchestrator.resumed_from"] == f"stage 0 step {latest}" and latest < 60
    exp = client.get_experiment_by_name("orchestrator")
    assert len(client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'faulty'")) == 1

    calm_loss = dict(metric_history(calm.tracking_uri, calm.run_id, "train/loss"))
    faulty_loss = metric_history(faulty.tracking_uri, faulty.run_id, "train/loss")
    assert {s for s, _ in faulty_loss} == set(calm_loss) == set(range(10, 61, 10))  # no gap
    for step, value in faulty_loss:  # steps logged before the kill and again after it agree, and with calm
        assert value == pytest.approx(calm_loss[step], rel=1e-5), step
    for key in ("test/all/mae", "test/few/mae", "val/all/mae"):
        assert faulty.metrics[key] == pytest.approx(calm.metrics[key], rel=1e-6, abs=1e-9), key
    assert math.isfinite(faulty.metrics["test/all/mae"])



@pytest.mark.timeout(600)
def test_a_tracking_server_outage_loses_no_metric(tmp_path, ray_cluster):
    """The MLflow server dies mid-run and comes back on the same port and store: training does not
    stop, rank 0 queues and retries, and every step's metrics and the run's artifacts arrive."""
    import subprocess
    import sys
    from pathlib import Path

    port = free_ports(1)[0]
    uri = f"http://127.0.0.1:{port}"
    server_cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                  "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                  "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"]

    def start_server():
        proc = subprocess.Popen(server_cmd, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                MlflowClient(uri).search_experiments(max_results=1)
                return proc
            except Exception:
                time.sleep(0.5)
        proc.kill()
        raise TimeoutError("the MLflow server did not start")

    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")  # this test's polling
    server = start_server()
    outage: dict[str, float] = {}

    def interrupt():
        nonlocal server
        client = MlflowClient(uri)
        run_id = run_id_named(client, "outage")
        while not any(m.step >= 10 for m in client.get_metric_history(run_id, "train/loss")):
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        outage["down"] = time.time()
        time.sleep(15)  # training goes on meanwhile
        server = start_server()
        outage["up"] = time.time()

    try:
        killer = threading.Thread(target=interrupt)
        killer.start()
        out = run_training(make_cfg(tmp_path, "name=outage", *SFT_60, "tracking.log_every=5",
                                    f"tracking.tracking_uri={uri}"))
        killer.join()
        assert outage.get("up"), "the server was never brought down and back"
        client = MlflowClient(uri)
        run = client.get_run(out.run_id)
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(out.run_id, "train/loss")]
        assert sorted(set(steps)) == list(range(5, 61, 5))  # nothing lost across the outage
        logged_at = [m.timestamp / 1000 for m in client.get_metric_history(out.run_id, "train/loss")]
        assert any(outage["down"] < t < outage["up"] for t in logged_at)  # some were measured while it was down
        assert "test/all/mae" in run.data.metrics
        names = {a.path for a in client.list_artifacts(out.run_id, "predictions")}
        assert names == {"predictions/val.parquet", "predictions/test.parquet"}
        assert not list((tmp_path / "results" / "outage").glob("unsent_mlflow.jsonl"))  # all delivered
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            os.environ.pop(key, None)


def _fill(path) -> None:
    """Write zeros until the filesystem refuses: the disk is full."""
    import errno

    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        while True:
            try:
                f.write(chunk)
                f.flush()
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    return
                raise


IN_OWN_MOUNT_NAMESPACE = "ORCHESTRATOR_TEST_IN_OWN_MOUNT_NAMESPACE"


def rerun_in_own_mount_namespace(node_id: str) -> None:
    """Run one test again in a private mount namespace (`unshare --mount`, as root or as a user mapped to
    root), where it may mount a small tmpfs; it brings its own Ray cluster, whose workers see that mount.
    Skips only where no mount namespace can be made."""
    import os
    import subprocess
    import sys

    unshare = ["unshare", "--mount", "--propagation", "private"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    if subprocess.run([*unshare, "true"], capture_output=True).returncode:
        pytest.skip("cannot mount a small filesystem: no mount here, and no mount namespace (unshare --mount)")
    inner = subprocess.run([*unshare, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node_id],
                           env={**os.environ, IN_OWN_MOUNT_NAMESPACE: "1"}, capture_output=True, text=True)
    assert inner.returncode == 0, (inner.stdout + inner.stderr)[-6000:]
    assert "1 passed" in inner.stdout, inner.stdout[-3000:]


@pytest.mark.timeout(900)
def test_a_full_disk_fails_clearly_and_keeps_the_last_good_checkpoint(tmp_path, request):
    """The checkpoint disk fills up after the first checkpoint: the run fails with the disk error
    named, the last good checkpoint is intact (anything half-written is set aside), and once there
    is room again the same run resumes from it into the same MLflow run.

    The disk is a 64 MB tmpfs, mounted here when this process may, else in a mount namespace of a rerun of
    this test (unshare --mount)."""
    import json
    import os
    import subprocess

    from orchestrator.engine.checkpoints import verify_checkpoint
    from orchestrator.runtime.driver import RunFailed

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True).returncode:
        assert not os.environ.get(IN_OWN_MOUNT_NAMESPACE), "no tmpfs even in a mount namespace of its own"
        rerun_in_own_mount_namespace(request.node.nodeid)
        return
    request.getfixturevalue("ray_cluster")  # after the mount: in a rerun, Ray starts inside the namespace
    filler = disk / "filler"
    try:
        cfg = make_cfg(tmp_path, "name=full", *SFT_60, f"storage_path={disk}")
        run_dir = disk / "full"

        def fill_after_first_checkpoint():
            deadline = time.time() + 300
            while time.time() < deadline:
                snapshot = run_dir / "checkpoint_manager_snapshot.json"
                if snapshot.is_file():
                    try:
                        registered = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
                    except (ValueError, KeyError, TypeError):
                        registered = None
                    if registered and not verify_checkpoint(run_dir / registered):
                        _fill(filler)  # Ray registered a complete checkpoint: now the disk is full
                        return
                time.sleep(0.05)

        thread = threading.Thread(target=fill_after_first_checkpoint)
        thread.start()
        with pytest.raises(RunFailed) as failed:
            run_training(cfg)
        thread.join()
        assert filler.exists(), "the disk was never filled"
        assert "No space left on device" in str(failed.value)
        client = MlflowClient(cfg.tracking.tracking_uri)
        run_id = run_id_named(client, "full")
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["orchestrator.error"]
        kept = [d for d in run_dir.glob("checkpoint_*") if d.is_dir() and not d.name.endswith(".incomplete")]
        assert len(kept) == 1 and verify_checkpoint(kept[0]) == []  # the last good one, whole
        assert json.loads((kept[0] / "orchestrator_state.json").read_text())["step"] == 20

        filler.unlink()  # room again: the same command picks up where the good checkpoint left off
        again = run_training(cfg)
        assert again.run_id == run_id
        finished = client.get_run(run_id)
        assert finished.info.status == "FINISHED"
        assert finished.data.tags["orchestrator.resumed_from"] == "stage 0 step 20"
        assert {m.step for m in client.get_metric_history(run_id, "train/loss")} == set(range(10, 61, 10))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
