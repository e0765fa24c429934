"""An ablation grid (YAML) on Ray Tune: one Tune function trial per cell, which builds that cell's
TorchTrainer (the Ray Train V2 pattern), one MLflow parent run per ablation and one nested run per cell.

Reading order: the ablation file's schema (`AblationConfig`), how it expands into cells
(`expand_cells`), the preflight that checks every cell before any compute, then `run_sweep`.

The MLflow store is the source of truth for progress: a cell whose run is FINISHED is never run
again, and an unfinished cell restarts from its own Ray Train checkpoint into its own MLflow run
(same name and storage), so `--resume` after any interruption duplicates nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from orchestrator.config import (
    ConfigError,
    GRPOStage,
    RunConfig,
    SFTStage,
    _Strict,
    flatten,
    load_run_tree,
    read_yaml_mapping,
    resolve_path,
    resolve_storage,
    set_field,
    validate_run_tree,
)
from orchestrator.tracking import redact_secrets, tracking_client

SWEEP_TAG = "orchestrator.sweep"
ROLE_TAG = "orchestrator.role"
CELL_TAG = "orchestrator.cell"
BASE_TAG = "orchestrator.base_fingerprint"
TRIAL_MEMORY = 64 * 1024**2  # what a Tune trial reserves (it only waits on its TorchTrainer)
STAGE_KINDS = {"sft": SFTStage, "grpo": GRPOStage}


# --------------------------------------------------------------------------- the ablation file


class AblationConfig(_Strict):
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
    max_failures: int = Field(0, ge=0, description="Worker-group restarts per cell (from its latest checkpoint).")

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


def normalize_pipeline(text: str) -> str:
    return " -> ".join(part for part in re.split(r"\s*(?:->|→|>)\s*", text.strip()) if part)


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


# --------------------------------------------------------------------------- cells


@dataclass
class Cell:
    index: int
    values: dict[str, Any]  # swept field -> value, as applied
    cfg: RunConfig
    inapplicable: list[str] = field(default_factory=list)  # stages.<kind>.* fields of kinds this pipeline lacks

    @property
    def name(self) -> str:
        return self.cfg.name

    def label(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.values.items()) or "(base)"


def _show(value: Any) -> str:
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


def _identity(cfg: RunConfig) -> str:
    """What makes two cells the same run: the config without its name, storage and tracking."""
    payload = cfg.model_dump(mode="json", exclude={"name", "storage_path", "tracking"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _slug(values: dict[str, Any], limit: int = 60) -> str:
    text = "_".join(re.sub(r"\s*(->|→)\s*", "+", str(v)) for v in values.values())
    return re.sub(r"[^A-Za-z0-9_.+\-]+", "-", text).replace("+", "-").strip("-")[:limit] or "base"


def _values_hash(values: dict[str, Any]) -> str:
    text = json.dumps({k: _canonical(v) for k, v in values.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def base_fingerprint(path: str | Path, ablation: AblationConfig, overrides: list[str] | None) -> str:
    """What the user gave as the base (its file's text or the inline mapping, and every override):
    a resumed sweep must run its missing cells on the same base as its finished ones."""
    if isinstance(ablation.base, str):
        base_path = Path(ablation.base) if Path(ablation.base).is_absolute() else Path(path).parent / ablation.base
        base: Any = base_path.read_text()
    else:
        base = ablation.base
    payload = json.dumps({"base": base, "overrides": [*ablation.overrides, *(overrides or [])]}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def expand_cells(ablation: AblationConfig, base_tree: dict[str, Any]) -> tuple[list[Cell], list[str]]:
    """(the cells, notes). Each cell is validated; its name is stable across runs of the same file
    (ablation name, a readable slug, a hash of its config), which is what makes --resume find it."""
    stage_fields = [f for f in ablation.swept_fields() if f.split(".")[0] == "stages"]
    notes: list[str] = []
    cells: list[Cell] = []
    seen: dict[str, Cell] = {}
    for combo in _combinations(ablation):
        if _excluded(combo, ablation.exclude):
            continue
        where = ", ".join(f"{k}={_show(v)}" for k, v in combo.items())
        tree = base_tree
        try:
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
            cfg = validate_run_tree(tree, f"cell {where}")
        except ConfigError as exc:
            raise ConfigError(f"ablation {ablation.name!r}, cell {where}:\n{exc}") from None
        key = _identity(cfg)
        if key in seen:
            if not inapplicable and not seen[key].inapplicable:
                raise ConfigError(
                    f"ablation {ablation.name!r}: cells {seen[key].label()} and {where} are the same run (duplicate cells)"
                )
            notes.append(f"{where}: same run as {seen[key].label()} ({', '.join(inapplicable)} does not apply); run once")
            continue
        # Named by what the ablation sets, not by the whole config: a new config field with a default
        # (a newer version of this tool) must not rename the cells of a sweep being resumed.
        name = f"{ablation.name}-{_slug(applied)}-{_values_hash(applied)}"
        cfg = cfg.model_copy(update={"name": name})
        cell = Cell(len(cells), applied, cfg, inapplicable)
        seen[key] = cell
        cells.append(cell)
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


# --------------------------------------------------------------------------- preflight and dry run


def preflight(cells: list[Cell]) -> None:
    """Every cell through the same checks a single run makes (rewards, data build, model, generation
    budgets) before any compute: a grid never dies in its 7th cell on a typo."""
    from orchestrator.data import DataError
    from orchestrator.models import ModelError
    from orchestrator.train import prepare_run

    for cell in cells:
        try:
            prepare_run(cell.cfg)
        except (ConfigError, DataError, ModelError) as exc:
            raise type(exc)(f"cell {cell.name} ({cell.label()}): {exc}") from None


def format_cells(ablation: AblationConfig, cells: list[Cell], notes: list[str]) -> str:
    lines = [f"ablation {ablation.name!r}: {len(cells)} cell(s)" + (f" — {ablation.description}" if ablation.description else "")]
    width = len(str(len(cells)))
    for cell in cells:
        lines.append(f"  {cell.index:>{width}}  {cell.name}  {cell.label()}")
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------- MLflow parent run


def find_parent(client, experiment_id: str, sweep: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'sweep' and tags.`{SWEEP_TAG}` = '{sweep}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def open_parent(ablation: AblationConfig, ablation_text: str, cells: list[Cell], base: dict[str, Any],
                uri: str, experiment: str, resume: bool, fingerprint: str) -> str:
    """The sweep's parent run: found again on --resume, refused without it (nothing is overwritten)."""

    from orchestrator.tracking import ensure_experiment

    client = tracking_client(uri)
    exp_id = ensure_experiment(client, experiment, uri)
    existing = find_parent(client, exp_id, ablation.name)
    if existing is not None:
        if not resume:
            raise ConfigError(
                f"sweep {ablation.name!r} already has a parent run {existing.info.run_id} "
                f"({existing.info.status}) in experiment {experiment!r}: rerun with --resume to finish only "
                "the missing cells, or give the ablation another name"
            )
        before = existing.data.tags.get(BASE_TAG)
        if before and before != fingerprint:
            raise ConfigError(
                f"sweep {ablation.name!r}: its base config or overrides changed since it started "
                f"(fingerprint {before} -> {fingerprint}); resuming would mix two bases in one table. "
                "Restore them, or give the ablation another name"
            )
        client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    tags = {
        ROLE_TAG: "sweep",
        SWEEP_TAG: ablation.name,
        "orchestrator.axes": json.dumps(ablation.swept_fields()),
        "orchestrator.base_values": redact_secrets(json.dumps(base, default=str)),
        BASE_TAG: fingerprint,
        "mlflow.runName": ablation.name,
    }
    if ablation.baseline:
        tags["orchestrator.baseline"] = normalize_pipeline(ablation.baseline)
    run = client.create_run(exp_id, run_name=ablation.name, tags=tags)
    client.log_text(run.info.run_id, redact_secrets(ablation_text), "ablation/ablation.yaml")
    client.log_dict(run.info.run_id, [{"name": c.name, **{k: _show(v) for k, v in c.values.items()}} for c in cells],
                    "ablation/cells.json")
    return run.info.run_id


def finished_cells(cells: list[Cell], uri: str, experiment: str) -> set[str]:
    """Names of cells whose MLflow run is FINISHED (the run key is storage + name, as for a single run)."""

    from orchestrator.tracking import RUN_KEY_TAG, run_key

    client = tracking_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return set()
    done = set()
    for cell in cells:
        runs = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key(cell.cfg)}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        if runs:
            done.add(cell.name)
    return done


