"""The demo's synthetic language: a Markov chain whose true next-token distribution is known.

A synthetic language is generated from a seed: a sparse random Markov chain over ``vocab_size``
tokens in which every token has a handful of likely successors and a long, thin tail over all the
others. Its true next-token distribution is known at every position, so entropy, top-k mass, tail
mass and KL(true || model) are computed exactly instead of estimated.

A small causal language model (token embedding, residual MLP, output projection) is trained on a
corpus sampled from the chain once per preset of ``precision_ce.PRESETS``, with the same
initialisation, the same batches and the same number of steps; only the loss differs. The chain is
first order, so the previous token is the whole context the model needs. Adam with a cosine decay
to a tenth of its peak rate, so that the final metrics describe a settled model.

Metrics (all exact expectations over the chain's stationary distribution, except the first two):

* ``val_ce`` / ``val_ppl``: cross-entropy and perplexity of the model on a held-out corpus sampled
  from the chain (the chain's entropy rate is the best any model can reach);
* ``entropy``: mean entropy of the model's next-token distribution;
* ``topk_mass``: mass of the model's own k most likely tokens (k of the loss);
* ``head_entropy``: entropy of those k tokens' probabilities, renormalised (spread inside the head);
* ``tail_mass``: mass the model puts on the true tail, the tokens that are not likely successors;
* ``kl``: KL(true || model);
* ``top1_acc``: how often the model's most likely token is the true most likely token.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..api import cross_entropy
from ..config import PRESETS, RewardConfig, preset
from ..training import DEFAULT_PRESETS, single_thread_on_cpu, train
from .report import PresetResult, Report

METRIC_COLUMNS: tuple[str, ...] = (
    "val_ce", "val_ppl", "entropy", "topk_mass", "head_entropy", "tail_mass", "kl", "top1_acc",
)
"""The per-preset metrics, in table and CSV order."""

METRIC_LABELS: dict[str, str] = {
    "val_ce": "val CE (nats)",
    "val_ppl": "val perplexity",
    "entropy": "mean entropy (nats)",
    "topk_mass": "top-k mass",
    "head_entropy": "entropy within the top-k (nats)",
    "tail_mass": "true-tail mass",
    "kl": "KL(true || model)",
    "top1_acc": "top-1 acc. vs true argmax",
}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Everything that defines one demo run besides the presets and the device.

    The defaults are the ``precision-ce demo`` defaults; tests pass smaller values.
    """

    vocab_size: int = 256
    likely_successors: int = 6  # per token; the loss's k is set to this number
    head_mass: float = 0.9  # total probability of the likely successors
    tail_exponent: float = 1.0  # Zipf exponent of the tail's probabilities
    train_tokens: int = 1 << 20
    val_tokens: int = 1 << 16
    steps: int = 2000
    batch_size: int = 512
    embedding_dim: int = 64
    hidden_dim: int = 256
    learning_rate: float = 3e-3  # peak Adam rate, decayed by a cosine to a tenth
    eval_interval: int = 50
    seed: int = 0

    @property
    def k(self) -> int:
        """The head size K of the rank-aware presets, scaled to this language.

        The paper's k = 100 is a set of plausible continuations in a vocabulary of ~150K tokens;
        here the plausible continuations of a token are exactly its likely successors.
        """
        return self.likely_successors


@dataclasses.dataclass(frozen=True)
class MarkovChain:
    """A first-order Markov chain over a vocabulary: the synthetic language of the demo.

    transition: (V, V), row s is the true next-token distribution after token s.
    stationary: (V,), the chain's stationary distribution (how often each token occurs).
    likely: (V, V) bool, the likely successors of each token; everything else is the tail.
    """

    transition: torch.Tensor
    stationary: torch.Tensor
    likely: torch.Tensor

    @property
    def vocab_size(self) -> int:
        return self.transition.shape[0]

    def entropy_rate(self) -> float:
        """Mean entropy of the true next-token distribution: the best achievable cross-entropy."""
        row_entropy = -(self.transition * self.transition.log()).sum(-1)
        return float((self.stationary * row_entropy).sum())


