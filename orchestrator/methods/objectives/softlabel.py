"""`softlabel` (seed 000, SoftLabel): each digit's target is (1 − η)·onehot(t) + η·ψ(t) over the 10 digits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from orchestrator.methods.losses import softlabel_loss
from orchestrator.methods.objectives.base import SFT_OBJECTIVES, TokenObjective
from orchestrator.methods.registry import MethodParams

# The paper's η for each ψ family.
PAPER_ETA = {"triangular": 0.08, "binomial": 0.05, "poisson": 0.02, "uniform": 0.05}


class SoftLabelParams(MethodParams):
    psi: Literal["triangular", "binomial", "poisson", "uniform"] = Field(
        "triangular", description="`softlabel`: the shape ψ of the soft mass over the digits 0..9, centred on the "
        "target digit (SoftLabel, seed 000; the shapes are defined in orchestrator/methods/losses.py).",
    )
    eta: float | None = Field(
        None, ge=0, le=1, description="`softlabel`: η, the mass moved from the one-hot target to ψ: "
        "q = (1 - η)·onehot + η·ψ. None: the paper's value for psi (triangular 0.08, binomial 0.05, "
        "poisson 0.02, uniform 0.05).",
    )
    softlabel_lambda: float = Field(
        2.0, gt=0, description="`softlabel`: λ, the weight of the digit tokens' soft CE beside the other tokens' "
        "CE (SoftLabel, seed 000: 2).",
    )

    def resolved_eta(self) -> float:
        return self.eta if self.eta is not None else PAPER_ETA[self.psi]


@SFT_OBJECTIVES.register("softlabel", params=SoftLabelParams, source="SoftLabel (seed 000)")
class SoftLabel(TokenObjective):
    """Soft targets on the digit tokens: each digit's mass spread over its neighbours by ψ."""

    def loss(self, logits, labels, digit_token_ids):
        p = self.params
        return softlabel_loss(logits, labels, digit_token_ids, psi=p.psi, eta=p.resolved_eta(), lam=p.softlabel_lambda)
