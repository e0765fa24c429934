"""Render README.md's Reliability section from the test tables, so the README lists exactly what is tested.

    python tests/render_reliability.py           # print the section
    python tests/render_reliability.py --write   # rewrite it in README.md, between the markers

Sources: the bad-input tables of tests/test_bad_input.py (CASES, OUTPUT_CASES), the security table of
tests/test_security.py (SECURITY_CHECKS, INFRA_CHECKS), and the fault tests found in FAULT_FILES (one
line per test function: its docstring's first sentence, else its name in words), each with what became of
it the last time it ran (tests/reliability-outcomes.json, kept by the tests/reliability_outcomes.py pytest
plugin): a test that skipped is listed as skipped, with pytest's reason, and one never run as not run.
tests/test_bad_input.py fails while the README's section differs from this rendering.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN = "<!-- reliability:begin (generated from the tests; see tests/test_bad_input.py) -->"
END = "<!-- reliability:end -->"
FAULT_FILES = ("tests/test_e2e_faults.py", "tests/test_e2e_reliability.py", "tests/test_e2e_cluster.py",
               "tests/test_tracking.py")
OUTCOMES = Path(__file__).resolve().parent / "reliability-outcomes.json"


def _summary(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line, without its full stop."""
    if not doc:
        return ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s+(?=[A-Z])", paragraph)[0].rstrip(".")


def fault_tests(root: Path = ROOT, outcomes: dict[str, dict[str, str]] | None = None) -> dict[str, list[str]]:
    """file -> one line per top-level test function, its docstring's first sentence or else its name in
    words (read with ast: nothing is imported or run), then what became of it when it last ran; a file that
    does not exist yet maps to []."""
    outcomes = read_outcomes() if outcomes is None else outcomes
    out: dict[str, list[str]] = {}
    for rel in FAULT_FILES:
        path = root / rel
        if not path.is_file():
            out[rel] = []
            continue
        lines = []
        for node in ast.parse(path.read_text(), rel).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                text = _summary(ast.get_docstring(node)) or node.name.removeprefix("test_").replace("_", " ")
                lines.append(text[:1].upper() + text[1:] + _outcome_note(outcomes.get(f"{rel}::{node.name}")))
        out[rel] = lines
    return out


def read_outcomes(path: Path = OUTCOMES) -> dict[str, dict[str, str]]:
    """test node id -> {"outcome": "passed" | "skipped", "reason" or "figure"} from the tests' last runs."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _outcome_note(outcome: dict[str, str] | None) -> str:
    if outcome is None:
        return " — **not run yet**"
    if outcome.get("outcome") == "skipped":
        return f" — **skipped** in its last run: {outcome.get('reason') or 'no reason given'}"
    return f" — last run: {outcome['figure']}" if outcome.get("figure") else ""


def _tables():
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # run as a script from elsewhere
        sys.path.insert(0, here)
    import test_bad_input
    import test_security

    return test_bad_input, test_security


def render_section() -> str:
    """The section's body, markers included."""
    bad, sec = _tables()
    lines = [
        BEGIN,
        "_Generated from the tests by `python tests/render_reliability.py --write`; "
        "`tests/test_bad_input.py` fails when this list is stale._",
        "",
        "**Bad input is refused before any compute**, with one message naming the problem and exit status 2, "
        "no MLflow run created or changed (none left `RUNNING`), and nothing already written overwritten "
        "(`tests/test_bad_input.py`; the quoted text is part of the message):",
        "",
    ]
    for area, title in bad.AREAS.items():
        lines.append(f"- {title}")
        lines += [f"  - {case.line()}" for case in bad.CASES if case.area == area]
    lines.append("- Model outputs: never an exception; a parse failure is counted in `parse_fail_rate` and scored "
                 "by `eval.parse_failure`")
    lines += [f"  - {case.line()}" for case in bad.OUTPUT_CASES]
    lines += ["", "**Security defaults** (`tests/test_security.py`, and `tests/test_infra.py` for the scripts):", ""]
    lines += [f"- {text}" for text in sec.SECURITY_CHECKS.values()]
    lines += [f"- {text} (`tests/test_infra.py`)" for text in sec.INFRA_CHECKS.values()]
    lines += ["", "**Faults survived** (each test's last outcome: `tests/reliability-outcomes.json`):", ""]
    faults = fault_tests()
    for rel, tests in faults.items():
        if tests:
            lines.append(f"- `{rel}`")
            lines += [f"  - {t}" for t in tests]
        else:
            lines.append(f"- `{rel}`: not written yet")
    n_bad = len(bad.CASES) + len(bad.OUTPUT_CASES)
    n_sec = len(sec.SECURITY_CHECKS) + len(sec.INFRA_CHECKS)
    n_faults = sum(len(t) for t in faults.values())
    unproven = sum("— **" in t for tests in faults.values() for t in tests)
    tail = f" ({unproven} of them skipped or not run in their last run, marked above)" if unproven else ""
    lines += ["", f"{n_bad} bad-input cases, {n_sec} security checks, {n_faults} fault tests{tail}.", END]
    return "\n".join(lines)


def readme_section(readme: Path = README) -> str:
    """The section as README.md has it now, markers included."""
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} lacks the markers {BEGIN!r} ... {END!r}")
    return text[start : end + len(END)]


def write_readme(readme: Path = README) -> bool:
    """Replace the section in README.md; True if it changed. Nothing outside the markers is touched."""
    text = readme.read_text()
    current = readme_section(readme)
    new = render_section()
    if current == new:
        return False
    readme.write_text(text.replace(current, new, 1))
    return True


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        print("README.md updated" if write_readme() else "README.md already up to date")
    elif sys.argv[1:]:
        sys.exit(__doc__)
    else:
        print(render_section())
