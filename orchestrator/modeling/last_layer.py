"""The last decoder layer computed only at the positions a loss reads.

Every decoder layer but the last must run at every position: later positions attend to its keys and
values. The last layer's outputs, though, are read by the LM head alone. When a loss needs the logits
of positions `start`..T-1 only (SFT: the answer tokens; the prompt before them is context), the last
layer still computes keys and values at every position, but its queries, attention, output projection
and MLP only from `start` on. The result at those positions is the full forward's, gradients included
(tests/test_last_layer.py).

On the 2-layer tiny models of the CPU grids, where prompts are longer than answers, this skips about a
quarter of an SFT step's compute; on a 30-layer model about 2%.

`enable_last_layer_from(model)` gives the model's last decoder layer a forward that takes one more
keyword, `last_layer_from=start`, passed through the model's own forward call (so a DeepSpeed engine's
forward, hooks and ZeRO stages are unchanged); the swap itself is `compat.override_forward`. Without that
keyword the layer runs as before, and its parameters, state-dict names and checkpoints never change. It
supports the Llama and Qwen2 layouts (every text model this project builds or ships) with sdpa or eager
attention; other models keep the full forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from orchestrator import compat
from orchestrator.modeling.unwrap import base_model

KEYWORD = "last_layer_from"
# Decoder layers made of input_layernorm, self_attn (q/k/v/o_proj, rotary), post_attention_layernorm, mlp.
LAYOUTS = ("llama", "qwen2")
ATTENTION = ("sdpa", "eager")  # implementations whose masks are [B, 1, queries, keys] tensors or None


def _last_decoder_layer(model):
    """The model's last decoder layer if this module can compute it from a position on, else None."""
    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in LAYOUTS:
        return None
    if getattr(config, "_attn_implementation", None) not in ATTENTION or not hasattr(base, "get_decoder"):
        return None
    layer = base.get_decoder().layers[-1]
    if getattr(layer.self_attn, "sliding_window", None):  # a windowed layer masks differently
        return None
    return layer


def enable_last_layer_from(model) -> bool:
    """Let `model(..., last_layer_from=start)` compute its last layer from `start` on; False (and the model
    untouched) where the model's layout is not supported. Safe to call again."""
    layer = _last_decoder_layer(model)
    if layer is None:
        return False
    compat.override_forward(layer, _forward)  # this instance only: the class and other models are untouched
    return True


def takes_last_layer_from(model) -> bool:
    """Whether `enable_last_layer_from` was applied to this model."""
    layer = _last_decoder_layer(model)
    return layer is not None and compat.has_own_forward(layer)


def _forward(layer, hidden_states, *args, last_layer_from: int | None = None, **kwargs):
    """The layer's own forward, or from `last_layer_from` on when that keyword is given."""
    if last_layer_from is None:
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    return last_layer_at(
        layer, hidden_states, kwargs.get("attention_mask"), kwargs["position_embeddings"],
        kwargs.get("past_key_values"), last_layer_from,
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of [B, heads, T, head_dim] states with [B, T, head_dim] cos/sin."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def last_layer_at(layer, hidden_states, attention_mask, position_embeddings, past_key_values, start: int):
    """A Llama/Qwen2 decoder layer's output at positions start..T-1 of `hidden_states` [B, T, D]: keys and
    values at every position (added to the cache when there is one), the rest at the kept positions."""
    batch, length, _ = hidden_states.shape
    kept = length - start
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_states)
    cos, sin = position_embeddings

    def heads(states: torch.Tensor, positions: int) -> torch.Tensor:
        return states.view(batch, positions, -1, attn.head_dim).transpose(1, 2)

    query = _rotate(heads(attn.q_proj(x[:, start:]), kept), cos[:, start:], sin[:, start:])
    key = _rotate(heads(attn.k_proj(x), length), cos, sin)
    value = heads(attn.v_proj(x), length)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, attn.layer_idx)
    if attention_mask is None:  # plain causal attention: kept query i sits at key position offset + i
        offset = key.shape[2] - kept
        mask = torch.ones(kept, key.shape[2], dtype=torch.bool, device=x.device).tril(offset)
    else:  # the model's own mask (padding, causality) for the kept query rows
        mask = attention_mask[:, :, start:, :]
    out = F.scaled_dot_product_attention(
        query, repeat_kv(key, attn.num_key_value_groups), repeat_kv(value, attn.num_key_value_groups),
        attn_mask=mask, dropout_p=attn.attention_dropout if layer.training else 0.0, scale=attn.scaling,
    )
    hidden = hidden_states[:, start:] + attn.o_proj(out.transpose(1, 2).reshape(batch, kept, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
