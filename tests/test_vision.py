"""Vision-language models: the image-only processors, the prompt layout (placeholders expanded, masked
from the loss), pixel batching for G samples per prompt, and the VLM sources (tiny, local directory,
SmolVLM with the packaged SmolLM2-135M)."""

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.config import ConfigError, ModelConfig, load_run_config
from orchestrator.data.collate import IGNORE_INDEX, chat_prompt_ids, collate_prompts, collate_sft, encode_sft_example
from orchestrator.data.images import encode_png
from orchestrator.modeling.forward import build_sequences, token_logprobs
from orchestrator.modeling.generation import generate
from orchestrator.modeling.models import (
    build_digit_tokenizer,
    digit_token_ids,
    load_image_processor,
    load_model_and_tokenizer,
    load_tokenizer,
    vision_kind,
)
from orchestrator.modeling.vision import (
    IMAGE_TOKENS,
    ImageBatch,
    add_image_tokens,
    build_processor,
    mrope_sections,
    tokens_per_image,
)
from orchestrator.runtime.preflight import answer_token_length, check_generation_budgets

SMALL_VISION = {"image_size": 32, "patch_size": 8, "merge_size": 2, "hidden_size": 32, "intermediate_size": 64}
ARCHS = ["qwen2-vl", "smolvlm"]


def tiny_cfg(arch: str) -> ModelConfig:
    return ModelConfig(tiny={"architecture": arch, "hidden_size": 32, "intermediate_size": 64}, vision=SMALL_VISION)


