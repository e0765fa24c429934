"""A run's time budget (timeout_s), enforced inside Ray Train's controller.

A worker stuck in a reward that never returns never reaches a step boundary, so the budget cannot be a
check in the training loop. The controller actor runs on the driver's node; at the deadline this callback
ends the controller's process. Its worker group and their resources go with it (Ray cleans up the actors
a process owns), fit() raises in the driver, and the driver marks the run FAILED "timed out after N s"."""

from __future__ import annotations

import os
import threading
import time

from ray.train.v2._internal.execution.callback import ControllerCallback


class RunDeadline(ControllerCallback):
    """Ends the Ray Train controller (and so the run's workers) at `deadline`, seconds since the epoch."""

    def __init__(self, deadline: float, run_name: str):
        self.deadline, self.run_name = deadline, run_name

    def after_controller_start(self, train_run_context) -> None:
        threading.Thread(target=self._expire, name="run-deadline", daemon=True).start()

    def _expire(self) -> None:
        while (left := self.deadline - time.time()) > 0:
            time.sleep(min(left, 5.0))
        print(f"run {self.run_name}: time budget spent, stopping its workers", flush=True)
        os._exit(1)
