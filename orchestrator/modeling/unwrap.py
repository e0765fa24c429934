"""The model inside its wrappers."""

from __future__ import annotations

from torch import nn


def base_model(module: nn.Module) -> nn.Module:
    """The transformers model under a DeepSpeed engine and/or a peft wrapper."""
    module = getattr(module, "module", module)  # DeepSpeed engine
    if hasattr(module, "get_base_model"):  # peft
        module = module.get_base_model()
    return module
