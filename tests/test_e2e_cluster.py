"""The cluster as users run it, all on 127.0.0.1 and started here: a Ray head (infra/ray-head-start.sh) that only
drives, and worker nodes that each run in a mount namespace of their own, where tmpfs hides the driver's data,
results and cache folders and the user's home, so a worker can read nothing of the driver's disk. Storage is a
real S3 API (moto's server); MLflow is a tracking server that proxies the artifacts."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import free_ports
from mlflow import MlflowClient

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wait_for(check, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


@dataclass
class Cluster:
    env: dict[str, str]  # the driver's environment: RAY_ADDRESS, MLFLOW_TRACKING_URI, the AWS variables ...
    gcs: int
    home: Path  # ORCHESTRATOR_HOME of the driver (data/, results/): hidden from every worker node
    cache: Path  # ORCHESTRATOR_CACHE of the driver: hidden too
    bucket: str
    tracking_uri: str
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def alive_nodes(self) -> list[dict]:
        """The ALIVE nodes, or [] while the head's state API does not answer."""
        done = self.ray("list", "nodes", "--format", "json", "--address", f"127.0.0.1:{self.gcs}")
        start = 0 if done.stdout.startswith("[") else done.stdout.find("\n[") + 1  # log lines may come first
        try:
            rows = json.loads(done.stdout[start:]) if done.returncode == 0 else []
        except json.JSONDecodeError:
            rows = []
        return [n for n in rows if n["state"] == "ALIVE"]

    def start_isolated_node(self, cpus: int = 2) -> str:
        """A worker node in its own mount namespace: the driver's home and cache are empty tmpfs there, and
        its HOME is a private one. Returns its Ray node id once it has joined, found by a resource only it
        offers (a listing taken before it joined may be empty while the head's dashboard still starts)."""
        agent, grpc, env_agent, metrics = free_ports(4)
        # Below Linux's ephemeral range (32768+), where free_ports' ports come from: Ray refuses to start a
        # node whose agent port falls inside its own worker-port range.
        low = 28000 + 500 * len(self.nodes)
        node_home = self.home.parent / f"node-home-{len(self.nodes)}"
        node_home.mkdir()
        marker = f"isolated_node_{len(self.nodes)}"
        hidden = [str(self.home), str(self.cache), str(node_home)]
        mounts = " && ".join(f"mount -t tmpfs tmpfs {p!r}" for p in hidden)
        command = (
            f"{mounts} && exec {BIN / 'ray'} start --address 127.0.0.1:{self.gcs} --num-cpus {cpus} --block "
            f"--resources '{json.dumps({marker: 1})}' "
            f"--dashboard-agent-listen-port {agent} --dashboard-agent-grpc-port {grpc} "
            f"--runtime-env-agent-port {env_agent} --metrics-export-port {metrics} "
            f"--min-worker-port {low} --max-worker-port {low + 499} --disable-usage-stats"
        )
        log = self.home.parent / f"{marker}.log"
        with log.open("w") as output:
            node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", command],
                                    env={**self.env, "HOME": str(node_home)}, start_new_session=True,
                                    stdout=output, stderr=subprocess.STDOUT)
        self.nodes.append(node)
        listed: list[dict] = []

        def joined() -> str | None:
            listed[:] = self.alive_nodes()
            return next((n["node_id"] for n in listed if marker in n.get("resources_total", {})), None)

        try:
            return wait_for(joined, 180, "a worker node to join")
        except AssertionError as late:
            nodes = [(n["node_id"][:8], n.get("resources_total")) for n in listed]
            raise AssertionError(f"{late}; alive: {nodes}; its `ray start` printed:\n{log.read_text()[-3000:]}")

    def kill(self, node: subprocess.Popen) -> None:
        os.killpg(node.pid, signal.SIGKILL)  # the node and everything on it, without a goodbye
        node.wait(timeout=60)

    def sweep(self, name: str, axes: dict, *overrides: str, max_failures: int = 0) -> subprocess.Popen:
        ablation = self.home / f"{name}.yaml"
        ablation.write_text(yaml.safe_dump({
            "name": name,
            "overrides": [f"storage_path={self.bucket}/runs", "data.train_size=600", "data.max_per_label=2",
                          "data.many_threshold=12", "data.few_threshold=4", "eval.max_samples=24",
                          "eval.max_new_tokens=24", "stages.sft.lr=3e-3", "stages.sft.micro_batch_size=8",
                          "scaling.num_workers=1", "tracking.log_every=10", *overrides],
            "axes": axes,
            "max_failures": max_failures,
        }))
        return subprocess.Popen([sys.executable, "-m", "orchestrator", "sweep", str(ablation)], cwd=REPO,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def cell_runs(self, experiment: str) -> list:
        client = MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return [r for r in runs if "orchestrator.cell" in r.data.tags]


def start_tracking_server(root: Path) -> tuple[str, subprocess.Popen]:
    port = free_ports(1)[0]
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--serve-artifacts"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"

    def answers():
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            return True
        except OSError:
            assert server.poll() is None, "the MLflow server exited"
            return False

    wait_for(answers, 120, "the MLflow server")
    return uri, server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    import boto3

    base = tmp_path_factory.mktemp("cluster")
    root = Path(tempfile.mkdtemp(prefix="orch-cl-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    home, cache, state = base / "home", base / "cache", root / "state"
    home.mkdir()
    cache.mkdir()
    bucket = "cluster-" + base.name.lower().replace("_", "-")[-20:]
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name=s3_server["AWS_DEFAULT_REGION"],
                 aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
    tracking_uri, server = start_tracking_server(base / "server")
    gcs, dashboard, client, agent = free_ports(4)
    inherited = ("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH", "MLFLOW_", "ORCHESTRATOR_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update(s3_server, ORCHESTRATOR_HOME=str(home), ORCHESTRATOR_CACHE=str(cache), MLFLOW_TRACKING_URI=tracking_uri,
               RAY_AUTH_TOKEN_PATH=str(root / "token"), VIRTUAL_ENV=sys.prefix,
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="30")
    # The head drives only (no CPU for workers), as a GPU cluster's head does: every worker runs elsewhere.
    head = subprocess.run(
        [str(REPO / "infra" / "ray-head-start.sh"), "--port", str(gcs), "--dashboard-port", str(dashboard),
         "--client-port", str(client), "--agent-port", str(agent), "--worker-ports", "32000-32499",
         "--num-cpus", "0", "--state-dir", str(state), "--temp-dir", str(root / "ray")],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert head.returncode == 0, head.stderr[-3000:]
    exports = dict(re.findall(r"^export (\w+)=(\S+)$", head.stdout, re.MULTILINE))
    env = {**env, **exports, "PATH": f"{BIN}:{env['PATH']}"}
    world = Cluster(env, gcs, home, cache, f"s3://{bucket}", tracking_uri)
    try:
        yield world
    finally:
        for node in world.nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
        subprocess.run([str(REPO / "infra" / "ray-head-stop.sh"), "--state-dir", str(state)], env=env,
                       capture_output=True, timeout=120)
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.timeout(900)
def test_a_sweep_runs_on_a_node_that_cannot_see_the_driver_disk(cluster):
    """A two-cell sweep whose workers all run on a node that cannot see the driver's disk: the dataset and
    checkpoints go through S3, the metrics, predictions and plots through the MLflow server; the sweep
    finishes and its tables match the store"""
    node = cluster.start_isolated_node(cpus=2)
    try:
        check_the_isolated_sweep(cluster, node)
    finally:  # the next test needs its own node to be the only one with CPUs
        cluster.kill(cluster.nodes[-1])


def check_the_isolated_sweep(cluster: Cluster, node: str) -> None:
    from orchestrator.reporting.tables import write_tables

    sweep = cluster.sweep("isolated", {"seed": [1, 2]}, "stages.sft.steps=30", "checkpoint.every_steps=10")
    out, _ = sweep.communicate(timeout=800)
    assert sweep.returncode == 0, out[-6000:]
    assert "Reporting training result" not in out and "(RayTrainWorker" not in out  # the sweep's own view only
    runs = cluster.cell_runs("isolated")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["orchestrator.worker_node"] for r in runs} == {node}  # every worker ran there
    client = MlflowClient(cluster.tracking_uri)
    for run in runs:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server
        names = {a.path for a in client.list_artifacts(run.info.run_id, "predictions")}
        assert names == {"predictions/val.parquet", "predictions/test.parquet"}
        assert {a.path for a in client.list_artifacts(run.info.run_id, "plots/test")}
    stored = subprocess.run([str(BIN / "python"), "-c", (
        "import pyarrow.fs as f, sys; fs, p = f.FileSystem.from_uri(sys.argv[1]); "
        "print('\\n'.join(i.path for i in fs.get_file_info(f.FileSelector(p, recursive=True))))"),
        f"{cluster.bucket}/runs"], env=cluster.env, capture_output=True, text=True, check=True).stdout
    assert "/_shared/datasets/movies-" in stored and "/checkpoint_" in stored
    # The tables the sweep wrote are the ones the store gives back.
    written = (cluster.home / "results" / "tables" / "isolated" / "paper.csv").read_text()
    os.environ["MLFLOW_TRACKING_URI"] = cluster.tracking_uri
    try:
        rebuilt = write_tables(cluster.tracking_uri, "isolated", out_dir=cluster.home / "rebuilt")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert (cluster.home / "rebuilt" / "paper.csv").read_text() == written and rebuilt.paths
    rows = list(csv.DictReader(written.splitlines()))
    assert rows and rows[0]["pipeline"] == "sft:ce"


@pytest.mark.timeout(900)
def test_a_node_lost_mid_cell_resumes_from_its_checkpoint_in_s3(cluster):
    """The node running a cell is killed mid-training and another isolated node joins: the cell resumes from
    its latest checkpoint in S3 on the new node, in the same MLflow run, with no step missing"""
    steps, kill_from_step = 300, 40
    first = cluster.start_isolated_node(cpus=1)
    sweep = cluster.sweep("lost-node", {"seed": [1]}, f"stages.sft.steps={steps}", "checkpoint.every_steps=20",
                          max_failures=3)
    client = MlflowClient(cluster.tracking_uri)

    def past_kill_step():
        assert sweep.poll() is None, "the sweep ended before the node was lost:\n" + sweep.stdout.read()
        runs = [r for r in cluster.cell_runs("lost-node") if r.info.status == "RUNNING"]
        history = client.get_metric_history(runs[0].info.run_id, "train/loss") if runs else []
        return max((m.step for m in history), default=0) >= kill_from_step

    wait_for(past_kill_step, 600, f"the cell to log step {kill_from_step}", poll=0.2)
    cluster.kill(cluster.nodes[-1])
    second = cluster.start_isolated_node(cpus=1)
    out, _ = sweep.communicate(timeout=800)
    assert sweep.returncode == 0, out[-6000:]
    (run,) = cluster.cell_runs("lost-node")
    assert run.info.status == "FINISHED" and second != first
    assert run.data.tags["orchestrator.worker_node"] == second
    resumed = run.data.tags.get("orchestrator.resumed_from", "")
    assert resumed.startswith("stage 0 step ") and int(resumed.split()[-1]) >= 20, resumed
    logged = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert logged == set(range(10, steps + 1, 10)), logged  # no gap


@pytest.mark.timeout(600)
def test_a_run_after_the_scripted_head_stopped_starts_its_own_cluster(tmp_path):
    """Start and stop the scripted head, then `orchestrator train` in a new shell: it starts a cluster of its
    own (Ray's record of the stopped head is not followed) and prints one progress line per log window"""
    root = Path(tempfile.mkdtemp(prefix="orch-hs-", dir="/tmp"))
    gcs, dashboard, client, agent = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "MLFLOW_"))}
    env.update(ORCHESTRATOR_HOME=str(tmp_path), RAY_AUTH_TOKEN_PATH=str(root / "token"))
    head = subprocess.run(
        [str(REPO / "infra" / "ray-head-start.sh"), "--port", str(gcs), "--dashboard-port", str(dashboard),
         "--client-port", str(client), "--agent-port", str(agent), "--num-cpus", "1", "--state-dir",
         str(root / "state")], env=env, capture_output=True, text=True, timeout=180,
    )
    assert head.returncode == 0, head.stderr[-3000:]
    stop = subprocess.run([str(REPO / "infra" / "ray-head-stop.sh"), "--state-dir", str(root / "state")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr[-2000:]
    run = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", "ablations/runs/demo.yaml", "name=after-head",
         "stages.sft.steps=10", "tracking.log_every=5", "scaling.num_workers=1", "data.train_size=300",
         "data.max_per_label=2", "data.many_threshold=10", "data.few_threshold=3", "eval.max_samples=16"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=500,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    progress = [ln for ln in run.stdout.splitlines() if "run after-head | stage 1/1 sft:ce | step" in ln]
    assert [re.search(r"step (\d+)/10", ln).group(1) for ln in progress] == ["5", "10"], run.stdout[-3000:]
    assert all(re.search(r"loss [\d.e+-]+ \| lr [\d.e+-]+ \| [\d.]+ samples/s \| ETA \d:\d\d:\d\d", ln)
               for ln in progress), progress
    assert "Reporting training result" not in run.stdout + run.stderr
