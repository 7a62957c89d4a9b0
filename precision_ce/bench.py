"""``precision-ce bench``: time and memory of the loss against ``F.cross_entropy`` and peers.

For every case (device, dtype, tokens N, vocabulary V) the harness builds random logits
(N, V) with ``requires_grad=True`` and int64 targets (N,), and measures each candidate:

* ``F.cross_entropy`` (the baseline every ratio is taken against, same case);
* ``torch.compile(F.cross_entropy)`` where compilation works;
* ``precision_ce.cross_entropy(x, t, config=PRESETS[name], backend="torch")`` for each preset;
* the same with ``backend="triton"`` (CUDA only; the Triton interpreter on CPU is far too slow);
* ``torch.compile`` of the torch backend, for small cases only (Dynamo unrolls its row-chunk loop);
* Liger-Kernel's ``LigerCrossEntropyLoss`` when installed (CUDA only).

What is measured, per candidate and case:

* fwd: the loss forward with ``requires_grad=True`` inputs, as in training (graph built, then dropped);
* fwd+bwd: ``torch.autograd.grad(loss_fn(x, t), x)``, the gradient allocated fresh each call;
* bwd: derived per repeat as fwd+bwd minus the fwd measured right before it in the same repeat;
  the median and IQR of those differences are reported (no retained graph is needed);
* peak memory: the largest amount allocated during one fwd+bwd above what was live before it
  (the inputs), with the returned gradient kept alive, so a gradient the size of the logits is
  the floor (1.0x the logits for the same dtype). CUDA: ``torch.cuda.max_memory_allocated``;
  CPU: the allocator events of ``torch.profiler`` (``profile_memory=True``), summed in time order.

Repeats are interleaved: each repeat visits every candidate once (fwd, then fwd+bwd), in an order
shuffled per repeat (seeded), so slow drifts of a noisy machine hit all candidates alike and no
candidate always follows the same neighbour (whose allocator and cache state it would inherit:
with a fixed rotation, F.cross_entropy measured 1.25x its identical twin). The CPU timer
is ``torch.utils.benchmark.Timer`` (with the process's thread count; a sample repeats the call
until it lasts ``--min-time``), the CUDA timer ``triton.testing.do_bench`` (median, L2 flushed
between calls), except that calls longer than ``--rep-ms`` are timed once per sample with CUDA
events. A candidate gets fewer samples when its samples would exceed ``--max-candidate-seconds``.

Only the standard library is imported at module level: ``precision-ce --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CSV_COLUMNS: tuple[str, ...] = (
    "device", "dtype", "tokens", "vocab", "candidate", "backend", "preset",
    "fwd_ms", "bwd_ms", "fwd_bwd_ms",
    "fwd_iqr_ms", "bwd_iqr_ms", "fwd_bwd_iqr_ms", "fwd_bwd_min_ms", "fwd_bwd_max_ms",
    "spread", "repeats",
    "ratio_vs_torch_ce", "fwd_ratio_vs_torch_ce", "bwd_ratio_vs_torch_ce",
    "peak_extra_mb", "peak_extra_x_logits", "peak_ratio_vs_torch_ce",
    "hbm_tbs", "hbm_fraction_of_peak", "compile_s", "note",
)
"""Columns of ``results.csv``. Times are medians over repeats in ms; ``spread`` is the relative
IQR of fwd+bwd, (q3 - q1) / median; ``ratio_vs_torch_ce`` is fwd+bwd time over that of
``F.cross_entropy`` in the same case; ``hbm_*`` only on CUDA (assumed traffic, see
``assumed_hbm_bytes``)."""

BASELINE_CANDIDATE = "F.cross_entropy"
PRESET_NAMES: tuple[str, ...] = ("cross_entropy", "precision", "diversity", "tail_penalty", "head_reward")

DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Command-line dtype names and the torch dtype attribute they stand for."""

DEFAULT_CPU_SHAPES = "1024x8192,1024x32000,4096x32000"
DEFAULT_CPU_DTYPES = "fp32"
DEFAULT_CUDA_CASES: tuple[tuple[str, int, int], ...] = (
    ("bf16", 16384, 32000),
    ("bf16", 16384, 128256),
    ("bf16", 16384, 151936),
    ("fp32", 16384, 32000),
)
"""CUDA grid used when neither --shapes nor --dtype is given: (dtype, tokens, vocab)."""
DEFAULT_CUDA_SHAPES = "16384x32000,16384x128256,16384x151936"
DEFAULT_CUDA_DTYPES = "bf16"

DEFAULT_REPEATS = {"cpu": 5, "cuda": 3}
DEFAULT_COMPILE_PRESETS = {"cpu": "precision,tail_penalty", "cuda": "all"}
"""Presets whose torch backend is wrapped in torch.compile by default. On CPU each costs 10-25 s
of compilation per case, so the default keeps one beta-only and one top-k preset."""
DEFAULT_COMPILE_MAX_ELEMENTS = 1 << 23
"""torch.compile of the torch backend only for N * V up to this: Dynamo unrolls the backend's
row-chunk loop (one chunk per 2**21 logits), and compile time grows with the number of chunks
(measured on 2 CPU cores: 10-25 s at 1024 x 8192, 4 chunks; 260 s at 4096 x 32000, 63 chunks)."""

