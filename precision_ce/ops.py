"""The loss as PyTorch custom operators: what torch.compile, autograd and torch.func see.

Each backend is one pair of ops in the ``precision_ce`` namespace:

    precision_ce::<backend>_forward(logits, target, weight?, z_scale?, <params>, with_stats)
        -> (loss, *RowState, *RowStats)          per row: loss, 8 state fields, 4 stats
    precision_ce::<backend>_backward(grad_rows, logits, target, weight?, state, <params>)
        -> grad_logits                           (rows, V), like ``logits``

``torch`` is a ``torch.library.custom_op`` around ``precision_ce.reference``, run eagerly;
``torch_fused`` the same with each row chunk compiled once by Inductor, which is what a
torch.compile'd graph calls (``loss_rows``). Both are opaque to Dynamo, so the row-chunk loop is
never unrolled; their fake implementation gives the output shapes. ``triton`` is a
``torch.library.triton_op`` whose body launches the
kernels through ``wrap_triton``: Inductor sees the kernels and schedules them in its graph, and
the same body, run on fake tensors, is the fake implementation.

Autograd (``register_autograd``, shared by both pairs): the forward op saves the logits, targets
and the small per-row ``RowState``; the backward op recomputes the gradient, as the backends
always did. Nothing of size (rows, V) is saved. The loss is a surrogate whose weights are
stop-gradient constants (spec section 3); its second derivative is not implemented, so a second
backward through the backward op raises ``DoubleBackwardError`` instead of returning a wrong
number. ``vmap`` runs the ops once per batch entry (``register_vmap``).

Op schemas take scalars, not dataclasses: ``LossParams`` is flattened by ``params_args`` and
rebuilt by ``params_from``. Another op pair over the same logits-shaped loss registers the same
way: a forward op returning (loss, *RowState, *RowStats), a backward op, and
``register_loss_autograd(forward_op, backward_op, passed=...)``, which returns the differentiable
forward (see its docstring for the argument order it expects). The fused linear + loss
(``precision_ce.linear``) has ops of its own: its "mean"/"sum" op forms the gradients in the
forward pass, which this contract does not describe.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch.library import custom_op, register_autograd, register_vmap, triton_op

from . import reference
from .config import LossParams, RewardConfig
from .reference import RowStats

try:
    from . import triton_backend
except ImportError:  # no triton: the torch ops alone
    triton_backend = None

STATE_FIELDS = len(reference.RowState._fields)
STATS_FIELDS = len(RowStats._fields)
PARAMS_COUNT = 9
"""How many scalar arguments ``params_args`` gives; every op schema ends with them (then ``with_stats``)."""
LossOutputs = tuple[(torch.Tensor,) * (1 + STATE_FIELDS + STATS_FIELDS)]  # type: ignore[misc]
"""A forward op's outputs: loss, the RowState fields, the RowStats fields (empty without stats)."""


class DoubleBackwardError(RuntimeError):
    """A second derivative was asked for; the loss provides first derivatives only."""


SECOND_DERIVATIVE = (
    "a second derivative (a backward through a gradient taken with create_graph=True, or nested "
    "torch.func.grad) is not implemented; the loss's weights are stop-gradient constants and it "
    "provides first derivatives only"
)


def no_double_backward(op_name: str) -> Callable[..., None]:
    """An autograd formula for a backward op: raises ``DoubleBackwardError`` naming ``op_name``."""

    def refuse(ctx: Any, *grads: torch.Tensor) -> None:
        raise DoubleBackwardError(f"{op_name}: {SECOND_DERIVATIVE}")

    return refuse


def params_args(params: LossParams) -> tuple[float, int, float, float, str, int, float, float, float | None]:
    """``LossParams`` as the op schemas' scalar arguments (in the order of the schemas)."""
    reward = params.reward
    return (reward.beta, reward.k, reward.lambda_head, reward.lambda_tail, reward.positive_reward,
            params.ignore_index, params.label_smoothing, params.z_loss, params.softcap)


def params_from(beta: float, k: int, lambda_head: float, lambda_tail: float, positive_reward: str,
                ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None) -> LossParams:
    """The inverse of ``params_args`` (values were validated by the public API)."""
    reward = RewardConfig(beta, k, lambda_head, lambda_tail, positive_reward)  # type: ignore[arg-type]
    return LossParams(reward, ignore_index, label_smoothing, z_loss, softcap)


