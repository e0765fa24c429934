"""What an SFT objective is: how it prepares the model, encodes the training split, batches it, counts its
loss normaliser and computes a micro-batch's summed loss. The SFT stage drives any of them the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from orchestrator.data.collate import collate_sft, encode_sft_example, supervised_counts
from orchestrator.methods.answers import answer_decimals, format_answer
from orchestrator.methods.registry import Registry

SFT_OBJECTIVES: Registry[type[SFTObjective]] = Registry("SFT objective")


class SFTObjective:
    """One SFT objective bound to its parameters (the entry's config section, or None)."""

    # True where the model answers through a head instead of text: generation budgets do not apply, and no
    # token-level stage can follow.
    answers_through_head = False

    def __init__(self, params: Any = None, digit_token_ids: torch.Tensor | None = None):
        self.params = params
        self.digit_token_ids = digit_token_ids  # [10] ids of '0'..'9', on the training device

    def prepare(self, model: torch.nn.Module, dataset) -> None:
        """Before the engine is built: anything the objective adds to the model joins the optimizer."""

    def encode(self, tokenizer, table, prompt_text: Callable[[str], str]) -> list[Any]:
        raise NotImplementedError

    def collate(self, examples: Sequence[Any], pad_token_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def normaliser_counts(self, examples: Sequence[Any]) -> np.ndarray:
        """What each example adds to the loss normaliser of its global batch."""
        raise NotImplementedError

    def batch_loss(self, model, batch: dict[str, torch.Tensor], keep_only_supervised: bool) -> torch.Tensor:
        """The summed loss of one padded batch (divided by the global normaliser by the caller)."""
        raise NotImplementedError


class TokenObjective(SFTObjective):
    """An objective on the answer tokens: the prompt is masked, the loss reads the logits that predict each
    answer token. Subclasses give `loss(logits, labels, digit_token_ids) -> (loss_sum, normaliser)`."""

    decimals: int | None = None  # of the written targets: the dataset's label resolution, set by prepare

    def prepare(self, model: torch.nn.Module, dataset) -> None:
        self.decimals = answer_decimals(dataset.label_step)

    def encode(self, tokenizer, table, prompt_text: Callable[[str], str]) -> list[tuple[list[int], list[int]]]:
        """(input ids, labels) per row, the target written `<answer>…</answer>` at the label resolution."""
        if self.decimals is None:
            raise RuntimeError("prepare(model, dataset) first: the answers are written at the dataset's label step")
        prompts = table.column("prompt").to_pylist()
        targets = table.column("target").to_pylist()
        return [
            encode_sft_example(tokenizer, prompt_text(p), format_answer(t, self.decimals))
            for p, t in zip(prompts, targets)
        ]

    def collate(self, examples, pad_token_id: int) -> dict[str, torch.Tensor]:
        return collate_sft(examples, pad_token_id)

    def normaliser_counts(self, examples) -> np.ndarray:
        return supervised_counts(examples)

    def batch_loss(self, model, batch, keep_only_supervised: bool) -> torch.Tensor:
        # Imported here: the config imports this registry, and transformers need not load with it.
        from orchestrator.modeling.forward import supervised_logits

        logits, labels = supervised_logits(model, batch, keep_only_supervised)
        loss_sum, _ = self.loss(logits, labels, self.digit_token_ids)
        return loss_sum

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, digit_token_ids: torch.Tensor):
        raise NotImplementedError


def build_objective(stage, digit_token_ids: torch.Tensor) -> SFTObjective:
    """The stage's objective, bound to its parameters (read from the stage config)."""
    objective = SFT_OBJECTIVES[stage.loss]
    return objective(SFT_OBJECTIVES.params_of(stage.loss, stage), digit_token_ids)
