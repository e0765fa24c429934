"""Reliability end to end (CPU, tiny model, loopback only): one writer per run, a SIGTERM mid-run, a damaged
checkpoint, a non-finite loss, a reward that never returns under a time budget, and a sweep resumed after
its axes were reordered.

Each test's docstring's first sentence is its line in README.md's generated reliability list.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import yaml
from mlflow import MlflowClient
from test_e2e_faults import run_id_named
from test_e2e_train import TINY_RUN, make_cfg, metric_history

from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.runtime.driver import RunFailed, RunStopped, run_training

pytestmark = pytest.mark.e2e

# Long enough that a signal sent once step 5 shows in MLflow lands mid-stage however fast the machine is: the
# tiny model takes a few hundredths of a second a step, and metrics reach the store in batches.
SFT_200 = ["pipeline.0.steps=200", "pipeline.0.lr=3e-3", "pipeline.0.micro_batch_size=8", "checkpoint.every_steps=10",
           "tracking.log_every=5", "eval.max_samples=24"]


def cli_args(tmp_path, *overrides: str) -> list[str]:
    """make_cfg's overrides, for `orchestrator train` on the command line."""
    return [*TINY_RUN, f"data.root={tmp_path / 'data'}", f"storage_path={tmp_path / 'results'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}", *overrides]


def wait_for_step(uri: str, name: str, step: int, timeout_s: float = 300) -> str:
    """The run's id, once it has logged train/loss at `step` or later."""
    client = MlflowClient(uri)
    run_id = run_id_named(client, name, timeout_s)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if any(m.step >= step for m in client.get_metric_history(run_id, "train/loss")):
            return run_id
        time.sleep(0.2)
    raise TimeoutError(f"run {name} never logged step {step}")


def latest_checkpoint_step(run_dir) -> int:
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    return json.loads((run_dir / latest / "orchestrator_state.json").read_text())["step"]


# --------------------------------------------------------------------------- one writer per run


@pytest.mark.timeout(600)
def test_a_second_process_on_a_live_run_exits_2_naming_the_holder(tmp_path, ray_cluster, record_property):
    """Two `orchestrator train` of one run at once: the second exits with status 2 before any compute,
    naming the process that writes the run, and the first finishes alone in its MLflow run; a lease left by a
    process whose heartbeat stopped is taken over."""
    from orchestrator.tracking.conventions import LEASE_TAG_PREFIX, run_key
    from orchestrator.tracking.lease import Holder
    from orchestrator.tracking.runs import run_lease

    cfg = make_cfg(tmp_path, "name=shared", *SFT_200)
    stale = run_lease(cfg)  # a driver on another machine that went silent an hour ago
    stale.client.set_experiment_tag(stale.experiment_id, LEASE_TAG_PREFIX + run_key(cfg),
                                    Holder("gone-host", 4242, "stale", time.time() - 3600).text())
    first: dict = {}
    runner = threading.Thread(target=lambda: first.setdefault("outcome", run_training(cfg)))
    runner.start()
    run_id_named(MlflowClient(cfg.tracking.tracking_uri), "shared")  # created: its lease is held
    argv = ["train", *cli_args(tmp_path, "name=shared", *SFT_200)]
    started = time.time()
    second = subprocess.run([sys.executable, "-m", "orchestrator", *argv], capture_output=True, text=True,
                            timeout=300)
    refused_after = time.time() - started
    runner.join()
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"run 'shared' is being written by process {os.getpid()} on " in second.stderr
    assert "Traceback" not in second.stderr
    client = MlflowClient(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'shared'")
    assert run.info.run_id == first["outcome"].run_id and run.info.status == "FINISHED"
    assert LEASE_TAG_PREFIX + run_key(cfg) not in client.get_experiment(exp.experiment_id).tags  # released
    record_property("figure", f"the second process exited 2 after {refused_after:.0f} s naming the holder; the "
                              "first took over a lease silent for an hour and finished")


# --------------------------------------------------------------------------- SIGTERM, then a damaged checkpoint


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, ray_cluster):
    """A run SIGTERMed mid-stage; a restart with a changed config (refused); the same restart (resumed)."""
    tmp = tmp_path_factory.mktemp("preempted")
    cfg = make_cfg(tmp, "name=preempted", *SFT_200)

    def terminate_mid_stage():
        wait_for_step(cfg.tracking.tracking_uri, "preempted", 5)
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends a driver it evicts

    sender = threading.Thread(target=terminate_mid_stage)
    sender.start()
    with pytest.raises(RunStopped) as stopped:
        run_training(cfg)
    sender.join()
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(run_id_named(client, "preempted"))
    at_stop = SimpleNamespace(status=run.info.status, tags=run.data.tags,
                              checkpoint=latest_checkpoint_step(tmp / "results" / "preempted"))
    refused = main(["train", *cli_args(tmp, "name=preempted", *SFT_200, "pipeline.0.lr=1e-3")])
    status_after_refusal = client.get_run(run.info.run_id).info.status
    resumed = run_training(cfg)
    return SimpleNamespace(tmp=tmp, cfg=cfg, client=client, run_id=run.info.run_id, stopped=stopped.value,
                           at_stop=at_stop, refused=refused, status_after_refusal=status_after_refusal,
                           resumed=resumed)


