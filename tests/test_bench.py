"""The bench's pure parts against hand-computed values: rates, ratios, FLOP/s, Markdown, the README
section, grid-overhead arithmetic, and bad input refused before any compute. No TRL, no Ray."""

from __future__ import annotations

import math

import pytest

from orchestrator import bench
from orchestrator.bench import (
    README_END,
    README_START,
    BenchError,
    batch_tokens,
    grid_overhead,
    matmul_flops_per_s,
    ratio,
    render_grid,
    render_markdown,
    replace_readme_section,
    step_rates,
    train_flops_per_s,
    windows_to_totals,
)
from orchestrator.bench.run import grad_average_text
from orchestrator.cli import main


def test_ratio():
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(None, 2.0))
    assert math.isnan(ratio(1.0, float("nan")))


def test_flops_arithmetic():
    # 6 * 1,000 params * 50 tokens/s = 300,000 FLOP/s
    assert train_flops_per_s(1000, 50.0) == 300_000.0
    # 1024^3 * 2 = 2,147,483,648 FLOPs in 0.5 s
    assert matmul_flops_per_s(1024, 0.5) == 4_294_967_296.0
    assert ratio(train_flops_per_s(1000, 50.0), matmul_flops_per_s(10, 0.002)) == 300_000.0 / 1_000_000.0


def test_windows_to_totals():
    # two windows of 40 samples: at 20 samples/s (2 s, 100 tokens/s -> 200 tokens) and 40 samples/s
    # (1 s, 300 tokens/s -> 300 tokens): 80 samples, 500 tokens, 3 s; 80/3 samples/s, not the mean 30
    samples, tokens, seconds = windows_to_totals([(20.0, 100.0), (40.0, 300.0)], 40)
    assert (samples, tokens, seconds) == (80.0, 500.0, 3.0)


def test_step_rates_drop_warmup():
    # 4 steps of 8 samples; the first (warm-up, 10 s) dropped; 3 steps in 1+1+2 = 4 s -> 24/4 = 6 samples/s
    r = step_rates([10.0, 1.0, 1.0, 2.0], 8, [999, 10, 20, 30], warmup=1)
    assert r["samples_per_s"] == 6.0
    assert r["tokens_per_s"] == 60 / 4
    assert r["step_s"] == 4 / 3
    assert r["steps"] == 3.0
    with pytest.raises(BenchError, match="no timed steps"):
        step_rates([1.0], 8, None, warmup=1)


def test_best_window_rate():
    # warm-up step dropped; windows of 2 steps: (1+1) -> 8 samples/s, (2+2) -> 4; the partial last ignored
    assert bench.best_window_rate([9.0, 1.0, 1.0, 2.0, 2.0, 0.1], 8, window=2, warmup=1) == 8.0
    assert math.isnan(bench.best_window_rate([1.0, 1.0], 8, window=2, warmup=1))


def test_batch_tokens_counts_like_the_sft_stage():
    # labels[1:] != -100 per row; processed = rows * longest row (right padding)
    examples = [([1, 2, 3, 4], [-100, -100, 3, 4]), ([1, 2], [-100, 2])]
    assert batch_tokens(examples) == (2 + 1, 2 * 4)


def _result(**over):
    result = {
        "mode": "quick",
        "when": "2026-01-01 00:00",
        "machine": "2 CPUs, test",
        "model": "tiny",
        "settings": {"workers": 1, "cpus_per_worker": 2.0, "threads": 2},
        "sft": {"describe": "100 steps", "project": {"samples_per_s": 300.0, "tokens_per_s": 1500.0,
                                                     "best_window_samples_per_s": 330.0},
                "trl": {"samples_per_s": 100.0, "tokens_per_s": 500.0, "best_window_samples_per_s": 110.0}},
        "grpo": {"describe": "B=8", "project": {"samples_per_s": 20.0, "tokens_per_s": 400.0, "step_s": 1.6,
                                                "phases": {"generation": 1.0, "reward": 0.1, "logprobs": 0.2,
                                                           "forward_backward": 0.2, "optimizer": 0.05}},
                 "trl": {"samples_per_s": 16.0, "tokens_per_s": 320.0, "step_s": 2.0}},
        "flops": {"peak": 1e11, "achieved": 2.5e9, "trl_achieved": 1e9, "params": 1000, "tokens_per_s": 5000.0,
                  "matmul_n": 1024, "repeats": 10},
        "notes": ["a note"],
    }
    result.update(over)
    return result


