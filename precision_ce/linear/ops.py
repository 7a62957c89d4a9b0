"""The fused linear + loss as PyTorch custom operators: what torch.compile sees.

Dynamo would trace the eager autograd function (``chunks.LinearCrossEntropy``) and unroll its
chunk loop (and the backend's own loop in each chunk): compile time growing with N. Compiled code
calls these opaque ops instead, one graph node each, with the same chunk loops inside:

    linear_reduced        "mean"/"sum": (loss, grad_input, grad_weight, grad_bias, *RowStats), the
                          gradients formed for an upstream gradient of 1 and scaled in backward
    linear_rows           "none": (rows_loss, *RowState, *RowStats)
    linear_rows_backward  its gradient (grad_input, grad_weight, grad_bias), logits recomputed

The schemas end with ``Plan.op_args``. A gradient not asked for (``needs``), a None bias's, and
the stats without ``with_stats`` are empty tensors: an op returns a fixed number of tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.library import custom_op, register_autograd

from .. import reference
from ..api import _reduce_rows
from ..ops import (
    SECOND_DERIVATIVE,
    STATE_FIELDS,
    STATS_FIELDS,
    DoubleBackwardError,
    LossOutputs,
    no_double_backward,
    row_state_dtypes,
)
from .chunks import Plan, backward_chunks, forward_chunks


@custom_op("precision_ce::linear_reduced", mutates_args=())
def linear_reduced(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    class_weight: torch.Tensor | None, denominator: torch.Tensor | None, z_scale: torch.Tensor | None,
    needs: list[bool], backend: str, reduction: str, chunk_rows: int, matmul_dtype: torch.dtype,
    acc_dtype: torch.dtype, beta: float, k: int, lambda_head: float, lambda_tail: float, positive_reward: str,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None, with_stats: int,
) -> tuple[(torch.Tensor,) * (4 + STATS_FIELDS)]:  # type: ignore[valid-type]
    plan = Plan.from_op_args(backend, reduction, chunk_rows, matmul_dtype, acc_dtype, beta, k, lambda_head,
                             lambda_tail, positive_reward, ignore_index, label_smoothing, z_loss, softcap, with_stats)
    rows_loss, grads, _, stats = forward_chunks(plan, input, weight, bias, target, class_weight, denominator,
                                                z_scale, tuple(needs))
    loss = _reduce_rows(rows_loss, plan.reduction, denominator)
    return (loss, *(input.new_empty(0) if g is None else g for g in grads), *(stats or _no_stats(input)))


@linear_reduced.register_fake
def _linear_reduced_fake(input, weight, bias, target, class_weight, denominator, z_scale, needs, backend,
                         reduction, chunk_rows, matmul_dtype, acc_dtype, *params_and_stats):
    sized = lambda needed, shape, dtype: input.new_empty(shape if needed else (0,), dtype=dtype)  # noqa: E731
    return (input.new_empty((), dtype=reference.compute_dtype(matmul_dtype)),
            sized(needs[0], input.shape, matmul_dtype),
            sized(needs[1], weight.shape, acc_dtype),
            sized(needs[2] and bias is not None, weight.shape[:1], acc_dtype),
            *_stats_fake(input, params_and_stats[-1]))


@custom_op("precision_ce::linear_rows", mutates_args=())
def linear_rows(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    class_weight: torch.Tensor | None, backend: str, reduction: str, chunk_rows: int, matmul_dtype: torch.dtype,
    acc_dtype: torch.dtype, beta: float, k: int, lambda_head: float, lambda_tail: float, positive_reward: str,
    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None, with_stats: int,
) -> LossOutputs:
    plan = Plan.from_op_args(backend, reduction, chunk_rows, matmul_dtype, acc_dtype, beta, k, lambda_head,
                             lambda_tail, positive_reward, ignore_index, label_smoothing, z_loss, softcap, with_stats)
    rows_loss, _, state, stats = forward_chunks(plan, input, weight, bias, target, class_weight, None, None,
                                                (False,) * 3)
    return (rows_loss, *state, *(stats or _no_stats(input)))


@linear_rows.register_fake
def _linear_rows_fake(input, weight, bias, target, class_weight, backend, reduction, chunk_rows, matmul_dtype,
                      acc_dtype, *params_and_stats):
    rows, cdt = input.shape[0], reference.compute_dtype(matmul_dtype)
    return (input.new_empty(rows, dtype=cdt), *(input.new_empty(rows, dtype=d) for d in row_state_dtypes(backend, cdt)),
            *_stats_fake(input, params_and_stats[-1]))


@custom_op("precision_ce::linear_rows_backward", mutates_args=())
def linear_rows_backward(
    grad_rows: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    target: torch.Tensor, class_weight: torch.Tensor | None, state: list[torch.Tensor], needs: list[bool],
    backend: str, reduction: str, chunk_rows: int, matmul_dtype: torch.dtype, acc_dtype: torch.dtype,
    beta: float, k: int, lambda_head: float, lambda_tail: float, positive_reward: str, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float | None, with_stats: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = Plan.from_op_args(backend, reduction, chunk_rows, matmul_dtype, acc_dtype, beta, k, lambda_head,
                             lambda_tail, positive_reward, ignore_index, label_smoothing, z_loss, softcap, with_stats)
    grads = backward_chunks(plan, input, weight, bias, target, class_weight, state, grad_rows, tuple(needs))
    return tuple(input.new_empty(0) if g is None else g for g in grads)  # type: ignore[return-value]


@linear_rows_backward.register_fake
def _linear_rows_backward_fake(grad_rows, input, weight, bias, target, class_weight, state, needs, *plan_args):
    return tuple(t.new_empty(t.shape if needed and t is not None else (0,)) if t is not None
                 else input.new_empty(0) for t, needed in zip((input, weight, bias), needs, strict=True))


def _no_stats(input: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(input.new_empty(0, dtype=torch.float32) for _ in range(STATS_FIELDS))


def _stats_fake(input: torch.Tensor, with_stats: bool) -> tuple[torch.Tensor, ...]:
    return tuple(input.new_empty(input.shape[0] if with_stats else 0, dtype=torch.float32)
                 for _ in range(STATS_FIELDS))


def _save_reduced(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    ctx.save_for_backward(*output[1:4])
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs[:3])
    ctx.input_count = len(inputs)
    ctx.mark_non_differentiable(*output[1:])


def _scale_reduced(ctx: Any, grad_loss: torch.Tensor, *unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    if torch.is_grad_enabled():  # create_graph=True: the scaled gradients would miss their own derivative
        raise DoubleBackwardError("precision_ce::linear_reduced: " + SECOND_DERIVATIVE)
    grads = tuple((g * grad_loss.to(g.dtype)).to(dtype) if needed else None
                  for g, dtype, needed in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad, strict=False))
    return (*grads, *(None,) * (ctx.input_count - 3))


def _save_rows(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    ctx.save_for_backward(*inputs[:5], *output[1:1 + STATE_FIELDS])
    ctx.plan_args = inputs[5:]
    ctx.mark_non_differentiable(*output[1:])


def _rows_gradient(ctx: Any, grad_rows: torch.Tensor, *unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    input, weight, bias, target, class_weight, *state = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = linear_rows_backward(grad_rows, input, weight, bias, target, class_weight, state, needs,
                                 *ctx.plan_args)
    return (*(g if needed else None for g, needed in zip(grads, needs, strict=True)),
            *(None,) * (2 + len(ctx.plan_args)))


register_autograd(linear_reduced, _scale_reduced, setup_context=_save_reduced)
register_autograd(linear_rows, _rows_gradient, setup_context=_save_rows)
register_autograd(linear_rows_backward, no_double_backward("precision_ce::linear_rows_backward"))


def compiled_outputs(
    plan: Plan, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    class_weight: torch.Tensor | None, denominator: torch.Tensor | None, z_scale: torch.Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor, ...]:
    """(loss, *RowStats) through the ops, as ``LinearCrossEntropy.apply`` gives them eagerly."""
    if plan.backend in ("torch", "torch_ce") or (plan.backend == "torch_ce_inplace" and plan.reduction == "none"):
        # Compiled chunks, as ops.loss_rows runs in compiled code. Not torch_ce: an op's body runs
        # below autograd, where its backward (autograd of F.cross_entropy) cannot record a graph;
        # nor the in-place cross-entropy for "none", whose (empty) row state linear_rows has no slot for.
        plan = dataclasses.replace(plan, backend="torch_fused")
    if plan.reduction == "none":
        outputs = linear_rows(input, weight, bias, target, class_weight, *plan.op_args())
        return (outputs[0], *outputs[1 + STATE_FIELDS:])
    outputs = linear_reduced(input, weight, bias, target, class_weight, denominator, z_scale, list(needs),
                             *plan.op_args())
    return (outputs[0], *outputs[4:])
