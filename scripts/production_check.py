"""Correctness at the production shape: every mode of the Triton kernels on the launch configuration
a GPU really runs (N 16384 tokens, V 128256, bf16 by default), against the torch backend and, for
plain cross-entropy, ``F.cross_entropy``. The first step of scripts/gpu_check.sh.

Inputs as training makes them: logits of a realistic scale, a third of the rows ignored, and
targets sliced as ``labels[:, 1:]`` (an int64 pointer off 16-byte alignment). Per mode: the per-row
loss and the gradient of their sum, run twice (bitwise equal: deterministic), finite, exactly zero
on ignored rows, and within tolerance of the reference; with ``inplace_backward`` the gradient must
lie in the logits' own buffer:

    python scripts/production_check.py --out production_check.json          # CUDA
    TRITON_INTERPRET=1 python scripts/production_check.py --device cpu --tokens 6 --vocab 1000   # dry run

Exit status 1 if any mode fails. One line per mode, then a verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import precision_ce
from precision_ce.bench.traffic import DTYPES, MODES

CHECKS: dict[str, dict[str, Any]] = {
    **MODES,
    "precision": {"beta": -0.25},
    "focal": {"beta": 2.0, "positive_reward": "focal"},
    "smoothing+z_loss+softcap": {"k": 100, "lambda_tail": -0.1, "label_smoothing": 0.1, "z_loss": 1e-4,
                                 "softcap": 30.0},
}
"""cross_entropy keyword arguments per check (the traffic modes, plus the other options)."""
# The loss and gradient come out in the logits' dtype (as F.cross_entropy's): one rounding of it.
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2**-7, "fp16": 2**-10}  # |loss - ref| / max(1, |ref|), per row
GRAD_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 5e-3}  # ||g - g_ref|| / ||g_ref||


def make_inputs(tokens: int, vocab: int, dtype: str, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (tokens, vocab) of scale 4 and targets (tokens,), a view one element into a larger
    buffer (``labels[:, 1:]``), every third row ``-100``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(tokens, vocab, generator=generator, device=device) * 4).to(DTYPES[dtype])
    labels = torch.randint(0, vocab, (tokens + 1,), generator=generator, device=device)
    target = labels[1:]
    target[::3] = -100
    return logits, target


def loss_and_grad(logits: torch.Tensor, target: torch.Tensor, backend: str,
                  kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (fp32) and d(sum of it)/d logits."""
    in_place = kwargs.get("inplace_backward", False)
    if in_place and backend != "triton":
        kwargs = {key: value for key, value in kwargs.items() if key != "inplace_backward"}
    # The in-place backward overwrites its input: give it a copy.
    x = (logits.detach().clone() if in_place else logits.detach()).requires_grad_()
    if backend == "F.cross_entropy":
        loss = F.cross_entropy(x.float(), target, reduction="none")
    else:
        out = precision_ce.cross_entropy(x, target, reduction="none", backend=backend, **kwargs)
        loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss.sum(), x)
    if in_place and backend == "triton" and grad.data_ptr() != x.data_ptr():
        raise AssertionError("inplace_backward=True returned a gradient outside the logits' buffer")
    return loss.detach().float(), grad


def check_mode(name: str, logits: torch.Tensor, target: torch.Tensor, dtype: str) -> dict[str, Any]:
    kwargs = dict(CHECKS[name])
    target = torch.full_like(target, -100) if name == "all_ignored" else target
    start = time.perf_counter()
    loss, grad = loss_and_grad(logits, target, "triton", kwargs)
    loss_again, grad_again = loss_and_grad(logits, target, "triton", kwargs)
    references = [("torch", loss_and_grad(logits, target, "torch", kwargs))]
    if not kwargs:
        references.append(("F.cross_entropy", loss_and_grad(logits, target, "F.cross_entropy", kwargs)))
    ignored = target == -100
    result: dict[str, Any] = {
        "mode": name,
        "deterministic": bool(torch.equal(loss, loss_again) and torch.equal(grad, grad_again)),
        "finite": bool(loss.isfinite().all() and grad.isfinite().all()),
        "ignored_rows_zero": bool((loss[ignored] == 0).all() and (grad[ignored] == 0).all()),
    }
    for reference, (ref_loss, ref_grad) in references:
        loss_error = ((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1.0)).max().item() if loss.numel() else 0.0
        grad_norm = ref_grad.float().norm().item()
        grad_error = (grad.float() - ref_grad.float()).norm().item() / (grad_norm or 1.0)
        result[f"loss_error_vs_{reference}"] = loss_error
        result[f"grad_error_vs_{reference}"] = grad_error
        result[f"close_to_{reference}"] = loss_error <= LOSS_TOLERANCE[dtype] and grad_error <= GRAD_TOLERANCE[dtype]
    result["passed"] = all(value for key, value in result.items() if isinstance(value, bool))
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logits, target = make_inputs(args.tokens, args.vocab, args.dtype, args.device)
    print(f"production check: {args.tokens} x {args.vocab} {args.dtype} on {args.device}, "
          f"targets misaligned by {target.data_ptr() % 16} bytes, {int((target == -100).sum())} rows ignored")
    results = []
    for name in args.modes:
        try:
            result = check_mode(name, logits, target, args.dtype)
        except Exception as error:  # report every mode, not just the first failure
            result = {"mode": name, "passed": False, "error": f"{type(error).__name__}: {error}"[:500]}
        results.append(result)
        errors = " ".join(f"{key.removeprefix('grad_error_vs_')} grad {value:.1e}" for key, value in result.items()
                          if key.startswith("grad_error_vs_"))
        flags = ", ".join(key for key in ("deterministic", "finite", "ignored_rows_zero") if result.get(key) is False)
        verdict = "ok  " if result["passed"] else "FAIL"
        print(f"{verdict} {name:26s} {errors} {flags} {result.get('error', '')}".rstrip())
        if args.device == "cuda":
            torch.cuda.empty_cache()
    failed = [r["mode"] for r in results if not r["passed"]]
    print(f"production check: {len(results) - len(failed)}/{len(results)} modes pass" +
          (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.out:
        args.out.write_text(json.dumps({"tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype,
                                        "device": args.device, "results": results}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
