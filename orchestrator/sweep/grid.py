"""Ablation YAML -> cells: axes, paired fields, exclusions, names, preflight."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from orchestrator.config import (
    ConfigError,
    GRPOStage,
    RunConfig,
    SFTStage,
    StrictSection,
    flatten,
    load_run_tree,
    read_yaml_mapping,
    resolve_path,
    set_field,
    validate_run_tree,
)
from orchestrator.tracking.conventions import config_hash, normalize_pipeline

STAGE_KINDS = {"sft": SFTStage, "grpo": GRPOStage}


class AblationConfig(StrictSection):
    """One ablation: a base run config and the axes to cross. Every field below is optional but `name`."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.\-]+$", description="Names the sweep, its parent run and its cells.")
    description: str = ""
    experiment: str | None = Field(None, description="MLflow experiment; default: the ablation's name.")
    base: str | dict[str, Any] = Field(
        default_factory=dict, description="A run-config YAML (relative to this file) or an inline run config."
    )
    overrides: list[str] = Field(default_factory=list, description="Dotted overrides applied to the base.")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="Field -> values; the cells cross them.")
    paired: list[dict[str, list[Any]]] = Field(
        default_factory=list, description="Groups of fields whose value lists advance together (zipped)."
    )
    exclude: list[dict[str, Any]] = Field(
        default_factory=list, description="A cell matching every field=value of an entry is dropped."
    )
    baseline: str | None = Field(None, description="Pipeline the tables' Δ rows compare against.")
    max_concurrent: int | None = Field(None, ge=1, description="Cells at once; default: as many as the CPUs/GPUs fit.")
    max_failures: int = Field(
        0, ge=0, description="Worker-group restarts per cell (Ray Train's, from its latest checkpoint); a cell "
        "whose restarts are spent fails, and Tune does not start it again.",
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Wall-clock budget of each cell in seconds, overriding the base's timeout_s; a "
        "cell over it is FAILED with 'timed out after N s' and the sweep goes on.",
    )

    @field_validator("axes")
    @classmethod
    def _axes_well_formed(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, values in axes.items():
            _check_values(f"axes.{name}", values)
        return axes

    @model_validator(mode="after")
    def _fields_once(self) -> "AblationConfig":
        seen = set(self.axes)
        for i, group in enumerate(self.paired):
            if not group:
                raise ValueError(f"paired.{i}: an empty group")
            lengths = {len(v) for v in group.values()}
            for name, values in group.items():
                _check_values(f"paired.{i}.{name}", values)
                if name in seen:
                    raise ValueError(f"paired.{i}.{name}: the field is swept twice")
                seen.add(name)
            if len(lengths) > 1:
                raise ValueError(f"paired.{i}: value lists differ in length ({sorted(lengths)}); they are zipped")
        for i, rule in enumerate(self.exclude):
            unknown = sorted(set(rule) - seen)
            if not rule or unknown:
                raise ValueError(f"exclude.{i}: names no swept field" + (f" ({', '.join(unknown)})" if unknown else ""))
        return self

    def swept_fields(self) -> list[str]:
        return [*self.axes, *(name for group in self.paired for name in group)]


def _check_values(where: str, values: list[Any]) -> None:
    if not values:
        raise ValueError(f"{where}: an empty axis (give at least one value)")
    keys = [_canonical(v) for v in values]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"{where}: lists {', '.join(duplicates)} more than once (duplicate cells)")


def _canonical(value: Any) -> str:
    """One spelling per value: pipelines normalised (`→` = `->`), everything else as JSON."""
    if isinstance(value, str) and re.search(r"(sft|grpo):|zero-shot", value):
        return normalize_pipeline(value)
    return json.dumps(value, sort_keys=True)


def load_ablation(path: str | Path, overrides: list[str] | None = None) -> tuple[AblationConfig, dict[str, Any]]:
    """(the ablation, its base run-config tree with the ablation's and the command line's overrides)."""
    p = Path(path)
    raw = read_yaml_mapping(p, "ablation file")
    try:
        ablation = AblationConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"invalid ablation ({p}):"]
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"])
            msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc or '<root>'}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    if isinstance(ablation.base, str):
        base_path = (p.parent / ablation.base) if not Path(ablation.base).is_absolute() else Path(ablation.base)
        tree = load_run_tree(base_path, [*ablation.overrides, *(overrides or [])])
    else:
        tree = load_run_tree(None, [*ablation.overrides, *(overrides or [])], base=ablation.base)
    return ablation, tree


@dataclass
class GridCell:
    """One point of the ablation's grid: the swept values it applies and the run config they make."""

    index: int
    values: dict[str, Any]  # swept field -> value, as applied
    cfg: RunConfig
    inapplicable: list[str] = field(default_factory=list)  # stages.<kind>.* fields of kinds this pipeline lacks

    @property
    def name(self) -> str:
        return self.cfg.name

    def label(self) -> str:
        return ", ".join(f"{k}={show_value(v)}" for k, v in self.values.items()) or "(base)"


