"""The stages' fast paths compute the same losses and gradients as the straightforward ones.

- SFT: the LM head (and, with `enable_last_layer_from`, the last decoder layer) run only from the first
  supervised position and the loss fed only the supervised positions, against full logits over every
  position (ce, softlabel, dist2).
- SFT: a micro-batch split into sub-batches of similar length (less padding), against one padded batch.
- GRPO: log-probs of completion positions only, against full-sequence log-probs; with one update per
  rollout, the update's own detached log-probs as the old policy, against a separate no-grad forward; and
  each prompt run once for its G samples (a repeated key/value cache), against whole rows.
"""

import copy

import pytest
import torch

from orchestrator.config import SFTStage, load_run_config
from orchestrator.data.collate import collate_sft, encode_sft_example
from orchestrator.methods.answers import format_answer
from orchestrator.methods.grpo import grpo_loss_terms
from orchestrator.methods.objectives.base import build_objective
from orchestrator.modeling.forward import (
    build_sequences,
    completion_mask,
    shared_prompt_logprobs,
    supervised_logits,
    token_logprobs,
)
from orchestrator.modeling.generation import accepts_logits_to_keep
from orchestrator.modeling.last_layer import enable_last_layer_from
from orchestrator.modeling.models import digit_token_ids, load_model_and_tokenizer
from orchestrator.stages.sft import length_groups, micro_batch_loss

PROMPTS = ["1939 | 71 min | Comedy", "2001 | 102 min | Drama, Romance", "87 | Short", "1968 | 149 min | Action"]
TARGETS = [71.0, 100.0, 8.0, 45.0]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    cfg = load_run_config(overrides=["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64"])
    model, tokenizer = load_model_and_tokenizer(cfg.model, "tiny")
    return model.train(), tokenizer


@pytest.fixture(scope="module")
def last_layer_model_and_tokenizer(model_and_tokenizer):
    """A copy of the same tiny model, its last decoder layer computed from the first supervised position on."""
    model, tokenizer = model_and_tokenizer
    model = copy.deepcopy(model)
    assert enable_last_layer_from(model)
    return model.train(), tokenizer


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same(loss_a, grads_a, loss_b, grads_b):
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        # fp32 sums in another order: elementwise 1e-4, or 1e-6 of the tensor's largest entry for entries
        # near zero (summation-order noise scales with the largest terms, and differs between CPU kernels).
        scale = float(grads_a[name].abs().max())
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=max(1e-7, 1e-6 * scale)), name


def objective(name, params, digits):
    """The registered objective `name` with these stage fields (SFTStage field names)."""
    return build_objective(SFTStage(loss=name, **params), digits)


LOSSES = [
    ("ce", {"digit_weight": 1.0}),
    ("ce", {"digit_weight": 2.0}),
    ("softlabel", {"psi": "triangular", "eta": 0.08, "softlabel_lambda": 2.0}),
    ("softlabel", {"psi": "poisson", "eta": 0.02, "softlabel_lambda": 2.0}),
    ("dist2", {"tau": 1.0, "alpha": 0.1, "place_value_weights": False}),
    ("dist2", {"tau": 0.5, "alpha": 0.3, "place_value_weights": True}),
]


@pytest.mark.parametrize("name, params", LOSSES)
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("fixture", ["model_and_tokenizer", "last_layer_model_and_tokenizer"])
def test_sft_loss_on_supervised_positions_equals_full_logits(request, fixture, name, params, keep):
    model, tok = request.getfixturevalue(fixture)
    assert accepts_logits_to_keep(model)
    digits = digit_token_ids(tok)
    batch = collate_sft(
        [encode_sft_example(tok, p, format_answer(t)) for p, t in zip(PROMPTS, TARGETS)], tok.pad_token_id
    )
    # the straightforward path: full logits, every position, ignored ones masked inside the loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    loss = objective(name, params, digits).loss
    full, n_full = loss(logits[:, :-1, :].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), digits)
    full.backward()
    g_full = grads(model)

    kept_logits, kept_labels = supervised_logits(model, batch, keep)
    assert kept_logits.shape[0] == int((batch["labels"][:, 1:] != -100).sum())
    fast, n_fast = loss(kept_logits, kept_labels, digits)
    fast.backward()
    assert n_fast == n_full
    assert_same(full, g_full, fast, grads(model))


@pytest.mark.parametrize("fixture", ["model_and_tokenizer", "last_layer_model_and_tokenizer"])
def test_supervised_logits_runs_the_head_only_where_needed(request, fixture):
    model, tok = request.getfixturevalue(fixture)
    batch = collate_sft(
        [encode_sft_example(tok, p, format_answer(t)) for p, t in zip(PROMPTS, TARGETS)], tok.pad_token_id
    )
    head, mlp = [], []
    hooks = [model.lm_head.register_forward_hook(lambda m, i, o: head.append(o.shape[1])),
             model.model.layers[-1].mlp.register_forward_hook(lambda m, i, o: mlp.append(o.shape[1]))]
    try:
        supervised_logits(model, batch, True)
    finally:
        for hook in hooks:
            hook.remove()
    shortest_prompt = min(int((row != -100).nonzero()[0]) for row in batch["labels"])
    kept = batch["input_ids"].shape[1] - shortest_prompt + 1
    assert head == [kept]  # not every position of the batch
    assert mlp == [kept if fixture == "last_layer_model_and_tokenizer" else batch["input_ids"].shape[1]]


