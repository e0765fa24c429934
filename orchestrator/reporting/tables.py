"""The paper tables (METHODS §6), generated from the tracking store, never typed by hand.

Reading direction:
  runs.py   the store -> runs (a pandas frame in the layout `mlflow.search_runs` returns: run_id,
            status, params.*, metrics.*, tags.*) and what the sweep's parent run says about them
  frame.py  -> `tidy_runs`: one row per run: pipeline, dataset, seed, the swept fields, one column per metric
  here      -> `paper_table` / `axis_table`: a small `Table` (layout.py) whose cells keep their per-seed values
  render.py -> `render_markdown` / `render_latex` / `render_csv`: text.
`build_tables` is the pure core in one call; `write_tables` adds the I/O: find the runs in MLflow,
write the files, log them to the sweep's parent run.

Choices where METHODS is silent:
- A cell is mean ± sample std (ddof=1) over the seeds that finished; with one seed, only the mean.
  A cell with fewer seeds than the table's grid shows `(n=k/N)`; one with no finished seed shows "—".
- A failed or unfinished run counts as missing; in a sweep its params still place it in the grid, so a
  pipeline whose every run failed is a row of "—", never dropped.
- Best = lowest mean per column (MAE and GM are errors), bold only where at least two rows have a value.
- Swept fields other than pipeline / dataset / seed are held at their base value in the paper table:
  the parent's `orchestrator.base_values`, else the most common value (first seen on a tie). A run that
  lacks the field (a one-stage pipeline has no `pipeline.1.*`) is kept.
- A swept field that never varies within one (pipeline, dataset) group (`pipeline.0.loss`, a per-dataset
  `data.label_step`) changes only with the row or column, so it is not an axis of its own.
- Two runs of the same grid point (a re-run): the latest finished one is used.
- Baseline of the Δ rows: the argument, else the parent's `orchestrator.baseline`, else `sft:ce` when it
  is a row; without one there are no Δ rows. Per-axis tables compare against the held (base) value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from orchestrator.methods.metrics import COLLAPSE_DISTINCT, COLLAPSE_STD_RATIO, collapsed
from orchestrator.reporting.frame import (
    dedupe,
    dedupe_configs,
    effective_axes,
    failed_runs,
    held_values,
    hold,
    infer_axes,
    tidy_runs,
)
from orchestrator.reporting.layout import (
    COLLAPSED_MARK,
    DEFAULT_BASELINE,
    METRICS,
    MISSING,
    PIPELINE,
    REGIONS,
    Column,
    DeltaRow,
    Row,
    Table,
    TableCell,
    TablesError,
    display_pipeline,
    file_stem,
)
from orchestrator.reporting.render import render_csv, render_latex, render_markdown
from orchestrator.reporting.runs import load_predictions, load_runs
from orchestrator.reporting.uncertainty import RESAMPLES, Delta, paired_delta
from orchestrator.tracking.conventions import normalize_pipeline, tracking_client


def _natural(value: str) -> tuple:
    """Sort numbers numerically, then text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _pipeline_order(labels: Iterable[str], baseline: str | None) -> list[str]:
    """zero-shot, then the baseline, then shorter chains before longer ones, alphabetically."""
    return sorted(set(labels), key=lambda p: (p != "zero-shot", p != baseline, p.count("->"), p))


def default_out_dir(experiment: str) -> Path:
    from orchestrator.config import resolve_path

    return resolve_path(Path("results") / "tables" / file_stem(experiment))


# --------------------------------------------------------------------------- evidence beyond the means


@dataclass
class Evidence:
    """What the runs' predictions add to their metrics: each run's absolute errors per evaluated item (for
    the Δ intervals) and which runs collapsed. Empty when the predictions are not at hand (the Δ rows then
    have no intervals and no cell is marked)."""

    errors: dict[str, pd.DataFrame] = field(default_factory=dict)  # run id -> id, region, error; .attrs floor
    collapsed: dict[str, str] = field(default_factory=dict)  # run id -> why
    resamples: int = RESAMPLES
    seed: int = 0

    @classmethod
    def from_predictions(cls, predictions: dict[str, pd.DataFrame], **kwargs) -> Evidence:
        """From each run's predictions table (id, target, region, scored; `label_step` in attrs)."""
        errors, why = {}, {}
        for run_id, table in predictions.items():
            scored = table["scored"].to_numpy(dtype=float)
            frame = pd.DataFrame({"id": table["id"].astype(str), "region": table["region"],
                                  "error": np.abs(scored - table["target"].to_numpy(dtype=float))})
            frame.attrs["floor"] = float(table.attrs.get("label_step", 1.0)) / 2
            errors[run_id] = frame
            reason = collapsed(scored, table["target"].to_numpy(dtype=float))
            if reason:
                why[run_id] = reason
        return cls(errors, why, **kwargs)

    def delta(self, row_runs: list[str], ref_runs: list[str], column: Column) -> Delta | None:
        """The bootstrap interval of row − reference in one column, over the items every one of these runs
        scored in the column's region, seeds paired in the given order; None without their predictions."""
        runs = [*row_runs, *ref_runs]
        if not runs or any(r not in self.errors for r in runs):
            return None
        frames = [self.errors[r] for r in runs]
        if column.region != "all":
            frames = [f[f["region"] == column.region] for f in frames]
        common = sorted(set.intersection(*(set(f["id"]) for f in frames)))
        if not common:
            return None
        table = np.stack([f.set_index("id")["error"].reindex(common).to_numpy() for f in frames])
        k = len(row_runs)
        return paired_delta(table[:k], table[k:], column.metric, frames[0].attrs.get("floor", 0.5),
                            resamples=self.resamples, seed=self.seed)


