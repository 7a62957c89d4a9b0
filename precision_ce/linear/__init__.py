"""Fused output layer + generalised loss: the loss of ``F.linear(input, weight, bias)`` without
ever holding the (N, V) logits or their gradient.

Token chunks (see docs/linear.md). Rows are taken ``chunk`` at a time; each chunk's logits
``x_c W^T + b`` (chunk, V) are formed in the input dtype, and the backend's forward and backward
run on them at once, inside the forward pass, with the reduction's per-row factor f (1 for
"sum", 1 / denominator for "mean"):

    g_c   = f * dloss_c / dlogits_c                  (chunk, V), freed after the chunk
    dx_c  = g_c W                                     (chunk, D), written into grad_input
    dW   += g_c^T x_c,   db += sum_rows g_c           fp32 (fp64 for fp64) accumulators

The backward pass multiplies the stored gradients by the upstream scalar gradient. Each row sees
its whole vocabulary inside a chunk, so the rank-aware modes (the k-th largest logit of a row) and
every option work per chunk through the backends unchanged. reduction="none" admits any upstream
gradient per row, unknown at forward time: there the forward pass keeps only the backend's small
per-row state, and the backward pass recomputes each chunk's logits (one more matmul) and calls the
backend's backward with the upstream gradient as its per-row factor.

Peak memory beyond the inputs and returned gradients: one chunk of logits, one of their gradient
and the backend's temporaries of a chunk, plus the fp32 weight-gradient accumulator for 16-bit
weights. Neither pass synchronises with the host on CUDA (no data-dependent Python branches).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ..api import (
    EXACT_DTYPES,
    REDUCTIONS,
    Backend,
    _backend,
    _check_target_range,
    _check_tensors,
    _describe,
    _loss_params,
    _mean_denominator,
    _result,
    _reward_config,
    result_dtype,
    stats_level,
)
from ..config import RewardConfig
from ..ops import under_torch_func
from ..reference import RowStats
from .chunks import MIN_CHUNK_BYTES, LinearCrossEntropy, Plan, auto_chunk_rows
from .ops import compiled_outputs

__all__ = ["MIN_CHUNK_BYTES", "PrecisionLinearCrossEntropyLoss", "auto_chunk_rows", "linear_cross_entropy"]


def _check_layer(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor) -> None:
    if not isinstance(input, torch.Tensor) or not input.is_floating_point() or input.dim() == 0:
        raise TypeError(f"input must be a floating-point tensor of hidden states (..., D), got {_describe(input)}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"weight must be the output layer's floating-point (V, D) matrix, got {_describe(weight)}"
                        + (f" of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else ""))
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(f"weight must have shape (V, {input.shape[-1]}) for input (..., {input.shape[-1]}), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight is {weight.dtype} but input is {input.dtype}; use one dtype (as F.linear does)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],) or bias.dtype != input.dtype:
            raise ValueError(f"bias must be a ({weight.shape[0]},) tensor of {input.dtype} or None, got "
                             f"{_describe(bias)}" + (f" of shape {tuple(bias.shape)}"
                                                     if isinstance(bias, torch.Tensor) else ""))
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.device != input.device:
            raise ValueError(f"{name} is on {tensor.device} but input is on {input.device}; move one")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point():
        raise TypeError("linear_cross_entropy takes class-index targets (int64), not class probabilities")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} (input without its last "
                         f"dimension), got {tuple(target.shape)}")


def _matmul_dtype(input: torch.Tensor) -> torch.dtype:
    """The logits' dtype: the input's, or autocast's lower precision for fp32 input under autocast
    (what F.linear would produce there)."""
    device = input.device.type
    if input.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return input.dtype


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    beta: float = 0.0,
    k: int = 100,
    lambda_head: float = 0.0,
    lambda_tail: float = 0.0,
    positive_reward: str = "power",
    config: RewardConfig | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_stats: bool | Literal["full"] = False,
    backend: Backend = "auto",
    chunk_size: int | None = None,
    check_targets: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, RowStats]:
    """``cross_entropy(F.linear(input, weight, bias).reshape(-1, V), target.reshape(-1), ...)``
    without materialising the (N, V) logits or their gradient.

    Args:
        input: hidden states (..., D) before the output layer; float32, bfloat16, float16 or float64.
        weight: the output layer's (V, D) matrix, as in ``F.linear``; same dtype and device as input.
        target: class indices shaped ``input.shape[:-1]``, integer dtype, ``ignore_index`` allowed.
        bias: (V,) or None.
        class_weight: (V,) per-class weights, ``cross_entropy``'s ``weight``.
        ignore_index, reduction, label_smoothing, beta, k, lambda_head, lambda_tail,
        positive_reward, config, z_loss, softcap, return_stats, backend, check_targets:
            as in ``precision_ce.cross_entropy``.
        chunk_size: rows per chunk (default ``auto_chunk_rows``: a chunk of logits about the size
            of the input, at least 16 MiB). Peak extra memory grows with it.

    Returns:
        The loss in the logits' dtype (float32 for 16-bit ones under autocast): a scalar, or
        shaped like ``target`` for reduction="none"; with ``return_stats``, (loss, RowStats).
        Gradients flow to ``input``, ``weight`` and ``bias``, returned in their own dtypes.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    reward = _reward_config(config, beta=beta, k=k, lambda_head=lambda_head, lambda_tail=lambda_tail,
                            positive_reward=positive_reward)
    params = _loss_params(reward, ignore_index, label_smoothing, z_loss, softcap)
    _check_layer(input, weight, bias, target)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    vocab, hidden = weight.shape
    x = input.reshape(-1, hidden)
    rows_target = target.reshape(-1)
    rows = x.shape[0]
    matmul_dtype = _matmul_dtype(input)
    # A zero-stride stand-in for the logits: the shared checks of cross_entropy, without the memory.
    logits_like = torch.empty((), dtype=matmul_dtype, device=input.device).expand(rows, vocab)
    _check_tensors(logits_like, rows_target, class_weight)
    chosen = _backend(backend, logits_like)
    if check_targets or (check_targets is None and (not input.is_cuda or chosen == "torch")):
        _check_target_range(rows_target, vocab, ignore_index)
    rows_target = rows_target.long()
    if chosen == "torch" and params.is_plain_cross_entropy and not return_stats and matmul_dtype in EXACT_DTYPES:
        chosen = "torch_ce"  # cross_entropy's own fast path, per chunk

    denominator = z_scale = None
    if reduction == "mean":
        denominator, z_scale = _mean_denominator(rows_target, class_weight, params, vocab)
    plan = Plan(params, chosen, reduction,
                chunk_size or auto_chunk_rows(rows, vocab, hidden, torch.finfo(matmul_dtype).bits // 8),
                matmul_dtype, stats_level(return_stats))
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and input.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    arguments = (x, weight, bias, rows_target, class_weight, denominator, z_scale)
    if torch.compiler.is_compiling():
        outputs = compiled_outputs(plan, *arguments, needs)
    elif under_torch_func(input, weight, bias):
        raise NotImplementedError(
            "linear_cross_entropy does not run under torch.func transforms (grad, vmap, ...): its "
            "gradients are formed in the forward pass; use precision_ce.cross_entropy(F.linear(...)) there"
        )
    else:
        outputs = LinearCrossEntropy.apply(*arguments, plan, needs)
    return _result(outputs[0], outputs[1:] if return_stats else None, reduction, target.shape,
                   result_dtype(logits_like))


class PrecisionLinearCrossEntropyLoss(nn.Module):
    """The output layer's weight and bias in, the generalised loss out: ``linear_cross_entropy``
    as a module. Takes its keyword arguments; ``forward(input, weight, target, bias=None)``."""

    def __init__(
        self,
        class_weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        config: RewardConfig | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        backend: Backend = "auto",
        chunk_size: int | None = None,
        **reward: Any,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.config = _reward_config(config, **reward)
        _loss_params(self.config, ignore_index, label_smoothing, z_loss, softcap)
        self.z_loss = z_loss
        self.softcap = softcap
        self.backend = backend
        self.chunk_size = chunk_size

    def forward(self, input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """input (..., D) hidden states, weight (V, D), target ``input.shape[:-1]``, bias (V,) or None."""
        return linear_cross_entropy(  # type: ignore[return-value]
            input, weight, target, bias, class_weight=self.class_weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing, config=self.config,
            z_loss=self.z_loss, softcap=self.softcap, backend=self.backend, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"config={self.config}, reduction={self.reduction!r}"