@pytest.mark.timeout(900)
def test_sigterm_mid_stage_stops_at_a_step_boundary_and_a_rerun_resumes_there(preempted, record_property):
    """SIGTERM to a training driver mid-stage: its workers stop at the next step boundary and checkpoint
    that step, the run ends KILLED with the reason, and rerunning the same command resumes at that very step
    (0 steps lost); a rerun with a changed config is refused first, exit status 2, listing the change."""
    stop_step = preempted.at_stop.checkpoint
    assert preempted.at_stop.status == "KILLED" and 5 < stop_step < 200
    reason = preempted.at_stop.tags["orchestrator.stopped"]
    assert reason.startswith(f"SIGTERM to the driver (pid {os.getpid()})") and f"at step {stop_step} " in reason
    assert str(preempted.stopped).startswith("run 'preempted' stopped: SIGTERM to the driver")
    # the changed restart: refused before compute, the run untouched
    assert preempted.refused == 2 and preempted.status_after_refusal == "KILLED"
    # the same restart: the same MLflow run, from the stop's own checkpoint, every step once
    assert preempted.resumed.run_id == preempted.run_id
    run = preempted.client.get_run(preempted.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["orchestrator.resumed_from"] == f"stage 0 step {stop_step}"  # 0 steps lost
    steps = [s for s, _ in metric_history(preempted.resumed.tracking_uri, preempted.run_id, "train/loss")]
    assert sorted(steps) == list(range(5, 201, 5)), steps  # none missing, none trained twice
    record_property("figure", f"SIGTERM at step {stop_step}: resumed at {stop_step}, 0 steps lost")


@pytest.mark.timeout(900)
def test_a_damaged_latest_checkpoint_gives_way_to_the_previous_complete_one(preempted, record_property):
    """Bytes flipped in a run's latest checkpoint (its size unchanged): the restart finds the sha256 mismatch,
    resumes from the previous complete checkpoint, names the damaged one on the run, and ends as before."""
    client, run_dir = preempted.client, preempted.tmp / "results" / "preempted"
    before = dict(metric_history(preempted.resumed.tracking_uri, preempted.run_id, "train/loss"))
    latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    latest = latest["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert json.loads((run_dir / latest / "orchestrator_state.json").read_text())["step"] == 200
    kept = sorted(d.name for d in run_dir.glob("checkpoint_*") if d.is_dir())  # num_to_keep=2: two, by time
    assert len(kept) == 2 and kept[-1] == latest
    previous = json.loads((run_dir / kept[0] / "orchestrator_state.json").read_text())["step"]
    damaged = run_dir / latest / "ckpt" / "mp_rank_00_model_states.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    client.set_terminated(preempted.run_id, status="FAILED")  # as if it had failed after its last checkpoint
    again = run_training(preempted.cfg)
    run = client.get_run(again.run_id)
    assert again.run_id == preempted.run_id and run.info.status == "FINISHED"
    assert run.data.tags["orchestrator.resumed_from"] == f"stage 0 step {previous}"  # the checkpoint before it
    assert run.data.tags["orchestrator.damaged_checkpoint"].startswith(f"{latest}: ckpt/mp_rank_00_model_states.pt")
    assert "sha256 mismatch" in run.data.tags["orchestrator.damaged_checkpoint"]
    history = metric_history(again.tracking_uri, again.run_id, "train/loss")
    for step, value in history:  # the steps after `previous` trained again: the same losses
        assert value == pytest.approx(before[step], rel=1e-5), step
    record_property("figure", f"the step-200 checkpoint damaged: resumed from step {previous}, steps "
                              f"{previous + 1}–200 retrained to the same losses")


# --------------------------------------------------------------------------- non-finite losses


@pytest.mark.timeout(600)
def test_a_nonfinite_loss_fails_the_run_naming_the_stage_and_step(tmp_path, ray_cluster, record_property):
    """A loss that turns NaN at step 2 (an lr of 1e38): the run is FAILED naming the stage and step, and
    never FINISHED into the tables; with guard.on_nonfinite=skip_step every such update is skipped and counted
    in train/skipped_steps."""
    blowup = ["pipeline.0.steps=6", "pipeline.0.lr=1e38", "pipeline.0.warmup_steps=0", "tracking.log_every=3",
              "eval.max_samples=8", "checkpoint.every_steps=100"]
    with pytest.raises(RunFailed) as failed:
        run_training(make_cfg(tmp_path, "name=nan-fail", *blowup))
    assert "non-finite loss in stage 0 (sft:ce) at step 2 (global step 2)" in str(failed.value)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = client.get_run(run_id_named(client, "nan-fail"))
    assert run.info.status == "FAILED" and "non-finite loss in stage 0 (sft:ce) at step 2" in \
        run.data.tags["orchestrator.error"]

    skipping = run_training(make_cfg(tmp_path, "name=nan-skip", *blowup, "guard.on_nonfinite=skip_step"))
    assert client.get_run(skipping.run_id).info.status == "FINISHED"
    assert metric_history(skipping.tracking_uri, skipping.run_id, "train/skipped_steps") == [(3, 2.0), (6, 5.0)]
    record_property("figure", "fail: FAILED at stage 0 step 2; skip_step: 5 of 6 updates skipped, FINISHED")


# --------------------------------------------------------------------------- a sweep: time budget, reordered axes


BUDGET_ABLATION = {
    "name": "budget",
    "base": {
        "data": {"train_size": 600, "max_per_label": 2, "many_threshold": 12, "few_threshold": 4},
        "eval": {"max_samples": 16, "batch_size": 16, "max_new_tokens": 24},
        "scaling": {"num_workers": 1},
        "stages": {"sft": {"steps": 10, "lr": 3.0e-3, "micro_batch_size": 8},
                   "grpo": {"steps": 2, "micro_batch_size": 2, "group_size": 2, "max_new_tokens": 24}},
        "tracking": {"log_every": 5},
        "checkpoint": {"every_steps": 10},
    },
    "axes": {"pipeline": ["sft:ce", "grpo:tests.stuck_rewards:never_returns"], "seed": [1]},
    "baseline": "sft:ce",
    "timeout_s": 120,
    "max_failures": 1,
}


@pytest.fixture(scope="module")
def budget_sweep(tmp_path_factory, ray_cluster):
    """The budget ablation swept once, in this process (ORCHESTRATOR_HOME: a folder of its own)."""
    from orchestrator.sweep.tune import run_sweep

    home = tmp_path_factory.mktemp("budget")
    path = home / "budget.yaml"
    path.write_text(yaml.safe_dump(BUDGET_ABLATION, sort_keys=False))
    previous = os.environ.get("ORCHESTRATOR_HOME")
    os.environ["ORCHESTRATOR_HOME"] = str(home)
    try:
        started = time.time()
        outcome = run_sweep(path)
        return SimpleNamespace(home=home, path=path, outcome=outcome, seconds=time.time() - started)
    finally:
        if previous is None:
            os.environ.pop("ORCHESTRATOR_HOME", None)
        else:
            os.environ["ORCHESTRATOR_HOME"] = previous


@pytest.mark.timeout(900)
def test_a_reward_that_never_returns_times_out_its_cell_and_the_sweep_goes_on(budget_sweep, record_property):
    """A sweep cell whose reward never returns is stopped by the ablation's timeout_s and FAILED "timed out
    after 120 s", attempted once (Tune does not restart a cell, Ray Train's budget is the ablation's
    max_failures); the other cell finishes, and the table leaves the failed run out and names it below."""
    import ray

    outcome = budget_sweep.outcome
    ((stuck, error),) = outcome.failed.items()
    assert "never_returns" in stuck and "timed out after 120 s" in error
    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("budget").experiment_id])
    by_cell = {r.data.tags["orchestrator.cell"]: r for r in runs if "orchestrator.cell" in r.data.tags}
    assert len(by_cell) == 2 and by_cell[stuck].info.status == "FAILED"
    assert "timed out after 120 s" in by_cell[stuck].data.tags["orchestrator.error"]
    assert "orchestrator.resumed" not in by_cell[stuck].data.tags  # one attempt, no restart
    (done,) = [r for name, r in by_cell.items() if name != stuck]
    assert done.info.status == "FINISHED"
    assert f"Left out, not finished (1): {stuck} (FAILED: run '{stuck}' failed: timed out after 120 s" in \
        outcome.table_markdown
    deadline = time.time() + 60  # the timed-out cell's workers are gone: every CPU is free again
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    record_property("figure", f"the stuck cell FAILED at its 120 s budget, once; the sweep ended in "
                              f"{budget_sweep.seconds:.0f} s with the other cell FINISHED")