# --------------------------------------------------------------------------- pieces of a table


def _columns(frame: pd.DataFrame) -> list[Column]:
    datasets = sorted(frame["dataset"].unique(), key=_natural)
    return [Column(d, m, r) for d in datasets for m in METRICS for r in REGIONS]


def _cells(runs: pd.DataFrame, columns: list[Column], expected: int, evidence: Evidence) -> tuple[TableCell, ...]:
    runs = runs.sort_values("seed", key=lambda s: s.map(_natural))
    cells = []
    for c in columns:
        here = runs[(runs["dataset"] == c.dataset) & runs[f"{c.metric}/{c.region}"].notna()]
        run_ids = tuple(here["run_id"])
        cells.append(TableCell(tuple(float(v) for v in here[f"{c.metric}/{c.region}"]), expected,
                               seeds=tuple(here["seed"]), run_ids=run_ids,
                               collapsed=sum(r in evidence.collapsed for r in run_ids)))
    return tuple(cells)


def _delta_row(row: Row, ref: Row, columns: list[Column], evidence: Evidence) -> DeltaRow:
    """Per column: the mean over the seeds both rows have of row − reference, with its bootstrap interval
    where both rows' predictions are there; nothing against a partial reference cell."""
    values, intervals = [], []
    for column, cell, base in zip(columns, row.cells, ref.cells):
        shared = [s for s in cell.seeds if s in base.seeds]
        if base.partial or not shared:
            values.append(None)
            intervals.append(None)
            continue
        mine, theirs = cell.by_seed(), base.by_seed()
        values.append(sum(mine[s] - theirs[s] for s in shared) / len(shared))
        runs = dict(zip(cell.seeds, cell.run_ids)), dict(zip(base.seeds, base.run_ids))
        intervals.append(evidence.delta([runs[0][s] for s in shared], [runs[1][s] for s in shared], column))
    return DeltaRow(f"Δ {row.label}", row.keys, ref.label, tuple(values), tuple(intervals))


def _seed_text(frame: pd.DataFrame) -> str:
    seeds = sorted(frame["seed"].unique(), key=_natural)
    return f"mean ± std over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(seeds)})"


def _title(subject: str, split: str, sliced: pd.DataFrame) -> str:
    return (f"{subject}, {split} split: MAE and GM per shot region, {_seed_text(sliced)}; "
            "lower is better, best in bold")


def _legend(expected: int, deltas: list[DeltaRow], rows: list[Row]) -> list[str]:
    text = f"{MISSING}: no finished run."
    if expected > 1:
        text += (f" (n=k/{expected}): only k of the {expected} seeds finished; such a cell is never bold and "
                 "never a baseline.")
    lines = [text]
    if any(i is not None for d in deltas for i in d.intervals):
        lines.append(f"[low, high]: the 95% interval of a Δ, a paired bootstrap over test items and seeds "
                     f"({RESAMPLES} resamples); * marks a Δ whose interval excludes 0, the others are unresolved.")
    if any(c.collapsed for r in rows for c in r.cells):
        lines.append(f"{COLLAPSED_MARK} k/n: k of the cell's n runs collapsed (fewer than {COLLAPSE_DISTINCT} "
                     f"distinct predictions, or prediction std below {COLLAPSE_STD_RATIO:g} of the label std).")
    return lines


# --------------------------------------------------------------------------- the two kinds of table


def _paper_baseline(labels: set[str], baseline: str | None, sweep_baseline: str | None,
                    notes: list[str]) -> str | None:
    """The pipeline the Δ rows compare against: `baseline` (must be a row), else `sweep_baseline`
    (a note when it has no runs), else sft:ce when it is a row, else none."""
    if baseline is not None:  # named by the user: it must be a row
        baseline = normalize_pipeline(baseline)
        if baseline not in labels:
            raise TablesError(
                f"baseline {baseline!r} is not a pipeline of these runs; pipelines: {', '.join(sorted(labels))}"
            )
        return baseline
    if sweep_baseline and normalize_pipeline(sweep_baseline) in labels:
        return normalize_pipeline(sweep_baseline)
    if sweep_baseline:
        notes.append(f"The sweep's baseline {sweep_baseline} has no runs.")
    return DEFAULT_BASELINE if DEFAULT_BASELINE in labels else None


