"""What every config section shares: the strict base class, the user-error type, path resolution."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A user error in a config file or override, raised before any compute starts."""


def resolve_path(path: str | Path) -> Path:
    """Absolute paths stay; relative ones (data.root, storage_path, ./mlruns) are taken against
    $ORCHESTRATOR_HOME when set, else the current directory. A `ray job submit` driver runs in a copy
    of the working dir, so the scripts in infra/ set ORCHESTRATOR_HOME to keep results in the checkout."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return (Path(os.environ.get("ORCHESTRATOR_HOME") or Path.cwd()) / p).resolve()


def resolve_storage(location: str) -> str:
    """Ray Train storage: a URI (s3://, gs://, file://...) passes through untouched; a path is resolved."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", location):
        return location
    return str(resolve_path(location))


class StrictSection(BaseModel):
    """A config section: unknown keys are refused and assignments validated, so a typo is an error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def expand_dotted(values: Any) -> Any:
    """`{"manifest.path": x}` -> `{"manifest": {"path": x}}`, so `orchestrator data build NAME a.b=v` reaches
    nested sections."""
    if not isinstance(values, dict) or not any(isinstance(k, str) and "." in k for k in values):
        return values
    out: dict[str, Any] = {}
    for key, value in values.items():
        parts = key.split(".") if isinstance(key, str) else [key]
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, BaseModel):
                child = child.model_dump()
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        if isinstance(node.get(parts[-1]), dict) and isinstance(value, dict):
            node[parts[-1]] = {**node[parts[-1]], **value}
        else:
            node[parts[-1]] = value
    return out
