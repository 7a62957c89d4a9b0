"""One screen from what scripts/gpu_check.sh wrote: steps, correctness, the headline numbers.

    python scripts/gpu_summary.py WORK_DIR

Reads WORK_DIR/steps.tsv (step, exit status, seconds), env.txt, production_check.json and the
``results.csv`` of the benchmark folders; a missing file is reported as missing, never an error.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

HEADLINE_FOLDERS = {"headline": "headline, logits in", "headline_linear": "headline, fused linear (hidden states in)",
                    "bench": "full grid", "bench_linear": "full grid, fused linear"}
SHOWN_COLUMNS = ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "ratio_vs_torch_ce", "hbm_fraction_of_peak", "peak_extra_x_logits")


def _number(text: str | None, digits: int = 3) -> str:
    if not text:
        return "-"
    try:
        return f"{float(text):.{digits}g}"
    except ValueError:
        return text


def steps(work: Path) -> list[str]:
    path = work / "steps.tsv"
    if not path.exists():
        return ["steps: none recorded"]
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return ["steps: " + ", ".join(f"{name} {'ok' if status == '0' else 'EXIT ' + status} ({seconds} s)"
                                  for name, status, seconds in rows)]


def production(work: Path) -> list[str]:
    path = work / "production_check.json"
    if not path.exists():
        return ["production check: no result"]
    data = json.loads(path.read_text())
    results = data["results"]
    failed = [r for r in results if not r["passed"]]
    lines = [f"production check {data['tokens']} x {data['vocab']} {data['dtype']}: "
             f"{len(results) - len(failed)}/{len(results)} modes pass"]
    for result in failed:
        details = {k: v for k, v in result.items() if k not in ("mode", "passed", "seconds")}
        lines.append(f"  FAIL {result['mode']}: {json.dumps(details)[:200]}")
    return lines


def bench_table(work: Path, folder: str, title: str, limit: int = 12) -> list[str]:
    path = work / folder / "results.csv"
    if not path.exists():
        return [f"{title}: no results"]
    with path.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("fwd_bwd_ms")]
    if not rows:
        return [f"{title}: no timed candidate"]
    first = rows[0]
    shape = "x".join(first[key] for key in ("tokens", "hidden", "vocab") if first.get(key))
    lines = [f"{title}: {first['device']} {first['dtype']} {shape} "
             "(fwd, bwd, fwd+bwd ms; x baseline; HBM fraction; peak x logits)"]
    for row in rows[:limit]:
        label = f"{row['candidate']}[{row['backend']}] {row['preset']}"
        values = "  ".join(_number(row.get(column)) for column in SHOWN_COLUMNS)
        lines.append(f"  {label[:58]:58s} {values}")
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more rows in {folder}/results.csv")
    return lines


def summary(work: Path) -> str:
    env = (work / "env.txt").read_text().splitlines()[:4] if (work / "env.txt").exists() else ["env: missing"]
    lines = ["== gpu_check summary ==", *env, *steps(work), *production(work)]
    for folder, title in HEADLINE_FOLDERS.items():
        limit = 12 if folder.startswith("headline") else 4
        lines += bench_table(work, folder, title, limit)
    tests = work / "tests.log"
    if tests.exists() and tests.read_text().strip():
        lines.append("tests: " + tests.read_text().strip().splitlines()[-1])
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
