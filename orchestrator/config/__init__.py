"""Typed run configuration: YAML in, dotted overrides, validation before any compute.

Modules: `base` (the strict section class, ConfigError, paths), `data`, `model`, `stages` and `run`
(the sections of a RunConfig), `loading` (YAML, overrides, validation errors) and `template` (the documented
YAML and the JSON schema that `orchestrator config` prints). Import names from here.
"""

from orchestrator.config.base import ConfigError, StrictSection, expand_dotted, resolve_path, resolve_storage
from orchestrator.config.data import DataConfig, DigitCountConfig, ManifestConfig
from orchestrator.config.loading import (
    apply_override,
    flatten,
    format_validation_error,
    load_run_config,
    load_run_tree,
    read_yaml_mapping,
    set_field,
    validate_run_tree,
)
from orchestrator.config.model import VLM_SMOLLM2_SOURCE, LoraConfig, ModelConfig, TinyModelConfig, VisionModelConfig
from orchestrator.config.run import (
    CheckpointConfig,
    DeepSpeedConfig,
    EvalConfig,
    GuardConfig,
    RunConfig,
    ScalingConfig,
    TrackingConfig,
)
from orchestrator.config.stages import (
    SFT_LOSSES,
    GRPOStage,
    RewardTerm,
    SFTStage,
    Stage,
    StageBase,
    StageDefaults,
    parse_pipeline,
)
from orchestrator.config.template import documented_yaml, run_config_schema

__all__ = [
    "SFT_LOSSES",
    "VLM_SMOLLM2_SOURCE",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "DigitCountConfig",
    "EvalConfig",
    "GRPOStage",
    "GuardConfig",
    "LoraConfig",
    "ManifestConfig",
    "ModelConfig",
    "RewardTerm",
    "RunConfig",
    "SFTStage",
    "ScalingConfig",
    "Stage",
    "StageBase",
    "StageDefaults",
    "StrictSection",
    "TinyModelConfig",
    "TrackingConfig",
    "VisionModelConfig",
    "apply_override",
    "documented_yaml",
    "expand_dotted",
    "flatten",
    "format_validation_error",
    "load_run_config",
    "load_run_tree",
    "parse_pipeline",
    "read_yaml_mapping",
    "resolve_path",
    "resolve_storage",
    "run_config_schema",
    "set_field",
    "validate_run_tree",
]
