"""The rank-0 logger when the tracking store goes away: nothing is lost, training never waits."""


from collections.abc import Mapping

import pytest
from mlflow import MlflowClient

from orchestrator.tracking.logger import SPOOL_NAME, RunLogger, TrackingUnavailable, resend_spool


@pytest.fixture()
def run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("t"))
    return uri, run.info.run_id, client


def history(client, run_id, key="train/loss"):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def break_store(logger, times):
    """The next `times` sends fail as an unreachable server would; later ones go through."""
    real = logger.client.log_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            raise ConnectionError("connection refused")
        return real(*args, **kwargs)

    logger.client.log_batch = flaky
    return calls


def test_a_healthy_store_gets_everything_and_no_spool_is_left(run, tmp_path):
    uri, run_id, client = run
    logger = RunLogger(uri, run_id, tmp_path / "spool")
    for step in range(1, 6):
        logger.log_metrics({"train/loss": 1.0 / step, "train/bad": float("nan")}, step)
    logger.set_tag("resumed", "no")
    logger.close(flush_timeout_s=30)
    assert history(client, run_id) == [(s, 1.0 / s) for s in range(1, 6)]
    assert history(client, run_id, "train/bad") == []  # non-finite values are skipped
    assert client.get_run(run_id).data.tags["resumed"] == "no"
    assert not (tmp_path / "spool" / SPOOL_NAME).exists()


def test_an_outage_is_bridged_without_blocking_the_caller(run, tmp_path):
    uri, run_id, client = run
    logger = RunLogger(uri, run_id, tmp_path / "spool", retry_s=0.05, max_retry_s=0.2)
    calls = break_store(logger, times=5)
    for step in range(1, 21):
        logger.log_metrics({"train/loss": float(step)}, step)
    assert logger.failures < 5  # the calls returned while the sender was still failing: nobody waited on it
    logger.close(flush_timeout_s=30)
    assert calls["n"] > 5 and logger.failures == 5
    assert history(client, run_id) == [(s, float(s)) for s in range(1, 21)]  # no gap, no duplicate
    assert not (tmp_path / "spool" / SPOOL_NAME).exists()


def test_a_store_that_never_returns_fails_loudly_with_everything_saved(run, tmp_path):
    uri, run_id, client = run
    logger = RunLogger(uri, run_id, tmp_path / "spool", retry_s=0.05, max_retry_s=0.1)
    break_store(logger, times=10**9)
    for step in (10, 20):
        logger.log_metrics({"train/loss": step / 10}, step)
    (tmp_path / "p.txt").write_text("predictions")
    logger.log_artifact(tmp_path / "p.txt", "predictions")
    (tmp_path / "p.txt").unlink()  # the caller's copy is gone; the logger kept its own
    spool = tmp_path / "spool" / SPOOL_NAME
    with pytest.raises(TrackingUnavailable, match=f"saved in {spool}.*orchestrator resend"):
        logger.close(flush_timeout_s=0.5)
    assert history(client, run_id) == []
    # once the store is back, the saved entries are delivered as they were
    assert resend_spool(spool) == 3
    assert history(client, run_id) == [(10, 1.0), (20, 2.0)]
    assert [a.path for a in client.list_artifacts(run_id, "predictions")] == ["predictions/p.txt"]
    assert not spool.exists()


def test_a_restarted_worker_sends_what_its_predecessor_could_not(run, tmp_path):
    uri, run_id, client = run
    first = RunLogger(uri, run_id, tmp_path / "spool", retry_s=0.05, max_retry_s=0.1)
    break_store(first, times=10**9)
    first.log_metrics({"train/loss": 0.5}, 40)
    with pytest.raises(TrackingUnavailable):
        first.close(flush_timeout_s=0.3)  # as if the worker died with the store down
    second = RunLogger(uri, run_id, tmp_path / "spool")
    second.log_metrics({"train/loss": 0.25}, 60)
    second.close(flush_timeout_s=30)
    assert history(client, run_id) == [(40, 0.5), (60, 0.25)]


def test_an_unreachable_store_is_refused_before_compute(tmp_path):
    import socket

    from orchestrator.config import ConfigError
    from orchestrator.tracking.runs import check_tracking_store

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(ConfigError, match=f"cannot reach the MLflow tracking store http://127.0.0.1:{port}"):
        check_tracking_store(f"http://127.0.0.1:{port}")  # one quick attempt, not MLflow's minutes of retries
    check_tracking_store(f"sqlite:///{tmp_path / 'new' / 'm.db'}")  # a store yet to be created is fine...
    assert not (tmp_path / "new").exists()  # ...and checking it creates nothing


