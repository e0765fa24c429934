"""The sweep's live console view of its cells."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from orchestrator.tracking.conventions import CELL_TAG, ERROR_TAG, tag_equals, tracking_client


def _last_error_line(path: str | None) -> str:
    """The exception line of a trial's error file (Tune writes the whole traceback there): the last one, which
    for a cell that failed in training is the driver's RunFailed (or RunStopped) with the run's cause."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()] if path else []
    except OSError:
        return ""
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|RunFailed|RunStopped)\b", ln)]
    return (errors[-1] if errors else lines[-1] if lines else "")[:300]


class SweepProgress:
    """The live view: a line per cell event, and every `every_s` seconds the cells' states and the
    latest training metrics of the running ones (read from MLflow, where rank 0 logs them)."""

    def __init__(self, names: dict[int, str], uri: str, experiment: str, done_before: int, total: int,
                 every_s: float = float(os.environ.get("ORCHESTRATOR_PROGRESS_EVERY_S", 30)), out=None):
        self.names, self.uri, self.experiment, self.total, self.every_s = names, uri, experiment, total, every_s
        self.done_before = done_before
        self.out = out or sys.stdout
        self.state: dict[str, str] = {n: "pending" for n in names.values()}
        self.started: dict[str, float] = {}
        self.last = 0.0
        self.failed: dict[str, str] = {}

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks with the experiment's state; the console stream is not picklable (under
        pytest's capture, or any file-like object), and a restored copy prints to sys.stdout."""
        return {k: v for k, v in self.__dict__.items() if k != "out"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, out=sys.stdout)

    def _name(self, trial) -> str:
        return self.names.get(trial.config.get("cell"), str(trial))

    def _print(self, text: str) -> None:
        print(f"[sweep {time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)

    def start(self, trial) -> None:
        name = self._name(trial)
        self.state[name], self.started[name] = "running", time.time()
        self._print(f"started  {name}")

    def complete(self, trial) -> None:
        name = self._name(trial)
        self.state[name] = "done"
        mae = (trial.last_result or {}).get("test/all/mae")
        took = time.time() - self.started.get(name, time.time())
        self._print(f"finished {name} in {took:.0f} s" + (f" — test/all/mae {mae:.3f}" if mae is not None else ""))
        self.summary(force=True)

    def error(self, trial) -> None:
        name = self._name(trial)
        self.state[name] = "failed"
        self.failed[name] = _last_error_line(trial.error_file) or f"see the cell's MLflow run (tag {ERROR_TAG})"
        self._print(f"FAILED   {name}: {self.failed[name]}")
        self.summary(force=True)

    def summary(self, force: bool = False) -> None:
        if not force and time.time() - self.last < self.every_s:
            return
        self.last = time.time()
        counts = {s: sum(v == s for v in self.state.values()) for s in ("done", "running", "failed", "pending")}
        done = counts["done"] + self.done_before
        line = (f"cells {done}/{self.total} done, {counts['running']} running, {counts['failed']} failed, "
                f"{counts['pending']} pending")
        live = [self._latest(n) for n, s in self.state.items() if s == "running"]
        self._print(line + "".join(f" | {x}" for x in live if x))

    def _latest(self, name: str) -> str:
        """`name: step N, loss x, reward/mean y` from the cell's MLflow run, or why it says nothing yet."""
        try:
            client = tracking_client(self.uri)
            exp = client.get_experiment_by_name(self.experiment)
            runs = client.search_runs([exp.experiment_id], filter_string=tag_equals(CELL_TAG, name), max_results=1)
            if not runs:
                return f"{name}: starting"
            m = runs[0].data.metrics
            step = next((int(x.step) for x in client.get_metric_history(runs[0].info.run_id, "train/loss")[-1:]), None)
            shown = [f"{k.split('/', 1)[1]} {m[k]:.3g}" for k in ("train/loss", "train/reward/mean") if k in m]
            bits = [f"step {step}" if step is not None else "", *shown]
            return f"{name}: " + ", ".join(b for b in bits if b) if any(bits) else f"{name}: starting"
        except Exception as exc:  # the view must never break the sweep
            return f"{name}: ({type(exc).__name__}: {exc})"[:200]


def _tune_callback(progress: SweepProgress):
    from ray import tune

    class _Callback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            progress.start(trial)

        def on_trial_complete(self, iteration, trials, trial, **info):
            progress.complete(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            progress.error(trial)

        def on_step_end(self, iteration, trials, **info):
            progress.summary()

    return _Callback()
