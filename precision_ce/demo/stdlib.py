"""The demo on real text: the Python standard library's source files of the running interpreter.

Every machine that runs this package has the corpus. ``stdlib_files`` says exactly which files:
the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, sorted, leaving out every directory
named ``test``, ``tests`` or ``idle_test`` (test suites, much of them generated data) and
``site-packages`` / ``dist-packages`` (installed third-party code, different on every machine).

A seeded shuffle holds out whole files (``heldout_share`` of them) for evaluation; a byte-level BPE
vocabulary is trained on the training files only with Hugging Face ``tokenizers``; files are
joined with an end-of-text token into one token stream per split. One small causal transformer
(``precision_ce.causal_lm.TinyCausalLM``) per preset is trained on random windows of the training
stream, every preset from the same weights on the same windows.

Metrics, on evenly spaced windows of the held-out stream (every position of each window):

* ``val_ce`` / ``val_ppl``: cross-entropy and perplexity;
* ``entropy``: mean entropy of the predictive distribution;
* ``topk_mass`` / ``tail_mass``: the mass of the model's own k most likely tokens and the mass
  outside them (``tail_mass = 1 - topk_mass``; the Markov demo's ``tail_mass`` is the mass on the
  *true* tail, which real text does not give);
* ``head_entropy``: entropy of the top-k probabilities renormalised (spread inside the head);
* ``ece``: expected calibration error of the top-1 prediction, 15 equal-width confidence bins;
* ``accuracy``: how often the most likely token is the held-out next token;
* ``distinct_2`` / ``distinct_4``: distinct n-grams over all n-grams of samples drawn at
  temperature 1 from held-out prompts (the same prompts and random stream for every preset).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..api import cross_entropy
from ..causal_lm import TinyCausalLM, sample
from ..config import PRESETS, preset
from ..training import DEFAULT_PRESETS, single_thread_on_cpu, train
from .report import PresetResult, Report

EXCLUDED_DIRECTORIES: frozenset[str] = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
END_OF_TEXT = "<|endoftext|>"
PAPER_VOCAB_SIZE = 150_000  # about the paper's vocabulary, in which its k = 100 is the head
ECE_BINS = 15

METRIC_COLUMNS: tuple[str, ...] = (
    "val_ce", "val_ppl", "entropy", "topk_mass", "head_entropy", "tail_mass", "ece", "accuracy",
    "distinct_2", "distinct_4",
)
"""The per-preset metrics, in table and CSV order; names shared with the Markov demo mean the same."""

METRIC_LABELS: dict[str, str] = {
    "val_ce": "held-out CE (nats/token)",
    "val_ppl": "held-out perplexity",
    "entropy": "mean entropy (nats)",
    "topk_mass": "top-k mass",
    "head_entropy": "entropy within the top-k (nats)",
    "tail_mass": "mass outside the top-k",
    "ece": "expected calibration error",
    "accuracy": "top-1 accuracy",
    "distinct_2": "distinct 2-grams of samples",
    "distinct_4": "distinct 4-grams of samples",
}


@dataclasses.dataclass(frozen=True)
class StdlibSettings:
    """Everything that defines a real-text run besides the presets and the device."""

    vocab_size: int = 4096
    heldout_share: float = 0.1  # of the files
    context: int = 64  # tokens per training window
    model_dim: int = 128
    layers: int = 2
    heads: int = 4
    steps: int = 600
    batch_size: int = 16  # windows per step
    learning_rate: float = 2e-3  # peak Adam rate, decayed by a cosine to a tenth
    eval_windows: int = 256  # held-out windows for the final metrics
    eval_interval: int = 50  # steps between entropy-curve points (on the first curve_windows windows)
    curve_windows: int = 32
    sample_prompts: int = 64
    prompt_tokens: int = 16
    sample_tokens: int = 48
    max_files: int | None = None  # tests: only the first files of the split
    seed: int = 0

    @property
    def k(self) -> int:
        """The head size of the rank-aware presets, scaled to this vocabulary.

        The paper's k = 100 is a set of plausible continuations in a vocabulary of ~150K tokens;
        with no known set of plausible continuations in real text, the head keeps the same share
        of the vocabulary (0.07 %): k = 3 for 4096 tokens.
        """
        return max(1, round(100 * self.vocab_size / PAPER_VOCAB_SIZE))


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The corpus: sorted ``*.py`` under ``root`` (default ``stdlib_root()``) outside ``EXCLUDED_DIRECTORIES``."""
    root = root or stdlib_root()
    return sorted(path for path in root.rglob("*.py")
                  if not EXCLUDED_DIRECTORIES & set(path.relative_to(root).parts[:-1]))


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """The tokenised corpus. train / heldout: 1-D int64 token streams (files joined by end-of-text)."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_files: list[Path]
    heldout_files: list[Path]
    train_bytes: int
    heldout_bytes: int
    vocab_size: int
    end_of_text: int


def load_corpus(settings: StdlibSettings, files: Sequence[Path] | None = None) -> TextCorpus:
    """Split the files, train the BPE vocabulary on the training files and tokenise both splits."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as error:
        raise ImportError('precision-ce demo --corpus stdlib needs tokenizers: pip install -e ".[demo]"') from error
    files = list(files if files is not None else stdlib_files())
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    shuffled = [files[i] for i in order][:settings.max_files]
    heldout_count = max(1, round(settings.heldout_share * len(shuffled)))
    if heldout_count >= len(shuffled):
        raise ValueError(f"need at least 2 files to hold some out, got {len(shuffled)}")
    heldout_files, train_files = sorted(shuffled[:heldout_count]), sorted(shuffled[heldout_count:])
    # Source files are UTF-8 (PEP 3120); a stray byte becomes U+FFFD rather than an error.
    texts = {path: path.read_bytes().decode("utf-8", errors="replace") for path in shuffled}

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=settings.vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((texts[path] for path in train_files), trainer=trainer)
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)

    def stream(split: list[Path]) -> torch.Tensor:
        ids: list[int] = []
        for encoding in tokenizer.encode_batch([texts[path] for path in split]):
            ids += [*encoding.ids, end_of_text]
        return torch.tensor(ids, dtype=torch.long)

    return TextCorpus(stream(train_files), stream(heldout_files), train_files, heldout_files,
                      sum(len(texts[p].encode()) for p in train_files),
                      sum(len(texts[p].encode()) for p in heldout_files),
                      tokenizer.get_vocab_size(), end_of_text)


def windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """(W,) start positions -> (W, length) token windows of the stream."""
    return stream[starts[:, None] + torch.arange(length)]


def evenly_spaced_windows(stream: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens spread evenly over the stream (every file region)."""
    if stream.numel() < length + 1:
        raise ValueError(f"the held-out stream has {stream.numel()} tokens, fewer than a window of {length + 1}")
    return windows(stream, torch.linspace(0, stream.numel() - length, count).long(), length)


@torch.no_grad()
def heldout_metrics(model: nn.Module, heldout: torch.Tensor, k: int, batch: int = 16) -> dict[str, float]:
    """Metrics over every position of (W, T + 1) held-out windows: the first T tokens predict the last T."""
    device = next(model.parameters()).device
    totals = dict.fromkeys(("val_ce", "entropy", "topk_mass", "head_entropy", "accuracy"), 0.0)
    bin_count = torch.zeros(ECE_BINS, dtype=torch.float64)
    bin_confidence, bin_correct = torch.zeros_like(bin_count), torch.zeros_like(bin_count)
    positions = 0
    for start in range(0, heldout.shape[0], batch):
        chunk = heldout[start:start + batch].to(device)
        log_q = F.log_softmax(model(chunk[:, :-1]).float(), dim=-1).flatten(0, 1).double()
        target = chunk[:, 1:].flatten()
        q = log_q.exp()
        top_q = q.topk(k, dim=-1).values
        head_share = top_q / top_q.sum(-1, keepdim=True)
        confidence, prediction = q.max(-1)
        correct = (prediction == target).double()
        totals["val_ce"] -= float(log_q.gather(1, target[:, None]).sum())
        totals["entropy"] -= float((q * log_q).sum())
        totals["topk_mass"] += float(top_q.sum())
        totals["head_entropy"] -= float((head_share * head_share.clamp_min(1e-300).log()).sum())
        totals["accuracy"] += float(correct.sum())
        bins = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1).cpu()
        bin_count += torch.bincount(bins, minlength=ECE_BINS).double()
        bin_confidence.index_add_(0, bins, confidence.cpu())
        bin_correct.index_add_(0, bins, correct.cpu())
        positions += target.numel()
    metrics = {key: value / positions for key, value in totals.items()}
    metrics["val_ppl"] = math.exp(metrics["val_ce"])
    metrics["tail_mass"] = 1.0 - metrics["topk_mass"]
    # ECE = sum over bins of (bin share) * |mean confidence - accuracy| in the bin.
    metrics["ece"] = float((bin_confidence - bin_correct).abs().sum() / positions)
    return metrics


def distinct_ngrams(samples: torch.Tensor, mask: torch.Tensor, n: int) -> float:
    """Distinct n-grams over all n-grams of the samples ((B, L) tokens, (B, L) bool valid tokens)."""
    grams: list[tuple[int, ...]] = []
    for row, valid in zip(samples.tolist(), mask.sum(1).tolist(), strict=True):
        grams += [tuple(row[i:i + n]) for i in range(int(valid) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


@dataclasses.dataclass
class StdlibResult:
    """The outcome of ``train_presets`` on the standard library corpus."""

    settings: StdlibSettings
    presets: dict[str, PresetResult]
    corpus: TextCorpus

    def describe_corpus(self) -> str:
        c = self.corpus
        return (f"{len(c.train_files) + len(c.heldout_files)} files of {stdlib_root()} "
                f"(sorted *.py without {', '.join(sorted(EXCLUDED_DIRECTORIES))}): {len(c.train_files)} "
                f"train files, {c.train_bytes / 1e6:.2f} MB, {c.train.numel():,} tokens; {len(c.heldout_files)} "
                f"held-out files, {c.heldout_bytes / 1e6:.2f} MB, {c.heldout.numel():,} tokens; BPE vocabulary "
                f"{c.vocab_size}")

    def report(self) -> Report:
        s = self.settings
        notes = (
            f"{self.describe_corpus()}.\n"
            f"k = {s.k}; {s.steps} steps of {s.batch_size} windows of {s.context} tokens; model width "
            f"{s.model_dim}, {s.layers} layers; seed {s.seed}.\nMetrics on {s.eval_windows} evenly spaced "
            f"held-out windows; tail_mass = mass outside the model's top-k; ece: 15 bins, top-1;\ndistinct_n: "
            f"of {s.sample_prompts} samples of {s.sample_tokens} tokens at temperature 1 after held-out "
            f"prompts of {s.prompt_tokens} tokens."
        )
        figure_notes = (
            f"Python {sys.version_info.major}.{sys.version_info.minor} standard library\n"
            f"{len(self.corpus.train_files)} train / {len(self.corpus.heldout_files)} held-out files\n"
            f"{self.corpus.train.numel():,} train tokens\n"
            f"BPE vocabulary {self.corpus.vocab_size}, k = {s.k}\n"
            f"{s.steps} steps x {s.batch_size} x {s.context} tokens\n"
            f"seed {s.seed}; y axes do not start at 0"
        )
        shown = ("val_ce", "entropy", "head_entropy", "tail_mass", "ece", "accuracy", "distinct_4")
        return Report(self.presets, METRIC_COLUMNS, METRIC_LABELS, shown, None, notes, figure_notes)


def train_presets(presets: Sequence[str] = DEFAULT_PRESETS, settings: StdlibSettings | None = None,
                  device: str | torch.device = "cpu", progress: bool = True,
                  files: Sequence[Path] | None = None) -> StdlibResult:
    """Train one model per preset on the standard library (or ``files``), same weights and batches.

    Returns a ``StdlibResult`` whose ``presets[name].metrics`` maps each of ``METRIC_COLUMNS`` to a float.
    """
    settings = settings or StdlibSettings()
    if not presets or any(name not in PRESETS for name in presets):
        raise ValueError(f"presets must be a non-empty list from {sorted(PRESETS)}, got {list(presets)}")
    device = torch.device(device)
    with single_thread_on_cpu(device):
        corpus = load_corpus(settings, files)
        window = settings.context + 1
        if corpus.train.numel() <= window:
            raise ValueError(f"the training stream has {corpus.train.numel()} tokens, fewer than a window of {window}")
        heldout = evenly_spaced_windows(corpus.heldout, settings.eval_windows, window)
        prompt_starts = torch.linspace(0, corpus.heldout.numel() - settings.prompt_tokens, settings.sample_prompts)
        prompts = windows(corpus.heldout, prompt_starts.long(), settings.prompt_tokens)
        bar = tqdm(total=settings.steps * len(presets), disable=not progress, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
        results = {}
        for name in presets:
            bar.set_description(name)
            results[name] = _train_one(name, corpus, heldout, prompts, settings, device, bar)
        bar.close()
    return StdlibResult(settings, results, corpus)


def _train_one(name: str, corpus: TextCorpus, heldout: torch.Tensor, prompts: torch.Tensor,
               settings: StdlibSettings, device: torch.device, bar: tqdm) -> PresetResult:
    started = time.perf_counter()
    config = preset(name, k=settings.k)
    torch.manual_seed(settings.seed)  # the same initial weights for every preset
    model = TinyCausalLM(corpus.vocab_size, settings.context, settings.model_dim, settings.layers,
                         settings.heads).to(device)
    stream = corpus.train.to(device)
    offsets = torch.arange(settings.context + 1, device=device)
    curve_windows = heldout[:settings.curve_windows]
    curve = [(0, heldout_metrics(model, curve_windows, settings.k)["entropy"])]

    def batch_loss(starts: torch.Tensor) -> torch.Tensor:
        tokens = stream[starts[:, None] + offsets]
        logits = model(tokens[:, :-1])
        return cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), config=config, backend="auto")

    def after_step(step: int) -> None:
        if step % settings.eval_interval == 0 or step == settings.steps:
            curve.append((step, heldout_metrics(model, curve_windows, settings.k)["entropy"]))
        bar.update(1)

    train(model, batch_loss, examples=stream.numel() - settings.context, batch_size=settings.batch_size,
          steps=settings.steps, learning_rate=settings.learning_rate,
          generator=torch.Generator().manual_seed(settings.seed + 1), after_step=after_step)
    model.eval()
    metrics = heldout_metrics(model, heldout, settings.k)
    rollout = sample(model, prompts.to(device), settings.sample_tokens, corpus.end_of_text,
                     torch.Generator(device=device).manual_seed(settings.seed + 2))
    answers, mask = rollout.answers.cpu(), rollout.response_mask.cpu()
    metrics["distinct_2"] = distinct_ngrams(answers, mask, 2)
    metrics["distinct_4"] = distinct_ngrams(answers, mask, 4)
    return PresetResult(name, config, {key: metrics[key] for key in METRIC_COLUMNS}, curve,
                        time.perf_counter() - started)
