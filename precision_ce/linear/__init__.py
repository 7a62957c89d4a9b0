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

from .. import reference
from ..api import (
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
from ..config import LossParams, RewardConfig
from ..dtensor import check_plain_layer
from ..ops import under_torch_func
from ..reference import RowStats
from .chunks import FUSED_MIN_LOGITS, LinearCrossEntropy, Plan, auto_chunk_rows
from .ops import compiled_outputs

__all__ = ["LinearCrossEntropyLoss", "PrecisionLinearCrossEntropyLoss", "auto_chunk_rows",
           "linear_cross_entropy"]

RENAMED = {
    "class_weight": "weight= (the class weights, as in torch.nn.functional.linear_cross_entropy)",
    "bias": "linear_bias= (the output layer's bias, as in torch.nn.functional.linear_cross_entropy)",
    "chunk_size": "options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=...)",
}
"""Keywords of precision-ce 0.1's linear_cross_entropy and what replaced them (torch 2.13's names)."""


def _reject_removed(function: str, removed: dict[str, Any]) -> None:
    """A clear error for a stale keyword (naming its replacement), Python's own for any other."""
    for name in removed:
        if name in RENAMED:
            raise TypeError(f"{function}: the keyword {name}= was renamed; pass {RENAMED[name]}")
    if removed:
        raise TypeError(f"{function}() got an unexpected keyword argument {next(iter(removed))!r}")


def _check_layer(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                 class_weight: torch.Tensor | None) -> bool:
    """Validate the layer's tensors; returns True for class-probability targets."""
    if not isinstance(input, torch.Tensor) or not input.is_floating_point() or input.dim() == 0:
        raise TypeError(f"input must be a floating-point tensor of hidden states (..., D), got {_describe(input)}")
    if isinstance(weight, torch.Tensor) and weight.dim() > 2:
        raise NotImplementedError(
            f"linear_weight of shape {tuple(weight.shape)}: K-dimensional outputs (C, d_1, ..., d_K, D) are "
            "not supported; use torch.nn.functional.linear_cross_entropy, or fold d_1..d_K into the rows")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"linear_weight must be the output layer's floating-point (V, D) matrix, got "
                        f"{_describe(weight)}" + (f" of shape {tuple(weight.shape)}"
                                                  if isinstance(weight, torch.Tensor) else ""))
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(f"linear_weight must have shape (V, {input.shape[-1]}) for input (..., "
                         f"{input.shape[-1]}), got {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"linear_weight is {weight.dtype} but input is {input.dtype}; use one dtype (as F.linear does)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],) or bias.dtype != input.dtype:
            raise ValueError(f"linear_bias must be a ({weight.shape[0]},) tensor of {input.dtype} or None, got "
                             f"{_describe(bias)}" + (f" of shape {tuple(bias.shape)}"
                                                     if isinstance(bias, torch.Tensor) else ""))
    for name, tensor in (("linear_weight", weight), ("linear_bias", bias)):
        if tensor is not None and tensor.device != input.device:
            raise ValueError(f"{name} is on {tensor.device} but input is on {input.device}; move one")
    if isinstance(class_weight, torch.Tensor) and class_weight.dim() == 2:
        raise TypeError(
            f"weight of shape {tuple(class_weight.shape)}: weight is the class weights (V,), as in "
            "torch.nn.functional.linear_cross_entropy; the output layer's (V, D) matrix is linear_weight")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor of class indices or probabilities, got {type(target).__name__}")
    if target.is_floating_point():
        expected = (*input.shape[:-1], weight.shape[0])
        if tuple(target.shape) != expected:
            raise ValueError(f"class-probability targets must have shape {expected} (input's rows x V), got "
                             f"{tuple(target.shape)}; class-index targets must be an integer tensor")
        return True
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} (input without its last "
                         f"dimension), got {tuple(target.shape)}")
    return False


def _matmul_dtype(input: torch.Tensor) -> torch.dtype:
    """The logits' dtype: the input's, or autocast's lower precision for fp32 input under autocast
    (what F.linear would produce there)."""
    device = input.device.type
    if input.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return input.dtype


