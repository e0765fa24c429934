"""Batched, KV-cached generation shared by evaluation (greedy) and GRPO rollouts (sampled)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from orchestrator.data.collate import collate_prompts
from orchestrator.modeling.last_layer import KEYWORD as LAST_LAYER_FROM
from orchestrator.modeling.last_layer import takes_last_layer_from
from orchestrator.modeling.unwrap import base_model


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    device: torch.device | None = None,
    images=None,
) -> list[list[int]]:
    """One `generate` call for the whole batch; returns completion ids cut at the first end-of-turn.

    With num_return_sequences=G the output holds G consecutive completions per prompt; on the text path
    each prompt is prefilled once for its G samples (`shared_prompt_cache`). `images` (a
    vision.ImageBatch, one row per prompt) adds the pixel inputs; transformers encodes each image once
    and repeats its features for the G samples.
    """
    if not prompt_ids:
        return []
    batch = collate_prompts(prompt_ids, tokenizer.pad_token_id)
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    if images is not None:
        batch.update(images.inputs_for(batch["input_ids"]))
    was_training = model.training
    model.eval()
    kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences, use_cache=True)
    if num_return_sequences > 1 and images is None and batch["input_ids"].shape[1] > 1:
        kwargs.update(num_return_sequences=1, past_key_values=shared_prompt_cache(model, batch, num_return_sequences))
        batch = {k: v.repeat_interleave(num_return_sequences, 0) for k, v in batch.items()}
    if do_sample:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(
        **batch, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs
    )
    if was_training:
        model.train()
    completions = out[:, batch["input_ids"].shape[1] :].tolist()
    return [truncate_at_eos(c, tokenizer.eos_token_id, tokenizer.pad_token_id) for c in completions]


def accepts_logits_to_keep(engine_or_model) -> bool:
    """Whether the model's forward can compute the LM head at its last K positions only
    (transformers' `logits_to_keep`); models without it get full logits, sliced afterwards."""
    try:
        return "logits_to_keep" in inspect.signature(base_model(engine_or_model).forward).parameters
    except (TypeError, ValueError):
        return False


def prompt_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: bool):
    """One cached forward over left-padded prompts, positions counting each row's real tokens from 0 (as
    `generate` counts them); with `keep_last` the LM head runs at the last position only, and so does the
    last decoder layer (but its keys and values) on a model with `enable_last_layer_from`."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if keep_last else {}
    if keep_last and takes_last_layer_from(model):
        extra[LAST_LAYER_FROM] = input_ids.shape[1] - 1
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **extra)


def shared_prompt_cache(model, batch: dict[str, torch.Tensor], copies: int):
    """The key/value cache of each left-padded prompt but its last token, computed once and repeated for
    its `copies` samples. `generate` then runs only the last prompt token per sample before decoding: the
    same samples as expanding the prompts first (sampling draws nothing during the prefill), without
    computing each prompt `copies` times."""
    ids, mask = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
    cache = prompt_prefill(model, ids, mask, accepts_logits_to_keep(model)).past_key_values
    cache.batch_repeat_interleave(copies)
    return cache


def truncate_at_eos(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Keep tokens up to and including the first end-of-turn; drop padding after it."""
    for i, t in enumerate(ids):
        if t == eos_id:
            return ids[: i + 1]
    return [t for t in ids if t != pad_id] if pad_id != eos_id else ids


def decode_completions(tokenizer, completions: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
