"""The DIR datasets on the real packaged data: splits, balance, regions, determinism, bad input."""

import numpy as np
import pandas as pd
import pytest

from orchestrator.config import DataConfig
from orchestrator.data import DATASETS, DataError, DatasetSpec, build_dataset, describe, dir_split, load_built
from orchestrator.data.protocol import bin_counts, label_bins, region_of_count, shot_regions


@pytest.fixture(scope="module")
def movies(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return build_dataset(DataConfig(name="movies", root=str(root), train_size=2000, max_per_label=5))


def test_protocol_primitives_by_hand():
    assert label_bins([0.3, 0.29, 2.0, 2.99], 0.1).tolist() == [3, 2, 20, 29]
    assert label_bins([499, 500, 1499], 500).tolist() == [0, 1, 2]
    assert bin_counts([1, 1, 2, 5], 1) == {1: 2, 2: 1, 5: 1}
    assert [region_of_count(c) for c in (101, 100, 20, 19, 0)] == ["many", "medium", "medium", "few", "few"]
    assert shot_regions([1, 2, 9], {1: 3, 2: 1}, 1, many=2, few=2).tolist() == ["many", "few", "few"]


def test_dir_split_by_hand():
    # bin 0 has 9 rows -> val 3, test 3, train 3; bin 1 has 2 rows -> never in val/test
    targets = np.array([0.0] * 9 + [1.0] * 2)
    rows = dir_split(targets, 1.0, max_per_label=5, seed=0)
    assert (len(rows["val"]), len(rows["test"]), len(rows["train"])) == (3, 3, 5)
    assert set(rows["train"]) >= {9, 10}


def test_movies_splits_follow_the_dir_protocol(movies):
    train, val, test = (movies.load(s).to_pandas() for s in ("train", "val", "test"))
    assert len(train) == 2000
    assert set(train.target) <= set(range(10, 101))
    for split in (val, test):
        per_bin = split.groupby("bin").size()
        assert per_bin.max() <= 5  # balanced
    assert not (set(train.id) & set(val.id)) and not (set(val.id) & set(test.id)) and not (set(train.id) & set(test.id))
    # regions are recomputed from the training counts
    counts = train.groupby("bin").size().to_dict()
    for frame in (train, val, test):
        expected = [region_of_count(counts.get(b, 0), 100, 20) for b in frame.bin]
        assert frame.region.tolist() == expected
    # the training split keeps the long tail: the middle ratings dominate
    assert train.target.between(50, 80).mean() > 0.5
    assert movies.meta["sizes"] == {"train": 2000, "val": len(val), "test": len(test)}


def test_prompts_do_not_leak_the_label(movies):
    prompt = movies.load("train").column("prompt")[0].as_py()
    assert "Title:" in prompt and prompt.endswith("Answer with <answer>NUMBER</answer>.")
    assert "votes" not in prompt.lower() and "r1" not in prompt.lower()


def test_builds_are_deterministic_cached_and_forced(tmp_path, movies):
    cfg = DataConfig(name="movies", root=str(tmp_path), train_size=500, max_per_label=3, seed=7)
    a = build_dataset(cfg)
    b = build_dataset(cfg)
    assert a.path == b.path and a.load("train").equals(b.load("train"))
    mtime = (a.path / "train.parquet").stat().st_mtime_ns
    build_dataset(cfg)
    assert (a.path / "train.parquet").stat().st_mtime_ns == mtime  # reused
    c = build_dataset(cfg, force=True)
    assert c.load("test").equals(a.load("test"))  # same seed, same split
    other = build_dataset(cfg.model_copy(update={"seed": 8}))
    assert not other.load("train").column("id").equals(a.load("train").column("id"))
    assert not list(tmp_path.glob("movies/.build-*"))  # no temporary folders left


def test_diamonds_and_doctor_visits(tmp_path):
    cfg = DataConfig(name="diamonds", root=str(tmp_path), label_step=1000, train_size=1000, max_per_label=5)
    d = build_dataset(cfg)
    assert d.label_step == 1000
    assert (d.load("val").to_pandas().bin == d.load("val").to_pandas().target // 1000).all()
    v = build_dataset(DataConfig(name="doctor-visits", root=str(tmp_path), max_per_label=10))
    train = v.load("train").to_pandas()
    assert train.target.value_counts().idxmax() == 0  # zero-inflated
    assert "outpatient visits" in describe(v)


def test_describe_prints_histogram_and_regions(movies):
    text = describe(movies)
    assert "train" in text and "many" in text and "#" in text
    assert len(text.splitlines()) < 70


def test_bad_input_gets_specific_errors(tmp_path, monkeypatch):
    registered = "diamonds, digit-count, doctor-visits, manifest, movies"
    with pytest.raises(DataError, match=f"unknown dataset 'nope'; registered: {registered}"):
        build_dataset(DataConfig(name="nope", root=str(tmp_path)))
    with pytest.raises(DataError, match="no built dataset"):
        load_built(tmp_path / "missing")


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"id": [0], "prompt": ["p"]}), "missing column 'target'"),
        (pd.DataFrame({"id": [0, 1], "prompt": ["p", "q"], "target": [1.0, "many"]}),
         "non-numeric target 'many' in row 1"),
        (pd.DataFrame({"id": [0], "prompt": ["p"], "target": [None]}), "missing target in row 0"),
    ],
)
def test_bad_frames(tmp_path, monkeypatch, frame, message):
    monkeypatch.setitem(DATASETS, "broken", DatasetSpec("broken", lambda cfg: frame, 1.0, "d", "t"))
    with pytest.raises(DataError, match=message):
        build_dataset(DataConfig(name="broken", root=str(tmp_path)))


