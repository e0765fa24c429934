"""What a paper table is made of: columns (dataset × metric × region), cells that keep every seed's
value, rows, Δ rows; and the names shared by the modules that build and render it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from orchestrator.reporting.uncertainty import Delta

SPLITS = ("test", "val")
METRICS = ("mae", "gm")
REGIONS = ("all", "many", "medium", "few")

PIPELINE, DATASET, SEED = "pipeline", "data.name", "seed"

DEFAULT_BASELINE = "sft:ce"
MISSING = "—"
COLLAPSED_MARK = "†"  # a cell some of whose runs collapsed to (nearly) one answer


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
class TableCell:
    """One cell: the metric of every seed that finished (in seed order), and how many seeds the grid has;
    which seeds and runs those are, and how many of the runs collapsed (uncertainty.collapsed)."""

    values: tuple[float, ...]
    expected: int
    seeds: tuple[str, ...] = ()
    run_ids: tuple[str, ...] = ()
    collapsed: int = 0

    def by_seed(self) -> dict[str, float]:
        return dict(zip(self.seeds, self.values))

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
    cells: tuple[TableCell, ...]


@dataclass(frozen=True)
class DeltaRow:
    label: str
    keys: tuple[tuple[str, str], ...]
    reference: str  # label of the row it is compared against
    # per column: the mean over the seeds both rows have of row − reference; None if they share none, or
    # when the reference cell is partial (a partial cell is never a baseline)
    values: tuple[float | None, ...]
    # per column: the 95% paired-bootstrap interval (uncertainty.Delta), None where there are no predictions
    intervals: tuple[Delta | None, ...] = ()


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
        """Rows with the lowest mean in column j (ties all bold); none when fewer than two rows have one.
        A partial cell (seeds missing) is never bold: its mean is not comparable with the others'."""
        means = [(i, r.cells[j].mean) for i, r in enumerate(self.rows)
                 if r.cells[j].mean is not None and not r.cells[j].partial]
        if len(means) < 2:
            return set()
        low = min(m for _, m in means)
        return {i for i, m in means if m == low}

    def row(self, label: str) -> Row:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(f"no row {label!r} in table {self.name}; rows: {[r.label for r in self.rows]}")

    def cell(self, row: str, column: str) -> TableCell:
        """Cell by row label and column key (`movies/mae/all`)."""
        keys = [c.key for c in self.columns]
        return self.row(row).cells[keys.index(column)]


def display_pipeline(label: str) -> str:
    return label.replace(" -> ", " → ")


def file_stem(name: str) -> str:
    """A table or experiment name as a file name (and a LaTeX label)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