PEAK_HBM_BYTES_PER_S: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 4.8e12),
    (("H100", "PCIe"), 2.0e12),
    (("H100",), 3.35e12),
    (("H800",), 3.35e12),
    (("B200",), 8.0e12),
    (("A100", "80GB"), 2.039e12),
    (("A100",), 1.555e12),
    (("L40S",), 0.864e12),
)
"""Datasheet peak memory bandwidth by GPU name: the first entry whose substrings all occur."""

TRITON_CPU_SKIP = (
    "skipped: the Triton backend needs CUDA; on CPU only the Triton interpreter "
    "(TRITON_INTERPRET=1) runs it, far too slow to time"
)


# --------------------------------------------------------------------------------------------
# Pure helpers (unit-tested)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Median, quartiles and range of a list of timings (ms)."""

    median: float
    q1: float
    q3: float
    minimum: float
    maximum: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def summarize(samples: Sequence[float]) -> Summary:
    """Median, inclusive quartiles (linear interpolation) and min/max of ``samples``.

    One sample gives an IQR of 0. Raises ValueError for no samples.
    """
    if not samples:
        raise ValueError("summarize needs at least one sample")
    values = sorted(float(v) for v in samples)
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Summary(statistics.median(values), q1, q3, values[0], values[-1])


def ratio_to_baseline(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or None when either is missing or not finite or baseline <= 0.

    Used for every "x F.cross_entropy" column: 2.0 means twice the time (or memory) of the
    baseline in the same case, 0.5 half of it.
    """
    if value is None or baseline is None:
        return None
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline <= 0.0:
        return None
    return value / baseline


RATIO_COLUMNS: dict[str, str] = {
    "ratio_vs_torch_ce": "fwd_bwd_ms",
    "fwd_ratio_vs_torch_ce": "fwd_ms",
    "bwd_ratio_vs_torch_ce": "bwd_ms",
    "peak_ratio_vs_torch_ce": "peak_extra_mb",
}
"""Ratio column -> the measured column it divides by the baseline's."""


def case_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """Rows with equal keys are the same case: ratios are only taken within a case."""
    return (row["device"], row["dtype"], int(row["tokens"]), int(row["vocab"]))


def add_ratios(rows: Iterable[dict[str, Any]], baseline: str = BASELINE_CANDIDATE) -> list[dict[str, Any]]:
    """Copies of ``rows`` with the ``RATIO_COLUMNS`` filled in against ``baseline`` of the same case.

    A case without a measured baseline row gets None ratios.
    """
    rows = [dict(row) for row in rows]
    baselines = {case_key(row): row for row in rows if row["candidate"] == baseline}
    for row in rows:
        base = baselines.get(case_key(row))
        for ratio_column, column in RATIO_COLUMNS.items():
            row[ratio_column] = ratio_to_baseline(row.get(column), None if base is None else base.get(column))
    return rows


def assumed_hbm_bytes(tokens: int, vocab: int, element_size: int) -> int:
    """Minimum HBM traffic of one fwd+bwd: the logits read once and the gradient written once.

    tokens x vocab logits of ``element_size`` bytes each; the targets and per-row numbers are
    negligible. Real kernels read the logits twice (forward and backward pass), so the achieved
    bandwidth computed from this is a lower bound on what the memory system delivered.
    """
    return 2 * tokens * vocab * element_size


def peak_hbm_bandwidth(device_name: str) -> float | None:
    """Datasheet peak bandwidth (bytes/s) for a GPU name, or None when not in the table."""
    name = device_name.lower()
    for parts, value in PEAK_HBM_BYTES_PER_S:
        if all(part.lower() in name for part in parts):
            return value
    return None


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x32000,1024x8192"`` -> ``[(4096, 32000), (1024, 8192)]`` (tokens, vocab)."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        parts = item.split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"shape {item!r} is not TOKENSxVOCAB, e.g. 4096x32000")
        tokens, vocab = (int(p) for p in parts)
        if tokens < 1 or vocab < 1:
            raise ValueError(f"shape {item!r} must have tokens >= 1 and vocab >= 1")
        shapes.append((tokens, vocab))
    if not shapes:
        raise ValueError("no shapes given")
    return shapes


def parse_names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """Comma list of names from ``allowed``; "all" for every one, "none" or "" for none."""
    text = text.strip()
    if text == "all":
        return list(allowed)
    if text in ("", "none"):
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return names


def candidate_label(row: dict[str, Any]) -> str:
    """Short name of a candidate for tables and legends, e.g. ``precision_ce[torch] precision``."""
    if row["candidate"] == "precision_ce":
        return f"precision_ce[{row['backend']}] {row['preset']}"
    if row["candidate"] == "torch.compile(precision_ce)":
        return f"compile(precision_ce) {row['preset']}"
    return str(row["candidate"])


# --------------------------------------------------------------------------------------------
# Candidates


@dataclasses.dataclass
class Candidate:
    """One loss implementation to measure in one case.

    ``make`` builds ``loss_fn(logits (N, V), target (N,) int64) -> scalar loss``; a candidate
    with a ``skip`` note is reported without being run. ``reference`` is the label of the
    candidate whose loss value this one must reproduce. ``mutates_input``: the loss writes into
    its logits (Liger stores the gradient there), so it gets its own copy.
    """

    candidate: str
    backend: str
    preset: str
    make: Callable[[], LossFn] | None = None
    skip: str = ""
    note: str = ""
    reference: str | None = None
    compiled: bool = False
    mutates_input: bool = False

    @property
    def label(self) -> str:
        return candidate_label({"candidate": self.candidate, "backend": self.backend, "preset": self.preset})


