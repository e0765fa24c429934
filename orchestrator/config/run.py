"""Typed run configuration: YAML in, dotted overrides, validation before any compute.

Every knob of METHODS.md is a field here, so every choice can be an ablation axis.
Unknown keys are refused (``extra="forbid"``) and every error names the dotted field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user error in a config file or override, raised before any compute starts."""


def resolve_path(path: str | Path) -> Path:
    """Absolute paths stay; relative ones (data.root, storage_path, ./mlruns) are taken against
    $ORCHESTRATOR_HOME when set, else the current directory. A `ray job submit` driver runs in a copy
    of the working dir, so the scripts in infra/ set ORCHESTRATOR_HOME to keep results in the checkout."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    return (Path(os.environ.get("ORCHESTRATOR_HOME") or Path.cwd()) / p).resolve()


def resolve_storage(location: str) -> str:
    """Ray Train storage: a URI (s3://, gs://, file://...) passes through untouched; a path is resolved."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", location):
        return location
    return str(resolve_path(location))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data


class DigitCountConfig(_Strict):
    """The constructed `digit-count` task: canvases of K real handwritten digits (scikit-learn's digits),
    K drawn from a truncated power law P(K) ∝ K^-power over 1..max_digits, labelled by K."""

    num_images: int = Field(4000, ge=1, description="Canvases generated before the DIR split.")
    max_digits: int = Field(20, ge=1, description="K_max: the largest count.")
    power: float = Field(1.5, ge=0, description="Exponent a of P(K) ∝ K^-a; 0 is uniform, larger is more long-tailed.")
    canvas_size: int = Field(128, ge=8, description="Square canvas side in pixels.")
    digit_size: int = Field(16, ge=8, description="Side in pixels of each digit (the 8x8 originals are upscaled).")
    min_gap: int = Field(4, ge=1, description="Blank pixels at least between two digits, so none touch or overlap.")
    seed: int = Field(0, description="Seed of the generation (counts, digits, positions); data.seed cuts the splits.")

    def grid_side(self) -> int:
        """Digits sit in distinct cells of a grid, which is what guarantees they never overlap."""
        return self.canvas_size // (self.digit_size + self.min_gap)

    @model_validator(mode="after")
    def _digits_fit(self) -> "DigitCountConfig":
        cells = self.grid_side() ** 2
        if self.max_digits > cells:
            raise ValueError(
                f"max_digits ({self.max_digits}) does not fit: a {self.canvas_size}px canvas holds {cells} digits of "
                f"{self.digit_size}px with min_gap {self.min_gap}; raise canvas_size or lower digit_size/max_digits"
            )
        return self


class ManifestConfig(_Strict):
    """An external DIR dataset (AgeDB-DIR, IMDB-WIKI-DIR, ...) listed in a Parquet, JSONL or CSV manifest.

    One row per sample: an image as a path (`image_path_column`) or as encoded bytes (`image_bytes_column`;
    base64 text in JSONL/CSV), an optional prompt, a numeric target and an optional split (train/val/test).
    With a split column the given splits are kept; without one the DIR protocol cuts them."""

    path: str | None = Field(
        None, description="The manifest file (.parquet, .jsonl, .csv); required for data.name=manifest."
    )
    image_root: str | None = Field(None, description="Folder for relative image paths; None: the manifest's folder.")
    prompt_template: str | None = Field(
        None,
        description="Prompt of rows without one; `{column}` fields are filled from the row, and the answer "
        "instruction is appended unless it mentions <answer>. None: a generic image question.",
    )
    # Optional columns: None uses the conventional name when the manifest has it; a name given here
    # must exist (a typo is an error, not a silently missing column).
    image_path_column: str | None = Field(
        None, description="Column of image file paths; None: 'image_path' if present."
    )
    image_bytes_column: str | None = Field(
        None, description="Column of encoded image bytes (base64 in JSONL/CSV); None: 'image_bytes' if present."
    )
    prompt_column: str | None = Field(None, description="Column of prompts; None: 'prompt' if present.")
    target_column: str = Field("target", description="Column of numeric targets (required).")
    split_column: str | None = Field(None, description="Column of train/val/test; None: 'split' if present.")
    description: str | None = Field(None, description="One line for `data build`; None names the file.")

    def file_stamp(self) -> dict[str, Any]:
        """Identity of the manifest file for the dataset fingerprint: a changed file is a new dataset."""
        if self.path is None:
            return {}
        p = resolve_path(self.path)
        stamp: dict[str, Any] = {"file": str(p)}
        if self.image_root is not None:
            stamp["image_root"] = str(resolve_path(self.image_root))
        try:
            st = p.stat()
            stamp.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        except OSError:
            stamp["missing"] = True  # the build refuses it with a clear message
        return stamp


def _expand_dotted(values: Any) -> Any:
    """`{"manifest.path": x}` -> `{"manifest": {"path": x}}`, so `orchestrator data build NAME a.b=v` reaches
    nested sections."""
    if not isinstance(values, dict) or not any(isinstance(k, str) and "." in k for k in values):
        return values
    out: dict[str, Any] = {}
    for key, value in values.items():
        parts = key.split(".") if isinstance(key, str) else [key]
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, BaseModel):
                child = child.model_dump()
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        if isinstance(node.get(parts[-1]), dict) and isinstance(value, dict):
            node[parts[-1]] = {**node[parts[-1]], **value}
        else:
            node[parts[-1]] = value
    return out


