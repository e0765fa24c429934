"""Tokenisation and batching: chat prompts, answer-only labels, and a resumable sample order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the user turn plus the assistant header, exactly what generation continues from."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_sft_example(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the loss sees only the completion and its end-of-turn token."""
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    answer_ids = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def pad_batch(sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if side == "right":
            out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        else:
            out[i, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
    return out


def collate_sft(examples: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    input_ids = pad_batch([e[0] for e in examples], pad_token_id)
    labels = pad_batch([e[1] for e in examples], IGNORE_INDEX)
    attention_mask = pad_batch([[1] * len(e[0]) for e in examples], 0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_prompts(
    prompt_ids: Sequence[Sequence[int]], pad_token_id: int, side: str = "left"
) -> dict[str, torch.Tensor]:
    """Padded prompts: left for batched generation, right where a head reads each row's last token."""
    return {
        "input_ids": pad_batch(prompt_ids, pad_token_id, side=side),
        "attention_mask": pad_batch([[1] * len(p) for p in prompt_ids], 0, side=side),
    }


def collate_rvtc(examples: Sequence[tuple[list[int], int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, target bin) pairs -> right-padded prompts and the bins (rvtc reads the last real token)."""
    batch = collate_prompts([e[0] for e in examples], pad_token_id, side="right")
    batch["bins"] = torch.tensor([e[1] for e in examples], dtype=torch.long)
    return batch


def stream_indices(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """Positions start..start+count of an endless stream of per-epoch shuffles of range(n).

    The order depends only on (seed, position), so a resumed run continues exactly where the
    checkpoint left off without saving any sampler state.
    """
    if n <= 0:
        raise ValueError("cannot sample from an empty split")
    positions = np.arange(start, start + count)
    epochs = positions // n
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % n]
    return out


def micro_batch_indices(
    n: int, seed: int, step: int, micro_step: int, grad_accum: int, rank: int, world: int, micro_batch: int
) -> np.ndarray:
    """This worker's sample indices for one micro-batch of one optimizer step (disjoint across ranks)."""
    start = ((step * grad_accum + micro_step) * world + rank) * micro_batch
    return stream_indices(n, seed, start, micro_batch)


def step_indices(n: int, seed: int, step: int, grad_accum: int, world: int, micro_batch: int) -> np.ndarray:
    """Every worker's sample indices for one optimizer step: the union of all ranks' micro-batches.
    Any worker can compute it, so global counts over the step need no communication."""
    per_step = grad_accum * world * micro_batch
    return stream_indices(n, seed, step * per_step, per_step)


def supervised_counts(examples: Sequence[tuple[list[int], list[int]]]) -> np.ndarray:
    """Per encoded SFT example, how many labels the loss sees (as counted in a collated batch:
    position 0 predicts nothing)."""
    return np.array([sum(1 for t in labels[1:] if t != IGNORE_INDEX) for _, labels in examples], dtype=np.int64)
