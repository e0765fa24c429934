"""The README's public import paths of the first, flat layout still import, from their new homes."""

import importlib
import subprocess
import sys

import pytest

from orchestrator.legacy_paths import MOVED

README_PUBLIC = [
    ("orchestrator.evaluate", "parse_answer", "orchestrator.methods.answers"),
    ("orchestrator.evaluate", "dir_metrics", "orchestrator.methods.metrics"),
    ("orchestrator.losses", "softlabel_target", "orchestrator.methods.losses"),
    ("orchestrator.losses", "dist2_target", "orchestrator.methods.losses"),
    ("orchestrator.rewards", "ccc", "orchestrator.methods.metrics"),
    ("orchestrator.rewards", "batch_ccc_rewards", "orchestrator.methods.rewards"),
    ("orchestrator.grpo", "group_advantages", "orchestrator.methods.grpo"),
    ("orchestrator.rvtc", "bin_centres", "orchestrator.methods.rvtc"),
    ("orchestrator.rvtc", "rvtc_loss", "orchestrator.methods.rvtc"),
    ("orchestrator.tables", "write_tables", "orchestrator.reporting.tables"),
    ("orchestrator.plots", "cell_plots", "orchestrator.reporting.plots"),
    ("orchestrator.data", "load_image", "orchestrator.data.images"),
]


@pytest.mark.parametrize("old, name, home", README_PUBLIC)
def test_old_paths_give_the_same_objects(old, name, home):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(home), name)


def test_from_imports_and_a_fresh_interpreter():
    code = (
        "from orchestrator.evaluate import parse_answer, dir_metrics; "
        "from orchestrator.tables import write_tables; "
        "import orchestrator.grpo as g; "
        "print(parse_answer('<answer>12</answer>'), g.group_advantages([1.0, 3.0], 2, scale=False).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["12.0", "[-1.0,", "1.0]"]


def test_an_unknown_name_on_an_old_path_names_the_new_homes():
    with pytest.raises(AttributeError, match="orchestrator.evaluate.*methods.answers.*no attribute 'nope'"):
        importlib.import_module("orchestrator.evaluate").nope
    assert set(MOVED) >= {old for old, _, _ in README_PUBLIC if old != "orchestrator.data"}
