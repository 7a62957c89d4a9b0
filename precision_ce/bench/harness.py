"""Measuring the candidates of one case: warm-up, interleaved repeats, peak memory, result rows."""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .cases import Candidate, Case, make_inputs
from .report import CSV_COLUMNS
from .stats import assumed_hbm_bytes, ratio_to_baseline, summarize
from .timing import SamplePlan, Timing

if TYPE_CHECKING:
    import torch

    LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def _warm_up(case: Case, candidate: Candidate, leaves: tuple[torch.Tensor, ...], target: torch.Tensor,
             timing: Timing, losses: dict[str, float], repeats: int, max_seconds: float) -> _Active:
    """Build the candidate, run one fwd+bwd (compiling if needed), check its loss, plan its samples.

    The number of samples is ``repeats``, or fewer (one at least) when that many would take
    longer than ``max_seconds``. Raises whatever the candidate raises; records its loss value
    in ``losses`` by label.
    """
    import torch

    assert candidate.make is not None
    xs = tuple(x.detach().clone().requires_grad_() for x in leaves) if candidate.mutates_input else leaves
    loss_fn = candidate.make()

    def fwd() -> object:
        return loss_fn(*xs, target)

    def fwd_bwd() -> object:
        return torch.autograd.grad(loss_fn(*xs, target), xs)

    notes = [candidate.note] if candidate.note else []
    timing.synchronize()
    start = time.perf_counter()
    loss = loss_fn(*xs, target)
    torch.autograd.grad(loss, xs)
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
    leaves, target = make_inputs(case, seed)
    element_size = leaves[0].element_size()
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
            active.append(_warm_up(case, candidate, leaves, target, timing, losses, repeats,
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
            if case.device == "cuda" and case.hidden is None:
                achieved = assumed_hbm_bytes(case.tokens, case.vocab, element_size) / (fwd_bwd.median * 1e-3)
                row["hbm_tbs"] = achieved / 1e12
                row["hbm_fraction_of_peak"] = ratio_to_baseline(achieved, peak_bandwidth)
        if state.peak_bytes is not None:
            row["peak_extra_mb"] = state.peak_bytes / 2**20
            row["peak_extra_x_logits"] = state.peak_bytes / logits_bytes

    del active, leaves, target
    _free_device_memory(case.device)
    return list(rows.values())


def _row(case: Case, candidate: Candidate) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CSV_COLUMNS)
    row.update(device=case.device, dtype=case.dtype, tokens=case.tokens, hidden=case.hidden, vocab=case.vocab,
               candidate=candidate.candidate, backend=candidate.backend, preset=candidate.preset,
               note=candidate.skip or candidate.note)
    return row


def _free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