def test_processes_opening_a_new_store_together_do_not_race(tmp_path):
    """MLflow creates a SQLite store's schema on first use; two processes doing it at once would
    collide on CREATE INDEX. ensure_store serialises the creation."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    code = f"from orchestrator.tracking.conventions import ensure_experiment, tracking_client; " \
           f"ensure_experiment(tracking_client({uri!r}), 'exp', {uri!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)[-3000:]
    assert MlflowClient(uri).get_experiment_by_name("exp") is not None


class VanishingEnviron(Mapping):
    """Like os.environ, copied by listing the names and then reading each; another thread deletes
    `vanishing` between the two during the first copy."""

    def __init__(self, data: dict, vanishing: str):
        self.data, self.vanishing, self.copies = dict(data), vanishing, 0

    def __iter__(self):
        self.copies += 1
        names = list(self.data)
        if self.copies == 1:
            self.data.pop(self.vanishing)
        return iter(names)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, name):
        return self.data[name]


def test_redaction_survives_a_variable_removed_mid_copy():
    """MLflow's telemetry thread removes _MLFLOW_TELEMETRY_SESSION_ID while a sweep cell logs its params:
    the redaction's copy of the environment retries instead of failing the cell with a KeyError."""
    from orchestrator.tracking.redaction import environment_snapshot, redact_secrets

    with pytest.raises(KeyError):  # the race itself, as a plain copy meets it
        dict(VanishingEnviron({"A": "1", "B": "2"}, vanishing="B"))
    env = {"HF_TOKEN": "hf_abcdefgh12345", "_MLFLOW_TELEMETRY_SESSION_ID": "x"}
    assert environment_snapshot(VanishingEnviron(env, vanishing="_MLFLOW_TELEMETRY_SESSION_ID")) == {
        "HF_TOKEN": "hf_abcdefgh12345"
    }
    racing = VanishingEnviron(env, vanishing="_MLFLOW_TELEMETRY_SESSION_ID")
    assert redact_secrets("token hf_abcdefgh12345 in a param", racing) == "token *** in a param"


def test_a_run_whose_params_cannot_be_logged_is_marked_failed(tmp_path, monkeypatch):
    """The run exists before its params are logged: if logging them fails, the run is FAILED with the
    error as a tag, never left RUNNING."""
    import orchestrator.tracking.runs as runs
    from orchestrator.config import load_run_config

    cfg = load_run_config(overrides=["name=broken", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])

    def fail(_cfg):
        raise RuntimeError("params exploded")

    monkeypatch.setattr(runs, "loggable_params", fail)
    with pytest.raises(RuntimeError, match="params exploded"):
        runs.start_or_resume_run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["orchestrator.error"] == "RuntimeError: params exploded"


STRESS_WRITER = """
import sys, time
from pathlib import Path
from orchestrator.config import load_run_config
from orchestrator.tracking.conventions import tracking_client
from orchestrator.tracking.runs import finish_run, start_or_resume_run

uri, root, i = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
cfg = load_run_config(overrides=[f"name=writer{i}", f"tracking.tracking_uri={uri}", f"storage_path={root}"])
(root / f"ready-{i}").touch()  # the store is held locked from now on
run_id = start_or_resume_run(cfg)
client = tracking_client(uri)
for step in range(1, 11):
    client.log_metric(run_id, "train/loss", 1.0 / step, step=step)
finish_run(uri, run_id)
"""


@pytest.mark.timeout(300)
def test_eight_processes_writing_one_locked_sqlite_store_lose_nothing(tmp_path, record_property):
    """Eight processes create and log runs in one SQLite store while another writer holds its lock longer
    than SQLite waits for it (MLflow's busy timeout, 20 s): each call retries with backoff, and every run,
    param and metric arrives."""
    import sqlite3
    import subprocess
    import sys
    import time

    from orchestrator.tracking.conventions import ensure_experiment, tracking_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_experiment(tracking_client(uri), "orchestrator", uri)  # the store and its schema exist
    lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another writer holding the store
    procs = [subprocess.Popen([sys.executable, "-c", STRESS_WRITER, uri, str(tmp_path), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(8)]
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("ready-*"))) < 8:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "a writer died starting"
            time.sleep(0.2)
        time.sleep(25)  # longer than MLflow's SQLite busy timeout (20 s): a call without retries fails here
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, "\n".join(outputs)[-4000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("orchestrator").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"writer{i}" for i in range(8)]
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.params["name"] == r.info.run_name
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == list(range(1, 11))
    record_property("figure", "store locked 25 s: 8 of 8 writers finished, 8 runs × 10 steps all arrived")
