"""`dist2` (seed 003, DIST²Loss): cross-entropy plus α·KL(p_d ‖ p_θ) at each digit, with
p_d(v) = softmax_v(−(v − t)²/τ) over the digit tokens."""

from __future__ import annotations

from pydantic import Field

from orchestrator.methods.losses import dist2_loss
from orchestrator.methods.objectives.base import SFT_OBJECTIVES, TokenObjective
from orchestrator.methods.registry import MethodParams


class Dist2Params(MethodParams):
    tau: float = Field(
        1.0, gt=0, description="`dist2`: temperature τ of the digit target softmax(-(v - t)² / τ); smaller is "
        "sharper (DIST²Loss, seed 003: 1).",
    )
    alpha: float = Field(
        0.1, ge=0, description="`dist2`: α, the weight of the digit tokens' KL(target ‖ model) added to the CE "
        "(DIST²Loss, seed 003: 0.1).",
    )
    place_value_weights: bool = Field(
        False, description="`dist2`: weight each digit's KL by its place (units 1, tens 2, hundreds 3, "
        "thousands and above 4) (DIST²Loss, seed 003).",
    )


@SFT_OBJECTIVES.register("dist2", params=Dist2Params, source="DIST²Loss (seed 003)")
class Dist2(TokenObjective):
    """Cross-entropy plus a distance-aware KL to a target centred on each digit."""

    def loss(self, logits, labels, digit_token_ids):
        p = self.params
        return dist2_loss(
            logits, labels, digit_token_ids, tau=p.tau, alpha=p.alpha, place_value_weights=p.place_value_weights
        )