def rescale_z_loss(
    logits: torch.Tensor, target: torch.Tensor, params: LossParams, loss: torch.Tensor, state: Any,
    z_scale: torch.Tensor,
) -> tuple[torch.Tensor, Any]:
    """Multiply each row's z-loss term zeta lse**2, and its gradient 2 zeta lse pi, by ``z_scale``.

    The class-weighted mean divides the row losses by sum_r c_{y_r}, but the z-loss is a plain mean
    over positions (spec section 3): with z_scale = sum_r c_{y_r} / #rows it is. Only per-row
    numbers change: the loss, ``coef`` (holds 2 zeta lse for every pi_j) and ``grad_target``
    (holds pi_y 2 zeta lse), so both backends' backward passes stay as they are.
    """
    valid = target != params.ignore_index
    lse = state.row_max + state.log_sum_exp
    extra = (z_scale.to(lse.dtype) - 1.0) * params.z_loss
    x_y = logits.gather(1, torch.where(valid, target, 0).clamp(0, logits.shape[1] - 1)[:, None])[:, 0].to(lse.dtype)
    pi_y = ((reference.apply_softcap(x_y, params.softcap) - state.row_max) - state.log_sum_exp).exp()
    z_grad = torch.where(valid, 2.0 * extra * lse, 0.0)
    loss = loss + torch.where(valid, extra * lse.square(), 0.0)
    return loss, state._replace(coef=state.coef + z_grad, grad_target=state.grad_target + pi_y * z_grad)


def _run_forward(
    backend_forward: Callable[..., Any], logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
    z_scale: torch.Tensor | None, params: LossParams, with_stats: int,
) -> tuple[torch.Tensor, ...]:
    loss, state, stats = backend_forward(logits, target, weight, params, with_stats)
    if z_scale is not None:
        loss, state = rescale_z_loss(logits, target, params, loss, state, z_scale)
    if stats is None:  # a fixed output count; empty stats cost nothing
        stats = RowStats(*(logits.new_empty(0, dtype=torch.float32) for _ in range(STATS_FIELDS)))
    return (loss, *state, *stats)


# --- torch backend: opaque custom ops ---------------------------------------------------------


