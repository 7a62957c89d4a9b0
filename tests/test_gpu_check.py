"""The pieces of scripts/gpu_check.sh run here, at tiny sizes: the production check, the summary,
the shell script's syntax, and (slow) the whole script's --dry-run."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPTS / "gpu_check.sh")], check=True)


def test_production_check_passes_and_reports(tmp_path, device) -> None:
    production_check = load_script("production_check")
    out = tmp_path / "production_check.json"
    status = production_check.main(["--device", device, "--tokens", "5", "--vocab", "300", "--modes",
                                    "cross_entropy", "tail_penalty", "all_ignored", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert status == 0, results
    assert [r["mode"] for r in results] == ["cross_entropy", "tail_penalty", "all_ignored"]
    assert all(r["deterministic"] and r["ignored_rows_zero"] for r in results)
    assert "grad_error_vs_F.cross_entropy" in results[0]


def test_production_check_fails_on_a_wrong_gradient(monkeypatch, device) -> None:
    production_check = load_script("production_check")
    right = production_check.loss_and_grad

    def wrong(logits, target, backend, kwargs):
        loss, grad = right(logits, target, backend, kwargs)
        return (loss, grad * 1.1) if backend == "triton" else (loss, grad)

    monkeypatch.setattr(production_check, "loss_and_grad", wrong)
    logits, target = production_check.make_inputs(4, 300, "fp32", device)
    result = production_check.check_mode("cross_entropy", logits, target, "fp32")
    assert not result["passed"] and result["grad_error_vs_torch"] > 0.05
    assert target.data_ptr() % 16 != 0  # the targets really are misaligned


def test_summary_reads_what_the_steps_wrote(tmp_path) -> None:
    gpu_summary = load_script("gpu_summary")
    (tmp_path / "steps.tsv").write_text("production_check\t0\t12\nheadline\t124\t90\n")
    (tmp_path / "production_check.json").write_text(json.dumps({
        "tokens": 16384, "vocab": 128256, "dtype": "bf16",
        "results": [{"mode": "cross_entropy", "passed": True}, {"mode": "focal", "passed": False, "finite": False}]}))
    (tmp_path / "headline").mkdir()
    with (tmp_path / "headline" / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["device", "dtype", "tokens", "hidden", "vocab", "candidate",
                                                    "backend", "preset", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
                                                    "ratio_vs_torch_ce"])
        writer.writeheader()
        writer.writerow(dict(device="cuda", dtype="bf16", tokens=16384, hidden="", vocab=128256,
                             candidate="precision_ce", backend="triton", preset="tail_penalty", fwd_ms=1.5,
                             bwd_ms=2.5, fwd_bwd_ms=4.0, ratio_vs_torch_ce=0.5))
    text = gpu_summary.summary(tmp_path)
    assert "production_check ok (12 s), headline EXIT 124 (90 s)" in text
    assert "1/2 modes pass" in text and "FAIL focal" in text
    assert "cuda bf16 16384x128256" in text and "precision_ce[triton] tail_penalty" in text
    assert "full grid: no results" in text
    assert len(text.splitlines()) <= 40


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path) -> None:
    # Every step of the script on CPU at tiny shapes (about 3-5 minutes on 2 cores).
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--dry-run", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "9/9 modes pass" in summary and "EXIT" not in summary
    assert (tmp_path / "gpu_check.tar.gz").stat().st_size > 0
