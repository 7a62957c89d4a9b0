"""Candidates of the fused-linear cases: hidden states (N, D) and an output layer (V, D) in, a loss out.

* ``F.linear`` + ``F.cross_entropy`` (the baseline; materialises the logits and their gradient);
* ``torch.compile`` of it;
* torch 2.13's chunked ``F.linear_cross_entropy`` (``options=nn.LinearCrossEntropyOptions()``, its
  defaults), and ``torch.compile`` of it: torch's chunked op is opaque to Dynamo, which falls back
  to eager at the op (a graph break), so the compiled form times the same kernels;
* ``F.linear`` + ``precision_ce.cross_entropy`` per preset (the unfused loss; torch backend on CPU,
  Triton on CUDA);
* ``precision_ce.linear_cross_entropy`` per preset, same backend;
* on CUDA, when installed: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` and
  cut-cross-entropy's ``linear_cross_entropy`` (cross-entropy setting).

Each ``make`` returns ``loss_fn(hidden, weight, target) -> scalar`` (mean reduction, no bias).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .cases import FUSED_LINEAR, LINEAR_BASELINE, TORCH_CHUNKED, UNFUSED_LINEAR, Candidate, Case, _compiled

if TYPE_CHECKING:
    import torch

    LinearLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _linear_then_torch_ce() -> LinearLossFn:
    import torch.nn.functional as F

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(hidden, weight), target)

    return loss_fn


def _torch_chunked() -> LinearLossFn:
    import torch
    import torch.nn.functional as F

    options = torch.nn.LinearCrossEntropyOptions()

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.linear_cross_entropy(hidden, weight, target, options=options)

    return loss_fn


def _linear_then_precision_ce(config: Any, backend: str) -> LinearLossFn:
    import torch.nn.functional as F

    import precision_ce

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return precision_ce.cross_entropy(F.linear(hidden, weight), target, config=config,  # type: ignore[return-value]
                                          backend=backend)

    return loss_fn


def _fused(config: Any, backend: str) -> LinearLossFn:
    import precision_ce

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return precision_ce.linear_cross_entropy(hidden, weight, target, config=config,  # type: ignore[return-value]
                                                 backend=backend)

    return loss_fn


def _liger_fused() -> LinearLossFn:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    liger = LigerFusedLinearCrossEntropyLoss()

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = liger(weight, hidden, target)
        return out[0] if isinstance(out, tuple) else out

    return loss_fn


def _cut_cross_entropy() -> LinearLossFn:
    from cut_cross_entropy import linear_cross_entropy as cce

    def loss_fn(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cce(hidden, weight, target)

    return loss_fn


def _cuda_peer(name: str, module: str, make: Callable[[], LinearLossFn], on_cuda: bool, install: str) -> Candidate:
    peer = Candidate(name, module, "cross_entropy", reference=LINEAR_BASELINE)
    if importlib.util.find_spec(module) is None:
        peer.skip = f"skipped: {install} is not installed (pip install {install})"
    elif not on_cuda:
        peer.skip = f"skipped: {install}'s kernels need CUDA"
    else:
        peer.make = make
    return peer


def build_linear_candidates(case: Case, presets: Sequence[str], compile_enabled: bool,
                            max_logits_mb: float | None = None) -> list[Candidate]:
    """Every candidate of a fused-linear ``case``, in measuring order; those that cannot run carry a
    skip. ``max_logits_mb``: skip the candidates that materialise the (N, V) logits beyond it."""
    import precision_ce

    on_cuda = case.device == "cuda"
    backend = "triton" if on_cuda else "torch"
    logits_mb = case.elements * (4 if case.dtype == "fp32" else 2) / 2**20
    too_large = (f"skipped: materialises {logits_mb:.0f} MiB of logits > --linear-max-logits-mb {max_logits_mb:g}"
                 if max_logits_mb is not None and logits_mb > max_logits_mb else "")

    def unless_too_large(candidate: Candidate) -> Candidate:
        if too_large and not candidate.skip:
            candidate.make, candidate.skip = None, too_large
        return candidate

    candidates = [unless_too_large(Candidate(LINEAR_BASELINE, "aten", "cross_entropy", _linear_then_torch_ce))]
    compiled = Candidate(f"torch.compile({LINEAR_BASELINE})", "inductor", "cross_entropy",
                         reference=LINEAR_BASELINE, compiled=True)
    torch_compiled = Candidate(f"torch.compile({TORCH_CHUNKED})", "aten+inductor", "cross_entropy",
                               reference=LINEAR_BASELINE, compiled=True,
                               note="graph break: Dynamo falls back to eager at torch's chunked op")
    for candidate, make in ((compiled, _linear_then_torch_ce), (torch_compiled, _torch_chunked)):
        if compile_enabled:
            candidate.make = _compiled(make)  # type: ignore[arg-type]
        else:
            candidate.skip = "skipped: --no-compile"
    candidates.append(unless_too_large(compiled))
    candidates.append(Candidate(TORCH_CHUNKED, "aten", "cross_entropy", _torch_chunked, reference=LINEAR_BASELINE))
    candidates.append(torch_compiled)
    for name in presets:
        config = precision_ce.PRESETS[name]
        unfused = Candidate(UNFUSED_LINEAR, backend, name, lambda c=config: _linear_then_precision_ce(c, backend),
                            reference=LINEAR_BASELINE if config.is_cross_entropy else None)
        candidates.append(unless_too_large(unfused))
        reference = TORCH_CHUNKED if too_large and config.is_cross_entropy else unfused.label
        candidates.append(Candidate(FUSED_LINEAR, backend, name, lambda c=config: _fused(c, backend),
                                    reference=reference))
    candidates.append(_cuda_peer("liger_fused_linear_cross_entropy", "liger_kernel", _liger_fused, on_cuda,
                                 "liger-kernel"))
    candidates.append(_cuda_peer("cut_cross_entropy", "cut_cross_entropy", _cut_cross_entropy, on_cuda,
                                 "cut-cross-entropy"))
    return candidates
