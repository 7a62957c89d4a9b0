"""Reward configuration of the generalised next-token objective and the paper's presets."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

PositiveReward = Literal["power", "focal"]
POSITIVE_REWARDS: tuple[str, ...] = ("power", "focal")


def is_finite(value: float) -> bool:
    """``math.isfinite`` written as comparisons (False for nan), which torch.compile can also
    evaluate on a symbolic float (a hyperparameter that changed between compiled calls)."""
    return -math.inf < value < math.inf


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The three knobs of the generalised reward (spec section 2).

    beta:         positive-reward scale; 0 is cross-entropy, < 0 sharpens ("precision"),
                  > 0 flattens ("diversity"). Must be > -1: both forms diverge at -1.
    k:            size of the head K, the k tokens with the largest logits (ties: lower index first).
    lambda_head:  reward of a wrong token inside K (the paper's lambda-tilde).
    lambda_tail:  reward of a wrong token outside K (the paper's lambda-hat).
    positive_reward: "power", w_y = pi_y ** (1 - (1 - pi_y) ** beta), or
                  "focal", w_y = (1 - pi_y) ** beta.
    """

    beta: float = 0.0
    k: int = 100
    lambda_head: float = 0.0
    lambda_tail: float = 0.0
    positive_reward: PositiveReward = "power"

    def __post_init__(self) -> None:
        for name in ("beta", "lambda_head", "lambda_tail"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not is_finite(value):
                raise ValueError(f"{name} must be a finite real number, got {value!r}")
        if self.beta <= -1.0:
            raise ValueError(
                f"beta must be > -1 (the positive reward diverges at beta <= -1), got {self.beta!r}; "
                "the paper's precision setting is beta = -0.25"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1 (the size of the top-k head), got {self.k!r}")
        if self.positive_reward not in POSITIVE_REWARDS:
            raise ValueError(
                f"positive_reward must be one of {POSITIVE_REWARDS}, got {self.positive_reward!r}"
            )

    @property
    def is_cross_entropy(self) -> bool:
        """True when every knob is at its cross-entropy value (k is then irrelevant)."""
        return self.beta == 0.0 and self.lambda_head == 0.0 and self.lambda_tail == 0.0

    def needs_rank(self, vocab_size: int) -> bool:
        """Whether the loss depends on which tokens are in the top-k head."""
        return self.lambda_head != self.lambda_tail and self.k < vocab_size

    def uniform_lambda(self, vocab_size: int) -> float:
        """The one reward of every wrong token when ``needs_rank`` is False (k >= V: all in K)."""
        return self.lambda_head if self.k >= vocab_size else self.lambda_tail


PRESETS: dict[str, RewardConfig] = {
    "cross_entropy": RewardConfig(),
    "precision": RewardConfig(beta=-0.25),
    "diversity": RewardConfig(beta=0.5),
    "tail_penalty": RewardConfig(k=100, lambda_tail=-0.1),
    "head_reward": RewardConfig(k=100, lambda_head=0.1),
}
"""The paper's five settings (spec section 4), by name."""


def preset(name: str, **overrides: object) -> RewardConfig:
    """A named preset, optionally with fields replaced, e.g. ``preset("tail_penalty", k=20)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclasses.dataclass(frozen=True)
class LossParams:
    """Everything a backend needs besides the tensors; validated by ``precision_ce.cross_entropy``.

    Feature flags are derived, not stored: a knob left at its neutral value costs nothing.
    """

    reward: RewardConfig
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None

    @property
    def has_smoothing(self) -> bool:
        return self.label_smoothing > 0.0

    @property
    def has_z_loss(self) -> bool:
        return self.z_loss != 0.0

    @property
    def is_plain_cross_entropy(self) -> bool:
        """Exactly what ``F.cross_entropy`` computes: no reward shaping, no z-loss, no softcap."""
        return self.reward.is_cross_entropy and not self.has_z_loss and not self.has_softcap
