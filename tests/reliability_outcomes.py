"""A pytest plugin (loaded by pyproject's addopts): what became of each fault test the last time it ran.

README.md's list of faults survived is generated from the fault tests (tests/render_reliability.py); it
must not claim a fault survived when its test did not run. This plugin records, for every test of
render_reliability.FAULT_FILES that runs, `passed` (with the figure the test measured, if it recorded one
with `record_property("figure", ...)`), or `skipped` with pytest's reason, in
tests/reliability-outcomes.json (committed beside the tests). A failure is not recorded: it fails the
suite, and a test is listed again once it passes. Tests that did not run keep their earlier record.
"""

from __future__ import annotations

import json
from pathlib import Path

OUTCOMES = Path(__file__).resolve().parent / "reliability-outcomes.json"
_seen: dict[str, dict[str, str]] = {}


def _fault_files() -> tuple[str, ...]:
    import sys

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from render_reliability import FAULT_FILES

    return FAULT_FILES


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ").strip()


def pytest_runtest_logreport(report) -> None:
    path = report.nodeid.split("::")[0]
    if path not in _fault_files():
        return
    if report.skipped:
        _seen[report.nodeid] = {"outcome": "skipped", "reason": _skip_reason(report)}
    elif report.when == "call" and report.passed and report.nodeid not in _seen:
        _seen[report.nodeid] = {"outcome": "passed"}
        figure = dict(getattr(report, "user_properties", ())).get("figure")
        if figure:
            _seen[report.nodeid]["figure"] = str(figure)
    elif report.failed:
        _seen.pop(report.nodeid, None)  # a failure is the suite's news, not the README's


def read_outcomes(path: Path = OUTCOMES) -> dict[str, dict[str, str]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _seen:
        return
    outcomes = {**read_outcomes(), **_seen}
    text = json.dumps(dict(sorted(outcomes.items())), indent=1) + "\n"
    if not OUTCOMES.is_file() or OUTCOMES.read_text() != text:
        OUTCOMES.write_text(text)
