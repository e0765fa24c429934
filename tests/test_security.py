"""Security defaults, each asserted: loopback binds, no remote code, no unpickling of weights or
data, no credentials in MLflow params or tags.

SECURITY_CHECKS maps each test here to the one line README.md's Reliability section shows for it;
INFRA_CHECKS names the tests in tests/test_infra.py that cover the scripts (referenced, not repeated).
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys
import types
from pathlib import Path

import pytest

from orchestrator.config import ModelConfig, load_run_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "orchestrator"

SECURITY_CHECKS = {
    "test_in_process_ray_binds_its_dashboard_to_loopback":
        "the in-process Ray cluster serves its dashboard and Jobs API on 127.0.0.1 only",
    "test_orchestrator_ui_serves_on_loopback_by_default":
        "`orchestrator ui` serves MLflow on 127.0.0.1 unless `--host` says otherwise",
    "test_trust_remote_code_is_off_and_reaches_every_from_pretrained_as_false":
        "`trust_remote_code` is off by default and every `from_pretrained` call gets it as False",
    "test_no_from_pretrained_call_turns_remote_code_on_or_safetensors_off":
        "no `from_pretrained` call in orchestrator/ turns remote code on or safetensors off",
    "test_no_unsafe_deserialisation_in_the_code_base":
        "no pickle, `read_pickle`, `allow_pickle` or `torch.load` without `weights_only=True` in orchestrator/ "
        "(one documented exception: DeepSpeed restoring the run's own checkpoint)",
    "test_bin_weights_load_with_weights_only":
        "`.bin` weights load through transformers' `torch.load(weights_only=True)`; safetensors come first",
    "test_datasets_are_parquet_jsonl_or_csv_never_pickles":
        "datasets are read from Parquet, JSONL or CSV and built to Parquet; a pickle manifest is refused",
    "test_credentials_in_config_values_are_redacted":
        "credentials inside config values (URI passwords, `?token=`-style query parameters) are logged as `***`",
    "test_secret_looking_keys_are_never_logged":
        "config keys that look like secrets are never logged as MLflow params",
    "test_no_secret_from_the_environment_reaches_a_runs_params_or_tags":
        "no value of a secret-looking environment variable (`HF_TOKEN`, `AWS_SECRET_ACCESS_KEY`, "
        "`MLFLOW_TRACKING_PASSWORD`) reaches a run's params or tags",
    "test_no_secret_reaches_the_resolved_config_artifact":
        "the resolved config logged as `config/resolved.json` carries no credential either",
}

INFRA_CHECKS = {
    "test_no_infra_file_turns_token_auth_off_or_binds_everywhere":
        "no infra file turns Ray's token auth off or binds 0.0.0.0",
    "test_start_script_turns_token_auth_on_and_exports_what_clients_need":
        "the scripted Ray head runs with token auth on and its dashboard on 127.0.0.1",
    "test_mlflow_server_defaults_to_sqlite_on_loopback":
        "the MLflow server script binds 127.0.0.1",
    "test_mlflow_server_takes_a_database_and_refuses_a_password_in_the_uri":
        "the MLflow server script refuses a password written into its database URI",
    "test_ray_cluster_config_passes_rays_own_validation_and_keeps_auth_on":
        "the cluster-launcher config keeps token auth on",
}


# --------------------------------------------------------------------------- network binds


def fake_ray(monkeypatch) -> dict:
    """A stand-in `ray` module that records what `ray.init` was asked (no cluster starts)."""
    calls: dict = {}
    module = types.ModuleType("ray")
    module.is_initialized = lambda: False
    module.init = lambda **kwargs: calls.update(kwargs)
    monkeypatch.setitem(sys.modules, "ray", module)
    return calls


def test_in_process_ray_binds_its_dashboard_to_loopback(monkeypatch):
    from orchestrator.runtime.ray_setup import init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    calls = fake_ray(monkeypatch)
    init_ray(num_cpus=2)
    assert calls["dashboard_host"] == "127.0.0.1"
    assert "0.0.0.0" not in json.dumps(calls, default=str)
    # Joining an existing cluster (RAY_ADDRESS) binds nothing of its own: the head decided.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    calls = fake_ray(monkeypatch)
    init_ray()
    assert "dashboard_host" not in calls and "include_dashboard" not in calls


def test_orchestrator_ui_serves_on_loopback_by_default(monkeypatch, tmp_path):
    from orchestrator import cli

    assert cli.build_parser().parse_args(["ui"]).host == "127.0.0.1"
    executed = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: executed.append(argv))
    monkeypatch.setattr("orchestrator.tracking.conventions.ensure_store", lambda uri: None)  # no store needed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    assert cli.main(["ui"]) == 0
    argv = executed[0]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


def test_the_infra_checks_referenced_in_the_readme_exist():
    """The scripts in infra/ are checked by tests/test_infra.py; the README names those tests, so they must exist."""
    tree = ast.parse((ROOT / "tests" / "test_infra.py").read_text())
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert set(INFRA_CHECKS) <= names, set(INFRA_CHECKS) - names


# --------------------------------------------------------------------------- remote code and weights


def source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def calls_named(name: str):
    """(file, call node) for every call of `<anything>.name(...)` or `name(...)` in orchestrator/."""
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield path.relative_to(ROOT), node


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_trust_remote_code_is_off_and_reaches_every_from_pretrained_as_false(monkeypatch, tmp_path):
    import transformers

    from orchestrator.modeling.models import build_digit_tokenizer, load_model_and_tokenizer

    assert ModelConfig().trust_remote_code is False
    assert load_run_config().model.trust_remote_code is False
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    seen = []

    def tokenizer(source, **kwargs):
        seen.append(("AutoTokenizer", kwargs))
        return build_digit_tokenizer()

    def model(source, **kwargs):
        seen.append(("AutoModelForCausalLM", kwargs))
        return types.SimpleNamespace(generation_config=types.SimpleNamespace())

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    load_model_and_tokenizer(ModelConfig(source=str(tmp_path)), str(tmp_path))
    assert [name for name, _ in seen] == ["AutoTokenizer", "AutoModelForCausalLM"]
    assert all(kwargs["trust_remote_code"] is False for _, kwargs in seen)
    # the opt-in is honoured, and only the opt-in
    seen.clear()
    load_model_and_tokenizer(ModelConfig(source=str(tmp_path), trust_remote_code=True), str(tmp_path))
    assert all(kwargs["trust_remote_code"] is True for _, kwargs in seen)


def test_no_from_pretrained_call_turns_remote_code_on_or_safetensors_off():
    calls = list(calls_named("from_pretrained"))
    assert calls, "the scan found no from_pretrained call: is it still reading orchestrator/?"
    for path, node in calls:
        remote = keyword(node, "trust_remote_code")
        # absent (transformers' default is False) or the user's config field, never a literal True
        assert remote is None or (isinstance(remote, ast.Attribute) and remote.attr == "trust_remote_code"), (
            f"{path}:{node.lineno} passes trust_remote_code={ast.unparse(remote)}"
        )
        safetensors = keyword(node, "use_safetensors")
        assert not (isinstance(safetensors, ast.Constant) and safetensors.value is False), f"{path}:{node.lineno}"


# Where orchestrator/ may deserialise with pickle, and why. DeepSpeed's engine.load_checkpoint reads its
# own optimizer/model state files with torch.load(weights_only=False); the files are the ones this run
# wrote into its own storage_path, so restoring them trusts nothing the run did not create.
ALLOWED_UNSAFE = {
    ("orchestrator/stages/context.py", "load_checkpoint"): "DeepSpeed restores the run's own checkpoint",
}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
PICKLE_CALLS = {"read_pickle", "to_pickle", "loads"}


def unsafe_uses() -> list[tuple[str, int, str]]:
    found = []
    for path in source_files():
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Import):
                found += [(rel, node.lineno, a.name) for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
                found.append((rel, node.lineno, node.module))
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
                weights_only = keyword(node, "weights_only")
                if name == "load" and owner == "torch" and not (
                    isinstance(weights_only, ast.Constant) and weights_only.value is True
                ):
                    found.append((rel, node.lineno, "torch.load without weights_only=True"))
                elif name in ("read_pickle", "to_pickle") or (name == "loads" and owner in PICKLE_MODULES):
                    found.append((rel, node.lineno, name))
                elif name == "load_checkpoint":
                    found.append((rel, node.lineno, name))
                allow = keyword(node, "allow_pickle")
                if isinstance(allow, ast.Constant) and allow.value is True:
                    found.append((rel, node.lineno, "allow_pickle=True"))
    return found


def test_no_unsafe_deserialisation_in_the_code_base():
    unexplained = [(f, line, what) for f, line, what in unsafe_uses() if (f, what) not in ALLOWED_UNSAFE]
    assert not unexplained, (
        f"unsafe deserialisation (document it in ALLOWED_UNSAFE only if the data is the run's own): {unexplained}"
    )


def test_the_unsafe_scan_finds_what_it_looks_for(tmp_path, monkeypatch):
    """The scan itself: planted unsafe loads are found (so an empty result means something)."""
    planted = tmp_path / "orchestrator"
    planted.mkdir()
    (planted / "bad.py").write_text(
        "import pickle\nimport torch\nimport pandas as pd\nimport numpy as np\n"
        "a = torch.load('x.pt')\nb = torch.load('x.pt', weights_only=False)\n"
        "c = torch.load('x.pt', weights_only=True)\n"
        "d = pd.read_pickle('x.pkl')\ne = np.load('x.npy', allow_pickle=True)\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", planted)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert sorted(line for _, line, _ in unsafe_uses()) == [1, 5, 6, 8, 9]


def test_bin_weights_load_with_weights_only():
    from transformers import modeling_utils

    # transformers reads a pytorch_model.bin through load_state_dict, with weights_only on by default ...
    assert inspect.signature(modeling_utils.load_state_dict).parameters["weights_only"].default is True
    # ... and from_pretrained keeps it on, and prefers safetensors (use_safetensors=None) where both exist
    assert inspect.signature(modeling_utils.PreTrainedModel.from_pretrained).parameters["weights_only"].default is True


def test_datasets_are_parquet_jsonl_or_csv_never_pickles(tmp_path):
    from orchestrator.config import ManifestConfig
    from orchestrator.data import DataError
    from orchestrator.data.manifest import SUFFIXES, manifest_frame

    assert set(SUFFIXES.values()) == {"parquet", "jsonl", "csv"}
    for suffix in (".pkl", ".pickle", ".npy", ".pt"):
        (tmp_path / f"m{suffix}").write_bytes(b"\x80\x04N.")  # a pickle of None
        with pytest.raises(DataError, match=rf"unknown format '\{suffix}'"):
            manifest_frame(ManifestConfig(path=str(tmp_path / f"m{suffix}")))
    # the builder writes Parquet and reads only Parquet back
    builder = (PACKAGE / "data" / "builder.py").read_text()
    assert "pq.write_table" in builder and "pq.read_table" in builder


# --------------------------------------------------------------------------- secrets in MLflow


@pytest.mark.parametrize(
    "override, leaked, shown",
    [
        ("tracking.tracking_uri=postgresql://mlflow:s3cr3t-pw@db.internal:5432/mlflow", "s3cr3t-pw",
         "postgresql://mlflow:***@db.internal:5432/mlflow"),
        ("tracking.tracking_uri=http://alice:tok-123456@mlflow.internal:5000", "tok-123456",
         "http://alice:***@mlflow.internal:5000"),
        ("tracking.tracking_uri=https://ghp_abcdef123456@mlflow.internal", "ghp_abcdef123456", "https://***@mlflow.internal"),
        ("storage_path=s3://bucket/results?token=abc123secret&region=eu", "abc123secret",
         "s3://bucket/results?token=***&region=eu"),
        ("data.manifest.path=https://host/m.parquet?X-Amz-Signature=f00ba4&X-Amz-Credential=AKIA0&v=1", "f00ba4",
         "https://host/m.parquet?X-Amz-Signature=***&X-Amz-Credential=***&v=1"),
        ("model.source=https://host/model?api_key=k-98765&password=hunter22", "hunter22",
         "https://host/model?api_key=***&password=***"),
    ],
    ids=["postgres-password", "http-user-token", "token-as-user", "query-token", "signed-url", "api-key-password"],
)
def test_credentials_in_config_values_are_redacted(override, leaked, shown):
    from orchestrator.tracking.redaction import loggable_params

    params = loggable_params(load_run_config(overrides=[override]))
    field = override.split("=", 1)[0]
    assert params[field] == shown
    assert not any(leaked in v for v in params.values())


def test_secret_looking_keys_are_never_logged():
    from orchestrator.tracking.redaction import SECRET_PATTERN, loggable_params

    params = loggable_params(load_run_config())
    assert params and not [k for k in params if SECRET_PATTERN.search(k)]
    # a config without such keys today still keeps ordinary values readable
    assert params["data.name"] == "movies" and params["pipeline"] == "sft:ce"
    assert SECRET_PATTERN.search("hub_token") and SECRET_PATTERN.search("db.password")


ENV_SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-0f9e8d",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-bPxRfiCY",
    "HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz",
}


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """A run created through start_or_resume_run while secrets sit in the environment and, pasted by a
    user, inside config values (one store for the module: creating one takes seconds)."""
    from mlflow import MlflowClient

    from orchestrator.tracking.runs import start_or_resume_run

    home = tmp_path_factory.mktemp("secrets")
    uri = f"sqlite:///{home / 'mlruns' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in ENV_SECRETS.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("ORCHESTRATOR_HOME", str(home))
        cfg = load_run_config(overrides=[
            f"tracking.tracking_uri={uri}",
            f"storage_path=s3://results-bucket/runs?token={ENV_SECRETS['HF_TOKEN']}",
            f"model.cache_dir=/cache/{ENV_SECRETS['HF_TOKEN']}",  # a secret value pasted somewhere odd
            f"data.manifest.description=from https://user:{ENV_SECRETS['MLFLOW_TRACKING_PASSWORD']}@host/m.parquet",
            f"data.manifest.prompt_template=key {ENV_SECRETS['AWS_SECRET_ACCESS_KEY']}",
        ])
        run_id = start_or_resume_run(cfg, extra_tags={"orchestrator.cell": "secret-cell"})
    return MlflowClient(uri), run_id


def test_no_secret_from_the_environment_reaches_a_runs_params_or_tags(secret_run):
    client, run_id = secret_run
    data = client.get_run(run_id).data
    logged = json.dumps({"params": data.params, "tags": data.tags})
    for name, secret in ENV_SECRETS.items():
        assert secret not in logged, f"{name}'s value was logged"
    assert data.params["model.cache_dir"] == "/cache/***"
    assert data.params["storage_path"] == "s3://results-bucket/runs?token=***"


def test_no_secret_reaches_the_resolved_config_artifact(secret_run, tmp_path):
    client, run_id = secret_run
    text = Path(client.download_artifacts(run_id, "config/resolved.json", str(tmp_path))).read_text()
    assert not [name for name, secret in ENV_SECRETS.items() if secret in text]


def test_redacted_config_json_is_the_config_with_credentials_masked():
    from orchestrator.tracking.redaction import redacted_config_json

    cfg = load_run_config(overrides=["tracking.tracking_uri=postgresql://u:pw-123456@db/mlflow"])
    data = json.loads(redacted_config_json(cfg))
    assert data["tracking"]["tracking_uri"] == "postgresql://u:***@db/mlflow"
    assert {k: v for k, v in data.items() if k != "tracking"} == {
        k: v for k, v in cfg.model_dump(mode="json").items() if k != "tracking"
    }


def test_every_security_test_is_in_the_table():
    """The README lists SECURITY_CHECKS: a new security test without a line there would go unmentioned."""
    module = sys.modules[__name__]
    tests = {name for name, fn in vars(module).items() if name.startswith("test_") and callable(fn)}
    bookkeeping = {
        "test_every_security_test_is_in_the_table",
        "test_the_infra_checks_referenced_in_the_readme_exist",
        "test_the_unsafe_scan_finds_what_it_looks_for",
        "test_redacted_config_json_is_the_config_with_credentials_masked",
    }
    assert tests - bookkeeping == set(SECURITY_CHECKS)
    assert all(re.match(r"^\S.*\S$", line) for line in SECURITY_CHECKS.values())
