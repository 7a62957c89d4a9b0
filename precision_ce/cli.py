"""The ``precision-ce`` command line: ``precision-ce demo``, ``precision-ce bench`` and ``precision-ce rl``."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
# modules are imported only when their subcommand runs, so ``--help`` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("precision_ce.demo", "train a small language model once per preset and compare"),
    "bench": ("precision_ce.bench", "time and measure memory of the loss against F.cross_entropy and peers"),
    "rl": ("precision_ce.rl.cli", "pre-train with each preset, then reinforcement-learn (GRPO), and measure Pass@k"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="precision-ce",
        description="The generalised next-token objective of 'Diversity or Precision?' (arXiv 2512.22955).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module_name=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args.module_name).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
