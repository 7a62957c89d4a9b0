"""``precision-ce demo --corpus stdlib``: the corpus, the metrics and the pipeline at a tiny size."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from precision_ce.demo import stdlib
from precision_ce.demo.report import format_table, write_outputs

pytest.importorskip("tokenizers", reason='the real-text demo needs tokenizers: pip install -e ".[demo]"')

TINY = stdlib.StdlibSettings(vocab_size=320, context=16, model_dim=16, layers=1, heads=2, steps=30, batch_size=8,
                             eval_windows=8, eval_interval=15, curve_windows=4, sample_prompts=4, prompt_tokens=4,
                             sample_tokens=8, heldout_share=0.25, max_files=8, learning_rate=3e-2)


def test_corpus_files_are_the_stdlib_without_tests_or_site_packages() -> None:
    files = stdlib.stdlib_files()
    root = stdlib.stdlib_root()
    assert files == sorted(files) and len(files) > 100
    assert root / "os.py" in files and root / "json" / "decoder.py" in files
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(f.relative_to(root).parts) for f in files)


def test_distinct_ngrams_counts_within_the_mask() -> None:
    samples = torch.tensor([[1, 2, 1, 2, 9], [1, 2, 3, 3, 3]])
    mask = torch.tensor([[True] * 4 + [False], [True] * 5])
    # 2-grams: (1,2) (2,1) (1,2) | (1,2) (2,3) (3,3) (3,3): 7 in all, 4 distinct.
    assert stdlib.distinct_ngrams(samples, mask, 2) == pytest.approx(4 / 7)
    assert stdlib.distinct_ngrams(samples, mask, 6) == 0.0  # no 6-gram fits: no division by zero


@pytest.fixture(scope="module")
def tiny_run() -> stdlib.StdlibResult:
    return stdlib.train_presets(("cross_entropy", "precision", "tail_penalty"), TINY, progress=False)


def test_tiny_run_holds_out_whole_files_and_reports_every_metric(tiny_run: stdlib.StdlibResult) -> None:
    corpus = tiny_run.corpus
    assert len(corpus.heldout_files) == 2 and len(corpus.train_files) == 6
    assert not set(corpus.heldout_files) & set(corpus.train_files)
    assert corpus.vocab_size <= TINY.vocab_size and int(corpus.train.max()) < corpus.vocab_size
    assert TINY.k == max(1, round(100 * 320 / 150_000))
    for name, result in tiny_run.presets.items():
        m = result.metrics
        assert list(m) == list(stdlib.METRIC_COLUMNS), name
        assert all(math.isfinite(v) for v in m.values()), (name, m)
        assert m["val_ppl"] == pytest.approx(math.exp(m["val_ce"]))
        assert 0.0 < m["entropy"] < math.log(corpus.vocab_size)
        assert m["tail_mass"] == pytest.approx(1.0 - m["topk_mass"]) and 0.0 < m["tail_mass"] < 1.0
        assert 0.0 <= m["ece"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0
        assert 0.0 < m["distinct_2"] <= 1.0 and 0.0 < m["distinct_4"] <= 1.0
        assert [step for step, _ in result.entropy_curve] == [0, 15, 30]
        assert m["val_ce"] < math.log(corpus.vocab_size) - 0.5, (name, m)  # learned something


def test_tiny_run_writes_the_demo_outputs(tiny_run: stdlib.StdlibResult, tmp_path: Path) -> None:
    report = tiny_run.report()
    assert "held-out files" in format_table(report)
    written = write_outputs(report, tmp_path)
    assert {p.name for p in written} == {"demo_metrics.csv", "demo_entropy_curve.csv", "demo_entropy.png",
                                         "demo_metrics.png"}
    with (tmp_path / "demo_metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["preset"] for r in rows] == ["cross_entropy", "precision", "tail_penalty"]
    assert {"entropy", "tail_mass", "ece", "distinct_4"} <= set(rows[0])


def test_heldout_metrics_of_a_uniform_model() -> None:
    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(10))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(*tokens.shape, 10)

    windows = torch.randint(0, 10, (3, 9), generator=torch.Generator().manual_seed(0))
    m = stdlib.heldout_metrics(Uniform(), windows, k=2)
    assert m["val_ce"] == pytest.approx(math.log(10)) and m["entropy"] == pytest.approx(math.log(10))
    assert m["topk_mass"] == pytest.approx(0.2) and m["head_entropy"] == pytest.approx(math.log(2))
    # Confidence 0.1 everywhere; the argmax (token 0) is right where the target is 0.
    accuracy = float((windows[:, 1:] == 0).double().mean())
    assert m["accuracy"] == pytest.approx(accuracy) and m["ece"] == pytest.approx(abs(0.1 - accuracy))
