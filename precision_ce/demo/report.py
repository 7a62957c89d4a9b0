"""The demo's outputs, for either corpus: the table, ``demo_metrics.csv``, the entropy curves and figures."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from ..config import RewardConfig


@dataclasses.dataclass
class PresetResult:
    """What one preset's training produced."""

    name: str
    config: RewardConfig
    metrics: dict[str, float]
    entropy_curve: list[tuple[int, float]]  # (step, mean predictive entropy) during training
    seconds: float


@dataclasses.dataclass(frozen=True)
class Report:
    """What the table, the CSVs and the figures show of one run.

    columns: the metrics, in table and CSV order; labels: their axis titles; shown: the metrics of
    the bar figure; reference: an optional extra row (name, metrics), e.g. the true Markov chain;
    notes: printed under the table; figure_notes: written into the bar figure's spare panel.
    """

    presets: dict[str, PresetResult]
    columns: tuple[str, ...]
    labels: dict[str, str]
    shown: tuple[str, ...]
    reference: tuple[str, dict[str, float]] | None
    notes: str
    figure_notes: str


def format_table(report: Report) -> str:
    """A plain-text table: one row per preset, then the reference row if there is one."""
    header = ["preset", "beta", "lam_head", "lam_tail", *report.columns]
    rows = [[name, f"{r.config.beta:g}", f"{r.config.lambda_head:g}", f"{r.config.lambda_tail:g}",
             *(f"{r.metrics[key]:.4f}" for key in report.columns)] for name, r in report.presets.items()]
    if report.reference is not None:
        name, metrics = report.reference
        rows.append([f"({name.replace('_', ' ')})", "", "", "", *(f"{metrics[key]:.4f}" for key in report.columns)])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows), "", report.notes])


def write_csv(report: Report, path: Path) -> None:
    """One row per preset (and the reference): the reward settings and every metric."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["preset", "beta", "k", "lambda_head", "lambda_tail", *report.columns])
        for name, r in report.presets.items():
            writer.writerow([name, r.config.beta, r.config.k, r.config.lambda_head, r.config.lambda_tail,
                             *(f"{r.metrics[key]:.6f}" for key in report.columns)])
        if report.reference is not None:
            name, metrics = report.reference
            writer.writerow([name, "", "", "", "", *(f"{metrics[key]:.6f}" for key in report.columns)])


def write_entropy_curve_csv(report: Report, path: Path) -> None:
    """The entropy-over-training curves, long format: preset, step, entropy."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["preset", "step", "entropy"])
        for name, r in report.presets.items():
            writer.writerows([name, step, f"{entropy:.6f}"] for step, entropy in r.entropy_curve)


def plot_figures(report: Report, out_dir: Path) -> list[Path]:
    """Write demo_entropy.png (entropy over training) and demo_metrics.png (final metrics)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: files only, no display needed
    import matplotlib.pyplot as plt

    names = list(report.presets)
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    reference_name, reference = report.reference or ("", {})
    reference_label = reference_name.replace("_", " ")

    figure, (full_axes, zoom_axes) = plt.subplots(1, 2, figsize=(13, 4.5))
    for axes in (full_axes, zoom_axes):
        for name, r in report.presets.items():
            steps, entropies = zip(*r.entropy_curve, strict=True)
            axes.plot(steps, entropies, label=name, color=colors[name])
        if "entropy" in reference:
            axes.axhline(reference["entropy"], color="black", linestyle="--", linewidth=1, label=reference_label)
        axes.set_xlabel("training step")
        axes.set_ylabel("mean predictive entropy (nats)")
        axes.grid(alpha=0.3)
    full_axes.set_title("Entropy during training (all steps)")
    # The right panel zooms on the second half of training, where the presets separate.
    last_step = max(r.entropy_curve[-1][0] for r in report.presets.values())
    late = [entropy for r in report.presets.values() for step, entropy in r.entropy_curve if step >= last_step / 2]
    late += [reference["entropy"]] if "entropy" in reference else []
    low, high = min(late), max(late)
    margin = max(0.02, 0.15 * (high - low))
    zoom_axes.set_xlim(last_step / 2, last_step)
    zoom_axes.set_ylim(low - margin, high + margin)
    zoom_axes.set_title("Second half of training (zoomed)")
    zoom_axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: no overlap
    figure.tight_layout()
    entropy_path = out_dir / "demo_entropy.png"
    figure.savefig(entropy_path, dpi=110)
    plt.close(figure)

    figure, axes_grid = plt.subplots(2, 4, figsize=(15, 7))
    for axes, key in zip(axes_grid.flat, report.shown, strict=False):
        values = [report.presets[name].metrics[key] for name in names]
        bars = axes.bar(range(len(names)), values, color=[colors[name] for name in names])
        if key in reference:
            axes.axhline(reference[key], color="black", linestyle="--", linewidth=1)
        axes.bar_label(bars, fmt="%.3f", fontsize=7)
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axes.set_title(report.labels[key], fontsize=10)
        shown_values = [*values, *([reference[key]] if key in reference else [])]
        top, bottom = max(shown_values), min(shown_values)
        spread = top - bottom
        # Bars start from a common floor near the data so small differences stay visible.
        axes.set_ylim(max(0.0, bottom - 0.5 * spread - 1e-3), top + 0.25 * spread + 1e-3)
    for axes in list(axes_grid.flat)[len(report.shown):]:
        axes.axis("off")
    axes_grid.flat[len(report.shown)].text(0.0, 0.5, report.figure_notes, fontsize=10, va="center")
    figure.suptitle("Final metrics per preset")
    figure.tight_layout()
    metrics_path = out_dir / "demo_metrics.png"
    figure.savefig(metrics_path, dpi=110)
    plt.close(figure)
    return [entropy_path, metrics_path]


def write_outputs(report: Report, out_dir: Path) -> list[Path]:
    """demo_metrics.csv, demo_entropy_curve.csv and the two figures in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_csv, curve_csv = out_dir / "demo_metrics.csv", out_dir / "demo_entropy_curve.csv"
    write_csv(report, metrics_csv)
    write_entropy_curve_csv(report, curve_csv)
    return [metrics_csv, curve_csv, *plot_figures(report, out_dir)]
