"""Reading a run config: YAML files, dotted overrides, validation with every error named by its dotted
field, and the flat `a.b.c` view used for MLflow params and tables."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.config.base import ConfigError
from orchestrator.config.run import RunConfig
from orchestrator.config.stages import parse_pipeline


def format_validation_error(err: ValidationError, source: str) -> str:
    """`invalid config (SOURCE):` then one `  dotted.field: message` line per problem."""
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        parts = [str(p) for p in e["loc"] if not str(p).startswith("function-after")]
        # pydantic names the union member it tried (pipeline.0.sft.loss); the user wrote pipeline.0.loss
        parts = [p for i, p in enumerate(parts) if not (i >= 2 and parts[i - 2] == "pipeline" and p in ("sft", "grpo"))]
        loc = ".".join(parts)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "literal_error":
            msg = f"{msg}; got {e.get('input')!r}"
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def _coerce_scalar(text: str) -> Any:
    """Override values are YAML scalars: `1e-5` -> float, `true` -> bool, `[1,2]` -> list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value):
        return float(value)  # YAML 1.1 reads `1e-5` as a string
    return value


def apply_override(tree: dict[str, Any], dotted: str) -> dict[str, Any]:
    """Set `a.b.0.c=value` in a nested dict/list tree (copy-on-write); the value is a YAML scalar."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like field.path=value")
    path, _, raw = dotted.partition("=")
    return set_field(tree, path, _coerce_scalar(raw), what=f"override {dotted!r}")


def set_field(tree: dict[str, Any], path: str, value: Any, what: str | None = None) -> dict[str, Any]:
    """Set the dotted field `path` (list items by index) to `value` in a copy of `tree`. Missing
    sections are created (validation names unknown ones); a shorthand pipeline is expanded on the way."""
    what = what or f"field {path!r}"
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"{what} has an empty field path")
    tree = copy.deepcopy(tree)
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{what}: {where} is not an index of a {len(node)}-element list")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"{what}: {'.'.join(keys[:i])} is not a section")
        if last:
            node[key] = copy.deepcopy(value)
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            if isinstance(node, dict) and key == "pipeline" and isinstance(node[key], str):
                node[key] = parse_pipeline(node[key])
            node = node[key]
    return tree


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping), or a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of fields, got {type(loaded).__name__}")
    return loaded


def load_run_tree(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The unvalidated config tree: defaults, then `base`, then the YAML file, then dotted overrides."""
    # Start from the full defaults, the pipeline as its shorthand so `stages.<kind>` can fill it
    # (an override such as pipeline.0.lr=... expands the shorthand on the way in).
    tree: dict[str, Any] = RunConfig().model_dump(mode="json")
    tree["pipeline"] = RunConfig().pipeline_label()
    if base:
        tree = _deep_merge(tree, base)
    if path is not None:
        tree = _deep_merge(tree, read_yaml_mapping(path, "config file"))
    for item in overrides or []:
        tree = apply_override(tree, item)
    return tree


def validate_run_tree(tree: dict[str, Any], source: str = "defaults") -> RunConfig:
    """A RunConfig, or a ConfigError listing every problem with its dotted field."""
    try:
        return RunConfig.model_validate(tree)
    except ConfigError:
        raise
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> RunConfig:
    """Read YAML (or a dict), apply dotted overrides, validate. Raises ConfigError with every problem."""
    return validate_run_tree(load_run_tree(path, overrides, base), str(path) if path is not None else "defaults")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> `{"a.b.c": value}` (lists by index), for MLflow params and tables."""
    out: dict[str, Any] = {}
    if isinstance(d, BaseModel):
        d = d.model_dump(mode="json")
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, (dict, list)) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out
