"""Timing one call: ``torch.utils.benchmark.Timer`` on CPU, ``triton.testing.do_bench`` on CUDA."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .memory import peak_extra_bytes

if TYPE_CHECKING:
    import torch

    LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
        """Peak bytes allocated while ``fn()`` runs, above what was allocated before it (``memory``)."""
        return peak_extra_bytes(self.device, fn)
