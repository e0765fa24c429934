"""MLflow naming and logging.

The driver creates (or, on resume, finds) the run; rank 0 of the workers logs into it by id with
an ``MlflowClient``, so no process relies on MLflow's global "active run" state.
Metric names: ``train/...`` per step, ``{split}/{region}/{metric}`` at the end (METHODS §2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.config import RunConfig, flatten, resolve_path, resolve_storage

RUN_KEY_TAG = "orchestrator.run_key"
PIPELINE_TAG = "orchestrator.pipeline"
SECRET_PATTERN = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store under ./mlruns (artifacts beside it)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{resolve_path('mlruns') / 'mlflow.db'}"


def resolve_tracking_uri(cfg: RunConfig) -> str:
    return cfg.tracking.tracking_uri or default_tracking_uri()


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return None  # a tracking server decides


def ensure_store(uri: str) -> None:
    """A local SQLite store exists before MLflow opens it, its schema created by one process at a time:
    two launches opening a new store together otherwise race on MLflow's CREATE INDEX and one dies."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///") :])
    ready = db.parent / f".{db.name}.ready"  # SQLite creates the file before the schema is complete
    if ready.exists():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    from mlflow import MlflowClient

    with open(db.parent / f".{db.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not ready.exists():
            MlflowClient(uri).search_experiments(max_results=1)  # creates, or upgrades, the schema
            ready.touch()


def tracking_client(uri: str):
    """An MlflowClient for `uri`. Constructing one creates (or migrates) a SQLite store's schema, so the
    store is made ready under a lock first; every client in this package comes from here."""
    from mlflow import MlflowClient

    ensure_store(uri)
    return MlflowClient(uri)


def ensure_experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root(uri))
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_key(cfg: RunConfig) -> str:
    """Identity of a run across restarts: same storage + name = same MLflow run."""
    return hashlib.sha256(f"{resolve_storage(cfg.storage_path)}::{cfg.name}".encode()).hexdigest()[:16]


REDACTED = "***"
# Query parameters whose value is a credential: ?token=..., &sig=... (signed URLs), &X-Amz-Credential=...
_SECRET_QUERY_NAME = re.compile(
    r"(token|secret|password|passwd|pwd|api[_-]?key|access[_-]?key|key|sig|signature|credential|auth)", re.IGNORECASE
)
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s?#]*)@")
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")
_MIN_ENV_SECRET = 8  # shorter values ("1", "true") would redact ordinary text


def environment_snapshot(environ: Mapping[str, str] | None = None, attempts: int = 20) -> dict[str, str]:
    """A copy of the environment (os.environ by default). Copying lists the names, then reads each;
    another thread removing a variable in between (MLflow's telemetry drops _MLFLOW_TELEMETRY_SESSION_ID)
    raises KeyError, so retry: the race is harmless, failing the run over it is not."""
    environ = os.environ if environ is None else environ
    for _ in range(attempts - 1):
        try:
            return dict(environ)
        except KeyError:
            continue
    return {k: v for k in list(environ) if (v := environ.get(k)) is not None}


def _env_secrets(environ=None) -> list[str]:
    """Values of secret-looking environment variables (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...), longest first.
    Variables naming where a secret lives (*_PATH, *_FILE, *_DIR) are not secrets themselves."""
    values = {
        value
        for name, value in environment_snapshot(environ).items()
        if SECRET_PATTERN.search(name)
        and not name.upper().endswith(("_PATH", "_FILE", "_DIR"))
        and len(value) >= _MIN_ENV_SECRET
    }
    return sorted(values, key=len, reverse=True)


def redact_secrets(text: str, environ=None) -> str:
    """`text` with credentials replaced by ***: the password of a URI (`postgresql://user:***@host/db`; a
    lone user part, often a token, goes whole: `https://***@host`), the values of query parameters named
    like token/secret/key/password/sig, and any value of a secret-looking environment variable."""
    for secret in _env_secrets(environ):
        text = text.replace(secret, REDACTED)

    def userinfo(m: re.Match) -> str:
        user, colon, _ = m["userinfo"].partition(":")
        return f"{m['scheme']}{user}:{REDACTED}@" if colon else f"{m['scheme']}{REDACTED}@"

    def query(m: re.Match) -> str:
        if not _SECRET_QUERY_NAME.search(m["name"]) or not m["value"]:
            return m.group()
        return f"{m['sep']}{m['name']}={REDACTED}"

    text = _URI_USERINFO.sub(userinfo, text)
    return _QUERY_PARAM.sub(query, text)


def redacted_config_json(cfg: RunConfig) -> str:
    """The resolved config as JSON with every string value passed through redact_secrets (for the
    config/resolved.json artifact)."""

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return redact_secrets(node) if isinstance(node, str) else node

    return json.dumps(clean(cfg.model_dump(mode="json")), indent=2)


def loggable_params(cfg: RunConfig) -> dict[str, str]:
    """Flattened config as MLflow params. Secret-looking keys are never logged, and credentials inside
    values (URI passwords, token query parameters, secret environment values) are redacted."""
    params = {}
    for key, value in flatten(cfg).items():
        if SECRET_PATTERN.search(key):
            continue
        text = "" if value is None else redact_secrets(str(value))
        params[key] = text[:6000]
    params["pipeline"] = redact_secrets(cfg.pipeline_label())
    return params


