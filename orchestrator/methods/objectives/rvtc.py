"""`rvtc` (seed 002, regression via transformer-based classification): a K-bin linear head on the last
prompt token's hidden state, cross-entropy to the target's nearest bin centre; the model then answers
through the head (prediction Σ p_k · centre_k). The maths is in orchestrator/methods/rvtc.py."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from orchestrator.data.collate import chat_prompt_ids, collate_rvtc
from orchestrator.methods.objectives.base import SFT_OBJECTIVES, SFTObjective
from orchestrator.methods.registry import MethodParams
from orchestrator.methods.rvtc import attach_rvtc_head, head_logits, nearest_bins, rvtc_loss


class RvtcParams(MethodParams):
    rvtc_bins: int = Field(
        51, ge=2, description="`rvtc`: K, bins with evenly spaced centres over the dataset's label range "
        "(RvTC, seed 002: 51).",
    )


@SFT_OBJECTIVES.register("rvtc", params=RvtcParams, source="RvTC (seed 002)")
class RegressionViaClassification(SFTObjective):
    """A K-bin classification head on the last prompt token; the model answers through it."""

    answers_through_head = True

    def prepare(self, model, dataset) -> None:
        # Before the engine: the head's parameters join the optimizer and the checkpoint.
        self.head = attach_rvtc_head(model, self.params.rvtc_bins, dataset.label_min, dataset.label_max)

    def encode(self, tokenizer, table, prompt_text) -> list[tuple[list[int], int]]:
        """(prompt ids ending in the assistant header, nearest bin of the target) per row."""
        prompts = table.column("prompt").to_pylist()
        targets = torch.tensor(table.column("target").to_pylist(), dtype=torch.float64)
        bins = nearest_bins(targets, self.head.centres()).tolist()
        return [(chat_prompt_ids(tokenizer, prompt_text(p)), b) for p, b in zip(prompts, bins)]

    def collate(self, examples, pad_token_id: int) -> dict[str, torch.Tensor]:
        return collate_rvtc(examples, pad_token_id)

    def normaliser_counts(self, examples) -> np.ndarray:
        return np.ones(len(examples), dtype=np.int64)  # one target per sample

    def batch_loss(self, model, batch, keep_only_supervised: bool) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "bins"}
        loss_sum, _ = rvtc_loss(head_logits(model, self.head, **inputs), batch["bins"])
        return loss_sum
