"""Bad input is refused before any compute, each with one message naming the problem.

Every case is a row of a table: what it feeds, and the message the user must see. A row runs through
the real entry point, `orchestrator.cli.main`, in a fresh home that already holds an earlier attempt's
state: an MLflow store with a FAILED run of the same run key, that run's results, a built dataset.
Each row then checks: exit status 2, the message on stderr, no traceback, the MLflow store exactly as
before (no run created, none changed, none RUNNING), and every file that existed before unchanged
(bytes and mtime). Ray never starts: `init_ray` raises, so a case that slipped through to compute
fails at once instead of training (test_the_safety_net_* shows what the store looks like then).

Model outputs have their own table: malformed text is a counted parse failure, never an exception.
README.md's Reliability section is rendered from these tables (tests/render_reliability.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import sqlite3
import sys
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import load_run_config
from orchestrator.methods.answers import PARSE_POLICIES, parse_answer
from orchestrator.methods.metrics import evaluate_texts
from orchestrator.tracking.conventions import RUN_KEY_TAG, run_key

ROOT = Path(__file__).resolve().parents[1]
# A text manifest of 30 rows over 4 label bins (12/9/6/3): the DIR protocol can cut val and test from it.
TARGETS = [20.0] * 12 + [30.0] * 9 + [40.0] * 6 + [50.0] * 3
DATA_OPTIONS = ["data.max_per_label=2", "data.many_threshold=6", "data.few_threshold=3"]
DATA = ["data.name=manifest", "data.manifest.path=text.jsonl", *DATA_OPTIONS]
IMAGES = ["data.name=manifest", "data.manifest.path=images.jsonl", *DATA_OPTIONS]
ABLATION_BASE = {
    "data": {"name": "manifest", "manifest": {"path": "text.jsonl"}, "max_per_label": 2, "many_threshold": 6,
             "few_threshold": 3},
}


class ComputeStarted(RuntimeError):
    """Raised where Ray would start: a bad input reached compute."""


# --------------------------------------------------------------------------- the world a case runs in


@dataclass
class Snapshot:
    files: dict[str, tuple[int, str]]  # path under home -> (mtime_ns, sha256)
    store: tuple | None  # (runs, tags, experiments) read from the SQLite store; None: no store


@dataclass
class World:
    home: Path
    monkeypatch: pytest.MonkeyPatch
    db: Path = field(init=False)

    def __post_init__(self):
        self.db = self.home / "mlruns" / "mlflow.db"

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.home / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path

    def write_yaml(self, name: str, data) -> Path:
        return self.write(name, yaml.safe_dump(data, sort_keys=False))

    def write_jsonl(self, name: str, rows: list[dict]) -> Path:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))

    def store_state(self) -> tuple | None:
        """Every run (status, end time, lifecycle), tag and experiment in the store, read-only."""
        if not self.db.is_file():
            return None
        with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as con:
            runs = sorted(con.execute("SELECT run_uuid, status, end_time, lifecycle_stage FROM runs"))
            tags = sorted(con.execute("SELECT run_uuid, key, value FROM tags"))
            experiments = sorted(con.execute("SELECT experiment_id, name, lifecycle_stage FROM experiments"))
        return runs, tags, experiments

    def snapshot(self) -> Snapshot:
        files = {}
        for path in sorted(self.home.rglob("*")):
            rel = str(path.relative_to(self.home))
            if path.is_file() and not rel.startswith("mlruns/mlflow.db"):  # the store is compared by content
                files[rel] = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        return Snapshot(files, self.store_state())

    def assert_untouched(self, before: Snapshot) -> None:
        after = self.snapshot()
        changed = [f for f, stamp in before.files.items() if after.files.get(f) != stamp]
        assert not changed, f"files written before were changed or removed: {changed}"
        # A refused input may fill the dataset cache (data/), nothing else: no results, no store, no logs.
        new = [f for f in after.files if f not in before.files and not f.startswith("data/")]
        assert not new, f"a refused input wrote {new}"
        if before.store is None:
            assert after.store is None, "a refused input created an MLflow store"
            return
        runs_after = after.store[0]
        assert not [r for r in runs_after if r[1] == "RUNNING"], f"a run was left RUNNING: {runs_after}"
        assert after.store == before.store, "the MLflow store changed (a run was created, resumed or retagged)"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket closes


@pytest.fixture(scope="session")
def template_store(tmp_path_factory) -> Path:
    """An MLflow store holding an earlier attempt: experiment `orchestrator` with a FAILED run named `run`,
    and an experiment `gone` deleted in the UI. Built once (MLflow's schema migrations take seconds) and
    copied into each case's home."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("template-store")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.create_experiment("orchestrator", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(exp, run_name="run", tags={RUN_KEY_TAG: "set-per-case"})
    client.log_param(run.info.run_id, "seed", "42")
    client.set_tag(run.info.run_id, "orchestrator.error", "an earlier failure")
    client.set_terminated(run.info.run_id, status="FAILED")
    client.delete_experiment(client.create_experiment("gone"))
    return root / "mlflow.db"


@pytest.fixture()
def world(tmp_path, monkeypatch, template_store) -> World:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(home))
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # an unreachable server fails at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(home)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the cwd on sys.path

    def no_compute(*args, **kwargs):
        raise ComputeStarted("a bad input reached compute: Ray was about to start")

    monkeypatch.setattr("orchestrator.runtime.driver.init_ray", no_compute)  # a run's driver
    monkeypatch.setattr("orchestrator.runtime.ray_setup.init_ray", no_compute)  # a sweep's
    w = World(home, monkeypatch)
    w.write_jsonl("text.jsonl", [{"prompt": f"question {i}", "target": t} for i, t in enumerate(TARGETS)])
    # The earlier attempt: its store (its run has this home's run key, so a slip would resume it), its results
    # and its built dataset.
    w.db.parent.mkdir()
    shutil.copy(template_store, w.db)
    (w.db.parent / ".mlflow.db.ready").touch()
    with closing(sqlite3.connect(w.db)) as con, con:
        con.execute("UPDATE tags SET value = ? WHERE key = ?", (run_key(load_run_config(overrides=DATA)), RUN_KEY_TAG))
    w.write("results/run/earlier_metrics.json", '{"test/all/mae": 3.5}')
    from orchestrator.data import build_dataset

    build_dataset(load_run_config(overrides=DATA).data)
    return w


