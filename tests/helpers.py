"""Independent fp64 oracle and input makers shared by the tests."""

from __future__ import annotations

import torch

from precision_ce import RewardConfig


def surrogate_loss_fp64(
    logits: torch.Tensor,
    target: torch.Tensor,
    reward: RewardConfig,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-row surrogate -sum_a sg(w_a) log pi_a + zeta lse**2 in fp64, straight from the spec.

    Written independently of precision_ce.reference: K from a stable descending sort, w_y from
    the closed forms. logits (rows, V) float64 with requires_grad; returns (rows,) float64.
    """
    rows, vocab = logits.shape
    z = logits
    if softcap is not None:
        z = torch.where(logits == -torch.inf, logits, softcap * torch.tanh(logits / softcap))
    log_p = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    p = log_p.detach().exp()
    valid = target != ignore_index
    y = torch.where(valid, target, 0)
    pi_y = p.gather(1, y[:, None])[:, 0]
    if reward.positive_reward == "power":
        w_y = pi_y ** (1 - (1 - pi_y) ** reward.beta)
    else:
        w_y = (1 - pi_y) ** reward.beta
    order = torch.sort(logits.detach(), dim=-1, descending=True, stable=True).indices
    head = torch.zeros(rows, vocab, dtype=torch.bool).scatter(1, order[:, : reward.k], True)
    rewards = torch.tensor([reward.lambda_tail, reward.lambda_head], dtype=torch.float64)
    w = rewards[head.long()] * p
    w = w.scatter(1, y[:, None], w_y[:, None])
    c = torch.ones(vocab, dtype=torch.float64) if weight is None else weight.double()
    w = c[y][:, None] * (1 - label_smoothing) * w + c * label_smoothing / vocab
    terms = torch.where(w == 0, 0.0, w * log_p)
    loss = -terms.sum(-1) + z_loss * lse**2
    return torch.where(valid, loss, 0.0)


def random_logits(rows: int, vocab: int, *, scale: float = 3.0, seed: int = 0,
                  integer: bool = False) -> torch.Tensor:
    """fp64 logits; ``integer`` rounds them so that ties are common."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    return x.round() if integer else x


def random_targets(rows: int, vocab: int, *, seed: int = 0, ignore_every: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    target = torch.randint(0, vocab, (rows,), generator=generator)
    if ignore_every:
        target[::ignore_every] = -100
    return target


def cpu_peak_bytes(fn) -> int:
    """Peak CPU bytes allocated while ``fn()`` runs, from torch.profiler's allocator events
    (``precision_ce.bench.cpu_peak_from_events``)."""
    from torch.profiler import ProfilerActivity, profile

    from precision_ce.bench import cpu_peak_from_events

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    return cpu_peak_from_events(prof.profiler.kineto_results.events())
