"""Compile time and speed of torch.compile'd precision_ce.cross_entropy against torch.compile(F.cross_entropy);
with ``--hidden D``, of precision_ce.linear_cross_entropy (eager and compiled) against
torch.compile(F.linear + F.cross_entropy), for (rows, D) hidden states and a (vocab, D) output layer.

Every candidate is ``torch.compile(fullgraph=True)`` of fwd+bwd-ready code (the loss; backward is
timed with it). First the first call of each (compile + one fwd+bwd), then ``--repeats`` rounds
in which every candidate runs once, in a shuffled order per round, so that load from other
processes on a shared machine hits all candidates alike. Medians and ratios against the
compiled F.cross_entropy, as CSV (default ``benchmarks/results/cpu/compile.csv``).

    nice python scripts/bench_compile.py                       # CPU, 4096 x 32000 fp32
    python scripts/bench_compile.py --device cuda --out benchmarks/results/cuda/compile.csv
    nice python scripts/bench_compile.py --hidden 256 --out benchmarks/results/cpu/compile_linear.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# A first call on a fresh install compiles from scratch: no cached Inductor artefacts.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch
import torch.nn.functional as F

import precision_ce

PRESETS = ("cross_entropy", "precision", "tail_penalty")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], target: torch.Tensor,
             device: str) -> float:
    for leaf in inputs:
        leaf.grad = None
    _sync(device)
    start = time.perf_counter()
    fn(*inputs, target).backward()
    _sync(device)
    return time.perf_counter() - start


def _candidates(hidden: int | None) -> dict[str, Callable[..., torch.Tensor]]:
    """The baseline first: compiled torch, then ours per preset."""
    if hidden is None:
        candidates = {"torch.compile(F.cross_entropy)": torch.compile(lambda x, t: F.cross_entropy(x, t),
                                                                      fullgraph=True)}
        for name in PRESETS:
            candidates[f"torch.compile(precision_ce) {name}"] = torch.compile(
                lambda x, t, config=precision_ce.PRESETS[name]: precision_ce.cross_entropy(x, t, config=config),
                fullgraph=True)
        return candidates
    candidates = {"torch.compile(F.linear + F.cross_entropy)": torch.compile(
        lambda x, w, t: F.cross_entropy(F.linear(x, w), t), fullgraph=True)}
    for name in PRESETS:
        def fused(x, w, t, config=precision_ce.PRESETS[name]):
            return precision_ce.linear_cross_entropy(x, w, t, config=config)

        candidates[f"precision_ce.linear_cross_entropy {name}"] = fused
        candidates[f"torch.compile(precision_ce.linear_cross_entropy) {name}"] = torch.compile(fused, fullgraph=True)
    return candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=None, help="D: time the fused linear + loss instead")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/compile.csv"))
    parser.add_argument("--ours-first", action="store_true",
                        help="first calls of precision_ce before F.cross_entropy's (who pays Inductor's start-up)")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if args.hidden is None:
        logits = torch.randn(args.rows, args.vocab, generator=generator) * 2
        inputs = (logits.to(args.device, dtype).requires_grad_(),)
    else:
        hidden = torch.randn(args.rows, args.hidden, generator=generator)
        weight = torch.randn(args.vocab, args.hidden, generator=generator) * (2 / args.hidden**0.5)
        inputs = tuple(t.to(args.device, dtype).requires_grad_() for t in (hidden, weight))
    target = torch.randint(0, args.vocab, (args.rows,), generator=generator).to(args.device)

    candidates = _candidates(args.hidden)
    baseline_name = next(iter(candidates))
    first_order = list(candidates)[1:] + list(candidates)[:1] if args.ours_first else list(candidates)
    first_call = {name: _fwd_bwd(candidates[name], inputs, target, args.device) for name in first_order}
    for name, seconds in first_call.items():
        print(f"first call (compile + fwd+bwd) {name}: {seconds:.1f} s", flush=True)

    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates)
    shuffle = random.Random(0)
    for _ in range(args.repeats):
        shuffle.shuffle(order)
        for name in order:
            times[name].append(_fwd_bwd(candidates[name], inputs, target, args.device))
    baseline = statistics.median(times[baseline_name])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for name in candidates:
        median = statistics.median(times[name])
        rows.append({
            "device": args.device, "dtype": args.dtype, "rows": args.rows, "hidden": args.hidden or "",
            "vocab": args.vocab, "candidate": name,
            "first_call_s": round(first_call[name], 2), "fwd_bwd_median_ms": round(1e3 * median, 1),
            "fwd_bwd_min_ms": round(1e3 * min(times[name]), 1), "fwd_bwd_max_ms": round(1e3 * max(times[name]), 1),
            "ratio_vs_compiled_torch": round(median / baseline, 3), "repeats": args.repeats,
            "first_call_order": "precision_ce first" if args.ours_first else "torch first",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg_1m": round(load, 2),
        })
        print(f"{name}: median {1e3 * median:.0f} ms, ratio {median / baseline:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