def test_render_markdown_rows_and_ratios():
    text = render_markdown(_result())
    assert "| SFT (100 steps) | 300.0 | 100.0 | 3.00 | 1,500 | 500 |" in text
    assert "| GRPO (B=8) | 20.0 | 16.0 | 1.25 | 400 | 320 |" in text
    assert "| generation | 1.0000 | 62.5% |" in text
    # other = 1.6 - 1.55 = 0.05 s = 3.1%
    assert "| other (batching, statistics, all-reduce) | 0.0500 | 3.1% |" in text
    assert "**2.50%**" in text  # 2.5 GFLOP/s of 100 GFLOP/s
    assert "2.50 GFLOP/s achieved" in text and "100.00 GFLOP/s" in text
    assert "TRL SFT on the same count: 1.00%" in text
    r = _result()
    r["flops"].update(best_achieved=5e9, trl_best_achieved=4e9)
    assert "At the best windows' rates: project 5.00%, TRL 4.00%." in render_markdown(r)
    assert "a note" in text
    assert "samples/s project vs TRL: SFT 330.0 vs 110.0 (ratio 3.00)." in text


def test_render_markdown_missing_values_show_dashes():
    r = _result()
    r["sft"]["trl"] = {}
    text = render_markdown(r)
    assert "| SFT (100 steps) | 300.0 | — | — | 1,500 | — |" in text


README = f"# title\n\nintro\n\n## Performance\n\n{README_START}\nold body\n{README_END}\n\n## Next\n\ntail\n"


def test_replace_readme_section_keeps_the_rest():
    out = replace_readme_section(README, "new body\n\n| a |\n")
    assert out == (f"# title\n\nintro\n\n## Performance\n\n{README_START}\nnew body\n\n| a |\n{README_END}"
                   "\n\n## Next\n\ntail\n")
    # idempotent
    assert replace_readme_section(out, "new body\n\n| a |\n") == out


@pytest.mark.parametrize("text", ["# no markers\n", f"{README_START}\nonly start\n", f"{README_END}\n{README_START}\n",
                                  f"{README_START}\n{README_END}\n{README_START}\n{README_END}\n"])
def test_replace_readme_section_refuses_bad_markers(text):
    with pytest.raises(BenchError):
        replace_readme_section(text, "body")


def test_grid_overhead_arithmetic():
    cells = {
        "a": {"time/train_s": 10.0, "time/eval_s": 2.0, "time/worker_start_s": 3.0, "time/model_load_s": 1.0,
              "time/generation_s": 99.0, "time/step_s": 99.0, "test/all/mae": 5.0},
        "b": {"time/train_s": 20.0, "time/eval_s": 4.0, "time/worker_start_s": 5.0, "time/driver_setup_s": 2.0},
    }
    g = grid_overhead(72.0, cells)
    assert g["compute_s"] == 36.0
    assert g["wall_over_compute"] == 2.0
    assert g["phases"] == {"worker_start": 8.0, "driver_setup": 2.0, "model_load": 1.0}  # per-step GRPO times left out
    assert g["overhead_s"] == 11.0
    assert g["shares"]["worker_start"] == 8.0 / 11.0
    assert g["missing"] == {}
    text = render_grid("s", g)
    assert "wall / compute: **2.00**" in text and "| worker_start | 8.00 | 72.7% |" in text