def check_target_range(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """ValueError naming the first class index outside [0, classes) that is not ``ignore_index``.

    Data-dependent (a host sync on CUDA): called in eager code and inside the opaque torch op,
    never where Dynamo traces (see ``precision_ce.api`` for the in-graph check).
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bad.any():
        value = target[bad][0].item()
        raise ValueError(
            f"target holds class index {value}, outside [0, {classes}); use class indices in "
            f"range or ignore_index={ignore_index} for positions without a target"
        )


def _torch_ops(name: str, fused: bool) -> tuple[Any, Any]:
    """The torch backend's op pair; ``fused`` runs each row chunk through Inductor."""

    @custom_op(f"precision_ce::{name}_forward", mutates_args=())
    def forward(
        logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, z_scale: torch.Tensor | None,
        beta: float, k: int, lambda_head: float, lambda_tail: float, positive_reward: str, ignore_index: int,
        label_smoothing: float, z_loss: float, softcap: float | None, with_stats: int,
    ) -> LossOutputs:
        params = params_from(beta, k, lambda_head, lambda_tail, positive_reward, ignore_index, label_smoothing,
                             z_loss, softcap)
        # The op runs eagerly even inside a compiled graph, so the clear error holds there too.
        check_target_range(target, logits.shape[1], ignore_index)
        run = functools.partial(reference.forward, fused=fused)
        return _run_forward(run, logits, target, weight, z_scale, params, with_stats)

    @custom_op(f"precision_ce::{name}_backward", mutates_args=())
    def backward(
        grad_rows: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
        state: list[torch.Tensor], beta: float, k: int, lambda_head: float, lambda_tail: float,
        positive_reward: str, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
    ) -> torch.Tensor:
        params = params_from(beta, k, lambda_head, lambda_tail, positive_reward, ignore_index, label_smoothing,
                             z_loss, softcap)
        return reference.backward(logits, target, weight, params, reference.RowState(*state), grad_rows, fused)

    forward.register_fake(_torch_forward_fake)
    backward.register_fake(_torch_backward_fake)
    return forward, backward


def row_state_dtypes(backend: str, compute: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes of a backend's ``RowState`` fields, as its ``forward`` allocates them (for fake
    implementations): the compute dtype and int64 (torch), or fp32 and int32 (triton)."""
    if backend == "triton":
        return (torch.float32,) * 6 + (torch.int32, torch.int32)
    return (compute,) * (STATE_FIELDS - 1) + (torch.long,)


def _torch_forward_fake(logits, target, weight, z_scale, beta, k, lambda_head, lambda_tail, positive_reward,
                        ignore_index, label_smoothing, z_loss, softcap, with_stats):
    rows = logits.shape[0]
    compute = reference.compute_dtype(logits.dtype)
    row = lambda dtype: logits.new_empty(rows, dtype=dtype)  # noqa: E731
    state = [row(dtype) for dtype in row_state_dtypes("torch", compute)]
    stats = [logits.new_empty(rows if with_stats else 0, dtype=torch.float32) for _ in range(STATS_FIELDS)]
    return (row(compute), *state, *stats)


def _torch_backward_fake(grad_rows, logits, target, weight, state, *params):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


torch_forward, torch_backward = _torch_ops("torch", fused=False)
"""The torch backend (``reference.forward`` / ``reference.backward``) run eagerly: opaque to Dynamo."""
torch_fused_forward, torch_fused_backward = _torch_ops("torch_fused", fused=True)
"""The same with each row chunk compiled by Inductor: what a torch.compile'd graph calls."""


# --- Triton backend: ops whose kernels Inductor sees ------------------------------------------

if triton_backend is not None:

    @triton_op("precision_ce::triton_forward", mutates_args=())
    def triton_forward(
        logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, z_scale: torch.Tensor | None,
        beta: float, k: int, lambda_head: float, lambda_tail: float, positive_reward: str, ignore_index: int,
        label_smoothing: float, z_loss: float, softcap: float | None, with_stats: int,
    ) -> LossOutputs:
        """Per-row loss, RowState and RowStats of the Triton kernels; a target outside [0, V) that
        is not ignore_index gives its row a NaN loss and gradient (no host check here)."""
        params = params_from(beta, k, lambda_head, lambda_tail, positive_reward, ignore_index, label_smoothing,
                             z_loss, softcap)
        return _run_forward(triton_backend.forward, logits, target, weight, z_scale, params, with_stats)

    @triton_op("precision_ce::triton_backward", mutates_args=())
    def triton_backward(
        grad_rows: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
        state: list[torch.Tensor], beta: float, k: int, lambda_head: float, lambda_tail: float,
        positive_reward: str, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
    ) -> torch.Tensor:
        """d(sum_r grad_rows[r] loss[r]) / d logits of the Triton kernels, in the logits' dtype."""
        params = params_from(beta, k, lambda_head, lambda_tail, positive_reward, ignore_index, label_smoothing,
                             z_loss, softcap)
        return triton_backend.backward(logits, target, weight, params, triton_backend.RowState(*state), grad_rows)


# --- autograd and vmap, shared by every (forward, backward) pair ------------------------------


def register_loss_autograd(
    forward_op: Any, backward_op: Any, passed: int,
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """Autograd and vmap of a loss op pair whose forward returns (loss, *RowState, *RowStats).

    The forward op's first ``passed`` inputs are tensors that the backward op takes, in order,
    after ``grad_rows``; the first of them, the logits, gets the gradient that the backward op
    returns. The forward op's last inputs are the ``params_args`` scalars and ``with_stats``,
    which the backward op takes after the state (without ``with_stats``).

    Returns the function to call: the forward op, or under torch.func transforms the same formula
    as an ``autograd.Function`` (custom ops' own autograd does not compose with functorch in
    torch 2.13; a Function with ``setup_context`` does).
    """

    def save(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        ctx.save_for_backward(*inputs[:passed], *output[1:1 + STATE_FIELDS])
        ctx.params = inputs[-1 - PARAMS_COUNT:-1]
        ctx.input_count = len(inputs)
        ctx.mark_non_differentiable(*output[1:])

    def differentiate(ctx: Any, grad_loss: torch.Tensor, *unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        grad = call_backward(grad_loss, *saved[:passed], list(saved[passed:]), *ctx.params)
        return (grad, *(None for _ in range(ctx.input_count - 1)))

    refuse = no_double_backward(backward_op._qualname)
    register_autograd(forward_op, differentiate, setup_context=save)
    register_autograd(backward_op, refuse)
    _register_loop_vmap(forward_op)
    _register_loop_vmap(backward_op)
    forward_function = _functorch_function(forward_op, save, differentiate)
    backward_function = _functorch_function(backward_op, lambda ctx, inputs, output: None, refuse)

    def call_backward(*args: Any) -> Any:
        return _call(backward_op, backward_function, args)

    return lambda *args: _call(forward_op, forward_function, args)


def _functorch_function(op: Any, save: Callable[..., None], differentiate: Callable[..., Any]) -> type:
    """``op`` with the given autograd formula as an ``autograd.Function`` (for torch.func)."""

    class Function(torch.autograd.Function):
        generate_vmap_rule = True  # through the op's own vmap rule

        @staticmethod
        def forward(*args: Any) -> Any:  # type: ignore[override]
            return op(*args)

        setup_context = staticmethod(save)  # type: ignore[assignment]
        backward = staticmethod(differentiate)  # type: ignore[assignment]

    Function.__name__ = Function.__qualname__ = f"{op._name}_function"
    return Function


def under_torch_func(*values: Any) -> bool:
    """Whether a torch.func transform (grad, vmap, ...) wraps any of the tensors among ``values``
    (a Python query: call it in eager code only, Dynamo cannot trace it)."""
    return any(isinstance(v, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(v) for v in values)


def _call(op: Any, function: type, args: tuple[Any, ...]) -> Any:
    """The op, or its ``autograd.Function`` twin when a torch.func transform wraps an argument."""
    if not torch.compiler.is_compiling() and under_torch_func(*args):
        return function.apply(*args)
    return op(*args)


def _register_loop_vmap(op: Any) -> None:
    """vmap by running the op once per batch entry (rows are independent; the batch is a loop)."""

    def vmap_rule(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Any, Any]:
        size = info.batch_size

        def select(arg: Any, dim: Any, index: int) -> Any:
            if dim is None:
                return arg
            if isinstance(arg, (list, tuple)):
                return [a if d is None else a.select(d, index) for a, d in zip(arg, dim, strict=True)]
            return arg.select(dim, index)

        results = [op(*(select(a, d, i) for a, d in zip(args, in_dims, strict=True))) for i in range(size)]
        if isinstance(results[0], torch.Tensor):
            return torch.stack(results), 0
        stacked = tuple(torch.stack(parts) for parts in zip(*results, strict=True))
        return stacked, tuple(0 for _ in stacked)

    register_vmap(op, vmap_rule)


FORWARD: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    "torch": register_loss_autograd(torch_forward, torch_backward, passed=3),
    "torch_fused": register_loss_autograd(torch_fused_forward, torch_fused_backward, passed=3),
}
"""Per backend, the differentiable forward: (logits, target, weight, z_scale, *params_args, with_stats)."""
if triton_backend is not None:
    FORWARD["triton"] = register_loss_autograd(triton_forward, triton_backward, passed=3)


class _InPlaceBackward(torch.autograd.Function):
    """The loss whose backward pass writes the gradient over the logits (``inplace_backward=True``).

    Eager only. The logits are saved as any input; the backward pass unpacks them (autograd's
    version check: it raises if they were modified since the forward pass), writes the gradient
    into their buffer, bumps their version counter and returns that buffer as their gradient. Any
    other node that saved the logits and runs later, and a second backward through this one, then
    raise autograd's "modified by an inplace operation" error instead of reading the gradient as
    logits.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,  # type: ignore[override]
                z_scale: torch.Tensor | None, backend: Any, params: LossParams,
                with_stats: int) -> tuple[torch.Tensor, ...]:
        outputs = _run_forward(backend.forward, logits, target, weight, z_scale, params, with_stats)
        ctx.save_for_backward(logits, target, weight, *outputs[1:1 + STATE_FIELDS])
        ctx.backend, ctx.params = backend, params
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor, *unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, target, weight, *state = ctx.saved_tensors
        grad = ctx.backend.backward(logits, target, weight, ctx.params, ctx.backend.RowState(*state), grad_loss,
                                    in_place=True)
        torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None


def backend_module(backend: str) -> ModuleType:
    """The module of a chosen backend ("torch" or "triton"): ``reference`` or ``triton_backend``."""
    return reference if backend == "torch" else triton_backend


def loss_rows(
    backend: str, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
    z_scale: torch.Tensor | None, params: LossParams, with_stats: int, inplace_backward: bool = False,
) -> tuple[torch.Tensor, RowStats | None]:
    """Per-row loss (rows,) in the compute dtype and, with ``with_stats`` (a stats level,
    ``reference.STATS`` or ``FULL_STATS``), the fp32 RowStats.

    logits (rows, V); target (rows,) int64; weight (V,) or None; z_scale a 0-d tensor or None.
    Differentiable in ``logits``; ``inplace_backward``: the backward pass overwrites the logits with
    their gradient (``_InPlaceBackward``; eager only).
    """
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        if torch.compiler.is_compiling() or under_torch_func(logits):
            raise NotImplementedError(
                "inplace_backward=True runs eagerly only (its backward pass writes into a saved input); "
                "drop it under torch.compile and torch.func transforms"
            )
        outputs = _InPlaceBackward.apply(logits, target, weight, z_scale, backend_module(backend), params,
                                         with_stats)
        return outputs[0], (RowStats(*outputs[1 + STATE_FIELDS:]) if with_stats else None)
    if backend == "torch" and torch.compiler.is_compiling():
        backend = "torch_fused"  # fused chunks, compiled once, instead of eager ones in compiled code
    outputs = FORWARD[backend](logits, target, weight, z_scale, *params_args(params), with_stats)
    stats = RowStats(*outputs[1 + STATE_FIELDS:]) if with_stats else None
    return outputs[0], stats