def run_cli(argv: list[str]) -> int:
    """The exit status of `orchestrator ARGV`, whether main returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


# --------------------------------------------------------------------------- inputs the cases need


def png(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_manifest(w: World, rows_override: dict[int, str] | None = None) -> None:
    """images/0..29.png and images.jsonl listing them; `rows_override` points rows at other files."""
    for i in range(len(TARGETS)):
        w.write(f"images/{i}.png", png(i))
    paths = {i: f"images/{i}.png" for i in range(len(TARGETS))} | (rows_override or {})
    w.write_jsonl("images.jsonl", [{"image_path": paths[i], "target": t} for i, t in enumerate(TARGETS)])


def built_image_dataset(w: World) -> None:
    """The image dataset built once already (its files join the snapshot: a failed rebuild must keep them)."""
    from orchestrator.data import build_dataset

    image_manifest(w)
    build_dataset(load_run_config(overrides=IMAGES).data)


def rebuild_images(*extra: str) -> Callable[[World], list[str]]:
    return lambda w: ["data", "build", "manifest", "manifest.path=images.jsonl", "max_per_label=2",
                      "many_threshold=6", "few_threshold=3", "--force", *extra]


LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 128, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}


def model_dir(name: str, config: dict | str | None = LLAMA_CONFIG, weights: bool = True,
              tokenizer: str | None = "digits") -> Callable[[World], None]:
    """A local model directory: config.json (a dict, raw text, or none), a weights file, a tokenizer
    ("digits": the project's digit tokenizer; "merging": one that keeps `42` as one token). The weights
    file is a stand-in: the driver checks that one exists, the workers would load it."""

    def setup(w: World) -> None:
        d = w.home / name
        d.mkdir()
        if config is not None:
            (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if weights:
            import torch
            from safetensors.torch import save_file

            save_file({"lm_head.weight": torch.zeros(2, 2)}, str(d / "model.safetensors"))
        if tokenizer == "digits":
            from orchestrator.modeling.models import build_digit_tokenizer

            build_digit_tokenizer().save_pretrained(d)
        elif tokenizer == "merging":
            from tokenizers import Tokenizer, models, pre_tokenizers
            from transformers import PreTrainedTokenizerFast

            vocab = {"<unk>": 0, "<pad>": 1, "<|im_end|>": 2, **{str(k): 3 + k for k in range(10)}, "42": 13}
            core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
            core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # whole words: "9081726354" is one piece
            PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                    eos_token="<|im_end|>").save_pretrained(d)

    return setup


def ablation(**fields) -> Callable[[World], None]:
    def setup(w: World) -> None:
        w.write_yaml("abl.yaml", {"name": "abl", "base": ABLATION_BASE, **fields})

    return setup


def earlier_sweep(w: World) -> None:
    """`sweep abl.yaml` ran before and was interrupted: its parent run exists, FAILED, with its artifacts."""
    from mlflow import MlflowClient

    from orchestrator.sweep.grid import base_fingerprint, base_values
    from orchestrator.sweep.resume import open_parent
    from orchestrator.sweep.tune import plan_sweep

    path = w.write_yaml("abl.yaml", {"name": "abl", "base": ABLATION_BASE, "axes": {"seed": [1, 2]}})
    plan = plan_sweep(path)
    abl, uri = plan.ablation, plan.tracking_uri
    parent = open_parent(abl, path.read_text(), plan.cells, base_values(abl, plan.base_tree), uri, plan.experiment,
                         False, base_fingerprint(path, abl, []))
    MlflowClient(uri).set_terminated(parent, status="FAILED")


def both(*setups: Callable[[World], None]) -> Callable[[World], None]:
    def setup(w: World) -> None:
        for s in setups:
            s(w)

    return setup


def set_env(name: str, value: Callable[[], str]) -> Callable[[World], None]:
    return lambda w: w.monkeypatch.setenv(name, value())


def train(*overrides: str, data: list[str] = DATA) -> Callable[[World], list[str]]:
    return lambda w: ["train", *data, *overrides]


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    area: str  # README group
    feeds: str  # what the case feeds (Markdown, one line)
    says: tuple[str, ...]  # fragments of the message the user must see, in order (quoted in the README)
    argv: Callable[[World], list[str]]
    setup: Callable[[World], None] | None = None
    status: int = 2

    def line(self) -> str:
        return f"{self.feeds} → “{' … '.join(self.says)}”"


AREAS = {
    "config": "Run configs and overrides (`orchestrator train`)",
    "ablation": "Ablation files (`orchestrator sweep`)",
    "data": "Datasets and manifests",
    "model": "Models",
    "cli": "Command line",
}

CASES = [
    # ---- run configs
    Case("config-unknown-key", "config", "a YAML config with a misspelt key (`data: {nmae: movies}`)",
         ("data.nmae: unknown field",), lambda w: ["train", "run.yaml"],
         lambda w: w.write_yaml("run.yaml", {"data": {"nmae": "movies"}})),
    Case("config-wrong-type", "config", "a value of the wrong type (`scaling.num_workers=many`)",
         ("scaling.num_workers: Input should be a valid integer",), train("scaling.num_workers=many")),
    Case("config-out-of-range", "config", "an out-of-range value (`pipeline.0.lr=-1`)",
         ("pipeline.0.lr: Input should be greater than 0",), train("pipeline.0.lr=-1")),
    Case("config-not-a-choice", "config", "a value outside a fixed set (`eval.parse_failure=ignore`)",
         ("eval.parse_failure: Input should be 'penalty', 'exclude' or 'random'; got 'ignore'",),
         train("eval.parse_failure=ignore")),
    Case("config-offload-zero0", "config", "`deepspeed.offload_optimizer=true` with `deepspeed.zero_stage=0`",
         ("deepspeed.offload_optimizer needs zero_stage >= 1",),
         train("deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0")),
    Case("config-bf16-on-cpu", "config", "`deepspeed.precision=bf16` without a GPU (`scaling.use_gpu=false`)",
         ("deepspeed.precision=bf16 needs scaling.use_gpu=true",), train("deepspeed.precision=bf16")),
    Case("config-rvtc-then-grpo", "config", "a stage after the classification head (`sft:rvtc -> grpo:ccc`)",
         ("sft:rvtc must be the last stage, but grpo:ccc follows it",), train("pipeline=sft:rvtc -> grpo:ccc")),
    Case("config-image-task-text-model", "config", "the image task `digit-count` with a text-only model",
         ("data.name=digit-count is an image task but model.source='tiny' (architecture llama) cannot see images",),
         lambda w: ["train", "data.name=digit-count"]),
    Case("config-bad-yaml", "config", "a config file that is not valid YAML",
         ("bad.yaml: not valid YAML",), lambda w: ["train", "bad.yaml"],
         lambda w: w.write("bad.yaml", "data: {train_size: 3\n")),
    Case("config-top-level-list", "config", "a config file whose top level is a list",
         ("the top level must be a mapping of fields, got list",), lambda w: ["train", "list.yaml"],
         lambda w: w.write("list.yaml", "- sft:ce\n")),
    Case("config-override-without-value", "config", "an override without `=` (`noequals`)",
         ("override 'noequals' must look like field.path=value",), train("noequals")),
    Case("config-override-bad-index", "config", "an override of a stage the pipeline lacks (`pipeline.3.lr=1`)",
         ("pipeline.3 is not an index of a 1-element list",), train("pipeline.3.lr=1")),
    Case("config-unknown-reward", "config", "an unknown GRPO reward (`sft:ce -> grpo:cc`)",
         ("pipeline.1.rewards.0.name: unknown reward 'cc'",), train("pipeline=sft:ce -> grpo:cc")),
    Case("config-budget-too-short", "config", "a generation budget too short for the answer (`eval.max_new_tokens=5`)",
         ("eval.max_new_tokens=5 cannot hold the answer '<answer>50</answer>'",), train("eval.max_new_tokens=5")),
    Case("config-empty-experiment", "config", "an empty MLflow experiment name (`tracking.experiment=''`)",
         ("tracking.experiment: String should have at least 1 character",), train("tracking.experiment=''")),
    Case("config-deleted-experiment", "config", "an MLflow experiment deleted in the UI (`tracking.experiment=gone`)",
         ("tracking.experiment 'gone' was deleted",), train("tracking.experiment=gone")),
    Case("config-unreachable-store", "config", "a tracking server where nothing listens",
         ("cannot reach the MLflow tracking store http://127.0.0.1:",),
         lambda w: ["train", *DATA, f"tracking.tracking_uri=http://127.0.0.1:{closed_port()}"]),
    Case("config-unreachable-ray", "config", "`RAY_ADDRESS` naming a cluster where nothing listens",
         ("no Ray cluster answers at 127.0.0.1:",), train(),
         set_env("RAY_ADDRESS", lambda: f"127.0.0.1:{closed_port()}")),
    Case("config-storage-is-a-file", "config", "`storage_path` naming a file",
         ("storage_path 'notes.txt':", "is a file, not a folder"), train("storage_path=notes.txt"),
         lambda w: w.write("notes.txt", "my notes")),
    Case("config-data-root-is-a-file", "config", "`data.root` naming a file",
         ("data.root 'notes.txt':", "is a file, not a folder"), train("data.root=notes.txt"),
         lambda w: w.write("notes.txt", "my notes")),
    # ---- ablation files
    Case("ablation-empty-axis", "ablation", "an empty axis (`seed: []`)",
         ("axes.seed: an empty axis (give at least one value)",), lambda w: ["sweep", "abl.yaml"],
         ablation(axes={"seed": []})),
    Case("ablation-unknown-field", "ablation", "an unknown field in the ablation file (`axis:`)",
         ("axis: unknown field",), lambda w: ["sweep", "abl.yaml"], ablation(axis={"seed": [1]})),
    Case("ablation-unknown-swept-field", "ablation", "an axis naming no config field (`data.nmae`)",
         ("data.nmae: unknown field",), lambda w: ["sweep", "abl.yaml"], ablation(axes={"data.nmae": ["x"]})),
    Case("ablation-duplicate-value", "ablation", "a value listed twice (`seed: [1, 1]`)",
         ("axes.seed: lists 1 more than once (duplicate cells)",), lambda w: ["sweep", "abl.yaml"],
         ablation(axes={"seed": [1, 1]})),
    Case("ablation-duplicate-cells", "ablation", "two spellings of one run (`seed: [1, 1.0]`)",
         ("are the same run (duplicate cells)",), lambda w: ["sweep", "abl.yaml"], ablation(axes={"seed": [1, 1.0]})),
    Case("ablation-paired-lengths", "ablation", "paired lists of different lengths",
         ("paired.0: value lists differ in length ([1, 2]); they are zipped",), lambda w: ["sweep", "abl.yaml"],
         ablation(paired=[{"seed": [1, 2], "data.seed": [1]}])),
    Case("ablation-swept-twice", "ablation", "a field both on an axis and in a paired group",
         ("paired.0.seed: the field is swept twice",), lambda w: ["sweep", "abl.yaml"],
         ablation(axes={"seed": [1]}, paired=[{"seed": [2]}])),
    Case("ablation-exclude-unswept", "ablation", "an exclusion naming a field no axis sweeps",
         ("exclude.0: names no swept field (data.seed)",), lambda w: ["sweep", "abl.yaml"],
         ablation(axes={"seed": [1]}, exclude=[{"data.seed": 1}])),
    Case("ablation-all-excluded", "ablation", "exclusions that drop every cell",
         ("every cell is excluded; nothing to run",), lambda w: ["sweep", "abl.yaml"],
         ablation(axes={"seed": [1]}, exclude=[{"seed": 1}])),
    Case("ablation-invalid-cell", "ablation", "an axis value one cell cannot take (`pipeline.0.lr: [1e-3, -1.0]`)",
         ("cell pipeline.0.lr=-1.0", "pipeline.0.lr: Input should be greater than 0"),
         lambda w: ["sweep", "abl.yaml"], ablation(axes={"pipeline.0.lr": [1e-3, -1.0]})),
    Case("ablation-cell-preflight", "ablation",
         "a cell whose GRPO budget cannot hold the answer (found before any cell runs)",
         ("pipeline.1.max_new_tokens=8 cannot hold the answer",), lambda w: ["sweep", "abl.yaml"],
         ablation(axes={"pipeline": ["sft:ce", "sft:ce -> grpo:ccc"]}, overrides=["stages.grpo.max_new_tokens=8"])),
    Case("ablation-missing-file", "ablation", "an ablation file that does not exist",
         ("ablation file not found: missing.yaml",), lambda w: ["sweep", "missing.yaml"]),
    Case("ablation-rerun-without-resume", "ablation",
         "rerunning a sweep that has runs, without `--resume` (its runs untouched)",
         ("sweep 'abl' already has a parent run", "rerun with --resume"), lambda w: ["sweep", "abl.yaml"],
         earlier_sweep),
    Case("ablation-resume-changed-base", "ablation", "`--resume` after the base config changed (its runs untouched)",
         ("its base config or overrides changed since it started",),
         lambda w: ["sweep", "abl.yaml", "--resume", "data.train_size=20"], earlier_sweep),
    # ---- datasets and manifests
    Case("data-unknown-dataset", "data", "an unregistered dataset (`data.name=nope`)",
         ("unknown dataset 'nope'; registered: diamonds, digit-count, doctor-visits, manifest, movies",),
         lambda w: ["train", "data.name=nope"]),
    Case("data-manifest-missing", "data", "a manifest file that does not exist",
         ("manifest not found:", "nothere.jsonl"),
         lambda w: ["train", "data.name=manifest", "data.manifest.path=nothere.jsonl"]),
    Case("data-missing-column", "data", "a manifest without its target column",
         ("missing column 'target' (data.manifest.target_column); has: prompt, value",),
         lambda w: ["train", *DATA[:1], "data.manifest.path=nocol.jsonl", *DATA_OPTIONS],
         lambda w: w.write_jsonl("nocol.jsonl", [{"prompt": "q", "value": t} for t in TARGETS])),
    Case("data-non-numeric-target", "data", "a non-numeric target (`\"many\"` in row 1)",
         ("row 1 (line 2): target 'many' is not a number",),
         lambda w: ["train", *DATA[:1], "data.manifest.path=words.jsonl", *DATA_OPTIONS],
         lambda w: w.write_jsonl("words.jsonl", [{"prompt": "q", "target": t} for t in [20.0, "many", *TARGETS[2:]]])),
    Case("data-empty-given-split", "data", "a split column that gives the test split no rows",
         ("the test split is empty (no row has 'split' = 'test')",),
         lambda w: ["train", *DATA[:1], "data.manifest.path=splits.jsonl", *DATA_OPTIONS],
         lambda w: w.write_jsonl("splits.jsonl", [{"prompt": "q", "target": t, "split": ("train", "val")[i % 2]}
                                                 for i, t in enumerate(TARGETS)])),
    Case("data-empty-dir-split", "data", "too few samples per label bin for the DIR protocol to cut val/test",
         ("the val split is empty; lower data.max_per_label",),
         lambda w: ["train", *DATA[:1], "data.manifest.path=sparse.jsonl", *DATA_OPTIONS],
         lambda w: w.write_jsonl("sparse.jsonl", [{"prompt": "q", "target": t} for t in (10.0, 20.0, 30.0, 40.0)])),
    Case("data-missing-image", "data", "a missing image, rebuilding with `--force` (the earlier build untouched)",
         ("row 3 (line 4): image file not found:",), rebuild_images(),
         lambda w: (built_image_dataset(w), (w.home / "images" / "3.png").unlink())),
    Case("data-corrupt-image", "data", "a corrupt image, rebuilding with `--force` (the earlier build untouched)",
         ("row 3 (line 4): unreadable image",), rebuild_images(),
         lambda w: (built_image_dataset(w), w.write("images/3.png", b"\x89PNG\r\n\x1a\n not really a png"))),
    Case("data-images-text-model", "data", "a dataset of images with a text-only model",
         ("dataset 'manifest' has images but model.source='tiny' is text-only",),
         train(data=IMAGES), image_manifest),
    Case("data-build-bad-value", "data", "`orchestrator data build movies train_size=lots`",
         ("data.train_size: Input should be a valid integer",),
         lambda w: ["data", "build", "movies", "train_size=lots"]),
    # ---- models
    Case("model-missing-path", "model", "a model directory that does not exist",
         ("model path './no-such-model' does not exist",), train("model.source=./no-such-model")),
    Case("model-no-config", "model", "a directory without config.json",
         ("has no config.json; expected a Hugging Face model directory",), train("model.source=./m"),
         model_dir("m", config=None)),
    Case("model-config-not-json", "model", "a config.json that is not JSON",
         ("config.json is not readable JSON",), train("model.source=./m"), model_dir("m", config="{not json")),
    Case("model-no-model-type", "model", "a config.json without `model_type`",
         ("config.json names no model_type",), train("model.source=./m"), model_dir("m", config={"hidden_size": 16})),
    Case("model-not-causal-lm", "model", "a model that is not a causal LM (a T5 encoder-decoder)",
         ("holds a 't5' model, which is not a causal language model",), train("model.source=./m"),
         model_dir("m", config={"model_type": "t5", "d_model": 16})),
    Case("model-remote-code", "model", "an architecture that needs its own code, `trust_remote_code` off",
         ("model_type 'my-arch' is unknown to transformers (it ships its own code; set model.trust_remote_code=true "
          "only if you trust it)",), train("model.source=./m"),
         model_dir("m", config={"model_type": "my-arch", "auto_map": {"AutoModelForCausalLM": "modeling.MyLM"}})),
    Case("model-no-weights", "model", "a model directory without weights",
         ("has no weights: none of model.safetensors",), train("model.source=./m"), model_dir("m", weights=False)),
    Case("model-no-tokenizer", "model", "a model directory without a tokenizer",
         ("cannot load a tokenizer from",), train("model.source=./m"), model_dir("m", tokenizer=None)),
    Case("model-tokenizer-merges-digits", "model", "a tokenizer that does not split numbers into digits",
         ("tokenizer does not split numbers into single-digit tokens",), train("model.source=./m"),
         model_dir("m", tokenizer="merging")),
    Case("model-text-checkpoint-on-images", "model", "a text-only checkpoint on a dataset of images",
         ("has images but model.source='./m' is text-only",), train("model.source=./m", data=IMAGES),
         both(model_dir("m"), image_manifest)),
    # ---- command line
    Case("cli-unknown-command", "cli", "an unknown subcommand (`orchestrator frobnicate`)",
         ("invalid choice: 'frobnicate'",), lambda w: ["frobnicate"]),
    Case("cli-unknown-flag", "cli", "an unknown flag (`orchestrator train --bogus`)",
         ("unrecognized arguments: --bogus",), lambda w: ["train", "--bogus"]),
    Case("cli-stray-argument", "cli", "a stray argument after a flag (`sweep abl.yaml --dry-run junk`)",
         ("unrecognized arguments: junk",), lambda w: ["sweep", "abl.yaml", "--dry-run", "junk"]),
    Case("cli-bad-flag-value", "cli", "a flag value of the wrong type (`orchestrator ui --port http`)",
         ("argument --port: invalid int value: 'http'",), lambda w: ["ui", "--port", "http"]),
    Case("cli-missing-argument", "cli", "a missing argument (`orchestrator data build`)",
         ("the following arguments are required: name",), lambda w: ["data", "build"]),
    Case("cli-missing-config", "cli", "a config file that does not exist",
         ("config file not found: missing.yaml",), lambda w: ["train", "missing.yaml"]),
    Case("cli-missing-spool", "cli", "`orchestrator resend` of a file that does not exist",
         ("no spool file at missing.jsonl",), lambda w: ["resend", "missing.jsonl"]),
    Case("cli-unknown-experiment", "cli", "`orchestrator tables` for an experiment the store lacks",
         ("no experiment named 'nope'",), lambda w: ["tables", "nope"]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused_before_compute(case: Case, world: World, capsys):
    if case.setup is not None:
        case.setup(world)
    before = world.snapshot()
    capsys.readouterr()  # what the setup printed
    status = run_cli(case.argv(world))
    err = capsys.readouterr().err
    assert status == case.status, err
    for fragment in case.says:
        assert fragment in err, f"expected {fragment!r} in:\n{err}"
    assert "Traceback" not in err
    world.assert_untouched(before)


def test_the_same_world_with_good_input_passes_every_check(world):
    """The control: what the cases break is all that is wrong with them (the home, data and a local model
    directory themselves are fine)."""
    from orchestrator.runtime.preflight import prepare_run

    model_dir("m")(world)
    prepared = prepare_run(load_run_config(overrides=[*DATA, "model.source=./m"]))
    assert prepared.model_source == str(world.home / "m") and prepared.dataset.meta["sizes"]["test"] == 7


def test_the_safety_net_a_failure_after_the_run_exists_marks_it_failed_never_running(world):
    """Had a case reached compute, `run_training` finds the earlier FAILED run (same run key), resumes it,
    and on the failure marks it FAILED again with the error as a tag: no run is ever left RUNNING."""
    from mlflow import MlflowClient

    from orchestrator.runtime.driver import run_training

    # Ray up and the cluster checked: the next step, after the run exists, is where the compute starts.
    world.monkeypatch.setattr("orchestrator.runtime.driver.init_ray", lambda **kwargs: None)
    world.monkeypatch.setattr("orchestrator.runtime.driver.cluster_spans_nodes", lambda cfg: False)

    def no_compute(*args, **kwargs):
        raise ComputeStarted("a bad input reached compute: the workers were about to start")

    world.monkeypatch.setattr("orchestrator.runtime.driver.fit_workers", no_compute)
    with pytest.raises(Exception, match="a bad input reached compute"):  # as raised, or wrapped with the run's name
        run_training(load_run_config(overrides=DATA))
    runs = MlflowClient(f"sqlite:///{world.db}").search_runs(["1"])  # experiment `orchestrator`
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "a bad input reached compute: the workers were about to start" in runs[0].data.tags["orchestrator.error"]
    assert runs[0].data.tags["orchestrator.resumed"] == "true"  # the earlier run, not a second one


def test_the_store_check_sees_a_run_left_running(world):
    """The harness itself: a RUNNING run or a changed store is caught (so a passing case means something)."""
    before = world.snapshot()
    with closing(sqlite3.connect(world.db)) as con, con:
        con.execute("UPDATE runs SET status = 'RUNNING'")
    with pytest.raises(AssertionError, match="left RUNNING"):
        world.assert_untouched(before)
    world.write("results/run/earlier_metrics.json", "overwritten")
    with pytest.raises(AssertionError, match="changed or removed"):
        world.assert_untouched(before)


# --------------------------------------------------------------------------- model outputs


@dataclass(frozen=True)
class OutputCase:
    id: str
    feeds: str  # README text
    text: object
    parsed: float | None  # None: a parse failure

    def line(self) -> str:
        outcome = "a parse failure" if self.parsed is None else f"reads {self.parsed:g}"
        return f"{self.feeds} → {outcome}"


OUTPUT_CASES = [
    OutputCase("output-empty", "an empty completion", "", None),
    OutputCase("output-no-block", "text without an `<answer>` block", "I think it is about 42.", None),
    OutputCase("output-empty-block", "an empty block `<answer></answer>`", "<answer></answer>", None),
    OutputCase("output-non-numeric", "a non-numeric answer `<answer>high</answer>`", "<answer>high</answer>", None),
    OutputCase("output-unclosed", "an unclosed block `<answer>42`", "<answer>42", None),
    OutputCase("output-huge-digits", "a 400-digit number (overflows a float)",
               "<answer>" + "9" * 400 + "</answer>", None),
    OutputCase("output-huge-exponent", "`<answer>1e999</answer>`", "<answer>1e999</answer>", None),
    OutputCase("output-nan", "`<answer>NaN</answer>`", "<answer>NaN</answer>", None),
    OutputCase("output-inf", "`<answer>-inf</answer>`", "<answer>-inf</answer>", None),
    OutputCase("output-not-text", "a completion that is not text (`None`, bytes)", None, None),
    OutputCase("output-long-garbage", "90,000 characters of unclosed `<answer>` tags", "<answer>x" * 10000, None),
    OutputCase("output-several-blocks", "several answers: the last block counts (METHODS §1)",
               "<answer>12</answer> no, <answer>34</answer>", 34.0),
    OutputCase("output-several-numbers", "several numbers in one block: the first counts",
               "<answer>12 or 34</answer>", 12.0),
]


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=lambda c: c.id)
def test_malformed_output_is_a_counted_parse_failure_never_an_exception(case: OutputCase):
    assert parse_answer(case.text) == case.parsed
    if case.id == "output-not-text":
        assert parse_answer(b"<answer>42</answer>") is None
    for policy in PARSE_POLICIES:
        metrics, parsed = evaluate_texts(
            [case.text, "<answer>30</answer>"], [20.0, 30.0], np.array(TARGETS), label_step=1.0, many=6, few=3,
            policy=policy, label_min=20.0, label_max=50.0,
        )
        assert parsed == [case.parsed, 30.0]
        assert metrics["all/parse_fail_rate"] == (0.5 if case.parsed is None else 0.0)
        assert metrics["all/count"] == (1.0 if policy == "exclude" and case.parsed is None else 2.0)


def test_the_parser_reads_the_blocks_the_documented_pattern_reads():
    """parse_answer scans for blocks in linear time; it must agree with `<answer>(.*?)</answer>` (the
    documented grammar) on any tag soup."""
    import random

    from orchestrator.methods.answers import ANSWER_RE, NUMBER_RE

    pieces = ["<answer>", "</answer>", "<answer", "answer>", "</answer", "7", "2.5", "-1e3", " ", "x", "\n"]
    rng = random.Random(6)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        blocks = ANSWER_RE.findall(text)
        number = NUMBER_RE.search(blocks[-1]) if blocks else None
        assert parse_answer(text) == (float(number.group()) if number else None), text
    # a regex would retry from every unclosed tag (quadratic, many seconds on this input); the scan is linear
    assert parse_answer("<answer>x" * 10000 + "<answer>5</answer>") == 5.0


def test_a_batch_of_nothing_but_failures_still_gives_metrics():
    texts = [c.text for c in OUTPUT_CASES if c.parsed is None]
    for policy in PARSE_POLICIES:
        metrics, _ = evaluate_texts(texts, [20.0] * len(texts), np.array(TARGETS), label_step=1.0, many=6, few=3,
                                    policy=policy, label_min=20.0, label_max=50.0)
        assert metrics["all/parse_fail_rate"] == 1.0
        if policy == "penalty":  # each failure counts as the range end farthest from the target: 50 for 20
            assert metrics["all/mae"] == 30.0
        elif policy == "exclude":  # nothing left to score: NaN, not an exception
            assert metrics["all/count"] == 0.0 and np.isnan(metrics["all/mae"])
        else:  # random: uniform over the label range
            assert 0.0 <= metrics["all/mae"] <= 30.0


# --------------------------------------------------------------------------- the README section


def test_every_case_is_named_once_and_says_something_specific():
    ids = [c.id for c in CASES] + [c.id for c in OUTPUT_CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 30
    assert all(c.area in AREAS for c in CASES)
    # a fragment such as "error" or "invalid" would pass for any failure
    assert all(len(c.says[0]) >= 18 for c in CASES), [c.id for c in CASES if len(c.says[0]) < 18]


def test_readme_reliability_section_is_rendered_from_the_tables():
    from render_reliability import readme_section, render_section

    expected = render_section()
    actual = readme_section()
    if actual != expected:
        print(expected)  # paste between the markers, or run: .venv/bin/python tests/render_reliability.py --write
    assert actual == expected, (
        "README.md's Reliability section is stale: run `python tests/render_reliability.py --write`"
    )