def show_value(value: Any) -> str:
    """A swept value as the cell labels show it (pipelines in their stored spelling)."""
    return normalize_pipeline(value) if isinstance(value, str) and ":" in value else str(value)


def _combinations(ablation: AblationConfig) -> list[dict[str, Any]]:
    """Every assignment of the swept fields: the cross product of the axes and of the paired groups."""
    factors: list[list[dict[str, Any]]] = [[{name: v} for v in values] for name, values in ablation.axes.items()]
    for group in ablation.paired:
        names = list(group)
        factors.append([dict(zip(names, row)) for row in zip(*group.values())])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*factors)]


def _excluded(values: dict[str, Any], rules: list[dict[str, Any]]) -> bool:
    return any(all(_canonical(values.get(k)) == _canonical(v) for k, v in rule.items()) for rule in rules)


def _slug(values: dict[str, Any], limit: int = 60) -> str:
    """The swept values in the order of their field names: the name does not follow the axes' order."""
    text = "_".join(re.sub(r"\s*(->|→)\s*", "+", str(values[k])) for k in sorted(values))
    return re.sub(r"[^A-Za-z0-9_.+\-]+", "-", text).replace("+", "-").strip("-")[:limit] or "base"


def _values_hash(values: dict[str, Any]) -> str:
    text = json.dumps({k: _canonical(v) for k, v in values.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def canonical_grid(ablation: AblationConfig) -> dict[str, Any]:
    """The grid as a set, not as spelt: axes by field name with their values sorted, paired groups as sorted
    rows, exclusions sorted. Reordering the file leaves it unchanged; adding or changing a value does not."""

    def row(values: dict[str, Any]) -> dict[str, str]:
        return {k: _canonical(values[k]) for k in sorted(values)}

    paired = []
    for group in ablation.paired:
        names = list(group)
        rows = [row(dict(zip(names, values))) for values in zip(*group.values())]
        paired.append(sorted(rows, key=lambda r: json.dumps(r, sort_keys=True)))
    return {
        "axes": {name: sorted(_canonical(v) for v in ablation.axes[name]) for name in sorted(ablation.axes)},
        "paired": sorted(paired, key=lambda g: json.dumps(g, sort_keys=True)),
        "exclude": sorted((row(rule) for rule in ablation.exclude), key=lambda r: json.dumps(r, sort_keys=True)),
    }


def grid_fingerprint(ablation: AblationConfig) -> str:
    return hashlib.sha256(json.dumps(canonical_grid(ablation), sort_keys=True).encode()).hexdigest()[:16]


def grid_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What differs between two canonical grids, one line per axis, paired group list or exclusion list."""
    lines = []
    for name in sorted(set(before.get("axes", {})) | set(after.get("axes", {}))):
        old, new = before.get("axes", {}).get(name), after.get("axes", {}).get(name)
        if old != new:
            lines.append(f"axes.{name}: {_listing(old)} -> {_listing(new)}")
    for part in ("paired", "exclude"):
        if before.get(part, []) != after.get(part, []):
            lines.append(f"{part}: {json.dumps(before.get(part, []))} -> {json.dumps(after.get(part, []))}")
    return lines


def _listing(values: list[str] | None) -> str:
    return "(none)" if values is None else "[" + ", ".join(values) + "]"


def base_fingerprint(path: str | Path, ablation: AblationConfig, overrides: list[str] | None) -> str:
    """What the user gave as the base (its file's text or the inline mapping, and every override):
    a resumed sweep must run its missing cells on the same base as its finished ones."""
    if isinstance(ablation.base, str):
        base_path = Path(ablation.base) if Path(ablation.base).is_absolute() else Path(path).parent / ablation.base
        base: Any = base_path.read_text()
    else:
        base = ablation.base
    every_override = [*ablation.overrides, *(overrides or [])]
    payload = json.dumps({"base": base, "overrides": every_override}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _apply(base_tree: dict[str, Any], combo: dict[str, Any], stage_fields: list[str],
           where: str) -> tuple[RunConfig, dict[str, Any], list[str]]:
    """(the cell's config, the values applied, the stage fields that do not apply). A `stages.<kind>.*`
    field applies only when the cell's pipeline (which other fields may choose) has a stage of that kind."""
    tree = base_tree
    for name, value in combo.items():
        if name not in stage_fields:
            tree = set_field(tree, name, value)
    kinds = {s.kind for s in validate_run_tree(tree, f"cell {where}").pipeline}
    applied, inapplicable = {}, []
    for name, value in combo.items():
        if name in stage_fields and name.split(".")[1] not in kinds:
            inapplicable.append(name)  # e.g. a GRPO knob on an SFT-only pipeline
            continue
        if name in stage_fields:
            tree = set_field(tree, name, value)
        applied[name] = value
    return validate_run_tree(tree, f"cell {where}"), applied, inapplicable


def _cell_name(ablation: AblationConfig, applied: dict[str, Any]) -> str:
    """Named by what the ablation sets, not by the whole config: a new config field with a default
    must not rename the cells of a sweep being resumed. Both parts follow the field names, not the order
    the axes are listed in."""
    return f"{ablation.name}-{_slug(applied)}-{_values_hash(applied)}"


def expand_cells(ablation: AblationConfig, base_tree: dict[str, Any]) -> tuple[list[GridCell], list[str]]:
    """(the cells, notes). Each cell is validated; its name is stable across runs of the same file
    (ablation name, a readable slug, a hash of its config), which is what makes --resume find it."""
    stage_fields = [f for f in ablation.swept_fields() if f.split(".")[0] == "stages"]
    notes: list[str] = []
    cells: list[GridCell] = []
    seen: dict[str, GridCell] = {}
    for combo in _combinations(ablation):
        if _excluded(combo, ablation.exclude):
            continue
        where = ", ".join(f"{k}={show_value(v)}" for k, v in combo.items())
        try:
            cfg, applied, inapplicable = _apply(base_tree, combo, stage_fields, where)
        except ConfigError as exc:
            raise ConfigError(f"ablation {ablation.name!r}, cell {where}:\n{exc}") from None
        key = config_hash(cfg)
        if key in seen:
            same = seen[key].label()
            if not inapplicable and not seen[key].inapplicable:
                raise ConfigError(
                    f"ablation {ablation.name!r}: cells {same} and {where} are the same run (duplicate cells)"
                )
            notes.append(f"{where}: same run as {same} ({', '.join(inapplicable)} does not apply); run once")
            continue
        update: dict[str, Any] = {"name": _cell_name(ablation, applied)}
        if ablation.timeout_s is not None:
            update["timeout_s"] = ablation.timeout_s
        cfg = cfg.model_copy(update=update)
        seen[key] = GridCell(len(cells), applied, cfg, inapplicable)
        cells.append(seen[key])
    if not cells:
        raise ConfigError(f"ablation {ablation.name!r}: every cell is excluded; nothing to run")
    return cells, notes


def anchor_paths(cfg: RunConfig, tracking_uri: str, storage_root: str) -> RunConfig:
    """Absolute data root, storage and tracking store: Tune trials run in their own directories."""
    return validate_run_tree(
        {
            **cfg.model_dump(mode="json"),
            "data": {**cfg.data.model_dump(mode="json"), "root": str(resolve_path(cfg.data.root))},
            "storage_path": storage_root,
            "tracking": {**cfg.tracking.model_dump(mode="json"), "tracking_uri": tracking_uri},
        },
        f"cell {cfg.name}",
    )


def base_values(ablation: AblationConfig, base_tree: dict[str, Any]) -> dict[str, Any]:
    """Each swept field's value in the base config (the tables hold other axes at it)."""
    base = validate_run_tree(base_tree, "ablation base")
    flat = flatten(base)
    out: dict[str, Any] = {}
    for name in ablation.swept_fields():
        parts = name.split(".")
        if name == "pipeline":
            out[name] = base.pipeline_label()
        elif name in flat:
            out[name] = flat[name]
        elif parts[0] == "stages" and len(parts) == 3 and parts[1] in STAGE_KINDS:
            info = STAGE_KINDS[parts[1]].model_fields.get(parts[2])
            if info is not None and not info.is_required():
                value = info.get_default(call_default_factory=True)
                out[name] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    return out


def preflight(cells: list[GridCell]) -> None:
    """Every cell through the same checks a single run makes (rewards, data build, model, generation
    budgets) before any compute: a grid never dies in its 7th cell on a typo."""
    from orchestrator.data import DataError
    from orchestrator.modeling.models import ModelError
    from orchestrator.runtime.preflight import prepare_run

    for cell in cells:
        try:
            prepare_run(cell.cfg)
        except (ConfigError, DataError, ModelError) as exc:
            raise type(exc)(f"cell {cell.name} ({cell.label()}): {exc}") from None


def format_cells(ablation: AblationConfig, cells: list[GridCell], notes: list[str]) -> str:
    about = f" — {ablation.description}" if ablation.description else ""
    lines = [f"ablation {ablation.name!r}: {len(cells)} cell(s){about}"]
    width = len(str(len(cells)))
    for cell in cells:
        lines.append(f"  {cell.index:>{width}}  {cell.name}  {cell.label()}")
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)