@dataclasses.dataclass(frozen=True)
class Case:
    """One grid point: ``tokens`` x ``vocab`` logits of ``dtype`` ("fp32", "bf16", "fp16")."""

    device: str
    dtype: str
    tokens: int
    vocab: int

    @property
    def elements(self) -> int:
        return self.tokens * self.vocab


def _precision_ce_loss(config: Any, backend: str) -> LossFn:
    import precision_ce

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return precision_ce.cross_entropy(logits, target, config=config, backend=backend)  # type: ignore[return-value]

    return loss_fn


def _torch_cross_entropy() -> LossFn:
    import torch.nn.functional as F

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)

    return loss_fn


def _compiled(make: Callable[[], LossFn]) -> Callable[[], LossFn]:
    def build() -> LossFn:
        import torch

        return torch.compile(make(), dynamic=False)  # type: ignore[return-value]

    return build


def _liger_loss() -> LossFn:
    """Liger-Kernel's ``LigerCrossEntropyLoss`` (mean reduction), or its functional form."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger: Callable[..., Any] = LigerCrossEntropyLoss()
    except ImportError:
        from liger_kernel.transformers.functional import liger_cross_entropy as liger

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = liger(logits, target)
        return out[0] if isinstance(out, tuple) else out  # some versions also return the z-loss

    return loss_fn


def build_candidates(case: Case, presets: Sequence[str], compile_presets: Sequence[str],
                     compile_enabled: bool, compile_max_elements: int) -> list[Candidate]:
    """Every candidate of ``case``, in measuring order; the ones that cannot run carry a skip note."""
    import precision_ce
    from precision_ce import reference

    on_cuda = case.device == "cuda"
    candidates = [Candidate(BASELINE_CANDIDATE, "aten", "cross_entropy", _torch_cross_entropy)]
    compile_fce = Candidate("torch.compile(F.cross_entropy)", "inductor", "cross_entropy",
                            reference=BASELINE_CANDIDATE, compiled=True)
    if compile_enabled:
        compile_fce.make = _compiled(_torch_cross_entropy)
    else:
        compile_fce.skip = "skipped: --no-compile"
    candidates.append(compile_fce)

    triton_missing = importlib.util.find_spec("precision_ce.triton_backend") is None
    chunks = math.ceil(case.elements / reference.CHUNK_ELEMENTS)
    for name in presets:
        config = precision_ce.PRESETS[name]
        fast_path = "torch backend takes F.cross_entropy's fast path" if config.is_cross_entropy else ""
        eager = Candidate("precision_ce", "torch", name, lambda c=config: _precision_ce_loss(c, "torch"),
                          note=fast_path,
                          reference=BASELINE_CANDIDATE if config.is_cross_entropy else None)
        candidates.append(eager)

        triton = Candidate("precision_ce", "triton", name, reference=eager.label)
        if not on_cuda:
            triton.skip = TRITON_CPU_SKIP
        elif triton_missing:
            triton.skip = "skipped: precision_ce.triton_backend is not present in this checkout"
        else:
            triton.make = lambda c=config: _precision_ce_loss(c, "triton")
        candidates.append(triton)

        compiled = Candidate("torch.compile(precision_ce)", "torch+inductor", name,
                             reference=eager.label, compiled=True)
        if not compile_enabled:
            compiled.skip = "skipped: --no-compile"
        elif name not in compile_presets:
            compiled.skip = (f"skipped: not in --compile-presets (10-25 s of compilation per case "
                             f"on CPU); default {DEFAULT_COMPILE_PRESETS[case.device]!r}")
        elif case.elements > compile_max_elements:
            compiled.skip = (f"skipped: N*V = {case.elements} > --compile-max-elements "
                             f"{compile_max_elements}; Dynamo unrolls the torch backend's {chunks} "
                             f"row chunks (compile took 260 s at 4096x32000, 63 chunks, on 2 CPU cores)")
        else:
            compiled.make = _compiled(lambda c=config: _precision_ce_loss(c, "torch"))
        candidates.append(compiled)

    liger = Candidate("liger_cross_entropy", "liger", "cross_entropy", reference=BASELINE_CANDIDATE,
                      mutates_input=True,
                      note="writes the gradient into the logits' storage: its extra peak excludes it")
    if importlib.util.find_spec("liger_kernel") is None:
        liger.skip = "skipped: Liger-Kernel is not installed (pip install liger-kernel)"
    elif not on_cuda:
        liger.skip = "skipped: Liger-Kernel's Triton kernels need CUDA"
    else:
        liger.make = _liger_loss
    candidates.append(liger)
    return candidates


# --------------------------------------------------------------------------------------------
# Measuring


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """How one timing sample of a function is taken.

    calls: CPU, calls per ``Timer`` sample (so that a sample lasts at least ``--min-time``).
    one_shot: CUDA, time a single call with CUDA events instead of ``do_bench`` (calls longer
    than ``--rep-ms``, where do_bench's 5 estimation calls plus warm-up would dominate the cost).
    seconds: estimated wall time of one sample.
    """

    calls: int
    one_shot: bool
    seconds: float


class Timing:
    """Device-specific timer and peak-memory probe."""

    def __init__(self, device: str, min_time_s: float, warmup_ms: float, rep_ms: float) -> None:
        self.device = device
        self.min_time_s = min_time_s
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms

    def synchronize(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def once_s(self, fn: Callable[[], object]) -> float:
        """Wall seconds of one call of ``fn`` (device synchronized before and after)."""
        self.synchronize()
        start = time.perf_counter()
        fn()
        self.synchronize()
        return time.perf_counter() - start

    def plan(self, call_s: float) -> SamplePlan:
        """The ``SamplePlan`` for a function whose call takes about ``call_s`` seconds."""
        call_s = max(call_s, 1e-9)
        if self.device == "cuda":
            if call_s * 1e3 >= self.rep_ms:
                return SamplePlan(1, True, call_s)
            return SamplePlan(1, False, (self.warmup_ms + self.rep_ms) / 1e3 + 7 * call_s)
        calls = max(1, min(10_000, math.ceil(self.min_time_s / call_s)))
        return SamplePlan(calls, False, calls * call_s)

    def time_ms(self, fn: Callable[[], object], plan: SamplePlan) -> float:
        """One timing sample of ``fn``: ms per call."""
        import torch

        if self.device == "cuda":
            if plan.one_shot:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                return float(start.elapsed_time(end))
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        from torch.utils.benchmark import Timer

        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        # Timer.timeit(n) runs max(n // 100, 2) warm-up calls before every sample, which triples
        # the cost of the large cases (n = 1). Candidates are warmed up once by the harness, so
        # the sample is taken with the Timer's inner loop alone (same clock, same thread count).
        inner = getattr(timer, "_timeit", None)
        if inner is None:
            return timer.timeit(plan.calls).median * 1e3
        return inner(plan.calls) / plan.calls * 1e3

    def peak_extra_bytes(self, fn: Callable[[], object]) -> int:
        """Peak bytes allocated while ``fn()`` runs, above what was allocated before it.

        ``fn``'s result stays alive until the peak is read, so it is part of the peak.
        """
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            result = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            del result
            return int(peak)
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        del result
        return cpu_peak_from_events(prof.profiler.kineto_results.events())  # type: ignore[union-attr]


def cpu_peak_from_events(events: Iterable[Any]) -> int:
    """Peak of the running sum of CPU allocator events (``[memory]``: +bytes alloc, -bytes free)."""
    import torch

    cpu_types = {torch.autograd.DeviceType.CPU}
    memory = [e for e in events if e.name() == "[memory]" and e.device_type() in cpu_types]
    memory.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in memory:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines); Python errors still raise."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            sys.stderr.flush()
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _failure_note(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"failed: {type(error).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _loss_close(value: float, reference: float, dtype: str) -> bool:
    tolerance = 1e-3 if dtype == "fp32" else 2e-2
    return abs(value - reference) <= tolerance * max(1.0, abs(reference))


@dataclasses.dataclass
class _Active:
    """A candidate that survived its warm-up, with its samples so far."""

    candidate: Candidate
    fwd: Callable[[], object]
    fwd_bwd: Callable[[], object]
    fwd_plan: SamplePlan
    fwd_bwd_plan: SamplePlan
    samples: int
    notes: list[str]
    compile_s: float | None = None
    fwd_ms: list[float] = dataclasses.field(default_factory=list)
    fwd_bwd_ms: list[float] = dataclasses.field(default_factory=list)
    failed: bool = False
    peak_bytes: int | None = None


def make_inputs(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) ~ 2 * standard normal in ``case.dtype`` with requires_grad, targets (N,) int64."""
    import torch

    generator = torch.Generator(case.device).manual_seed(seed)
    dtype = getattr(torch, DTYPES[case.dtype])
    logits = (torch.randn(case.tokens, case.vocab, generator=generator, device=case.device) * 2.0).to(dtype)
    target = torch.randint(0, case.vocab, (case.tokens,), generator=generator, device=case.device)
    return logits.requires_grad_(), target


def _warm_up(case: Case, candidate: Candidate, logits: torch.Tensor, target: torch.Tensor,
             timing: Timing, losses: dict[str, float], repeats: int, max_seconds: float) -> _Active:
    """Build the candidate, run one fwd+bwd (compiling if needed), check its loss, plan its samples.

    The number of samples is ``repeats``, or fewer (one at least) when that many would take
    longer than ``max_seconds``. Raises whatever the candidate raises; records its loss value
    in ``losses`` by label.
    """
    import torch

    assert candidate.make is not None
    x = logits.detach().clone().requires_grad_() if candidate.mutates_input else logits
    loss_fn = candidate.make()

    def fwd() -> object:
        return loss_fn(x, target)

    def fwd_bwd() -> object:
        return torch.autograd.grad(loss_fn(x, target), x)

    notes = [candidate.note] if candidate.note else []
    timing.synchronize()
    start = time.perf_counter()
    loss = loss_fn(x, target)
    torch.autograd.grad(loss, x)
    value = float(loss.detach().float())
    first_call_s = time.perf_counter() - start
    compile_s = None
    if candidate.compiled:
        compile_s = first_call_s
        notes.append(f"first call (compile) {compile_s:.1f} s")
    if not math.isfinite(value):
        notes.append(f"loss is {value}")
    losses[candidate.label] = value
    reference = losses.get(candidate.reference or "")
    if reference is not None and not _loss_close(value, reference, case.dtype):
        notes.append(f"loss {value:.6g} differs from {candidate.reference}'s {reference:.6g}")

    # A first call on CPU is representative once it is long (no JIT there unless compiled);
    # short ones and every first call on CUDA (kernel compilation, autotuning) are re-measured.
    reuse_first = case.device == "cpu" and not candidate.compiled and first_call_s >= timing.min_time_s
    fwd_bwd_plan = timing.plan(first_call_s if reuse_first else timing.once_s(fwd_bwd))
    if reuse_first and first_call_s / 4 >= timing.min_time_s:
        fwd_plan = timing.plan(first_call_s / 2)  # one call per sample either way; no calibration call
    else:
        fwd_plan = timing.plan(timing.once_s(fwd))
    affordable = max_seconds / (fwd_plan.seconds + fwd_bwd_plan.seconds)
    samples = repeats if affordable >= repeats else max(1, int(affordable))
    if samples < repeats:
        notes.append(f"{samples} of {repeats} samples (--max-candidate-seconds {max_seconds:g})")
    return _Active(candidate, fwd, fwd_bwd, fwd_plan, fwd_bwd_plan, samples, notes, compile_s)


def bench_case(case: Case, candidates: Sequence[Candidate], timing: Timing, repeats: int, seed: int,
               progress: Any = None, peak_bandwidth: float | None = None,
               max_candidate_seconds: float = math.inf) -> list[dict[str, Any]]:
    """Measure every runnable candidate of ``case``; one result row (dict) per candidate.

    Rows hold times in ms, ``peak_extra_mb`` and notes; ratios are added later by ``add_ratios``.
    A candidate that raises is reported with a "failed: ..." note and left out from then on.
    """
    logits, target = make_inputs(case, seed)
    element_size = logits.element_size()
    logits_bytes = case.elements * element_size

    def step(label: str) -> None:
        if progress is not None:
            progress.set_postfix_str(f"{case.tokens}x{case.vocab} {case.dtype} {label}"[:60], refresh=False)
            progress.update(1)

    losses: dict[str, float] = {}
    active: list[_Active] = []
    rows: dict[str, dict[str, Any]] = {}
    for candidate in candidates:
        rows[candidate.label] = _row(case, candidate)
        if candidate.skip or candidate.make is None:
            continue
        try:
            active.append(_warm_up(case, candidate, logits, target, timing, losses, repeats,
                                   max_candidate_seconds))
        except Exception as error:  # a candidate that cannot run is reported, never fatal
            rows[candidate.label]["note"] = "; ".join(filter(None, [candidate.note, _failure_note(error)]))
            _free_device_memory(case.device)
            step("")  # its timing and memory steps will not come
            step("")
            for _ in range(repeats):
                step("")
            continue
        step(f"warm-up {candidate.label}")

    for repeat in range(repeats):
        order = list(active)
        random.Random(seed * 1_000_003 + repeat).shuffle(order)
        for state in order:
            if not state.failed and repeat < state.samples:
                try:
                    fwd_ms = timing.time_ms(state.fwd, state.fwd_plan)
                    fwd_bwd_ms = timing.time_ms(state.fwd_bwd, state.fwd_bwd_plan)
                    state.fwd_ms.append(fwd_ms)
                    state.fwd_bwd_ms.append(fwd_bwd_ms)
                except Exception as error:
                    state.failed = True
                    state.notes.append(_failure_note(error))
                    _free_device_memory(case.device)
            step(state.candidate.label)

    for state in active:
        if not state.failed:
            try:
                gc.collect()
                state.peak_bytes = timing.peak_extra_bytes(state.fwd_bwd)
            except Exception as error:
                state.notes.append(f"memory {_failure_note(error)}")
                _free_device_memory(case.device)
        step(f"memory {state.candidate.label}")

    for state in active:
        row = rows[state.candidate.label]
        row["compile_s"] = state.compile_s
        row["note"] = "; ".join(state.notes)
        if state.fwd_bwd_ms:
            fwd = summarize(state.fwd_ms)
            fwd_bwd = summarize(state.fwd_bwd_ms)
            bwd = summarize([b - f for f, b in zip(state.fwd_ms, state.fwd_bwd_ms, strict=True)])
            row.update(
                fwd_ms=fwd.median, bwd_ms=bwd.median, fwd_bwd_ms=fwd_bwd.median,
                fwd_iqr_ms=fwd.iqr, bwd_iqr_ms=bwd.iqr, fwd_bwd_iqr_ms=fwd_bwd.iqr,
                fwd_bwd_min_ms=fwd_bwd.minimum, fwd_bwd_max_ms=fwd_bwd.maximum,
                spread=fwd_bwd.iqr / fwd_bwd.median if fwd_bwd.median > 0 else None,
                repeats=len(state.fwd_bwd_ms),
            )
            if case.device == "cuda":
                achieved = assumed_hbm_bytes(case.tokens, case.vocab, element_size) / (fwd_bwd.median * 1e-3)
                row["hbm_tbs"] = achieved / 1e12
                row["hbm_fraction_of_peak"] = ratio_to_baseline(achieved, peak_bandwidth)
        if state.peak_bytes is not None:
            row["peak_extra_mb"] = state.peak_bytes / 2**20
            row["peak_extra_x_logits"] = state.peak_bytes / logits_bytes

    del active, logits, target
    _free_device_memory(case.device)
    return list(rows.values())


def _row(case: Case, candidate: Candidate) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS)
    row.update(device=case.device, dtype=case.dtype, tokens=case.tokens, vocab=case.vocab,
               candidate=candidate.candidate, backend=candidate.backend, preset=candidate.preset,
               note=candidate.skip or candidate.note)
    return row


