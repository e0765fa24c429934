"""Ablation files: expansion into cells, validation before compute, stable names, the parent run."""

import json

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.sweep.grid import base_fingerprint, base_values, expand_cells, load_ablation
from orchestrator.sweep.resume import open_parent

BASE = {
    "data": {"train_size": 300, "max_per_label": 2, "many_threshold": 12, "few_threshold": 4},
    "stages": {"sft": {"steps": 5}, "grpo": {"steps": 2, "max_new_tokens": 24}},
}


def write(tmp_path, **ablation):
    ablation.setdefault("name", "abl")
    ablation.setdefault("base", BASE)
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(ablation, sort_keys=False))
    return path


def cells_of(tmp_path, **ablation):
    return expand_cells(*load_ablation(write(tmp_path, **ablation)))


def test_axes_cross_and_paired_groups_zip(tmp_path):
    cells, notes = cells_of(
        tmp_path,
        axes={"pipeline": ["sft:ce", "sft:softlabel"], "seed": [1, 2, 3]},
        paired=[{"data.max_per_label": [2, 3], "data.few_threshold": [4, 5]}],
    )
    assert len(cells) == 2 * 3 * 2 and not notes
    combos = {(c.cfg.pipeline_label(), c.cfg.seed, c.cfg.data.max_per_label, c.cfg.data.few_threshold) for c in cells}
    assert ("sft:softlabel", 3, 3, 5) in combos and ("sft:ce", 1, 2, 5) not in combos  # zipped, not crossed
    assert len({c.name for c in cells}) == len(cells)


def test_stage_knobs_apply_to_their_kind_and_inapplicable_cells_merge(tmp_path):
    cells, notes = cells_of(
        tmp_path, axes={"pipeline": ["sft:ce", "sft:ce -> grpo:ccc"], "stages.grpo.group_size": [2, 4]}
    )
    # sft:ce has no GRPO stage: its two cells are one run; the chain gets both values
    assert len(cells) == 3 and len(notes) == 1 and "does not apply" in notes[0]
    chains = [c for c in cells if len(c.cfg.pipeline) == 2]
    assert sorted(c.cfg.pipeline[1].group_size for c in chains) == [2, 4]
    # the base stage settings are kept
    assert all(c.cfg.pipeline[0].steps == 5 and c.cfg.pipeline[1].steps == 2 for c in chains)


def test_exclusions_match_normalised_pipelines(tmp_path):
    cells, _ = cells_of(
        tmp_path, axes={"pipeline": ["sft:ce", "sft:ce → grpo:mae"], "seed": [1, 2]},
        exclude=[{"pipeline": "sft:ce -> grpo:mae", "seed": 2}],
    )
    assert sorted((c.cfg.pipeline_label(), c.cfg.seed) for c in cells) == [
        ("sft:ce", 1), ("sft:ce", 2), ("sft:ce -> grpo:mae", 1)
    ]


def test_cell_names_are_stable_and_readable(tmp_path):
    first, _ = cells_of(tmp_path, axes={"pipeline": ["sft:ce -> grpo:ccc"], "seed": [7]})
    again, _ = cells_of(tmp_path, axes={"seed": [7], "pipeline": ["sft:ce -> grpo:ccc"]}, description="reordered")
    assert first[0].name.startswith("abl-sft-ce-grpo-ccc_7-")
    # the name depends on what the ablation sets, not on the order of axes or on unrelated fields
    assert [c.name for c in first] == [c.name for c in again]


def test_the_grid_fingerprint_is_the_grid_as_a_set(tmp_path):
    from orchestrator.sweep.grid import canonical_grid, grid_changes, grid_fingerprint

    def grid(**ablation):
        return load_ablation(write(tmp_path, **ablation))[0]

    one = grid(axes={"pipeline": ["sft:ce", "sft:softlabel"], "seed": [1, 2]},
               paired=[{"data.max_per_label": [2, 3], "data.few_threshold": [4, 5]}])
    reordered = grid(axes={"seed": [2, 1], "pipeline": ["sft:softlabel", "sft:ce"]},
                     paired=[{"data.few_threshold": [5, 4], "data.max_per_label": [3, 2]}])
    assert grid_fingerprint(one) == grid_fingerprint(reordered)
    more = grid(axes={"pipeline": ["sft:ce", "sft:softlabel"], "seed": [1, 2, 3]},
                paired=[{"data.max_per_label": [2, 3], "data.few_threshold": [4, 5]}])
    assert grid_fingerprint(more) != grid_fingerprint(one)
    assert grid_changes(canonical_grid(one), canonical_grid(more)) == ["axes.seed: [1, 2] -> [1, 2, 3]"]


