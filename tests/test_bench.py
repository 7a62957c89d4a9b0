"""Tests of the benchmark harness: the ratio arithmetic and a smoke run of ``precision-ce bench``."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from precision_ce import bench
from precision_ce.cli import main

REQUIRED_COLUMNS = (
    "device", "dtype", "tokens", "vocab", "candidate", "backend", "preset", "fwd_ms", "bwd_ms",
    "fwd_bwd_ms", "spread", "ratio_vs_torch_ce", "peak_extra_mb", "peak_extra_x_logits", "note",
)


def _row(candidate: str, tokens: int = 64, vocab: int = 512, **values: float | None) -> dict:
    return {"device": "cpu", "dtype": "fp32", "tokens": tokens, "vocab": vocab, "candidate": candidate,
            "backend": "torch", "preset": "precision", **values}


# ----------------------------------------------------------------------------- ratio arithmetic


def test_ratio_to_baseline_divides() -> None:
    assert bench.ratio_to_baseline(3.0, 2.0) == 1.5
    assert bench.ratio_to_baseline(1.0, 4.0) == 0.25
    assert bench.ratio_to_baseline(0.0, 4.0) == 0.0


@pytest.mark.parametrize("value, baseline", [
    (None, 1.0), (1.0, None), (1.0, 0.0), (1.0, -2.0), (math.nan, 1.0), (1.0, math.inf), (math.inf, 1.0),
])
def test_ratio_to_baseline_is_none_without_a_usable_pair(value: float | None, baseline: float | None) -> None:
    assert bench.ratio_to_baseline(value, baseline) is None


def test_add_ratios_uses_the_baseline_of_the_same_case_only() -> None:
    rows = [
        _row("F.cross_entropy", fwd_ms=1.0, bwd_ms=2.0, fwd_bwd_ms=3.0, peak_extra_mb=10.0),
        _row("precision_ce", fwd_ms=2.0, bwd_ms=1.0, fwd_bwd_ms=6.0, peak_extra_mb=5.0),
        _row("F.cross_entropy", vocab=1024, fwd_ms=10.0, bwd_ms=10.0, fwd_bwd_ms=20.0, peak_extra_mb=40.0),
        _row("precision_ce", vocab=1024, fwd_ms=5.0, bwd_ms=5.0, fwd_bwd_ms=10.0, peak_extra_mb=None),
        _row("precision_ce", vocab=2048, fwd_ms=5.0, bwd_ms=5.0, fwd_bwd_ms=10.0, peak_extra_mb=1.0),
    ]
    out = bench.add_ratios(rows)
    assert [r["ratio_vs_torch_ce"] for r in out] == [1.0, 2.0, 1.0, 0.5, None]
    assert [r["fwd_ratio_vs_torch_ce"] for r in out] == [1.0, 2.0, 1.0, 0.5, None]
    assert [r["bwd_ratio_vs_torch_ce"] for r in out] == [1.0, 0.5, 1.0, 0.5, None]
    assert [r["peak_ratio_vs_torch_ce"] for r in out] == [1.0, 0.5, 1.0, None, None]
    assert "ratio_vs_torch_ce" not in rows[0], "add_ratios must not modify its input"


def test_add_ratios_keeps_dtypes_apart() -> None:
    rows = [_row("F.cross_entropy", fwd_bwd_ms=2.0), _row("precision_ce", fwd_bwd_ms=8.0)]
    rows[1]["dtype"] = "bf16"
    assert bench.add_ratios(rows)[1]["ratio_vs_torch_ce"] is None


def test_summarize_quartiles_and_range() -> None:
    summary = bench.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (summary.median, summary.q1, summary.q3, summary.minimum, summary.maximum) == (3, 2, 4, 1, 5)
    assert summary.iqr == 2.0
    single = bench.summarize([7.0])
    assert (single.median, single.iqr, single.minimum, single.maximum) == (7.0, 0.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        bench.summarize([])


def test_assumed_traffic_and_peak_bandwidth() -> None:
    assert bench.assumed_hbm_bytes(16384, 128256, 2) == 2 * 16384 * 128256 * 2
    assert bench.peak_hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert bench.peak_hbm_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert bench.peak_hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.peak_hbm_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert bench.peak_hbm_bandwidth("Some Future GPU") is None


def test_parse_shapes_and_names() -> None:
    assert bench.parse_shapes("4096x32000, 1024X8192") == [(4096, 32000), (1024, 8192)]
    for bad in ("4096", "4096x", "ax3", "0x10", ""):
        with pytest.raises(ValueError):
            bench.parse_shapes(bad)
    assert bench.parse_names("all", ["a", "b"], "preset") == ["a", "b"]
    assert bench.parse_names("none", ["a", "b"], "preset") == []
    with pytest.raises(ValueError, match="unknown preset"):
        bench.parse_names("a,c", ["a", "b"], "preset")


def test_cpu_peak_follows_the_running_sum_of_allocator_events() -> None:
    class Event:
        def __init__(self, at: int, nbytes: int, name: str = "[memory]") -> None:
            self.at, self.bytes, self.event_name = at, nbytes, name

        def name(self) -> str:
            return self.event_name

        def device_type(self) -> object:
            return torch.autograd.DeviceType.CPU

        def start_ns(self) -> int:
            return self.at

        def nbytes(self) -> int:
            return self.bytes

    events = [Event(3, -100), Event(1, 100), Event(2, 50), Event(4, 70), Event(5, 0, "aten::add")]
    assert bench.cpu_peak_from_events(events) == 150


# ----------------------------------------------------------------------------- the harness


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames is not None
        missing = set(REQUIRED_COLUMNS) - set(reader.fieldnames)
        assert not missing, f"results.csv lacks columns {missing}"
        return list(reader)


def _assert_measured(row: dict[str, str]) -> None:
    for column in ("fwd_ms", "fwd_bwd_ms", "peak_extra_mb", "ratio_vs_torch_ce"):
        value = float(row[column])
        assert math.isfinite(value) and value > 0, (column, row)
    float(row["bwd_ms"])  # a difference of two noisy samples; may be slightly negative
    # The gradient (the logits' size) is alive at the peak, so less than 1x means memory went unseen.
    assert float(row["peak_extra_x_logits"]) >= 0.99, row


def test_bench_smoke_run_writes_every_output(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = main(["bench", "--shapes", "64x512", "--repeats", "2", "--presets", "cross_entropy,tail_penalty",
                 "--compile-presets", "none", "--linear-shapes", "none", "--min-time", "0.002", "--no-progress",
                 "--out", str(out)])
    assert code == 0
    rows = _read_csv(out / "results.csv")
    by_label = {bench.candidate_label(row): row for row in rows}
    assert set(by_label) == {
        "F.cross_entropy", "torch.compile(F.cross_entropy)", "liger_cross_entropy",
        "precision_ce[torch] cross_entropy", "precision_ce[torch] tail_penalty",
        "precision_ce[triton] cross_entropy", "precision_ce[triton] tail_penalty",
        "compile(precision_ce) cross_entropy", "compile(precision_ce) tail_penalty",
    }
    for label, row in by_label.items():
        assert (row["device"], row["dtype"], row["tokens"], row["vocab"]) == ("cpu", "fp32", "64", "512")
        assert "failed" not in row["note"], (label, row["note"])
        if row["note"].startswith("skipped:"):
            assert row["fwd_bwd_ms"] == "" and row["ratio_vs_torch_ce"] == "", label
        else:
            _assert_measured(row)
    measured = {label for label, row in by_label.items() if not row["note"].startswith("skipped:")}
    assert measured == {"F.cross_entropy", "torch.compile(F.cross_entropy)",
                        "precision_ce[torch] cross_entropy", "precision_ce[torch] tail_penalty"}
    assert float(by_label["F.cross_entropy"]["ratio_vs_torch_ce"]) == 1.0
    assert "fast path" in by_label["precision_ce[torch] cross_entropy"]["note"]
    assert "compile" in by_label["torch.compile(F.cross_entropy)"]["note"]
    assert "CUDA" in by_label["precision_ce[triton] tail_penalty"]["note"]

    environment = json.loads((out / "environment.json").read_text())
    for key in ("date_utc", "python", "torch", "triton", "precision_ce", "cpu", "runtime_s"):
        assert environment[key], key
    table = (out / "results.md").read_text()
    assert "| F.cross_entropy |" in table and "Skipped:" in table
    for figure in ("time_vs_vocab.png", "memory_vs_vocab.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_linear_smoke_run_compares_fused_and_unfused(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = main(["bench", "--shapes", "none", "--linear-shapes", "96x16x512", "--linear-presets",
                 "cross_entropy,tail_penalty", "--repeats", "2", "--no-compile", "--min-time", "0.002",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    rows = _read_csv(out / "results.csv")
    by_label = {bench.candidate_label(row): row for row in rows}
    assert set(by_label) == {
        "F.linear+F.cross_entropy", "torch.compile(F.linear+F.cross_entropy)",
        "F.linear_cross_entropy[chunked]", "torch.compile(F.linear_cross_entropy[chunked])",
        "F.linear+precision_ce[torch] cross_entropy", "linear_cross_entropy[torch] cross_entropy",
        "F.linear+precision_ce[torch] tail_penalty", "linear_cross_entropy[torch] tail_penalty",
        "liger_fused_linear_cross_entropy", "cut_cross_entropy",
    }
    for label, row in by_label.items():
        assert (row["tokens"], row["hidden"], row["vocab"]) == ("96", "16", "512"), label
        assert "failed" not in row["note"] and "differs" not in row["note"], (label, row["note"])
        if row["note"].startswith("skipped:"):
            continue
        for column in ("fwd_ms", "fwd_bwd_ms", "peak_extra_mb", "ratio_vs_torch_ce"):
            assert math.isfinite(float(row[column])) and float(row[column]) > 0, (label, column)
    assert float(by_label["F.linear+F.cross_entropy"]["ratio_vs_torch_ce"]) == 1.0
    fused = by_label["linear_cross_entropy[torch] tail_penalty"]
    unfused = by_label["F.linear+precision_ce[torch] tail_penalty"]
    assert float(fused["time_vs_unfused"]) == pytest.approx(float(fused["fwd_bwd_ms"]) / float(unfused["fwd_bwd_ms"]),
                                                            rel=1e-4)
    assert unfused["time_vs_unfused"] == ""
    chunked = by_label["F.linear_cross_entropy[chunked]"]
    assert float(fused["peak_vs_torch_chunked"]) == pytest.approx(
        float(fused["peak_extra_mb"]) / float(chunked["peak_extra_mb"]), rel=1e-4)
    assert float(chunked["time_vs_torch_chunked"]) == 1.0
    assert "CUDA" in by_label["cut_cross_entropy"]["note"] or "not installed" in by_label["cut_cross_entropy"]["note"]
    assert (out / "linear_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "hidden states" in (out / "results.md").read_text()


def test_linear_shapes_parse_and_fused_ratios_pair_by_preset() -> None:
    assert bench.parse_linear_shapes("4096x256x32000, 8X4X10") == [(4096, 256, 32000), (8, 4, 10)]
    for bad in ("4096x32000", "1x0x5", "axbxc", ""):
        with pytest.raises(ValueError):
            bench.parse_linear_shapes(bad)
    rows = [dict(_row("F.linear+F.cross_entropy", fwd_bwd_ms=2.0, peak_extra_mb=100.0), hidden=8),
            dict(_row("F.linear+precision_ce", fwd_bwd_ms=4.0, peak_extra_mb=50.0), hidden=8),
            dict(_row("linear_cross_entropy", fwd_bwd_ms=5.0, peak_extra_mb=5.0), hidden=8),
            dict(_row("linear_cross_entropy", fwd_bwd_ms=5.0, peak_extra_mb=5.0), hidden=8, preset="diversity"),
            dict(_row("F.linear_cross_entropy[chunked]", fwd_bwd_ms=10.0, peak_extra_mb=10.0), hidden=8)]
    out = bench.add_ratios(rows)
    assert [r["ratio_vs_torch_ce"] for r in out] == [1.0, 2.0, 2.5, 2.5, 5.0]
    assert [r["time_vs_unfused"] for r in out] == [None, None, 1.25, None, None]
    assert [r["peak_vs_unfused"] for r in out] == [None, None, 0.1, None, None]
    assert [r["time_vs_torch_chunked"] for r in out] == [0.2, 0.4, 0.5, 0.5, 1.0]
    assert [r["peak_vs_torch_chunked"] for r in out] == [10.0, 5.0, 0.5, 0.5, 1.0]



def test_linear_targets_name_what_missed() -> None:
    def case(hidden: int, ours_ms: float, ours_mb: float, tail_ms: float | None) -> list[dict]:
        rows = [dict(_row("F.linear_cross_entropy[chunked]", fwd_bwd_ms=10.0, peak_extra_mb=10.0), hidden=hidden),
                dict(_row("torch.compile(F.linear_cross_entropy[chunked])", fwd_bwd_ms=8.0), hidden=hidden),
                dict(_row("linear_cross_entropy", fwd_bwd_ms=ours_ms, peak_extra_mb=ours_mb), hidden=hidden,
                     preset="cross_entropy")]
        if tail_ms is not None:
            rows.append(dict(_row("linear_cross_entropy", fwd_bwd_ms=tail_ms), hidden=hidden, preset="tail_penalty"))
        return rows

    rows = bench.add_ratios(case(8, 8.0, 10.0, 10.0) + case(16, 9.5, 12.0, 13.0) + case(32, 5.0, 5.0, None)
                            + [_row("F.cross_entropy", fwd_bwd_ms=1.0)])
    met, missed, no_preset = bench.linear_targets(rows)
    assert met["met"] and met["misses"] == [] and met["time_vs_torch_chunked"] == 0.8
    assert met["time_vs_compiled_chunked"] == 1.0 and met["presets"] == {"tail_penalty": 1.25}
    assert not missed["met"]
    assert missed["misses"] == ["time_vs_torch_chunked 0.95 > 0.9", "peak_vs_torch_chunked 1.20 > 1",
                                "tail_penalty time x our cross_entropy 1.37 > 1.3"]
    assert no_preset["met"] and no_preset["presets"] == {}
    table = bench.format_linear_targets(rows)
    assert "| cpu fp32 64x16x512 | 0.95 | 1.2 | 1.19 | 1.37 | no |" in table


def test_read_csv_inverts_write_csv(tmp_path) -> None:
    rows = bench.add_ratios([dict(_row("F.linear_cross_entropy[chunked]", fwd_bwd_ms=10.0, peak_extra_mb=10.0,
                                       repeats=3, note="a, b"), hidden=8),
                             dict(_row("linear_cross_entropy", fwd_bwd_ms=8.0, peak_extra_mb=2.5), hidden=8,
                                  preset="cross_entropy")])
    bench.write_csv(rows, tmp_path / "results.csv")
    back = bench.read_csv(tmp_path / "results.csv")
    assert [{key: row.get(key) for key in bench.CSV_COLUMNS} for row in rows] == back
    assert bench.format_table(back) == bench.format_table(rows)


def test_compile_failure_is_a_note_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(*args: object, **kwargs: object) -> object:
        raise RuntimeError("inductor exploded\nsecond line")

    monkeypatch.setattr(torch, "compile", broken_compile)
    case = bench.Case("cpu", "fp32", 32, 256)
    candidates = bench.build_candidates(case, ["precision"], ["precision"], compile_enabled=True,
                                        compile_max_elements=1 << 20)
    timing = bench.Timing("cpu", min_time_s=0.001, warmup_ms=0, rep_ms=0)
    rows = {bench.candidate_label(row): row for row in bench.bench_case(case, candidates, timing, 1, 0)}
    for label in ("torch.compile(F.cross_entropy)", "compile(precision_ce) precision"):
        assert rows[label]["note"] == "failed: RuntimeError: inductor exploded", rows[label]
        assert rows[label]["fwd_bwd_ms"] is None
    assert rows["precision_ce[torch] precision"]["fwd_bwd_ms"] > 0
    assert rows["F.cross_entropy"]["fwd_bwd_ms"] > 0


def test_sample_plans() -> None:
    cpu = bench.Timing("cpu", min_time_s=0.05, warmup_ms=10, rep_ms=40)
    assert cpu.plan(0.01) == bench.SamplePlan(5, False, 0.05)
    assert cpu.plan(2.0) == bench.SamplePlan(1, False, 2.0)
    cuda = bench.Timing("cuda", min_time_s=0.05, warmup_ms=10, rep_ms=40)
    assert cuda.plan(0.5).one_shot and cuda.plan(0.5).calls == 1
    fast = cuda.plan(0.001)
    assert not fast.one_shot and fast.seconds == pytest.approx(0.05 + 0.007)


def test_slow_candidates_get_fewer_samples() -> None:
    case = bench.Case("cpu", "fp32", 32, 256)
    candidates = bench.build_candidates(case, ["cross_entropy"], [], compile_enabled=False,
                                        compile_max_elements=0)
    timing = bench.Timing("cpu", min_time_s=0.001, warmup_ms=0, rep_ms=0)
    rows = bench.bench_case(case, candidates, timing, 3, 0, max_candidate_seconds=1e-9)
    measured = [row for row in rows if row["fwd_bwd_ms"] is not None]
    assert len(measured) == 2
    for row in measured:
        assert row["repeats"] == 1 and "1 of 3 samples" in row["note"], row


def test_compiling_the_torch_backend_is_limited_only_on_request() -> None:
    case = bench.Case("cpu", "fp32", 4096, 32000)
    for limit, skipped in ((bench.DEFAULT_COMPILE_MAX_ELEMENTS, False), (1 << 23, True)):
        candidates = bench.build_candidates(case, ["precision"], ["precision"], compile_enabled=True,
                                            compile_max_elements=limit)
        compiled = next(c for c in candidates if c.candidate == "torch.compile(precision_ce)")
        assert (compiled.make is None) == skipped
        assert skipped == ("--compile-max-elements" in (compiled.skip or ""))


def test_bad_arguments_exit_with_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--shapes", "64by512", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--presets", "nonsense", "--out", str(tmp_path)]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_importing_the_cli_does_not_import_matplotlib() -> None:
    code = ("import sys, argparse, precision_ce.bench as b; b.add_arguments(argparse.ArgumentParser()); "
            "print('matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_smoke_run_on_cuda(tmp_path: Path) -> None:
    code = main(["bench", "--device", "cuda", "--shapes", "256x4096", "--dtype", "bf16", "--repeats", "1",
                 "--presets", "cross_entropy,tail_penalty", "--no-compile", "--no-progress",
                 "--warmup-ms", "1", "--rep-ms", "2", "--out", str(tmp_path)])
    assert code == 0
    rows = _read_csv(tmp_path / "results.csv")
    for row in rows:
        assert "failed" not in row["note"] or "triton" in row["backend"], row
        if row["candidate"] == "F.cross_entropy":
            _assert_measured(row)
            assert float(row["hbm_tbs"]) > 0
