"""Paper tables from a synthetic MLflow store whose metric values are chosen by hand.

The sweep: pipelines sft:ce and sft:ce -> grpo:ccc, datasets movies and diamonds, seeds 1-3, and one
extra axis pipeline.1.group_size in {4, 8} (GRPO only, base value 4). Every metric of a run is its
test/all/mae times a fixed factor, so each expected mean and std below is a few lines of arithmetic.
Missing on purpose: every sft:ce -> grpo:ccc G=4 diamonds run FAILED (a "—" cell of the paper table),
G=8 movies seed 3 FAILED (n=2/3), G=8 diamonds has only seed 1 (n=1/3, no std), and no diamonds run
logged a few-shot metric (an empty region).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics

import numpy as np
import pandas as pd
import pytest

from orchestrator.cli import main
from orchestrator.reporting.layout import MISSING, TableCell
from orchestrator.reporting.render import format_cell, render_csv, render_latex, render_markdown, tex_escape
from orchestrator.reporting.tables import TablesError, build_tables, write_tables

CE, CHAIN = "sft:ce", "sft:ce -> grpo:ccc"
G = "pipeline.1.group_size"
FAILED = None  # a run that was created and then failed

# test/all/mae of each (pipeline, dataset, group_size, seed); a missing key = the run was never created
MAE_ALL = {
    (CE, "movies", None, 1): 6.0, (CE, "movies", None, 2): 7.0, (CE, "movies", None, 3): 8.0,
    (CE, "diamonds", None, 1): 900.0, (CE, "diamonds", None, 2): 1000.0, (CE, "diamonds", None, 3): 1100.0,
    (CHAIN, "movies", 4, 1): 5.0, (CHAIN, "movies", 4, 2): 5.5, (CHAIN, "movies", 4, 3): 6.6,
    (CHAIN, "diamonds", 4, 1): FAILED, (CHAIN, "diamonds", 4, 2): FAILED, (CHAIN, "diamonds", 4, 3): FAILED,
    (CHAIN, "movies", 8, 1): 5.2, (CHAIN, "movies", 8, 2): 5.4, (CHAIN, "movies", 8, 3): FAILED,
    (CHAIN, "diamonds", 8, 1): 800.0,
}
# region factor on MAE; GM = half of it. sft:ce is better on few-shot, the chain everywhere else.
FACTOR = {
    CE: {"all": 1.0, "many": 0.5, "medium": 1.5, "few": 1.0},
    CHAIN: {"all": 1.0, "many": 0.5, "medium": 1.5, "few": 3.0},
}


def metrics_of(pipeline: str, dataset: str, mae_all: float, split: str = "test") -> dict[str, float]:
    shift = 0.0 if split == "test" else 100.0  # val numbers are far off, so a wrong split shows
    out = {}
    for region, f in FACTOR[pipeline].items():
        if dataset == "diamonds" and region == "few":
            continue  # an empty region: the trainer logs no non-finite value
        out[f"{split}/{region}/mae"] = mae_all * f + shift
        out[f"{split}/{region}/gm"] = mae_all * f * 0.5 + shift
        out[f"{split}/{region}/count"] = 10.0
    out[f"{split}/all/rmse"] = mae_all * 1.2
    out[f"{split}/all/parse_fail_rate"] = 0.0
    return out


def params_of(pipeline: str, dataset: str, group: int | None, seed: int, name: str) -> dict[str, str]:
    p = {
        "name": name,
        "storage_path": f"/tmp/results/{name}",
        "seed": str(seed),
        "data.name": dataset,
        "data.root": "data",
        "tracking.experiment": "ablation",
        "pipeline": pipeline,
        "pipeline.0.kind": "sft",
        "pipeline.0.loss": "ce",
        "pipeline.0.lr": "0.0001",
    }
    if group is not None:
        p.update({"pipeline.1.kind": "grpo", "pipeline.1.group_size": str(group), "pipeline.1.lr": "1e-05"})
    return p


def log_run(client, exp_id, params, metrics, status, tags=None):
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, tags=tags or {})
    rid = run.info.run_id
    client.log_batch(
        rid,
        params=[Param(k, v) for k, v in params.items()],
        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
    )
    client.set_terminated(rid, status=status)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one is slow): experiment `ablation` with a sweep,
    experiment `plain` with runs of `orchestrator train` and no parent."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/m.db"
    client = MlflowClient(uri)

    exp = client.create_experiment("ablation", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(
        exp,
        tags={
            "orchestrator.role": "sweep",
            "orchestrator.sweep": "grid",
            "orchestrator.axes": json.dumps(["pipeline", "data.name", "seed", G]),
            "orchestrator.baseline": CE,
            "orchestrator.base_values": json.dumps({G: 4}),
        },
    ).info.run_id
    for i, ((pipeline, dataset, group, seed), mae) in enumerate(MAE_ALL.items()):
        metrics = {} if mae is None else {
            **metrics_of(pipeline, dataset, mae), **metrics_of(pipeline, dataset, mae, "val")
        }
        tags = {"mlflow.parentRunId": parent, "orchestrator.cell": f"cell{i}", "orchestrator.sweep": "grid"}
        status = "FAILED" if mae is None else "FINISHED"
        log_run(client, exp, params_of(pipeline, dataset, group, seed, f"cell{i}"), metrics, status, tags)
    client.set_terminated(parent, status="FINISHED")

    plain = client.create_experiment("plain", artifact_location=(root / "plain-artifacts").as_uri())
    # (pipeline, digit_weight, seed) -> test/all/mae; digit_weight is swept for ce only
    runs = {
        ("sft:ce", "1.0", 1): 4.0, ("sft:ce", "1.0", 2): 6.0,
        ("sft:ce", "2.0", 1): 3.0, ("sft:ce", "2.0", 2): 3.5,
        ("sft:softlabel", "1.0", 1): 4.0, ("sft:softlabel", "1.0", 2): 5.0,
    }
    for i, ((pipeline, dw, seed), mae) in enumerate(runs.items()):
        params = {
            "name": f"run{i}", "storage_path": f"/tmp/r{i}", "seed": str(seed), "data.name": "movies",
            "pipeline": pipeline, "pipeline.0.loss": pipeline.split(":")[1], "pipeline.0.digit_weight": dw,
        }
        log_run(client, plain, params, metrics_of(CE, "movies", mae), "FINISHED")
    # a failed and an unfinished run: the no-parent path uses FINISHED runs only
    log_run(client, plain, {"name": "x", "seed": "1", "data.name": "movies", "pipeline": "sft:dist2"}, {}, "FAILED")
    log_run(client, plain, {"name": "y", "seed": "1", "data.name": "movies", "pipeline": "sft:rvtc"}, {}, "RUNNING")
    return {"uri": uri, "root": root, "parent": parent, "client": client}


@pytest.fixture(scope="module")
def sweep_files(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("tables")
    return write_tables(store["uri"], "ablation", out_dir=out)


def read_csv(path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def md_rows(markdown: str) -> dict[str, list[str]]:
    """Markdown table rows by label -> the cells, in column order."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


