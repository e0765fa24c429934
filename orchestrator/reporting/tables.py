"""The paper tables (METHODS §6), generated from the tracking store, never typed by hand.

Reading direction:
  runs (a pandas frame in the layout `mlflow.search_runs` returns: run_id, status, params.*, metrics.*)
  -> `tidy_runs`: one row per run: pipeline, dataset, seed, the swept fields, one column per metric
  -> `paper_table` / `axis_table`: a small `Table` whose cells keep their per-seed values
  -> `render_markdown` / `render_latex` / `render_csv`: text.
`build_tables` is that pure core in one call; `write_tables` adds the I/O: find the runs in MLflow,
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

import csv
import io
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from orchestrator.tracking.conventions import AXES_TAG, BASE_VALUES_TAG, BASELINE_TAG, PARENT_TAG, ROLE_TAG, SWEEP_TAG

SPLITS = ("test", "val")
METRICS = ("mae", "gm")
REGIONS = ("all", "many", "medium", "few")


PIPELINE, DATASET, SEED = "pipeline", "data.name", "seed"


DEFAULT_BASELINE = "sft:ce"
MISSING = "—"


# Params that differ between runs without being an experimental choice.
BOOKKEEPING = re.compile(r"^(name|storage_path|data\.root|model\.cache_dir|tracking\..*)$")


class TablesError(ValueError):
    """A user error: unknown experiment or run, nothing finished to tabulate, a baseline that is no row."""


@dataclass(frozen=True)
class Column:
    dataset: str
    metric: str  # mae | gm
    region: str  # all | many | medium | few

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.metric}/{self.region}"

    @property
    def header(self) -> str:
        return f"{self.dataset} {self.metric.upper()} {self.region.capitalize()}"


@dataclass(frozen=True)
class Cell:
    """One cell: the metric of every seed that finished (in seed order), and how many seeds the grid has."""

    values: tuple[float, ...]
    expected: int

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) >= 2 else None

    @property
    def partial(self) -> bool:
        return 0 < self.n < self.expected


@dataclass(frozen=True)
class Row:
    label: str  # for display: "sft:ce → grpo:ccc", or "4" in an axis table
    keys: tuple[tuple[str, str], ...]  # raw values that identify it: (("pipeline", "sft:ce -> grpo:ccc"), ...)
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class DeltaRow:
    label: str
    keys: tuple[tuple[str, str], ...]
    reference: str  # label of the row it is compared against
    values: tuple[float | None, ...]  # mean(row) - mean(reference) per column; None if either is missing


@dataclass
class Table:
    name: str  # file stem: "paper" or "axis-<field>"
    title: str
    row_header: str
    key_fields: tuple[str, ...]  # the fields in Row.keys, in order (CSV columns)
    columns: list[Column]
    rows: list[Row]
    deltas: list[DeltaRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def best(self, j: int) -> set[int]:
        """Rows with the lowest mean in column j (ties all bold); none when fewer than two rows have one."""
        means = [(i, r.cells[j].mean) for i, r in enumerate(self.rows) if r.cells[j].mean is not None]
        if len(means) < 2:
            return set()
        low = min(m for _, m in means)
        return {i for i, m in means if m == low}

    def row(self, label: str) -> Row:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(f"no row {label!r} in table {self.name}; rows: {[r.label for r in self.rows]}")

    def cell(self, row: str, column: str) -> Cell:
        """Cell by row label and column key (`movies/mae/all`)."""
        keys = [c.key for c in self.columns]
        return self.row(row).cells[keys.index(column)]


def display_pipeline(label: str) -> str:
    return label.replace(" -> ", " → ")


def normalize_pipeline(label: str) -> str:
    """`sft:ce→grpo:ccc`, `sft:ce > grpo:ccc` -> `sft:ce -> grpo:ccc` (how the params store it)."""
    return " -> ".join(p for p in re.split(r"\s*(?:->|→|>)\s*", label.strip()) if p)


def _text(value: Any) -> str | None:
    """A param as MLflow stores it (a string), or None when the run lacks it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _same(text: str | None, value: Any) -> bool:
    """Param text equals a base value: as strings, or as numbers (`1e-05` == `0.00001`)."""
    if text is None:
        return False
    want = "" if value is None else str(value)
    if text == want:
        return True
    try:
        return float(text) == float(want)
    except ValueError:
        return False


