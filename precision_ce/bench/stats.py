"""Statistics of timing samples and ratios against a baseline (pure functions, unit-tested)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .cases import BASELINE_CANDIDATE, FUSED_LINEAR, LINEAR_BASELINE, TORCH_CHUNKED, UNFUSED_LINEAR

if TYPE_CHECKING:
    import torch

    LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

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

UNFUSED_COLUMNS: dict[str, str] = {"time_vs_unfused": "fwd_bwd_ms", "peak_vs_unfused": "peak_extra_mb"}
"""linear_cross_entropy rows only: fwd+bwd time and peak over those of F.linear + precision_ce."""
TORCH_CHUNKED_COLUMNS: dict[str, str] = {"time_vs_torch_chunked": "fwd_bwd_ms",
                                         "peak_vs_torch_chunked": "peak_extra_mb"}
"""Fused-linear rows: fwd+bwd time and peak over those of torch's chunked F.linear_cross_entropy."""


def case_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """Rows with equal keys are the same case: ratios are only taken within a case."""
    hidden = row.get("hidden")
    return (row["device"], row["dtype"], int(row["tokens"]), int(row["vocab"]),
            None if hidden in (None, "") else int(hidden))


def add_ratios(rows: Iterable[dict[str, Any]],
               baselines: Sequence[str] = (BASELINE_CANDIDATE, LINEAR_BASELINE)) -> list[dict[str, Any]]:
    """Copies of ``rows`` with the ``RATIO_COLUMNS`` filled in against the baseline of the same case
    (a candidate named in ``baselines``: F.cross_entropy, or F.linear + F.cross_entropy for the
    fused-linear cases), ``UNFUSED_COLUMNS`` for the fused-linear loss against the unfused one
    of the same preset and backend, and ``TORCH_CHUNKED_COLUMNS`` for every fused-linear row against
    torch's chunked ``F.linear_cross_entropy``. A case without a measured baseline row gets None ratios.
    """
    rows = [dict(row) for row in rows]
    base_rows = {case_key(row): row for row in rows if row["candidate"] in baselines}
    unfused = {(case_key(row), row["backend"], row["preset"]): row for row in rows
               if row["candidate"] == UNFUSED_LINEAR}
    torch_chunked = {case_key(row): row for row in rows if row["candidate"] == TORCH_CHUNKED}
    for row in rows:
        base = base_rows.get(case_key(row))
        for ratio_column, column in RATIO_COLUMNS.items():
            row[ratio_column] = ratio_to_baseline(row.get(column), None if base is None else base.get(column))
        twin = unfused.get((case_key(row), row["backend"], row["preset"])) if row["candidate"] == FUSED_LINEAR else None
        for ratio_column, column in UNFUSED_COLUMNS.items():
            row[ratio_column] = ratio_to_baseline(row.get(column), None if twin is None else twin.get(column))
        chunked = torch_chunked.get(case_key(row)) if row.get("hidden") not in (None, "") else None
        for ratio_column, column in TORCH_CHUNKED_COLUMNS.items():
            row[ratio_column] = ratio_to_baseline(row.get(column), None if chunked is None else chunked.get(column))
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


LINEAR_TARGETS: dict[str, float] = {"time_vs_torch_chunked": 0.9, "peak_vs_torch_chunked": 1.0,
                                    "preset_time_vs_cross_entropy": 1.3}
"""Issue 18's targets for a fused-linear case: ``linear_cross_entropy`` at the cross-entropy setting
against torch's chunked ``F.linear_cross_entropy`` (fwd+bwd time, peak extra memory), and every
other preset's fwd+bwd time against ours at the cross-entropy setting."""


def linear_targets(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One verdict per fused-linear case with measured rows (``add_ratios`` already applied): the
    ratios of ``LINEAR_TARGETS`` (None where a row is missing), ``time_vs_compiled_chunked`` (ours
    over ``torch.compile`` of torch's chunked function), ``misses`` (what was not met, with the
    measured ratio; a missing measurement is a miss) and ``met``."""
    by_case: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("hidden") not in (None, ""):
            by_case.setdefault(case_key(row), []).append(row)
    verdicts = []
    for key, case_rows in by_case.items():
        fused = {row["preset"]: row for row in case_rows
                 if row["candidate"] == FUSED_LINEAR and row.get("fwd_bwd_ms") is not None}
        compiled = next((row for row in case_rows if row["candidate"] == f"torch.compile({TORCH_CHUNKED})"), None)
        ours = fused.get("cross_entropy")
        verdict: dict[str, Any] = {"case": key, "misses": []}
        for column in ("time_vs_torch_chunked", "peak_vs_torch_chunked"):
            verdict[column] = None if ours is None else ours.get(column)
        verdict["time_vs_compiled_chunked"] = ratio_to_baseline(
            None if ours is None else ours.get("fwd_bwd_ms"), None if compiled is None else compiled.get("fwd_bwd_ms"))
        verdict["presets"] = {name: ratio_to_baseline(row.get("fwd_bwd_ms"), None if ours is None
                                                      else ours.get("fwd_bwd_ms"))
                              for name, row in fused.items() if name != "cross_entropy"}
        checks = [(column, verdict[column], LINEAR_TARGETS[column])
                  for column in ("time_vs_torch_chunked", "peak_vs_torch_chunked")]
        checks += [(f"{name} time x our cross_entropy", value, LINEAR_TARGETS["preset_time_vs_cross_entropy"])
                   for name, value in verdict["presets"].items()]
        for name, value, bound in checks:
            if value is None:
                verdict["misses"].append(f"{name}: not measured")
            elif value > bound:
                verdict["misses"].append(f"{name} {value:.2f} > {bound:g}")
        verdict["met"] = not verdict["misses"]
        verdicts.append(verdict)
    return verdicts