# --------------------------------------------------------------------------- the paper table


def test_files_written_and_logged_to_the_parent(store, sweep_files):
    names = sorted(p.name for p in sweep_files.paths)
    stems = ["axis-pipeline.1.group_size", "paper"]
    assert names == sorted(f"{s}.{e}" for s in stems for e in ("csv", "md", "tex"))
    assert sweep_files.paths[0].name == "paper.md" and sweep_files.markdown == sweep_files.paths[0].read_text()
    logged = {a.path for a in store["client"].list_artifacts(store["parent"], "tables")}
    assert logged == {f"tables/{n}" for n in names}


def test_paper_cells_by_hand(sweep_files):
    paper = sweep_files.tables[0]
    assert [r.label for r in paper.rows] == ["sft:ce", "sft:ce → grpo:ccc"]
    # sft:ce movies MAE All: 6, 7, 8 -> 7 ± 1
    c = paper.cell("sft:ce", "movies/mae/all")
    assert c.values == (6.0, 7.0, 8.0) and c.mean == pytest.approx(7.0) and c.std == pytest.approx(1.0)
    # chain at the base group size 4: 5.0, 5.5, 6.6 -> mean 5.7, std sqrt(((-.7)^2 + (-.2)^2 + .9^2) / 2)
    c = paper.cell("sft:ce → grpo:ccc", "movies/mae/all")
    assert c.mean == pytest.approx(5.7) and c.std == pytest.approx(math.sqrt(0.67)) and c.n == 3
    # GM few of the chain: 0.5 * 3 * (5.0, 5.5, 6.6)
    c = paper.cell("sft:ce → grpo:ccc", "movies/gm/few")
    assert c.mean == pytest.approx(1.5 * 5.7) and c.std == pytest.approx(1.5 * math.sqrt(0.67))
    # the G=8 runs are not in the paper table (5.2, 5.4 would change the mean)
    assert paper.cell("sft:ce → grpo:ccc", "movies/mae/many").values == pytest.approx((2.5, 2.75, 3.3))
    # every G=4 diamonds run failed: missing, not 0 and not dropped
    assert paper.cell("sft:ce → grpo:ccc", "diamonds/mae/all").mean is None
    # no diamonds run logged a few-shot metric
    assert paper.cell("sft:ce", "diamonds/mae/few").mean is None

    rows = md_rows(sweep_files.markdown)
    headers = rows["pipeline"]
    col = {h: i for i, h in enumerate(headers)}
    assert len(headers) == 2 * 2 * 4 and headers[0] == "diamonds MAE All"  # datasets sorted
    ce, chain = rows["sft:ce"], rows["sft:ce → grpo:ccc"]
    assert ce[col["movies MAE All"]] == "7.00 ± 1.00"
    assert chain[col["movies MAE All"]] == "**5.70 ± 0.82**"
    assert ce[col["movies MAE Few"]] == "**7.00 ± 1.00**"  # sft:ce wins few-shot
    assert chain[col["movies MAE Few"]] == "17.10 ± 2.46"
    assert ce[col["diamonds MAE All"]] == "1000.00 ± 100.00"  # the only value: nothing to beat, no bold
    assert chain[col["diamonds MAE All"]] == MISSING
    assert ce[col["diamonds GM Few"]] == MISSING