def _natural(value: str) -> tuple:
    """Sort numbers numerically, then text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _pipeline_order(labels: Iterable[str], baseline: str | None) -> list[str]:
    """zero-shot, then the baseline, then shorter chains before longer ones, alphabetically."""
    return sorted(set(labels), key=lambda p: (p != "zero-shot", p != baseline, p.count("->"), p))


def file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def default_out_dir(experiment: str) -> Path:
    from orchestrator.config import resolve_path

    return resolve_path(Path("results") / "tables" / file_stem(experiment))


def infer_axes(runs: pd.DataFrame) -> list[str]:
    """The params that vary across the runs (bookkeeping excluded): what a plain experiment swept."""
    axes = []
    for col in runs.columns:
        if not col.startswith("params."):
            continue
        name = col[len("params.") :]
        if BOOKKEEPING.match(name):
            continue
        if len({_text(v) for v in runs[col]}) > 1:
            axes.append(name)
    return axes


def tidy_runs(runs: pd.DataFrame, fields: Iterable[str], split: str) -> pd.DataFrame:
    """One row per run: run_id, finished, start_time, pipeline, dataset, seed, each field (text or None)
    and a float column `{metric}/{region}` per metric (NaN unless the run finished and logged it)."""
    if split not in SPLITS:
        raise TablesError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    for need in (PIPELINE, DATASET, SEED):
        if f"params.{need}" not in runs.columns:
            raise TablesError(f"the runs have no param {need!r}: not runs of `orchestrator train`/`sweep`")
    runs = runs.reset_index(drop=True)
    n = len(runs)
    status = runs["status"] if "status" in runs else pd.Series(["FINISHED"] * n, index=runs.index)
    out = pd.DataFrame(
        {
            "run_id": runs["run_id"] if "run_id" in runs else pd.Series(range(n), index=runs.index).astype(str),
            "finished": status.eq("FINISHED"),
            "start_time": runs["start_time"] if "start_time" in runs else pd.Series(range(n), index=runs.index),
            "pipeline": [_text(v) for v in runs[f"params.{PIPELINE}"]],
            "dataset": [_text(v) for v in runs[f"params.{DATASET}"]],
            "seed": [_text(v) for v in runs[f"params.{SEED}"]],
        }
    )
    for f in fields:
        if f in (PIPELINE, DATASET, SEED):
            continue
        col = runs[f"params.{f}"] if f"params.{f}" in runs else pd.Series([None] * n, index=runs.index)
        out[f] = pd.Series([_text(v) for v in col], index=runs.index, dtype=object)
    for metric in METRICS:
        for region in REGIONS:
            col = f"metrics.{split}/{region}/{metric}"
            values = pd.to_numeric(runs[col], errors="coerce") if col in runs else pd.Series(np.nan, index=runs.index)
            out[f"{metric}/{region}"] = values.where(out["finished"] & np.isfinite(values))
    # A run that failed before logging its params cannot be placed in the grid: leave it out.
    unplaced = out["pipeline"].isna() | out["dataset"].isna() | out["seed"].isna()
    if (unplaced & out["finished"]).any():
        bad = out.loc[unplaced & out["finished"], "run_id"].tolist()
        raise TablesError(f"finished runs {bad[:5]} lack the pipeline, data.name or seed param")
    # Oldest first: "most common value, first seen on a tie" then means the first run.
    return out[~unplaced].sort_values("start_time", kind="stable").reset_index(drop=True)


def dedupe(frame: pd.DataFrame, axes: list[str]) -> tuple[pd.DataFrame, int]:
    """One run per grid point: the latest finished one (else the latest). Returns (frame, runs dropped)."""
    key = ["pipeline", "dataset", "seed", *axes]
    ordered = frame.sort_values(["finished", "start_time"], kind="stable")
    kept = ordered.drop_duplicates(subset=key, keep="last").sort_index()
    return kept, len(frame) - len(kept)


def effective_axes(frame: pd.DataFrame, axes: Iterable[str]) -> list[str]:
    """The swept fields other than pipeline/dataset/seed that take several values within one
    (pipeline, dataset) group; the others change only with the row or column."""
    out = []
    for a in axes:
        if a in (PIPELINE, DATASET, SEED) or a not in frame.columns:
            continue
        present = frame[frame[a].notna()]
        if len(present) and present.groupby(["pipeline", "dataset"])[a].nunique().gt(1).any():
            out.append(a)
    return out


def held_values(frame: pd.DataFrame, axes: list[str], base_values: dict | None) -> dict[str, tuple[str, str]]:
    """The value each axis is held at in tables that do not vary it, with the reason for the caption."""
    held = {}
    for a in axes:
        seen = frame[a].dropna()
        counts = seen.value_counts(sort=False)  # keeps first-seen order, so idxmax breaks ties by it
        most = str(counts.idxmax())
        if base_values and a in base_values:
            match = [v for v in counts.index if _same(v, base_values[a])]
            if match:
                held[a] = (match[0], "base value")
            else:
                held[a] = (most, f"most common value; the base value {base_values[a]!r} was not run")
        else:
            held[a] = (most, "most common value")
    return held


def hold(frame: pd.DataFrame, held: dict[str, tuple[str, str]], free: Iterable[str] = ()) -> pd.DataFrame:
    """Runs at the held values (a run without the field, e.g. a pipeline it does not apply to, stays)."""
    mask = pd.Series(True, index=frame.index)
    for a, (value, _) in held.items():
        if a not in free:
            mask &= frame[a].isna() | (frame[a] == value)
    return frame[mask]


def _columns(frame: pd.DataFrame) -> list[Column]:
    datasets = sorted(frame["dataset"].unique(), key=_natural)
    return [Column(d, m, r) for d in datasets for m in METRICS for r in REGIONS]


def _cells(runs: pd.DataFrame, columns: list[Column], expected: int) -> tuple[Cell, ...]:
    runs = runs.sort_values("seed", key=lambda s: s.map(_natural))
    cells = []
    for c in columns:
        values = runs.loc[runs["dataset"] == c.dataset, f"{c.metric}/{c.region}"].dropna()
        cells.append(Cell(tuple(float(v) for v in values), expected))
    return tuple(cells)


def _delta(row: Row, ref: Row) -> tuple[float | None, ...]:
    return tuple(
        None if a.mean is None or b.mean is None else a.mean - b.mean for a, b in zip(row.cells, ref.cells)
    )


def _seed_text(frame: pd.DataFrame) -> str:
    seeds = sorted(frame["seed"].unique(), key=_natural)
    return f"mean ± std over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(seeds)})"


def _legend(expected: int) -> str:
    text = f"{MISSING}: no finished run."
    if expected > 1:
        text += f" (n=k/{expected}): only k of the {expected} seeds finished."
    return text


def paper_table(
    frame: pd.DataFrame,
    *,
    axes: list[str],
    split: str = "test",
    baseline: str | None = None,
    base_values: dict | None = None,
    sweep_baseline: str | None = None,
) -> Table:
    """Rows = pipelines, columns = dataset × {MAE, GM} × region, other swept fields at their base value,
    and Δ rows against the baseline pipeline: `baseline` (must be a row), else `sweep_baseline` (the
    parent's tag, skipped with a note when it has no runs), else sft:ce when it is a row."""
    extra = effective_axes(frame, axes)
    held = held_values(frame, extra, base_values)
    sliced = hold(frame, held)
    columns = _columns(frame)
    notes = [f"{a} held at {v} ({why})." for a, (v, why) in held.items()]
    labels = set(frame["pipeline"])
    if baseline is not None:  # named by the user: it must be a row
        baseline = normalize_pipeline(baseline)
        if baseline not in labels:
            raise TablesError(f"baseline {baseline!r} is not a pipeline of these runs; pipelines: {', '.join(sorted(labels))}")
    elif sweep_baseline and normalize_pipeline(sweep_baseline) in labels:
        baseline = normalize_pipeline(sweep_baseline)
    else:
        if sweep_baseline:
            notes.append(f"The sweep's baseline {sweep_baseline} has no runs.")
        baseline = DEFAULT_BASELINE if DEFAULT_BASELINE in labels else None
    pipelines = _pipeline_order(labels, baseline)
    expected = sliced["seed"].nunique()
    rows = [
        Row(display_pipeline(p), ((PIPELINE, p),), _cells(sliced[sliced["pipeline"] == p], columns, expected))
        for p in pipelines
    ]
    deltas: list[DeltaRow] = []
    if baseline is not None:
        ref = rows[pipelines.index(baseline)]
        deltas = [
            DeltaRow(f"Δ {r.label}", r.keys, ref.label, _delta(r, ref)) for r in rows if r.label != ref.label
        ]
        if deltas:
            notes.append(f"Δ rows: mean(row) − mean({ref.label}); negative = lower error than the baseline.")
    notes.append(_legend(expected))
    return Table(
        name="paper",
        title=f"Paper table, {split} split: MAE and GM per shot region, {_seed_text(sliced)}; "
        "lower is better, best in bold",
        row_header="pipeline",
        key_fields=(PIPELINE,),
        columns=columns,
        rows=rows,
        deltas=deltas,
        notes=notes,
    )


def axis_table(
    frame: pd.DataFrame, axis: str, *, axes: list[str], split: str = "test", base_values: dict | None = None
) -> Table:
    """Rows = the values of one swept field (prefixed by the pipeline when several pipelines have it),
    the other swept fields held at their base value; Δ rows against the held value of the same pipeline."""
    extra = effective_axes(frame, axes)
    if axis not in extra:
        raise TablesError(f"{axis!r} is not a swept field of these runs; swept: {', '.join(extra) or 'none'}")
    held = held_values(frame, extra, base_values)
    sliced = hold(frame[frame[axis].notna()], held, free=(axis,))
    columns = _columns(frame)
    pipelines = _pipeline_order(sliced["pipeline"], None)
    values = sorted(sliced[axis].unique(), key=_natural)
    expected = sliced["seed"].nunique()
    prefix = len(pipelines) > 1
    rows, base_rows = [], {}
    for p in pipelines:
        for v in values:
            runs = sliced[(sliced["pipeline"] == p) & (sliced[axis] == v)]
            if runs.empty:
                continue
            label = f"{display_pipeline(p)} · {v}" if prefix else v
            rows.append(Row(label, ((PIPELINE, p), (axis, v)), _cells(runs, columns, expected)))
            if v == held[axis][0]:
                base_rows[p] = rows[-1]
    deltas = []
    for r in rows:
        ref = base_rows.get(dict(r.keys)[PIPELINE])
        if ref is not None and r is not ref:
            deltas.append(DeltaRow(f"Δ {r.label}", r.keys, ref.label, _delta(r, ref)))
    base_value, why = held[axis]
    notes = [f"{a} held at {v} ({w})." for a, (v, w) in held.items() if a != axis]
    if deltas:
        same = " of the same pipeline" if prefix else ""
        notes.append(f"Δ rows: mean(row) − mean({axis} = {base_value}{same}), the {why}.")
    notes.append(_legend(expected))
    return Table(
        name=f"axis-{axis}",
        title=f"Ablation of {axis}, {split} split: MAE and GM per shot region, {_seed_text(sliced)}; "
        "lower is better, best in bold",
        row_header=f"pipeline · {axis}" if prefix else axis,
        key_fields=(PIPELINE, axis),
        columns=columns,
        rows=rows,
        deltas=deltas,
        notes=notes,
    )


def build_tables(
    runs: pd.DataFrame,
    *,
    axes: list[str] | None = None,
    split: str = "test",
    baseline: str | None = None,
    base_values: dict | None = None,
    sweep_baseline: str | None = None,
    source: str | None = None,
) -> list[Table]:
    """The pure core: runs in the `mlflow.search_runs` layout (a pandas frame or a pyarrow table) ->
    the paper table, then one table per other swept field. `axes` None infers them from the runs."""
    if not isinstance(runs, pd.DataFrame):
        runs = runs.to_pandas()  # a pyarrow table
    if runs.empty:
        raise TablesError("no runs to tabulate")
    if axes is None:
        axes = infer_axes(runs)
    axes = list(dict.fromkeys(axes))
    frame = tidy_runs(runs, axes, split)
    if not frame["finished"].any():
        raise TablesError(f"none of the {len(frame)} runs finished")
    metric_cols = [f"{m}/{r}" for m in METRICS for r in REGIONS]
    if frame[metric_cols].isna().all().all():
        raise TablesError(f"no finished run has {split}/ metrics (was the {split} split evaluated? see eval.splits)")
    extra = effective_axes(frame, axes)
    frame, dropped = dedupe(frame, extra)
    tables = [
        paper_table(
            frame, axes=axes, split=split, baseline=baseline, base_values=base_values, sweep_baseline=sweep_baseline
        )
    ]
    tables += [axis_table(frame, a, axes=axes, split=split, base_values=base_values) for a in extra]
    for t in tables:
        if dropped:
            t.notes.append(f"{dropped} repeated run(s) of the same grid point ignored (the latest finished one is used).")
        if source:
            t.notes.append(f"Source: {source}.")
    return tables


def _number(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


def format_cell(cell: Cell, digits: int = 2, pm: str = " ± ") -> str:
    """`6.37 ± 0.12`, `6.37` (one seed), `6.37 ± 0.12 (n=2/3)` (seeds missing), or "—"."""
    if cell.mean is None:
        return MISSING
    text = _number(cell.mean, digits)
    if cell.std is not None:
        text += pm + _number(cell.std, digits)
    if cell.partial:
        text += f" (n={cell.n}/{cell.expected})"
    return text


def format_delta(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None else f"{value:+.{digits}f}"


def render_markdown(table: Table, digits: int = 2) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [f"**{esc(table.title)}**", ""]
    lines += [f"- {esc(n)}" for n in table.notes]
    lines += ["", "| " + " | ".join([esc(table.row_header)] + [c.header for c in table.columns]) + " |"]
    lines.append("|---|" + "---:|" * len(table.columns))
    best = [table.best(j) for j in range(len(table.columns))]
    for i, row in enumerate(table.rows):
        cells = []
        for j, cell in enumerate(row.cells):
            text = format_cell(cell, digits)
            cells.append(f"**{text}**" if i in best[j] else text)
        lines.append("| " + " | ".join([esc(row.label)] + cells) + " |")
    for d in table.deltas:
        lines.append("| " + " | ".join([esc(d.label)] + [format_delta(v, digits) for v in d.values]) + " |")
    return "\n".join(lines) + "\n"


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "→": r"$\rightarrow$",
    "Δ": r"$\Delta$",
    "±": r"$\pm$",
    "·": r"$\cdot$",
    "−": "$-$",
    "—": "---",
}


def tex_escape(text: str) -> str:
    return text.translate(str.maketrans(_TEX))


def render_latex(table: Table, digits: int = 2) -> str:
    """A booktabs table: dataset and metric header rows with \\cmidrule, best per column \\textbf."""
    cols = table.columns
    groups: list[tuple[str, int, int]] = []  # (text, first column, last column), 1-based after the label
    sub: list[tuple[str, int, int]] = []
    for j, c in enumerate(cols, start=2):
        if not groups or groups[-1][0] != c.dataset:
            groups.append((c.dataset, j, j))
            sub.append((c.metric, j, j))
        else:
            groups[-1] = (c.dataset, groups[-1][1], j)
            if sub[-1][0] == c.metric:
                sub[-1] = (c.metric, sub[-1][1], j)
            else:
                sub.append((c.metric, j, j))

    def header(spans, fmt) -> list[str]:
        cells = " & ".join(rf"\multicolumn{{{b - a + 1}}}{{c}}{{{fmt(t)}}}" for t, a, b in spans)
        rules = " ".join(rf"\cmidrule(lr){{{a}-{b}}}" for _, a, b in spans)
        return [f" & {cells} \\\\", rules]

    def cell(c: Cell, bold: bool) -> str:
        text = MISSING if c.mean is None else format_cell(c, digits, pm=" $\\pm$ ")
        text = "---" if text == MISSING else text
        return rf"\textbf{{{text}}}" if bold else text

    caption = tex_escape(table.title) + ". " + " ".join(tex_escape(n) for n in table.notes)
    lines = [
        "% Generated by `orchestrator tables` from the MLflow store; do not edit. Needs \\usepackage{booktabs}.",
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{caption}}}",
        rf"\label{{tab:{file_stem(table.name)}}}",
        rf"\begin{{tabular}}{{l{'r' * len(cols)}}}",
        r"\toprule",
        *header(groups, tex_escape),
        *header(sub, str.upper),
        " & ".join([tex_escape(table.row_header)] + [c.region.capitalize() for c in cols]) + r" \\",
        r"\midrule",
    ]
    best = [table.best(j) for j in range(len(cols))]
    for i, row in enumerate(table.rows):
        cells = [cell(c, i in best[j]) for j, c in enumerate(row.cells)]
        lines.append(" & ".join([tex_escape(row.label)] + cells) + r" \\")
    if table.deltas:
        lines.append(r"\midrule")
        for d in table.deltas:
            values = ["---" if v is None else f"${v:+.{digits}f}$" for v in d.values]
            lines.append(" & ".join([tex_escape(d.label)] + values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def render_csv(table: Table) -> str:
    """One line per row (kind `value`) and per Δ row (kind `delta`, with its reference); per column
    `{dataset}/{metric}/{region}/mean`, `/std`, `/n`, full precision, empty when missing."""

    def num(v) -> str:
        return "" if v is None else repr(float(v))

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    head = ["table", "kind", "label", *table.key_fields, "reference", "seeds_in_grid"]
    writer.writerow(head + [f"{c.key}/{s}" for c in table.columns for s in ("mean", "std", "n")])
    for row in table.rows:
        keys = dict(row.keys)
        expected = row.cells[0].expected if row.cells else 0
        line = [table.name, "value", row.label, *(keys.get(k, "") for k in table.key_fields), "", expected]
        for c in row.cells:
            line += [num(c.mean), num(c.std), c.n]
        writer.writerow(line)
    for d in table.deltas:
        keys = dict(d.keys)
        line = [table.name, "delta", d.label, *(keys.get(k, "") for k in table.key_fields), d.reference, ""]
        for v in d.values:
            line += [num(v), "", ""]
        writer.writerow(line)
    return buf.getvalue()


@dataclass
class RunSource:
    """The runs to tabulate and what the sweep's parent run says about them."""

    runs: pd.DataFrame
    axes: list[str] | None  # None: infer from the runs
    baseline: str | None
    base_values: dict | None
    parent_run_id: str | None
    description: str


@contextmanager
def _tracking_uri(uri: str):
    """`mlflow.search_runs` reads MLflow's global tracking URI. Set it for the call only, and put back
    both the global and $MLFLOW_TRACKING_URI (mlflow.set_tracking_uri writes the variable too)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_uri = getattr(tracking_utils, "_tracking_uri", None)
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _check_store(uri: str) -> None:
    # Opening a missing SQLite file would create an empty store; a reader should say it is not there.
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise TablesError(f"no MLflow store at {path} (tracking URI {uri})")


def _json_tag(run, tag: str, kind: type):
    text = run.data.tags.get(tag)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise TablesError(f"run {run.info.run_id}: tag {tag} is not JSON: {text!r}") from None
    if not isinstance(value, kind):
        raise TablesError(f"run {run.info.run_id}: tag {tag} should be a JSON {kind.__name__}, got {text!r}")
    return value


def _find_parent(client, exp, parent_run_id: str | None, sweep: str | None):
    """The sweep's parent run: by id, by sweep name (the latest), or the latest of the experiment if any."""
    from mlflow.exceptions import MlflowException

    if parent_run_id:
        try:
            run = client.get_run(parent_run_id)
        except MlflowException:
            raise TablesError(f"no run with id {parent_run_id!r}") from None
        if run.info.experiment_id != exp.experiment_id:
            raise TablesError(f"run {parent_run_id} is not in experiment {exp.name!r}")
        return run
    query = f"tags.`{ROLE_TAG}` = 'sweep'"
    if sweep:
        if "'" in sweep:
            raise TablesError(f"invalid sweep name {sweep!r}")
        query += f" and tags.`{SWEEP_TAG}` = '{sweep}'"
    parents = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1)
    if sweep and not parents:
        raise TablesError(f"no sweep named {sweep!r} in experiment {exp.name!r}")
    return parents[0] if parents else None


def load_runs(tracking_uri: str, experiment: str, *, parent_run_id: str | None = None, sweep: str | None = None) -> RunSource:
    """Read the runs of one sweep (its parent's nested runs, all statuses so failed cells stay in the grid)
    or, when the experiment has no sweep, every FINISHED run of it."""
    import mlflow
    from mlflow import MlflowClient

    _check_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TablesError(f"no experiment named {experiment!r} at {tracking_uri}; experiments there: {', '.join(names) or 'none'}")
    parent = _find_parent(client, exp, parent_run_id, sweep)
    with _tracking_uri(tracking_uri):
        if parent is not None:
            pid = parent.info.run_id
            runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{pid}'")
        else:
            runs = mlflow.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'")
    if parent is None:
        if f"tags.{ROLE_TAG}" in runs:
            runs = runs[runs[f"tags.{ROLE_TAG}"] != "sweep"]
        if runs.empty:
            raise TablesError(f"experiment {experiment!r} has no finished runs")
        return RunSource(runs, None, None, None, None, f"experiment '{experiment}', {len(runs)} finished runs")
    if runs.empty:
        raise TablesError(f"sweep run {pid} in experiment {experiment!r} has no cell runs")
    name = parent.data.tags.get(SWEEP_TAG, "?")
    return RunSource(
        runs=runs,
        axes=_json_tag(parent, AXES_TAG, list),
        baseline=parent.data.tags.get(BASELINE_TAG) or None,
        base_values=_json_tag(parent, BASE_VALUES_TAG, dict),
        parent_run_id=pid,
        description=f"experiment '{experiment}', sweep '{name}' (parent run {pid}), {len(runs)} cell runs",
    )


class TableFiles(list):
    """The written paths (paper.md first), plus the paper table's Markdown and the tables themselves."""

    def __init__(self, paths: list[Path], markdown: str, tables: list[Table]):
        super().__init__(paths)
        self.markdown = markdown
        self.tables = tables


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
    tables = build_tables(
        src.runs,
        axes=src.axes,
        split=split,
        baseline=baseline,
        base_values=src.base_values,
        sweep_baseline=src.baseline,
        source=src.description,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in tables:
        for ext, text in (("md", render_markdown(t, digits)), ("tex", render_latex(t, digits)), ("csv", render_csv(t))):
            path = out / f"{file_stem(t.name)}.{ext}"
            path.write_text(text, encoding="utf-8")
            paths.append(path)
    if src.parent_run_id and log_to_parent:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        for path in paths:
            client.log_artifact(src.parent_run_id, str(path), "tables")
    return TableFiles(paths, render_markdown(tables[0], digits), tables)