def _free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Output


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``results.csv`` with ``CSV_COLUMNS``; floats with 6 significant digits, None as empty."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _fmt(row.get(key), 6) for key in CSV_COLUMNS})


TABLE_LEGEND = (
    "Times: medians over interleaved repeats (ms); bwd = fwd+bwd minus fwd of the same repeat. "
    "IQR: interquartile range of fwd+bwd over its median. x F.ce: fwd+bwd time over F.cross_entropy's "
    "in the same case. Peak extra: most memory allocated during one fwd+bwd above the live inputs, "
    "gradient included (MiB = 2**20 bytes), and as a multiple of the logits' size."
)
CUDA_LEGEND = (
    " TB/s: assumed traffic 2 x N x V x element size (logits read once, gradient written once) over "
    "the fwd+bwd time, a lower bound on the bandwidth achieved; of peak: over the datasheet peak."
)


def _by_case(rows: Iterable[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    cases: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        cases.setdefault(case_key(row), []).append(row)
    return cases


def _is_skipped(row: dict[str, Any]) -> bool:
    return row.get("fwd_bwd_ms") is None and str(row.get("note") or "").startswith("skipped")


def format_measured(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown tables, one per case, of every candidate that was not skipped."""
    lines: list[str] = []
    on_cuda = any(row["device"] == "cuda" for row in rows)
    header = ["candidate", "fwd ms", "bwd ms", "fwd+bwd ms", "IQR", "x F.ce", "peak extra MiB",
              "x logits"] + (["TB/s", "of peak"] if on_cuda else []) + ["note"]
    for (device, dtype, tokens, vocab), case_rows in _by_case(rows).items():
        lines += ["", f"{device} {dtype}, {tokens} x {vocab} logits", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if i in (0, len(header) - 1) else "---:"
                                    for i in range(len(header))) + "|")
        for row in case_rows:
            if _is_skipped(row):
                continue
            cells = [
                candidate_label(row), _fmt(row.get("fwd_ms")), _fmt(row.get("bwd_ms")),
                _fmt(row.get("fwd_bwd_ms")),
                "" if row.get("spread") is None else f"{100 * row['spread']:.0f}%",
                _fmt(row.get("ratio_vs_torch_ce")), _fmt(row.get("peak_extra_mb")),
                _fmt(row.get("peak_extra_x_logits")),
            ]
            if on_cuda:
                fraction = row.get("hbm_fraction_of_peak")
                cells += [_fmt(row.get("hbm_tbs")), "" if fraction is None else f"{100 * fraction:.0f}%"]
            cells.append(str(row.get("note") or "").replace("|", "/"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def format_skipped(rows: Sequence[dict[str, Any]]) -> str:
    """The skipped candidates, grouped by reason, with the presets and shapes they cover."""
    skipped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if _is_skipped(row):
            name = candidate_label(row).split(" ")[0]
            skipped.setdefault((name, str(row["note"])), []).append(row)
    if not skipped:
        return ""
    lines = ["Skipped:"]
    for (name, note), group in skipped.items():
        presets = sorted({str(r["preset"]) for r in group})
        shapes = sorted({(int(r["tokens"]), int(r["vocab"])) for r in group})
        where = ", ".join(f"{t}x{v}" for t, v in shapes)
        lines.append(f"- {name} ({', '.join(presets)}; {where}): {note.removeprefix('skipped: ')}")
    return "\n".join(lines) + "\n"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Legend, the per-case tables of ``format_measured`` and the list of ``format_skipped``."""
    legend = TABLE_LEGEND + (CUDA_LEGEND if any(row["device"] == "cuda" for row in rows) else "")
    return "\n".join(filter(None, [legend + "\n", format_measured(rows), format_skipped(rows)]))


PRESET_COLORS: dict[str, str] = {
    "cross_entropy": "tab:blue", "precision": "tab:orange", "diversity": "tab:green",
    "tail_penalty": "tab:red", "head_reward": "tab:purple",
}
PEER_STYLES: dict[str, tuple[str, str]] = {
    "F.cross_entropy": ("black", "-"),
    "torch.compile(F.cross_entropy)": ("dimgray", "--"),
    "liger_cross_entropy": ("saddlebrown", "-."),
}
BACKEND_LINESTYLES: dict[str, str] = {"torch": "-", "triton": ":", "torch+inductor": "--"}


def _line_style(row: dict[str, Any]) -> tuple[str, str]:
    """(color, linestyle): peers by name; precision_ce colored by preset, dashed when compiled."""
    if row["candidate"] in PEER_STYLES:
        return PEER_STYLES[row["candidate"]]
    return PRESET_COLORS.get(row["preset"], "tab:gray"), BACKEND_LINESTYLES.get(row["backend"], "-")


def write_figures(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``time_vs_vocab.png`` and ``memory_vs_vocab.png``, one panel column per dtype.

    x: vocabulary size (log). Time: fwd+bwd median in ms (log) above, the ratio to
    F.cross_entropy of the same case (log) below. Memory: extra peak in MiB (log) above, as a
    multiple of the logits' size below. Lines join the cases of equal token count; the marker
    says which token count. Colors: preset; line style: backend (solid torch, dotted triton,
    dashed torch.compile); black/gray/brown: F.cross_entropy, its torch.compile, Liger.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if row.get("fwd_bwd_ms") is not None]
    if not measured:
        return []
    dtypes = sorted({row["dtype"] for row in measured})
    labels = list(dict.fromkeys(candidate_label(row) for row in measured))
    token_counts = sorted({int(row["tokens"]) for row in measured})
    markers = dict(zip(token_counts, "os^Dv<>p*h", strict=False))
    device = measured[0]["device"]
    figures = [
        ("time_vs_vocab.png",
         ("fwd+bwd time (ms, median)", lambda r: r.get("fwd_bwd_ms"), True),
         ("fwd+bwd time / F.cross_entropy", lambda r: r.get("ratio_vs_torch_ce"), True)),
        ("memory_vs_vocab.png",
         ("extra peak memory (MiB)", lambda r: r.get("peak_extra_mb"), True),
         ("extra peak memory / logits size", lambda r: r.get("peak_extra_x_logits"), False)),
    ]
    paths = []
    for filename, *panels in figures:
        fig, axes = plt.subplots(2, len(dtypes), figsize=(6.5 * len(dtypes), 8.5), squeeze=False, sharex=True)
        for column, dtype in enumerate(dtypes):
            for panel, (ylabel, value, log) in enumerate(panels):
                ax = axes[panel][column]
                for label in labels:
                    for tokens in token_counts:
                        chosen = sorted(
                            (r for r in measured if candidate_label(r) == label and r["dtype"] == dtype
                             and int(r["tokens"]) == tokens and value(r) is not None),
                            key=lambda r: int(r["vocab"]))
                        if not chosen:
                            continue
                        color, linestyle = _line_style(chosen[0])
                        ax.plot([int(r["vocab"]) for r in chosen], [value(r) for r in chosen],
                                marker=markers[tokens], color=color, linestyle=linestyle, label=label,
                                markersize=6, alpha=0.85)
                ax.set_xscale("log")
                if log:
                    ax.set_yscale("log")
                if panel == 1 and filename.startswith("time"):
                    ax.axhline(1.0, color="black", linewidth=0.8)
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
                if panel == 0:
                    ax.set_title(f"{device} {dtype}")
                else:
                    ax.set_xlabel("vocabulary size V")
        unique: dict[str, Any] = {}
        for ax in axes.flat:
            for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
                unique.setdefault(name, handle)
        marker_note = ", ".join(f"{markers[t]}: {t} tokens" for t in token_counts)
        axes[0][-1].legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.02, 1.0),
                           fontsize=8, title=f"markers  {marker_note}", title_fontsize=8)
        path = out_dir / filename
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def environment(device: str, args: argparse.Namespace) -> dict[str, Any]:
    """Machine, library versions and date of a run (written as ``environment.json``)."""
    import torch

    import precision_ce

    def version(module: str) -> str | None:
        try:
            from importlib.metadata import version as dist_version

            return dist_version(module)
        except Exception:
            return None

    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "precision_ce": precision_ce.__version__,
        "liger_kernel": version("liger-kernel"),
        "numpy": version("numpy"),
        "matplotlib": version("matplotlib"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
        "environment_variables": {name: os.environ[name] for name in (
            "TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
            if name in os.environ},
        "timer": ("triton.testing.do_bench, median (one sample); calls longer than --rep-ms: one "
                  "call per sample timed with CUDA events" if device == "cuda" else
                  "torch.utils.benchmark.Timer inner loop (ms per call), each sample repeating the "
                  "call until it lasts --min-time"),
        "peak_memory": ("torch.cuda.max_memory_allocated - memory_allocated before, one fwd+bwd"
                        if device == "cuda" else
                        "torch.profiler CPU allocator events (profile_memory=True), peak of the running "
                        "sum during one fwd+bwd"),
        "backward_time": "per repeat: fwd+bwd sample minus the fwd sample taken just before it",
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "module_name")},
    }
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        peak = _peak_bandwidth(args, properties.name)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    gpu_capability=f"{properties.major}.{properties.minor}", cuda=torch.version.cuda,
                    peak_hbm_tbs=None if peak is None else peak / 1e12)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return None


