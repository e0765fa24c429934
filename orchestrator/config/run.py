"""One run's configuration: the pipeline on one dataset, how it is evaluated, scaled and tracked.

Every knob of METHODS.md is a field here, so every choice can be an ablation axis. Unknown keys are
refused (``extra="forbid"``) and every error names the dotted field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.config.base import StrictSection
from orchestrator.config.data import DataConfig
from orchestrator.config.model import VLM_SMOLLM2_SOURCE, ModelConfig
from orchestrator.config.stages import SFTStage, Stage, StageDefaults, parse_pipeline


class EvalConfig(StrictSection):
    """Evaluation of the final model on the balanced DIR splits (METHODS §2), greedy decoding."""

    splits: list[Literal["val", "test"]] = Field(
        default_factory=lambda: ["val", "test"],
        description="Splits evaluated; metrics are logged as SPLIT/REGION/METRIC (test/few/mae).",
    )
    batch_size: int = Field(32, ge=1, description="Prompts per generate call on each worker.")
    max_new_tokens: int = Field(32, ge=1, description="Greedy budget; the driver refuses one too short for the answer.")
    parse_failure: Literal["penalty", "exclude", "random"] = Field(
        "penalty",
        description="An answer that does not parse counts as: penalty: the label-range end farther from the "
        "target (the worst error); exclude: left out of the error metrics; random: a uniform value over the "
        "label range (as the official CCC-GRPO code). Failures are counted in parse_fail_rate either way.",
    )
    max_samples: int | None = Field(
        None, ge=1, description="Cap per split (keeps CPU runs short): a subset drawn with data.seed, so every run "
        "of a sweep scores the same items (METHODS §6).",
    )


class ScalingConfig(StrictSection):
    """How many Ray Train workers (data-parallel DeepSpeed ranks) and what each reserves."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers, one data-parallel rank each.")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs Ray reserves per worker; on CPU also its torch threads (whole CPUs)."
    )
    use_gpu: bool = Field(False, description="One GPU per worker; false trains on CPU in fp32.")


class DeepSpeedConfig(StrictSection):
    """The DeepSpeed engine of every stage."""

    zero_stage: int = Field(
        2, ge=0, le=3, description="ZeRO stage: 0 replicates everything, 1 shards optimizer states, 2 also "
        "gradients, 3 also parameters."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, else fp32 (CPU training is always fp32)."
    )
    offload_optimizer: bool = Field(
        False, description="Keep optimizer states in CPU memory (ZeRO-Offload); needs zero_stage >= 1."
    )
    shared_memory_grads: bool = Field(
        True, description="ZeRO-0 on CPU with every worker on one machine: average gradients through shared "
        "memory (/dev/shm) instead of DeepSpeed's gloo all-reduce over TCP loopback; the same average.",
    )


class CheckpointConfig(StrictSection):
    """Ray Train checkpoints, from which a failed worker group resumes."""

    every_steps: int = Field(50, ge=1, description="Checkpoint (and report) every N optimizer steps.")
    num_to_keep: int = Field(2, ge=1, description="Most recent checkpoints kept; older ones are deleted.")


class GuardConfig(StrictSection):
    """What a run does when training goes numerically wrong."""

    on_nonfinite: Literal["fail", "skip_step"] = Field(
        "fail",
        description="A non-finite (NaN or infinite) training loss or gradient norm: fail: the run fails, naming "
        "the stage and step; skip_step: that optimizer step is skipped (no update; the lr schedule still "
        "advances), and the skipped steps are counted in the metric train/skipped_steps.",
    )


class TrackingConfig(StrictSection):
    """Where the run is logged (MLflow)."""

    # MLflow refuses an empty name (and one over 500 characters) only when it creates the experiment.
    experiment: str = Field("orchestrator", min_length=1, max_length=500, description="MLflow experiment.")
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI or the local SQLite store.")
    log_every: int | None = Field(
        None, ge=1, description="Log train metrics (and print rank 0's progress line) every N steps of every stage; "
        "None: each stage at its own cadence, every max(1, steps // 20) steps (20 points a stage). A stage's own "
        "log_every wins over this.",
    )
    flush_timeout_s: float = Field(
        300.0, ge=0, description="At the end of a run, how long to wait for an unreachable tracking store before "
        "failing the run with the unsent metrics saved locally (training itself never waits on the store).",
    )


