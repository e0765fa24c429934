"""The sweep's plots: learning curves across cells and the metric against each numeric axis."""

import pandas as pd
from PIL import Image

from orchestrator.reporting.sweep_plots import axis_plots, learning_curves, numeric_axes, pipeline_colours


def test_learning_curves_one_png_per_logged_metric(tmp_path):
    cells = {
        "q-sft-ce_1": ("sft:ce", {"train/loss": [(10, 2.0), (20, 1.5)], "train/lr": [(10, 1e-3)]}),
        "q-sft-ce-grpo-ccc_1": ("sft:ce -> grpo:ccc", {"train/loss": [(10, 2.1), (30, 0.2)],
                                                       "train/reward/mean": [(30, 0.1), (40, 0.3)]}),
        "q-empty_1": ("sft:ce", {}),  # a cell that never logged: no line, no error
    }
    paths = learning_curves(cells, tmp_path)
    assert [p.name for p in paths] == ["curves_train_loss.png", "curves_train_reward_mean.png", "curves_train_lr.png"]
    assert all(Image.open(p).size == (700, 440) for p in paths)
    assert pipeline_colours(["b", "a", "b"]) == {"a": "#1f77b4", "b": "#ff7f0e"}


def test_axis_plots_for_numeric_axes_only(tmp_path):
    frame = pd.DataFrame({
        "finished": [True] * 6 + [False],
        "pipeline": ["sft:ce -> grpo:ccc"] * 7,
        "dataset": ["movies"] * 7,
        "seed": ["1", "2", "1", "2", "1", "2", "3"],
        "pipeline.1.beta": ["0.0", "0.0", "0.04", "0.04", "0.1", "0.1", "0.1"],
        "pipeline.1.kl_estimator": ["k3"] * 7,
        "mae/all": [5.0, 5.2, 4.8, 5.0, 5.5, 5.9, float("nan")],
        "gm/all": [3.0, 3.1, 2.9, 3.0, 3.3, 3.5, float("nan")],
    })
    axes = ["pipeline", "seed", "pipeline.1.beta", "pipeline.1.kl_estimator"]
    assert numeric_axes(frame, axes) == ["pipeline.1.beta"]  # one value of k3 and a text axis: no plot
    (path,) = axis_plots(frame, axes, tmp_path)
    assert path.name == "axis_pipeline.1.beta_movies.png" and Image.open(path).size == (1000, 400)
