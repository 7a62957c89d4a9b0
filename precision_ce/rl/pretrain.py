"""Stage 1: pre-train a causal LM on the corpus with one reward config of the generalised loss."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from tqdm import tqdm

from ..api import cross_entropy
from ..config import RewardConfig
from ..training import train
from .task import IGNORE_INDEX, Corpus


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Adam with a cosine decay to a tenth of the peak rate (as ``precision-ce demo``)."""

    steps: int = 400
    batch_size: int = 256
    learning_rate: float = 3e-3


def pretrain(model: nn.Module, corpus: Corpus, config: RewardConfig, settings: PretrainSettings,
             generator: torch.Generator, bar: tqdm | None = None) -> float:
    """Train ``model`` in place with ``precision_ce.cross_entropy(config=config)`` as the only loss.

    Only the answer tokens and their end token are predicted (the prompt is given). The batch order
    comes from ``generator``: seed it identically for every config so presets differ only in their loss.
    Returns the cross-entropy of the final model on the whole corpus (nats per answer token).
    """
    device = next(model.parameters()).device
    tokens, targets = corpus.tokens.to(device), corpus.targets.to(device)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[batch, :-1])
        return cross_entropy(logits.flatten(0, 1), targets[batch].flatten(), config=config, ignore_index=IGNORE_INDEX)

    train(model, batch_loss, examples=tokens.shape[0], batch_size=settings.batch_size, steps=settings.steps,
          learning_rate=settings.learning_rate, generator=generator,
          after_step=None if bar is None else lambda _: bar.update(1))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                       ignore_index=IGNORE_INDEX))