def make_markov_chain(
    vocab_size: int,
    likely_successors: int,
    head_mass: float,
    tail_exponent: float = 1.0,
    seed: int = 0,
) -> MarkovChain:
    """A random sparse-plus-tail Markov chain, deterministic in ``seed``.

    Every token gets ``likely_successors`` distinct successors sharing ``head_mass`` (shares drawn
    from a flat Dirichlet) and a Zipf-shaped tail over all other tokens sharing ``1 - head_mass``, so
    every transition has nonzero probability and KL(true || model) is finite.
    """
    if not 1 <= likely_successors < vocab_size:
        raise ValueError(f"likely_successors must be in [1, {vocab_size}), got {likely_successors}")
    if not 0.0 < head_mass < 1.0:
        raise ValueError(f"head_mass must be in (0, 1), got {head_mass}")
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.float64  # exact metrics: keep the truth in double precision
    order = torch.argsort(torch.rand(vocab_size, vocab_size, generator=generator), dim=-1)
    likely_ids, tail_ids = order[:, :likely_successors], order[:, likely_successors:]

    # Normalised exponential variates are a flat Dirichlet draw: the likely successors' shares
    # range from near-uniform (a high-entropy token) to one dominant successor (a low-entropy one).
    shares = -torch.rand(vocab_size, likely_successors, generator=generator, dtype=dtype).log()
    shares = shares / shares.sum(-1, keepdim=True)

    tail_ranks = torch.arange(1, vocab_size - likely_successors + 1, dtype=dtype)
    tail_shape = tail_ranks ** -tail_exponent
    tail_shape = tail_shape / tail_shape.sum()

    transition = torch.zeros(vocab_size, vocab_size, dtype=dtype)
    transition.scatter_(1, likely_ids, head_mass * shares)
    transition.scatter_(1, tail_ids, (1.0 - head_mass) * tail_shape.expand(vocab_size, -1))
    likely = torch.zeros(vocab_size, vocab_size, dtype=torch.bool).scatter_(1, likely_ids, True)
    return MarkovChain(transition, stationary_distribution(transition), likely)


def stationary_distribution(transition: torch.Tensor, iterations: int = 1000) -> torch.Tensor:
    """The stationary distribution of an irreducible, aperiodic chain, by power iteration."""
    distribution = torch.full((transition.shape[0],), 1.0 / transition.shape[0], dtype=transition.dtype)
    for _ in range(iterations):
        updated = distribution @ transition
        if torch.allclose(updated, distribution, rtol=0.0, atol=1e-14):
            return updated
        distribution = updated
    return distribution


def sample_corpus(chain: MarkovChain, num_tokens: int, generator: torch.Generator,
                  parallel_sequences: int = 1024) -> torch.Tensor:
    """Sample ``parallel_sequences`` sequences from the chain, about ``num_tokens`` tokens in all.

    Returns (parallel_sequences, length) int64. Sequences start from the stationary distribution,
    so every position is distributed like the stationary chain; sampling runs all sequences
    in parallel, one position at a time.
    """
    length = max(2, math.ceil(num_tokens / parallel_sequences))
    # Inverse-CDF sampling: one uniform draw per token, much faster than per-row multinomial.
    # fp32 CDFs (several times faster to gather and search than fp64) shift no token's
    # probability by more than ~1e-7, far below the smallest tail probability.
    transition_cdf = chain.transition.cumsum(-1).float()
    transition_cdf[:, -1] = 1.0  # rounding must not leave a uniform draw above the last bucket
    stationary_cdf = chain.stationary.cumsum(-1).float()
    stationary_cdf[-1] = 1.0
    # Position-major so that each step reads and writes contiguous memory.
    uniforms = torch.rand(length, parallel_sequences, 1, generator=generator)
    tokens = torch.empty(length, parallel_sequences, dtype=torch.long)
    tokens[0] = torch.searchsorted(stationary_cdf, uniforms[0, :, 0], right=True)
    for position in range(1, length):
        row_cdf = transition_cdf[tokens[position - 1]]
        tokens[position] = torch.searchsorted(row_cdf, uniforms[position], right=True)[:, 0]
    return tokens.T.contiguous()


