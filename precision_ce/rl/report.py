"""Tables, CSVs and figures of an RL experiment: mean and spread over seeds."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path

from .experiment import ExperimentResult

STAGES: tuple[str, ...] = ("before", "after")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pass_at_k_summary(result: ExperimentResult) -> dict[tuple[str, str, int], tuple[float, float]]:
    """(preset, stage, k) -> (mean, std) of Pass@k over seeds."""
    summary = {}
    for name in result.presets:
        runs = [r for r in result.runs if r.preset == name]
        for stage in STAGES:
            for k in getattr(runs[0], stage).pass_at:
                summary[name, stage, k] = mean_std([getattr(r, stage).pass_at[k] for r in runs])
    return summary


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def format_tables(result: ExperimentResult) -> str:
    """Pass@k before and after RL (percent, mean ± std over seeds), then entropy, length and reward."""
    summary = pass_at_k_summary(result)
    ks = list(result.runs[0].after.pass_at)
    lines = []
    for stage in STAGES:
        lines.append(f"Pass@k (%) {stage} RL, test prompts, mean ± std over seeds {list(result.seeds)}")
        rows = [[name, *(f"{100 * summary[name, stage, k][0]:.1f} ± {100 * summary[name, stage, k][1]:.1f}"
                         for k in ks)] for name in result.presets]
        lines += [*_table(["preset", *(f"@{k}" for k in ks)], rows), ""]
    if "cross_entropy" in result.presets and len(result.presets) > 1:
        lines.append("After RL minus cross_entropy, paired by seed (same task, corpus, initialisation), percentage "
                     "points: mean ± std; wins = seeds where the preset is higher")
        rows = []
        for name in result.presets:
            if name == "cross_entropy":
                continue
            cells = [name]
            for k in (ks[0], ks[-1]):
                deltas = [100 * (result.run(name, seed).after.pass_at[k]
                                 - result.run("cross_entropy", seed).after.pass_at[k]) for seed in result.seeds]
                mean, std = mean_std(deltas)
                cells += [f"{mean:+.1f} ± {std:.1f}", f"{sum(d > 0 for d in deltas)}/{len(deltas)}"]
            rows.append(cells)
        lines += [*_table(["preset", f"d@{ks[0]}", "wins", f"d@{ks[-1]}", "wins"], rows), ""]
    header = ["preset", "entropy before", "entropy after", "length before", "length after",
              "RL reward first 10", "RL reward last 10"]
    rows = []
    for name in result.presets:
        runs = [r for r in result.runs if r.preset == name]

        def cell(values: Sequence[float], digits: int = 3) -> str:
            mean, std = mean_std(values)
            return f"{mean:.{digits}f} ± {std:.{digits}f}"

        rows.append([name, cell([r.before.entropy for r in runs]), cell([r.after.entropy for r in runs]),
                     cell([r.before.length for r in runs], 2), cell([r.after.length for r in runs], 2),
                     cell([statistics.fmean(r.curves.reward[:10]) for r in runs]),
                     cell([statistics.fmean(r.curves.reward[-10:]) for r in runs])])
    lines.append("Sampling entropy (nats/token) and answer length (nodes) on test prompts; RL reward on train prompts")
    lines += _table(header, rows)
    return "\n".join(lines)


def write_csvs(result: ExperimentResult, out_dir: Path, prefix: str = "rl") -> list[Path]:
    """{prefix}_pass_at_k.csv (per seed), {prefix}_summary.csv (mean, std over seeds), {prefix}_curves.csv,
    {prefix}_runs.csv."""
    paths = [out_dir / f"{prefix}_{name}.csv" for name in ("pass_at_k", "summary", "curves", "runs")]
    with paths[0].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["preset", "seed", "stage", "k", "pass_at_k"])
        for r in result.runs:
            for stage in STAGES:
                writer.writerows([r.preset, r.seed, stage, k, f"{value:.6f}"]
                                 for k, value in getattr(r, stage).pass_at.items())
    with paths[1].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["preset", "stage", "k", "mean", "std", "seeds"])
        seeds = " ".join(map(str, result.seeds))
        writer.writerows([name, stage, k, f"{mean:.6f}", f"{std:.6f}", seeds]
                         for (name, stage, k), (mean, std) in pass_at_k_summary(result).items())
    with paths[2].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["preset", "seed", "step", "reward", "entropy", "length"])
        for r in result.runs:
            writer.writerows([r.preset, r.seed, step + 1, f"{reward:.6f}", f"{entropy:.6f}", f"{length:.4f}"]
                             for step, (reward, entropy, length)
                             in enumerate(zip(r.curves.reward, r.curves.entropy, r.curves.length, strict=True)))
    with paths[3].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["preset", "seed", "beta", "k", "lambda_head", "lambda_tail", "corpus_ce",
                         "entropy_before", "entropy_after", "length_before", "length_after", "seconds"])
        writer.writerows([r.preset, r.seed, r.config.beta, r.config.k, r.config.lambda_head, r.config.lambda_tail,
                          f"{r.corpus_ce:.6f}", f"{r.before.entropy:.6f}", f"{r.after.entropy:.6f}",
                          f"{r.before.length:.4f}", f"{r.after.length:.4f}", f"{r.seconds:.2f}"] for r in result.runs)
    return paths


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` steps (RL curves are noisy step to step)."""
    return [statistics.fmean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def plot_figures(result: ExperimentResult, out_dir: Path, prefix: str = "rl") -> list[Path]:
    """{prefix}_pass_at_k.png (Pass@k against k, before and after RL) and {prefix}_curves.png (during RL)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    colors = {name: f"C{i}" for i, name in enumerate(result.presets)}
    seeds_text = f"mean ± std over seeds {', '.join(map(str, result.seeds))}"
    summary = pass_at_k_summary(result)
    ks = list(result.runs[0].after.pass_at)
    figure, axes_pair = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axes, stage in zip(axes_pair, STAGES, strict=True):
        for name in result.presets:
            mean = [100 * summary[name, stage, k][0] for k in ks]
            std = [100 * summary[name, stage, k][1] for k in ks]
            axes.plot(ks, mean, marker="o", markersize=3, color=colors[name], label=name)
            axes.fill_between(ks, [m - s for m, s in zip(mean, std, strict=True)],
                              [m + s for m, s in zip(mean, std, strict=True)], color=colors[name], alpha=0.12)
        axes.set_xscale("log", base=2)
        axes.set_xticks(ks, [str(k) for k in ks])
        axes.set_xlabel("k (samples)")
        axes.set_title(f"{stage} RL")
        axes.grid(alpha=0.3)
    axes_pair[0].set_ylabel("Pass@k on held-out prompts (%)")
    axes_pair[1].legend(fontsize=8, loc="lower right")
    figure.suptitle(f"Pass@k per pre-training preset ({seeds_text})")
    figure.tight_layout()
    pass_path = out_dir / f"{prefix}_pass_at_k.png"
    figure.savefig(pass_path, dpi=110)
    plt.close(figure)

    window = max(1, len(result.runs[0].curves.reward) // 20)
    figure, axes_row = plt.subplots(1, 3, figsize=(15, 4.2))
    for axes, field, label in zip(axes_row, ("reward", "entropy", "length"),
                                  ("reward (fraction correct)", "policy entropy (nats/token)", "answer length (nodes)"),
                                  strict=True):
        for name in result.presets:
            curves = [_moving_average(getattr(r.curves, field), window) for r in result.runs if r.preset == name]
            per_step = [mean_std(values) for values in zip(*curves, strict=True)]
            steps = range(1, len(per_step) + 1)
            mean = [m for m, _ in per_step]
            axes.plot(steps, mean, color=colors[name], label=name)
            axes.fill_between(steps, [m - s for m, s in per_step], [m + s for m, s in per_step],
                              color=colors[name], alpha=0.12)
        axes.set_xlabel("RL step")
        axes.set_title(label)
        axes.grid(alpha=0.3)
    axes_row[0].legend(fontsize=8)
    figure.suptitle(f"During GRPO, on training prompts ({seeds_text}; trailing mean over {window} steps)")
    figure.tight_layout()
    curves_path = out_dir / f"{prefix}_curves.png"
    figure.savefig(curves_path, dpi=110)
    plt.close(figure)
    return [pass_path, curves_path]
