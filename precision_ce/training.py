"""Training helpers shared by the apps (``precision-ce demo``, its real-text corpus, ``precision-ce rl``).

One place for what every app's training loop does the same way: the presets it compares, the
optimiser and its learning-rate schedule, drawing batches, and the one-thread setting that small
models need on a CPU. The apps import this module, never each other.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .config import PRESETS

DEFAULT_PRESETS: tuple[str, ...] = ("cross_entropy", "precision", "diversity", "tail_penalty", "head_reward")
"""The paper's five settings, in the order every app reports them."""


def parse_presets(text: str) -> list[str]:
    """Comma-separated preset names, duplicates dropped; [] when empty or any name is unknown."""
    presets = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    return presets if all(name in PRESETS for name in presets) else []


def cosine_to_a_tenth(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of the learning rate from its peak to a tenth of it over ``steps`` steps (then
    flat): the final metrics describe a settled model rather than one noisy Adam step (at the peak
    rate the entropy wanders by a few hundredths of a nat)."""

    def rate_factor(step: int) -> float:
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(step, steps) / steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, rate_factor)


def train(model: nn.Module, batch_loss: Callable[[torch.Tensor], torch.Tensor], *, examples: int,
          batch_size: int, steps: int, learning_rate: float, generator: torch.Generator,
          after_step: Callable[[int], None] | None = None) -> None:
    """Adam with ``cosine_to_a_tenth`` for ``steps`` steps on batches drawn with replacement.

    Each step draws ``batch_size`` example indices in ``[0, examples)`` from ``generator`` (on the
    CPU, then moved to the model's device, so the batch order is the same on every device) and
    minimises ``batch_loss(indices)``. Seed ``generator`` identically for every preset and the
    presets see the same batches. ``after_step(step)`` runs after every update (step from 1).
    """
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = cosine_to_a_tenth(optimizer, steps)
    model.train()
    for step in range(1, steps + 1):
        batch = torch.randint(0, examples, (batch_size,), generator=generator).to(device)
        loss = batch_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step(step)


@contextlib.contextmanager
def single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """One intra-op thread while training on the CPU, restored afterwards.

    The apps' models and batches are tiny: intra-op threads cost more in synchronisation than they
    save, and on a busy machine far more (measured 10-20x slower per step with 2 threads).
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
