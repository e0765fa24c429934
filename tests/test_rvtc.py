"""RvTC (METHODS §3): bin maths against hand-computed values, the head on the last prompt token of text
and vision-language models, its place in pipelines, and its survival through a DeepSpeed checkpoint."""

import math

import pytest
import torch
from PIL import Image

from orchestrator.config import ConfigError, ModelConfig, load_run_config
from orchestrator.data.collate import chat_prompt_ids, collate_rvtc
from orchestrator.data.images import encode_png
from orchestrator.methods.rvtc import (
    RvtcHead,
    attach_rvtc_head,
    bin_centres,
    expected_values,
    find_rvtc_head,
    head_logits,
    last_token_states,
    nearest_bins,
    rvtc_loss,
)
from orchestrator.modeling.models import (
    add_lora_adapters,
    build_digit_tokenizer,
    load_image_processor,
    load_model_and_tokenizer,
    merge_lora_adapters,
)
from orchestrator.modeling.vision import ImageBatch
from orchestrator.runtime.preflight import check_generation_budgets

# ------------------------------------------------------------------ maths by hand


def test_bin_centres_are_evenly_spaced_over_the_training_range():
    assert bin_centres(10, 20, 5).tolist() == [10.0, 12.5, 15.0, 17.5, 20.0]
    c = bin_centres(1, 20, 51)  # digit-count's range with the default K: spacing 19 / 50 = 0.38
    assert len(c) == 51 and c[0] == 1 and c[-1] == 20 and math.isclose(float(c[1]), 1.38)
    with pytest.raises(ValueError, match="constant labels"):
        bin_centres(5, 5, 51)
    with pytest.raises(ValueError, match="at least 2 bins"):
        bin_centres(0, 1, 1)


def test_targets_go_to_the_nearest_centre():
    c = bin_centres(10, 20, 5)  # 10, 12.5, 15, 17.5, 20
    targets = torch.tensor([10.0, 11.2, 11.25, 11.3, 19.0, 25.0, 5.0, 16.0, 16.3])
    # 11.25 is exactly between 10 and 12.5 (tie -> lower bin); out-of-range targets clamp to the ends;
    # 16 is 1 from 15 and 1.5 from 17.5, 16.3 is 1.3 from 15 and 1.2 from 17.5
    assert nearest_bins(targets, c).tolist() == [0, 0, 0, 1, 4, 4, 0, 2, 3]


def test_prediction_is_the_expected_centre():
    c = bin_centres(10, 20, 2)
    # softmax([0, ln 3]) = [1/4, 3/4]: 10/4 + 20·3/4 = 17.5
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [50.0, -50.0]])
    assert torch.allclose(expected_values(logits, c), torch.tensor([17.5, 15.0, 10.0], dtype=torch.float64))
    c5 = bin_centres(0, 4, 5)  # 0..4; probabilities 0.1, 0.2, 0.3, 0.2, 0.2 -> 0.2 + 0.6 + 0.6 + 0.8 = 2.2
    p = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2]])
    assert math.isclose(float(expected_values(p.log(), c5)), 2.2, rel_tol=1e-6)


def test_loss_is_summed_cross_entropy_over_the_bins():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    loss, n = rvtc_loss(logits, torch.tensor([1, 0]))
    # −log(3/4) − log(1/4) = log(16/3)
    assert math.isclose(float(loss), math.log(16 / 3), rel_tol=1e-6) and float(n) == 2
    with pytest.raises(ValueError, match="expected logits"):
        rvtc_loss(logits, torch.tensor([1]))


