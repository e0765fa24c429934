"""Rank 0's queued metric logger, which outlives a tracking store going away."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from orchestrator.engine.storage import Storage
from orchestrator.tracking.conventions import tracking_client


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be reached in time; what was not sent is saved locally."""


SPOOL_NAME = "unsent_mlflow.jsonl"


def _quick_failing_http() -> None:
    """MLflow's HTTP client retries a request 7 times with growing backoff (minutes per call); the
    logger retries on its own schedule, so each attempt should fail fast."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class RunLogger:
    """Rank-0 logger into an existing run that outlives a tracking store going away.

    Metrics, tags and artifacts are queued and sent by a background thread, so training never waits
    on MLflow. While the store is unreachable the thread retries with backoff and mirrors the queue to
    a spool file, `spool`/unsent_mlflow.jsonl, where `spool` is a folder of the run's storage (local or
    s3://), so a worker restarted on any node picks it up again; artifacts are copied aside on this node.
    `close()` sends what is left within `flush_timeout_s`, or raises
    TrackingUnavailable naming the spool file, which `orchestrator resend FILE` delivers later.
    Non-finite metric values are skipped (MLflow rejects some)."""

    def __init__(self, uri: str, run_id: str, spool: str | Path | None = None, *,
                 retry_s: float = 1.0, max_retry_s: float = 15.0):
        import threading

        _quick_failing_http()
        self.uri, self.run_id = uri, run_id
        self.client = tracking_client(uri)
        self.spool = Storage(str(spool)) if spool else None
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self._pending: list[dict[str, Any]] = self._load_spool()
        self._lock = threading.Condition()
        self._closing = False
        self._stopped = False
        self.failures = 0  # send attempts that failed (the store was unreachable)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._thread.start()

    # ---- what the training loop calls (never blocks on the network)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        entries = [
            {"kind": "metric", "key": key, "value": float(value), "timestamp": now, "step": int(step)}
            for key, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        self._enqueue(entries)

    def set_tag(self, key: str, value: str) -> None:
        self._enqueue([{"kind": "tag", "key": key, "value": str(value)}])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """The file is copied into the spool folder first (the caller may delete its own copy)."""
        import shutil
        import tempfile

        beside_spool = self.spool is not None and self.spool.is_local
        folder = self.spool.path() if beside_spool else tempfile.mkdtemp(prefix="mlflow-artifacts-")
        keep = Path(folder) / "unsent_artifacts"
        keep = keep / (artifact_path or "") / f"{time.time_ns()}"
        keep.mkdir(parents=True, exist_ok=True)
        local = shutil.copy2(path, keep / Path(path).name)
        self._enqueue([{"kind": "artifact", "path": str(local), "artifact_path": artifact_path}])

    def log_dict(self, data: Any, name: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            path.write_text(json.dumps(data, indent=2, default=str))
            self.log_artifact(path, str(Path(name).parent) if Path(name).parent != Path(".") else None)

    def close(self, flush_timeout_s: float = 300.0) -> None:
        """Send everything still queued, waiting at most flush_timeout_s for the store to come back."""
        deadline = time.time() + flush_timeout_s
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            while self._pending and time.time() < deadline:
                self._lock.wait(timeout=min(1.0, max(0.0, deadline - time.time())))
            self._stopped = True  # the sender gives up too: it must not rewrite the spool behind us
            self._lock.notify_all()
        self._thread.join(timeout=30)
        left = list(self._pending)
        if left:
            self._persist(left)
            raise TrackingUnavailable(
                f"the tracking store {self.uri} stayed unreachable: {len(left)} metric/tag/artifact entries of run "
                f"{self.run_id} are saved in {self.spool_path()}; send them with `orchestrator resend "
                f"{self.spool_path()}` once it is back"
            )

    # ---- the sender

    def _enqueue(self, entries: list[dict[str, Any]]) -> None:
        if not entries:
            return
        with self._lock:
            self._pending.extend(entries)
            if self.failures:  # the store is down: keep the spool in step with the queue
                self._persist(self._pending)
            self._lock.notify_all()

    def _send_loop(self) -> None:
        delay = self.retry_s
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._lock.wait(timeout=1.0)
                if self._stopped or (not self._pending and self._closing):
                    return
                batch = list(self._pending)
            try:
                send_entries(self.client, self.run_id, batch)
            except Exception:  # unreachable, timing out, 5xx: keep everything and try again later
                self.failures += 1
                with self._lock:
                    self._persist(self._pending)
                    self._lock.wait(timeout=delay)  # close() may wake it to stop
                delay = min(self.max_retry_s, delay * 2)
                continue
            delay = self.retry_s
            with self._lock:
                del self._pending[: len(batch)]
                if self.failures:
                    self._persist(self._pending)
                self._lock.notify_all()

    # ---- the spool file

    def spool_path(self) -> str | None:
        return self.spool.uri(SPOOL_NAME) if self.spool else None

    def _persist(self, entries: list[dict[str, Any]]) -> None:
        if self.spool is None:
            return
        if not entries:
            self.spool.delete(SPOOL_NAME)
            return
        # Replaced whole: a crash mid-write leaves the previous spool, never half a file.
        lines = "".join(json.dumps({"uri": self.uri, "run_id": self.run_id, **e}) + "\n" for e in entries)
        self.spool.write_text(lines, SPOOL_NAME)

    def _load_spool(self) -> list[dict[str, Any]]:
        if self.spool is None or not self.spool.exists(SPOOL_NAME):
            return []
        entries = [json.loads(line) for line in self.spool.read_text(SPOOL_NAME).splitlines() if line.strip()]
        mine = [e for e in entries if e.get("run_id") == self.run_id]
        return [{k: v for k, v in e.items() if k not in ("uri", "run_id")} for e in mine]


def send_entries(client, run_id: str, entries: list[dict[str, Any]]) -> None:
    """Metrics in batches (MLflow caps a batch at 1000), then tags, then artifacts, in queue order."""
    from mlflow.entities import Metric

    metrics = [Metric(e["key"], e["value"], e["timestamp"], e["step"]) for e in entries if e["kind"] == "metric"]
    for i in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[i : i + 900])
    for e in entries:
        if e["kind"] == "tag":
            client.set_tag(run_id, e["key"], e["value"])
        elif e["kind"] == "artifact":
            client.log_artifact(run_id, e["path"], e.get("artifact_path"))


def resend_spool(path: str | Path, tracking_uri: str | None = None) -> int:
    """Deliver a spool file (a local path or a storage URI) left by a run whose tracking store was
    unreachable; returns entries sent."""
    folder, _, name = str(path).rstrip("/").rpartition("/")
    spool = Storage(folder or ".")
    if not spool.exists(name) or spool.is_dir(name):
        raise FileNotFoundError(f"no spool file at {path}")
    entries = [json.loads(line) for line in spool.read_text(name).splitlines() if line.strip()]
    by_run: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in entries:
        by_run.setdefault((tracking_uri or e["uri"], e["run_id"]), []).append(e)
    for (uri, run_id), items in by_run.items():
        send_entries(tracking_client(uri), run_id, items)
    spool.delete(name)
    return len(entries)
