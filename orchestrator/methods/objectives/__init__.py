"""SFT objectives (METHODS §3), one module each: `ce`, `softlabel`, `dist2` on the answer tokens, and
`rvtc`, which owns a classification head. Every module of this folder is imported here (the four of
METHODS first, in its order), so adding an objective is adding one file that registers itself in
SFT_OBJECTIVES (README, "Adding a method")."""

import importlib
import pkgutil

from orchestrator.methods.objectives.base import SFT_OBJECTIVES, SFTObjective, TokenObjective

for _name in ("ce", "softlabel", "dist2", "rvtc", *sorted(m.name for m in pkgutil.iter_modules(__path__))):
    if _name != "base":
        importlib.import_module(f"{__name__}.{_name}")

__all__ = ["SFT_OBJECTIVES", "SFTObjective", "TokenObjective"]
