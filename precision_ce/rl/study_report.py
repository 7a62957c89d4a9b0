"""The study's analysis: paired differences to cross-entropy with bootstrap intervals and a sign test,
its tables and CSVs, and the knob sweep plotted against the prior's entropy.

The analysis plan (docs/rl.md, written before the report seeds were run): for every configuration
and k in ``STUDY_KS``, before and after RL, the per-seed difference of Pass@k to cross-entropy on
the same seed (same task, corpus, initialisation and sampling streams); its mean over seeds with a
95 % percentile-bootstrap interval (``BOOTSTRAP_RESAMPLES`` resamples of the seeds, fixed
generator) and a two-sided exact sign test over the seeds (ties dropped). An effect is claimed
only where the interval excludes zero.
"""

from __future__ import annotations

import csv
import math
import random
import statistics
from collections.abc import Sequence
from pathlib import Path

from .experiment import ExperimentResult
from .report import STAGES, _table, mean_std, plot_figures, write_csvs

STUDY_KS: tuple[int, ...] = (1, 8, 64)
BOOTSTRAP_RESAMPLES = 10_000
BASELINE = "cross_entropy"
PREFIX = "rl_study"


def bootstrap_interval(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    if not values:
        raise ValueError("need at least one value")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1.0 - level) / 2
    return means[math.floor(tail * (resamples - 1))], means[math.ceil((1.0 - tail) * (resamples - 1))]


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven | no effect); ties are left out."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_seeds(result: ExperimentResult, name: str) -> list[int]:
    """The seeds on which both ``name`` and cross-entropy finished."""
    finished = {(r.preset, r.seed) for r in result.runs}
    return [seed for seed in result.seeds if (name, seed) in finished and (BASELINE, seed) in finished]


def paired_differences(result: ExperimentResult, name: str, stage: str, k: int) -> list[float]:
    """Per paired seed: Pass@k of ``name`` minus Pass@k of cross-entropy, in percentage points."""
    return [100 * (getattr(result.run(name, seed), stage).pass_at[k]
                   - getattr(result.run(BASELINE, seed), stage).pass_at[k]) for seed in paired_seeds(result, name)]


def paired_tests(result: ExperimentResult) -> list[dict[str, object]]:
    """One row per (configuration, stage, k): mean difference, 95 % interval, wins, losses, sign-test p."""
    rows = []
    for name in result.presets:
        if name == BASELINE:
            continue
        for stage in STAGES:
            for k in STUDY_KS:
                deltas = paired_differences(result, name, stage, k)
                if not deltas:
                    continue
                low, high = bootstrap_interval(deltas)
                wins, losses = sum(d > 0 for d in deltas), sum(d < 0 for d in deltas)
                rows.append({"preset": name, "stage": stage, "k": k, "seeds": len(deltas),
                             "mean_diff": statistics.fmean(deltas), "ci_low": low, "ci_high": high,
                             "wins": wins, "losses": losses, "sign_p": sign_test(wins, losses)})
    return rows


def format_study_tables(result: ExperimentResult) -> str:
    """Pass@1/8/64 before and after RL (mean ± std), then the paired differences to cross-entropy."""
    seeds = ", ".join(map(str, result.seeds))
    lines = [f"Pass@k (%) on held-out test prompts, mean ± std over seeds {seeds}"]
    rows = []
    for name in result.presets:
        runs = [r for r in result.runs if r.preset == name]
        if not runs:
            continue
        cells = [name, str(len(runs)), f"{statistics.fmean(r.before.entropy for r in runs):.3f}"]
        for stage in STAGES:
            for k in STUDY_KS:
                mean, std = mean_std([100 * getattr(r, stage).pass_at[k] for r in runs])
                cells.append(f"{mean:.1f} ± {std:.1f}")
        rows.append(cells)
    header = ["config", "seeds", "prior entropy", *(f"{stage} @{k}" for stage in STAGES for k in STUDY_KS)]
    lines += [*_table(header, rows), ""]
    lines.append(f"Minus {BASELINE}, paired by seed (percentage points): mean [95 % bootstrap CI] "
                 "wins-losses (sign-test p); * = CI excludes 0")
    rows = []
    tests = {(t["preset"], t["stage"], t["k"]): t for t in paired_tests(result)} if len(result.presets) > 1 else {}
    for name in result.presets:
        if (name, STAGES[0], STUDY_KS[0]) not in tests:
            continue
        cells = [name, str(tests[name, STAGES[0], STUDY_KS[0]]["seeds"])]
        for stage in STAGES:
            for k in STUDY_KS:
                t = tests[name, stage, k]
                star = "*" if t["ci_low"] > 0 or t["ci_high"] < 0 else ""
                cells.append(f"{t['mean_diff']:+.1f} [{t['ci_low']:+.1f}, {t['ci_high']:+.1f}]{star} "
                             f"{t['wins']}-{t['losses']} ({t['sign_p']:.2g})")
        rows.append(cells)
    header = ["config", "seeds", *(f"{stage} @{k}" for stage in STAGES for k in STUDY_KS)]
    lines += _table(header, rows)
    return "\n".join(lines)


