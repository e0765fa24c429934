"""Vision-language models: image-only processors, pixel batches, and the VLMs built here.

Two architectures from transformers, chosen by `kind`:
- `qwen2-vl`: Qwen2VLForConditionalGeneration. Placeholders `<|vision_start|><|image_pad|>×n<|vision_end|>`;
  pixels are flattened patches [P, 3·2·p·p] with `image_grid_thw` [1, 3] per image, and the 3-D rotary
  positions need `mm_token_type_ids` (1 on image placeholders), derived here from the token ids.
- `smolvlm`: SmolVLMForConditionalGeneration (Idefics3 family). Placeholders
  `<fake_token_around_image><global-img><image>×n<fake_token_around_image>`; pixels [1, 1, 3, s, s] per image.

The stock processors of both want a video processor (and their fast image processors torchvision),
so `ImageOnlyProcessor` wraps the PIL image processor and expands the placeholders itself. Every image
is resized to image_size × image_size (the aspect ratio is not kept; no tiling), so every image costs
the same number of placeholder tokens and a prompt's ids depend on its text alone.

Pixel tensors travel per row (`ImageBatch.rows`, a dict per sequence whose tensors all have a leading
dimension), so repeating a row for G samples or taking a chunk of rows is list work, and a batch is one
`torch.cat` per key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.data.images import load_image

VLM_KINDS = ("qwen2-vl", "smolvlm")


# transformers `model_type` of a checkpoint -> the kind of processor it needs
MODEL_TYPE_KINDS = {"qwen2_vl": "qwen2-vl", "smolvlm": "smolvlm", "idefics3": "smolvlm"}
TEMPORAL_PATCH = 2  # Qwen2-VL's patch is 2 frames deep; a still image is repeated (as its processor does)
IMAGE_TOKENS = {
    "qwen2-vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
    "smolvlm": ["<fake_token_around_image>", "<image>", "<global-img>"],
}


def tokens_per_image(image_size: int, patch_size: int, merge_size: int) -> int:
    """Language tokens one image_size² image becomes: (side / patch / merge)² (both architectures merge
    merge_size² patches into one token: Qwen2-VL's patch merger, SmolVLM's pixel shuffle)."""
    unit = patch_size * merge_size
    if image_size % unit:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size x merge_size = {unit}")
    return (image_size // unit) ** 2


def mrope_sections(head_dim: int) -> list[int]:
    """Qwen2-VL splits each head's rotary frequencies (head_dim / 2) into temporal/height/width sections;
    Qwen's own 128-dim heads use [16, 24, 24]. Same proportions for any even head size."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"qwen2-vl needs an even head size of at least 6, got {head_dim}")
    half = head_dim // 2
    spatial = max(1, 3 * half // 8)
    return [half - 2 * spatial, spatial, spatial]


def add_image_tokens(tokenizer, kind: str):
    """Register the architecture's image tokens as special tokens (never split, skipped when decoding).
    Deterministic: the driver and every worker get the same ids."""
    from tokenizers import AddedToken

    missing = [t for t in IMAGE_TOKENS[kind] if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return tokenizer


def square(image, size: int):
    """Resize to size × size (bicubic) so the processor's own resize is the identity."""
    from PIL import Image

    return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)


class ImageOnlyProcessor:
    """Image bytes -> pixel tensors, and prompt text -> text with the image placeholders expanded."""

    kind: str

    def __init__(self, tokenizer, image_size: int, patch_size: int, merge_size: int):
        self.image_size, self.patch_size, self.merge_size = image_size, patch_size, merge_size
        self.num_image_tokens = tokens_per_image(image_size, patch_size, merge_size)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        for token in IMAGE_TOKENS[self.kind]:
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise ValueError(f"the tokenizer has no {token!r} token; {self.kind} prompts need it")

    def image_block(self) -> str:  # pragma: no cover - defined per architecture
        raise NotImplementedError

    def prompt_text(self, prompt: str) -> str:
        """The user turn: the image first, then the question (both architectures' convention)."""
        return self.image_block() + prompt

    def pixels(self, image) -> dict[str, torch.Tensor]:  # pragma: no cover - defined per architecture
        raise NotImplementedError

    def pixel_rows(self, blobs: Sequence[bytes]) -> list[dict[str, torch.Tensor]]:
        """One dict of pixel tensors per encoded image (a split's `image` cells)."""
        return [self.pixels(square(load_image(b), self.image_size)) for b in blobs]

    def model_inputs(self, input_ids: torch.Tensor, rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The model's image keyword arguments for a batch whose row i shows image rows[i]."""
        if len(rows) != input_ids.shape[0]:
            raise ValueError(f"{len(rows)} images for {input_ids.shape[0]} sequences")
        return {key: torch.cat([r[key] for r in rows]) for key in rows[0]}


class Qwen2VLImageOnlyProcessor(ImageOnlyProcessor):
    kind = "qwen2-vl"
    image_token = "<|image_pad|>"

    def __init__(self, tokenizer, image_size: int, patch_size: int, merge_size: int):
        super().__init__(tokenizer, image_size, patch_size, merge_size)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        area = image_size * image_size  # min = max pixels: a square image keeps its size exactly
        self.image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": area, "longest_edge": area}, patch_size=patch_size, merge_size=merge_size,
            temporal_patch_size=TEMPORAL_PATCH,
        )

    def image_block(self) -> str:
        return "<|vision_start|>" + self.image_token * self.num_image_tokens + "<|vision_end|>"

    def pixels(self, image) -> dict[str, torch.Tensor]:
        out = self.image_processor(image, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def model_inputs(self, input_ids, rows):
        inputs = super().model_inputs(input_ids, rows)
        # Which positions are image tokens: the 3-D rotary index needs it with the pixels.
        inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).to(torch.int32)
        return inputs


class SmolVLMImageOnlyProcessor(ImageOnlyProcessor):
    kind = "smolvlm"
    image_token = "<image>"

    def __init__(self, tokenizer, image_size: int, patch_size: int, merge_size: int):
        super().__init__(tokenizer, image_size, patch_size, merge_size)
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        # No tiling: the global image only, image_size² exactly.
        self.image_processor = SmolVLMImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}
        )

    def image_block(self) -> str:
        images = self.image_token * self.num_image_tokens
        return "<fake_token_around_image><global-img>" + images + "<fake_token_around_image>"

    def pixels(self, image) -> dict[str, torch.Tensor]:
        # Images of one size need no pixel mask (the model makes an all-ones one).
        return {"pixel_values": self.image_processor([[image]], return_tensors="pt")["pixel_values"]}


