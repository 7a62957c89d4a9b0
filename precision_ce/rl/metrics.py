"""Pass@k with the unbiased estimator of Chen et al. (2021), and the evaluation that feeds it.

With n samples per prompt of which c are correct, the probability that k samples drawn without
replacement from those n contain a correct one is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i),

an unbiased estimate of the model's pass@k. The product form never forms the huge binomials.
It is 1 when n - c < k (every k-subset holds a correct sample).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from ..causal_lm import sample
from .task import PathTask


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (1 <= k <= n, 0 <= c <= n)."""
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"need 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    failure = 1.0
    for i in range(n - c + 1, n + 1):
        failure *= 1.0 - k / i
    return 1.0 - failure


def default_ks(samples: int) -> list[int]:
    """1, 2, 4, ... up to ``samples`` (included even when not a power of two)."""
    ks = [1 << i for i in range(samples.bit_length()) if 1 << i <= samples]
    return ks if ks[-1] == samples else [*ks, samples]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Pass@k (mean over prompts) for each k, and the sampling entropy and answer length."""

    pass_at: dict[int, float]
    entropy: float  # mean per-token entropy of the sampled answers (nats)
    length: float  # mean number of answer tokens before EOS


@torch.no_grad()
def evaluate(model: nn.Module, task: PathTask, pairs: torch.Tensor, samples: int, ks: Sequence[int],
             generator: torch.Generator, batch_size: int = 4096) -> Evaluation:
    """Draw ``samples`` answers per prompt at temperature 1, verify them and estimate pass@k."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    repeated = pairs.to(device).repeat_interleave(samples, dim=0)
    correct, entropy_sum, token_count, length_sum = [], 0.0, 0, 0.0
    for start in range(0, repeated.shape[0], batch_size):
        chunk = repeated[start:start + batch_size]
        rollout = sample(model, task.prompts(chunk), task.max_answer_len + 1, task.eos, generator)
        correct.append(task.verify(chunk, rollout.answers))
        entropy_sum += float(rollout.entropy.sum())
        token_count += int(rollout.response_mask.sum())
        length_sum += float(answer_lengths(rollout.answers, task.eos).sum())
    model.train(was_training)
    counts = torch.cat(correct).view(pairs.shape[0], samples).sum(dim=1).tolist()
    pass_at = {k: sum(pass_at_k(samples, c, k) for c in counts) / len(counts) for k in ks}
    return Evaluation(pass_at, entropy_sum / token_count, length_sum / repeated.shape[0])


def answer_lengths(answers: torch.Tensor, eos: int) -> torch.Tensor:
    """(B, L) sampled tokens -> (B,) tokens before the first EOS (L when there is none)."""
    is_eos = answers == eos
    return torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), answers.shape[1]).float()
