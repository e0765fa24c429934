"""One writer per run: a lease in the MLflow store, taken before a run is created or resumed.

The lease of a run is an experiment tag, `orchestrator.lease.<run key>`, holding who writes the run (host,
process id, a random token) and when that process last said so (its heartbeat). The driver refreshes it
every HEARTBEAT_S while the run trains and removes it when the run ends. A second process that finds a
live lease is refused before compute, naming the holder; a lease is dead, and taken over, when its
heartbeat is older than TIMEOUT_S or its process is gone from this machine.

The tag sits on the experiment, not on the run, so two processes starting the same run that does not
exist yet meet on it too. MLflow has no compare-and-set: the taker writes its lease, waits CONFIRM_S and
reads it back; of two processes starting within that window the later write wins and the other is
refused."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from orchestrator.config import ConfigError

HEARTBEAT_S = 10.0
TIMEOUT_S = 60.0
CONFIRM_S = 1.0


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, and when it last said so."""

    host: str
    pid: int
    token: str
    heartbeat: float  # seconds since the epoch

    @classmethod
    def me(cls, token: str) -> Holder:
        return cls(socket.gethostname(), os.getpid(), token, time.time())

    @classmethod
    def parse(cls, text: str | None) -> Holder | None:
        try:
            data = json.loads(text or "")
            return cls(str(data["host"]), int(data["pid"]), str(data["token"]), float(data["heartbeat"]))
        except (ValueError, KeyError, TypeError):
            return None  # no lease, or one this code cannot read: nobody holds it

    def text(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "token": self.token, "heartbeat": self.heartbeat})

    def describe(self, now: float | None = None) -> str:
        age = max(0.0, (now or time.time()) - self.heartbeat)
        return f"process {self.pid} on {self.host} (heartbeat {age:.0f} s ago)"

    def is_live(self, now: float | None = None, timeout_s: float = TIMEOUT_S) -> bool:
        """A recent heartbeat, from a process that still exists where that can be seen (this machine)."""
        if (now or time.time()) - self.heartbeat > timeout_s:
            return False
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        return True


def lease_tag(key: str) -> str:
    from orchestrator.tracking.conventions import LEASE_TAG_PREFIX

    return LEASE_TAG_PREFIX + key


class RunLease:
    """The lease of one run (its run key) in one experiment: acquire() before the run starts, then
    heartbeats while it trains, release() at its end."""

    def __init__(self, client, experiment_id: str, key: str, what: str):
        self.client, self.experiment_id, self.key, self.what = client, experiment_id, key, what
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> Holder | None:
        tags = self.client.get_experiment(self.experiment_id).tags
        return Holder.parse(tags.get(lease_tag(self.key)))

    def refuse_if_held(self) -> None:
        """Read only: a ConfigError naming the holder when another live process holds the lease."""
        holder = self.holder()
        if holder is not None and holder.token != self.token and holder.is_live():
            raise ConfigError(
                f"{self.what} is being written by {holder.describe()}: one process writes a run at a time. "
                f"Wait for it to end, or stop it (its lease lapses {TIMEOUT_S:.0f} s after its last heartbeat)"
            )

    def acquire(self) -> None:
        """Take the lease, or raise the ConfigError of refuse_if_held (also when another process took it
        between our read and our write)."""
        self.refuse_if_held()
        self._write()
        time.sleep(CONFIRM_S)
        self.refuse_if_held()

    def _write(self) -> None:
        self.client.set_experiment_tag(self.experiment_id, lease_tag(self.key), Holder.me(self.token).text())

    def start_heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        """Refresh the lease every `every_s` from a daemon thread; a store that blinks is retried at the next
        beat (a lease lapses only after TIMEOUT_S without one)."""

        def beat():
            while not self._stop.wait(every_s):
                try:
                    self._write()
                except Exception:  # noqa: BLE001 - the next beat tries again
                    pass

        self._thread = threading.Thread(target=beat, name=f"lease-{self.key}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeats and remove the lease if it is still ours (never fails the caller)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = self.holder()
            if holder is not None and holder.token == self.token:
                self.client.delete_experiment_tag(self.experiment_id, lease_tag(self.key))
        except Exception:  # noqa: BLE001 - a lease left behind lapses on its own
            pass
