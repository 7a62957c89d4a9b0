"""``precision-ce bench``: time and memory of the loss against ``F.cross_entropy`` and peers.

For every case (device, dtype, tokens N, vocabulary V) the harness builds random logits
(N, V) with ``requires_grad=True`` and int64 targets (N,), and measures each candidate:

* ``F.cross_entropy`` (the baseline every ratio is taken against, same case);
* ``torch.compile(F.cross_entropy)`` where compilation works;
* ``precision_ce.cross_entropy(x, t, config=PRESETS[name], backend="torch")`` for each preset;
* the same with ``backend="triton"`` (CUDA only; the Triton interpreter on CPU is far too slow);
* ``torch.compile`` of the torch backend (a custom op: Dynamo does not unroll its row-chunk loop);
* Liger-Kernel's ``LigerCrossEntropyLoss`` when installed (CUDA only).

Fused-linear cases (``--linear-shapes``, tokens N x hidden D x vocabulary V) give hidden states
(N, D) and an output layer (V, D) instead, and compare ``F.linear`` + ``F.cross_entropy`` (their
baseline), its ``torch.compile``, ``F.linear`` + ``precision_ce``, ``precision_ce.linear_cross_entropy``
and, on CUDA when installed, Liger's and cut-cross-entropy's fused losses (``linear_cases``).

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

Modules, by concern: ``cases`` (the grid, inputs and the logits candidates), ``linear_cases``,
``timing``, ``memory``, ``harness`` (one case: warm-up, interleaved repeats, rows), ``stats``
(summaries and ratios), ``report`` (CSV, tables, figures, environment) and ``cli``.
"""

from .cases import (
    BASELINE_CANDIDATE,
    DEFAULT_COMPILE_MAX_ELEMENTS,
    LINEAR_BASELINE,
    Candidate,
    Case,
    build_candidates,
    candidate_label,
    make_inputs,
    parse_linear_shapes,
    parse_names,
    parse_shapes,
)
from .cli import add_arguments, build_cases, run
from .harness import bench_case
from .memory import cpu_peak_from_events
from .report import CSV_COLUMNS, format_linear_targets, format_table, read_csv, write_csv, write_figures
from .stats import (
    LINEAR_TARGETS,
    Summary,
    add_ratios,
    assumed_hbm_bytes,
    linear_targets,
    peak_hbm_bandwidth,
    ratio_to_baseline,
    summarize,
)
from .timing import SamplePlan, Timing

__all__ = [
    "BASELINE_CANDIDATE", "CSV_COLUMNS", "DEFAULT_COMPILE_MAX_ELEMENTS", "LINEAR_BASELINE", "LINEAR_TARGETS",
    "Candidate", "Case",
    "SamplePlan", "Summary", "Timing", "add_arguments", "add_ratios", "assumed_hbm_bytes", "bench_case",
    "build_candidates", "build_cases", "candidate_label", "cpu_peak_from_events", "format_linear_targets",
    "format_table", "linear_targets", "make_inputs",
    "parse_linear_shapes", "parse_names", "parse_shapes", "peak_hbm_bandwidth", "ratio_to_baseline", "read_csv", "run",
    "summarize", "write_csv", "write_figures",
]