def test_a_resume_with_a_changed_grid_is_refused_listing_it_unless_allowed(tmp_path):
    from mlflow import MlflowClient

    from orchestrator.sweep.resume import check_parent

    uri = f"sqlite:///{tmp_path / 'm.db'}"

    def opened(resume, allow=False, **ablation):
        path = write(tmp_path, **ablation)
        abl, tree = load_ablation(path)
        cells, _ = expand_cells(abl, tree)
        fp = base_fingerprint(path, abl, [])
        check_parent(abl, uri, "exp", resume, fp, allow)
        return open_parent(abl, path.read_text(), cells, {}, uri, "exp", resume, fp, allow_changed=allow)

    parent = opened(False, axes={"pipeline": ["sft:ce"], "seed": [1, 2]})
    assert opened(True, axes={"seed": [2, 1], "pipeline": ["sft:ce"]}) == parent  # reordered: the same grid
    with pytest.raises(ConfigError, match=r"grid changed since it started:\n  axes.seed: \[1, 2\] -> \[1, 2, 3\]"):
        opened(True, axes={"pipeline": ["sft:ce"], "seed": [1, 2, 3]})
    assert opened(True, True, axes={"pipeline": ["sft:ce"], "seed": [1, 2, 3]}) == parent
    tags = MlflowClient(uri).get_run(parent).data.tags
    assert json.loads(tags["orchestrator.resume_changes"])[0]["changes"] == ["axes.seed: [1, 2] -> [1, 2, 3]"]
    assert opened(True, axes={"pipeline": ["sft:ce"], "seed": [1, 2, 3]}) == parent  # the new grid is the sweep's


def test_a_resumed_sweep_finds_its_cells_by_config_hash_whatever_their_names(tmp_path):
    """A cell run under another name (its axes once listed in another order) is the same cell: finished,
    it is not rerun; unfinished, it continues in its own run and folder."""
    from mlflow import MlflowClient

    from orchestrator.sweep.resume import match_cells
    from orchestrator.tracking.conventions import CELL_TAG, SWEEP_TAG
    from orchestrator.tracking.runs import start_or_resume_run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cells, _ = cells_of(tmp_path, axes={"pipeline": ["sft:ce", "sft:softlabel"], "seed": [1]},
                        overrides=[f"tracking.tracking_uri={uri}", "tracking.experiment=abl"])
    client = MlflowClient(uri)
    for cell, status in zip(cells, ["FINISHED", "FAILED"]):
        old_name = f"abl-1_{cell.cfg.pipeline[0].loss}-old"
        old = cell.cfg.model_copy(update={"name": old_name})
        run_id = start_or_resume_run(old, extra_tags={SWEEP_TAG: "abl", CELL_TAG: old_name})
        client.set_terminated(run_id, status=status)
    done, todo = match_cells(cells, uri, "abl", "abl")
    assert done == {cells[0].name}
    assert [c.name for c in todo] == [cells[0].name, "abl-1_softlabel-old"]  # the unfinished one keeps its run


def test_an_ablation_time_budget_overrides_the_cells(tmp_path):
    cells, _ = cells_of(tmp_path, axes={"seed": [1, 2]}, timeout_s=90,
                        base={**BASE, "timeout_s": 5000, "guard": {"on_nonfinite": "skip_step"}})
    assert [c.cfg.timeout_s for c in cells] == [90.0, 90.0]
    assert all(c.cfg.guard.on_nonfinite == "skip_step" for c in cells)
    plain, _ = cells_of(tmp_path, axes={"seed": [1]}, base={**BASE, "timeout_s": 5000})
    assert plain[0].cfg.timeout_s == 5000.0


@pytest.mark.parametrize(
    "ablation, fragment",
    [
        ({"axes": {"seed": []}}, "axes.seed: an empty axis"),
        ({"axes": {"seed": [1, 1]}}, "axes.seed: lists 1 more than once (duplicate cells)"),
        ({"axes": {"pipeline": ["sft:ce", "sft:ce "]}}, "lists sft:ce more than once"),
        ({"axes": {"seed": [1]}, "paired": [{"seed": [2]}]}, "paired.0.seed: the field is swept twice"),
        ({"paired": [{"seed": [1, 2], "data.seed": [1]}]}, "value lists differ in length"),
        ({"axes": {"seed": [1]}, "exclude": [{"data.seed": 1}]}, "exclude.0: names no swept field (data.seed)"),
        ({"axes": {"seed": [1]}, "axis": {}}, "axis: unknown field"),
        ({"axes": {"pipeline.0.lr": [-1.0]}}, "cell pipeline.0.lr=-1.0"),
        ({"axes": {"data.nmae": ["movies"]}}, "data.nmae: unknown field"),
        ({"axes": {"pipeline": ["sft:xx"]}}, "unknown SFT loss 'xx'"),
        ({"axes": {"seed": [1]}, "exclude": [{"seed": 1}]}, "every cell is excluded"),
    ],
)
def test_bad_ablations_are_refused_before_compute(tmp_path, ablation, fragment):
    with pytest.raises(ConfigError) as err:
        cells_of(tmp_path, **ablation)
    assert fragment in str(err.value)


