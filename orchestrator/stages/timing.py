"""Wall-clock phases of a run, summed per phase."""

from __future__ import annotations

import contextlib
import time


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