PROCESSORS = {"qwen2-vl": Qwen2VLImageOnlyProcessor, "smolvlm": SmolVLMImageOnlyProcessor}


def build_processor(kind: str, tokenizer, image_size: int, patch_size: int, merge_size: int) -> ImageOnlyProcessor:
    if kind not in PROCESSORS:
        raise ValueError(f"unknown vision-language architecture {kind!r}; known: {', '.join(PROCESSORS)}")
    return PROCESSORS[kind](tokenizer, image_size, patch_size, merge_size)


@dataclass
class ImageBatch:
    """The images of a batch of sequences, one row per sequence, in batch order."""

    processor: ImageOnlyProcessor
    rows: list[dict[str, torch.Tensor]]

    @classmethod
    def from_bytes(cls, processor: ImageOnlyProcessor, blobs: Sequence[bytes]) -> "ImageBatch":
        return cls(processor, processor.pixel_rows(blobs))

    def __len__(self) -> int:
        return len(self.rows)

    def repeat(self, times: int) -> "ImageBatch":
        """Each row `times` times in a row: the layout of G samples per prompt."""
        return ImageBatch(self.processor, [r for r in self.rows for _ in range(times)])

    def select(self, index) -> "ImageBatch":
        return ImageBatch(self.processor, [self.rows[int(i)] for i in np.asarray(index).reshape(-1)])

    def inputs_for(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model, on input_ids' device."""
        return {k: v.to(input_ids.device) for k, v in self.processor.model_inputs(input_ids, self.rows).items()}


def _vision_config(kind: str, vision, text_hidden_size: int) -> dict:
    if kind == "qwen2-vl":
        return dict(
            depth=vision.num_layers, embed_dim=vision.hidden_size, hidden_size=text_hidden_size,
            num_heads=vision.num_heads, mlp_ratio=vision.intermediate_size // vision.hidden_size,
            patch_size=vision.patch_size, spatial_merge_size=vision.merge_size, temporal_patch_size=TEMPORAL_PATCH,
        )
    return dict(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size, num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads, image_size=vision.image_size, patch_size=vision.patch_size,
    )


def vlm_config(kind: str, text: dict, vision, tokenizer, tie_word_embeddings: bool):
    """A transformers config for `kind` with the language half `text` (a text-config dict) and the vision
    half sized by `vision` (a VisionModelConfig)."""
    from transformers import Qwen2VLConfig, SmolVLMConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKENS[kind]}
    vision_cfg = _vision_config(kind, vision, text["hidden_size"])
    if kind == "qwen2-vl":
        return Qwen2VLConfig(
            text_config=text, vision_config=vision_cfg, image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie_word_embeddings,
        )
    return SmolVLMConfig(
        text_config=text, vision_config=vision_cfg, scale_factor=vision.merge_size, image_token_id=ids["<image>"],
        tie_word_embeddings=tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
    )


def _model_class(kind: str):
    from transformers import Qwen2VLForConditionalGeneration, SmolVLMForConditionalGeneration

    return Qwen2VLForConditionalGeneration if kind == "qwen2-vl" else SmolVLMForConditionalGeneration


def build_tiny_vlm(model_cfg, tokenizer):
    """Random-init VLM (seeded: every worker builds identical weights); language half from model.tiny."""
    t, kind = model_cfg.tiny, model_cfg.tiny.architecture
    text = dict(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
    )
    if kind == "qwen2-vl":
        text["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_sections(t.hidden_size // t.num_heads)
        }
    else:
        text["model_type"] = "llama"
    config = vlm_config(kind, text, model_cfg.vision, tokenizer, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(model_cfg.init_seed)
        return _model_class(kind)(config)


def smolvlm_from_language_model(language_model, tokenizer, vision, init_seed: int):
    """A SmolVLM whose language half is `language_model` (a Llama-architecture causal LM, e.g. SmolLM2;
    its embeddings are grown to the tokenizer, image tokens included) and whose vision encoder and
    connector start from seeded random weights."""
    if language_model.config.model_type != "llama":
        raise ValueError(
            f"a SmolVLM language half must be a Llama-architecture model, got {language_model.config.model_type!r}"
        )
    if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer))  # new rows start at the mean embedding
    text = language_model.config.to_dict()
    tied = bool(getattr(language_model.config, "tie_word_embeddings", False))
    config = vlm_config("smolvlm", text, vision, tokenizer, tie_word_embeddings=tied)
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        model = _model_class("smolvlm")(config)
    missing, unexpected = model.model.text_model.load_state_dict(language_model.model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise ValueError(f"language half does not fit: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    else:
        model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    return model.to(dtype=next(language_model.parameters()).dtype)