def test_grid_overhead_keeps_totals_apart_and_names_the_rest():
    cell = {"time/train_s": 10.0, "time/eval_s": 2.0, "time/worker_start_s": 3.0, "time/teardown_s": 1.0,
            "time/driver_ray_init_s": 2.0, "time/driver_fit_s": 15.0, "time/worker_total_s": 11.0,
            "time/driver_total_s": 20.0, "time/collectives_s": 0.5}
    g = grid_overhead(30.0, {"a": cell})
    assert g["compute_s"] == 12.0
    assert g["totals"] == {"driver_fit": 15.0, "worker_total": 11.0, "driver_total": 20.0}
    # driver_total 20 - named (10 + 2 + 3 + 1 + 2) = 2 s unnamed; collectives is per-step, left out
    assert g["phases"] == {"worker_start": 3.0, "driver_ray_init": 2.0, "unnamed (inside cells)": 2.0, "teardown": 1.0}
    assert g["overhead_s"] == 8.0


def test_grid_overhead_fit_without_worker_timings_stays_one_lump():
    cell = {"time/driver_prepare_s": 5.0, "time/driver_fit_s": 40.0, "time/driver_total_s": 46.0}
    g = grid_overhead(60.0, {"a": cell})
    assert g["phases"] == {bench.UNSPLIT_FIT: 40.0, "driver_prepare": 5.0, "unnamed (inside cells)": 1.0}
    assert g["missing"] == {"a": ["train", "eval"]}


def test_grid_overhead_reports_missing_timings():
    g = grid_overhead(50.0, {"a": {"time/generation_s": 1.0, "val/all/mae": 3.0}, "b": {"time/train_s": 5.0}})
    assert g["compute_s"] == 5.0
    assert g["missing"] == {"a": ["train", "eval"], "b": ["eval"]}
    assert g["phases"] == {}
    text = render_grid("s", g)
    assert "cannot be split" in text and "missing in 2 of 2 cells: time/eval_s, time/train_s" in text


def test_settings_and_bad_mode():
    s = bench.settings_for("quick", cpus=2)
    assert (s.workers, s.cpus_per_worker, s.threads) == (2, 1.0, 2)
    assert bench.settings_for("quick", workers=1, cpus=2).cpus_per_worker == 2.0
    assert bench.settings_for("quick", cpus=1).workers == 1
    assert s.sft_steps > s.sft_warmup and (s.sft_steps - s.sft_warmup) % s.sft_warmup == 0  # whole log windows
    assert s.grpo_steps > s.grpo_warmup and (s.grpo_steps - s.grpo_warmup) % s.grpo_warmup == 0
    with pytest.raises(BenchError, match="--workers"):
        bench.settings_for("quick", workers=3, cpus=2)
    full = bench.settings_for("full", cpus=2)  # SmolLM2: one worker, every CPU, ZeRO-0, the same global batch of 8
    assert (full.workers, full.cpus_per_worker, full.zero_stage) == (1, 2.0, 0)
    assert (full.sft_micro_batch, full.grpo_prompts) == (8, 8)
    assert bench.settings_for("full", workers=2, cpus=2).sft_micro_batch == 4
    with pytest.raises(BenchError, match="unknown bench mode 'fast'"):
        bench.settings_for("fast")
    assert bench.settings_for("quick", cpus=2, zero_stage=2).zero_stage == 2
    with pytest.raises(BenchError, match="--zero-stage must be 0, 1, 2 or 3, got 4"):
        bench.settings_for("quick", zero_stage=4)


def test_cli_bad_mode_exits_2_before_compute(capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("compute started"))
    assert main(["bench", "--mode", "fast"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown bench mode 'fast'" in err
    assert main(["bench", "--quick", "--zero-stage", "4"]) == 2
    assert "--zero-stage must be 0, 1, 2 or 3" in capsys.readouterr().err


def test_cli_trl_missing_exits_2_with_install_hint(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("compute started"))
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "TRL is not installed" in err and "make bench" in err and "pip install -e '.[bench]'" in err


def test_cli_write_readme_without_result_exits_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path))  # no results/bench/latest.md there
    assert main(["bench", "--write-readme"]) == 2
    assert "no bench result" in capsys.readouterr().err