# --------------------------------------------------------------------------- Ray Tune


def _cell_trial(config: dict[str, Any], cells: list[dict[str, Any]], parent_run_id: str, home: str, max_failures: int):
    """One Tune trial = one cell: build and fit the cell's TorchTrainer, then report its test metrics."""
    from ray import tune

    from orchestrator.train import run_training

    os.environ["ORCHESTRATOR_HOME"] = home  # relative paths as the sweep driver saw them, not the trial dir
    cell = cells[config["cell"]]
    cfg = RunConfig.model_validate(cell["config"])
    outcome = run_training(
        cfg, parent_run_id=parent_run_id, max_failures=max_failures,
        extra_tags={SWEEP_TAG: cell["sweep"], CELL_TAG: cell["name"]},
    )
    tune.report({"cell": cell["name"], **{k: v for k, v in outcome.metrics.items() if k.startswith("test/all/")}})


def _cells_at_once(cells: list[Cell], requested: int | None) -> int:
    import ray

    if requested:
        return requested
    resources = ray.cluster_resources()
    need_cpu = max(c.cfg.scaling.num_workers * c.cfg.scaling.cpus_per_worker for c in cells)
    fits = math.floor(resources.get("CPU", 1) / need_cpu)
    if any(c.cfg.scaling.use_gpu for c in cells):
        need_gpu = max(c.cfg.scaling.num_workers for c in cells if c.cfg.scaling.use_gpu)
        fits = min(fits, math.floor(resources.get("GPU", 0) / need_gpu))
    return max(1, fits)