def test_bold_is_the_column_minimum(sweep_files):
    paper = sweep_files.tables[0]
    rows = md_rows(sweep_files.markdown)
    for j, column in enumerate(paper.columns):
        means = {r.label: r.cells[j].mean for r in paper.rows if r.cells[j].mean is not None}
        bold = {label for label in means if rows[label][j].startswith("**")}
        if len(means) >= 2:
            assert bold == {min(means, key=means.get)}, column.key
        else:
            assert bold == set(), column.key


def test_delta_rows_by_hand(sweep_files):
    paper = sweep_files.tables[0]
    assert [d.label for d in paper.deltas] == ["Δ sft:ce → grpo:ccc"] and paper.deltas[0].reference == "sft:ce"
    rows = md_rows(sweep_files.markdown)
    col = {h: i for i, h in enumerate(rows["pipeline"])}
    delta = rows["Δ sft:ce → grpo:ccc"]
    assert delta[col["movies MAE All"]] == "-1.30"  # 5.7 - 7.0
    assert delta[col["movies MAE Few"]] == "+10.10"  # 17.1 - 7.0
    assert delta[col["movies GM Medium"]] == "-0.98"  # 0.75 * (5.7 - 7.0) = -0.975
    assert delta[col["diamonds MAE All"]] == MISSING  # the chain has no diamonds value


def test_caption_names_the_held_axis_and_the_source(sweep_files, store):
    md = sweep_files.markdown
    assert "pipeline.1.group_size held at 4 (base value)." in md
    assert "mean ± std over 3 seeds (1, 2, 3)" in md
    assert store["parent"] in md and "sweep 'grid'" in md


# --------------------------------------------------------------------------- the axis table


def test_axis_table_rows_and_partial_cells(sweep_files):
    axis = sweep_files.tables[1]
    assert axis.name == "axis-pipeline.1.group_size"
    assert [r.label for r in axis.rows] == ["4", "8"]  # one pipeline has the axis: no prefix
    # G=8 movies: seed 3 failed -> 5.2, 5.4: mean 5.3, std sqrt(0.02), n=2 of 3
    c = axis.cell("8", "movies/mae/all")
    assert c.mean == pytest.approx(5.3) and c.std == pytest.approx(math.sqrt(0.02)) and c.partial
    # G=8 diamonds: one seed only -> a mean, no std, marked
    c = axis.cell("8", "diamonds/mae/all")
    assert c.values == (800.0,) and c.std is None
    rows = md_rows((sweep_files.paths[0].parent / "axis-pipeline.1.group_size.md").read_text())
    col = {h: i for i, h in enumerate(rows["pipeline.1.group_size"])}
    assert rows["8"][col["movies MAE All"]] == "5.30 ± 0.14 (n=2/3)"  # partial: never bold
    assert rows["8"][col["diamonds MAE All"]] == "800.00 (n=1/3)"
    assert rows["4"][col["diamonds MAE All"]] == MISSING
    # over the seeds both have (METHODS §6): seeds 1, 2 -> ((5.2 - 5.0) + (5.4 - 5.5)) / 2
    assert rows["Δ 8"][col["movies MAE All"]] == "+0.05"
    assert rows["Δ 8"][col["diamonds MAE All"]] == MISSING