class RunConfig(StrictSection):
    """One training run: a pipeline of stages on one dataset, evaluated with DIR metrics."""

    name: str = Field(
        "run", pattern=r"^[A-Za-z0-9_.\-]+$",
        description="The MLflow run name and the run's folder under storage_path; storage_path + name identify "
        "a run across restarts.",
    )
    seed: int = Field(
        42, description="Run seed: torch on each worker (seed + rank; rollout sampling), each stage's batch order "
        "and `random` parse failures. model.init_seed and data.seed (the splits and the eval.max_samples subset) "
        "are separate.",
    )
    storage_path: str = Field("results", description="Ray Train storage: checkpoints and run state.")
    timeout_s: float | None = Field(
        None, gt=0, description="Wall-clock budget of the whole run in seconds (from its start to its evaluation); "
        "a run over it is stopped and FAILED with 'timed out after N s'. None: no limit. An ablation's own "
        "timeout_s overrides it for every cell.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="The dataset and its DIR splits.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy model.")
    pipeline: list[Stage] = Field(
        default_factory=lambda: [SFTStage()],
        description="Stages in order, each starting from the previous one's weights: a list of stages or the "
        "shorthand 'sft:ce -> grpo:ccc'; 'zero-shot' (no stage) only evaluates.",
    )
    stages: StageDefaults = Field(default_factory=StageDefaults, description="Defaults for every stage of a kind.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation after the last stage.")
    scaling: ScalingConfig = Field(default_factory=ScalingConfig, description="Workers and their resources.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="The DeepSpeed engine.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Non-finite losses and gradients.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")

    @model_validator(mode="before")
    @classmethod
    def _pipeline_shorthand(cls, values: Any) -> Any:
        # `pipeline: "sft:ce -> grpo:ccc"`, then `stages.<kind>` fills what a stage does not set itself.
        if not isinstance(values, dict):
            return values
        values = dict(values)
        if isinstance(values.get("pipeline"), str):
            values["pipeline"] = parse_pipeline(values["pipeline"])
        defaults = values.get("stages") or {}
        if isinstance(defaults, StageDefaults):
            defaults = defaults.model_dump()
        if isinstance(defaults, dict) and isinstance(values.get("pipeline"), list):
            values["pipeline"] = [
                {**(defaults.get(stage.get("kind", "sft")) or {}), **stage} if isinstance(stage, dict) else stage
                for stage in values["pipeline"]
            ]
        return values

    @model_validator(mode="after")
    def _compatible(self) -> "RunConfig":
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
        if self.deepspeed.precision == "bf16" and not self.scaling.use_gpu:
            raise ValueError("deepspeed.precision=bf16 needs scaling.use_gpu=true (CPU training runs in fp32)")
        head = [i for i, s in enumerate(self.pipeline) if s.answers_through_head()]
        if head and head[0] != len(self.pipeline) - 1:
            after = self.pipeline[head[0] + 1]
            raise ValueError(
                f"pipeline: {self.pipeline[head[0]].label()} must be the last stage, but {after.label()} follows it "
                f"(stage {head[0] + 1}): "
                "its classification head replaces the text answer, which GRPO and the token-level SFT losses "
                "train; put token-level stages before it (e.g. sft:ce -> sft:rvtc)"
            )
        for i, stage in enumerate(self.pipeline):
            if getattr(stage, "ref_sync_every", None) and stage.beta > 0 and (
                self.model.lora.enabled or self.deepspeed.zero_stage == 3
            ):
                raise ValueError(
                    f"pipeline.{i}.ref_sync_every needs the reference as a whole copy of the policy: with "
                    "model.lora.enabled it is the policy without its adapters, under deepspeed.zero_stage=3 it is "
                    "partitioned"
                )
        if self.data.name == "digit-count" and self.model.builds_vision_model() is False:
            raise ValueError(
                f"data.name=digit-count is an image task but model.source={self.model.source!r}"
                + (f" (architecture {self.model.tiny.architecture})" if self.model.source == "tiny" else "")
                + " cannot see images; use model.tiny.architecture=qwen2-vl|smolvlm or "
                f"model.source={VLM_SMOLLM2_SOURCE}"
            )
        return self

    def pipeline_label(self) -> str:
        return " -> ".join(s.label() for s in self.pipeline) or "zero-shot"
