"""The demo reproduces the orderings the paper predicts, and ``precision-ce demo`` writes its outputs."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import pytest
import torch

from precision_ce import demo

# A shortened version of the default demo: same language and seed, a smaller model, fewer steps
# and a smaller corpus, so that the four trainings take seconds on two CPU cores.
SHORT_RUN = demo.DemoSettings(
    train_tokens=1 << 18, val_tokens=1 << 14, steps=600, embedding_dim=32, hidden_dim=128,
    eval_interval=100, seed=0,
)


@pytest.fixture(scope="module")
def short_run() -> demo.DemoResult:
    return demo.train_presets(
        ("cross_entropy", "precision", "diversity", "tail_penalty"), SHORT_RUN, progress=False,
    )


def test_entropy_ordering_diversity_above_cross_entropy_above_precision(short_run: demo.DemoResult) -> None:
    entropy = {name: result.metrics["entropy"] for name, result in short_run.presets.items()}
    assert entropy["diversity"] > entropy["cross_entropy"] > entropy["precision"], entropy


def test_tail_penalty_moves_mass_out_of_the_tail(short_run: demo.DemoResult) -> None:
    tail_mass = {name: result.metrics["tail_mass"] for name, result in short_run.presets.items()}
    assert tail_mass["tail_penalty"] < tail_mass["cross_entropy"], tail_mass


def test_metrics_are_complete_and_in_range(short_run: demo.DemoResult) -> None:
    vocab_entropy = math.log(SHORT_RUN.vocab_size)
    for name, result in short_run.presets.items():
        metrics = result.metrics
        assert set(metrics) == set(demo.METRIC_COLUMNS), name
        assert all(math.isfinite(value) for value in metrics.values()), (name, metrics)
        assert 0.0 < metrics["entropy"] < vocab_entropy, (name, metrics)
        assert 0.0 < metrics["tail_mass"] < 1.0 and 0.0 < metrics["topk_mass"] < 1.0, (name, metrics)
        assert metrics["kl"] > 0.0 and 0.0 <= metrics["top1_acc"] <= 1.0, (name, metrics)
        assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_ce"]))
        # Training made progress: the curve starts near uniform and ends well below it.
        steps = [step for step, _ in result.entropy_curve]
        assert steps[0] == 0 and steps[-1] == SHORT_RUN.steps, (name, steps)
        assert result.entropy_curve[-1][1] < result.entropy_curve[0][1] - 1.0, (name, result.entropy_curve)


def test_true_chain_is_a_distribution_with_the_promised_shape() -> None:
    chain = demo.make_markov_chain(vocab_size=64, likely_successors=4, head_mass=0.9, seed=3)
    assert torch.allclose(chain.transition.sum(-1), torch.ones(64, dtype=torch.float64))
    assert bool((chain.transition > 0).all())  # the tail covers every token: KL stays finite
    assert torch.equal(chain.likely.sum(-1), torch.full((64,), 4))
    head = (chain.transition * chain.likely).sum(-1)
    assert torch.allclose(head, torch.full((64,), 0.9, dtype=torch.float64))
    assert torch.allclose(chain.stationary @ chain.transition, chain.stationary, atol=1e-12)
    again = demo.make_markov_chain(vocab_size=64, likely_successors=4, head_mass=0.9, seed=3)
    assert torch.equal(chain.transition, again.transition)


def test_sampled_corpus_follows_the_chain() -> None:
    chain = demo.make_markov_chain(vocab_size=16, likely_successors=3, head_mass=0.8, seed=1)
    corpus = demo.sample_corpus(chain, 1 << 17, torch.Generator().manual_seed(0), parallel_sequences=256)
    context, target = demo.next_token_pairs(corpus)
    counts = torch.zeros(16, 16, dtype=torch.float64).index_put_(
        (context, target), torch.ones(context.shape[0], dtype=torch.float64), accumulate=True)
    empirical = counts / counts.sum(-1, keepdim=True)
    # ~8K transitions per row: sampling error of a probability is below 0.006 (one sigma).
    assert (empirical - chain.transition).abs().max() < 0.03


def test_cli_run_writes_table_csv_and_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out_dir = tmp_path / "demo-out"
    args = parser.parse_args(
        ["--steps", "3", "--presets", "cross_entropy,precision", "--device", "cpu", "--out", str(out_dir)]
    )
    assert demo.run(args) == 0

    printed = capsys.readouterr().out
    assert "cross_entropy" in printed and "precision" in printed and "(true chain)" in printed
    for name in ("demo_entropy.png", "demo_metrics.png"):
        figure = out_dir / name
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with (out_dir / "demo_metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["preset"] for row in rows] == ["cross_entropy", "precision", "true_chain"]
    assert all(math.isfinite(float(rows[0][key])) for key in demo.METRIC_COLUMNS)
    assert float(rows[1]["beta"]) == -0.25
    with (out_dir / "demo_entropy_curve.csv").open() as handle:
        curve = list(csv.DictReader(handle))
    assert {row["preset"] for row in curve} == {"cross_entropy", "precision"}


def test_cli_rejects_unknown_presets(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--presets", "cross_entropy,nonsense", "--out", str(tmp_path)])
    assert demo.run(args) == 2
