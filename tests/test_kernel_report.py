"""scripts/kernel_report.py in a reduced form (one mode, one dtype, a small vocabulary): it compiles
(so it runs in a subprocess without TRITON_INTERPRET, as tests/test_compile.py), counts the traffic
under the interpreter, reads the SASS and predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "kernel_report.py"


def run_report(*args: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-W", "ignore", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_reduced_kernel_report(tmp_path) -> None:
    result = run_report("--modes", "cross_entropy", "--dtypes", "bf16", "--vocab", "4096", "--json", "-")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    (variant,) = data["variants"]
    assert variant["traffic"]["forward_read"] > 0.999 and variant["traffic"]["backward_write"] == 1.0
    forward = data["kernels"][variant["kernels"]["forward"][0]]
    backward = data["kernels"][variant["kernels"]["backward"][0]]
    # One pass over the row each: the online pass, and the gradient pass, the only one that stores;
    # beside it, the backward's store-only loop of an ignored row's zeros (it reads nothing).
    assert len(forward["loops"]) == 1 and not forward["loops"][0]["global_stores"]
    (gradient_loop,) = [loop for loop in backward["loops"] if loop["global_loads"]]
    assert gradient_loop["global_stores"]
    assert all(loop["global_stores"] for loop in backward["loops"]) and len(backward["loops"]) == 2
    for kernel, loop in ((forward, forward["loops"][0]), (backward, gradient_loop)):
        assert 0 < kernel["registers"] <= 255 and kernel["ctas_per_sm"] >= 1
        assert kernel["BLOCK"] == 4096 and kernel["aligned_arguments"] > 0  # V = 4096 specialises
        assert loop["instructions"] > 50 and "LDG.E.128" in loop["global_loads"]
    assert any(name.startswith("yardstick") for name in data["kernels"])
    for device in ("H100 SXM", "H200"):
        predicted = variant["predicted"][device]
        assert predicted["forward_ms"] > 0 and predicted["backward_ms"] > 0
        assert 0 < predicted["fraction_of_limit"] <= 1.0
    # The saved report prints again as Markdown tables.
    saved = tmp_path / "report.json"
    saved.write_text(result.stdout)
    table = run_report("--from-json", str(saved), "--dtypes", "bf16", "--vocab", "4096")
    assert table.returncode == 0, table.stderr[-3000:]
    assert "| cross_entropy | bf16 | 4096 | 1.00 | 2.00 |" in table.stdout


def test_loops_take_the_counted_passes_in_address_order() -> None:
    """kernel_report.loop_weights: the share of rows that run each loop of a phase (imported in a
    subprocess: the script compiles, so it refuses the interpreter)."""
    check = """
from kernel_report import loop_weights
load = {"global_loads": ["LDG.E.128"], "global_stores": []}
store = {"global_loads": [], "global_stores": ["STG.E"]}
load_store = {"global_loads": ["LDG.E.128"], "global_stores": ["STG.E.128"]}
# The forward with a head: A, R, the candidates' compaction (per-row scratch, every row), then
# the whole-row select's loops, which no row ran (2.0 passes and a gather counted).
assert loop_weights([load, load, store, load, load, load], 2.01, 0.0) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
assert loop_weights([load, load, store, load], 0.0, 0.0) == [0.0] * 4  # every row ignored
# The backward of half-ignored rows: the gradient loop, and the zeros loop for the rest.
assert loop_weights([store, load_store], 0.5, 1.0) == [0.5, 0.5]
"""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", check], env=env, cwd=SCRIPT.parent,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_report_of_a_revision() -> None:
    # main's code measured with this checkout's tools (main has no bench/traffic.py of its own).
    result = run_report("--rev", "main", "--modes", "cross_entropy", "--dtypes", "bf16", "--vocab", "4096",
                        "--json", "-")
    assert result.returncode == 0, result.stderr[-3000:]
    (variant,) = json.loads(result.stdout)["variants"]
    assert variant["traffic"]["backward_read"] == 1.0 and variant["traffic"]["backward_write"] == 1.0
