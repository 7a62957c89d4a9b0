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

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.library import custom_op, register_autograd

from . import reference
from .api import (
    EXACT_DTYPES,
    REDUCTIONS,
    Backend,
    _backend,
    _check_target_range,
    _check_tensors,
    _describe,
    _loss_params,
    _mean_denominator,
    _reward_config,
    _torch_cross_entropy,
    result_dtype,
)
from .config import LossParams, RewardConfig
from .ops import (
    SECOND_DERIVATIVE,
    STATE_FIELDS,
    STATS_FIELDS,
    DoubleBackwardError,
    LossOutputs,
    no_double_backward,
    params_args,
    params_from,
    rescale_z_loss,
    triton_backend,
)
from .reference import RowStats

MIN_CHUNK_BYTES = 16 << 20
"""A chunk's logits take at least this many bytes (when N allows). Each chunk adds g_c^T x_c into
the whole (V, D) weight-gradient accumulator, a read and write of V D fp32 numbers; fewer, larger
chunks cut that traffic (docs/linear.md: 8 MiB chunks measured slower than 16 MiB on CPU)."""


def auto_chunk_rows(rows: int, vocab: int, hidden: int, element_size: int) -> int:
    """Rows per chunk: a chunk of logits as large as the input itself, or MIN_CHUNK_BYTES if more.

    The extra memory then grows like the input's (N D), not like the logits' (N V): for V = 32000
    and D = 256 a chunk holds ~1/125 of the rows. A multiple of 16 rows (tensor-core tiles) when
    more than 16.
    """
    budget = max(rows * hidden * element_size, MIN_CHUNK_BYTES)
    chunk = max(1, budget // max(vocab * element_size, 1))
    if chunk > 16:
        chunk -= chunk % 16
    return max(1, min(rows, chunk))


class _TorchCrossEntropy:
    """torch's own cross-entropy per chunk, with the backends' forward/backward contract: what
    ``cross_entropy`` runs at the plain setting (fp32/fp64, torch backend, no stats), bit for bit
    F.cross_entropy's per-row loss and gradient. It keeps no per-row state."""

    RowState = tuple

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, params: LossParams,
                with_stats: bool) -> tuple[torch.Tensor, tuple[()], None]:
        loss = _torch_cross_entropy(logits, target, weight, ignore_index=params.ignore_index, reduction="none",
                                    label_smoothing=params.label_smoothing)
        return loss, (), None

    @staticmethod
    def backward(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, params: LossParams,
                 state: Any, grad_rows: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            loss = _torch_cross_entropy(leaf, target, weight, ignore_index=params.ignore_index, reduction="none",
                                        label_smoothing=params.label_smoothing)
            (grad,) = torch.autograd.grad(loss, leaf, grad_rows.to(loss.dtype))
        return grad


class _FusedReference:
    """The torch backend with each row chunk compiled once by Inductor (``reference.fused_rows``):
    what the linear ops run inside a torch.compile'd graph, as ``ops.loss_rows`` does."""

    RowState = reference.RowState
    forward = staticmethod(functools.partial(reference.forward, fused=True))
    backward = staticmethod(functools.partial(reference.backward, fused=True))


CHUNK_BACKENDS: dict[str, Any] = {
    "torch": reference, "torch_fused": _FusedReference, "torch_ce": _TorchCrossEntropy,
    "triton": triton_backend,
}
"""What runs the loss on a chunk's logits: a module or class with the backends' ``forward`` /
``backward`` / ``RowState``. The linear ops take the key."""


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything but the tensors: what the chunk loops, the autograd function and the ops need."""

    params: LossParams
    backend: str  # a key of CHUNK_BACKENDS
    reduction: str
    chunk_rows: int
    matmul_dtype: torch.dtype  # the logits' dtype: the input's, or autocast's
    with_stats: bool

    @property
    def chunk_backend(self) -> Any:
        return CHUNK_BACKENDS[self.backend]

    def chunks(self, rows: int) -> list[slice]:
        # At least one (empty) chunk: zero rows still give empty losses, state and stats of the right dtypes.
        return [slice(start, min(start + self.chunk_rows, rows)) for start in range(0, max(rows, 1), self.chunk_rows)]

    def op_args(self) -> tuple[Any, ...]:
        """The op schemas' scalar arguments, in order: backend, reduction, chunk_rows, matmul_dtype,
        then ``ops.params_args`` and ``with_stats``."""
        return (self.backend, self.reduction, self.chunk_rows, self.matmul_dtype,
                *params_args(self.params), self.with_stats)

    @classmethod
    def from_op_args(cls, backend: str, reduction: str, chunk_rows: int, matmul_dtype: torch.dtype,
                     *params_and_stats: Any) -> _Plan:
        return cls(params_from(*params_and_stats[:-1]), backend, reduction, chunk_rows, matmul_dtype,
                   params_and_stats[-1])


def _no_autocast(device: torch.device) -> Any:
    # The matmuls run in plan.matmul_dtype, chosen once; autocast must not re-cast them per call.
    return torch.autocast(device.type, enabled=False)


def _chunk_gradients(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, grads: list[torch.Tensor | None], rows: slice,
) -> None:
    """Add one chunk's share to grads = [grad_input (N, D), grad_weight (V, D), grad_bias (V,)]."""
    grad_input, grad_weight, grad_bias = grads
    if grad_input is not None:
        torch.mm(g, weight, out=grad_input[rows])
    if grad_weight is not None:
        if grad_weight.dtype == g.dtype:
            grad_weight.addmm_(g.t(), x)
        else:  # 16-bit: fp32 accumulation inside the matmul, fp32 across chunks
            grad_weight.add_(torch.mm(g.t(), x).to(grad_weight.dtype))
    if grad_bias is not None:
        grad_bias.add_(g.sum(0, dtype=grad_bias.dtype))


def _new_gradients(
    plan: _Plan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: tuple[bool, ...]
) -> list[torch.Tensor | None]:
    accumulate = reference.compute_dtype(plan.matmul_dtype)
    return [
        torch.empty_like(x) if needs[0] else None,
        torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if needs[1] else None,
        torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device)
        if needs[2] and bias is not None else None,
    ]


