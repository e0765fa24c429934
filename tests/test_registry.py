"""Method registries: names a config can hold, refused duplicates, parameter sections."""

import pytest
from pydantic import Field

from orchestrator.config import GRPOStage, SFTStage, load_run_config
from orchestrator.config.base import ConfigError
from orchestrator.methods.grpo import ADVANTAGE_SCALINGS, KL_ESTIMATORS, LOSS_AGGREGATIONS
from orchestrator.methods.objectives import SFT_OBJECTIVES
from orchestrator.methods.registry import MethodParams, Registry
from orchestrator.methods.rewards import REWARDS
from orchestrator.methods.schedules import LR_SCHEDULES


class Width(MethodParams):
    width: int = Field(3, description="A width.")


class Height(MethodParams):
    height: int = Field(4, description="A height.")


def test_a_name_is_registered_once_and_unknown_names_list_the_allowed_ones():
    shapes = Registry("shape")
    shapes.register("square", params=Width, source="geometry")(lambda: "square")
    with pytest.raises(ValueError, match="shape 'square' is registered twice"):
        shapes.register("square")(lambda: "other")
    shapes.register("box", params=Height)(lambda: "box")
    assert shapes.names() == ("square", "box") and "box" in shapes and "ball" not in shapes
    assert shapes["square"]() == "square" and shapes.entry("square").source == "geometry"
    with pytest.raises(ValueError, match="unknown shape 'ball'; allowed: square, box"):
        shapes["ball"]


def test_parameter_sections_fill_from_a_stage_and_may_not_share_a_field():
    shapes = Registry("shape")
    shapes.register("square", params=Width)(object)
    shapes.register("plain")(object)
    assert shapes.param_sections() == (Width,)

    class Settings:
        width = 7

    assert shapes.params_of("square", Settings()).width == 7
    assert shapes.params_of("square", None).width == 3  # no settings: the section's defaults
    assert shapes.params_of("plain", Settings()) is None
    shapes.register("wide", params=type("Wide", (MethodParams,), {"__annotations__": {"width": int}}))(object)
    with pytest.raises(ValueError, match="'wide' and 'square' both declare the parameter 'width'"):
        shapes.param_sections()


def test_the_config_takes_its_names_and_parameters_from_the_registries():
    assert SFTStage.model_fields["loss"].annotation.__args__ == SFT_OBJECTIVES.names()
    assert GRPOStage.model_fields["kl_estimator"].annotation.__args__ == KL_ESTIMATORS.names() == ("k1", "k2", "k3")
    assert GRPOStage.model_fields["scale_rewards"].annotation.__args__ == ADVANTAGE_SCALINGS.names()
    assert GRPOStage.model_fields["loss_aggregation"].annotation.__args__ == LOSS_AGGREGATIONS.names()
    assert SFTStage.model_fields["lr_schedule"].annotation.__args__ == LR_SCHEDULES.names()
    for section in SFT_OBJECTIVES.param_sections():
        assert set(section.model_fields) <= set(SFTStage.model_fields)
    for section in REWARDS.param_sections():
        assert set(section.model_fields) <= set(GRPOStage.model_fields)
    # every entry's name appears in its field's description
    for entry in SFT_OBJECTIVES:
        assert entry.name in SFTStage.model_fields["loss"].description


def test_scale_rewards_reads_the_old_switch_and_refuses_unknown_names():
    assert GRPOStage(scale_rewards=True).scale_rewards == "group"
    assert GRPOStage(scale_rewards=False).scale_rewards == "none"
    cfg = load_run_config(overrides=["pipeline=grpo:ccc", "pipeline.0.scale_rewards=none"])
    assert cfg.pipeline[0].scale_rewards == "none"
    with pytest.raises(ConfigError, match="scale_rewards: Input should be 'group' or 'none'"):
        load_run_config(overrides=["pipeline=grpo:ccc", "pipeline.0.scale_rewards=batchy"])


def test_an_objective_that_answers_through_a_head_must_end_the_pipeline():
    assert load_run_config(overrides=["pipeline=sft:ce -> sft:rvtc"]).pipeline[-1].answers_through_head()
    with pytest.raises(ConfigError, match="sft:rvtc must be the last stage, but grpo:ccc follows it"):
        load_run_config(overrides=["pipeline=sft:rvtc -> grpo:ccc"])