def test_sft_step_indices_match_the_stage_order():
    from orchestrator.data.collate import micro_batch_indices

    order = bench.sft_step_indices(50, 7, steps=3, micro_batch=4, workers=2)
    assert len(order) == 3 and all(len(step) == 2 and all(len(r) == 4 for r in step) for step in order)
    assert order[2][1] == micro_batch_indices(50, 7, 2, 0, 1, 1, 2, 4).tolist()


def test_trl_side_imports_when_installed():
    pytest.importorskip("trl")
    bench.check_trl()
    assert callable(bench.trl_sft) and callable(bench.trl_grpo)


def test_same_global_batch_moves_the_batch_onto_fewer_workers():
    s = bench.settings_for("quick", cpus=2)  # 2 workers x 1 CPU, SFT 16 and GRPO 8 prompts per worker
    one = bench.same_global_batch(s, 1, cpus=2)
    assert (one.workers, one.cpus_per_worker, one.sft_micro_batch, one.grpo_prompts) == (1, 2.0, 32, 16)
    assert one.zero_stage == s.zero_stage == 0  # ZeRO-0 at every worker count (over gloo the fastest)
    assert one.sft_steps == s.sft_steps and one.grpo_group == s.grpo_group
    assert bench.same_global_batch(s, 2, cpus=2) == s
    with pytest.raises(BenchError, match="does not split evenly over 3 workers"):
        bench.same_global_batch(s, 3, cpus=4)
    with pytest.raises(BenchError, match="between 1 and the 2 CPUs"):
        bench.same_global_batch(s, 4, cpus=2)


def scaling_run(workers: int, sft_step_s: float, grpo_step_s: float) -> dict:
    return {"workers": workers, "cpus_per_worker": 2.0 / workers,
            "sft_step_s": sft_step_s, "sft_samples_per_s": 8 / sft_step_s,
            "grpo_step_s": grpo_step_s, "grpo_samples_per_s": 32 / grpo_step_s,
            "grpo_phases": {"generation": grpo_step_s / 2, "forward_backward": grpo_step_s / 4}}


def scaling_result():
    return {"mode": "full", "when": "2026-11-23 08:00", "machine": "2 CPUs", "model": "smollm2-135m, `movies` data",
            "zero_stage": 2, "sft_global": 8, "grpo_global": 8, "grpo_group": 4,
            "runs": [scaling_run(1, 4.0, 10.0), scaling_run(2, 3.0, 12.5)], "notes": ["load fine"]}


def test_render_scaling_rows_and_ratios():
    text = bench.render_scaling(scaling_result())
    assert "| 1 × 2, ZeRO-2 | 4.000 | 2.0 | 10.000 | 3.2 |" in text  # rows without their own stage: the result's
    assert "| 2 × 1, ZeRO-2 | 3.000 | 2.7 | 12.500 | 2.6 |" in text
    assert "| **ratio 2/1** | **0.75** | | **1.25** | |" in text  # SFT faster on 2 workers, GRPO slower
    assert "| 1 | 5.0000 | 2.5000 |" in text and text.rstrip().endswith("load fine")


def test_scaling_rounds_alternate_their_order():
    assert bench.scaling_order(2, 1) == [1, 2]
    assert bench.scaling_order(2, 3) == [1, 2, 2, 1, 1, 2]


def test_render_scaling_over_rounds_gives_the_ratio_of_means_and_each_rounds():
    result = scaling_result()
    result["runs"] = [dict(scaling_run(1, 4.0, 10.0), round=1), dict(scaling_run(2, 3.0, 12.5), round=1),
                      dict(scaling_run(2, 5.0, 9.5), round=2), dict(scaling_run(1, 6.0, 10.0), round=2)]
    text = bench.render_scaling(result)
    assert "--scaling --full --rounds 2`" in text and "in the order 1, 2, 2, 1 workers" in text
    assert "| 2 × 1, ZeRO-2, round 2 | 5.000 | 1.6 | 9.500 | 3.4 |" in text
    assert "| **ratio 2/1** | **0.80** | | **1.10** | |" in text  # (3 + 5) / (4 + 6); (12.5 + 9.5) / 20
    assert "Ratio in each round: SFT 0.75, 0.83; GRPO 1.25, 0.95." in text
    assert "| 1, round 2 | 5.0000 | 2.5000 |" in text


