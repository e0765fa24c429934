"""The `model` section: where the policy comes from, its size when built here, and LoRA adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from orchestrator.config.base import StrictSection


class TinyModelConfig(StrictSection):
    """Size of the random-init model built from a transformers config (tests, CPU demos). `qwen2-vl` and
    `smolvlm` are vision-language models: this section sizes their language half, `model.vision` their
    vision half."""

    architecture: Literal["llama", "qwen2", "qwen2-vl", "smolvlm"] = Field(
        "llama", description="transformers architecture: llama or qwen2 (text), qwen2-vl or smolvlm (vision-language)."
    )
    hidden_size: int = Field(64, ge=8, description="Width of the language model (a multiple of num_heads).")
    num_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads (each with its own key/value head).")
    intermediate_size: int = Field(128, ge=8, description="MLP width of each decoder layer.")
    max_position_embeddings: int = Field(512, ge=32, description="Longest sequence (prompt + answer) in tokens.")

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


class VisionModelConfig(StrictSection):
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
    hidden_size: int = Field(64, ge=8, description="Width of the vision encoder (a multiple of num_heads).")
    num_layers: int = Field(2, ge=1, description="Layers of the vision encoder.")
    num_heads: int = Field(4, ge=1, description="Attention heads of the vision encoder.")
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


class LoraConfig(StrictSection):
    """Low-rank adapters (peft) on the policy, for models too large to fine-tune whole. Each stage
    trains fresh adapters and merges them into the weights at its end, so the next stage (and its
    reference policy: the base with adapters disabled) starts from the previous stage's result."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of every weight of the policy.")
    r: int = Field(64, ge=1, description="Rank (METHODS §4: 64 on 7B models).")
    alpha: float = Field(128.0, gt=0, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (every linear layer but the output head)."
    )


VLM_SMOLLM2_SOURCE = "smolvlm-smollm2-135m"


class ModelConfig(StrictSection):
    """Where the policy comes from: `tiny` (random init, text or vision-language), `smollm2-135m`
    (packaged), `smolvlm-smollm2-135m` (SmolVLM-style: pretrained SmolLM2-135M language half, fresh vision
    half sized by `vision`), or a local directory / hub id."""

    source: str = Field(
        "tiny", description="'tiny', 'smollm2-135m', 'smolvlm-smollm2-135m', or a local directory / hub id."
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Size of a `tiny` model.")
    vision: VisionModelConfig = Field(
        default_factory=VisionModelConfig, description="Vision half of a vision-language model built here."
    )
    trust_remote_code: bool = Field(
        False, description="Run the Python code a model directory or hub repository ships; only for sources you trust."
    )
    cache_dir: str | None = Field(None, description="Where converted models are cached; default ~/.cache/orchestrator.")
    init_seed: int = Field(1234, description="Seed of the random init of a tiny model (and of a fresh vision half).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Low-rank adapters (off by default).")

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