def _aspect_ratio_rows(method: str, rows: int, hidden: int, vocab: int) -> int:
    """torch's ``chunking_method="aspect_ratio[:F]"``: the power of two >= N / ceil(V / D), over F."""
    factor = int(method.partition(":")[2] or 1)
    target = -(-rows // -(-vocab // hidden))
    return max(1, min((1 << (max(target, 1) - 1).bit_length()) // factor, rows))


def _resolve_options(
    options: nn.LinearCrossEntropyOptions | None, rows: int, hidden: int, vocab: int, matmul_dtype: torch.dtype,
    device_type: str,
) -> tuple[int, torch.dtype, bool]:
    """(rows per chunk, weight-gradient accumulator dtype, allow_retain_graph) from torch's options.

    None, or ``chunking_method="auto"`` without ``batch_chunk_size``: our own chunk size
    (``auto_chunk_rows``) and a fp32 (fp64) accumulator. ``acc_policy`` has nothing to choose here:
    every intermediate is fp32 already, and the chunks add straight into the accumulator (torch's
    "compact")."""
    exact = reference.compute_dtype(matmul_dtype)
    auto = auto_chunk_rows(rows, vocab, hidden, torch.finfo(matmul_dtype).bits // 8, device_type)
    if options is None:
        return auto, exact, False
    if not isinstance(options, nn.LinearCrossEntropyOptions):
        raise TypeError(f"options must be a torch.nn.LinearCrossEntropyOptions or None, got {type(options).__name__}")
    chunk, method = options.batch_chunk_size, options.chunking_method
    if method not in (None, "auto"):
        by_method = _aspect_ratio_rows(method, max(rows, 1), hidden, vocab)
        if chunk is not None and min(chunk, rows) != by_method:
            raise ValueError(f"options: batch_chunk_size={chunk} and chunking_method={method!r} give different "
                             f"chunk sizes ({chunk} vs {by_method}); pass only one")
        chunk = by_method
    elif chunk is None:
        chunk = auto if method == "auto" else max(rows, 1)  # method None: one chunk, as torch
    acc = options.acc_dtype or exact
    if acc not in (exact, matmul_dtype):
        raise ValueError(f"options.acc_dtype must be {exact} (the default) or the parameters' dtype "
                         f"{matmul_dtype}, got {acc}")
    return chunk, acc, options.allow_retain_graph


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: nn.LinearCrossEntropyOptions | None = None,
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
    check_targets: bool | None = None,
    **removed: Any,
) -> torch.Tensor | tuple[torch.Tensor, RowStats]:
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target, weight, ...)`` without
    materialising the logits or their gradient: ``torch.nn.functional.linear_cross_entropy``'s
    signature, plus the generalised reward and our options.

    Args:
        input: hidden states (..., D) before the output layer (torch: (D,) or (N, D)); float32,
            bfloat16, float16 or float64.
        linear_weight: the output layer's (V, D) matrix, as in ``F.linear``; same dtype and device.
            K-dimensional outputs (C, d_1, ..., d_K, D) raise NotImplementedError.
        target: class indices shaped ``input.shape[:-1]``, integer dtype, ``ignore_index`` allowed;
            or class probabilities shaped ``(*input.shape[:-1], V)`` (cross-entropy setting only).
        linear_bias: (V,) or None.
        weight: (V,) class weights, or None.
        reduction, label_smoothing: as in ``F.cross_entropy``.
        ignore_index: target value to ignore; None (torch's default) means -100. Must be None with
            class-probability targets.
        options: ``torch.nn.LinearCrossEntropyOptions`` or None: ``batch_chunk_size`` (rows per
            chunk; with ``chunking_method`` as torch resolves them), ``acc_dtype`` (the weight and bias
            gradients' accumulator: fp32, fp64 for fp64, by default; the parameters' 16-bit dtype
            saves 2 V D bytes, rounding once per chunk), ``allow_retain_graph`` (a second backward).
            None: chunks of ``auto_chunk_rows`` rows and a fp32 accumulator; never the (N, V) logits.
        beta, k, lambda_head, lambda_tail, positive_reward, config, z_loss, softcap, return_stats,
        backend, check_targets: as in ``precision_ce.cross_entropy``.

    Returns:
        The loss in the logits' dtype (float32 for 16-bit ones under autocast): a scalar, or
        shaped like ``input.shape[:-1]`` for reduction="none"; with ``return_stats``, (loss, RowStats).
        Gradients flow to ``input``, ``linear_weight`` and ``linear_bias``, in their own dtypes.
    """
    _reject_removed("linear_cross_entropy", removed)
    check_plain_layer(input, linear_weight, linear_bias)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    probabilities = _check_layer(input, linear_weight, linear_bias, target, weight)
    if probabilities and ignore_index is not None:
        raise ValueError("ignore_index cannot be specified when target contains class probabilities")
    ignore_index = -100 if ignore_index is None else ignore_index
    reward = _reward_config(config, beta=beta, k=k, lambda_head=lambda_head, lambda_tail=lambda_tail,
                            positive_reward=positive_reward)
    params = _loss_params(reward, ignore_index, label_smoothing, z_loss, softcap)
    vocab, hidden = linear_weight.shape
    x = input.reshape(-1, hidden)
    rows = x.shape[0]
    rows_target = target.reshape(rows, vocab) if probabilities else target.reshape(-1)
    matmul_dtype = _matmul_dtype(input)
    # A zero-stride stand-in for the logits: the shared checks of cross_entropy, without the memory.
    logits_like = torch.empty((), dtype=matmul_dtype, device=input.device).expand(rows, vocab)
    _check_tensors(logits_like, rows_target, weight)
    chosen = _backend(backend, logits_like)
    chunk_rows, acc_dtype, allow_retain_graph = _resolve_options(options, rows, hidden, vocab, matmul_dtype,
                                                                 input.device.type)
    denominator = z_scale = None
    if probabilities:
        chosen = _probability_backend(params, return_stats, chosen)
        if reduction == "mean":
            denominator = torch.tensor(rows, dtype=reference.compute_dtype(matmul_dtype), device=input.device)
    else:
        if check_targets or (check_targets is None and (not input.is_cuda or chosen == "torch")):
            _check_target_range(rows_target, vocab, ignore_index)
        rows_target = rows_target.long()
        if chosen == "torch" and params.is_plain_cross_entropy and not return_stats:
            chosen = "torch_ce_inplace"  # the loss and its gradient in the chunk's own buffer
        elif (chosen == "torch" and backend == "auto" and matmul_dtype == torch.float32
              and rows * vocab >= FUSED_MIN_LOGITS):
            chosen = "torch_fused"  # each chunk's arithmetic compiled once by Inductor (FUSED_MIN_LOGITS)
        if reduction == "mean":
            denominator, z_scale = _mean_denominator(rows_target, weight, params, vocab)
    plan = Plan(params, chosen, reduction, chunk_rows, matmul_dtype, stats_level(return_stats), acc_dtype,
                allow_retain_graph)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and input.requires_grad, grad_on and linear_weight.requires_grad,
             grad_on and linear_bias is not None and linear_bias.requires_grad)
    arguments = (x, linear_weight, linear_bias, rows_target, weight, denominator, z_scale)
    if torch.compiler.is_compiling():
        if probabilities:
            raise NotImplementedError("linear_cross_entropy with class-probability targets does not run under "
                                      "torch.compile; compile cross_entropy(F.linear(...)) instead")
        outputs = compiled_outputs(plan, *arguments, needs)
    elif under_torch_func(input, linear_weight, linear_bias):
        raise NotImplementedError(
            "linear_cross_entropy does not run under torch.func transforms (grad, vmap, ...): its "
            "gradients are formed in the forward pass; use precision_ce.cross_entropy(F.linear(...)) there"
        )
    else:
        outputs = LinearCrossEntropy.apply(*arguments, plan, needs)
    return _result(outputs[0], outputs[1:] if return_stats else None, reduction, input.shape[:-1],
                   result_dtype(logits_like))


def _probability_backend(params: LossParams, return_stats: bool, chosen: str) -> str:
    """Class-probability targets: torch's own cross-entropy per chunk, at the cross-entropy setting."""
    if not params.is_plain_cross_entropy or return_stats:
        raise ValueError("class-probability targets support the plain cross-entropy setting only (no beta, "
                         "lambda_head, lambda_tail, z_loss, softcap or return_stats); pass class indices")
    if chosen == "triton":
        raise ValueError("backend='triton' needs class-index targets; use backend='torch' or 'auto'")
    return "torch_ce"


def _module_config(config: RewardConfig | None, reward: dict[str, Any], reduction: str, ignore_index: int | None,
                   label_smoothing: float, z_loss: float, softcap: float | None) -> RewardConfig:
    """The loss modules' constructor checks (the call's own, made once up front); returns the reward."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    reward_config = _reward_config(config, **reward)
    _loss_params(reward_config, -100 if ignore_index is None else ignore_index, label_smoothing, z_loss, softcap)
    return reward_config


class PrecisionLinearCrossEntropyLoss(nn.Module):
    """``linear_cross_entropy`` as a module that takes the output layer in ``forward(input,
    linear_weight, target, linear_bias=None)`` (a tied embedding, a model's own ``lm_head``).
    Takes ``nn.CrossEntropyLoss``'s leading arguments, then ``linear_cross_entropy``'s keywords."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        options: nn.LinearCrossEntropyOptions | None = None,
        config: RewardConfig | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        backend: Backend = "auto",
        **reward: Any,
    ) -> None:
        super().__init__()
        _reject_removed(type(self).__name__, {name: None for name in reward if name in RENAMED})
        self.register_buffer("weight", weight)
        self.loss_kwargs = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                                options=options, z_loss=z_loss, softcap=softcap, backend=backend,
                                config=_module_config(config, reward, reduction, ignore_index, label_smoothing,
                                                      z_loss, softcap))

    def forward(self, input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                linear_bias: torch.Tensor | None = None) -> torch.Tensor:
        """input (..., D) hidden states, linear_weight (V, D), target ``input.shape[:-1]``, linear_bias (V,)."""
        return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,  # type: ignore[return-value]
                                    weight=self.weight, **self.loss_kwargs)

    def extra_repr(self) -> str:
        return f"config={self.loss_kwargs['config']}, reduction={self.loss_kwargs['reduction']!r}"


class LinearCrossEntropyLoss(nn.LinearCrossEntropyLoss):
    """A drop-in for ``torch.nn.LinearCrossEntropyLoss`` (a subclass: same constructor, parameters
    and state dict; it owns the output layer ``self.linear``) computed by ``linear_cross_entropy``,
    with its keywords (``config`` or the reward fields, ``z_loss``, ``softcap``, ``backend``) after
    torch's. ``forward(input, target)``. K-dimensional ``out_features`` raise NotImplementedError."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: nn.LinearCrossEntropyOptions | None = None,
        config: RewardConfig | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        backend: Backend = "auto",
        **reward: Any,
    ) -> None:
        if out_features:
            raise NotImplementedError(f"out_features={out_features}: K-dimensional outputs are not supported; "
                                      "use torch.nn.LinearCrossEntropyLoss")
        config = _module_config(config, reward, reduction, ignore_index, label_smoothing, z_loss, softcap)
        super().__init__(in_features, num_classes, bias=bias, device=device, dtype=dtype, reduction=reduction,
                         weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing, options=options)
        self.config = config
        self.z_loss, self.softcap, self.backend = z_loss, softcap, backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """input (D,) or (..., D) hidden states; target class indices ``input.shape[:-1]`` or probabilities."""
        return linear_cross_entropy(  # type: ignore[return-value]
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            options=self.options, config=self.config, z_loss=self.z_loss, softcap=self.softcap, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, config={self.config}"
