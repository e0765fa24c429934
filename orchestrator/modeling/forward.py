"""Forward passes that compute only what a loss reads."""

from __future__ import annotations

import torch

from orchestrator.data.collate import IGNORE_INDEX, collate_prompts, pad_batch
from orchestrator.modeling.generation import prompt_prefill
from orchestrator.modeling.last_layer import KEYWORD as LAST_LAYER_FROM
from orchestrator.modeling.last_layer import takes_last_layer_from


def supervised_logits(model, batch: dict[str, torch.Tensor], keep_only_supervised: bool = True):
    """(logits [N, V], labels [N]) at the N positions that predict a supervised label, for right-padded
    rows. With `keep_only_supervised` the LM head runs only from the first position any row supervises
    (`logits_to_keep`): prompt positions before it never reach the vocabulary projection, nor, on a model
    with `enable_last_layer_from`, the last decoder layer's queries and MLP. Either way only the supervised
    positions reach the loss; ignored positions add nothing to any loss's sum or count, so the loss is the
    one computed from full logits (tests/test_stage_maths.py). Labels may stay on the host (the SFT stage keeps
    them there): which positions reach the LM head is then known without waiting for the device, and only the
    selected labels are copied to it."""
    labels = batch["labels"][:, 1:]  # labels[:, t] is predicted by the logits at position t
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    start = 0
    if keep_only_supervised:
        rows_supervise = (labels != IGNORE_INDEX).any(0).nonzero()
        start = int(rows_supervise[0]) if len(rows_supervise) else labels.shape[1]
        inputs["logits_to_keep"] = labels.shape[1] + 1 - start  # positions start..T-1; T-1 predicts nothing
        if takes_last_layer_from(model):
            inputs[LAST_LAYER_FROM] = start
    logits = model(**inputs).logits
    logits = logits[:, -(labels.shape[1] + 1 - start) : -1, :]  # positions start..T-2
    labels = labels[:, start:]
    rows, columns = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # row-major, as boolean-mask indexing
    device = logits.device
    picked = logits[rows.to(device, non_blocking=True), columns.to(device, non_blocking=True)]
    return picked.float(), labels[rows, columns].to(device, non_blocking=True)


def token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, images=None, start: int = 0, keep: bool = False,
    temperature: float = 1.0, entropy: str | None = None,
):
    """log p(token_t | tokens_<t) for t = start+1..T-1, shape [N, T-1-start]; `images` one row per sequence.
    `start` skips prompt positions that no row needs (the loss reads completion tokens only); with `keep`
    the model computes the LM head for the kept positions only (`logits_to_keep`), else full logits are
    sliced. log_softmax(x)[y] is computed as x[y] − logsumexp(x), never materialising [N, T, V] log-probs.
    p is the distribution sampled at `temperature`, softmax(logits / T), as TRL's GRPO computes it (top_p's
    truncation is not applied, as in TRL). `entropy` ("detached" or "differentiable") also returns each
    position's entropy from the same logits: (log-probs, entropy)."""
    extra = images.inputs_for(input_ids) if images is not None else {}
    width = input_ids.shape[1] - start  # positions start..T-1; the last predicts nothing
    if keep and start > 0:
        extra["logits_to_keep"] = width
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, -width:-1, :].float()
    logits = tempered(logits, temperature)
    return logprobs_of(logits, input_ids[:, start + 1 :], entropy)