class DataConfig(_Strict):
    """Which dataset, and how the DIR protocol (METHODS §2) cuts it."""

    name: str = Field(
        "movies", description="Registered dataset: movies, diamonds, doctor-visits, digit-count, or manifest."
    )
    root: str = Field("data", description="Folder where built Parquet splits are cached.")
    label_step: float | None = Field(
        None, gt=0, description="Bin width for labels; None takes the dataset's default."
    )
    max_per_label: int = Field(30, ge=1, description="Cap per label bin in the balanced val/test splits.")
    train_size: int | None = Field(
        None, ge=1, description="Random training subset (keeps the natural distribution); None keeps all."
    )
    many_threshold: int = Field(100, ge=1, description="A bin with more training samples than this is 'many'.")
    few_threshold: int = Field(20, ge=1, description="A bin with fewer training samples than this is 'few'.")
    seed: int = Field(0, description="Seed of the split; independent of the training seed.")
    prompt_style: Literal["full", "compact"] = Field(
        "full",
        description="full: an instruction, one 'Name: value' line per feature, the answer format. compact: the "
        "feature values alone, ' | '-separated, for tiny models trained from scratch (text datasets only).",
    )
    digit_count: DigitCountConfig = Field(default_factory=DigitCountConfig, description="Options of `digit-count`.")
    manifest: ManifestConfig = Field(default_factory=ManifestConfig, description="Options of `manifest`.")

    @model_validator(mode="before")
    @classmethod
    def _dotted_keys(cls, values: Any) -> Any:
        return _expand_dotted(values)

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "DataConfig":
        if self.few_threshold > self.many_threshold:
            raise ValueError(
                f"few_threshold ({self.few_threshold}) must not exceed many_threshold ({self.many_threshold})"
            )
        if self.name == "manifest" and not self.manifest.path:
            raise ValueError("data.name=manifest needs data.manifest.path (a .parquet, .jsonl or .csv file)")
        if self.prompt_style == "compact" and self.name in ("digit-count", "manifest"):
            raise ValueError(f"data.prompt_style=compact applies to the text datasets, not {self.name!r}")
        return self

    def fingerprint(self) -> str:
        """Stable short hash of everything that changes the built splits (root excluded). A section of
        dataset options counts only for its own dataset; a manifest counts with its file's size and mtime."""
        payload = self.model_dump(exclude={"root", "digit_count", "manifest", "prompt_style"})
        if self.prompt_style != "full":  # builds made before the option existed keep their fingerprint
            payload["prompt_style"] = self.prompt_style
        if self.name == "digit-count":
            payload["digit_count"] = self.digit_count.model_dump()
        if self.name == "manifest":
            payload["manifest"] = {**self.manifest.model_dump(), **self.manifest.file_stamp()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- model


class TinyModelConfig(_Strict):
    """Size of the random-init model built from a transformers config (tests, CPU demos). `qwen2-vl` and
    `smolvlm` are vision-language models: this section sizes their language half, `model.vision` their
    vision half."""

    architecture: Literal["llama", "qwen2", "qwen2-vl", "smolvlm"] = "llama"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(128, ge=8)
    max_position_embeddings: int = Field(512, ge=32)

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.architecture == "qwen2-vl" and (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"qwen2-vl needs an even head size (hidden_size / num_heads = {self.hidden_size // self.num_heads}) "
                "for its 3-D rotary sections"
            )
        return self

    def is_vision(self) -> bool:
        return self.architecture in ("qwen2-vl", "smolvlm")


class VisionModelConfig(_Strict):
    """The vision half of a vision-language model built here (a tiny VLM, or `smolvlm-smollm2-135m`, whose
    vision encoder and connector start from random weights). Every image is resized to
    image_size x image_size, so every image costs the same (image_size / patch_size / merge_size)^2
    placeholder tokens in the prompt. A local VLM directory brings its own vision tower; only image_size
    is used for it (Qwen2-VL), or its own vision_config.image_size (SmolVLM/Idefics3)."""

    image_size: int = Field(128, ge=8, description="Side in pixels every image is resized to.")
    patch_size: int = Field(16, ge=2, description="Side in pixels of one vision-encoder patch.")
    merge_size: int = Field(
        2, ge=1, description="Patches merged per side into one language token (Qwen2-VL spatial merge, "
        "SmolVLM pixel-shuffle scale factor)."
    )
    hidden_size: int = Field(64, ge=8, description="Width of the vision encoder.")
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(
        128, ge=8, description="MLP width of the vision encoder (a multiple of hidden_size for Qwen2-VL)."
    )

    @model_validator(mode="after")
    def _shapes_fit(self) -> "VisionModelConfig":
        unit = self.patch_size * self.merge_size
        if self.image_size % unit:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size x merge_size ({unit})"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self

    def tokens_per_image(self) -> int:
        return (self.image_size // (self.patch_size * self.merge_size)) ** 2


class LoraConfig(_Strict):
    """Low-rank adapters (peft) on the policy, for models too large to fine-tune whole. Each stage
    trains fresh adapters and merges them into the weights at its end, so the next stage (and its
    reference policy: the base with adapters disabled) starts from the previous stage's result."""

    enabled: bool = False
    r: int = Field(64, ge=1, description="Rank (METHODS §4: 64 on 7B models).")
    alpha: float = Field(128.0, gt=0, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the output head)."
    )


VLM_SMOLLM2_SOURCE = "smolvlm-smollm2-135m"


class ModelConfig(_Strict):
    """Where the policy comes from: `tiny` (random init, text or vision-language), `smollm2-135m`
    (packaged), `smolvlm-smollm2-135m` (SmolVLM-style: pretrained SmolLM2-135M language half, fresh vision
    half sized by `vision`), or a local directory / hub id."""

    source: str = Field(
        "tiny", description="'tiny', 'smollm2-135m', 'smolvlm-smollm2-135m', or a local directory / hub id."
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    vision: VisionModelConfig = Field(default_factory=VisionModelConfig)
    trust_remote_code: bool = Field(False, description="Never on unless the user asks.")
    cache_dir: str | None = Field(None, description="Where converted models are cached; default ~/.cache/orchestrator.")
    init_seed: int = Field(1234, description="Seed of the random init of a tiny model (and of a fresh vision half).")
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _vision_shapes(self) -> "ModelConfig":
        builds_qwen_vision = self.source == "tiny" and self.tiny.architecture == "qwen2-vl"
        if builds_qwen_vision and self.vision.intermediate_size % self.vision.hidden_size:
            raise ValueError(
                f"vision.intermediate_size ({self.vision.intermediate_size}) must be a multiple of "
                f"vision.hidden_size ({self.vision.hidden_size}) for qwen2-vl (its MLP width is a ratio)"
            )
        return self

    def builds_vision_model(self) -> bool | None:
        """True/False where the config alone decides; None for a directory or hub id (its config.json does)."""
        if self.source == "tiny":
            return self.tiny.is_vision()
        if self.source == VLM_SMOLLM2_SOURCE:
            return True
        if self.source == "smollm2-135m":
            return False
        return None


# --------------------------------------------------------------------------- stages


class _StageBase(_Strict):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="After warm-up: decay to 0 at the stage's last step (linear, as TRL's default, or "
        "cosine), or hold the peak (constant)."
    )
    steps: int = Field(100, ge=0, description="Optimizer steps in this stage.")
    micro_batch_size: int = Field(8, ge=1, description="Per worker, per forward pass.")
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, ge=0)


