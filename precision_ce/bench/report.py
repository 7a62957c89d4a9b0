"""Output: CSV, markdown tables, figures and the environment of a run."""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cases import candidate_label
from .stats import LINEAR_TARGETS, case_key, linear_targets, peak_hbm_bandwidth

if TYPE_CHECKING:
    import torch

    LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CSV_COLUMNS: tuple[str, ...] = (
    "device", "dtype", "tokens", "hidden", "vocab", "candidate", "backend", "preset",
    "fwd_ms", "bwd_ms", "fwd_bwd_ms",
    "fwd_iqr_ms", "bwd_iqr_ms", "fwd_bwd_iqr_ms", "fwd_bwd_min_ms", "fwd_bwd_max_ms",
    "spread", "repeats",
    "ratio_vs_torch_ce", "fwd_ratio_vs_torch_ce", "bwd_ratio_vs_torch_ce",
    "peak_extra_mb", "peak_extra_x_logits", "peak_ratio_vs_torch_ce",
    "time_vs_unfused", "peak_vs_unfused", "time_vs_torch_chunked", "peak_vs_torch_chunked",
    "hbm_tbs", "hbm_fraction_of_peak", "compile_s", "note",
)
"""Columns of ``results.csv``. Times are medians over repeats in ms; ``spread`` is the relative
IQR of fwd+bwd, (q3 - q1) / median; ``ratio_vs_torch_ce`` is fwd+bwd time over that of
``F.cross_entropy`` (fused-linear cases, ``hidden`` set: ``F.linear`` + ``F.cross_entropy``) in the
same case; ``*_vs_unfused`` for ``linear_cross_entropy`` against ``F.linear`` + ``precision_ce`` of
the same preset; ``*_vs_torch_chunked`` for fused-linear rows against torch's chunked
``F.linear_cross_entropy``; ``hbm_*`` only on logits cases on CUDA (assumed traffic, see
``assumed_hbm_bytes``)."""



# --------------------------------------------------------------------------------------------
# Output


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``results.csv`` with ``CSV_COLUMNS``; floats with 6 significant digits, None as empty."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _fmt(row.get(key), 6) for key in CSV_COLUMNS})



TEXT_COLUMNS = frozenset({"device", "dtype", "candidate", "backend", "preset", "note"})
INTEGER_COLUMNS = frozenset({"tokens", "hidden", "vocab", "repeats"})


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``results.csv`` as ``write_csv`` wrote them: numbers back to int / float, empty
    cells to None; for re-rendering a run's tables (``format_table``) or putting runs together."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if value == "":
                row[key] = None
            elif key not in TEXT_COLUMNS:
                row[key] = int(value) if key in INTEGER_COLUMNS else float(value)
    return rows

TABLE_LEGEND = (
    "Times: medians over interleaved repeats (ms); bwd = fwd+bwd minus fwd of the same repeat. "
    "IQR: interquartile range of fwd+bwd over its median. x F.ce: fwd+bwd time over F.cross_entropy's "
    "in the same case. Peak extra: most memory allocated during one fwd+bwd above the live inputs, "
    "gradient included (MiB = 2**20 bytes), and as a multiple of the logits' size."
)
CUDA_LEGEND = (
    " TB/s: assumed traffic 2 x N x V x element size (logits read once, gradient written once) over "
    "the fwd+bwd time, a lower bound on the bandwidth achieved; of peak: over the datasheet peak."
)


