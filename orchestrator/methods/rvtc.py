"""RvTC, regression via transformer-based classification (METHODS §3, seed 002).

A K-bin linear head reads the hidden state of the last prompt token (after the chat template's
assistant header, i.e. where the answer would start). Bin centres are evenly spaced over the dataset's
label range [min, max] (every split, so no test target is out of reach); a target trains towards its
nearest centre with cross-entropy over the bins; the prediction is the expected centre, Σ_k p_k · centre_k.

Choices where the paper is silent or differs:
- "last token's hidden state" is the final layer after the model's final norm (what the LM head reads);
  seed 002 mentions the penultimate state of mPLUG-Owl2, METHODS names the last one.
- the head starts at zero (weights and bias): every worker builds the same head without an RNG, and
  the first prediction is the middle of the range.
- ties between two centres go to the lower bin.

The maths is pure torch; `RvtcHead` is a plain module attached to the policy as `rvtc_head`, so
DeepSpeed trains, checkpoints and restores it with the rest of the model."""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.modeling.unwrap import base_model

HEAD_ATTR = "rvtc_head"


def bin_centres(label_min: float, label_max: float, bins: int) -> torch.Tensor:
    """K evenly spaced centres from label_min to label_max inclusive (float64)."""
    if bins < 2:
        raise ValueError(f"rvtc needs at least 2 bins, got {bins}")
    if not label_max > label_min:
        raise ValueError(
            f"rvtc needs a label range, got min {label_min} and max {label_max} (constant labels)"
        )
    return torch.linspace(float(label_min), float(label_max), bins, dtype=torch.float64)


def nearest_bins(targets: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the centre nearest each target (long); out-of-range targets go to the end bins."""
    targets = torch.as_tensor(targets, dtype=torch.float64)
    distance = (targets.unsqueeze(-1) - centres.to(targets.device)).abs()
    return distance.argmin(-1)  # argmin returns the first minimum: a tie goes to the lower bin


def expected_values(logits: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Σ_k softmax(logits)_k · centre_k per row, float64."""
    probs = torch.softmax(logits.double(), dim=-1)
    return probs @ centres.to(device=probs.device, dtype=torch.float64)


def rvtc_loss(logits: torch.Tensor, target_bins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ cross-entropy over the bins, number of samples): the caller divides by the global count."""
    if logits.dim() != 2 or target_bins.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, K] and targets [N], got {tuple(logits.shape)} and {tuple(target_bins.shape)}"
        )
    loss = nn.functional.cross_entropy(logits.float(), target_bins.to(logits.device), reduction="sum")
    return loss, torch.tensor(float(len(target_bins)), device=logits.device)


class RvtcHead(nn.Module):
    """Linear(hidden, K) plus the label range it was built for. The range is kept as plain floats, not a
    buffer: a bf16 engine would round buffers, and the centres must stay exact."""

    def __init__(self, hidden_size: int, bins: int, label_min: float, label_max: float):
        super().__init__()
        self.label_min, self.label_max, self.bins = float(label_min), float(label_max), int(bins)
        bin_centres(self.label_min, self.label_max, self.bins)  # refuse a degenerate range now
        self.linear = nn.Linear(hidden_size, bins)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def centres(self) -> torch.Tensor:
        return bin_centres(self.label_min, self.label_max, self.bins)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype))

    def extra_repr(self) -> str:
        return f"bins={self.bins}, range=[{self.label_min:g}, {self.label_max:g}]"


def find_rvtc_head(module: nn.Module) -> RvtcHead | None:
    return getattr(base_model(module), HEAD_ATTR, None)


def text_hidden_size(model: nn.Module) -> int:
    config = base_model(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def attach_rvtc_head(model: nn.Module, bins: int, label_min: float, label_max: float) -> RvtcHead:
    """The model's head, created if missing. A head already there (a resumed or handed-off model) must
    match: a different K or label range would silently change what the checkpoint means."""
    base = base_model(model)
    head = getattr(base, HEAD_ATTR, None)
    if head is not None:
        if (head.bins, head.label_min, head.label_max) != (bins, float(label_min), float(label_max)):
            raise ValueError(
                f"the model already has an rvtc head with {head.bins} bins over [{head.label_min:g}, "
                f"{head.label_max:g}], not {bins} over [{label_min:g}, {label_max:g}]"
            )
        return head
    ref = next(base.parameters())
    head = RvtcHead(text_hidden_size(base), bins, label_min, label_max).to(device=ref.device, dtype=ref.dtype)
    setattr(base, HEAD_ATTR, head)  # a submodule: in the engine's parameters, optimizer and checkpoints
    return head


def last_token_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
    """Final-layer hidden state at each row's last real token, [B, H], for RIGHT-padded rows (positions
    then start at 0 for every row, exactly as for an unpadded prompt). `logits_to_keep=1` spares the
    vocabulary projection the head does not need."""
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1, **extra
    )
    hidden = out.hidden_states[-1]  # transformers puts the post-norm state last
    last = attention_mask.long().sum(-1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]


def head_logits(model, head: RvtcHead, input_ids, attention_mask, **extra) -> torch.Tensor:
    """[B, K] bin logits for right-padded prompts; `model` may be an engine, a peft model or a plain one."""
    return head(last_token_states(model, input_ids, attention_mask, **extra)).float()