def rollout_ids(tok, group_size=3):
    """Chat prompts of different lengths, and group_size completions each of different lengths."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    g = torch.Generator().manual_seed(0)
    completions = []
    for j in range(len(prompts) * group_size):  # some ending in EOS
        n = 3 + j % 5
        ids = torch.randint(10, 60, (n,), generator=g).tolist()
        completions.append(ids + ([tok.eos_token_id] if j % 2 else []))
    return prompts, completions, torch.randn(len(completions), generator=g)


def rollout(tok, group_size=3):
    prompts, completions, advantages = rollout_ids(tok, group_size)
    input_ids, attention_mask, mask = build_sequences(prompts, completions, group_size, tok.pad_token_id)
    start = min(len(p) for p in prompts) - 1
    return input_ids, attention_mask, mask, start, advantages


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("keep", [True, False])
def test_grpo_loss_on_completion_positions_equals_full_sequences(model_and_tokenizer, aggregation, keep):
    model, tok = model_and_tokenizer
    input_ids, attention_mask, mask, start, adv = rollout(tok)
    assert start > 0
    with torch.no_grad():
        ref_full = token_logprobs(model, input_ids, attention_mask) + 0.05  # a reference that differs a little
        old_full = token_logprobs(model, input_ids, attention_mask) - 0.02  # a ratio away from 1: clipping active
    terms = dict(beta=0.04, kl_estimator="k3", eps_low=0.2, eps_high=0.2, aggregation=aggregation)

    logp = token_logprobs(model, input_ids, attention_mask)
    full = grpo_loss_terms(logp, old_full, ref_full, adv, mask, **terms)
    full["loss_sum"].backward()
    g_full = grads(model)

    logp = token_logprobs(model, input_ids, attention_mask, start=start, keep=keep)
    assert logp.shape == (input_ids.shape[0], input_ids.shape[1] - 1 - start)
    fast = grpo_loss_terms(logp, old_full[:, start:], ref_full[:, start:], adv, mask[:, start:], **terms)
    fast["loss_sum"].backward()
    assert_same(full["loss_sum"], g_full, fast["loss_sum"], grads(model))
    for key in ("normaliser", "kl_mean", "clip_fraction"):
        assert torch.allclose(full[key], fast[key], atol=1e-6), key


def test_one_update_per_rollout_uses_its_own_logprobs_as_the_old_policy(model_and_tokenizer):
    """num_iterations = 1: the old policy is the current one, so a separate no-grad forward gives the same
    numbers as the update's own log-probs, detached: same loss, same gradients, ratio 1, nothing clipped."""
    model, tok = model_and_tokenizer
    input_ids, attention_mask, mask, start, adv = rollout(tok)
    terms = dict(beta=0.04, kl_estimator="k3", eps_low=0.2, eps_high=0.2, aggregation="token_mean")
    with torch.no_grad():
        old = token_logprobs(model, input_ids, attention_mask, start=start, keep=True)
        ref = old + 0.05
    logp = token_logprobs(model, input_ids, attention_mask, start=start, keep=True)
    separate = grpo_loss_terms(logp, old, ref, adv, mask[:, start:], **terms)
    separate["loss_sum"].backward()
    g_separate = grads(model)

    logp = token_logprobs(model, input_ids, attention_mask, start=start, keep=True)
    detached = grpo_loss_terms(logp, logp.detach(), ref, adv, mask[:, start:], **terms)
    detached["loss_sum"].backward()
    assert_same(separate["loss_sum"], g_separate, detached["loss_sum"], grads(model))
    assert float(detached["clip_fraction"]) == 0.0