def test_base_values_for_the_tables(tmp_path):
    ablation, tree = load_ablation(write(tmp_path, axes={"pipeline": ["sft:ce"], "stages.grpo.group_size": [2],
                                                          "data.max_per_label": [3]}))
    assert base_values(ablation, tree) == {"pipeline": "sft:ce", "stages.grpo.group_size": 4, "data.max_per_label": 2}


def test_parent_run_is_refused_twice_and_resume_refuses_a_changed_base(tmp_path):
    path = write(tmp_path, axes={"seed": [1, 2]})
    ablation, tree = load_ablation(path)
    cells, _ = expand_cells(ablation, tree)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    fp = base_fingerprint(path, ablation, [])
    parent = open_parent(ablation, path.read_text(), cells, {}, uri, "exp", False, fp)
    with pytest.raises(ConfigError, match="already has a parent run .* --resume"):
        open_parent(ablation, path.read_text(), cells, {}, uri, "exp", False, fp)
    assert open_parent(ablation, path.read_text(), cells, {}, uri, "exp", True, fp) == parent
    changed = base_fingerprint(path, ablation, ["data.train_size=100"])
    with pytest.raises(ConfigError, match="base config or overrides changed"):
        open_parent(ablation, path.read_text(), cells, {}, uri, "exp", True, changed)
    from mlflow import MlflowClient

    tags = MlflowClient(uri).get_run(parent).data.tags
    assert json.loads(tags["orchestrator.axes"]) == ["seed"] and tags["orchestrator.role"] == "sweep"


def test_dry_run_validates_every_cell_and_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path))
    path = write(tmp_path, axes={"pipeline": ["sft:ce", "sft:ce -> grpo:ccc"], "seed": [1, 2]})
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 cell(s)" in out and "every cell is valid" in out
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "results").exists()
    # a generation budget too short for the answer is found by the preflight, naming the cell
    assert main(["sweep", str(path), "--dry-run", "stages.grpo.max_new_tokens=8"]) == 2
    assert "pipeline.1.max_new_tokens=8 cannot hold the answer" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["advantage", "aggregation", "dynamic-sampling", "entropy"])
def test_the_grpo_variant_ablations_pass_the_dry_run(family, tmp_path, monkeypatch, capsys):
    """Each GRPO-variant family's ablation file, on the CPU base, validates every cell (config, rewards, dataset
    build, model, generation budget) and sweeps what it says."""
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path))
    path = __import__("pathlib").Path(__file__).parent.parent / "ablations" / f"axis-{family}.yaml"
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "every cell is valid" in out
    ablation, tree = load_ablation(path)
    assert ablation.base == "runs/cpu.yaml"
    cells, _ = expand_cells(ablation, tree)
    grpo = [c.cfg.pipeline[1] for c in cells]
    swept = {
        "advantage": {(g.scale_rewards, g.advantage_baseline, g.reward_combination) for g in grpo},
        "aggregation": {(g.loss_aggregation, g.importance_ratio, g.clip_ratio_c) for g in grpo},
        "dynamic-sampling": {g.dynamic_sampling for g in grpo},
        "entropy": {(g.entropy_coef, g.top_entropy_fraction) for g in grpo},
    }[family]
    assert len(swept) == len(cells) // 2 // (2 if family == "dynamic-sampling" else 1)  # every combination, 2 seeds


SHIPPED = sorted((__import__("pathlib").Path(__file__).parent.parent / "ablations").glob("*.yaml"))
RUNS = sorted((SHIPPED[0].parent / "runs").glob("*.yaml")) if SHIPPED else []


def test_the_shipped_files_exist():
    names = {p.name for p in SHIPPED}
    assert {"quick.yaml", "paper.yaml"} <= names
    for axis in ("reward", "group-size", "batch-scope", "beta", "softlabel", "dist2", "digit-weight", "advantage",
                 "aggregation", "dynamic-sampling", "entropy"):
        assert f"axis-{axis}.yaml" in names
    assert {p.name for p in RUNS} >= {"demo.yaml", "cpu.yaml", "gpu.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_ablation_expands_into_valid_cells(path):
    ablation, tree = load_ablation(path)
    cells, _ = expand_cells(ablation, tree)
    assert len(cells) >= 2 and all(c.cfg.name.startswith(ablation.name) for c in cells)
    if path.name == "quick.yaml":  # the main job: the four pipelines of the question, two seeds, on diamonds
        assert sorted({c.cfg.pipeline_label() for c in cells}) == [
            "sft:ce", "sft:ce -> grpo:ccc", "sft:ce -> grpo:mae", "sft:softlabel"
        ]
        assert {c.cfg.seed for c in cells} == {1, 2} and {c.cfg.data.name for c in cells} == {"diamonds"}


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.name)
def test_every_shipped_run_config_validates(path):
    from orchestrator.config import load_run_config

    load_run_config(path)
