"""A sweep's own plots, logged to its parent run under `plots/`: learning curves across its cells (a plot
per key training metric, a line per cell, coloured by pipeline), and, for each swept numeric field, the test
MAE and GM (all items) against the field's value, mean ± std over seeds, a line per pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# What each stage logs every window; a cell without one of them (SFT has no reward) draws no line there.
CURVE_METRICS = ("train/loss", "train/reward/mean", "train/kl", "train/pred_std_over_label_std", "train/lr")
AXIS_METRICS = ("mae/all", "gm/all")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(7.0, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def pipeline_colours(pipelines) -> dict[str, str]:
    return {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(sorted(set(pipelines)))}


def learning_curves(cells: dict[str, tuple[str, dict[str, list[tuple[int, float]]]]], out_dir: Path) -> list[Path]:
    """cells: cell name -> (pipeline, {metric: [(step, value), ...]}). One PNG per metric some cell logged."""
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = pipeline_colours(p for p, _ in cells.values())
    paths = []
    for metric in CURVE_METRICS:
        drawn = [(name, pipeline, sorted(h[metric])) for name, (pipeline, h) in sorted(cells.items()) if h.get(metric)]
        if not drawn:
            continue
        fig, ax = _figure()
        labelled = set()
        for _, pipeline, points in drawn:
            steps, values = zip(*points)
            label = None if pipeline in labelled else pipeline
            labelled.add(pipeline)
            ax.plot(steps, values, color=colours[pipeline], alpha=0.8, linewidth=1.2, label=label)
        ax.set_title(f"{metric} of every cell")
        ax.set_xlabel("global step")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8, title="pipeline (a line per cell)", title_fontsize=8)
        path = out_dir / f"curves_{_file_name(metric)}.png"
        fig.savefig(path, format="png")
        paths.append(path)
    return paths


def numeric_axes(frame: pd.DataFrame, axes: list[str]) -> list[str]:
    """The swept fields (seed aside) whose values are all numbers, at least two of them."""
    out = []
    for axis in axes:
        if axis in ("seed", "pipeline", "data.name") or axis not in frame.columns:
            continue
        values = frame[axis].dropna().unique()
        try:
            numbers = {float(v) for v in values}
        except (TypeError, ValueError):
            continue
        if len(numbers) >= 2:
            out.append(axis)
    return out


def axis_plots(frame: pd.DataFrame, axes: list[str], out_dir: Path) -> list[Path]:
    """frame: the tables' tidy frame (pipeline, dataset, seed, each axis as text, `mae/all` ...). Per
    numeric axis and dataset: each metric against the axis value, mean ± std over seeds per pipeline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = frame[frame["finished"]]
    colours = pipeline_colours(finished["pipeline"])
    paths = []
    for axis in numeric_axes(finished, axes):
        for dataset in sorted(finished["dataset"].unique()):
            fig, panels = Figure(figsize=(10.0, 4.0), dpi=100, layout="constrained"), []
            FigureCanvasAgg(fig)
            panels = fig.subplots(1, len(AXIS_METRICS))
            for ax, metric in zip(np.atleast_1d(panels), AXIS_METRICS):
                here = finished[(finished["dataset"] == dataset) & finished[axis].notna()]
                for pipeline, runs in here.groupby("pipeline"):
                    stats = runs.assign(x=runs[axis].astype(float)).groupby("x")[metric].agg(["mean", "std"])
                    ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3,
                                color=colours[pipeline], label=pipeline)
                ax.set_xlabel(axis)
                ax.set_ylabel(f"test {metric.replace('/', ' ')}")
                ax.set_title(f"{dataset}: test {metric.split('/')[0].upper()} (mean ± std over seeds)")
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
            path = out_dir / f"axis_{_file_name(axis)}_{_file_name(dataset)}.png"
            fig.savefig(path, format="png")
            paths.append(path)
    return paths


def sweep_plots(tracking_uri: str, experiment: str, parent_run_id: str, out_dir: str | Path) -> list[Path]:
    """Both kinds of plot for a sweep, from the tracking store, logged to its parent run under `plots/`."""
    from orchestrator.reporting.frame import tidy_runs
    from orchestrator.reporting.runs import load_runs
    from orchestrator.tracking.conventions import CELL_TAG, tracking_client

    src = load_runs(tracking_uri, experiment, parent_run_id=parent_run_id)
    client = tracking_client(tracking_uri)
    cells = {}
    for _, run in src.runs.iterrows():
        name = run.get(f"tags.{CELL_TAG}") or run["run_id"]
        histories = {m: [(p.step, p.value) for p in client.get_metric_history(run["run_id"], m)] for m in CURVE_METRICS}
        cells[name] = (run.get("params.pipeline") or "?", histories)
    out = Path(out_dir)
    paths = learning_curves(cells, out)
    axes = src.axes or []
    paths += axis_plots(tidy_runs(src.runs, [a for a in axes if a not in ("pipeline", "data.name", "seed")], "test"),
                        axes, out)
    for path in paths:
        client.log_artifact(parent_run_id, str(path), "plots")
    return paths