def test_empty_split_is_refused(tmp_path, monkeypatch):
    frame = pd.DataFrame({"id": range(4), "prompt": ["p"] * 4, "target": [1.0, 2.0, 3.0, 4.0]})  # every bin < 3 rows
    monkeypatch.setitem(DATASETS, "sparse", DatasetSpec("sparse", lambda cfg: frame, 1.0, "d", "t"))
    with pytest.raises(DataError, match="the val split is empty; lower data.max_per_label"):
        build_dataset(DataConfig(name="sparse", root=str(tmp_path)))


def test_a_split_column_from_a_source_is_kept_as_given(tmp_path, monkeypatch):
    splits = ["train", "train", "val", "test", "train", "val", "test", "train"]
    frame = pd.DataFrame({"id": range(8), "prompt": ["p"] * 8, "target": [1.0, 1, 2, 2, 3, 3, 3, 1], "split": splits})
    monkeypatch.setitem(DATASETS, "given", DatasetSpec("given", lambda cfg: frame, 1.0, "d", "t"))
    built = build_dataset(DataConfig(name="given", root=str(tmp_path), many_threshold=2, few_threshold=2))
    for split in ("train", "val", "test"):
        assert built.load(split).column("id").to_pylist() == [i for i, s in enumerate(splits) if s == split]
    assert built.meta["split_source"] == "given" and not built.has_images
    # regions still come from the training counts: label 1 has 3 training rows (> 2: many), label 3 one
    test = built.load("test")
    assert dict(zip(test.column("target").to_pylist(), test.column("region").to_pylist())) == {2.0: "few", 3.0: "few"}
    assert built.load("train").column("region").to_pylist() == ["many", "many", "few", "many"]


def test_a_bad_split_value_from_a_source_is_refused(tmp_path, monkeypatch):
    frame = pd.DataFrame(
        {"id": range(3), "prompt": ["p"] * 3, "target": [1.0, 2.0, 3.0], "split": ["train", "val", "dev"]}
    )
    monkeypatch.setitem(DATASETS, "devsplit", DatasetSpec("devsplit", lambda cfg: frame, 1.0, "d", "t"))
    with pytest.raises(DataError, match="bad split 'dev' in row 2; allowed: train, val, test"):
        build_dataset(DataConfig(name="devsplit", root=str(tmp_path)))


def test_compact_prompts_keep_the_features_and_drop_the_words():
    from orchestrator.config import ConfigError, DataConfig, load_run_config
    from orchestrator.data.sources import load_source, render_prompt

    features = [("~Title", "Casablanca"), ("Year", "1942"), ("Genres", "Drama, Romance")]
    assert render_prompt("Rate it.", features, "compact") == "1942 | Drama, Romance"
    assert render_prompt("Rate it.", features, "full") == (
        "Rate it.\nTitle: Casablanca\nYear: 1942\nGenres: Drama, Romance\nAnswer with <answer>NUMBER</answer>."
    )
    _, full = load_source(DataConfig(name="movies"))
    _, compact = load_source(DataConfig(name="movies", prompt_style="compact"))
    assert (full.target == compact.target).all() and compact.prompt.str.len().mean() < full.prompt.str.len().mean() / 4
    assert DataConfig(name="movies").fingerprint() != DataConfig(name="movies", prompt_style="compact").fingerprint()
    with pytest.raises(ConfigError, match="prompt_style=compact applies to the text datasets"):
        load_run_config(
            overrides=["data.name=digit-count", "data.prompt_style=compact", "model.tiny.architecture=smolvlm"]
        )


def test_the_label_range_is_the_whole_datasets_not_the_training_subsets(tmp_path):
    """A 300-film training subset misses the rarest ratings, but the label range (format reward, MAE scale,
    RvTC centres, parse-failure penalties) spans every rating of the dataset, 1.0 to 10.0 (x10)."""
    built = build_dataset(DataConfig(name="movies", root=str(tmp_path), train_size=300, max_per_label=5))
    train = built.load("train").column("target").to_numpy()
    assert train.min() > 10 or train.max() < 100  # the subset alone would give a narrower range
    assert (built.label_min, built.label_max) == (10.0, 100.0)
    for split in ("val", "test"):
        targets = built.load(split).column("target").to_numpy()
        assert built.label_min <= targets.min() and targets.max() <= built.label_max


def test_a_new_builder_version_is_a_new_fingerprint(monkeypatch):
    """Builds are cached by fingerprint: a builder that writes different splits or meta for the same config
    bumps its version, so no cached build of the old one is reused."""
    import orchestrator.config.data as data_config

    before = DataConfig(name="movies").fingerprint()
    monkeypatch.setattr(data_config, "DATA_BUILD_VERSION", data_config.DATA_BUILD_VERSION + 1)
    assert DataConfig(name="movies").fingerprint() != before


def test_every_dataset_of_the_paper_grid_has_all_three_shot_regions(tmp_path):
    """ablations/paper.yaml reports MAE and GM per shot region for each dataset it names: each one, built as
    its cells build it, has many-, medium- and few-shot items in its test split (diamonds binned at 500
    dollars had no few-shot item at all)."""
    from pathlib import Path

    from orchestrator.sweep.grid import expand_cells, load_ablation

    ablation, base = load_ablation(Path(__file__).parents[1] / "ablations" / "paper.yaml")
    cells, _ = expand_cells(ablation, base)
    datasets = {cell.cfg.data.fingerprint(): cell.cfg.data for cell in cells}
    assert sorted(d.name for d in datasets.values()) == ["diamonds", "doctor-visits", "movies"]
    for data in datasets.values():
        built = build_dataset(data.model_copy(update={"root": str(tmp_path)}))
        regions = built.meta["regions"]["test"]
        assert min(regions["many"], regions["medium"], regions["few"]) > 0, (data.name, regions)