SFT_LOSSES = ("ce", "softlabel", "dist2", "rvtc")


class SFTStage(_StageBase):
    """Supervised fine-tuning on the answer tokens only (METHODS §3); `rvtc` instead trains a K-bin
    classification head on the last prompt token's hidden state (the model then answers through the head)."""

    kind: Literal["sft"] = "sft"
    loss: Literal["ce", "softlabel", "dist2", "rvtc"] = "ce"
    digit_weight: float = Field(1.0, gt=0, description="λ on digit tokens for `ce` (the up-weighting control).")
    psi: Literal["triangular", "binomial", "poisson", "uniform"] = "triangular"
    eta: float | None = Field(None, ge=0, le=1, description="Soft mass; None takes the paper default for psi.")
    softlabel_lambda: float = Field(2.0, gt=0)
    tau: float = Field(1.0, gt=0)
    alpha: float = Field(0.1, ge=0)
    place_value_weights: bool = False
    rvtc_bins: int = Field(
        51, ge=2, description="K for `rvtc`: bins with evenly spaced centres over the training label range."
    )
    length_groups: int = Field(
        1, ge=1, description="Split each micro-batch into up to this many sub-batches of similar length, each "
        "padded only to its own longest row: the same rows and loss, less padding to compute.",
    )

    def resolved_eta(self) -> float:
        defaults = {"triangular": 0.08, "binomial": 0.05, "poisson": 0.02, "uniform": 0.05}
        return self.eta if self.eta is not None else defaults[self.psi]

    def label(self) -> str:
        return f"sft:{self.loss}"