# --------------------------------------------------------------------------- LaTeX and CSV


def test_latex_booktabs_and_escapes(sweep_files):
    tex = (sweep_files.paths[0].parent / "paper.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){2-9}", r"\cmidrule(lr){10-17}"):
        assert rule in tex
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert r"\multicolumn{8}{c}{diamonds}" in tex and r"\multicolumn{4}{c}{GM}" in tex
    assert r"\textbf{5.70 $\pm$ 0.82}" in tex
    assert r"sft:ce $\rightarrow$ grpo:ccc" in tex and r"$\Delta$ sft:ce" in tex
    assert r"pipeline.1.group\_size held at 4" in tex
    assert "$-1.30$" in tex and "→" not in tex and "±" not in tex and "—" not in tex
    # every data line has one cell per column
    body = [line for line in tex.splitlines() if line.startswith(("sft", r"$\Delta$"))]
    assert len(body) == 3 and all(line.count(" & ") == 16 for line in body)
    axis_tex = (sweep_files.paths[0].parent / "axis-pipeline.1.group_size.tex").read_text()
    assert r"pipeline.1.group\_size & All" in axis_tex
    assert tex_escape("a_b & 50% #1 {x} ~ ^ \\") == (
        r"a\_b \& 50\% \#1 \{x\} \textasciitilde{} \textasciicircum{} \textbackslash{}"
    )


def test_csv_round_trips_the_numbers(sweep_files):
    paper = sweep_files.tables[0]
    lines = read_csv(sweep_files.paths[0].parent / "paper.csv")
    assert [(r["kind"], r["pipeline"]) for r in lines] == [("value", CE), ("value", CHAIN), ("delta", CHAIN)]
    assert lines[2]["reference"] == "sft:ce"
    for line, row in zip(lines[:2], paper.rows):
        for c, cell in zip(paper.columns, row.cells):
            assert int(line[f"{c.key}/n"]) == cell.n
            assert (line[f"{c.key}/mean"] == "") == (cell.mean is None)
            if cell.mean is not None:
                assert float(line[f"{c.key}/mean"]) == cell.mean  # full precision, not the rounded display
            if cell.std is not None:
                assert float(line[f"{c.key}/std"]) == cell.std
    assert float(lines[2]["movies/mae/all/mean"]) == pytest.approx(-1.3)
    assert lines[2]["diamonds/mae/all/mean"] == ""


def test_tables_agree_with_the_store(store, sweep_files):
    """Recompute every paper cell from the runs as MLflow stores them (MlflowClient, not the builder)."""
    client = store["client"]
    exp = client.get_experiment_by_name("ablation")
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{store['parent']}'")
    lines = {r["pipeline"]: r for r in read_csv(sweep_files.paths[0].parent / "paper.csv") if r["kind"] == "value"}
    checked = 0
    for c in sweep_files.tables[0].columns:
        for pipeline, line in lines.items():
            values = [
                r.data.metrics[f"test/{c.region}/{c.metric}"]
                for r in runs
                if r.info.status == "FINISHED"
                and r.data.params["pipeline"] == pipeline
                and r.data.params["data.name"] == c.dataset
                and r.data.params.get(G, "4") == "4"
                and f"test/{c.region}/{c.metric}" in r.data.metrics
            ]
            assert int(line[f"{c.key}/n"]) == len(values)
            if values:
                assert float(line[f"{c.key}/mean"]) == pytest.approx(statistics.mean(values))
                checked += 1
            if len(values) > 1:
                assert float(line[f"{c.key}/std"]) == pytest.approx(statistics.stdev(values))
    assert checked == 22  # 16 columns x 2 rows, minus 8 failed chain-diamonds and 2 empty few-shot ones


def test_val_split_and_explicit_baseline(store, tmp_path):
    files = write_tables(store["uri"], "ablation", out_dir=tmp_path, split="val", baseline="sft:ce→grpo:ccc",
                         log_to_parent=False)
    paper = files.tables[0]
    assert paper.cell("sft:ce", "movies/mae/all").mean == pytest.approx(107.0)
    assert [d.label for d in paper.deltas] == ["Δ sft:ce"] and paper.deltas[0].reference == "sft:ce → grpo:ccc"
    assert "val split" in files.markdown