def per_completion(full: torch.Tensor, prompts, completions, group_size) -> torch.Tensor:
    """Whole-row log-probs [N, T-1] moved to the per-completion-token layout [N, longest completion]."""
    width = max(len(c) for c in completions)
    out = torch.zeros(len(completions), width, dtype=full.dtype)
    for j, c in enumerate(completions):
        first = len(prompts[j // group_size]) - 1  # the position predicting completion token 0
        out[j, : len(c)] = full[j, first : first + len(c)]
    return out


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("rows", [list(range(12)), [1, 2, 3, 4, 9]])  # whole groups; a chunk cutting groups
@pytest.mark.parametrize("fixture", ["model_and_tokenizer", "last_layer_model_and_tokenizer"])
def test_shared_prompt_logprobs_equal_whole_rows(request, fixture, keep, rows):
    """Each prompt run once, its cache repeated for its samples: the same log-probs, loss and gradients
    as running every prompt+completion row in full (with the last layer at the last prompt position only
    in the prefill, on the second fixture)."""
    model, tok = request.getfixturevalue(fixture)
    group_size = 3
    prompts, completions, adv = rollout_ids(tok, group_size)
    input_ids, attention_mask, _ = build_sequences(prompts, completions, group_size, tok.pad_token_id)
    width = max(len(c) for c in completions)
    mask = completion_mask(completions, width)[rows]
    assert mask.sum() == sum(len(completions[j]) for j in rows)
    terms = dict(beta=0.04, kl_estimator="k3", eps_low=0.2, eps_high=0.2, aggregation="token_mean")
    with torch.no_grad():
        ref = per_completion(token_logprobs(model, input_ids, attention_mask), prompts, completions, group_size)[rows]
        ref = ref + 0.05

    logp = per_completion(token_logprobs(model, input_ids, attention_mask), prompts, completions, group_size)[rows]
    whole = grpo_loss_terms(logp, logp.detach() - 0.02, ref, adv[rows], mask, **terms)
    whole["loss_sum"].backward()
    g_whole = grads(model)

    shared = shared_prompt_logprobs(model, prompts, completions, rows, group_size, tok.pad_token_id, width, keep)
    assert shared.shape == (len(rows), width)
    assert torch.allclose(shared * mask, logp.detach() * mask, atol=1e-5)
    fast = grpo_loss_terms(shared, shared.detach() - 0.02, ref, adv[rows], mask, **terms)
    fast["loss_sum"].backward()
    assert_same(whole["loss_sum"], g_whole, fast["loss_sum"], grads(model))


def test_token_logprobs_match_log_softmax(model_and_tokenizer):
    model, tok = model_and_tokenizer
    input_ids, attention_mask, _, start, _ = rollout(tok)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(token_logprobs(model, input_ids, attention_mask), expected, atol=1e-5)
        kept = token_logprobs(model, input_ids, attention_mask, start=start, keep=True)
        assert torch.allclose(kept, expected[:, start:], atol=1e-5)


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_logprobs_are_those_of_the_sampling_distribution_at_its_temperature(model_and_tokenizer, temperature):
    """Rollouts sample from softmax(logits / T), so the ratio and KL read log_softmax(logits / T) (as TRL): on
    whole rows and in the prompt-shared layout alike."""
    model, tok = model_and_tokenizer
    input_ids, attention_mask, _, start, _ = rollout(tok)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float() / temperature
        expected = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        got = token_logprobs(model, input_ids, attention_mask, temperature=temperature)
        assert torch.allclose(got, expected, atol=1e-5)
        kept = token_logprobs(model, input_ids, attention_mask, start=start, keep=True, temperature=temperature)
        assert torch.allclose(kept, expected[:, start:], atol=1e-5)
        prompts, completions, _ = rollout_ids(tok)
        rows, width = list(range(len(completions))), max(len(c) for c in completions)
        shared = shared_prompt_logprobs(model, prompts, completions, rows, 3, tok.pad_token_id, width, True,
                                        temperature=temperature)
        mask = completion_mask(completions, width)
        assert torch.allclose(shared * mask, per_completion(expected, prompts, completions, 3) * mask, atol=1e-5)


def test_length_groups_by_hand():
    assert [g.tolist() for g in length_groups([5, 9, 2, 7, 3], 2)] == [[2, 4, 0], [3, 1]]
    assert [g.tolist() for g in length_groups([5, 9, 2], 1)] == [[0, 1, 2]]  # one group keeps the order
    assert [g.tolist() for g in length_groups([5, 9], 4)] == [[0], [1]]  # never an empty group


@pytest.mark.parametrize("name, params", LOSSES[::2])
@pytest.mark.parametrize("groups", [2, 3])
def test_sft_sub_batches_of_similar_length_give_the_same_loss_and_gradients(model_and_tokenizer, name, params, groups):
    model, tok = model_and_tokenizer
    digits = digit_token_ids(tok)
    examples = [encode_sft_example(tok, p, format_answer(t)) for p, t in zip(PROMPTS, TARGETS)]

    def parts(k):
        groups_of_k = length_groups([len(e[0]) for e in examples], k)
        return [collate_sft([examples[i] for i in g], tok.pad_token_id) for g in groups_of_k]

    assert sum(p["input_ids"].numel() for p in parts(groups)) < parts(1)[0]["input_ids"].numel()  # less padding
    whole = micro_batch_loss(model, objective(name, params, digits), parts(1))
    whole.backward()
    g_whole = grads(model)
    split = micro_batch_loss(model, objective(name, params, digits), parts(groups))
    split.backward()
    assert_same(whole, g_whole, split, grads(model))
