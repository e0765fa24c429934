"""One writer per run (the lease) and the resume guard, on a real SQLite MLflow store; no Ray."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.config import ConfigError, load_run_config
from orchestrator.tracking.conventions import LEASE_TAG_PREFIX, run_key
from orchestrator.tracking.lease import Holder, RunLease
from orchestrator.tracking.runs import check_can_start, run_lease, start_or_resume_run


def config(tmp_path, *overrides):
    return load_run_config(overrides=["name=guarded", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
                                      f"storage_path={tmp_path / 'results'}", *overrides])


def forge_lease(cfg, holder: Holder) -> None:
    """A lease as another process would have left it."""
    lease = run_lease(cfg)
    lease.client.set_experiment_tag(lease.experiment_id, LEASE_TAG_PREFIX + run_key(cfg), holder.text())


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has this id now


def test_a_live_lease_refuses_a_second_writer_naming_the_holder(tmp_path):
    cfg = config(tmp_path)
    first = run_lease(cfg)
    first.acquire()
    with pytest.raises(ConfigError, match=rf"run 'guarded' is being written by process {os.getpid()} on "):
        run_lease(cfg).acquire()
    with pytest.raises(ConfigError, match="being written by"):  # the read-only check before compute
        check_can_start(cfg)
    first.release()
    check_can_start(cfg)  # released: free again
    assert LEASE_TAG_PREFIX + run_key(cfg) not in first.client.get_experiment(first.experiment_id).tags


def test_a_lease_whose_heartbeat_stopped_or_whose_process_is_gone_is_taken_over(tmp_path):
    cfg = config(tmp_path)
    forge_lease(cfg, Holder("elsewhere", 4242, "old", time.time() - 3600))  # silent for an hour
    taker = run_lease(cfg)
    taker.acquire()
    assert taker.holder().token == taker.token
    taker.release()
    forge_lease(cfg, Holder(Holder.me("x").host, dead_pid(), "crashed", time.time()))  # fresh, but its process died
    again = run_lease(cfg)
    again.acquire()
    assert again.holder().token == again.token
    again.release()


def test_the_heartbeat_keeps_a_lease_alive(tmp_path):
    cfg = config(tmp_path)
    lease = run_lease(cfg)
    lease.acquire()
    first = lease.holder().heartbeat
    lease.start_heartbeat(every_s=0.2)
    time.sleep(1.0)
    assert lease.holder().heartbeat > first
    lease.release()
    assert lease.holder() is None


def test_a_new_run_records_what_a_resume_is_checked_against(tmp_path):
    from orchestrator.tracking.conventions import config_hash, package_version

    cfg = config(tmp_path, "scaling.num_workers=2")
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(start_or_resume_run(cfg))
    assert run.data.tags["orchestrator.config_hash"] == config_hash(cfg)
    assert run.data.tags["orchestrator.world_size"] == "2"
    assert run.data.tags["orchestrator.version"] == package_version() != "unknown"


def test_a_restart_with_another_setup_is_refused_listing_what_differs(tmp_path):
    cfg = config(tmp_path, "scaling.num_workers=2", "pipeline.0.lr=1e-4")
    client = MlflowClient(cfg.tracking.tracking_uri)
    run_id = start_or_resume_run(cfg)
    client.set_terminated(run_id, status="FAILED")  # interrupted
    changed = config(tmp_path, "scaling.num_workers=1", "pipeline.0.lr=2e-4", "tracking.log_every=3")
    with pytest.raises(ConfigError) as refused:
        check_can_start(changed)
    text = str(refused.value)
    assert "pipeline.0.lr: 0.0001 -> 0.0002" in text and "scaling.num_workers: 2 -> 1" in text
    assert "world size: 2 -> 1 workers" in text and "--allow-changed-resume" in text
    assert "log_every" not in text  # bookkeeping: where and how often it logs is not what it computes
    with pytest.raises(ConfigError, match="would resume with a different setup"):
        start_or_resume_run(changed)
    assert client.get_run(run_id).info.status == "FAILED"  # refused: the run untouched
    # the same setup resumes; so does a changed one when allowed, tagged with what changed
    assert start_or_resume_run(config(tmp_path, "scaling.num_workers=2", "pipeline.0.lr=1e-4")) == run_id
    client.set_terminated(run_id, status="FAILED")
    assert start_or_resume_run(changed, allow_changed_resume=True) == run_id
    run = client.get_run(run_id)
    (entry,) = json.loads(run.data.tags["orchestrator.resume_changes"])
    assert entry["revision"] == 1 and "pipeline.0.lr: 0.0001 -> 0.0002" in entry["changes"]
    assert run.data.tags["orchestrator.world_size"] == "1" and run.data.params["pipeline.0.lr"] == "0.0001"
    logged = json.loads(Path(client.download_artifacts(run_id, "config/resolved-1.json", str(tmp_path))).read_text())
    assert logged["pipeline"][0]["lr"] == 0.0002 and logged["scaling"]["num_workers"] == 1


def test_another_package_version_is_a_changed_setup(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    client = MlflowClient(cfg.tracking.tracking_uri)
    client.set_terminated(start_or_resume_run(cfg), status="KILLED")
    monkeypatch.setattr("orchestrator.tracking.runs.package_version", lambda: "9.9.9")
    with pytest.raises(ConfigError, match=r"orchestrator version: .* -> 9\.9\.9"):
        check_can_start(cfg)


def test_the_lease_tag_lives_on_the_experiment_so_a_run_not_yet_created_is_covered(tmp_path):
    cfg = config(tmp_path)
    lease = run_lease(cfg)
    lease.acquire()
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.search_runs([lease.experiment_id]) == []  # no run yet, and still held
    with pytest.raises(ConfigError, match="being written by"):
        RunLease(client, lease.experiment_id, run_key(cfg), "run 'guarded'").acquire()
    lease.release()


def test_run_errors_cross_process_boundaries_intact():
    """A sweep's Tune trial pickles a cell's error to the driver: it must arrive as raised, not as a TypeError."""
    import pickle

    from orchestrator.runtime.driver import RunFailed, RunStopped

    failed = pickle.loads(pickle.dumps(RunFailed("cell", "timed out after 60 s (timeout_s)", ["checkpoint_1"])))
    assert str(failed) == ("run 'cell' failed: timed out after 60 s (timeout_s); incomplete checkpoints set aside: "
                           "checkpoint_1")
    stopped = pickle.loads(pickle.dumps(RunStopped("cell", "SIGTERM to the driver (pid 7): not started")))
    assert isinstance(stopped, RunStopped) and stopped.cause == "SIGTERM to the driver (pid 7): not started"


def test_a_stopped_run_exits_143_and_says_how_to_continue(monkeypatch, capsys):
    from orchestrator.cli import main
    from orchestrator.runtime.driver import RunStopped

    def stopped(*args, **kwargs):
        raise RunStopped("demo", "SIGTERM to the driver (pid 7): stopped at step 12 with a checkpoint there; "
                                 "rerun to resume from it")

    monkeypatch.setattr("orchestrator.runtime.driver.run_training", stopped)
    assert main(["train", "name=demo"]) == 143
    assert "stopped: run 'demo' stopped: SIGTERM to the driver (pid 7): stopped at step 12" in capsys.readouterr().err
