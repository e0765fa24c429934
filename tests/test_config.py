import pytest

from orchestrator.config import ConfigError, RunConfig, apply_override, flatten, load_run_config, parse_pipeline


def test_defaults_validate():
    cfg = load_run_config()
    assert cfg.pipeline_label() == "sft:ce"
    assert cfg.deepspeed.zero_stage == 2


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: a\npipeline: sft:softlabel -> grpo:ccc\ndata: {train_size: 100}\n")
    cfg = load_run_config(path, ["pipeline.1.beta=0", "pipeline.0.lr=1e-5", "data.seed=3", "pipeline.0.psi=binomial"])
    assert cfg.pipeline_label() == "sft:softlabel -> grpo:ccc"
    assert cfg.pipeline[1].beta == 0.0
    assert cfg.pipeline[0].lr == pytest.approx(1e-5)
    assert cfg.pipeline[0].resolved_eta() == 0.05  # paper default for binomial
    assert cfg.data.train_size == 100 and cfg.data.seed == 3


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.nme=1"], "data.nme: unknown field"),
        (["pipeline.0.loss=foo"], "'ce', 'softlabel', 'dist2' or 'rvtc'"),
        (["scaling.num_workers=many"], "scaling.num_workers"),
        (["pipeline=sft:xx"], "unknown SFT loss 'xx'"),
        (["pipeline=rl:ccc"], "unknown stage"),
        (["pipeline.4.lr=1"], "not an index"),
        (["data.few_threshold=500"], "few_threshold (500) must not exceed many_threshold"),
        (["deepspeed.precision=bf16"], "needs scaling.use_gpu"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
        (["name=has space"], "name"),
        (["noequals"], "must look like field.path=value"),
        (["pipeline=grpo:ccc", "pipeline.0.group_size=1"], "group_size"),
    ],
)
def test_bad_config_names_the_field(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_run_config(overrides=overrides)
    assert fragment in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_run_config(bad)


def test_pipeline_shorthand():
    assert parse_pipeline("zero-shot") == []
    assert parse_pipeline("sft:ce → grpo:mae+format") == [
        {"kind": "sft", "loss": "ce"},
        {"kind": "grpo", "rewards": [{"name": "mae"}, {"name": "format"}]},
    ]
    assert RunConfig.model_validate({"pipeline": "zero-shot"}).pipeline_label() == "zero-shot"


def test_flatten_and_override_copy():
    tree = {"a": {"b": 1}, "l": [{"x": 1}]}
    new = apply_override(tree, "l.0.x=2")
    assert tree["l"][0]["x"] == 1 and new["l"][0]["x"] == 2
    flat = flatten(load_run_config())
    assert flat["pipeline.0.loss"] == "ce" and flat["data.name"] == "movies"


def test_stage_defaults_fill_every_stage_of_their_kind_and_lose_to_the_stage(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "pipeline: sft:ce -> grpo:ccc -> grpo:mae\n"
        "stages: {sft: {lr: 3.0e-3, steps: 7}, grpo: {group_size: 8, steps: 5}}\n"
    )
    cfg = load_run_config(path, ["pipeline.2.group_size=2"])
    assert (cfg.pipeline[0].lr, cfg.pipeline[0].steps) == (3e-3, 7)
    assert [s.group_size for s in cfg.pipeline[1:]] == [8, 2]  # the stage's own field wins
    assert cfg.pipeline[1].steps == 5 and cfg.pipeline[1].lr == 1e-5  # untouched fields keep their defaults
    # defaults also reach a default pipeline, and survive a dump/validate round trip (Ray workers do this)
    cfg = load_run_config(overrides=["stages.sft.steps=3"])
    assert cfg.pipeline[0].steps == 3
    assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ConfigError, match=r"stages.grpo: unknown field\(s\) groupsize"):
        load_run_config(overrides=["stages.grpo.groupsize=3"])


def fields_without_description(schema: dict) -> list[str]:
    """Every field reachable from `schema` (nested sections, list items, union members, followed through
    $ref) that has no description, as `Section.field`."""
    defs = schema.get("$defs", {})
    missing: list[str] = []
    seen: set[str] = set()

    def visit(node, owner: str) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item, owner)
            return
        if not isinstance(node, dict):
            return
        ref = node.get("$ref")
        if ref is not None:
            name = ref.rsplit("/", 1)[-1]
            if name not in seen:
                seen.add(name)
                visit(defs[name], name)
        for field, spec in node.get("properties", {}).items():
            if not spec.get("description"):
                missing.append(f"{node.get('title', owner)}.{field}")
            visit(spec, node.get("title", owner))
        for key in ("items", "anyOf", "oneOf", "allOf", "additionalProperties"):
            visit(node.get(key), owner)

    visit(schema, schema.get("title", "<root>"))
    return missing


def test_every_run_config_field_has_a_description():
    schema = RunConfig.model_json_schema()
    missing = fields_without_description(schema)
    assert not missing, "fields without a description: " + ", ".join(missing)
    # the walk reaches every section and both stage kinds
    reached = {"DataConfig", "ManifestConfig", "TinyModelConfig", "LoraConfig", "SFTStage", "GRPOStage", "RewardTerm"}
    assert reached <= set(schema["$defs"])


def test_the_description_walk_finds_an_undocumented_field():
    from pydantic import BaseModel, Field

    class Inner(BaseModel):
        documented: int = Field(1, description="yes")
        bare: int = 2

    class Outer(BaseModel):
        items: list[Inner] = Field(default_factory=list, description="a list of sections")

    assert fields_without_description(Outer.model_json_schema()) == ["Inner.bare"]
