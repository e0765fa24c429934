"""Per-cell plots: three valid PNGs for ordinary and degenerate inputs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from orchestrator.reporting.plots import FILES, cell_plots


def predictions(targets, preds, regions=None) -> pa.Table:
    n = len(targets)
    cols = {
        "id": pa.array([f"s{i}" for i in range(n)], pa.string()),
        "target": pa.array(targets, pa.float64()),
        "completion": pa.array([f"<answer>{p}</answer>" if p is not None else "oops" for p in preds], pa.string()),
        "prediction": pa.array(preds, pa.float64()),
    }
    if regions is not None:
        cols["region"] = pa.array(regions, pa.string())
    return pa.table(cols)


def check_pngs(paths, out_dir):
    assert [p.name for p in paths] == list(FILES)
    for p in paths:
        assert p.parent == out_dir and p.stat().st_size > 1000
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
            im.verify()


def test_ordinary_cell(tmp_path):
    rng = np.random.default_rng(0)
    # long-tailed training labels: bins 10..19 with 200..2 samples -> many, medium and few bins
    train = np.concatenate([np.full(int(200 / (k + 1)), 10 + k) for k in range(10)])
    targets = [float(t) for t in range(10, 22) for _ in range(3)]  # bins 20, 21 are unseen: few-shot
    preds = [None if i % 7 == 0 else t + float(rng.normal(0, 1)) for i, t in enumerate(targets)]
    regions = ["many" if t < 11 else "medium" if t < 18 else "few" for t in targets]
    paths = cell_plots(predictions(targets, preds, regions), train, label_step=1, many=100, few=20,
                       out_dir=tmp_path / "plots")
    check_pngs(paths, tmp_path / "plots")


@pytest.mark.parametrize(
    "targets, preds, train",
    [
        ([5.0, 6.0, 7.0], [None, None, None], [5, 5, 6, 7]),  # every completion failed to parse
        ([5.0, 5.0, 5.0], [5.0, 4.0, None], [5, 5, 5]),  # one label bin, one region
        ([], [], [1, 2, 3]),  # no predictions
        ([], [], []),  # nothing at all
        ([3.0], [1e6], [3.0]),  # a wild prediction far outside the label range
    ],
)
def test_degenerate_cells(tmp_path, targets, preds, train):
    # no region column: computed from the training counts
    paths = cell_plots(predictions(targets, preds), np.asarray(train, float), label_step=1, many=2, few=1,
                       out_dir=tmp_path)
    check_pngs(paths, tmp_path)


def test_wide_bins_and_bad_input(tmp_path):
    train = np.array([300.0, 700.0, 800.0, 4000.0, 18000.0])
    paths = cell_plots(
        predictions([500.0, 17990.0], [650.0, 1000.0], ["many", "few"]), train, label_step=500, many=1, few=1,
        out_dir=tmp_path,
    )
    check_pngs(paths, tmp_path)
    with pytest.raises(ValueError, match="label_step"):
        cell_plots(predictions([1.0], [1.0]), [1.0], label_step=0, many=2, few=1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="prediction"):
        cell_plots(pa.table({"target": [1.0]}), [1.0], label_step=1, many=2, few=1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="too small"):
        cell_plots(predictions([0.0], [0.0]), [0.0, 1e9], label_step=1, many=2, few=1, out_dir=tmp_path)
