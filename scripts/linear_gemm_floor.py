"""The time of a fused linear + loss's three GEMMs alone, chunked: the floor under any chunked path.

    OMP_NUM_THREADS=1 python scripts/linear_gemm_floor.py 16384x256x32000 --chunk 256

Per chunk of C rows: logits = x_c W^T, dx_c = g W, dW += g^T x_c (g: the logits standing in for
their gradient), in the given dtype on the CPU, best of --repeats; docs/linear.md compares it with
the bench's times of ours and torch's chunked F.linear_cross_entropy.
"""

from __future__ import annotations

import argparse
import time

import torch


def gemm_seconds(rows: int, hidden: int, vocab: int, chunk: int, dtype: torch.dtype, repeats: int) -> list[float]:
    """Seconds of each repeat of the chunked GEMMs (after one warm-up)."""
    x = torch.randn(rows, hidden).to(dtype)
    weight = (torch.randn(vocab, hidden) * 0.05).to(dtype)
    grad_weight = torch.zeros(vocab, hidden, dtype=dtype)
    grad_input = torch.empty(rows, hidden, dtype=dtype)

    def run() -> None:
        for start in range(0, rows, chunk):
            x_c = x[start:start + chunk]
            g = x_c @ weight.t()
            torch.mm(g, weight, out=grad_input[start:start + chunk])
            grad_weight.addmm_(g.t(), x_c)

    run()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", help="NxDxV")
    parser.add_argument("--chunk", type=int, default=256, help="rows per chunk")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows, hidden, vocab = map(int, args.shape.split("x"))
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    times = gemm_seconds(rows, hidden, vocab, args.chunk, dtype, args.repeats)
    print(f"three GEMMs per {args.chunk}-row chunk, {args.shape} {args.dtype}, {torch.get_num_threads()} thread(s): "
          f"best {min(times):.2f} s, all {[round(t, 2) for t in times]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
