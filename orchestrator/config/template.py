"""A config as YAML with every field's description as a comment above it, and the run config's JSON
schema: what `orchestrator config` prints. The YAML loads back to the same config."""

from __future__ import annotations

import json
import textwrap
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from orchestrator.config.run import RunConfig

COMMENT_WIDTH = 100  # characters of a comment line, its indentation included
INDENT = "  "


def run_config_schema() -> dict[str, Any]:
    """The JSON schema of a run config: every section, field, type, bound, default and description."""
    return RunConfig.model_json_schema()


def documented_yaml(section: BaseModel, header: str = "") -> str:
    """`section` as block YAML, each field preceded by its description (and its choices) as comments, a
    blank line between top-level fields; `header` (a paragraph) opens the text as a comment."""
    blocks = [_comment(header, "")] if header else []
    blocks += [_field_lines(section, name, "") for name in type(section).model_fields]
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


def _section_lines(section: BaseModel, indent: str) -> list[str]:
    # A stage's `kind` leads: it says which of the fields below apply.
    names = sorted(type(section).model_fields, key=lambda name: name != "kind")
    return [line for name in names for line in _field_lines(section, name, indent)]


def _field_lines(section: BaseModel, name: str, indent: str) -> list[str]:
    field = type(section).model_fields[name]
    lines = _comment(field.description or "", indent)
    choices = _choices(field.annotation)
    if len(choices) > 1:
        lines += _comment(f"one of: {', '.join(choices)}", indent)
    return lines + _value_lines(name, getattr(section, name), indent)


def _value_lines(name: str, value: Any, indent: str) -> list[str]:
    if isinstance(value, BaseModel):
        return [f"{indent}{name}:", *_section_lines(value, indent + INDENT)]
    if isinstance(value, list) and value and all(isinstance(item, BaseModel) for item in value):
        lines = [f"{indent}{name}:"]
        for item in value:  # `-` alone on its line: the item's fields follow, each under its comment
            lines += [f"{indent}{INDENT}-", *_section_lines(item, indent + 2 * INDENT)]
        return lines
    return [f"{indent}{name}: {_flow_yaml(to_jsonable_python(value))}"]


def _flow_yaml(value: Any) -> str:
    """One line of YAML for a plain value (lists and mappings in flow style: `[val, test]`)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1e9).removesuffix("...\n").strip()
    # A string with line breaks would span lines; JSON, which is YAML too, writes it on one with escapes.
    return json.dumps(value, ensure_ascii=False) if "\n" in text else text


def _comment(text: str, indent: str) -> list[str]:
    width = max(40, COMMENT_WIDTH - len(indent) - 2)
    return [f"{indent}# {line}" for line in textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)]


def _choices(annotation: Any) -> list[str]:
    """The values a Literal field takes; none for any other type."""
    if get_origin(annotation) is Literal:
        return [str(v) for v in get_args(annotation)]
    return []
