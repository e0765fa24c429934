"""The README's generated list of faults says what became of each fault test when it last ran."""

from types import SimpleNamespace

import reliability_outcomes
from render_reliability import fault_tests

DISK = "tests/test_e2e_faults.py::test_a_full_disk_fails_clearly_and_keeps_the_last_good_checkpoint"


def line_of(faults, start: str) -> str:
    (line,) = [t for t in faults["tests/test_e2e_faults.py"] if t.startswith(start)]
    return line


def test_a_skipped_fault_test_is_listed_as_skipped_with_its_reason():
    passed = fault_tests(outcomes={DISK: {"outcome": "passed"}})
    assert line_of(passed, "The checkpoint disk fills up").endswith("resumes from it into the same MLflow run")
    skipped = fault_tests(outcomes={DISK: {"outcome": "skipped", "reason": "cannot mount a small filesystem"}})
    assert line_of(skipped, "The checkpoint disk fills up").endswith(
        "same MLflow run — **skipped** in its last run: cannot mount a small filesystem")
    measured = fault_tests(outcomes={DISK: {"outcome": "passed", "figure": "full after step 10, resumed at 10"}})
    assert line_of(measured, "The checkpoint disk fills up").endswith(
        "same MLflow run — last run: full after step 10, resumed at 10")
    never = fault_tests(outcomes={})
    assert line_of(never, "The checkpoint disk fills up").endswith("— **not run yet**")


def test_the_plugin_records_passes_and_skips_and_keeps_earlier_records(tmp_path, monkeypatch):
    outcomes = tmp_path / "outcomes.json"
    outcomes.write_text('{"tests/test_tracking.py::test_old": {"outcome": "passed"}}')
    monkeypatch.setattr(reliability_outcomes, "OUTCOMES", outcomes)
    monkeypatch.setattr(reliability_outcomes, "_seen", {})
    monkeypatch.setattr(reliability_outcomes, "read_outcomes", lambda: reliability_outcomes.json.loads(
        outcomes.read_text()))

    def report(nodeid, when, outcome, longrepr=None, figure=None):
        return SimpleNamespace(nodeid=nodeid, when=when, skipped=outcome == "skipped", passed=outcome == "passed",
                               failed=outcome == "failed", longrepr=longrepr,
                               user_properties=[("figure", figure)] if figure else [])

    log = reliability_outcomes.pytest_runtest_logreport
    log(report(DISK, "setup", "skipped", ("test_e2e_faults.py", 3, "Skipped: cannot mount a small filesystem")))
    log(report("tests/test_e2e_reliability.py::test_b", "setup", "passed"))
    log(report("tests/test_e2e_reliability.py::test_b", "call", "passed", figure="SIGTERM at step 7: resumed at 7"))
    log(report("tests/test_e2e_reliability.py::test_c", "call", "failed"))  # not recorded: the suite fails
    log(report("tests/test_sweep.py::test_not_a_fault_test", "call", "passed"))
    reliability_outcomes.pytest_sessionfinish(None, 0)
    assert reliability_outcomes.json.loads(outcomes.read_text()) == {
        DISK: {"outcome": "skipped", "reason": "cannot mount a small filesystem"},
        "tests/test_e2e_reliability.py::test_b": {"outcome": "passed", "figure": "SIGTERM at step 7: resumed at 7"},
        "tests/test_tracking.py::test_old": {"outcome": "passed"},
    }
