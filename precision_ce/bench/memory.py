"""Peak memory of one call: CUDA allocator statistics, or the CPU allocator events of ``torch.profiler``."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any


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
def quiet_stderr() -> Iterator[None]:
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


def peak_extra_bytes(device: str, fn: Callable[[], object]) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it.

    ``fn``'s result stays alive until the peak is read, so it is part of the peak.
    """
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    return cpu_peak_from_events(prof.profiler.kineto_results.events())  # type: ignore[union-attr]