@pytest.mark.timeout(900)
def test_a_sweep_resumed_with_its_axes_reordered_reruns_no_finished_cell(budget_sweep, capsys, record_property):
    """A sweep resumed with its axes listed in another order finds its finished cells by their config: none
    is rerun and the tables count each once; a changed grid is refused until --allow-changed-resume, which
    tags the sweep with the change."""
    from orchestrator.sweep.tune import run_sweep

    reordered = {**BUDGET_ABLATION, "axes": {"seed": [1], "pipeline": BUDGET_ABLATION["axes"]["pipeline"]},
                 "exclude": [{"pipeline": "grpo:tests.stuck_rewards:never_returns"}]}
    budget_sweep.path.write_text(yaml.safe_dump(reordered, sort_keys=False))
    os.environ["ORCHESTRATOR_HOME"] = str(budget_sweep.home)
    try:
        with pytest.raises(ConfigError, match=r"grid changed since it started:\n  exclude: \[\] -> "):
            run_sweep(budget_sweep.path, resume=True)
        outcome = run_sweep(budget_sweep.path, resume=True, allow_changed_resume=True)
    finally:
        os.environ.pop("ORCHESTRATOR_HOME", None)
    assert "resuming: 1 cell(s) already finished, 0 to run" in capsys.readouterr().out
    assert outcome.skipped == 1 and not outcome.failed
    client = MlflowClient(outcome.tracking_uri)
    exp = client.get_experiment_by_name("budget")
    cells = [r for r in client.search_runs([exp.experiment_id]) if "orchestrator.cell" in r.data.tags]
    assert len(cells) == 2  # nothing new ran
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and "exclude" in parent.data.tags["orchestrator.resume_changes"]
    assert "| sft:ce |" in outcome.table_markdown and "duplicate run" not in outcome.table_markdown
    record_property("figure", "1 finished cell found by its config, 0 rerun, 2 cell runs in the store")