def test_tracking_uri_and_env_are_left_alone(store, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nowhere/else.db")
    before = mlflow.get_tracking_uri()
    write_tables(store["uri"], "ablation", out_dir=tmp_path, log_to_parent=False)
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////nowhere/else.db"
    assert mlflow.get_tracking_uri() == before


# --------------------------------------------------------------------------- without a parent


def test_no_parent_infers_the_axes(store, tmp_path):
    files = write_tables(store["uri"], "plain", out_dir=tmp_path)
    paper, axis = files.tables
    # the failed sft:dist2 and the running sft:rvtc are not rows; pipeline.0.loss follows the pipeline
    assert [r.label for r in paper.rows] == ["sft:ce", "sft:softlabel"]
    assert axis.name == "axis-pipeline.0.digit_weight"
    assert "pipeline.0.digit_weight held at 1.0 (most common value)." in paper.notes
    c = paper.cell("sft:ce", "movies/mae/all")
    assert c.values == (4.0, 6.0) and c.std == pytest.approx(math.sqrt(2))
    mae_all = [c.key for c in paper.columns].index("movies/mae/all")
    assert paper.deltas[0].values[mae_all] == pytest.approx(4.5 - 5.0)  # sft:softlabel against sft:ce
    # two pipelines have the axis: rows are prefixed, Δ against the held value of the same pipeline
    assert [r.label for r in axis.rows] == ["sft:ce · 1.0", "sft:ce · 2.0", "sft:softlabel · 1.0"]
    assert [d.label for d in axis.deltas] == ["Δ sft:ce · 2.0"]
    assert axis.deltas[0].values[0] == pytest.approx(3.25 - 5.0)
    assert not any(c.partial for r in paper.rows for c in r.cells)  # every cell complete


# --------------------------------------------------------------------------- the pure core


def frame(rows) -> pd.DataFrame:
    """Runs in the mlflow.search_runs layout."""
    out = []
    for i, (pipeline, seed, status, mae) in enumerate(rows):
        r = {"run_id": f"r{i}", "status": status, "start_time": i, "params.pipeline": pipeline,
             "params.data.name": "d", "params.seed": str(seed)}
        if mae is not None:
            r["metrics.test/all/mae"] = mae
        out.append(r)
    return pd.DataFrame(out)


def test_core_from_a_pyarrow_table_and_repeated_runs():
    import pyarrow as pa

    runs = frame([(CE, 1, "FINISHED", 1.0), (CE, 1, "FINISHED", 3.0), (CE, 2, "FINISHED", 5.0),
                  ("grpo:ccc", 1, "FAILED", None)])
    # a run that failed before logging any param cannot be placed and is left out
    runs = pd.concat([runs, pd.DataFrame([{"run_id": "x", "status": "FAILED", "start_time": 9}])], ignore_index=True)
    (paper,) = build_tables(pa.Table.from_pandas(runs), axes=["pipeline", "seed"])
    assert paper.cell("sft:ce", "d/mae/all").values == (3.0, 5.0)  # the later run of seed 1 wins
    assert paper.cell("grpo:ccc", "d/mae/all").mean is None  # failed: a row of "—"
    assert any("1 repeated run" in n for n in paper.notes)
    assert [r.label for r in paper.rows] == ["sft:ce", "grpo:ccc"]
    assert "grpo:ccc | —" in render_markdown(paper)


def test_one_cell_config_counts_once_and_failed_runs_are_listed_under_the_table():
    """Two finished runs of one config (a cell renamed and rerun) count once, the newer; a failed cell is
    left out of the values and named, with its error, under every table."""
    runs = frame([(CE, 1, "FINISHED", 1.0), (CE, 1, "FINISHED", 3.0), (CE, 2, "FINISHED", 5.0),
                  ("grpo:ccc", 1, "FAILED", None), ("grpo:ccc", 2, "FINISHED", 7.0)])
    runs["tags.orchestrator.config_hash"] = ["h1", "h1", "h2", "h3", "h4"]
    runs["tags.mlflow.runName"] = ["abl-1_sft-ce-aa", "abl-sft-ce_1-aa", "abl-2_sft-ce-bb", "abl-1_grpo-cc",
                                   "abl-2_grpo-dd"]
    runs["tags.orchestrator.error"] = [None, None, None, "run 'abl-1_grpo-cc' failed: timed out after 60 s\nmore",
                                       None]
    (paper,) = build_tables(runs, axes=["pipeline", "seed"])
    assert paper.cell("sft:ce", "d/mae/all").values == (3.0, 5.0)  # the newer run of config h1
    assert paper.cell("grpo:ccc", "d/mae/all").values == (7.0,)
    assert "1 duplicate run(s) of one cell config dropped (the newest finished one is used)." in paper.notes
    assert not any("repeated run" in n for n in paper.notes)  # found by its config, not by its grid point
    assert ("Left out, not finished (1): abl-1_grpo-cc (FAILED: run 'abl-1_grpo-cc' failed: timed out after 60 s)."
            in paper.notes)
    assert "Left out, not finished (1): abl-1_grpo-cc" in render_markdown(paper)


def test_core_errors():
    with pytest.raises(TablesError, match="none of the 1 runs finished"):
        build_tables(frame([(CE, 1, "FAILED", None)]))
    with pytest.raises(TablesError, match="no finished run has val/ metrics"):
        build_tables(frame([(CE, 1, "FINISHED", 1.0)]), split="val")
    with pytest.raises(TablesError, match="split must be"):
        build_tables(frame([(CE, 1, "FINISHED", 1.0)]), split="train")
    with pytest.raises(TablesError, match="baseline 'grpo:mae' is not a pipeline"):
        build_tables(frame([(CE, 1, "FINISHED", 1.0)]), baseline="grpo:mae")
    # the sweep's own baseline without runs is a note, not an error; Δ falls back to sft:ce
    two = frame([(CE, 1, "FINISHED", 1.0), ("grpo:ccc", 1, "FINISHED", 2.0)])
    (paper,) = build_tables(two, sweep_baseline="grpo:mae")
    assert "The sweep's baseline grpo:mae has no runs." in paper.notes and paper.deltas[0].reference == "sft:ce"
    (paper,) = build_tables(two, sweep_baseline="grpo:ccc")
    assert [r.label for r in paper.rows] == ["grpo:ccc", "sft:ce"] and paper.deltas[0].values[0] == pytest.approx(-1.0)
    with pytest.raises(TablesError, match="no param 'data.name'"):
        build_tables(pd.DataFrame({"run_id": ["a"], "status": ["FINISHED"], "params.seed": ["1"],
                                   "params.pipeline": [CE]}))


def test_cell_formatting():
    assert format_cell(TableCell((1.0, 2.0, 3.0), 3)) == "2.00 ± 1.00"
    assert format_cell(TableCell((1.0,), 1)) == "1.00"
    assert format_cell(TableCell((1.0, 2.0), 3)) == "1.50 ± 0.71 (n=2/3)"
    assert format_cell(TableCell((), 3)) == MISSING
    assert TableCell((2.0, 4.0), 2).std == pytest.approx(np.std([2.0, 4.0], ddof=1))


def test_single_seed_single_row_table_renders():
    (paper,) = build_tables(frame([(CE, 7, "FINISHED", 2.5)]))
    md, tex = render_markdown(paper), render_latex(paper)
    assert "| sft:ce | 2.50 |" in md and "**" not in md.split("\n|")[-1]  # one row: nothing bold
    assert r"\toprule" in tex and r"\textbf" not in tex


# --------------------------------------------------------------------------- CLI


def test_cli_prints_the_paper_table(store, tmp_path, capsys):
    assert main(["tables", "ablation", "--tracking-uri", store["uri"], "--out", str(tmp_path), "--sweep", "grid"]) == 0
    out = capsys.readouterr().out
    assert "| sft:ce → grpo:ccc | " in out and "Δ sft:ce → grpo:ccc" in out
    assert (tmp_path / "paper.tex").is_file() and (tmp_path / "axis-pipeline.1.group_size.csv").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "no experiment named 'nope'"),
        (["ablation", "--sweep", "other"], "no sweep named 'other'"),
        (["ablation", "--parent", "0" * 32], "no run with id"),
        (["ablation", "--baseline", "grpo:mae"], "baseline 'grpo:mae' is not a pipeline"),
    ],
)
def test_cli_user_errors_exit_2(store, tmp_path, capsys, args, message):
    assert main(["tables", *args, "--tracking-uri", store["uri"], "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_store_exit_2(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/absent.db"
    assert main(["tables", "x", "--tracking-uri", uri, "--out", str(tmp_path / "o")]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()


# --------------------------------------------------------------------------- intervals and collapse marks


def synthetic_runs(errors_by_run: dict[tuple[str, str], np.ndarray], regions: list[str], targets: np.ndarray):
    """Runs in the search_runs layout whose metrics are computed from the given per-item errors (prediction =
    target + error), and their predictions tables; label step 1 (GM floor 0.5)."""
    rows, predictions = [], {}
    for i, ((pipeline, seed), errors) in enumerate(errors_by_run.items()):
        run_id = f"run{i}"
        scored = targets + errors
        row = {"run_id": run_id, "status": "FINISHED", "start_time": i, "params.pipeline": pipeline,
               "params.data.name": "movies", "params.seed": seed}
        for region in ("all", "many", "medium", "few"):
            sel = np.ones(len(errors), bool) if region == "all" else np.array(regions) == region
            e = np.abs(errors[sel])
            row[f"metrics.test/{region}/mae"] = e.mean() if sel.any() else np.nan
            row[f"metrics.test/{region}/gm"] = np.exp(np.log(np.maximum(e, 0.5)).mean()) if sel.any() else np.nan
        rows.append(row)
        frame = pd.DataFrame({"id": [str(j) for j in range(len(targets))], "target": targets, "region": regions,
                              "scored": scored})
        frame.attrs["label_step"] = 1.0
        predictions[run_id] = frame
    return pd.DataFrame(rows), predictions


def test_delta_rows_carry_paired_bootstrap_intervals_and_collapsed_cells_are_marked():
    rng = np.random.default_rng(0)
    n = 60
    targets = rng.uniform(10, 90, n).round()
    regions = ["many"] * 30 + ["medium"] * 20 + ["few"] * 10
    base = {s: rng.normal(0, 5, n) for s in ("1", "2")}
    runs, predictions = synthetic_runs({
        ("sft:ce", "1"): base["1"], ("sft:ce", "2"): base["2"],
        # every item exactly 3 further from its target than the baseline: Δ MAE = +3 in every resample
        ("sft:softlabel", "1"): np.abs(base["1"]) + 3, ("sft:softlabel", "2"): np.abs(base["2"]) + 3,
        # seed 2 answers one number whatever the input: collapsed
        ("sft:dist2", "1"): -base["1"], ("sft:dist2", "2"): 50.0 - targets,
    }, regions, targets)
    paper = build_tables(runs, axes=["pipeline", "seed"], predictions=predictions)[0]
    soft = next(d for d in paper.deltas if d.label == "Δ sft:softlabel")
    j = [c.key for c in paper.columns].index("movies/mae/all")
    assert soft.values[j] == pytest.approx(3.0)
    assert soft.intervals[j].low == pytest.approx(3.0) and soft.intervals[j].high == pytest.approx(3.0)
    assert soft.intervals[j].resolved
    # |−e| = |e| item by item: the same MAE as the baseline on seed 1; seed 2's collapse decides the rest
    assert paper.cell("sft:dist2", "movies/mae/all").collapsed == 1
    assert paper.cell("sft:ce", "movies/mae/all").collapsed == 0
    md = render_markdown(paper)
    rows = md_rows(md)
    col = {h: i for i, h in enumerate(rows["pipeline"])}
    assert rows["Δ sft:softlabel"][col["movies MAE All"]] == "+3.00\\* [+3.00, +3.00]"
    assert rows["sft:dist2"][col["movies MAE All"]].endswith("† 1/2")
    assert "95% interval of a Δ" in md and "† k/n" in md
    lines = {r["label"]: r for r in csv.DictReader(io.StringIO(render_csv(paper)))}
    assert lines["Δ sft:softlabel"]["movies/mae/all/resolved"] == "1"
    assert float(lines["Δ sft:softlabel"]["movies/mae/all/ci_low"]) == pytest.approx(3.0)
    assert lines["sft:dist2"]["movies/mae/all/collapsed"] == "1"
    assert "\\scriptsize" in render_latex(paper) and "$^\\dagger$" in render_latex(paper)
    # without predictions: the same Δ values, no intervals, no marks
    plain = build_tables(runs, axes=["pipeline", "seed"])[0]
    assert [d.values for d in plain.deltas] == [d.values for d in paper.deltas]
    assert all(i is None for d in plain.deltas for i in d.intervals)
