"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), compact and on-policy.

Each step samples ``group_size`` answers to each of ``prompts_per_step`` training prompts, rewards
each answer 1 if the verifier accepts it and 0 otherwise, and scores it against its own group:

    A_i = (r_i - mean(r)) / (std(r) + eps)          (std with Bessel's correction, as TRL does)

so a group whose answers all agree (all right or all wrong) teaches nothing. The policy then takes
``updates_per_step`` Adam steps on the clipped surrogate, averaged over each answer's tokens and
then over answers:

    L = -mean_i 1/|o_i| sum_t min(rho_it A_i, clip(rho_it, 1 - eps_clip, 1 + eps_clip) A_i),
    rho_it = pi(o_it) / pi_old(o_it).

With one update per step rho = 1 and the gradient is the plain policy gradient. No KL penalty
to the prior (as in DAPO and Dr. GRPO); the prior's influence is its own entropy, which is what the
experiment measures.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from tqdm import tqdm

from ..causal_lm import sample, token_log_probs
from .metrics import answer_lengths
from .task import PathTask


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards of G answers to each of P prompts -> (P, G) group-relative advantages."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, group_size) with group_size >= 2, got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def clipped_surrogate_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, clip: float) -> torch.Tensor:
    """GRPO's loss. log_probs, old_log_probs, mask: (B, L); advantages: (B,). Returns a scalar."""
    ratio = (log_probs - old_log_probs).exp()
    advantage = advantages[:, None]
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1.0 - clip, 1.0 + clip) * advantage)
    mask = mask.to(surrogate.dtype)
    per_answer = (surrogate * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return -per_answer.mean()


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """The one RL recipe every pre-trained model gets."""

    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    learning_rate: float = 5e-4
    updates_per_step: int = 1
    clip: float = 0.2
    max_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class RLCurves:
    """Per RL step, over that step's sampled answers: mean reward, per-token entropy, length."""

    reward: list[float]
    entropy: list[float]
    length: list[float]


def train_grpo(model: nn.Module, task: PathTask, settings: GRPOSettings, generator: torch.Generator,
               bar: tqdm | None = None) -> RLCurves:
    """Run GRPO on the task's training prompts; returns the curves (the model is updated in place)."""
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    train_pairs = task.train_pairs.to(device)
    num_answer_tokens = task.max_answer_len + 1
    curves = RLCurves([], [], [])
    model.train()
    for _ in range(settings.steps):
        chosen = torch.randint(0, train_pairs.shape[0], (settings.prompts_per_step,), generator=generator,
                               device=device)
        pairs = train_pairs[chosen].repeat_interleave(settings.group_size, dim=0)
        rollout = sample(model, task.prompts(pairs), num_answer_tokens, task.eos, generator)
        rewards = task.verify(pairs, rollout.answers).float()
        advantages = group_advantages(rewards.view(-1, settings.group_size)).flatten()
        with torch.no_grad():
            old_log_probs = token_log_probs(model, rollout.tokens, num_answer_tokens)
        for _ in range(settings.updates_per_step):
            log_probs = token_log_probs(model, rollout.tokens, num_answer_tokens)
            loss = clipped_surrogate_loss(log_probs, old_log_probs, advantages, rollout.response_mask, settings.clip)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
        curves.reward.append(float(rewards.mean()))
        curves.entropy.append(float(rollout.entropy.sum() / rollout.response_mask.sum()))
        curves.length.append(float(answer_lengths(rollout.answers, task.eos).mean()))
        if bar is not None:
            bar.update(1)
    return curves
