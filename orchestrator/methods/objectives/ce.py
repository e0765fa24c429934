"""`ce`: ordinary cross-entropy on the answer tokens (the SFT baseline), with an optional weight on digits."""

from __future__ import annotations

from pydantic import Field

from orchestrator.methods.losses import ce_loss
from orchestrator.methods.objectives.base import SFT_OBJECTIVES, TokenObjective
from orchestrator.methods.registry import MethodParams


class CrossEntropyParams(MethodParams):
    digit_weight: float = Field(
        1.0, gt=0, description="`ce`: weight λ of each digit token's CE (the normaliser still counts every token "
        "once); 2 is the control that up-weights digits as SoftLabel does, without soft targets (METHODS §3).",
    )


@SFT_OBJECTIVES.register("ce", params=CrossEntropyParams, source="standard SFT")
class CrossEntropy(TokenObjective):
    """One-hot cross-entropy on the answer tokens: the SFT baseline."""

    def loss(self, logits, labels, digit_token_ids):
        return ce_loss(logits, labels, digit_token_ids, digit_weight=self.params.digit_weight)