def paper_table(
    frame: pd.DataFrame,
    *,
    axes: list[str],
    split: str = "test",
    baseline: str | None = None,
    base_values: dict | None = None,
    sweep_baseline: str | None = None,
    evidence: Evidence | None = None,
) -> Table:
    """Rows = pipelines, columns = dataset × {MAE, GM} × region, other swept fields at their base value,
    and Δ rows against the baseline pipeline: `baseline` (must be a row), else `sweep_baseline` (the
    parent's tag, skipped with a note when it has no runs), else sft:ce when it is a row."""
    evidence = evidence or Evidence()
    held = held_values(frame, effective_axes(frame, axes), base_values)
    sliced = hold(frame, held)
    columns = _columns(frame)
    notes = [f"{a} held at {v} ({why})." for a, (v, why) in held.items()]
    labels = set(frame["pipeline"])
    baseline = _paper_baseline(labels, baseline, sweep_baseline, notes)
    pipelines = _pipeline_order(labels, baseline)
    expected = sliced["seed"].nunique()
    rows = [
        Row(display_pipeline(p), ((PIPELINE, p),), _cells(sliced[sliced["pipeline"] == p], columns, expected, evidence))
        for p in pipelines
    ]
    deltas: list[DeltaRow] = []
    if baseline is not None:
        ref = rows[pipelines.index(baseline)]
        deltas = [_delta_row(r, ref, columns, evidence) for r in rows if r.label != ref.label]
        if deltas:
            notes.append(f"Δ rows: mean over the seeds both rows have of row − {ref.label}; negative = lower error "
                         "than the baseline.")
    notes += _legend(expected, deltas, rows)
    return Table(name="paper", title=_title("Paper table", split, sliced), row_header="pipeline",
                 key_fields=(PIPELINE,), columns=columns, rows=rows, deltas=deltas, notes=notes)


def _axis_rows(sliced: pd.DataFrame, axis: str, base_value: str, columns: list[Column],
               prefix: bool, evidence: Evidence) -> tuple[list[Row], list[DeltaRow]]:
    """A row per (pipeline, value of the axis) that has runs, and a Δ row per row against the row of
    the same pipeline at the base value."""
    values = sorted(sliced[axis].unique(), key=_natural)
    expected = sliced["seed"].nunique()
    rows, base_rows = [], {}
    for p in _pipeline_order(sliced["pipeline"], None):
        for v in values:
            runs = sliced[(sliced["pipeline"] == p) & (sliced[axis] == v)]
            if runs.empty:
                continue
            label = f"{display_pipeline(p)} · {v}" if prefix else v
            rows.append(Row(label, ((PIPELINE, p), (axis, v)), _cells(runs, columns, expected, evidence)))
            if v == base_value:
                base_rows[p] = rows[-1]
    deltas = []
    for r in rows:
        ref = base_rows.get(dict(r.keys)[PIPELINE])
        if ref is not None and r is not ref:
            deltas.append(_delta_row(r, ref, columns, evidence))
    return rows, deltas


def axis_table(
    frame: pd.DataFrame, axis: str, *, axes: list[str], split: str = "test", base_values: dict | None = None,
    evidence: Evidence | None = None,
) -> Table:
    """Rows = the values of one swept field (prefixed by the pipeline when several pipelines have it),
    the other swept fields held at their base value; Δ rows against the held value of the same pipeline."""
    extra = effective_axes(frame, axes)
    if axis not in extra:
        raise TablesError(f"{axis!r} is not a swept field of these runs; swept: {', '.join(extra) or 'none'}")
    held = held_values(frame, extra, base_values)
    sliced = hold(frame[frame[axis].notna()], held, free=(axis,))
    prefix = sliced["pipeline"].nunique() > 1
    base_value, why = held[axis]
    rows, deltas = _axis_rows(sliced, axis, base_value, _columns(frame), prefix, evidence or Evidence())
    notes = [f"{a} held at {v} ({w})." for a, (v, w) in held.items() if a != axis]
    if deltas:
        same = " of the same pipeline" if prefix else ""
        notes.append(f"Δ rows: mean over the seeds both rows have of row − ({axis} = {base_value}{same}), "
                     f"the {why}.")
    notes += _legend(sliced["seed"].nunique(), deltas, rows)
    return Table(name=f"axis-{axis}", title=_title(f"Ablation of {axis}", split, sliced),
                 row_header=f"pipeline · {axis}" if prefix else axis, key_fields=(PIPELINE, axis),
                 columns=_columns(frame), rows=rows, deltas=deltas, notes=notes)


