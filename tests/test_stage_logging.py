"""How often each stage logs its train metrics (and rank 0 prints its progress line): by default 20 points
a stage, whatever its length; tracking.log_every sets one interval for every stage, a stage's own
log_every wins over both."""

import pytest

from orchestrator.config import load_run_config
from orchestrator.stages.context import StageContext


def logged_steps(*overrides: str) -> list[list[int]]:
    """The steps after which each stage of the run logs."""
    cfg = load_run_config(overrides=["pipeline=sft:ce -> grpo:ccc", "pipeline.0.steps=1000",
                                     "pipeline.1.steps=40", *overrides])
    out = []
    for index, stage in enumerate(cfg.pipeline):
        ctx = StageContext(cfg=cfg, model=None, tokenizer=None, digit_token_ids=None, dataset=None, rank=0,
                           world_size=1, device=None, stage_index=index, global_step_offset=0, log=None,
                           checkpoint=None)
        out.append([done for done in range(1, stage.steps + 1) if ctx.log_due(done, stage.steps)])
    return out


def test_each_stage_logs_twenty_times_by_default():
    sft, grpo = logged_steps()
    assert sft == list(range(50, 1001, 50))  # every 1000 // 20 = 50 steps
    assert grpo == list(range(2, 41, 2))  # every 40 // 20 = 2 rollout steps, not once at the end


def test_short_stages_log_every_step_and_the_last_step_always():
    sft, grpo = logged_steps("pipeline.0.steps=7", "pipeline.1.steps=45")
    assert sft == [1, 2, 3, 4, 5, 6, 7]
    assert grpo == [*range(2, 45, 2), 45]  # 45 // 20 = 2, and the stage's end


@pytest.mark.parametrize("overrides, expected", [
    (["tracking.log_every=10"], ([*range(10, 1001, 10)], [10, 20, 30, 40])),  # one interval for every stage
    (["tracking.log_every=10", "pipeline.1.log_every=5"], ([*range(10, 1001, 10)], [5, 10, 15, 20, 25, 30, 35, 40])),
    (["stages.sft.log_every=500"], ([500, 1000], [*range(2, 41, 2)])),  # a stage's own; the other keeps the default
])
def test_a_set_interval_wins_over_the_default(overrides, expected):
    assert tuple(logged_steps(*overrides)) == expected