class Stopwatch:
    """Seconds per phase, summed: `with watch("phase"):` adds the block's wall time to timings[phase],
    `watch.add(phase, s)` a duration measured elsewhere. Runs log them as time/<phase>_s."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings

    def add(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)


def start_or_resume_run(cfg: RunConfig, parent_run_id: str | None = None, extra_tags: dict | None = None) -> str:
    """Driver side: the MLflow run for this training run, reused when the same run restarts."""
    from mlflow.entities import Param

    uri = resolve_tracking_uri(cfg)
    client = tracking_client(uri)
    exp_id = ensure_experiment(client, cfg.tracking.experiment, uri)
    key = run_key(cfg)
    existing = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1, order_by=["attributes.start_time DESC"]
    )
    if existing and existing[0].info.status != "FINISHED":
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "orchestrator.resumed", "true")
        return run_id
    tags = {RUN_KEY_TAG: key, PIPELINE_TAG: cfg.pipeline_label(), "mlflow.runName": cfg.name}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update(extra_tags or {})
    run = client.create_run(exp_id, run_name=cfg.name, tags=tags)
    run_id = run.info.run_id
    try:
        items = list(loggable_params(cfg).items())
        for i in range(0, len(items), 90):  # MLflow caps a batch at 100 params
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 90]])
        client.log_text(run_id, redacted_config_json(cfg), "config/resolved.json")
    except Exception as exc:  # never leave a run RUNNING that nothing will finish
        client.set_tag(run_id, "orchestrator.error", redact_secrets(f"{type(exc).__name__}: {exc}")[:5000])
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id


def check_tracking_store(uri: str) -> None:
    """Before any compute: the store answers (a server that is down is a clear error, not a hang)."""
    from mlflow import MlflowClient

    from orchestrator.config import ConfigError

    if uri.startswith("sqlite:///"):  # a local file: writable is enough, and a dry run creates nothing
        folder = Path(uri[len("sqlite:///") :]).parent
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not os.access(existing, os.W_OK):
            raise ConfigError(f"the MLflow store {uri} cannot be created: {existing} is not writable")
        return
    _quick_failing_http()
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise ConfigError(f"cannot reach the MLflow tracking store {uri}: {type(exc).__name__}: {exc}"[:2000]) from None


def finish_run(uri: str, run_id: str, error: BaseException | str | None = None, retry_for_s: float = 60.0) -> None:
    """Mark the run FINISHED, or FAILED with the error as a tag; retried while the store is unreachable
    (a run is never left RUNNING because the store blinked at the end)."""

    _quick_failing_http()
    client = tracking_client(uri)
    deadline, delay = time.time() + retry_for_s, 1.0
    while True:
        try:
            if error is None:
                client.set_terminated(run_id, status="FINISHED")
            else:
                client.set_tag(run_id, "orchestrator.error", redact_secrets(str(error))[:5000])
                client.set_terminated(run_id, status="FAILED")
            return
        except Exception as exc:
            if time.time() + delay > deadline:
                raise TrackingUnavailable(
                    f"could not mark run {run_id} {'FAILED' if error else 'FINISHED'} in {uri}: {exc}"
                ) from exc
            time.sleep(delay)
            delay = min(15.0, delay * 2)


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
    a local spool file (`spool_dir`/unsent_mlflow.jsonl, artifacts copied beside it); a restarted
    worker picks that file up again. `close()` sends what is left within `flush_timeout_s`, or raises
    TrackingUnavailable naming the spool file, which `orchestrator resend FILE` delivers later.
    Non-finite metric values are skipped (MLflow rejects some)."""

    def __init__(self, uri: str, run_id: str, spool_dir: str | Path | None = None, *,
                 retry_s: float = 1.0, max_retry_s: float = 15.0):
        import threading


        _quick_failing_http()
        self.uri, self.run_id = uri, run_id
        self.client = tracking_client(uri)
        self.spool_dir = Path(spool_dir) if spool_dir else None
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

        keep = Path(self.spool_dir or tempfile.mkdtemp(prefix="mlflow-artifacts-")) / "unsent_artifacts"
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

    def spool_path(self) -> Path | None:
        return self.spool_dir / SPOOL_NAME if self.spool_dir else None

    def _persist(self, entries: list[dict[str, Any]]) -> None:
        path = self.spool_path()
        if path is None:
            return
        if not entries:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"uri": self.uri, "run_id": self.run_id, **e}) + "\n" for e in entries))
        os.replace(tmp, path)  # a crash mid-write leaves the previous spool, never half a file

    def _load_spool(self) -> list[dict[str, Any]]:
        path = self.spool_path()
        if path is None or not path.is_file():
            return []
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [{k: v for k, v in e.items() if k not in ("uri", "run_id")} for e in entries if e.get("run_id") == self.run_id]


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
    """Deliver a spool file left by a run whose tracking store was unreachable; returns entries sent."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no spool file at {path}")
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_run: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in entries:
        by_run.setdefault((tracking_uri or e["uri"], e["run_id"]), []).append(e)
    for (uri, run_id), items in by_run.items():
        send_entries(tracking_client(uri), run_id, items)
    path.unlink()
    return len(entries)