def png(seed: int, size=(48, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return encode_png(Image.fromarray(pixels))


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request):
    cfg = tiny_cfg(request.param)
    model, tok = load_model_and_tokenizer(cfg, "tiny")
    return request.param, cfg, model.eval(), tok, load_image_processor(cfg, tok, "tiny")


# ------------------------------------------------------------------ pure helpers


def test_tokens_per_image_and_rotary_sections_by_hand():
    assert tokens_per_image(128, 16, 2) == 16  # 128 px / 16 px patches = 8 per side, merged 2x2 -> 4 x 4
    assert tokens_per_image(32, 8, 2) == 4
    assert tokens_per_image(28 * 4, 14, 2) == 16
    with pytest.raises(ValueError, match="multiple"):
        tokens_per_image(100, 16, 2)
    assert mrope_sections(128) == [16, 24, 24]  # Qwen2-VL's own split of its 128-dim heads
    assert mrope_sections(16) == [2, 3, 3] and sum(mrope_sections(8)) == 4
    with pytest.raises(ValueError):
        mrope_sections(7)


def test_vision_config_is_validated_before_compute():
    with pytest.raises(ConfigError, match="image_size .* multiple of patch_size x merge_size"):
        load_run_config(overrides=["model.vision.image_size=100"])
    with pytest.raises(ConfigError, match="must be a multiple of vision.hidden_size"):
        load_run_config(overrides=["model.tiny.architecture=qwen2-vl", "model.vision.intermediate_size=100"])
    with pytest.raises(ConfigError, match="digit-count is an image task .* cannot see images"):
        load_run_config(overrides=["data.name=digit-count"])  # the default tiny model is a text Llama
    cfg = load_run_config(overrides=["data.name=digit-count", "model.tiny.architecture=smolvlm"])
    assert cfg.model.builds_vision_model() and vision_kind(cfg.model) == "smolvlm"
    assert load_run_config(overrides=["model.source=smolvlm-smollm2-135m"]).model.builds_vision_model()


def test_image_tokens_are_single_special_tokens_and_digits_stay_single():
    for arch in ARCHS:
        tok = add_image_tokens(build_digit_tokenizer(), arch)
        ids = [tok.convert_tokens_to_ids(t) for t in IMAGE_TOKENS[arch]]
        assert len(set(ids)) == len(ids) and min(ids) >= len(build_digit_tokenizer())  # appended, not reused
        text = "".join(IMAGE_TOKENS[arch]) + "7"
        assert tok.encode(text, add_special_tokens=False) == ids + [tok.convert_tokens_to_ids("7")]
        assert tok.decode(ids, skip_special_tokens=True) == ""  # never leak into decoded answers
        digit_token_ids(tok)
        assert add_image_tokens(tok, arch) is tok and len(tok) == len(build_digit_tokenizer()) + len(ids)  # idempotent


# ------------------------------------------------------------------ processor and collation


def test_processor_pixel_shapes_and_placeholders(vlm):
    arch, cfg, _, tok, proc = vlm
    assert proc.kind == arch and proc.num_image_tokens == 4  # 32 px, 8 px patches, 2x2 merge
    rows = proc.pixel_rows([png(0), png(1, size=(40, 24))])  # a non-square image is resized to 32 x 32 too
    if arch == "qwen2-vl":
        # (32/8)^2 = 16 patches of 3 channels x 2 frames x 8 x 8 = 384 values; grid (t, h, w) = (1, 4, 4)
        assert [tuple(r["pixel_values"].shape) for r in rows] == [(16, 384)] * 2
        assert all(r["image_grid_thw"].tolist() == [[1, 4, 4]] for r in rows)
    else:
        assert [tuple(r["pixel_values"].shape) for r in rows] == [(1, 1, 3, 32, 32)] * 2
    ids = chat_prompt_ids(tok, proc.prompt_text("How many?"))
    image_positions = [i for i, t in enumerate(ids) if t == proc.image_token_id]
    assert len(image_positions) == 4 and image_positions == list(range(image_positions[0], image_positions[0] + 4))
    block = tok.encode(proc.image_block(), add_special_tokens=False)
    opener = {"qwen2-vl": ["<|vision_start|>"], "smolvlm": ["<fake_token_around_image>", "<global-img>"]}[arch]
    closer = {"qwen2-vl": "<|vision_end|>", "smolvlm": "<fake_token_around_image>"}[arch]
    assert block == tok.convert_tokens_to_ids(opener) + [proc.image_token_id] * 4 + [tok.convert_tokens_to_ids(closer)]
    assert tok.decode(ids, skip_special_tokens=True).endswith("How many?\nassistant\n")  # the text is intact


def test_sft_labels_mask_the_whole_prompt_including_image_tokens(vlm):
    arch, _, model, tok, proc = vlm
    ids, labels = encode_sft_example(tok, proc.prompt_text("How many?"), "<answer>12</answer>")
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(supervised) == "<answer>12</answer><|im_end|>"
    first = labels.index(supervised[0])
    assert all(label == IGNORE_INDEX for label in labels[:first])
    assert proc.image_token_id in ids[:first] and proc.image_token_id not in supervised
    # A batch of two rows (different lengths) with their pixels runs through the model.
    other = encode_sft_example(tok, proc.prompt_text("Count them."), "<answer>3</answer>")
    batch = collate_sft([(ids, labels), other], tok.pad_token_id)
    pixels = ImageBatch.from_bytes(proc, [png(2), png(3)])
    inputs = pixels.inputs_for(batch["input_ids"])
    if arch == "qwen2-vl":
        assert inputs["pixel_values"].shape == (32, 384) and inputs["image_grid_thw"].shape == (2, 3)
        assert torch.equal(inputs["mm_token_type_ids"].bool(), batch["input_ids"] == proc.image_token_id)
    else:
        assert inputs["pixel_values"].shape == (2, 1, 3, 32, 32)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **inputs).logits
        swapped = ImageBatch.from_bytes(proc, [png(4), png(3)]).inputs_for(batch["input_ids"])
        logits_swapped = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **swapped).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tok))
    # The image is read: another picture in row 0 changes row 0's answer logits and leaves row 1 alone.
    assert not torch.allclose(logits[0, first:], logits_swapped[0, first:])
    assert torch.allclose(logits[1], logits_swapped[1], atol=1e-5)