def write_paired_csvs(result: ExperimentResult, out_dir: Path) -> list[Path]:
    """{PREFIX}_paired.csv (per seed differences) and {PREFIX}_tests.csv (intervals and sign tests)."""
    paired, tests = out_dir / f"{PREFIX}_paired.csv", out_dir / f"{PREFIX}_tests.csv"
    with paired.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["preset", "seed", "stage", "k", "pass_at_k", "cross_entropy_pass_at_k", "diff_points"])
        for name in result.presets:
            for stage in STAGES:
                for k in STUDY_KS:
                    for seed in paired_seeds(result, name):
                        mine = getattr(result.run(name, seed), stage).pass_at[k]
                        base = getattr(result.run(BASELINE, seed), stage).pass_at[k]
                        writer.writerow([name, seed, stage, k, f"{mine:.6f}", f"{base:.6f}",
                                         f"{100 * (mine - base):.4f}"])
    with tests.open("w", newline="") as handle:
        writer = csv.writer(handle)
        columns = ["preset", "stage", "k", "seeds", "mean_diff", "ci_low", "ci_high", "wins", "losses", "sign_p"]
        writer.writerow([*columns, "seed_list"])
        for row in paired_tests(result):
            writer.writerow([f"{row[c]:.4f}" if isinstance(row[c], float) else row[c] for c in columns]
                            + [" ".join(map(str, paired_seeds(result, str(row["preset"]))))])
    return [paired, tests]


def plot_sweep(result: ExperimentResult, out_dir: Path) -> Path:
    """{PREFIX}_sweep.png: Pass@k after RL against the prior's sampling entropy, one point per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes_row = plt.subplots(1, len(STUDY_KS), figsize=(5 * len(STUDY_KS), 4.4))
    for axes, k in zip(axes_row, STUDY_KS, strict=True):
        for name in result.presets:
            runs = [r for r in result.runs if r.preset == name]
            if not runs:
                continue
            entropy, entropy_std = mean_std([r.before.entropy for r in runs])
            passed, passed_std = mean_std([100 * r.after.pass_at[k] for r in runs])
            marker = "s" if "lambda_tail" in name or name == "tail_penalty" else "^" if name == "head_reward" else "o"
            axes.errorbar(entropy, passed, xerr=entropy_std / math.sqrt(len(runs)),
                          yerr=passed_std / math.sqrt(len(runs)), marker=marker, capsize=2, linestyle="none")
            axes.annotate(name, (entropy, passed), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axes.set_xlabel("prior's sampling entropy before RL (nats/token)")
        axes.set_ylabel(f"Pass@{k} after RL (%)")
        axes.grid(alpha=0.3)
    figure.suptitle(f"Knob sweep: mean ± s.e. over seeds {', '.join(map(str, result.seeds))} "
                    "(o: beta, s: lambda_tail, ^: head reward)")
    figure.tight_layout()
    path = out_dir / f"{PREFIX}_sweep.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_study_outputs(result: ExperimentResult, out_dir: Path) -> list[Path]:
    """Every CSV (per seed, with a seed column) and every figure, prefixed {PREFIX}_."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [*write_csvs(result, out_dir, PREFIX), *write_paired_csvs(result, out_dir),
            *plot_figures(result, out_dir, PREFIX), plot_sweep(result, out_dir)]