def logprobs_of(logits: torch.Tensor, targets: torch.Tensor, entropy: str | None = None):
    """log_softmax(logits)[targets] as x[y] − logsumexp(x), never materialising [N, T, V] log-probs. With `entropy`,
    also H = logsumexp(x) − Σ softmax(x)·x at each position: "differentiable" keeps its graph (an entropy bonus
    trains on it), "detached" computes it without one (statistics, token selection)."""
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if entropy is None:
        return logp
    if entropy not in ("detached", "differentiable"):
        raise ValueError(f"entropy must be None, 'detached' or 'differentiable', not {entropy!r}")
    with torch.set_grad_enabled(entropy == "differentiable" and torch.is_grad_enabled()):
        # Σ p·x as a batched dot product: no [N, T, V] product is materialised
        return logp, lse - torch.einsum("...v,...v->...", torch.softmax(logits, dim=-1), logits)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The logits of the sampling distribution at `temperature` (unchanged at 1)."""
    return logits if temperature == 1.0 else logits / temperature


def shared_prompt_logprobs(
    model, prompt_ids: list[list[int]], completions: list[list[int]], rows, group_size: int, pad_id: int,
    width: int, keep: bool = True, device: torch.device | None = None, temperature: float = 1.0,
    entropy: str | None = None,
):
    """log p(completion token k | prompt, completion_<k) for the samples `rows`, shape [len(rows), width]:
    column k is completion token k (values past a completion's end are padding, masked by the caller).

    The G samples of a prompt share it, so each distinct prompt runs through the model ONCE (left-padded,
    with a key/value cache) and its cache is repeated for its samples; only the completion tokens run per
    sample. Same log-probs and gradients as `token_logprobs` on the full rows (the prompt's states get
    the summed gradient of its samples), at a fraction of the compute when prompts are longer than
    completions, as they are for GRPO here. At `temperature` T the log-probs are those of softmax(logits / T);
    `entropy` as in `logprobs_of`."""
    owners = [j // group_size for j in rows]
    distinct = {p: i for i, p in enumerate(sorted(set(owners)))}  # prompt index -> its row in the prefill
    prompts = collate_prompts([prompt_ids[p] for p in distinct], pad_id)  # left-padded: all end at one column
    p_ids, p_mask = prompts["input_ids"].to(device), prompts["attention_mask"].to(device)
    out = prompt_prefill(model, p_ids, p_mask, keep_last=keep)
    select = torch.tensor([distinct[o] for o in owners], device=p_ids.device)
    cache = out.past_key_values
    cache.batch_select_indices(select)  # one cache row per sample (differentiable indexing)
    samples = [completions[j] for j in rows]
    c_mask = completion_mask(samples, width).long().to(p_ids.device)
    c_ids = pad_batch([s + [pad_id] * (width - len(s)) for s in samples], pad_id).to(p_ids.device)
    c_pos = p_mask.sum(-1)[select].unsqueeze(1) + torch.arange(width, device=p_ids.device)
    logits = model(
        input_ids=c_ids, attention_mask=torch.cat([p_mask[select], c_mask], 1), position_ids=c_pos,
        past_key_values=cache, use_cache=True,
    ).logits
    # Completion token 0 is predicted by the prompt's last position, token k by completion position k-1.
    logits = tempered(torch.cat([out.logits[:, -1:][select], logits[:, : width - 1]], 1).float(), temperature)
    return logprobs_of(logits, c_ids, entropy)


def completion_mask(completions: list[list[int]], width: int) -> torch.Tensor:
    """[N, width] float: 1 on each completion's tokens (the layout of `shared_prompt_logprobs`)."""
    mask = torch.zeros((len(completions), width))
    for i, c in enumerate(completions):
        mask[i, : len(c)] = 1.0
    return mask


def build_sequences(prompt_ids: list[list[int]], completions: list[list[int]], group_size: int, pad_id: int):
    """Right-padded prompt+completion rows and the mask of completion positions (aligned to t = 1..T-1)."""
    rows, comp_mask = [], []
    for j, completion in enumerate(completions):
        prompt = prompt_ids[j // group_size]
        rows.append(prompt + completion)
        comp_mask.append([0] * len(prompt) + [1] * len(completion))
    input_ids = pad_batch(rows, pad_id)
    attention_mask = pad_batch([[1] * len(r) for r in rows], 0)
    mask = pad_batch(comp_mask, 0)[:, 1:].float()
    return input_ids, attention_mask, mask