def test_readme_body_takes_every_result_in_order(tmp_path):
    with pytest.raises(BenchError, match="no bench result"):
        bench.readme_body(tmp_path)
    bench.write_result(scaling_result(), tmp_path, "scaling-")
    (tmp_path / "quick.md").write_text("QUICK\n")
    body = bench.readme_body(tmp_path)
    assert body.index("QUICK") < body.index("**ratio 2/1**")
    assert "#### Against TRL, quick mode" in body and "full mode (`orchestrator bench --full`)" not in body
    assert (tmp_path / "latest.md").read_text() == (tmp_path / "scaling-full.md").read_text()


def test_cli_scaling_needs_two_workers(capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_scaling", lambda *a, **k: pytest.fail("compute started"))
    assert main(["bench", "--scaling", "--workers", "1"]) == 2
    assert "--scaling compares 1 worker with several" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "--quick", "--rounds", "2"], "--rounds repeats the --scaling runs; give --scaling too"),
    (["bench", "--scaling", "--rounds", "0"], "--rounds must be 1 or more, got 0"),
])
def test_cli_rounds_only_with_scaling_and_at_least_one(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_scaling", lambda *a, **k: pytest.fail("compute started"))
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("compute started"))
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_grad_average_text_names_the_runs_method_only_for_several_workers():
    text = grad_average_text({"grad_average": "shared memory"}, 2)
    assert "2 workers average their gradients (shared memory)" in text and text.endswith("; ")
    assert grad_average_text({"grad_average": "shared memory"}, 1) == ""
    assert grad_average_text({}, 2) == ""  # a run without the tag


def test_better_peak_keeps_the_faster_measurement_and_counts_every_repeat():
    from orchestrator.bench.machine import better_peak

    before = {"peak": 5e9, "matmul_n": 1024, "repeats": 10}
    assert better_peak(before, {"peak": 7e9, "matmul_n": 1024, "repeats": 10}) == {
        "peak": 7e9, "matmul_n": 1024, "repeats": 20}
    assert better_peak(before, {"peak": 4e9, "matmul_n": 1024, "repeats": 3})["peak"] == 5e9


def test_timed_sft_tokens_count_only_the_steps_after_warmup(monkeypatch):
    import dataclasses
    from types import SimpleNamespace

    from orchestrator.bench import workload

    # example i: i + 2 ids, one supervised label per example past the first position
    examples = [(list(range(i + 2)), [-100] * (i + 1) + [7]) for i in range(12)]
    monkeypatch.setattr(workload, "encoded_train", lambda cfg, source: (None, None, examples))
    s = dataclasses.replace(bench.settings_for("quick", cpus=2), sft_steps=3, sft_warmup=1, sft_micro_batch=2)
    order = bench.sft_step_indices(12, 5, steps=3, micro_batch=2, workers=2)
    timed = [batch_tokens([examples[i] for i in rank]) for step in order[1:] for rank in step]
    expected = (sum(t[0] for t in timed), sum(t[1] for t in timed))
    assert expected[0] == 2 * 2 * 2  # 2 timed steps x 2 ranks x 2 samples, one supervised token each
    assert workload.timed_sft_tokens(s, SimpleNamespace(seed=5), "src") == expected


def test_package_import_is_light_and_the_trl_entry_point_answers():
    import subprocess
    import sys

    code = ("import sys, orchestrator.bench; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'trl', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    usage = subprocess.run([sys.executable, "-m", "orchestrator.bench"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: orchestrator bench" in usage.stderr