@pytest.mark.timeout(900)
def test_sigterm_to_a_sweep_mid_cell_stops_it_at_a_checkpoint_and_resume_continues_there(tmp_path, ray_cluster,
                                                                                        monkeypatch, record_property):
    """SIGTERM to a sweep's driver mid-cell: the running cell stops at its next step boundary with a
    checkpoint there, the cell and the sweep end KILLED with the reason, and `--resume` continues the cell at
    that very step (0 steps lost)."""
    from orchestrator.sweep.tune import run_sweep

    ablation = {**BUDGET_ABLATION, "name": "halted", "timeout_s": None, "max_failures": 0,
                "axes": {"pipeline": ["sft:ce"], "seed": [1]}}
    ablation["base"] = {**ablation["base"], "stages": {"sft": {"steps": 200, "lr": 3.0e-3, "micro_batch_size": 8}}}
    path = tmp_path / "halted.yaml"
    path.write_text(yaml.safe_dump(ablation, sort_keys=False))
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"

    def terminate_mid_cell():
        deadline = time.time() + 300
        while not (tmp_path / "mlruns" / "mlflow.db").exists():
            assert time.time() < deadline
            time.sleep(0.5)
        client = MlflowClient(uri)
        while True:
            exp = client.get_experiment_by_name("halted")
            runs = [r for r in client.search_runs([exp.experiment_id]) if "orchestrator.cell" in r.data.tags] \
                if exp else []
            if runs and any(m.step >= 5 for m in client.get_metric_history(runs[0].info.run_id, "train/loss")):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            assert time.time() < deadline, "the cell never reached step 5"
            time.sleep(0.2)

    sender = threading.Thread(target=terminate_mid_cell)
    sender.start()
    with pytest.raises(RunStopped, match=r"SIGTERM to the driver .* rerun with --resume"):
        run_sweep(path)
    sender.join()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("halted")
    (cell,) = [r for r in client.search_runs([exp.experiment_id]) if "orchestrator.cell" in r.data.tags]
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if "orchestrator.cell" not in r.data.tags]
    assert parent.info.status == "KILLED" and parent.data.tags["orchestrator.stopped"].startswith("SIGTERM")
    assert cell.info.status == "KILLED"
    run_dir = tmp_path / "results" / "halted" / cell.data.tags["orchestrator.cell"]
    stop_step = latest_checkpoint_step(run_dir)
    assert 5 < stop_step < 200 and f"at step {stop_step} " in cell.data.tags["orchestrator.stopped"]

    outcome = run_sweep(path, resume=True)
    assert not outcome.failed and outcome.skipped == 0
    run = client.get_run(cell.info.run_id)
    assert run.info.status == "FINISHED" and client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert run.data.tags["orchestrator.resumed_from"] == f"stage 0 step {stop_step}"  # 0 steps lost
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(5, 201, 5))
    record_property("figure", f"SIGTERM at step {stop_step}: the cell resumed at {stop_step}, 0 steps lost")
