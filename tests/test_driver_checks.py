"""Checks the driver makes before any worker starts, and path resolution."""

import pytest

from orchestrator.config import ConfigError, load_run_config, resolve_path
from orchestrator.models import build_digit_tokenizer
from orchestrator.train import answer_token_length, check_generation_budgets


def test_answer_token_length_with_the_digit_tokenizer():
    tok = build_digit_tokenizer()
    # "<answer>100</answer>" is 20 characters, one token each, plus end of turn
    assert answer_token_length(tok, 10, 100) == 21
    # "-5" is longer than "3": the label range end with more characters decides
    assert answer_token_length(tok, -5, 3) == len("<answer>-5</answer>") + 1


def test_generation_budget_too_small_is_refused_naming_the_field():
    tok = build_digit_tokenizer()
    check_generation_budgets(load_run_config(overrides=["eval.max_new_tokens=21"]), tok, 10, 100)
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens=14 cannot hold the answer '<answer>100</answer>'.*>=21"):
        check_generation_budgets(load_run_config(overrides=["eval.max_new_tokens=14"]), tok, 10, 100)
    cfg = load_run_config(overrides=["pipeline=sft:ce -> grpo:ccc", "pipeline.1.max_new_tokens=8"])
    with pytest.raises(ConfigError, match=r"pipeline.1.max_new_tokens=8"):
        check_generation_budgets(cfg, tok, 10, 100)


def test_relative_paths_follow_orchestrator_home(tmp_path, monkeypatch):
    monkeypatch.delenv("ORCHESTRATOR_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_path("data") == tmp_path / "data"
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path / "home"))
    assert resolve_path("results") == tmp_path / "home" / "results"
    assert resolve_path("/abs/x") == resolve_path("/abs/x").resolve()
