"""GRPO rewards (METHODS §4): plain functions on numbers, no torch.

A run's reward is a weighted sum of named terms; each term is logged on its own. A term is either
per-sample or batch-level (CCC needs the whole minibatch). A reward is `fn(ctx: RewardContext) -> B lists
of G floats`; a registered one with parameters also receives its config section, `fn(ctx, params)`.
Users name their own as `module:function`."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from orchestrator.methods.answers import parse_answer
from orchestrator.methods.metrics import ccc
from orchestrator.methods.registry import MethodParams, Registry

Grid = list[list[float]]
REWARD_PARSE_FAILURE_POLICIES = ("penalty", "random")


@dataclass
class RewardContext:
    texts: Sequence[Sequence[str]]  # B prompts x G completions
    parsed: Sequence[Sequence[float | None]]
    targets: Sequence[float]
    label_min: float
    label_max: float
    label_step: float = 1.0  # the dataset's label resolution (the `accuracy` reward's default tolerance)
    stage: Any = None  # the GRPOStage config: registered rewards read their parameters from it
    columns: dict[str, list] = field(default_factory=dict)  # the dataset's columns per prompt
    lengths: Sequence[Sequence[int]] = ()  # B x G completion lengths in tokens (empty where not known)

    @property
    def label_range(self) -> float:
        return max(self.label_max - self.label_min, 1e-12)


REWARDS: Registry[Callable[..., Grid]] = Registry("reward")


class MaeRewardParams(MethodParams):
    mae_reward_form: Literal["neg_range", "one_minus_scaled"] = Field(
        "neg_range", description="Form of the point-wise `mae` reward (METHODS §4): neg_range is "
        "−min(1, |ŷ − y| / label range) (a parse failure gets −1, so no answer scores below not answering); "
        "one_minus_scaled is 1 − min(1, |ŷ − y| / mae_scale) (a failure gets 0).",
    )
    mae_scale: float | None = Field(
        None, gt=0, description="The scale of `one_minus_scaled`; None takes the training label range.",
    )


class AccuracyRewardParams(MethodParams):
    accuracy_tolerance: float | None = Field(
        None, ge=0, description="`accuracy` (R1-AQA style, seed 004) pays 1 when |ŷ − y| is at most this. None: "
        "when |ŷ − y| < label_step / 2, the rule of the `exact` metric (METHODS §2), so a dataset binned at "
        "500 dollars counts 4,200 for 4,000 as a hit.",
    )


class OverlongRewardParams(MethodParams):
    overlong_buffer: int = Field(
        4, ge=1, description="`overlong` (DAPO's soft overlong punishment, Yu et al. 2025): the last this many "
        "tokens of max_new_tokens; a completion reaching into them is penalised linearly, from 0 at "
        "max_new_tokens − overlong_buffer to −1 at max_new_tokens. The term's weight is DAPO's penalty factor.",
    )


def batch_ccc_rewards(preds: Sequence[Sequence[float | None]], targets: Sequence[float]) -> Grid:
    """CCC reward of every sample: for prompt i, sample g, CCC over x = [ŷ_ig, m_j for j ≠ i],
    y = [y_i, y_j for j ≠ i], where m_j is the mean of prompt j's parsed samples (prompts with none
    contribute nothing). A parse failure gets 0."""
    means = [
        (sum(v for v in group if v is not None) / n) if (n := sum(v is not None for v in group)) else None
        for group in preds
    ]
    out: Grid = []
    for i, group in enumerate(preds):
        others_x = [m for j, m in enumerate(means) if j != i and m is not None]
        others_y = [targets[j] for j, m in enumerate(means) if j != i and m is not None]
        out.append([0.0 if v is None else ccc([v, *others_x], [targets[i], *others_y]) for v in group])
    return out


def mae_reward(pred: float | None, target: float, *, form: str, label_range: float,
               scale: float | None = None) -> float:
    """neg_range: −min(1, |ŷ − y| / range) (a failure gets −1: an absurd answer never scores below none);
    one_minus_scaled: 1 − min(1, |ŷ − y| / scale) (a failure gets 0)."""
    if form == "neg_range":
        return -1.0 if pred is None else -min(1.0, abs(pred - target) / label_range)
    if form == "one_minus_scaled":
        return 0.0 if pred is None else 1.0 - min(1.0, abs(pred - target) / (scale or label_range))
    raise ValueError(f"unknown mae reward form {form!r}; allowed: neg_range, one_minus_scaled")


def accuracy_reward(pred: float | None, target: float, tolerance: float | None = None,
                    label_step: float = 1.0) -> float:
    """1 for a hit: |ŷ − y| <= tolerance, or with no tolerance |ŷ − y| < label_step / 2 (the `exact` metric)."""
    if pred is None:
        return 0.0
    error = abs(pred - target)
    hit = error < label_step / 2 if tolerance is None else error <= tolerance + 1e-9
    return 1.0 if hit else 0.0


def overlong_penalty(length: int, max_new_tokens: int, buffer: int) -> float:
    """0 up to max_new_tokens − buffer tokens, then falling linearly to −1 at max_new_tokens (DAPO)."""
    return min(0.0, (max_new_tokens - buffer - length) / buffer)


def substitute_parse_failures(parsed: Sequence[Sequence[float | None]], policy: str, label_min: float,
                              label_max: float, seed: Sequence[int]) -> list[list[float | None]]:
    """What the reward terms see of the parsed answers (METHODS §1). penalty: the failures stay None and each
    term gives them its own failure value; random: each failure becomes a uniform draw over [label_min,
    label_max], as the official CCC-GRPO code does, from a generator seeded by `seed` (e.g. run seed, stage,
    step, rank), so a rerun or a resumed stage draws the same values."""
    if policy not in REWARD_PARSE_FAILURE_POLICIES:
        raise ValueError(f"unknown reward parse-failure policy {policy!r}; "
                         f"allowed: {', '.join(REWARD_PARSE_FAILURE_POLICIES)}")
    if policy == "penalty":
        return [list(group) for group in parsed]
    rng = np.random.default_rng([int(x) % 2**64 for x in seed])  # a seed sequence takes no negative entries
    return [[float(rng.uniform(label_min, label_max)) if v is None else v for v in group] for group in parsed]


def format_reward(text: str, parsed: float | None, label_min: float, label_max: float) -> float:
    """0.5 when the completion is in the answer format and the number lies in the label range."""
    ok = parsed is not None and parse_answer(text) is not None and label_min <= parsed <= label_max
    return 0.5 if ok else 0.0


@REWARDS.register("ccc", source="CCC-GRPO (seed 001): batch-level concordance")
def _ccc(ctx: RewardContext) -> Grid:
    return batch_ccc_rewards(ctx.parsed, ctx.targets)


@REWARDS.register("mae", params=MaeRewardParams, source="point-wise baseline of CCC-GRPO (seed 001)")
def _mae(ctx: RewardContext, params: MaeRewardParams) -> Grid:
    form, scale = params.mae_reward_form, params.mae_scale
    return [
        [mae_reward(p, y, form=form, label_range=ctx.label_range, scale=scale) for p in group]
        for group, y in zip(ctx.parsed, ctx.targets)
    ]


@REWARDS.register("accuracy", params=AccuracyRewardParams, source="R1-AQA (seed 004)")
def _accuracy(ctx: RewardContext, params: AccuracyRewardParams) -> Grid:
    tol, step = params.accuracy_tolerance, ctx.label_step
    return [[accuracy_reward(p, y, tol, step) for p in group] for group, y in zip(ctx.parsed, ctx.targets)]


@REWARDS.register("format", source="METHODS §4")
def _format(ctx: RewardContext) -> Grid:
    return [
        [format_reward(t, p, ctx.label_min, ctx.label_max) for t, p in zip(texts, parsed)]
        for texts, parsed in zip(ctx.texts, ctx.parsed)
    ]


@REWARDS.register("overlong", params=OverlongRewardParams, source="DAPO soft overlong punishment (Yu et al. 2025)")
def _overlong(ctx: RewardContext, params: OverlongRewardParams) -> Grid:
    if not ctx.lengths:
        raise ValueError("the `overlong` reward needs the completions' lengths (RewardContext.lengths)")
    budget = ctx.stage.max_new_tokens
    return [[overlong_penalty(n, budget, params.overlong_buffer) for n in group] for group in ctx.lengths]


def resolve_reward(name: str) -> Callable[[RewardContext], Grid]:
    """A reward as a function of the context alone: a registered name (bound to its parameters from the
    context's stage), or `package.module:function` for a user's own reward."""
    if name in REWARDS:
        entry = REWARDS.entry(name)
        if entry.params is None:
            return entry.value
        return lambda ctx: entry.value(ctx, REWARDS.params_of(name, ctx.stage))
    if ":" not in name:
        raise ValueError(
            f"unknown reward {name!r}; registered: {', '.join(sorted(REWARDS.names()))}, or module:function"
        )
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import reward {name!r}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


def compute_rewards(terms: Sequence[tuple[str, float]], ctx: RewardContext) -> tuple[Grid, dict[str, Grid]]:
    """(weighted total, each term's own values), every grid B x G."""
    shape = [len(g) for g in ctx.parsed]
    per_term: dict[str, Grid] = {}
    for name, _ in terms:
        values = resolve_reward(name)(ctx)
        if [len(g) for g in values] != shape:
            raise ValueError(f"reward {name!r} returned groups of sizes {[len(g) for g in values]}, expected {shape}")
        per_term[name] = [[float(v) for v in g] for g in values]
    total = [
        [sum(w * per_term[name][i][k] for name, w in terms) for k in range(n)] for i, n in enumerate(shape)
    ]
    return total, per_term
