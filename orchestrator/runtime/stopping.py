"""Stopping a run on request (SIGTERM to its driver) at the next step boundary, with a checkpoint there.

The driver and the workers may share no disk and no signal, so the request travels through storage: the
driver's SIGTERM handler writes a stop marker, rank 0 of each run looks for it between steps (at most once
a second), and the workers agree on it in the per-step collective of stages/guards.py, so they all stop
after the same step. They checkpoint that step and return; the driver marks the run KILLED with the reason,
and a rerun (or `sweep --resume`) continues from that checkpoint.

Markers: `<storage_path>/<run>/STOP_FILE` stops one run (`orchestrator train`); `<sweep storage>/STOP_FILE`
stops every cell of a sweep, including the cells that have not started. Each is removed when its run or
sweep starts again, so an old request never stops a new start."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

from orchestrator.engine.storage import Storage

STOP_FILE = "orchestrator-stop.json"
EXIT_STOPPED = 143  # 128 + SIGTERM: what a process ended by SIGTERM reports
POLL_S = 1.0  # how often rank 0 looks for a marker (a storage request: a HEAD on S3)


def request_stop(folder: Storage, reason: str) -> None:
    folder.write_text(json.dumps({"reason": reason, "at": time.time()}), STOP_FILE)


def clear_stop(folder: Storage) -> None:
    folder.delete(STOP_FILE)


def stop_reason(folder: Storage) -> str | None:
    """The reason of a stop requested in `folder`, or None (also when storage cannot be read now)."""
    try:
        if not folder.exists(STOP_FILE):
            return None
        return str(json.loads(folder.read_text(STOP_FILE)).get("reason") or "stop requested")
    except Exception:  # noqa: BLE001 - a storage hiccup is not a stop request; the next poll looks again
        return None


class StopWatcher:
    """Rank 0's view of the stop markers of its run, read at most every POLL_S; once seen, a stop stays."""

    def __init__(self, markers: list[str], poll_s: float = POLL_S):
        self.folders = [Storage(m) for m in markers]
        self.poll_s = poll_s
        self.reason: str | None = None
        self._last = 0.0

    def requested(self) -> bool:
        now = time.monotonic()
        if self.reason is None and now - self._last >= self.poll_s:
            self._last = now
            self.reason = next((r for r in map(stop_reason, self.folders) if r), None)
        return self.reason is not None


@contextlib.contextmanager
def on_sigterm(handle: Callable[[str], None]) -> Iterator[dict[str, str]]:
    """While inside: the first SIGTERM calls handle(reason) and is otherwise ignored (the run stops at its next
    step boundary); a second one ends the process as SIGTERM does. Yields {"reason": ...} once signalled.
    Outside the main thread (a Tune trial) nothing is installed: the sweep's driver handles the signal."""
    state: dict[str, str] = {}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state:  # the second signal: stop waiting
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        state["reason"] = f"SIGTERM to the driver (pid {os.getpid()})"
        handle(state["reason"])

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)
