"""The last decoder layer computed from a position on gives the full forward's outputs and gradients there.

Checked on both supported layouts (Llama, Qwen2 with its q/k/v biases), with grouped-query attention,
with a padding mask, without one, and with a key/value cache (a left-padded prompt prefill)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from orchestrator.modeling.last_layer import KEYWORD, enable_last_layer_from, takes_last_layer_from

VOCAB = 50


def tiny(config_class, attn="sdpa", kv_heads=2):
    config = config_class(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=True,
    )
    config._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def right_padded(lengths=(9, 6, 11), seed=1):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_close_grads(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        scale = float(a[name].abs().max())
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=max(1e-7, 1e-6 * scale)), name


MODELS = [
    pytest.param(LlamaConfig, "sdpa", 2, id="llama-sdpa-gqa"),
    pytest.param(LlamaConfig, "eager", 4, id="llama-eager"),
    pytest.param(Qwen2Config, "sdpa", 2, id="qwen2-sdpa-gqa"),
]


@pytest.mark.parametrize("config_class, attn, kv_heads", MODELS)
@pytest.mark.parametrize("with_mask", [True, False])
def test_logits_and_gradients_from_a_position_equal_the_full_forward(config_class, attn, kv_heads, with_mask):
    model = tiny(config_class, attn, kv_heads)
    assert enable_last_layer_from(model) and takes_last_layer_from(model)
    ids, mask = right_padded()
    inputs = {"input_ids": ids, **({"attention_mask": mask} if with_mask else {})}
    start = 4
    weights = torch.randn(ids.shape[0], ids.shape[1] - start, VOCAB, generator=torch.Generator().manual_seed(2))
    # real positions only: right-padded pads may see other keys when no mask is given, and no loss reads them
    real = mask[:, start:].bool()

    full = model(**inputs).logits[:, start:]
    (full * weights)[real].sum().backward()
    g_full = grads(model)

    part = model(**inputs, logits_to_keep=ids.shape[1] - start, **{KEYWORD: start}).logits
    assert part.shape == full.shape
    (part * weights)[real].sum().backward()
    assert torch.allclose(part[real], full[real], atol=1e-5)
    assert_close_grads(g_full, grads(model))


@pytest.mark.parametrize("config_class", [LlamaConfig, Qwen2Config])
def test_a_cached_left_padded_prefill_keeps_every_key_and_value(config_class):
    """GRPO's and generation's prompt prefill: only the last position's logits, but the whole cache."""
    model = tiny(config_class).eval()
    enable_last_layer_from(model)
    ids, mask = right_padded((5, 8, 7))
    ids, mask = ids.flip(1), mask.flip(1)  # left-padded, as prompts are
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    common = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    with torch.no_grad():
        full = model(**common)
        part = model(**common, **{KEYWORD: ids.shape[1] - 1})
    assert torch.allclose(part.logits, full.logits, atol=1e-5)
    for layer in range(2):
        full_k, full_v = full.past_key_values.layers[layer].keys, full.past_key_values.layers[layer].values
        part_k, part_v = part.past_key_values.layers[layer].keys, part.past_key_values.layers[layer].values
        real = mask.bool()  # left-pad key rows differ in nothing a real query reads
        assert torch.allclose(part_k.transpose(1, 2)[real], full_k.transpose(1, 2)[real], atol=1e-6)
        assert torch.allclose(part_v.transpose(1, 2)[real], full_v.transpose(1, 2)[real], atol=1e-6)


def test_without_the_keyword_the_layer_is_unchanged_and_so_is_the_state_dict():
    model = tiny(LlamaConfig)
    ids, mask = right_padded()
    before = model(input_ids=ids, attention_mask=mask).logits
    keys = list(model.state_dict())
    enable_last_layer_from(model)
    assert enable_last_layer_from(model)  # again: still one override, same result
    assert list(model.state_dict()) == keys
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_a_copied_model_computes_with_its_own_layer():
    model = tiny(LlamaConfig)
    enable_last_layer_from(model)
    frozen = copy.deepcopy(model)
    assert frozen.model.layers[-1].forward.__self__ is frozen.model.layers[-1]
    with torch.no_grad():
        for p in frozen.parameters():
            p.add_(0.1)
    ids, mask = right_padded()
    kwargs = dict(input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1] - 3, **{KEYWORD: 3})
    with torch.no_grad():
        assert not torch.allclose(frozen(**kwargs).logits, model(**kwargs).logits)
        full = frozen(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(frozen(**kwargs).logits, full[:, 3:], atol=1e-5)


def test_unsupported_models_are_left_alone():
    gpt2_config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    gpt2 = AutoModelForCausalLM.from_config(gpt2_config)
    assert not enable_last_layer_from(gpt2) and not takes_last_layer_from(gpt2)
    flex = tiny(LlamaConfig, attn="flex_attention")
    assert not enable_last_layer_from(flex)
    assert "forward" not in vars(flex.model.layers[-1])