def _last_error_line(path: str | None) -> str:
    """The exception line of a trial's error file (Tune writes the whole traceback there)."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()] if path else []
    except OSError:
        return ""
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (errors[-1] if errors else lines[-1] if lines else "")[:300]


class SweepProgress:
    """The live view: a line per cell event, and every `every_s` seconds the cells' states and the
    latest training metrics of the running ones (read from MLflow, where rank 0 logs them)."""

    def __init__(self, names: dict[int, str], uri: str, experiment: str, done_before: int, total: int,
                 every_s: float = float(os.environ.get("ORCHESTRATOR_PROGRESS_EVERY_S", 30)), out=None):
        self.names, self.uri, self.experiment, self.total, self.every_s = names, uri, experiment, total, every_s
        self.done_before = done_before
        self.out = out or sys.stdout
        self.state: dict[str, str] = {n: "pending" for n in names.values()}
        self.started: dict[str, float] = {}
        self.last = 0.0
        self.failed: dict[str, str] = {}

    def _name(self, trial) -> str:
        return self.names.get(trial.config.get("cell"), str(trial))

    def _print(self, text: str) -> None:
        print(f"[sweep {time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)

    def start(self, trial) -> None:
        name = self._name(trial)
        self.state[name], self.started[name] = "running", time.time()
        self._print(f"started  {name}")

    def complete(self, trial) -> None:
        name = self._name(trial)
        self.state[name] = "done"
        mae = (trial.last_result or {}).get("test/all/mae")
        took = time.time() - self.started.get(name, time.time())
        self._print(f"finished {name} in {took:.0f} s" + (f" — test/all/mae {mae:.3f}" if mae is not None else ""))
        self.summary(force=True)

    def error(self, trial) -> None:
        name = self._name(trial)
        self.state[name] = "failed"
        self.failed[name] = _last_error_line(trial.error_file) or "see the cell's MLflow run (tag orchestrator.error)"
        self._print(f"FAILED   {name}: {self.failed[name]}")
        self.summary(force=True)

    def summary(self, force: bool = False) -> None:
        if not force and time.time() - self.last < self.every_s:
            return
        self.last = time.time()
        counts = {s: sum(v == s for v in self.state.values()) for s in ("done", "running", "failed", "pending")}
        done = counts["done"] + self.done_before
        line = f"cells {done}/{self.total} done, {counts['running']} running, {counts['failed']} failed, {counts['pending']} pending"
        live = [self._latest(n) for n, s in self.state.items() if s == "running"]
        self._print(line + "".join(f" | {x}" for x in live if x))

    def _latest(self, name: str) -> str:
        try:

            client = tracking_client(self.uri)
            exp = client.get_experiment_by_name(self.experiment)
            runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{CELL_TAG}` = '{name}'", max_results=1)
            if not runs:
                return f"{name}: starting"
            m = runs[0].data.metrics
            step = next((int(x.step) for x in client.get_metric_history(runs[0].info.run_id, "train/loss")[-1:]), None)
            bits = [f"step {step}" if step is not None else "", *(f"{k.split('/', 1)[1]} {m[k]:.3g}" for k in ("train/loss", "train/reward/mean") if k in m)]
            return f"{name}: " + ", ".join(b for b in bits if b) if any(bits) else f"{name}: starting"
        except Exception as exc:  # the view must never break the sweep
            return f"{name}: ({type(exc).__name__}: {exc})"[:200]


def _tune_callback(progress: SweepProgress):
    from ray import tune

    class _Callback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            progress.start(trial)

        def on_trial_complete(self, iteration, trials, trial, **info):
            progress.complete(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            progress.error(trial)

        def on_step_end(self, iteration, trials, **info):
            progress.summary()

    return _Callback()


# --------------------------------------------------------------------------- the sweep


@dataclass
class SweepOutcome:
    name: str
    experiment: str
    tracking_uri: str
    parent_run_id: str
    cells: int
    skipped: int  # already finished before this invocation
    failed: dict[str, str]
    table_markdown: str
    table_files: list[Path]
    elapsed_s: float


def plan_sweep(path: str | Path, overrides: list[str] | None = None):
    """Load, expand and preflight: everything a dry run shows, nothing trained."""
    ablation, tree = load_ablation(path, overrides)
    cells, notes = expand_cells(ablation, tree)
    experiment = ablation.experiment or ablation.name
    from orchestrator.tracking import default_tracking_uri

    uri = cells[0].cfg.tracking.tracking_uri or default_tracking_uri()
    if len({c.cfg.tracking.tracking_uri for c in cells}) > 1:
        raise ConfigError(f"ablation {ablation.name!r}: every cell must log to one tracking store (tracking.tracking_uri)")
    storage_root = resolve_storage(str(Path(cells[0].cfg.storage_path) / ablation.name))
    cells = [
        Cell(c.index, c.values, anchor_paths(c.cfg.model_copy(update={"tracking": c.cfg.tracking.model_copy(update={"experiment": experiment})}),
                                             uri, storage_root), c.inapplicable)
        for c in cells
    ]
    preflight(cells)
    return ablation, tree, cells, notes, experiment, uri


def run_sweep(path: str | Path, overrides: list[str] | None = None, *, resume: bool = False, out=None) -> SweepOutcome:
    from ray import tune

    from orchestrator.tables import TablesError, default_out_dir, write_tables
    from orchestrator.train import init_ray

    out = out or sys.stdout
    t0 = time.time()
    ablation, tree, cells, notes, experiment, uri = plan_sweep(path, overrides)
    print(format_cells(ablation, cells, notes), file=out, flush=True)
    parent = open_parent(ablation, Path(path).read_text(), cells, base_values(ablation, tree), uri, experiment, resume,
                         base_fingerprint(path, ablation, overrides))
    done = finished_cells(cells, uri, experiment) if resume else set()
    todo = [c for c in cells if c.name not in done]
    if done:
        print(f"resuming: {len(done)} cell(s) already finished, {len(todo)} to run", file=out, flush=True)

    failed: dict[str, str] = {}
    client = tracking_client(uri)
    try:
        if todo:
            init_ray()
            payload = [
                {"name": c.name, "sweep": ablation.name, "config": c.cfg.model_dump(mode="json")} for c in todo
            ]
            trainable = tune.with_parameters(
                _cell_trial, cells=payload, parent_run_id=parent, home=str(resolve_path(".")),
                max_failures=ablation.max_failures,
            )
            # The trial only drives its TorchTrainer, whose workers hold the CPUs/GPUs. Even 0.01 CPU per
            # trial would make two 1-CPU cells need 2.02 CPUs of 2 and run one after the other; Tune refuses
            # an empty request, so a trial asks for a little memory instead.
            trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_MEMORY})
            progress = SweepProgress({i: c.name for i, c in enumerate(todo)}, uri, experiment, len(done), len(cells), out=out)
            tuner = tune.Tuner(
                trainable,
                param_space={"cell": tune.grid_search(list(range(len(todo))))},
                tune_config=tune.TuneConfig(max_concurrent_trials=_cells_at_once(todo, ablation.max_concurrent)),
                run_config=tune.RunConfig(
                    name=f"{ablation.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                    storage_path=resolve_storage(str(Path(todo[0].cfg.storage_path) / "_tune")),
                    callbacks=[_tune_callback(progress)],
                    # A trial lost with its node is retried; it resumes its cell from the cell's checkpoint.
                    failure_config=tune.FailureConfig(max_failures=ablation.max_failures),
                    verbose=0,
                ),
            )
            grid = tuner.fit()
            for result in grid:
                if result.error is not None:
                    name = payload[result.config["cell"]]["name"]
                    failed[name] = progress.failed.get(name) or str(result.error).strip().splitlines()[-1][:300]
    except BaseException as exc:
        client.set_tag(parent, "orchestrator.error", redact_secrets(f"interrupted: {exc!r}")[:5000])
        client.set_terminated(parent, status="FAILED")
        raise

    try:
        files = write_tables(uri, experiment, parent_run_id=parent, out_dir=default_out_dir(ablation.name),
                             baseline=normalize_pipeline(ablation.baseline) if ablation.baseline else None)
        markdown = files.markdown
    except TablesError as exc:  # e.g. every cell failed: say so, the failures are the news
        files, markdown = [], f"(no table: {exc})"
    if failed:
        client.set_tag(parent, "orchestrator.failed_cells", json.dumps(sorted(failed))[:5000])
        client.set_terminated(parent, status="FAILED")
    else:
        client.set_terminated(parent, status="FINISHED")
    return SweepOutcome(ablation.name, experiment, uri, parent, len(cells), len(done), failed, markdown,
                        list(files), time.time() - t0)
