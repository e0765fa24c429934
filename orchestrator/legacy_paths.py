"""The module paths of the first, flat layout that the README documented as public
(`orchestrator.evaluate.parse_answer`, `orchestrator.tables.write_tables`, ...) keep importing: each old
module is a thin view whose names resolve, on first use, in the module(s) that hold them now."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

MOVED = {
    "orchestrator.evaluate": ("orchestrator.methods.answers", "orchestrator.methods.metrics"),
    "orchestrator.losses": ("orchestrator.methods.losses",),
    "orchestrator.rewards": ("orchestrator.methods.rewards",),
    "orchestrator.grpo": ("orchestrator.methods.grpo",),
    "orchestrator.rvtc": ("orchestrator.methods.rvtc",),
    "orchestrator.tables": ("orchestrator.reporting.tables",),
    "orchestrator.plots": ("orchestrator.reporting.plots",),
}


class MovedModule(types.ModuleType):
    """An old module path: attribute lookups go to the new homes, in order."""

    def __init__(self, name: str, homes: tuple[str, ...]):
        super().__init__(name, f"Moved: its names now live in {', '.join(homes)}.")
        self.__homes = homes

    def __getattr__(self, attr: str):
        for home in self.__homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (now {', '.join(self.__homes)}) has no attribute {attr!r}")

    def __dir__(self):
        return sorted({name for home in self.__homes for name in dir(importlib.import_module(home))})


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Consulted after the regular finders, so it only answers for paths no file provides."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return MovedModule(spec.name, MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