def test_head_starts_at_the_middle_of_the_range():
    head = RvtcHead(hidden_size=8, bins=51, label_min=1, label_max=20)
    logits = head(torch.randn(3, 8))
    assert logits.shape == (3, 51)
    assert torch.allclose(expected_values(logits, head.centres()), torch.full((3,), 10.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="constant labels"):
        RvtcHead(8, 51, 3, 3)


# ------------------------------------------------------------------ the head on real models


def small_vlm(arch):
    return ModelConfig(
        tiny={"architecture": arch, "hidden_size": 32, "intermediate_size": 64},
        vision={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64},
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2-vl", "smolvlm"])
def test_head_reads_the_last_real_prompt_token_whatever_the_padding(arch):
    cfg = small_vlm(arch)
    model, tok = load_model_and_tokenizer(cfg, "tiny")
    model.eval()
    proc = load_image_processor(cfg, tok, "tiny")
    texts = ["How many?", "Count every handwritten digit you can see."]
    prompts = [chat_prompt_ids(tok, proc.prompt_text(t) if proc else t) for t in texts]
    assert prompts[0][-3:] == tok.encode("nt\n", add_special_tokens=False)  # ends in the assistant header
    batch = collate_rvtc([(p, 0) for p in prompts], tok.pad_token_id)
    batch.pop("bins")
    blobs = [encode_png(Image.new("RGB", (32, 32), (i * 90, 20, 200))) for i in range(2)]
    pixels = ImageBatch.from_bytes(proc, blobs) if proc else None
    extra = pixels.inputs_for(batch["input_ids"]) if pixels else {}
    with torch.no_grad():
        states = last_token_states(model, **batch, **extra)
        backbone = model.model(**batch, **extra).last_hidden_state  # after the final norm
        for i, p in enumerate(prompts):  # each row alone, unpadded
            alone = {"input_ids": torch.tensor([p]), "attention_mask": torch.ones(1, len(p), dtype=torch.long)}
            alone_extra = pixels.select([i]).inputs_for(alone["input_ids"]) if pixels else {}
            single = last_token_states(model, **alone, **alone_extra)
            assert torch.allclose(states[i], single[0], atol=1e-5)
            assert torch.allclose(states[i], backbone[i, len(p) - 1], atol=1e-6)
    head = attach_rvtc_head(model, 7, 0, 6)
    assert find_rvtc_head(model) is head and head.linear.in_features == 32
    assert head_logits(model, head, **batch, **extra).shape == (2, 7)


def test_attach_is_idempotent_and_refuses_another_binning():
    model, _ = load_model_and_tokenizer(ModelConfig(), "tiny")
    head = attach_rvtc_head(model, 51, 10, 100)
    assert attach_rvtc_head(model, 51, 10, 100) is head
    assert {"rvtc_head.linear.weight", "rvtc_head.linear.bias"} <= set(model.state_dict())
    with pytest.raises(ValueError, match="already has an rvtc head with 51 bins"):
        attach_rvtc_head(model, 21, 10, 100)


def test_head_trains_beside_lora_adapters_and_stays_after_the_merge():
    model, tok = load_model_and_tokenizer(ModelConfig(), "tiny")
    adapted = add_lora_adapters(model, ModelConfig(lora={"enabled": True, "r": 4}).lora)
    head = attach_rvtc_head(adapted, 5, 0, 4)  # attached to the base model under the peft wrapper
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any("rvtc_head" in n for n in trainable) and all("lora_" in n or "rvtc_head" in n for n in trainable)
    batch = collate_rvtc([(chat_prompt_ids(tok, "Rate it."), 3)], tok.pad_token_id)
    loss, _ = rvtc_loss(head_logits(adapted, head, batch["input_ids"], batch["attention_mask"]), batch["bins"])
    loss.backward()
    assert head.linear.bias.grad is not None and head.linear.bias.grad.abs().sum() > 0
    merged = merge_lora_adapters(adapted)
    assert find_rvtc_head(merged) is head


# ------------------------------------------------------------------ pipelines and driver checks


def test_rvtc_in_pipelines():
    cfg = load_run_config(overrides=["pipeline=sft:rvtc"])
    assert cfg.pipeline[0].loss == "rvtc" and cfg.pipeline[0].rvtc_bins == 51 and cfg.pipeline_label() == "sft:rvtc"
    chain = load_run_config(overrides=["pipeline=sft:ce -> sft:rvtc", "pipeline.1.rvtc_bins=21"])
    assert chain.pipeline[1].rvtc_bins == 21 and chain.pipeline_label() == "sft:ce -> sft:rvtc"
    with pytest.raises(ConfigError, match=r"sft:rvtc must be the last stage, but grpo:ccc follows it"):
        load_run_config(overrides=["pipeline=sft:rvtc -> grpo:ccc"])
    with pytest.raises(ConfigError, match=r"sft:rvtc must be the last stage, but sft:ce follows it"):
        load_run_config(overrides=["pipeline=sft:rvtc -> sft:ce"])
    with pytest.raises(ConfigError, match=r"rvtc_bins"):
        load_run_config(overrides=["pipeline=sft:rvtc", "pipeline.0.rvtc_bins=1"])
    with pytest.raises(ConfigError, match="unknown SFT loss 'rvtk'; allowed: ce, softlabel, dist2, rvtc"):
        load_run_config(overrides=["pipeline=sft:rvtk"])


def test_a_model_answering_through_its_head_has_no_generation_budget_to_check():
    tok = build_digit_tokenizer()
    check_generation_budgets(load_run_config(overrides=["pipeline=sft:rvtc", "eval.max_new_tokens=1"]), tok, 10, 100)
    with pytest.raises(ConfigError, match="eval.max_new_tokens=1"):
        check_generation_budgets(load_run_config(overrides=["pipeline=sft:ce", "eval.max_new_tokens=1"]), tok, 10, 100)


# ------------------------------------------------------------------ checkpoint and resume on DeepSpeed


@pytest.mark.parametrize("zero", [2, 3])
def test_head_is_trained_checkpointed_and_restored_with_the_engine(tmp_path, process_group, zero):
    from orchestrator.engine.deepspeed import build_engine, full_parameters
    from orchestrator.engine.handoff import handoff_module

    cfg = load_run_config(overrides=["pipeline=sft:rvtc", "pipeline.0.lr=1e-2", f"deepspeed.zero_stage={zero}"])
    model, tok = load_model_and_tokenizer(cfg.model, "tiny")
    head = attach_rvtc_head(model, 5, 0, 4)
    engine = build_engine(model, cfg.pipeline[0], cfg)
    batch = collate_rvtc(
        [(chat_prompt_ids(tok, "Rate it."), 4), (chat_prompt_ids(tok, "Rate this one too."), 4)], tok.pad_token_id
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for _ in range(3):
        loss, n = rvtc_loss(head_logits(engine, head, **inputs), batch["bins"])
        engine.backward(loss / n)
        engine.step()

    def predictions(eng):
        with torch.no_grad(), full_parameters(eng) as module:
            h = find_rvtc_head(module)
            return expected_values(head_logits(module, h, **inputs), h.centres())

    trained = predictions(engine)
    assert (trained > 2.0).all()  # from the middle of [0, 4] towards the target 4
    engine.save_checkpoint(str(tmp_path), tag="ckpt")
    # Resume: a fresh model gets a fresh (zero) head, then the checkpoint restores the trained one.
    fresh, _ = load_model_and_tokenizer(cfg.model, "tiny")
    attach_rvtc_head(fresh, 5, 0, 4)
    restored = build_engine(fresh, cfg.pipeline[0], cfg)
    assert torch.allclose(predictions(restored), torch.full((2,), 2.0, dtype=torch.float64))
    restored.load_checkpoint(str(tmp_path), tag="ckpt", load_module_strict=True)
    assert torch.allclose(predictions(restored), trained, atol=1e-6)
    # Stage hand-off (ZeRO-3 gathers the shards into a rebuilt model): the head comes along.
    plain = handoff_module(restored)
    assert find_rvtc_head(plain) is not None and torch.allclose(predictions(plain), trained, atol=1e-5)