def next_token_pairs(corpus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, target) pairs of every position of the corpus: the previous token and the next."""
    return corpus[:, :-1].reshape(-1), corpus[:, 1:].reshape(-1)


class NextTokenMLP(nn.Module):
    """A small causal LM: embedding of the previous token, a residual MLP, and output logits."""

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.mlp = nn.Sequential(
            nn.LayerNorm(embedding_dim),
            nn.Linear(embedding_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, embedding_dim),
        )
        self.norm = nn.LayerNorm(embedding_dim)
        self.unembedding = nn.Linear(embedding_dim, vocab_size)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """context: (N,) previous tokens -> (N, V) next-token logits."""
        hidden = self.embedding(context)
        hidden = hidden + self.mlp(hidden)
        return self.unembedding(self.norm(hidden))


@torch.no_grad()
def exact_metrics(model: nn.Module, chain: MarkovChain, k: int) -> dict[str, float]:
    """Entropy, top-k mass, true-tail mass, KL and top-1 accuracy, exact over the stationary chain.

    The model sees only the previous token, so evaluating it on every token gives its whole
    next-token distribution; expectations weight each token by how often it occurs.
    """
    device = next(model.parameters()).device
    every_token = torch.arange(chain.vocab_size, device=device)
    log_q = F.log_softmax(model(every_token).double(), dim=-1).cpu()
    q = log_q.exp()
    p = chain.transition
    weight = chain.stationary

    entropy = -(q * log_q).sum(-1)
    top_q = q.topk(min(k, chain.vocab_size), dim=-1).values
    topk_mass = top_q.sum(-1)
    head_share = top_q / topk_mass[:, None]
    head_entropy = -(head_share * head_share.log()).sum(-1)
    tail_mass = (q * ~chain.likely).sum(-1)
    kl = (p * (p.log() - log_q)).sum(-1)
    top1_agrees = (q.argmax(-1) == p.argmax(-1)).double()

    def expectation(per_token: torch.Tensor) -> float:
        return float((weight * per_token).sum())

    return {
        "entropy": expectation(entropy),
        "topk_mass": expectation(topk_mass),
        "head_entropy": expectation(head_entropy),
        "tail_mass": expectation(tail_mass),
        "kl": expectation(kl),
        "top1_acc": expectation(top1_agrees),
    }


def true_chain_metrics(chain: MarkovChain, val_pairs: tuple[torch.Tensor, torch.Tensor], k: int
                       ) -> dict[str, float]:
    """The metrics of the true distribution itself: the reference row of the table."""
    p = chain.transition
    weight = chain.stationary
    top_p = p.topk(k, dim=-1).values
    head_share = top_p / top_p.sum(-1, keepdim=True)
    context, target = val_pairs
    val_ce = float(-p[context, target].log().mean())
    return {
        "val_ce": val_ce,
        "val_ppl": math.exp(val_ce),
        "entropy": chain.entropy_rate(),
        "topk_mass": float((weight * top_p.sum(-1)).sum()),
        "head_entropy": float((weight * -(head_share * head_share.log()).sum(-1)).sum()),
        "tail_mass": float((weight * (p * ~chain.likely).sum(-1)).sum()),
        "kl": 0.0,
        "top1_acc": 1.0,
    }


@torch.no_grad()
def validation_cross_entropy(model: nn.Module, val_pairs: tuple[torch.Tensor, torch.Tensor],
                             batch_size: int = 1 << 15) -> float:
    """Mean cross-entropy (nats) of the model on held-out (context, target) pairs."""
    device = next(model.parameters()).device
    context, target = val_pairs
    total = 0.0
    for start in range(0, context.shape[0], batch_size):
        logits = model(context[start:start + batch_size].to(device))
        total += float(F.cross_entropy(logits.float(), target[start:start + batch_size].to(device),
                                       reduction="sum"))
    return total / context.shape[0]


@dataclasses.dataclass
class DemoResult:
    """The outcome of ``train_presets``: one ``PresetResult`` per preset plus the reference."""

    settings: DemoSettings
    presets: dict[str, PresetResult]
    true_metrics: dict[str, float]

    def report(self) -> Report:
        """The table, CSV and figure contents, with the true chain as the reference row."""
        s = self.settings
        notes = (
            f"k = {s.k} (top-k mass and the rank-aware presets); V = {s.vocab_size}; {s.steps} steps of "
            f"{s.batch_size}; seed {s.seed}.\n"
            "val CE/perplexity: on a held-out sample of the chain. Every other column is exact over the "
            "chain's\nstationary distribution; head_entropy = entropy of the model's top-k renormalised; "
            "tail_mass =\nmodel mass on tokens that are not true likely successors; top1_acc = the model's "
            "argmax equals\nthe true argmax."
        )
        figure_notes = (
            f"V = {s.vocab_size} tokens, {s.likely_successors} likely\n"
            f"successors each (mass {s.head_mass:g}), k = {s.k}\n"
            f"{s.steps} steps x batch {s.batch_size}, seed {s.seed}\n\n"
            "dashed line: the true chain\n"
            "y axes do not start at 0"
        )
        shown = ("val_ce", "entropy", "head_entropy", "topk_mass", "tail_mass", "kl", "top1_acc")
        return Report(self.presets, METRIC_COLUMNS, METRIC_LABELS, shown, ("true_chain", self.true_metrics),
                      notes, figure_notes)


def preset_config(name: str, settings: DemoSettings) -> RewardConfig:
    """The named preset with k scaled to the demo language (see ``DemoSettings.k``)."""
    return preset(name, k=settings.k)


def train_presets(
    presets: Sequence[str] = DEFAULT_PRESETS,
    settings: DemoSettings | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> DemoResult:
    """Train one model per preset on the same data, from the same initialisation, and measure it.

    Args:
        presets: names from ``precision_ce.PRESETS``.
        settings: the language, model and training settings (default: ``DemoSettings()``).
        device: where the model trains; the data and exact metrics stay on the CPU.
        progress: show a tqdm progress bar over all presets' steps.

    Returns:
        A ``DemoResult`` whose ``presets[name].metrics`` maps each of ``METRIC_COLUMNS`` to a float.
    """
    settings = settings or DemoSettings()
    unknown = [name for name in presets if name not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    if not presets:
        raise ValueError("give at least one preset")
    device = torch.device(device)
    with single_thread_on_cpu(device):
        return _train_presets(presets, settings, device, progress)


def _train_presets(presets: Sequence[str], settings: DemoSettings, device: torch.device,
                   progress: bool) -> DemoResult:
    chain = make_markov_chain(settings.vocab_size, settings.likely_successors, settings.head_mass,
                              settings.tail_exponent, settings.seed)
    # Separate generators for train and validation corpora: held-out data is a fresh sample.
    train_context, train_target = next_token_pairs(
        sample_corpus(chain, settings.train_tokens, torch.Generator().manual_seed(settings.seed + 1)))
    val_pairs = next_token_pairs(
        sample_corpus(chain, settings.val_tokens, torch.Generator().manual_seed(settings.seed + 2)))
    train_context, train_target = train_context.to(device), train_target.to(device)

    bar = tqdm(total=settings.steps * len(presets), disable=not progress, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    results: dict[str, PresetResult] = {}
    for name in presets:
        config = preset_config(name, settings)
        bar.set_description(name)
        results[name] = _train_one(name, config, chain, (train_context, train_target), val_pairs,
                                   settings, device, bar)
    bar.close()
    return DemoResult(settings, results, true_chain_metrics(chain, val_pairs, settings.k))


def _train_one(
    name: str,
    config: RewardConfig,
    chain: MarkovChain,
    train_pairs: tuple[torch.Tensor, torch.Tensor],
    val_pairs: tuple[torch.Tensor, torch.Tensor],
    settings: DemoSettings,
    device: torch.device,
    bar: tqdm,
) -> PresetResult:
    """Train one model with one reward config; record its entropy curve and final metrics."""
    start_time = time.perf_counter()
    # Same seed for the weights and for the batch order: presets differ only in their loss.
    torch.manual_seed(settings.seed)
    model = NextTokenMLP(settings.vocab_size, settings.embedding_dim, settings.hidden_dim).to(device)
    train_context, train_target = train_pairs
    curve = [(0, exact_metrics(model, chain, settings.k)["entropy"])]

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        return cross_entropy(model(train_context[batch]), train_target[batch], config=config, backend="auto")

    def after_step(step: int) -> None:
        if step % settings.eval_interval == 0 or step == settings.steps:
            curve.append((step, exact_metrics(model, chain, settings.k)["entropy"]))
        bar.update(1)

    train(model, batch_loss, examples=train_context.shape[0], batch_size=settings.batch_size, steps=settings.steps,
          learning_rate=settings.learning_rate, generator=torch.Generator().manual_seed(settings.seed + 3),
          after_step=after_step)

    model.eval()
    val_ce = validation_cross_entropy(model, val_pairs)
    metrics = {"val_ce": val_ce, "val_ppl": math.exp(val_ce), **exact_metrics(model, chain, settings.k)}
    return PresetResult(name, config, {key: metrics[key] for key in METRIC_COLUMNS}, curve,
                        time.perf_counter() - start_time)
