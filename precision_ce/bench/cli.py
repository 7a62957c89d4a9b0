"""``precision-ce bench``: options, the grid of cases, the run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cases import (
    DEFAULT_COMPILE_MAX_ELEMENTS,
    DEFAULT_COMPILE_PRESETS,
    DEFAULT_CPU_DTYPES,
    DEFAULT_CPU_SHAPES,
    DEFAULT_CUDA_CASES,
    DEFAULT_CUDA_DTYPES,
    DEFAULT_CUDA_SHAPES,
    DEFAULT_LINEAR_PRESETS,
    DEFAULT_LINEAR_SHAPES,
    DEFAULT_REPEATS,
    DTYPES,
    PRESET_NAMES,
    Case,
    build_candidates,
    parse_linear_shapes,
    parse_names,
    parse_shapes,
)
from .harness import bench_case
from .linear_cases import build_linear_candidates
from .report import (
    environment,
    format_measured,
    format_skipped,
    format_table,
    write_csv,
    write_figures,
)
from .stats import add_ratios
from .timing import Timing

if TYPE_CHECKING:
    import torch

    LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    parser.add_argument("--linear-shapes", default=None,
                        help="comma list of TOKENSxHIDDENxVOCAB fused-linear cases (hidden states and output "
                             f"layer in, loss out), or none (default cpu: {DEFAULT_LINEAR_SHAPES['cpu']}; "
                             f"cuda: {DEFAULT_LINEAR_SHAPES['cuda']})")
    parser.add_argument("--linear-presets", default=None,
                        help="presets of the fused-linear cases, or all (default cpu: "
                             f"{DEFAULT_LINEAR_PRESETS['cpu']}; cuda: {DEFAULT_LINEAR_PRESETS['cuda']})")
    parser.add_argument("--linear-max-logits-mb", type=float, default=None,
                        help="fused-linear cases: skip the candidates that materialise the (N, V) logits "
                             "(F.linear + a loss) when those take more than this many MiB (default: no limit)")
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
                             "(default: no limit)")
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
    """The grid of cases from --device, --shapes, --linear-shapes and --dtype ("none": no such cases)."""
    on_cuda = args.device == "cuda"
    dtypes = parse_names(args.dtype or (DEFAULT_CUDA_DTYPES if on_cuda else DEFAULT_CPU_DTYPES),
                         list(DTYPES), "dtype")
    if not dtypes:
        raise ValueError("--dtype names no dtype")
    linear_text = args.linear_shapes or DEFAULT_LINEAR_SHAPES[args.device]
    linear = [] if linear_text.strip() == "none" else parse_linear_shapes(linear_text)
    linear_cases = [Case(args.device, dtype, tokens, vocab, hidden)
                    for dtype in dtypes for tokens, hidden, vocab in linear]
    if on_cuda and args.shapes is None and args.dtype is None:
        return [Case("cuda", dtype, tokens, vocab) for dtype, tokens, vocab in DEFAULT_CUDA_CASES] + linear_cases
    if args.shapes is not None and args.shapes.strip() == "none":
        return linear_cases
    shapes = parse_shapes(args.shapes or (DEFAULT_CUDA_SHAPES if on_cuda else DEFAULT_CPU_SHAPES))
    return [Case(args.device, dtype, tokens, vocab) for dtype in dtypes for tokens, vocab in shapes] + linear_cases


def run(args: argparse.Namespace) -> int:
    """Run the benchmark grid; print the table; write CSV, markdown, figures and environment."""
    try:
        cases = build_cases(args)
        presets = parse_names(args.presets, PRESET_NAMES, "preset")
        linear_presets = parse_names(args.linear_presets or DEFAULT_LINEAR_PRESETS[args.device], PRESET_NAMES,
                                     "preset")
        if not cases:
            raise ValueError("no cases: --shapes none and --linear-shapes none")
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
        peak_bandwidth = peak_bandwidth(args, torch.cuda.get_device_properties(0).name)
    timing = Timing(args.device, args.min_time, args.warmup_ms, args.rep_ms)

    plans = [(case, build_linear_candidates(case, linear_presets, not args.no_compile, args.linear_max_logits_mb)
              if case.hidden
              else build_candidates(case, presets, compile_presets, not args.no_compile, args.compile_max_elements))
             for case in cases]
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