class RewardTerm(_Strict):
    name: str = Field(..., description="Registered reward (format, mae, accuracy, ccc) or 'module:function'.")
    weight: float = 1.0


class GRPOStage(_StageBase):
    """Group-relative policy optimisation (METHODS §4)."""

    kind: Literal["grpo"] = "grpo"
    lr: float = Field(1e-5, gt=0)
    micro_batch_size: int = Field(4, ge=1, description="Prompts per worker per rollout (B).")
    group_size: int = Field(4, ge=2, description="G completions per prompt.")
    rewards: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="ccc")])
    ccc_scope: Literal["worker", "global"] = "worker"
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    beta: float = Field(0.04, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    epsilon_low: float = Field(0.2, ge=0)
    epsilon_high: float = Field(0.2, ge=0)
    scale_rewards: bool = True
    num_iterations: int = Field(1, ge=1)
    loss_aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    mae_reward_form: Literal["neg_range", "one_minus_scaled"] = "neg_range"
    mae_scale: float | None = Field(None, gt=0, description="Scale of `one_minus_scaled`; None = label range.")
    accuracy_tolerance: float = Field(0.0, ge=0)
    shared_prompt_forward: bool = Field(
        True,
        description="Run each prompt once for its G samples in the log-prob forwards (same numbers, less "
        "compute); the image path and ZeRO-3 always run whole rows.",
    )

    def label(self) -> str:
        return "grpo:" + "+".join(t.name for t in self.rewards)


Stage = Annotated[Union[SFTStage, GRPOStage], Field(discriminator="kind")]


def parse_pipeline(spec: str) -> list[dict[str, Any]]:
    """`"sft:ce -> grpo:ccc"` -> stage dicts. `zero-shot` is the empty pipeline (evaluation only)."""
    spec = spec.strip()
    if spec in ("zero-shot", ""):
        return []
    stages: list[dict[str, Any]] = []
    for part in re.split(r"\s*(?:->|→|>)\s*", spec):
        kind, _, arg = part.partition(":")
        if kind == "sft":
            if arg not in SFT_LOSSES:
                raise ConfigError(f"pipeline {spec!r}: unknown SFT loss {arg!r}; allowed: {', '.join(SFT_LOSSES)}")
            stages.append({"kind": "sft", "loss": arg})
        elif kind == "grpo":
            names = [n for n in arg.split("+") if n]
            if not names:
                raise ConfigError(f"pipeline {spec!r}: grpo needs a reward, e.g. grpo:ccc")
            stages.append({"kind": "grpo", "rewards": [{"name": n} for n in names]})
        else:
            raise ConfigError(f"pipeline {spec!r}: unknown stage {part!r}; write sft:LOSS or grpo:REWARD")
    return stages


# --------------------------------------------------------------------------- run


class EvalConfig(_Strict):
    splits: list[Literal["val", "test"]] = Field(default_factory=lambda: ["val", "test"])
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(32, ge=1, description="Greedy budget; the driver refuses one too short for the answer.")
    parse_failure: Literal["penalty", "exclude", "random"] = "penalty"
    max_samples: int | None = Field(None, ge=1, description="Cap per split (keeps CPU runs short).")


class ScalingConfig(_Strict):
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False


class DeepSpeedConfig(_Strict):
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPUs that have it, else fp32.")
    offload_optimizer: bool = False
    shared_memory_grads: bool = Field(
        True, description="ZeRO-0 on CPU with every worker on one machine: average gradients through shared "
        "memory (/dev/shm) instead of DeepSpeed's gloo all-reduce over TCP loopback; the same average.",
    )


class CheckpointConfig(_Strict):
    every_steps: int = Field(50, ge=1, description="Checkpoint (and report) every N optimizer steps.")
    num_to_keep: int = Field(2, ge=1)


class TrackingConfig(_Strict):
    # MLflow refuses an empty name (and one over 500 characters) only when it creates the experiment.
    experiment: str = Field("orchestrator", min_length=1, max_length=500, description="MLflow experiment.")
    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI or the local SQLite store.")
    log_every: int = Field(10, ge=1, description="Log train metrics every N optimizer steps.")
    flush_timeout_s: float = Field(
        300.0, ge=0, description="At the end of a run, how long to wait for an unreachable tracking store before "
        "failing the run with the unsent metrics saved locally (training itself never waits on the store).",
    )


class StageDefaults(_Strict):
    """Settings for every stage of a kind (`stages.grpo.group_size: 8`), so a pipeline written as a
    shorthand (`sft:ce -> grpo:ccc`) or swept as an ablation axis keeps them. A field set on a stage
    itself (`pipeline.1.group_size`) wins over these, and these over the stage's own defaults."""

    sft: dict[str, Any] = Field(default_factory=dict)
    grpo: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_fields(self) -> "StageDefaults":
        for kind, model in (("sft", SFTStage), ("grpo", GRPOStage)):
            unknown = sorted(set(getattr(self, kind)) - set(model.model_fields) | ({"kind"} & set(getattr(self, kind))))
            if unknown:
                allowed = ", ".join(f for f in model.model_fields if f != "kind")
                raise ValueError(f"stages.{kind}: unknown field(s) {', '.join(unknown)}; allowed: {allowed}")
        return self


class RunConfig(_Strict):
    """One training run: a pipeline of stages on one dataset, evaluated with DIR metrics."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = 42
    storage_path: str = Field("results", description="Ray Train storage: checkpoints and run state.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pipeline: list[Stage] = Field(default_factory=lambda: [SFTStage()])
    stages: StageDefaults = Field(default_factory=StageDefaults)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

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
        rvtc = [i for i, s in enumerate(self.pipeline) if s.kind == "sft" and s.loss == "rvtc"]
        if rvtc and rvtc[0] != len(self.pipeline) - 1:
            after = self.pipeline[rvtc[0] + 1]
            raise ValueError(
                f"pipeline: sft:rvtc must be the last stage, but {after.label()} follows it (stage {rvtc[0] + 1}): "
                "its classification head replaces the text answer, which GRPO and the token-level SFT losses "
                "train; put token-level stages before it (e.g. sft:ce -> sft:rvtc)"
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


# --------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        parts = [str(p) for p in e["loc"] if not str(p).startswith("function-after")]
        # pydantic names the union member it tried (pipeline.0.sft.loss); the user wrote pipeline.0.loss
        parts = [p for i, p in enumerate(parts) if not (i >= 2 and parts[i - 2] == "pipeline" and p in ("sft", "grpo"))]
        loc = ".".join(parts)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "literal_error":
            msg = f"{msg}; got {e.get('input')!r}"
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def _coerce_scalar(text: str) -> Any:
    """Override values are YAML scalars: `1e-5` -> float, `true` -> bool, `[1,2]` -> list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value):
        return float(value)  # YAML 1.1 reads `1e-5` as a string
    return value


