"""``precision-ce rl``: options, the run, and what it writes."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from ..config import PRESETS
from ..training import DEFAULT_PRESETS, parse_presets
from .experiment import DEFAULT_SEEDS, QUICK, TRAINERS, RLSettings, run_experiment
from .report import format_tables, plot_figures, write_csvs
from .study import STUDY_CONFIGS, STUDY_SEEDS, run_study, study_settings
from .study_report import format_study_tables


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``precision-ce rl``; unset sizes come from the defaults or from ``--quick``."""
    defaults = RLSettings()
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                        help=f"comma-separated presets (default: all; choose from {','.join(PRESETS)})")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds: task, corpus, weights, batches and samples (default 0,1,2; "
                             f"with --study {','.join(map(str, STUDY_SEEDS))})")
    parser.add_argument("--quick", action="store_true", help="a tiny run of seconds (smoke test)")
    parser.add_argument("--study", action="store_true",
                        help="the full study (docs/rl.md): a harder task, the presets and a knob sweep on 10 "
                             "report seeds, paired tests against cross-entropy; writes rl_study_* files")
    parser.add_argument("--jobs", type=int, default=1, help="--study: seeds run in this many processes (default 1)")
    parser.add_argument("--pretrain-steps", type=int, help=f"pre-training steps (default {defaults.pretrain.steps})")
    parser.add_argument("--rl-steps", type=int, help=f"GRPO steps (default {defaults.grpo.steps})")
    parser.add_argument("--group-size", type=int,
                        help=f"GRPO samples per prompt (default {defaults.grpo.group_size})")
    parser.add_argument("--prompts-per-step", type=int,
                        help=f"GRPO prompts per step (default {defaults.grpo.prompts_per_step})")
    parser.add_argument("--model-dim", type=int, help=f"transformer width (default {defaults.model_dim})")
    parser.add_argument("--layers", type=int, help=f"transformer blocks (default {defaults.layers})")
    parser.add_argument("--eval-samples", type=int,
                        help=f"samples per test prompt; Pass@k up to this k (default {defaults.eval_samples})")
    parser.add_argument("--trainer", choices=TRAINERS, default=defaults.trainer,
                        help="builtin: the compact GRPO loop (default); trl: TRL's GRPOTrainer on a transformers "
                             'Llama (pip install -e ".[rl-trl]")')
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", type=Path, default=Path("rl-out"), help="directory for CSVs and figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace) -> RLSettings:
    """The defaults (or ``QUICK``) with the sizes given on the command line."""
    base = QUICK if args.quick else RLSettings()
    pretrain = base.pretrain if args.pretrain_steps is None else dataclasses.replace(
        base.pretrain, steps=args.pretrain_steps)
    grpo_changes = {field: value for field, value in (("steps", args.rl_steps), ("group_size", args.group_size),
                                                      ("prompts_per_step", args.prompts_per_step))
                    if value is not None}
    model_changes = {field: value for field, value in (("model_dim", args.model_dim), ("layers", args.layers),
                                                       ("eval_samples", args.eval_samples)) if value is not None}
    model_changes["trainer"] = args.trainer
    return dataclasses.replace(base, pretrain=pretrain, grpo=dataclasses.replace(base.grpo, **grpo_changes),
                               **model_changes)


def _errors(args: argparse.Namespace, settings: RLSettings, presets: list[str], seeds: list[int] | None) -> list[str]:
    errors = []
    if not presets:
        errors.append(f"unknown or empty --presets {args.presets!r}; choose from {','.join(PRESETS)}")
    if not seeds:
        errors.append(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    positive = {"--pretrain-steps": settings.pretrain.steps, "--rl-steps": settings.grpo.steps,
                "--prompts-per-step": settings.grpo.prompts_per_step, "--model-dim": settings.model_dim,
                "--layers": settings.layers, "--eval-samples": settings.eval_samples}
    errors += [f"{flag} must be >= 1, got {value}" for flag, value in positive.items() if value < 1]
    if settings.grpo.group_size < 2:
        errors.append(f"--group-size must be >= 2 (advantages compare answers within a group), "
                      f"got {settings.grpo.group_size}")
    if settings.model_dim % settings.heads:
        errors.append(f"--model-dim must be a multiple of {settings.heads} (attention heads), got {settings.model_dim}")
    return errors


def run(args: argparse.Namespace) -> int:
    """Run the experiment, print the tables, write CSVs and figures to ``args.out``."""
    if args.study:
        return run_study_command(args)
    settings = settings_from_args(args)
    presets = parse_presets(args.presets)
    seeds = parse_seeds(args.seeds, DEFAULT_SEEDS)
    errors = _errors(args, settings, presets, seeds)
    if errors:
        return _fail(errors)
    device = _device(args)

    started = time.perf_counter()
    result = run_experiment(presets, seeds, settings, device=device, progress=not args.no_progress)
    print(format_tables(result))
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [*write_csvs(result, out_dir), *plot_figures(result, out_dir)]
    composition = ", ".join(f"{kind} {share:.0%}" for kind, share in result.corpus_composition.items())
    print(f"\npre-training corpus (seed {seeds[0]}): {composition}")
    print("wrote " + ", ".join(map(str, written)))
    print(f"total time {time.perf_counter() - started:.1f} s on {device}")
    return 0


def _fail(errors: list[str]) -> int:
    """Print each argument error; the exit status of a bad command line."""
    for error in errors:
        print(f"precision-ce rl: {error}", file=sys.stderr)
    return 2


def _device(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def parse_seeds(text: str | None, default: tuple[int, ...]) -> list[int] | None:
    """Comma-separated integers, duplicates dropped (``default`` when not given); None when malformed."""
    if text is None:
        return list(default)
    try:
        return list(dict.fromkeys(int(seed) for seed in text.split(",") if seed.strip())) or None
    except ValueError:
        return None


def run_study_command(args: argparse.Namespace) -> int:
    """``precision-ce rl --study``: every study configuration on the report seeds, then the paired tables."""
    settings = study_settings(args.pretrain_steps, args.rl_steps)
    seeds = parse_seeds(args.seeds, STUDY_SEEDS)
    errors = _errors(args, settings, list(STUDY_CONFIGS), seeds)
    if args.jobs < 1:
        errors.append(f"--jobs must be >= 1, got {args.jobs}")
    if seeds is not None and len(seeds) < 2:
        errors.append("--study needs at least 2 seeds (paired intervals over seeds)")
    if errors:
        return _fail(errors)
    device = _device(args)
    started = time.perf_counter()
    result = run_study(seeds, settings, jobs=args.jobs, device=device, out_dir=args.out)
    print(format_study_tables(result))
    print(f"\nwrote rl_study_* CSVs and figures to {args.out}")
    print(f"total time {time.perf_counter() - started:.1f} s on {device} with {args.jobs} job(s)")
    return 0
