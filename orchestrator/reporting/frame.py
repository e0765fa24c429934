"""From runs in the `mlflow.search_runs` layout to a tidy frame, and which of its fields are axes.

The tidy frame has one row per run: run_id, finished, start_time, pipeline, dataset, seed, each swept
field as text (None when the run lacks it), and a float column `{metric}/{region}` per metric."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import numpy as np
import pandas as pd

from orchestrator.reporting.layout import DATASET, METRICS, PIPELINE, REGIONS, SEED, SPLITS, TablesError
from orchestrator.tracking.conventions import CONFIG_HASH_TAG, ERROR_TAG, RUN_NAME_TAG

# Params that differ between runs without being an experimental choice.
BOOKKEEPING = re.compile(r"^(name|storage_path|data\.root|model\.cache_dir|tracking\..*)$")


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
            "status": status,
            "config_hash": _tag_column(runs, CONFIG_HASH_TAG),
            "run_name": _tag_column(runs, RUN_NAME_TAG),
            "error": _tag_column(runs, ERROR_TAG),
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


def _tag_column(runs: pd.DataFrame, tag: str) -> list[str | None]:
    column = f"tags.{tag}"
    return [_text(v) for v in runs[column]] if column in runs else [None] * len(runs)


def dedupe_configs(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One run per cell config (the config hash tag): the newest finished one, else the newest. A config
    run twice (a sweep resumed after its cells were renamed, a rerun) then counts once. Runs without the
    tag are kept. Returns (frame, runs dropped)."""
    hashed = frame[frame["config_hash"].notna()]
    ordered = hashed.sort_values(["finished", "start_time"], kind="stable")
    kept = ordered.drop_duplicates(subset=["config_hash"], keep="last")
    out = pd.concat([frame[frame["config_hash"].isna()], kept]).sort_index()
    return out, len(frame) - len(out)


def failed_runs(frame: pd.DataFrame) -> list[str]:
    """The runs that failed or were stopped, one line each (name, status, the first line of its error):
    their cells count as missing, and the tables list them under the table."""
    lines = []
    for row in frame[frame["status"].isin(["FAILED", "KILLED"])].itertuples():
        error = (row.error or "").strip().splitlines()[0][:160] if row.error else ""
        lines.append(f"{row.run_name or row.run_id} ({row.status}{': ' + error if error else ''})")
    return lines


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