def apply_override(tree: dict[str, Any], dotted: str) -> dict[str, Any]:
    """Set `a.b.0.c=value` in a nested dict/list tree (copy-on-write); the value is a YAML scalar."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} must look like field.path=value")
    path, _, raw = dotted.partition("=")
    return set_field(tree, path, _coerce_scalar(raw), what=f"override {dotted!r}")


def set_field(tree: dict[str, Any], path: str, value: Any, what: str | None = None) -> dict[str, Any]:
    """Set the dotted field `path` (list items by index) to `value` in a copy of `tree`. Missing
    sections are created (validation names unknown ones); a shorthand pipeline is expanded on the way."""
    what = what or f"field {path!r}"
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"{what} has an empty field path")
    tree = copy.deepcopy(tree)
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{what}: {where} is not an index of a {len(node)}-element list")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"{what}: {'.'.join(keys[:i])} is not a section")
        if last:
            node[key] = copy.deepcopy(value)
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            if isinstance(node, dict) and key == "pipeline" and isinstance(node[key], str):
                node[key] = parse_pipeline(node[key])
            node = node[key]
    return tree


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping), or a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of fields, got {type(loaded).__name__}")
    return loaded


def load_run_tree(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The unvalidated config tree: defaults, then `base`, then the YAML file, then dotted overrides."""
    # Start from the full defaults, the pipeline as its shorthand so `stages.<kind>` can fill it
    # (an override such as pipeline.0.lr=... expands the shorthand on the way in).
    tree: dict[str, Any] = RunConfig().model_dump(mode="json")
    tree["pipeline"] = RunConfig().pipeline_label()
    if base:
        tree = _deep_merge(tree, base)
    if path is not None:
        tree = _deep_merge(tree, read_yaml_mapping(path, "config file"))
    for item in overrides or []:
        tree = apply_override(tree, item)
    return tree


def validate_run_tree(tree: dict[str, Any], source: str = "defaults") -> RunConfig:
    """A RunConfig, or a ConfigError listing every problem with its dotted field."""
    try:
        return RunConfig.model_validate(tree)
    except ConfigError:
        raise
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_run_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> RunConfig:
    """Read YAML (or a dict), apply dotted overrides, validate. Raises ConfigError with every problem."""
    return validate_run_tree(load_run_tree(path, overrides, base), str(path) if path is not None else "defaults")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> `{"a.b.c": value}` (lists by index), for MLflow params and tables."""
    out: dict[str, Any] = {}
    if isinstance(d, BaseModel):
        d = d.model_dump(mode="json")
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, (dict, list)) for x in d):
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out
