"""Method registries: names a config can hold, refused duplicates, parameter sections."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import Field

from orchestrator.config import GRPOStage, SFTStage, load_run_config
from orchestrator.config.base import ConfigError
from orchestrator.methods.grpo import (
    ADVANTAGE_BASELINES,
    ADVANTAGE_SCALINGS,
    IMPORTANCE_RATIOS,
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    REWARD_COMBINATIONS,
)
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
    for field, registry in (("advantage_baseline", ADVANTAGE_BASELINES), ("reward_combination", REWARD_COMBINATIONS),
                            ("importance_ratio", IMPORTANCE_RATIOS), ("kl_control", KL_CONTROLLERS)):
        assert GRPOStage.model_fields[field].annotation.__args__ == registry.names()
        assert all(entry.name in GRPOStage.model_fields[field].description for entry in registry)
    for section in KL_CONTROLLERS.param_sections():
        assert set(section.model_fields) <= set(GRPOStage.model_fields)
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
    with pytest.raises(ConfigError, match="scale_rewards: Input should be 'group', 'batch' or 'none'"):
        load_run_config(overrides=["pipeline=grpo:ccc", "pipeline.0.scale_rewards=batchy"])


def test_an_objective_that_answers_through_a_head_must_end_the_pipeline():
    assert load_run_config(overrides=["pipeline=sft:ce -> sft:rvtc"]).pipeline[-1].answers_through_head()
    with pytest.raises(ConfigError, match="sft:rvtc must be the last stage, but grpo:ccc follows it"):
        load_run_config(overrides=["pipeline=sft:rvtc -> grpo:ccc"])


def readme_example(tag: str) -> str:
    """The Python block that follows `<!-- example:TAG -->` in the README."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = text.split(f"<!-- example:{tag} -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_adds_an_objective_with_one_file(tmp_path):
    """The README's focal loss, saved as one file in (a copy of) the objectives folder, becomes `sft:focal`
    with a documented, validated `focal_gamma`; its loss is checked by hand."""
    package = tmp_path / "orchestrator"
    shutil.copytree(Path(__file__).resolve().parents[1] / "orchestrator", package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (package / "methods" / "objectives" / "focal.py").write_text(readme_example("focal"))
    code = textwrap.dedent('''
        import math, torch
        from orchestrator.config import ConfigError, SFTStage, load_run_config
        from orchestrator.methods.objectives.base import build_objective
        cfg = load_run_config(overrides=["pipeline=sft:ce -> sft:focal", "pipeline.1.focal_gamma=2"])
        stage = cfg.pipeline[1]
        assert stage.label() == "sft:focal" and "Lin et al. 2017" in SFTStage.model_fields["focal_gamma"].description
        digits = torch.arange(2, 12)
        objective = build_objective(stage, digits)
        # token 3 at p = 1/2 (two equal logits), token 5 at p = 1/4, one ignored position
        probs = torch.tensor([[1.0, 0, 0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
        logits = torch.log(probs.clamp(min=1e-30))
        logits = torch.cat([logits, torch.full((3, 8), -1e9)], 1)
        loss, n = objective.loss(logits, torch.tensor([3, 1, -100]), digits)
        expected = -(0.5 ** 2 * math.log(0.5) + 0.75 ** 2 * math.log(0.25))
        assert abs(loss.item() - expected) < 1e-5 and n.item() == 2, (loss.item(), expected)
        try:
            load_run_config(overrides=["pipeline=sft:focal", "pipeline.0.focal_gamma=-1"])
        except ConfigError as exc:
            assert "focal_gamma: Input should be greater than or equal to 0" in str(exc)
        else:
            raise AssertionError("a negative gamma was accepted")
        print("ok")
    ''')
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