def _finish(
    grads: list[torch.Tensor | None], dtypes: tuple[torch.dtype | None, ...], upstream: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """Scale by the upstream scalar gradient in place (None: already in) and return in the
    parameters' dtypes."""
    out = []
    for grad, dtype in zip(grads, dtypes, strict=True):
        if grad is not None:
            if upstream is not None:
                grad = grad.mul_(upstream.to(grad.dtype))
            grad = grad.to(dtype)
        out.append(grad)
    return tuple(out)


def _matmul_operands(
    plan: _Plan, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    cast = lambda t: None if t is None else t.to(plan.matmul_dtype)  # noqa: E731
    return cast(input), cast(weight), cast(bias)


def _reduce(plan: _Plan, rows_loss: torch.Tensor, denominator: torch.Tensor | None) -> torch.Tensor:
    if plan.reduction == "none":
        return rows_loss
    return rows_loss.sum() if plan.reduction == "sum" else rows_loss.sum() / denominator


def _forward_chunks(
    plan: _Plan, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    class_weight: torch.Tensor | None, denominator: torch.Tensor | None, z_scale: torch.Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor, list[torch.Tensor | None], Any, RowStats | None]:
    """The forward pass over token chunks: (rows_loss (N,), grads, state, stats).

    "mean"/"sum": grads are those of the reduced loss for an upstream gradient of 1 (one scalar,
    so they can be formed here), [grad_input in the matmul dtype, grad_weight and grad_bias in fp32
    (fp64 for fp64)], None where ``needs`` says so; state is None. "none": grads are None and state
    is the backend's RowState of every row, for ``_backward_chunks``.
    """
    backend = plan.chunk_backend
    folded = plan.reduction != "none" and any(needs)
    with _no_autocast(input.device):
        x_all, w, b = _matmul_operands(plan, input, weight, bias)
        grads: list[torch.Tensor | None] = [None, None, None]
        if folded:
            grads = _new_gradients(plan, x_all, w, b, needs)
            cdt = reference.compute_dtype(plan.matmul_dtype)
            factor = (1.0 / denominator.to(cdt) if plan.reduction == "mean"
                      else torch.ones((), dtype=cdt, device=input.device))
        losses, states, stats = [], [], []
        for chunk in plan.chunks(input.shape[0]):
            x, t = x_all[chunk], target[chunk]
            logits = F.linear(x, w, b)
            loss, state, row_stats = backend.forward(logits, t, class_weight, plan.params, plan.with_stats)
            if z_scale is not None:
                loss, state = rescale_z_loss(logits, t, plan.params, loss, state, z_scale)
            losses.append(loss)
            if row_stats is not None:
                stats.append(row_stats)
            if folded:
                g = backend.backward(logits, t, class_weight, plan.params, state, factor.expand(len(t)))
                del logits
                _chunk_gradients(g, x, w, grads, chunk)
            elif plan.reduction == "none":
                states.append(state)
    state = backend.RowState(*map(torch.cat, zip(*states, strict=True))) if states else None
    row_stats = RowStats(*map(torch.cat, zip(*stats, strict=True))) if stats else None
    return torch.cat(losses), grads, state, row_stats


def _backward_chunks(
    plan: _Plan, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    class_weight: torch.Tensor | None, state: Any, grad_rows: torch.Tensor, needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """reduction="none": recompute each chunk's logits and apply the per-row upstream gradient.
    Returns (grad_input, grad_weight, grad_bias) in the parameters' dtypes, None where not needed."""
    backend = plan.chunk_backend
    with _no_autocast(input.device):
        x_all, w, b = _matmul_operands(plan, input, weight, bias)
        grads = _new_gradients(plan, x_all, w, b, needs)
        for chunk in plan.chunks(input.shape[0]):
            x, t = x_all[chunk], target[chunk]
            logits = F.linear(x, w, b)
            chunk_state = backend.RowState(*(field[chunk] for field in state))
            g = backend.backward(logits, t, class_weight, plan.params, chunk_state, grad_rows[chunk])
            del logits
            _chunk_gradients(g, x, w, grads, chunk)
    return _finish(grads, (input.dtype, weight.dtype, None if bias is None else bias.dtype), None)


class _LinearCrossEntropy(torch.autograd.Function):
    """Eager autograd of the fused loss (see the module doc). Its backward scales the gradients
    stored by the forward pass in place, which a custom op's outputs do not allow: compiled code
    calls the ops below instead."""

    @staticmethod
    def forward(ctx, input, weight, bias, target, class_weight, denominator, z_scale, plan, needs):  # type: ignore[override]
        rows_loss, grads, state, stats = _forward_chunks(plan, input, weight, bias, target, class_weight,
                                                         denominator, z_scale, needs)
        ctx.plan, ctx.needs, ctx.folded = plan, needs, plan.reduction != "none"
        ctx.dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)
        if ctx.folded:
            ctx.grads = grads
        elif any(needs):
            ctx.save_for_backward(input, weight, bias, target, class_weight, *state)
        row_stats = tuple(stats or ())
        ctx.mark_non_differentiable(*row_stats)
        return (_reduce(plan, rows_loss, denominator), *row_stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *grad_stats):  # type: ignore[override]
        nothing = (None,) * 6
        if ctx.folded:
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_cross_entropy computes its gradients in the forward pass and hands them "
                    "out once: a second backward through the same loss (retain_graph=True) is not "
                    "supported; call linear_cross_entropy again instead"
                )
            grads, ctx.grads = ctx.grads, None  # scaled in place below, so handed out once
            return (*_finish(grads, ctx.dtypes, grad_loss), *nothing)
        input, weight, bias, target, class_weight, *state = ctx.saved_tensors
        return (*_backward_chunks(ctx.plan, input, weight, bias, target, class_weight, state, grad_loss,
                                  ctx.needs), *nothing)


# --- custom ops: what torch.compile sees -------------------------------------------------------
#
# Dynamo would trace the autograd function above and unroll its chunk loop (and the backend's
# own loop in each chunk): compile time growing with N. Compiled code calls these opaque ops
# instead, one graph node each, with the same chunk loops inside:
#   linear_reduced        "mean"/"sum": (loss, grad_input, grad_weight, grad_bias, *RowStats), the
#                         gradients formed for an upstream gradient of 1 and scaled in backward
#   linear_rows           "none": (rows_loss, *RowState, *RowStats)
#   linear_rows_backward  its gradient (grad_input, grad_weight, grad_bias), logits recomputed
# The schemas end with ``_Plan.op_args``. A gradient not asked for (``needs``), a None bias's, and
# the stats without ``with_stats`` are empty tensors: an op returns a fixed number of tensors.


@custom_op("precision_ce::linear_reduced", mutates_args=())
def linear_reduced(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    class_weight: torch.Tensor | None, denominator: torch.Tensor | None, z_scale: torch.Tensor | None,
    needs: list[bool], backend: str, reduction: str, chunk_rows: int, matmul_dtype: torch.dtype, beta: float,
    k: int, lambda_head: float, lambda_tail: float, positive_reward: str, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float | None, with_stats: bool,
) -> tuple[(torch.Tensor,) * (4 + STATS_FIELDS)]:  # type: ignore[valid-type]
    plan = _Plan.from_op_args(backend, reduction, chunk_rows, matmul_dtype, beta, k, lambda_head, lambda_tail,
                              positive_reward, ignore_index, label_smoothing, z_loss, softcap, with_stats)
    rows_loss, grads, _, stats = _forward_chunks(plan, input, weight, bias, target, class_weight, denominator,
                                                 z_scale, tuple(needs))
    return (_reduce(plan, rows_loss, denominator), *(input.new_empty(0) if g is None else g for g in grads),
            *(stats or _no_stats(input)))


@linear_reduced.register_fake
def _linear_reduced_fake(input, weight, bias, target, class_weight, denominator, z_scale, needs, backend,
                         reduction, chunk_rows, matmul_dtype, *params_and_stats):
    accumulate = reference.compute_dtype(matmul_dtype)
    sized = lambda needed, shape, dtype: input.new_empty(shape if needed else (0,), dtype=dtype)  # noqa: E731
    return (input.new_empty((), dtype=accumulate),
            sized(needs[0], input.shape, matmul_dtype),
            sized(needs[1], weight.shape, accumulate),
            sized(needs[2] and bias is not None, weight.shape[:1], accumulate),
            *_stats_fake(input, params_and_stats[-1]))


@custom_op("precision_ce::linear_rows", mutates_args=())
def linear_rows(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    class_weight: torch.Tensor | None, backend: str, reduction: str, chunk_rows: int, matmul_dtype: torch.dtype,
    beta: float, k: int, lambda_head: float, lambda_tail: float, positive_reward: str, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float | None, with_stats: bool,
) -> LossOutputs:
    plan = _Plan.from_op_args(backend, reduction, chunk_rows, matmul_dtype, beta, k, lambda_head, lambda_tail,
                              positive_reward, ignore_index, label_smoothing, z_loss, softcap, with_stats)
    rows_loss, _, state, stats = _forward_chunks(plan, input, weight, bias, target, class_weight, None, None,
                                                 (False,) * 3)
    return (rows_loss, *state, *(stats or _no_stats(input)))


@linear_rows.register_fake
def _linear_rows_fake(input, weight, bias, target, class_weight, backend, reduction, chunk_rows, matmul_dtype,
                      *params_and_stats):
    rows, cdt = input.shape[0], reference.compute_dtype(matmul_dtype)
    # The backends' RowState dtypes (reference.forward, triton_backend.forward).
    state_dtypes = ((torch.float32,) * 6 + (torch.int64, torch.int32) if backend == "triton"
                    else (cdt,) * 7 + (torch.long,))
    return (input.new_empty(rows, dtype=cdt), *(input.new_empty(rows, dtype=d) for d in state_dtypes),
            *_stats_fake(input, params_and_stats[-1]))


@custom_op("precision_ce::linear_rows_backward", mutates_args=())
def linear_rows_backward(
    grad_rows: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    target: torch.Tensor, class_weight: torch.Tensor | None, state: list[torch.Tensor], needs: list[bool],
    backend: str, reduction: str, chunk_rows: int, matmul_dtype: torch.dtype, beta: float, k: int,
    lambda_head: float, lambda_tail: float, positive_reward: str, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: float | None, with_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _Plan.from_op_args(backend, reduction, chunk_rows, matmul_dtype, beta, k, lambda_head, lambda_tail,
                              positive_reward, ignore_index, label_smoothing, z_loss, softcap, with_stats)
    grads = _backward_chunks(plan, input, weight, bias, target, class_weight, state, grad_rows, tuple(needs))
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


def _op_outputs(
    plan: _Plan, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    class_weight: torch.Tensor | None, denominator: torch.Tensor | None, z_scale: torch.Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor, ...]:
    """(loss, *RowStats) through the ops, as ``_LinearCrossEntropy.apply`` gives them eagerly."""
    if plan.backend in ("torch", "torch_ce"):
        # Compiled chunks, as ops.loss_rows runs in compiled code. Not torch_ce: an op's body runs
        # below autograd, where its backward (autograd of F.cross_entropy) cannot record a graph.
        plan = dataclasses.replace(plan, backend="torch_fused")
    if plan.reduction == "none":
        outputs = linear_rows(input, weight, bias, target, class_weight, *plan.op_args())
        return (outputs[0], *outputs[1 + STATE_FIELDS:])
    outputs = linear_reduced(input, weight, bias, target, class_weight, denominator, z_scale, list(needs),
                             *plan.op_args())
    return (outputs[0], *outputs[4:])


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
    return_stats: bool = False,
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
    plan = _Plan(params, chosen, reduction,
                 chunk_size or auto_chunk_rows(rows, vocab, hidden, torch.finfo(matmul_dtype).bits // 8),
                 matmul_dtype, return_stats)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and input.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    arguments = (x, weight, bias, rows_target, class_weight, denominator, z_scale)
    if torch.compiler.is_compiling():
        outputs = _op_outputs(plan, *arguments, needs)
    elif any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (input, weight, bias)):
        raise NotImplementedError(
            "linear_cross_entropy does not run under torch.func transforms (grad, vmap, ...): its "
            "gradients are formed in the forward pass; use precision_ce.cross_entropy(F.linear(...)) there"
        )
    else:
        outputs = _LinearCrossEntropy.apply(*arguments, plan, needs)
    loss = outputs[0].to(result_dtype(logits_like))
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if not return_stats:
        return loss
    return loss, RowStats(*(s.reshape(target.shape) for s in outputs[1:]))


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
