"""End to end: a 2x2 ablation grid on Ray Tune (tiny model, CPU), its driver killed mid-sweep and
resumed, and the paper table checked against the metrics in MLflow."""

import contextlib
import csv
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.e2e

ABLATION = {
    "name": "e2e-grid",
    "base": {
        "data": {"train_size": 600, "max_per_label": 2, "many_threshold": 12, "few_threshold": 4},
        "eval": {"max_samples": 24, "batch_size": 24, "max_new_tokens": 24},
        "scaling": {"num_workers": 1},
        "stages": {
            "sft": {"steps": 40, "lr": 3.0e-3, "micro_batch_size": 8},
            "grpo": {"steps": 2, "micro_batch_size": 3, "group_size": 3, "max_new_tokens": 24, "lr": 1.0e-4},
        },
        "tracking": {"log_every": 10},
        "checkpoint": {"every_steps": 10},
    },
    "axes": {"pipeline": ["sft:ce", "sft:ce -> grpo:ccc"], "seed": [1, 2]},
    "baseline": "sft:ce",
}


def sweep(tmp_path, *args, wait=True):
    env = {**os.environ, "ORCHESTRATOR_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", str(tmp_path / "grid.yaml"), *args]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=900)
        return proc.returncode, out
    return proc


def processes_started_for(home) -> list[psutil.Process]:
    """Every live process of a sweep run with ORCHESTRATOR_HOME=home: the driver and what it started,
    Ray's worker processes included (they inherit the environment but not the process group)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("ORCHESTRATOR_HOME") == str(home) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def kill_sweep(proc, home) -> None:
    """SIGKILL the driver's process group and every other process of that sweep, and wait until they are
    gone: a Ray worker outliving the driver (its own process group) could still mark its cell FINISHED."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    left = processes_started_for(home)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(left, timeout=60)
    assert not processes_started_for(home)


def cell_runs(client):
    exp = client.get_experiment_by_name("e2e-grid")
    return [r for r in client.search_runs([exp.experiment_id]) if "orchestrator.cell" in r.data.tags]


@pytest.mark.timeout(1800)  # four cells, a kill and a resume: longer than the suite's 600 s default
def test_grid_killed_then_resumed_runs_each_cell_once_and_tables_match_mlflow(tmp_path):
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(ABLATION, sort_keys=False))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")

    # 1. start the sweep and kill its driver (and its in-process Ray cluster) once a cell has finished
    proc = sweep(tmp_path, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the sweep ended before it could be interrupted:\n" + proc.stdout.read())
        if (tmp_path / "mlruns" / "mlflow.db").exists() and client.get_experiment_by_name("e2e-grid"):
            if any(r.info.status == "FINISHED" for r in cell_runs(client)):
                break
        time.sleep(2)
    kill_sweep(proc, tmp_path)
    before = {r.data.tags["orchestrator.cell"]: r for r in cell_runs(client)}
    finished_before = {n: r for n, r in before.items() if r.info.status == "FINISHED"}
    assert finished_before and len(finished_before) < 4

    # 2. without --resume the sweep refuses to start over; with it, only the missing cells run
    code, out = sweep(tmp_path)
    assert code == 2 and "--resume" in out
    code, out = sweep(tmp_path, "--resume")
    assert code == 0, out
    assert f"resuming: {len(finished_before)} cell(s) already finished" in out

    runs = cell_runs(client)
    names = [r.data.tags["orchestrator.cell"] for r in runs]
    assert len(names) == 4 and len(set(names)) == 4  # one MLflow run per cell, none duplicated
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        name = run.data.tags["orchestrator.cell"]
        if name in finished_before:  # not rerun: same run, same end time
            assert run.info.run_id == finished_before[name].info.run_id
            assert run.info.end_time == finished_before[name].info.end_time
        elif name in before:  # interrupted mid-run: continued in its own run
            assert run.info.run_id == before[name].info.run_id
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)), f"{name}: steps logged twice {steps}"
    parents = [
        r for r in client.search_runs([runs[0].info.experiment_id]) if r.data.tags.get("orchestrator.role") == "sweep"
    ]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}

    # 3. the paper table says what MLflow says: mean test/all/mae over the two seeds per pipeline
    rows = list(csv.DictReader((tmp_path / "results" / "tables" / "e2e-grid" / "paper.csv").open()))
    for label in ("sft:ce", "sft:ce -> grpo:ccc"):
        values = [r.data.metrics["test/all/mae"] for r in runs if r.data.params["pipeline"] == label]
        row = next(r for r in rows if r["kind"] == "value" and r["pipeline"] == label)
        assert float(row["movies/mae/all/mean"]) == pytest.approx(sum(values) / 2, rel=1e-9)
        assert int(row["movies/mae/all/n"]) == 2
    delta = next(r for r in rows if r["kind"] == "delta")
    means = {r["pipeline"]: float(r["movies/mae/all/mean"]) for r in rows if r["kind"] == "value"}
    assert float(delta["movies/mae/all/mean"]) == pytest.approx(means["sft:ce -> grpo:ccc"] - means["sft:ce"])
    assert (tmp_path / "results" / "tables" / "e2e-grid" / "paper.tex").read_text().count("\\toprule") == 1
    # every cell scored the same test items, so the Δ has a paired bootstrap interval around it
    low, high = float(delta["movies/mae/all/ci_low"]), float(delta["movies/mae/all/ci_high"])
    assert low <= float(delta["movies/mae/all/mean"]) + 1e-9 and float(delta["movies/mae/all/mean"]) <= high + 1e-9
    assert delta["movies/mae/all/resolved"] == str(int(low > 0 or high < 0))
    # the parent run holds the learning curves across cells
    plots = {a.path for a in client.list_artifacts(parents[0].info.run_id, "plots")}
    assert "plots/curves_train_loss.png" in plots