def _peak_bandwidth(args: argparse.Namespace, gpu_name: str) -> float | None:
    if args.peak_bandwidth_tbs:
        return float(args.peak_bandwidth_tbs) * 1e12
    return peak_hbm_bandwidth(gpu_name)


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``precision-ce bench``."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to run; cuda switches to the GPU grid and timer (default cpu)")
    parser.add_argument("--shapes", default=None,
                        help=f"comma list of TOKENSxVOCAB (default cpu: {DEFAULT_CPU_SHAPES}; cuda: "
                             f"{DEFAULT_CUDA_SHAPES} in bf16 plus 16384x32000 in fp32)")
    parser.add_argument("--dtype", default=None,
                        help=f"comma list of {', '.join(DTYPES)} (default cpu: {DEFAULT_CPU_DTYPES}; "
                             f"cuda: see --shapes)")
    parser.add_argument("--presets", default="all",
                        help=f"comma list of presets for precision_ce, or all (of {', '.join(PRESET_NAMES)})")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved timing samples per candidate and case (default cpu 5, cuda 3; "
                             "a CUDA sample is itself the median of do_bench's many calls)")
    parser.add_argument("--max-candidate-seconds", type=float, default=60.0,
                        help="take fewer samples (one at least) of a candidate whose samples would "
                             "take longer than this in one case, estimated from its first call "
                             "(default 60)")
    parser.add_argument("--compile-presets", default=None,
                        help="presets whose torch backend is also timed under torch.compile, 'all' or "
                             f"'none' (default cpu: {DEFAULT_COMPILE_PRESETS['cpu']}; cuda: all)")
    parser.add_argument("--compile-max-elements", type=int, default=DEFAULT_COMPILE_MAX_ELEMENTS,
                        help="compile the torch backend only when tokens*vocab is at most this "
                             f"(default {DEFAULT_COMPILE_MAX_ELEMENTS}; compile time grows with it)")
    parser.add_argument("--no-compile", action="store_true", help="skip every torch.compile candidate")
    parser.add_argument("--min-time", type=float, default=0.05,
                        help="cpu: seconds one timing sample lasts at least, by repeating the call")
    parser.add_argument("--warmup-ms", type=float, default=5.0, help="cuda: do_bench warm-up per sample")
    parser.add_argument("--rep-ms", type=float, default=25.0,
                        help="cuda: do_bench measuring time per sample; longer calls are timed once "
                             "per sample with CUDA events")
    parser.add_argument("--peak-bandwidth-tbs", type=float, default=None,
                        help="cuda: peak HBM bandwidth in TB/s (default from the GPU name, H200 = 4.8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random logits and targets")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for results.csv, results.md, figures and environment.json "
                             "(default benchmarks/results/DEVICE)")
    parser.add_argument("--no-figures", action="store_true", help="skip the matplotlib figures")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The grid of cases from --device, --shapes and --dtype."""
    if args.device == "cuda" and args.shapes is None and args.dtype is None:
        return [Case("cuda", dtype, tokens, vocab) for dtype, tokens, vocab in DEFAULT_CUDA_CASES]
    on_cuda = args.device == "cuda"
    shapes = parse_shapes(args.shapes or (DEFAULT_CUDA_SHAPES if on_cuda else DEFAULT_CPU_SHAPES))
    dtypes = parse_names(args.dtype or (DEFAULT_CUDA_DTYPES if on_cuda else DEFAULT_CPU_DTYPES),
                         list(DTYPES), "dtype")
    if not dtypes:
        raise ValueError("--dtype names no dtype")
    return [Case(args.device, dtype, tokens, vocab) for dtype in dtypes for tokens, vocab in shapes]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark grid; print the table; write CSV, markdown, figures and environment."""
    try:
        cases = build_cases(args)
        presets = parse_names(args.presets, PRESET_NAMES, "preset")
        compile_text = args.compile_presets
        if compile_text is None:
            compile_text = DEFAULT_COMPILE_PRESETS[args.device]
        compile_presets = parse_names(compile_text, PRESET_NAMES, "preset")
        repeats = args.repeats if args.repeats is not None else DEFAULT_REPEATS[args.device]
        if repeats < 1:
            raise ValueError("--repeats must be >= 1")
    except ValueError as error:
        print(f"precision-ce bench: {error}", file=sys.stderr)
        return 2

    import torch
    from tqdm import tqdm

    if args.device == "cuda" and not torch.cuda.is_available():
        print("precision-ce bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.device == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load >= 0.5 * cores:
            print(f"precision-ce bench: warning: load average {load:.1f} on {cores} cores; other "
                  "processes compete for the CPU, so timings will be noisy (see the spread column)",
                  file=sys.stderr)
    out_dir = args.out if args.out is not None else Path("benchmarks") / "results" / args.device
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = environment(args.device, args)
    peak_bandwidth = None
    if args.device == "cuda":
        peak_bandwidth = _peak_bandwidth(args, torch.cuda.get_device_properties(0).name)
    timing = Timing(args.device, args.min_time, args.warmup_ms, args.rep_ms)

    plans = [(case, build_candidates(case, presets, compile_presets, not args.no_compile,
                                     args.compile_max_elements)) for case in cases]
    total = sum((repeats + 2) * sum(1 for c in candidates if not c.skip) for _, candidates in plans)
    rows: list[dict[str, Any]] = []
    with tqdm(total=total, desc="bench", unit="step", disable=args.no_progress, file=sys.stderr,
              dynamic_ncols=True) as progress:
        for case, candidates in plans:
            if any(c.compiled and not c.skip for c in candidates):
                torch._dynamo.reset()  # fresh caches: no recompile limit is hit across cases
            case_rows = add_ratios(bench_case(case, candidates, timing, repeats, args.seed, progress,
                                              peak_bandwidth, args.max_candidate_seconds))
            rows.extend(case_rows)
            progress.write(format_measured(case_rows), file=sys.stdout)
            # Written after every case, so that a run cut short still leaves its results.
            write_csv(rows, out_dir / "results.csv")
            (out_dir / "results.md").write_text(format_table(rows))

    print(format_skipped(rows))
    figures: list[Path] = []
    if not args.no_figures:
        try:
            figures = write_figures(rows, out_dir)
        except ImportError as error:
            print(f"precision-ce bench: no figures ({error}); pip install matplotlib", file=sys.stderr)
    info["runtime_s"] = round(time.perf_counter() - started, 1)
    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    (out_dir / "environment.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    written = ["results.csv", "results.md", "environment.json", *(p.name for p in figures)]
    print(f"wrote {', '.join(written)} to {out_dir} in {info['runtime_s']} s")
    return 0
