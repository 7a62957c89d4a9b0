"""``precision-ce demo``: the loss's knobs reshape a language model's next-token distribution.

Two corpora, one comparison: one small language model per preset of ``precision_ce.PRESETS``,
trained from the same initialisation on the same batches; only the loss differs.

* ``--corpus markov`` (default, ``markov``): a synthetic Markov language whose true next-token
  distribution is known, so every metric is exact;
* ``--corpus stdlib`` (``stdlib``): real text, the Python standard library's source files of the
  running interpreter, a BPE vocabulary trained on the fly, held-out files for evaluation.

Both write ``demo_metrics.csv`` (one row per preset), ``demo_entropy_curve.csv`` and two figures
(``report``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from ..config import PRESETS
from ..training import DEFAULT_PRESETS, parse_presets
from .markov import (
    METRIC_COLUMNS,
    DemoResult,
    DemoSettings,
    MarkovChain,
    make_markov_chain,
    next_token_pairs,
    sample_corpus,
    train_presets,
)
from .report import PresetResult, Report, format_table, write_outputs

CORPORA: tuple[str, ...] = ("markov", "stdlib")

__all__ = ["CORPORA", "METRIC_COLUMNS", "DemoResult", "DemoSettings", "MarkovChain", "PresetResult", "Report",
           "add_arguments", "format_table", "make_markov_chain", "next_token_pairs", "run", "sample_corpus",
           "train_presets"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``precision-ce demo``."""
    from .stdlib import StdlibSettings

    parser.add_argument("--corpus", choices=CORPORA, default="markov",
                        help="markov: the synthetic language with exact metrics (default); stdlib: the Python "
                             "standard library's source as real text (needs the tokenizers package)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per preset (default {DemoSettings().steps} for markov, "
                             f"{StdlibSettings().steps} for stdlib)")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                        help=f"comma-separated presets (default: all; choose from {','.join(PRESETS)})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the language or file split, the weights and the batches (default 0)")
    parser.add_argument("--device", default=None,
                        help="torch device to train on (default: cuda if available, else cpu)")
    parser.add_argument("--out", type=Path, default=Path("demo-out"),
                        help="directory for the CSVs and figures (default: demo-out)")


def run(args: argparse.Namespace) -> int:
    """Train every preset, print the table, write CSVs and figures to ``args.out``."""
    presets = parse_presets(args.presets)
    if not presets:
        print(f"precision-ce demo: unknown or empty --presets {args.presets!r}; "
              f"choose from {','.join(PRESETS)}", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print("precision-ce demo: --steps must be >= 1", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    started, started_cpu = time.perf_counter(), time.process_time()
    if args.corpus == "stdlib":
        from . import stdlib

        settings = stdlib.StdlibSettings(seed=args.seed)
        if args.steps is not None:
            settings = dataclasses.replace(settings, steps=args.steps,
                                           eval_interval=max(1, min(settings.eval_interval, args.steps // 10)))
        report = stdlib.train_presets(presets, settings, device=device, progress=True).report()
    else:
        defaults = DemoSettings()
        steps = defaults.steps if args.steps is None else args.steps
        settings = dataclasses.replace(defaults, steps=steps, seed=args.seed,
                                       eval_interval=max(1, min(defaults.eval_interval, steps // 20)))
        report = train_presets(presets, settings, device=device, progress=True).report()
    print(format_table(report))
    written = write_outputs(report, args.out)
    print("\nwrote " + ", ".join(map(str, written)))
    print(f"total time {time.perf_counter() - started:.1f} s wall, {time.process_time() - started_cpu:.1f} s CPU "
          f"(this process) on {device}")
    return 0
