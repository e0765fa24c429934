"""Per-cell diagnostic plots: predictions against targets, MAE per label bin, and the training-label
histogram, with the many / medium / few shot regions (METHODS §2) shaded from the TRAINING counts.

Matplotlib's Agg canvas is used directly (no pyplot): no display, no global pyplot state, safe inside
Ray workers. Degenerate inputs (no predictions, every prediction a parse failure, one label bin, an
empty region) still give the three images, with a note on the plot instead of an exception."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orchestrator.data.protocol import REGIONS, bin_counts, label_bins, region_of_count, shot_regions

FILES = ("pred_vs_target.png", "mae_per_bin.png", "train_histogram.png")
REGION_COLORS = {"many": "#2ca02c", "medium": "#ff7f0e", "few": "#d62728"}
MAX_BINS = 100_000  # a label_step far too small for the label range; refuse rather than draw for minutes


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(6.4, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _finish(fig: Figure, ax, path: Path, title: str, ylabel: str) -> Path:
    """Title, axis labels (x is always the target), a legend when something is labelled; then save."""
    ax.set_title(title)
    ax.set_xlabel("target")
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0] and not ax.get_legend():
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _dense_bins(*bin_sets) -> np.ndarray:
    """Every bin from the lowest to the highest seen (bins without training data are few-shot)."""
    seen = [int(b) for s in bin_sets for b in s]
    if not seen:
        return np.array([], dtype=np.int64)
    lo, hi = min(seen), max(seen)
    if hi - lo + 1 > MAX_BINS:
        raise ValueError(f"{hi - lo + 1} label bins: label_step is too small for this label range")
    return np.arange(lo, hi + 1)


def _shade_regions(ax, bins: np.ndarray, counts: dict[int, int], label_step: float, many: int, few: int) -> None:
    """One translucent span per run of consecutive bins in the same shot region, one legend entry each."""
    regions = [region_of_count(counts.get(int(b), 0), many, few) for b in bins]
    labelled = set()
    start = 0
    for i in range(1, len(bins) + 1):
        if i == len(bins) or regions[i] != regions[start]:
            region = regions[start]
            ax.axvspan(
                bins[start] * label_step,
                (bins[i - 1] + 1) * label_step,
                color=REGION_COLORS[region],
                alpha=0.12,
                lw=0,
                label=None if region in labelled else f"{region}-shot",
            )
            labelled.add(region)
            start = i


def _floats(values: list) -> np.ndarray:
    """Nulls (a parse failure) as NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _columns(predictions):
    names = set(predictions.column_names)
    missing = {"target", "prediction"} - names
    if missing:
        raise ValueError(f"predictions lack column(s) {sorted(missing)}; have {sorted(names)}")
    targets = _floats(predictions.column("target").to_pylist())
    preds = _floats(predictions.column("prediction").to_pylist())
    regions = predictions.column("region").to_pylist() if "region" in names else None
    return targets, preds, regions


def _scatter(path, targets, preds, regions, label_step) -> Path:
    fig, ax = _figure()
    parsed = np.isfinite(preds)
    n, failed = len(targets), int((~parsed).sum())
    for region in (*REGIONS, None):
        sel = parsed & np.array([r == region for r in regions], dtype=bool)
        if sel.any():
            ax.scatter(
                targets[sel], preds[sel], s=12, alpha=0.6,
                color=REGION_COLORS.get(region, "0.5"), label=f"{region or 'unknown'}-shot",
            )
    finite = np.concatenate([targets[np.isfinite(targets)], preds[parsed]])
    if len(finite):
        lo, hi = float(finite.min()), float(finite.max())
        if hi - lo < label_step:
            lo, hi = lo - label_step, hi + label_step
        ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls="--", label="y = x")
    if failed:  # a rug at the bottom edge: where the failures sit in target space
        ax.plot(
            targets[~parsed], np.full(failed, 0.02), "|", color="k", ms=10,
            transform=ax.get_xaxis_transform(), label="parse failure (at its target)",
        )
    if n == 0:
        _note(ax, "no predictions")
    elif failed == n:
        _note(ax, "every completion failed to parse")
    rate = f"{failed / n:.0%}" if n else "n/a"
    return _finish(fig, ax, path, f"prediction vs target (n={n}, parse failures {failed} = {rate})", "prediction")


def _mae_per_bin(path, targets, preds, counts, label_step, many, few) -> Path:
    fig, ax = _figure()
    ok = np.isfinite(preds) & np.isfinite(targets)
    failed = int((~np.isfinite(preds)).sum())
    test_bins = label_bins(targets[np.isfinite(targets)], label_step)
    _shade_regions(ax, _dense_bins(counts, test_bins), counts, label_step, many, few)
    if ok.any():
        bins = label_bins(targets[ok], label_step)
        errors = np.abs(preds[ok] - targets[ok])
        uniq = np.unique(bins)
        mae = np.array([errors[bins == b].mean() for b in uniq])
        ax.bar(uniq * label_step, mae, width=label_step * 0.9, align="edge", color="0.3", label="MAE")
    else:
        _note(ax, "no parsed predictions")
    title = f"MAE per label bin (width {label_step:g}; parse failures excluded: {failed})"
    return _finish(fig, ax, path, title, "mean absolute error")


def _train_histogram(path, counts, label_step, many, few) -> Path:
    fig, ax = _figure()
    bins = _dense_bins(counts)
    if len(bins):
        _shade_regions(ax, bins, counts, label_step, many, few)
        heights = np.array([counts.get(int(b), 0) for b in bins], dtype=np.float64)
        edges = np.append(bins, bins[-1] + 1) * label_step
        ax.stairs(heights, edges, fill=True, color="0.3", label="training samples")
        ax.axhline(many, color=REGION_COLORS["many"], ls="--", lw=1, label=f"many > {many}")
        ax.axhline(few, color=REGION_COLORS["few"], ls=":", lw=1, label=f"few < {few}")
        ax.legend(fontsize=8, loc="upper right")
    else:
        _note(ax, "no training labels")
    return _finish(fig, ax, path, f"training labels per bin (n={sum(counts.values())}, width {label_step:g})", "count")


def cell_plots(predictions, train_targets, *, label_step: float, many: int, few: int, out_dir) -> list[Path]:
    """Write `pred_vs_target.png`, `mae_per_bin.png` and `train_histogram.png` into out_dir.

    predictions: a pyarrow table with `target` and `prediction` (null for a parse failure), and
    optionally `region` (else computed from the training counts). Regions and bins follow
    orchestrator.data.protocol, so the shading matches the metrics."""
    if not label_step or label_step <= 0:
        raise ValueError(f"label_step must be > 0, got {label_step}")
    if few > many:
        raise ValueError(f"few ({few}) must not exceed many ({many})")
    targets, preds, regions = _columns(predictions)
    train = np.asarray(train_targets, dtype=np.float64).ravel()
    counts = bin_counts(train[np.isfinite(train)], label_step)
    if regions is None:
        regions = list(shot_regions(np.nan_to_num(targets), counts, label_step, many, few))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        _scatter(out / FILES[0], targets, preds, regions, label_step),
        _mae_per_bin(out / FILES[1], targets, preds, counts, label_step, many, few),
        _train_histogram(out / FILES[2], counts, label_step, many, few),
    ]