def test_image_batch_repeat_and_select_follow_the_sample_layout(vlm):
    _, _, _, _, proc = vlm
    batch = ImageBatch.from_bytes(proc, [png(10), png(11)])
    rep = batch.repeat(3)
    assert len(rep) == 6 and all(rep.rows[j] is batch.rows[j // 3] for j in range(6))
    assert [r is batch.rows[1] for r in rep.select(np.array([2, 3, 5])).rows] == [False, True, True]


def test_grpo_rollout_with_images_matches_the_logprob_forward(vlm):
    """One batched generate call for B prompts x G samples (pixels given once per prompt) scores each token
    exactly as the log-prob forward on the rows repeated per sample does: both see the same image in the
    same row. Swapping the two prompts' images changes the scores, so the check can fail."""
    arch, _, model, tok, proc = vlm
    prompts = [chat_prompt_ids(tok, proc.prompt_text(p)) for p in ("How many?", "Count the digits please.")]
    pixels = ImageBatch.from_bytes(proc, [png(20), png(21)])
    G = 2
    torch.manual_seed(0)
    completions = generate(model, tok, prompts, max_new_tokens=4, do_sample=True, num_return_sequences=G, images=pixels)
    assert len(completions) == 4 and all(0 < len(c) <= 4 for c in completions)
    # The same call as generation.generate, asking transformers for the scores it sampled from.
    batch = collate_prompts(prompts, tok.pad_token_id)
    batch.update(pixels.inputs_for(batch["input_ids"]))
    torch.manual_seed(0)
    out = model.generate(
        **batch, max_new_tokens=4, do_sample=True, top_k=0, num_return_sequences=G, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True,
    )
    sampled = out.sequences[:, batch["input_ids"].shape[1]:]
    assert [row[: len(c)] for row, c in zip(sampled.tolist(), completions)] == completions  # same seed, same samples
    input_ids, attention_mask, mask = build_sequences(prompts, completions, G, tok.pad_token_id)
    swapped = ImageBatch(proc, [pixels.rows[1], pixels.rows[0]])
    with torch.no_grad():
        logp = token_logprobs(model, input_ids, attention_mask, pixels.repeat(G))
        logp_swapped = token_logprobs(model, input_ids, attention_mask, swapped.repeat(G))
    for j, completion in enumerate(completions):
        start = len(prompts[j // G])
        for k, token in enumerate(completion):
            assert mask[j, start + k - 1] == 1
            expected = torch.log_softmax(out.logits[k][j].float(), -1)[token]
            assert torch.isclose(logp[j, start + k - 1], expected, atol=1e-4), (j, k)
    assert not torch.allclose(logp[mask.bool()], logp_swapped[mask.bool()], atol=1e-4)


# ------------------------------------------------------------------ sources and driver checks


def test_tiny_vlm_is_seeded_and_driver_tokenizer_matches_the_workers():
    for arch in ARCHS:
        cfg = tiny_cfg(arch)
        m1, tok = load_model_and_tokenizer(cfg, "tiny")
        m2, _ = load_model_and_tokenizer(cfg, "tiny")
        assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
        driver_tok = load_tokenizer(cfg, "tiny")
        assert driver_tok.get_vocab() == tok.get_vocab() and len(tok) == m1.get_input_embeddings().num_embeddings
        assert answer_token_length(driver_tok, 1, 20) == len("<answer>20</answer>") + 1
        base = [f"model.tiny.architecture={arch}", "data.name=digit-count"]
        check_generation_budgets(load_run_config(overrides=[*base, "eval.max_new_tokens=20"]), driver_tok, 1, 20)
        with pytest.raises(ConfigError, match="eval.max_new_tokens=19"):
            check_generation_budgets(load_run_config(overrides=[*base, "eval.max_new_tokens=19"]), driver_tok, 1, 20)


def test_a_saved_vlm_directory_loads_as_a_vlm(tmp_path, vlm):
    arch, cfg, model, tok, proc = vlm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    local = ModelConfig(source=str(tmp_path), vision=SMALL_VISION)
    assert vision_kind(local, str(tmp_path)) == arch
    loaded, ltok = load_model_and_tokenizer(local, str(tmp_path))
    lproc = load_image_processor(local, ltok, str(tmp_path))
    assert type(loaded) is type(model) and lproc.kind == arch and lproc.num_image_tokens == proc.num_image_tokens
    ids = collate_prompts([chat_prompt_ids(ltok, lproc.prompt_text("How many?"))], ltok.pad_token_id)
    pixels = ImageBatch.from_bytes(lproc, [png(5)])
    with torch.no_grad():
        a = model(**ids, **pixels.inputs_for(ids["input_ids"])).logits
        b = loaded.eval()(**ids, **pixels.inputs_for(ids["input_ids"])).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_text_sources_have_no_image_processor():
    cfg = ModelConfig()
    tok = load_tokenizer(cfg, "tiny")
    assert vision_kind(cfg, "tiny") is None and load_image_processor(cfg, tok, "tiny") is None
    with pytest.raises(ValueError, match="unknown vision-language architecture"):
        build_processor("llava", tok, 32, 8, 2)


def test_smolvlm_with_packaged_smollm2_builds_and_generates_from_an_image():
    """The real CPU default for images: SmolLM2-135M-Instruct as the language half (its weights unchanged,
    embeddings grown by the three image tokens), a fresh vision encoder + connector from model.vision."""
    from orchestrator.modeling.models import prepare_smollm2

    cfg = ModelConfig(source="smolvlm-smollm2-135m")
    model, tok = load_model_and_tokenizer(cfg)
    proc = load_image_processor(cfg, tok)
    assert type(model).__name__ == "SmolVLMForConditionalGeneration" and proc.num_image_tokens == 16
    assert len(tok) == 49152 + 3 == model.get_input_embeddings().num_embeddings
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as in SmolLM2
    from safetensors import safe_open

    with safe_open(str(prepare_smollm2() / "model.safetensors"), "pt") as f:
        original = f.get_tensor("model.layers.3.self_attn.q_proj.weight")
        embed = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(model.model.text_model.layers[3].self_attn.q_proj.weight, original)
    assert torch.equal(model.get_input_embeddings().weight[:49152], embed)
    model.eval()
    prompt = chat_prompt_ids(tok, proc.prompt_text("How many handwritten digits are in this image?"))
    assert sum(t == proc.image_token_id for t in prompt) == 16
    pixels = ImageBatch.from_bytes(proc, [png(7, size=(128, 128))])
    out = generate(model, tok, [prompt], max_new_tokens=6, images=pixels)
    assert 0 < len(out[0]) <= 6 and tok.decode(out[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("zero, lora", [(2, True), (3, False)])
def test_vlm_stage_handoff_keeps_what_the_engine_computed(process_group, zero, lora):
    """LoRA adapters merged (ZeRO-2), or ZeRO-3 shards gathered into a rebuilt model of the same VLM class:
    the next stage starts from exactly the finished stage's weights, vision tower included."""
    from orchestrator.engine.deepspeed import build_engine, full_parameters
    from orchestrator.engine.handoff import handoff_module
    from orchestrator.modeling.models import add_lora_adapters, is_lora_model

    run = load_run_config(overrides=[
        "model.tiny.architecture=qwen2-vl", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
        *[f"model.vision.{k}={v}" for k, v in SMALL_VISION.items()], f"deepspeed.zero_stage={zero}",
        f"model.lora.enabled={str(lora).lower()}", "model.lora.r=4", "pipeline.0.lr=1e-2",
    ])
    model, tok = load_model_and_tokenizer(run.model, "tiny")
    proc = load_image_processor(run.model, tok, "tiny")
    ids, labels = encode_sft_example(tok, proc.prompt_text("How many?"), "<answer>3</answer>")
    batch = collate_sft([(ids, labels)], tok.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], **ImageBatch.from_bytes(proc, [png(9)]).inputs_for(batch["input_ids"])}
    engine = build_engine(add_lora_adapters(model, run.model.lora), run.pipeline[0], run)
    for _ in range(2):
        engine.backward(engine(**inputs, labels=batch["labels"]).loss)
        engine.step()
    with torch.no_grad(), full_parameters(engine) as module:
        after = module(**inputs).logits.clone()
    plain = handoff_module(engine)
    assert type(plain).__name__ == "Qwen2VLForConditionalGeneration" and not is_lora_model(plain)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(**inputs).logits, after, atol=1e-5)