def _by_case(rows: Iterable[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    cases: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        cases.setdefault(case_key(row), []).append(row)
    return cases


def _is_skipped(row: dict[str, Any]) -> bool:
    return row.get("fwd_bwd_ms") is None and str(row.get("note") or "").startswith("skipped")


def format_measured(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown tables, one per case, of every candidate that was not skipped."""
    lines: list[str] = []
    on_cuda = any(row["device"] == "cuda" for row in rows)
    for (device, dtype, tokens, vocab, hidden), case_rows in _by_case(rows).items():
        linear = hidden is not None
        header = (["candidate", "fwd ms", "bwd ms", "fwd+bwd ms", "IQR", "x F.ce", "peak extra MiB", "x logits"]
                  + (["time x unfused", "peak x unfused", "time x torch chunked", "peak x torch chunked"]
                     if linear else [])
                  + (["TB/s", "of peak"] if on_cuda and not linear else []) + ["note"])
        title = (f"{tokens} x {hidden} hidden states, {vocab} x {hidden} output layer "
                 f"(F.linear + F.cross_entropy is the x F.ce baseline)" if linear else f"{tokens} x {vocab} logits")
        lines += ["", f"{device} {dtype}, {title}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if i in (0, len(header) - 1) else "---:"
                                    for i in range(len(header))) + "|")
        for row in case_rows:
            if _is_skipped(row):
                continue
            cells = [
                candidate_label(row), _fmt(row.get("fwd_ms")), _fmt(row.get("bwd_ms")),
                _fmt(row.get("fwd_bwd_ms")),
                "" if row.get("spread") is None else f"{100 * row['spread']:.0f}%",
                _fmt(row.get("ratio_vs_torch_ce")), _fmt(row.get("peak_extra_mb")),
                _fmt(row.get("peak_extra_x_logits")),
            ]
            if linear:
                cells += [_fmt(row.get(column)) for column in ("time_vs_unfused", "peak_vs_unfused",
                                                               "time_vs_torch_chunked", "peak_vs_torch_chunked")]
            elif on_cuda:
                fraction = row.get("hbm_fraction_of_peak")
                cells += [_fmt(row.get("hbm_tbs")), "" if fraction is None else f"{100 * fraction:.0f}%"]
            cells.append(str(row.get("note") or "").replace("|", "/"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def format_skipped(rows: Sequence[dict[str, Any]]) -> str:
    """The skipped candidates, grouped by reason, with the presets and shapes they cover."""
    skipped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if _is_skipped(row):
            name = candidate_label(row).split(" ")[0]
            skipped.setdefault((name, str(row["note"])), []).append(row)
    if not skipped:
        return ""
    lines = ["Skipped:"]
    for (name, note), group in skipped.items():
        presets = sorted({str(r["preset"]) for r in group})
        shapes = sorted({_shape(r) for r in group})
        where = ", ".join(shapes)
        lines.append(f"- {name} ({', '.join(presets)}; {where}): {note.removeprefix('skipped: ')}")
    return "\n".join(lines) + "\n"


def _shape(row: dict[str, Any]) -> str:
    """TOKENSxVOCAB, or TOKENSxHIDDENxVOCAB for a fused-linear case."""
    hidden = row.get("hidden")
    return f"{row['tokens']}x{hidden}x{row['vocab']}" if hidden not in (None, "") else f"{row['tokens']}x{row['vocab']}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Legend, the per-case tables of ``format_measured`` and the list of ``format_skipped``."""
    legend = TABLE_LEGEND + (CUDA_LEGEND if any(row["device"] == "cuda" for row in rows) else "")
    return "\n".join(filter(None, [legend + "\n", format_measured(rows), format_linear_targets(rows),
                                    format_skipped(rows)]))


def format_linear_targets(rows: Sequence[dict[str, Any]]) -> str:
    """Issue 18's targets per fused-linear case (``stats.linear_targets``): met, or what missed."""
    verdicts = linear_targets(rows)
    if not verdicts:
        return ""
    presets = sorted({name for verdict in verdicts for name in verdict["presets"]})
    lines = [
        f"Targets (linear_cross_entropy at the cross-entropy setting against torch's chunked "
        f"F.linear_cross_entropy: time <= {LINEAR_TARGETS['time_vs_torch_chunked']:g}x, peak <= "
        f"{LINEAR_TARGETS['peak_vs_torch_chunked']:g}x; other presets' time <= "
        f"{LINEAR_TARGETS['preset_time_vs_cross_entropy']:g}x ours at the cross-entropy setting):", "",
        "| case | time x torch chunked | peak x torch chunked | time x compiled torch chunked | "
        + "".join(f"{name} time x ours CE | " for name in presets) + "met | missed |",
        "|---|" + "---:|" * (3 + len(presets)) + "---|---|",
    ]
    for verdict in verdicts:
        device, dtype, tokens, vocab, hidden = verdict["case"]
        cells = [f"{device} {dtype} {tokens}x{hidden}x{vocab}", _fmt(verdict["time_vs_torch_chunked"]),
                 _fmt(verdict["peak_vs_torch_chunked"]), _fmt(verdict["time_vs_compiled_chunked"]),
                 *(_fmt(verdict["presets"].get(name)) for name in presets),
                 "yes" if verdict["met"] else "no", "; ".join(verdict["misses"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PRESET_COLORS: dict[str, str] = {
    "cross_entropy": "tab:blue", "precision": "tab:orange", "diversity": "tab:green",
    "tail_penalty": "tab:red", "head_reward": "tab:purple",
}
PEER_STYLES: dict[str, tuple[str, str]] = {
    "F.cross_entropy": ("black", "-"),
    "torch.compile(F.cross_entropy)": ("dimgray", "--"),
    "liger_cross_entropy": ("saddlebrown", "-."),
    "F.linear+F.cross_entropy": ("black", "-"),
    "torch.compile(F.linear+F.cross_entropy)": ("dimgray", "--"),
    "liger_fused_linear_cross_entropy": ("saddlebrown", "-."),
    "cut_cross_entropy": ("olive", "-."),
    "F.linear_cross_entropy[chunked]": ("tab:cyan", "-"),
    "torch.compile(F.linear_cross_entropy[chunked])": ("tab:cyan", "--"),
}
BACKEND_LINESTYLES: dict[str, str] = {"torch": "-", "triton": ":", "torch+inductor": "--"}
FUSED_LINESTYLE = (0, (5, 1, 1, 1))
"""linear_cross_entropy: dash-dot, in its preset's color (the unfused loss is solid)."""


def _line_style(row: dict[str, Any]) -> tuple[str, str]:
    """(color, linestyle): peers by name; precision_ce colored by preset, dashed when compiled."""
    if row["candidate"] in PEER_STYLES:
        return PEER_STYLES[row["candidate"]]
    if row["candidate"] == "linear_cross_entropy":
        return PRESET_COLORS.get(row["preset"], "tab:gray"), FUSED_LINESTYLE  # type: ignore[return-value]
    return PRESET_COLORS.get(row["preset"], "tab:gray"), BACKEND_LINESTYLES.get(row["backend"], "-")


def write_figures(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``time_vs_vocab.png`` and ``memory_vs_vocab.png``, one panel column per dtype.

    x: vocabulary size (log). Time: fwd+bwd median in ms (log) above, the ratio to
    F.cross_entropy of the same case (log) below. Memory: extra peak in MiB (log) above, as a
    multiple of the logits' size below. Lines join the cases of equal token count; the marker
    says which token count. Colors: preset; line style: backend (solid torch, dotted triton,
    dashed torch.compile); black/gray/brown: F.cross_entropy, its torch.compile, Liger.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if row.get("fwd_bwd_ms") is not None]
    linear = [row for row in measured if row.get("hidden") not in (None, "")]
    measured = [row for row in measured if row.get("hidden") in (None, "")]
    paths = write_linear_figure(linear, out_dir, plt) if linear else []
    if not measured:
        return paths
    dtypes = sorted({row["dtype"] for row in measured})
    labels = list(dict.fromkeys(candidate_label(row) for row in measured))
    token_counts = sorted({int(row["tokens"]) for row in measured})
    markers = dict(zip(token_counts, "os^Dv<>p*h", strict=False))
    device = measured[0]["device"]
    figures = [
        ("time_vs_vocab.png",
         ("fwd+bwd time (ms, median)", lambda r: r.get("fwd_bwd_ms"), True),
         ("fwd+bwd time / F.cross_entropy", lambda r: r.get("ratio_vs_torch_ce"), True)),
        ("memory_vs_vocab.png",
         ("extra peak memory (MiB)", lambda r: r.get("peak_extra_mb"), True),
         ("extra peak memory / logits size", lambda r: r.get("peak_extra_x_logits"), False)),
    ]
    for filename, *panels in figures:
        fig, axes = plt.subplots(2, len(dtypes), figsize=(6.5 * len(dtypes), 8.5), squeeze=False, sharex=True)
        for column, dtype in enumerate(dtypes):
            for panel, (ylabel, value, log) in enumerate(panels):
                ax = axes[panel][column]
                for label in labels:
                    for tokens in token_counts:
                        chosen = sorted(
                            (r for r in measured if candidate_label(r) == label and r["dtype"] == dtype
                             and int(r["tokens"]) == tokens and value(r) is not None),
                            key=lambda r: int(r["vocab"]))
                        if not chosen:
                            continue
                        color, linestyle = _line_style(chosen[0])
                        ax.plot([int(r["vocab"]) for r in chosen], [value(r) for r in chosen],
                                marker=markers[tokens], color=color, linestyle=linestyle, label=label,
                                markersize=6, alpha=0.85)
                ax.set_xscale("log")
                if log:
                    ax.set_yscale("log")
                if panel == 1 and filename.startswith("time"):
                    ax.axhline(1.0, color="black", linewidth=0.8)
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
                if panel == 0:
                    ax.set_title(f"{device} {dtype}")
                else:
                    ax.set_xlabel("vocabulary size V")
        unique: dict[str, Any] = {}
        for ax in axes.flat:
            for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
                unique.setdefault(name, handle)
        marker_note = ", ".join(f"{markers[t]}: {t} tokens" for t in token_counts)
        axes[0][-1].legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.02, 1.0),
                           fontsize=8, title=f"markers  {marker_note}", title_fontsize=8)
        path = out_dir / filename
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def write_linear_figure(rows: Sequence[dict[str, Any]], out_dir: Path, plt: Any) -> list[Path]:
    """``linear_vs_tokens.png``: fused-linear cases, extra peak memory (MiB, log) and fwd+bwd time
    (ms, log) against the number of tokens, one line per candidate and (hidden, vocab) shape."""
    shapes = sorted({(int(r["hidden"]), int(r["vocab"]), r["dtype"]) for r in rows})
    labels = list(dict.fromkeys(candidate_label(r) for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), squeeze=False)
    for ax, (ylabel, column) in zip(axes[0], (("extra peak memory (MiB)", "peak_extra_mb"),
                                              ("fwd+bwd time (ms, median)", "fwd_bwd_ms")), strict=True):
        for label in labels:
            for hidden, vocab, dtype in shapes:
                chosen = sorted((r for r in rows if candidate_label(r) == label and int(r["hidden"]) == hidden
                                 and int(r["vocab"]) == vocab and r["dtype"] == dtype and r.get(column) is not None),
                                key=lambda r: int(r["tokens"]))
                if not chosen:
                    continue
                color, linestyle = _line_style(chosen[0])
                name = label if len(shapes) == 1 else f"{label} D={hidden} V={vocab} {dtype}"
                ax.plot([int(r["tokens"]) for r in chosen], [r[column] for r in chosen], marker="o",
                        color=color, linestyle=linestyle, label=name, markersize=5, alpha=0.85)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    hidden, vocab, dtype = shapes[0]
    title = f"{rows[0]['device']} {dtype}, D = {hidden}, V = {vocab}" if len(shapes) == 1 else rows[0]["device"]
    axes[0][0].set_title(f"fused linear + loss: {title}")
    axes[0][1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    path = out_dir / "linear_vs_tokens.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]


def environment(device: str, args: argparse.Namespace) -> dict[str, Any]:
    """Machine, library versions and date of a run (written as ``environment.json``)."""
    import torch

    import precision_ce

    def version(module: str) -> str | None:
        try:
            from importlib.metadata import version as dist_version

            return dist_version(module)
        except Exception:
            return None

    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "precision_ce": precision_ce.__version__,
        "liger_kernel": version("liger-kernel"),
        "numpy": version("numpy"),
        "matplotlib": version("matplotlib"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
        "environment_variables": {name: os.environ[name] for name in (
            "TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")
            if name in os.environ},
        "timer": ("triton.testing.do_bench, median (one sample); calls longer than --rep-ms: one "
                  "call per sample timed with CUDA events" if device == "cuda" else
                  "torch.utils.benchmark.Timer inner loop (ms per call), each sample repeating the "
                  "call until it lasts --min-time"),
        "peak_memory": ("torch.cuda.max_memory_allocated - memory_allocated before, one fwd+bwd"
                        if device == "cuda" else
                        "torch.profiler CPU allocator events (profile_memory=True), peak of the running "
                        "sum during one fwd+bwd"),
        "backward_time": "per repeat: fwd+bwd sample minus the fwd sample taken just before it",
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "module_name")},
    }
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        peak = peak_bandwidth(args, properties.name)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    gpu_capability=f"{properties.major}.{properties.minor}", cuda=torch.version.cuda,
                    peak_hbm_tbs=None if peak is None else peak / 1e12)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return None


def peak_bandwidth(args: argparse.Namespace, gpu_name: str) -> float | None:
    if args.peak_bandwidth_tbs:
        return float(args.peak_bandwidth_tbs) * 1e12
    return peak_hbm_bandwidth(gpu_name)
