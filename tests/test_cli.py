"""The command line itself: `orchestrator config`, every command's help, and `python -m orchestrator`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import build_parser, main
from orchestrator.config import RunConfig, load_run_config

REPO = Path(__file__).resolve().parent.parent
GRPO_PIPELINE = "pipeline=sft:ce -> grpo:ccc"


def comment_text(text: str) -> str:
    """Every comment of a YAML text, joined into one line of words."""
    return " ".join(line.strip().removeprefix("# ") for line in text.splitlines() if line.strip().startswith("#"))


def descriptions(section) -> list[str]:
    """The description of every field of a config section and of the sections inside it."""
    out = []
    for name, field in type(section).model_fields.items():
        out.append(" ".join(field.description.split()))
        value = getattr(section, name)
        for item in value if isinstance(value, list) else [value]:
            if hasattr(type(item), "model_fields"):
                out += descriptions(item)
    return out


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_config_defaults_is_a_documented_template_that_loads_back_to_the_defaults(tmp_path, capsys):
    status, out, _ = run_main(["config", "--defaults"], capsys)
    assert status == 0
    path = tmp_path / "defaults.yaml"
    path.write_text(out)
    assert load_run_config(path) == RunConfig()
    comments = comment_text(out)
    for description in descriptions(RunConfig()):
        assert description in comments
    # each field sits under its own comment
    lines = out.splitlines()
    for before, line in zip(lines, lines[1:]):
        if line.strip() and not line.lstrip().startswith(("#", "-")):
            assert before.lstrip().startswith("#"), f"no comment above {line!r}"


def test_config_defaults_with_a_grpo_stage_documents_its_fields(tmp_path, capsys):
    status, out, _ = run_main(["config", "--defaults", GRPO_PIPELINE, "stages.grpo.beta=0.1"], capsys)
    assert status == 0
    path = tmp_path / "grpo.yaml"
    path.write_text(out)
    expected = load_run_config(overrides=[GRPO_PIPELINE, "stages.grpo.beta=0.1"])
    assert load_run_config(path) == expected
    assert expected.pipeline[1].beta == 0.1
    assert "# one of: k1, k2, k3\n    kl_estimator: k3\n" in out
    assert "Schulman 2020" in comment_text(out)


def test_config_prints_a_file_as_train_resolves_it(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("name: mine\npipeline: sft:softlabel\ndata: {train_size: 100}\n")
    status, out, _ = run_main(["config", str(path), "pipeline.0.psi=binomial"], capsys)
    assert status == 0
    assert yaml.safe_load(out)["pipeline"][0]["psi"] == "binomial"
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    assert load_run_config(printed) == load_run_config(path, ["pipeline.0.psi=binomial"])


def test_config_schema_is_the_run_config_json_schema(capsys):
    status, out, _ = run_main(["config", "--schema"], capsys)
    assert status == 0
    assert json.loads(out) == RunConfig.model_json_schema()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["config"], "config needs a run config file, --defaults or --schema"),
        (["config", "--schema", "seed=1"], "config --schema takes no config file or overrides"),
        (["config", "--defaults", "run.yaml"], "give either --defaults or a config file"),
        (["config", "--defaults", "seed=many"], "seed: Input should be a valid integer"),
    ],
)
def test_config_refuses_what_it_cannot_print(argv, message, capsys):
    status, out, err = run_main(argv, capsys)
    assert status == 2 and out == ""
    assert message in err


def test_config_defaults_and_schema_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["config", "--defaults", "--schema"])
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "sweep", "data", "config", "resend", "ui", "tables"])
def test_every_command_has_a_summary_a_description_and_examples(command):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0]
    summary = {action.dest: action.help for action in commands._choices_actions}[command]
    assert summary and "\n" not in summary
    text = commands.choices[command].format_help()
    assert f"examples:\n  orchestrator {command}" in text
    description = commands.choices[command].description
    assert description and description != summary


def test_python_dash_m_orchestrator_is_the_command():
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: orchestrator ")
    assert "config" in done.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "orchestrator", "config"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2
    assert "error: config needs a run config file" in refused.stderr
