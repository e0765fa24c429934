"""Every patch of a third-party package's internals, in one module.

A few behaviours this project needs have no switch in DeepSpeed's or transformers' public API, so
they are set inside those packages' objects. Each such patch is one small function here, registered
with the package it touches, and was written against one version of that package (the pins in
pyproject.toml, `PATCHED_VERSIONS`). Another version may rename or move what a patch touches, and a
patch that silently stops applying changes results without an error. So importing this module
checks the installed versions: a mismatch raises UntestedVersionError, naming the package, both
versions and the patches, unless ORCHESTRATOR_UNTESTED_VERSIONS=1 is set, which runs anyway with a
warning (for an image that ships another version, after checking the patches still apply).

The check reads installed metadata only: importing this module imports no patched package."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

PATCHED_VERSIONS = {"deepspeed": "0.19.8", "transformers": "5.23.0"}
UNTESTED_VERSIONS_ENV = "ORCHESTRATOR_UNTESTED_VERSIONS"
PATCHES: dict[str, list[str]] = {package: [] for package in PATCHED_VERSIONS}  # package -> its patches


class UntestedVersionError(RuntimeError):
    """An installed package is not the version this module's patches of its internals were written for."""


class UntestedVersionWarning(UserWarning):
    """The same mismatch, let through by ORCHESTRATOR_UNTESTED_VERSIONS=1."""


def _patch_of(package: str) -> Callable[[Callable], Callable]:
    """Register the decorated function as a patch of `package`, so the version check names it."""

    def register(patch: Callable) -> Callable:
        PATCHES[package].append(patch.__name__)
        return patch

    return register


# ----------------------------------------------------------------------------------------------- DeepSpeed


@_patch_of("deepspeed")
def skip_deepspeed_cpu_shm_op() -> None:
    """Mark DeepSpeed's shared-memory all-reduce op unavailable
    (`deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False`).

    DeepSpeed JIT-compiles that op (a minute or more) the first time its comm layer starts on CPU. It
    serves DeepSpeed inference, not ZeRO training over gloo, so marking it unavailable loses nothing
    and nothing compiles."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@_patch_of("deepspeed")
def replace_fp32_clipping(engine: Any, clip: Callable[[], None]) -> None:
    """Replace the engine's `clip_fp32_gradients` method (on this instance only) by `clip`.

    DeepSpeed calls that method before an fp32 ZeRO-0 optimizer step; its own version all-reduces the
    gradient norm over the workers, although under ZeRO-0 every worker already holds the same averaged
    gradients. `clip` (engine.deepspeed.clip_averaged_gradients_) gives the same scale without that
    collective."""
    engine.clip_fp32_gradients = clip


@_patch_of("deepspeed")
def disable_backward_allreduce(engine: Any) -> None:
    """Set the engine's `enable_backward_allreduce` flag to False: DeepSpeed then no longer averages the
    gradients over the workers after each backward. Used where the project averages them itself,
    through shared memory (engine.shared_grads), before each optimizer step."""
    engine.enable_backward_allreduce = False


@_patch_of("deepspeed")
@contextlib.contextmanager
def zero3_hooks_removed(engine: Any):
    """Inside the block, the ZeRO-3 engine's module runs without DeepSpeed's per-module forward and backward
    hooks (its optimizer's `parameter_offload.forward_hooks` / `backward_hooks`, each parameter's
    `ds_active_sub_modules` cleared), and they are registered again after it (`_register_deepspeed_module`,
    the parameter coordinator's trace invalidated), as TRL does around generation.

    With every parameter already gathered (GatheredParameters), the hooks only cost time: generation runs
    the model once per new token, and each run would go through them for every submodule."""
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    for param in offload.module.parameters(recurse=True):
        param.ds_active_sub_modules.clear()
    for hook in (*offload.forward_hooks, *offload.backward_hooks):
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        coordinator = getattr(offload, "param_coordinator", None)
        if coordinator is not None and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()
        offload._register_deepspeed_module(offload.module)


# -------------------------------------------------------------------------------------------- transformers


@_patch_of("transformers")
def override_forward(module: Any, forward: Callable[..., Any]) -> None:
    """Give one module instance (a transformers decoder layer) its own `forward`, bound to it; the class
    and every other instance keep theirs, and a module that already has its own forward keeps it.

    modeling.last_layer uses it to let the model's own forward call pass one more keyword through to
    its last decoder layer. It relies on transformers' decoder models passing their extra keyword
    arguments on to every decoder layer, with the layer's inputs as keywords (attention_mask,
    position_embeddings, past_key_values)."""
    if not has_own_forward(module):
        module.forward = types.MethodType(forward, module)  # a deep copy of the module rebinds it to the copy


def has_own_forward(module: Any) -> bool:
    """Whether `override_forward` gave this instance a forward of its own."""
    return "forward" in vars(module)


# ------------------------------------------------------------------------------------------- version check


def installed_version(package: str) -> str | None:
    """The installed distribution's version, None when it is not installed (then nothing is patched)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_mismatches(installed: Callable[[str], str | None] = installed_version) -> list[str]:
    """One sentence per patched package whose installed version is not the one its patches were written
    for. A local build label (`0.19.8+abc`) does not count as a different version."""
    mismatches = []
    for package, wanted in PATCHED_VERSIONS.items():
        found = installed(package)
        if found is None or found.split("+")[0] == wanted:
            continue
        mismatches.append(
            f"{package} {found} is installed, but orchestrator/compat.py's patches of its internals "
            f"({', '.join(PATCHES[package])}) were written for {package} {wanted}: "
            f"pip install '{package}=={wanted}'"
        )
    return mismatches


def check_versions(
    environ: Mapping[str, str] = os.environ, installed: Callable[[str], str | None] = installed_version
) -> None:
    """Raise UntestedVersionError on a version mismatch; only warn when ORCHESTRATOR_UNTESTED_VERSIONS=1."""
    mismatches = version_mismatches(installed)
    if not mismatches:
        return
    listed = "\n  ".join(mismatches)
    if environ.get(UNTESTED_VERSIONS_ENV) == "1":
        warnings.warn(
            f"running with untested versions ({UNTESTED_VERSIONS_ENV}=1); the patches may not apply:\n  {listed}",
            UntestedVersionWarning,
            stacklevel=2,
        )
        return
    raise UntestedVersionError(
        f"untested package versions:\n  {listed}\n"
        f"Install the pinned versions, or set {UNTESTED_VERSIONS_ENV}=1 to run anyway with a warning "
        "(after checking that the patches above still apply to the installed versions)."
    )


check_versions()