# --------------------------------------------------------------------------- all tables of a set of runs


def _tidy_frame(runs, axes: list[str] | None, split: str) -> tuple[pd.DataFrame, list[str]]:
    """(the tidy frame, the swept fields), refusing runs with nothing to tabulate."""
    if not isinstance(runs, pd.DataFrame):
        runs = runs.to_pandas()  # a pyarrow table
    if runs.empty:
        raise TablesError("no runs to tabulate")
    axes = list(dict.fromkeys(infer_axes(runs) if axes is None else axes))
    frame = tidy_runs(runs, axes, split)
    if not frame["finished"].any():
        raise TablesError(f"none of the {len(frame)} runs finished")
    if frame[[f"{m}/{r}" for m in METRICS for r in REGIONS]].isna().all().all():
        raise TablesError(f"no finished run has {split}/ metrics (was the {split} split evaluated? see eval.splits)")
    return frame, axes


def build_tables(
    runs: pd.DataFrame,
    *,
    axes: list[str] | None = None,
    split: str = "test",
    baseline: str | None = None,
    base_values: dict | None = None,
    sweep_baseline: str | None = None,
    source: str | None = None,
    predictions: dict[str, pd.DataFrame] | None = None,
) -> list[Table]:
    """The pure core: runs in the `mlflow.search_runs` layout (a pandas frame or a pyarrow table) ->
    the paper table, then one table per other swept field. `axes` None infers them from the runs.
    `predictions` (run id -> its predictions table) gives the Δ intervals and the collapse marks."""
    frame, axes = _tidy_frame(runs, axes, split)
    extra = effective_axes(frame, axes)
    frame, same_config = dedupe_configs(frame)
    frame, dropped = dedupe(frame, extra)
    failed = failed_runs(frame)
    evidence = Evidence.from_predictions(predictions or {})
    tables = [paper_table(frame, axes=axes, split=split, baseline=baseline, base_values=base_values,
                          sweep_baseline=sweep_baseline, evidence=evidence)]
    tables += [axis_table(frame, a, axes=axes, split=split, base_values=base_values, evidence=evidence)
               for a in extra]
    for t in tables:
        if same_config:
            t.notes.append(f"{same_config} duplicate run(s) of one cell config dropped "
                           "(the newest finished one is used).")
        if dropped:
            t.notes.append(f"{dropped} repeated run(s) of the same grid point ignored "
                           "(the latest finished one is used).")
        if failed:
            t.notes.append(f"Left out, not finished ({len(failed)}): " + "; ".join(failed) + ".")
        if source:
            t.notes.append(f"Source: {source}.")
    return tables


@dataclass
class TableFiles:
    """What write_tables wrote: the paths (paper.md first), the paper table's Markdown, the tables."""

    paths: list[Path]
    markdown: str
    tables: list[Table]


def _write_files(tables: list[Table], out: Path, digits: int) -> list[Path]:
    """`{out}/<table>.{md,tex,csv}` for every table, in table order."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in tables:
        for ext, text in (("md", render_markdown(t, digits)), ("tex", render_latex(t, digits)), ("csv", render_csv(t))):
            path = out / f"{file_stem(t.name)}.{ext}"
            path.write_text(text, encoding="utf-8")
            paths.append(path)
    return paths


def write_tables(
    tracking_uri: str,
    experiment: str,
    *,
    parent_run_id: str | None = None,
    sweep: str | None = None,
    out_dir: str | Path,
    split: str = "test",
    baseline: str | None = None,
    log_to_parent: bool = True,
    digits: int = 2,
) -> TableFiles:
    """Build every table from the store and write `{out_dir}/paper.{md,tex,csv}` and
    `{out_dir}/axis-<field>.{md,tex,csv}`; log them to the sweep's parent run under `tables/`."""
    src = load_runs(tracking_uri, experiment, parent_run_id=parent_run_id, sweep=sweep)
    finished = src.runs.loc[src.runs["status"] == "FINISHED", "run_id"].tolist() if "status" in src.runs else []
    predictions = load_predictions(tracking_uri, finished, split)
    tables = build_tables(src.runs, axes=src.axes, split=split, baseline=baseline, base_values=src.base_values,
                          sweep_baseline=src.baseline, source=src.description, predictions=predictions)
    paths = _write_files(tables, Path(out_dir), digits)
    if src.parent_run_id and log_to_parent:
        client = tracking_client(tracking_uri)
        for path in paths:
            client.log_artifact(src.parent_run_id, str(path), "tables")
    return TableFiles(paths, render_markdown(tables[0], digits), tables)
