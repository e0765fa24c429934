"""Checks the driver makes before any worker starts, and path resolution."""

import pytest

from orchestrator.config import ConfigError, load_run_config, resolve_path
from orchestrator.modeling.models import build_digit_tokenizer
from orchestrator.runtime.preflight import answer_token_length, check_generation_budgets
from orchestrator.runtime.ray_setup import WORKER_MALLOC_TUNABLES, worker_env_vars


def test_answer_token_length_with_the_digit_tokenizer():
    tok = build_digit_tokenizer()
    # "<answer>100</answer>" is 20 characters, one token each, plus end of turn
    assert answer_token_length(tok, 10, 100) == 21
    # "-5" is longer than "3": the label range end with more characters decides
    assert answer_token_length(tok, -5, 3) == len("<answer>-5</answer>") + 1
    # a label step of 0.5 writes one decimal: "<answer>10.0</answer>"
    assert answer_token_length(tok, 0, 10, label_step=0.5) == len("<answer>10.0</answer>") + 1
    assert answer_token_length(tok, 0, 10, label_step=500) == len("<answer>10</answer>") + 1


def test_generation_budget_too_small_is_refused_naming_the_field():
    tok = build_digit_tokenizer()
    check_generation_budgets(load_run_config(overrides=["eval.max_new_tokens=21"]), tok, 10, 100)
    too_short = r"eval.max_new_tokens=14 cannot hold the answer '<answer>100</answer>'.*>=21"
    with pytest.raises(ConfigError, match=too_short):
        check_generation_budgets(load_run_config(overrides=["eval.max_new_tokens=14"]), tok, 10, 100)
    with pytest.raises(ConfigError, match=r"'<answer>100.0</answer>'.*>=23"):  # label step 0.5: one decimal
        check_generation_budgets(load_run_config(overrides=["eval.max_new_tokens=21"]), tok, 10, 100, label_step=0.5)
    cfg = load_run_config(overrides=["pipeline=sft:ce -> grpo:ccc", "pipeline.1.max_new_tokens=8"])
    with pytest.raises(ConfigError, match=r"pipeline.1.max_new_tokens=8"):
        check_generation_budgets(cfg, tok, 10, 100)


def test_worker_environment_keeps_freed_memory_unless_the_user_chose_malloc_settings():
    env = worker_env_vars({})
    assert env["OMP_NUM_THREADS"] == "1" and env["GLIBC_TUNABLES"] == WORKER_MALLOC_TUNABLES
    # large blocks stay in one heap, not unmapped on free, whichever thread allocates them
    assert {"glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0"} <= set(WORKER_MALLOC_TUNABLES.split(":"))
    # the user's own GLIBC_TUNABLES is not overridden: workers inherit it
    assert "GLIBC_TUNABLES" not in worker_env_vars({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})


def test_relative_paths_follow_orchestrator_home(tmp_path, monkeypatch):
    monkeypatch.delenv("ORCHESTRATOR_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_path("data") == tmp_path / "data"
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path / "home"))
    assert resolve_path("results") == tmp_path / "home" / "results"
    assert resolve_path("/abs/x") == resolve_path("/abs/x").resolve()


def test_unknown_or_unimportable_rewards_are_refused_before_compute():
    from orchestrator.runtime.preflight import check_rewards

    check_rewards(load_run_config(overrides=["pipeline=sft:ce -> grpo:ccc+format"]))
    check_rewards(load_run_config(overrides=["pipeline=grpo:tests.custom_rewards:brevity"]))
    with pytest.raises(ConfigError, match=r"pipeline.1.rewards.1.name: unknown reward 'cc'"):
        check_rewards(load_run_config(overrides=["pipeline=sft:ce -> grpo:ccc+cc"]))
    with pytest.raises(ConfigError, match=r"pipeline.0.rewards.0.name: cannot import reward 'no_such_mod:fn'"):
        check_rewards(load_run_config(overrides=["pipeline=grpo:no_such_mod:fn"]))


def test_storage_uris_pass_through_and_paths_resolve(tmp_path, monkeypatch):
    from orchestrator.config import resolve_storage

    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path))
    assert resolve_storage("s3://bucket/results") == "s3://bucket/results"
    assert resolve_storage("gs://b/r") == "gs://b/r"
    assert resolve_storage("results") == str(tmp_path / "results")
