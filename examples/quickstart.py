"""Quick start: swap F.cross_entropy for precision_ce.cross_entropy in a toy training loop.

Trains a tiny next-token model for a few steps once per preset and prints the loss and the mean
predictive entropy, so the effect of each setting is visible in seconds on a CPU.
Run: python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torch import nn

import precision_ce

VOCAB, DIM, STEPS, BATCH = 256, 64, 60, 512


def train(config: precision_ce.RewardConfig, seed: int = 0) -> tuple[float, float]:
    """Train a bigram model with the given reward; returns (final loss, mean entropy)."""
    torch.manual_seed(seed)
    # A fixed random "language": each token has a few likely successors.
    successors = torch.randn(VOCAB, VOCAB).mul(2.5).softmax(-1)
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(STEPS):
        previous = torch.randint(0, VOCAB, (BATCH,))
        target = torch.multinomial(successors[previous], 1)[:, 0]
        # The one-line change: F.cross_entropy(logits, target) -> precision_ce.cross_entropy(...).
        loss, stats = precision_ce.cross_entropy(model(previous), target, config=config, return_stats=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item(), stats.entropy.mean().item()


def main() -> None:
    print(f"{'preset':>14}  {'loss':>7}  {'entropy':>7}")
    for name in precision_ce.PRESETS:
        # k scaled to the toy vocabulary (the paper's k = 100 is for 100K+ vocabularies).
        ranked = name in ("tail_penalty", "head_reward")
        config = precision_ce.preset(name, k=16) if ranked else precision_ce.PRESETS[name]
        loss, entropy = train(config)
        print(f"{name:>14}  {loss:7.4f}  {entropy:7.4f}")


if __name__ == "__main__":
    main()
