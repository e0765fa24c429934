"""orchestrator.compat: the patches of third-party internals, and the version check at its import.

What must hold: a patched package at another version than the one its patches were written for stops
the import with an error naming the package, both versions, the patches and the ways on; the override
lets it through with a warning; the versions checked are the pins of pyproject.toml; each patch does
what it says."""

import copy
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator import compat

ROOT = Path(__file__).resolve().parents[1]


def installed_as(**versions):
    """An `installed` lookup that reports the given versions and the pinned one for the rest."""
    return lambda package: versions.get(package, compat.PATCHED_VERSIONS[package])


def test_the_checked_versions_are_the_pins_of_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    for package, version in compat.PATCHED_VERSIONS.items():
        assert re.search(rf'"{package}=={re.escape(version)}"', text), package


def test_every_registered_patch_is_a_function_of_compat():
    names = [name for patches in compat.PATCHES.values() for name in patches]
    assert sorted(names) == sorted(
        ["skip_deepspeed_cpu_shm_op", "replace_fp32_clipping", "disable_backward_allreduce", "zero3_hooks_removed",
         "override_forward"]
    )
    assert all(callable(getattr(compat, name)) for name in names)


def test_pinned_versions_pass_silently(recwarn):
    compat.check_versions(environ={}, installed=installed_as())
    compat.check_versions(environ={}, installed=installed_as(deepspeed="0.19.8+cpu"))  # a local build label
    compat.check_versions(environ={}, installed=lambda package: None)  # not installed: nothing to patch
    assert not recwarn.list


def test_a_mismatched_version_is_a_clear_error():
    with pytest.raises(compat.UntestedVersionError) as error:
        compat.check_versions(environ={}, installed=installed_as(transformers="5.17.0"))
    message = str(error.value)
    assert "transformers 5.17.0 is installed" in message and "written for transformers 5.23.0" in message
    assert "override_forward" in message and "pip install 'transformers==5.23.0'" in message
    assert "ORCHESTRATOR_UNTESTED_VERSIONS=1" in message
    assert "deepspeed" not in message  # only the package that differs


@pytest.mark.parametrize("value", ["0", "", "true"])
def test_only_the_value_1_overrides(value):
    with pytest.raises(compat.UntestedVersionError):
        compat.check_versions(environ={compat.UNTESTED_VERSIONS_ENV: value}, installed=installed_as(deepspeed="0.20.0"))


def test_the_override_runs_with_a_warning_naming_the_mismatch():
    with pytest.warns(compat.UntestedVersionWarning, match=r"deepspeed 0\.20\.0 is installed.*0\.19\.8"):
        compat.check_versions(
            environ={compat.UNTESTED_VERSIONS_ENV: "1"}, installed=installed_as(deepspeed="0.20.0")
        )


IMPORT_WITH_TRANSFORMERS_5_17 = """
import importlib.metadata as metadata
real = metadata.version
metadata.version = lambda name: "5.17.0" if name == "transformers" else real(name)
import orchestrator.compat
print("imported")
"""


def import_compat(**env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != compat.UNTESTED_VERSIONS_ENV} | env
    return subprocess.run(
        [sys.executable, "-c", IMPORT_WITH_TRANSFORMERS_5_17], cwd=ROOT, env=environ, capture_output=True,
        text=True, timeout=60,
    )


def test_the_check_runs_at_import():
    refused = import_compat()
    assert refused.returncode != 0 and "imported" not in refused.stdout
    assert "UntestedVersionError" in refused.stderr and "transformers 5.17.0 is installed" in refused.stderr
    allowed = import_compat(**{compat.UNTESTED_VERSIONS_ENV: "1"})
    assert allowed.returncode == 0 and "imported" in allowed.stdout
    assert "UntestedVersionWarning" in allowed.stderr and "transformers 5.17.0" in allowed.stderr


def test_deepspeeds_cpu_shared_memory_op_is_never_built():
    comm = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` is also torch itself

    compat.skip_deepspeed_cpu_shm_op()
    assert comm.build_shm_op() is None  # unpatched, this JIT-compiles the op


def test_override_forward_binds_to_the_instance_only_and_once():
    def doubled(module, x):
        return 2 * type(module).forward(module, x)

    def tripled(module, x):
        return 3 * type(module).forward(module, x)

    layer, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    x = torch.ones(1, 2)
    plain = layer(x)
    assert not compat.has_own_forward(layer)
    compat.override_forward(layer, doubled)
    compat.override_forward(layer, tripled)  # already overridden: kept
    assert compat.has_own_forward(layer) and not compat.has_own_forward(other)
    assert torch.equal(layer(x), 2 * plain)
    copied = copy.deepcopy(layer)
    assert copied.forward.__self__ is copied
