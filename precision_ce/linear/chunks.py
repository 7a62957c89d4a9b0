"""The fused linear + loss's token chunks: the plan, the forward and backward loops over chunks, and
the eager autograd function (see ``precision_ce.linear`` for the algorithm)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F

from .. import reference
from ..api import _reduce_rows, _torch_cross_entropy
from ..config import LossParams
from ..ops import params_args, params_from, rescale_z_loss, triton_backend
from ..reference import RowStats

CHUNK_ROWS_PER_INPUT_ROW = 4.0
"""``auto_chunk_rows``: a chunk holds this many times N D / V rows, so that its logits take 4x the
input's (N, D) bytes.

Measured on CPU against torch 2.13's chunked ``F.linear_cross_entropy`` (docs/linear.md): time
falls as chunks grow (each chunk's three GEMMs have only ``chunk`` rows, and each re-reads the
(V, D) weight and its gradient's accumulator), flat from ~128-256 rows at D = 256; memory grows by
one chunk of logits. 4 N D / V rows is 4-8x torch's own chunk (``aspect_ratio:2``), which holds
about nine chunk-sized buffers: near the time of large chunks at less than torch's peak."""
CPU_16_BIT_CHUNK_ROWS_PER_INPUT_ROW = 16.0
"""The same for 16-bit logits on CPU: each bf16 GEMM call costs far more there (measured: 64-row
chunks 1.66x torch's time, 512-row ones 0.58x), so chunks are 4x longer."""
MIN_CHUNK_ROWS = 16
"""... and at least this many rows (a tensor-core tile), when N allows."""
ACCUMULATOR_BYTES_PER_WEIGHT = 4
"""... and at most as many rows as keep the chunk's logits within the fp32 weight-gradient
accumulator's 4 V D bytes (D rows of fp32 logits, 2 D of 16-bit ones): past a few hundred rows a
longer chunk buys no time (measured at 16384 x 256 x 32000, fp32, one thread, fwd+bwd: 128, 256
and 512 rows take 10.1, 9.6 and 10.1 s, torch's chunked path 10.1 s) but costs memory (512 rows:
1.16x torch's peak, benchmarks/results/cpu_linear_torch/fp32_large), so the extra memory stays
below 2 V D + N D elements + a chunk's temporaries however large N grows."""

FUSED_MIN_LOGITS = 1 << 25
"""From this many fp32 logits (N V) up, ``backend="auto"`` on the CPU runs the presets other than
plain cross-entropy through ``"torch_fused"`` (each chunk's arithmetic compiled once by Inductor, as
in a torch.compile'd graph) instead of the eager torch backend. Measured (tail_penalty, a 512 x 32000
chunk, fwd + bwd of the loss, one thread): fp32 eager 480 ms, fused 104 ms, the in-place
cross-entropy 23 ms, the chunk's three GEMMs 297 ms. So fused saves ~23 ns per logit, ~0.8 s per
call at this size; its first call in a process compiles, 21 s with a cold Inductor cache and 5 s
with a warm one, paid back within ~25 (~7) calls. Below it, eager. Not for 16-bit logits: Inductor's
CPU code is slower than eager there (bf16: fused 547 ms, eager 286 ms)."""


def auto_chunk_rows(rows: int, vocab: int, hidden: int, element_size: int, device_type: str = "cuda") -> int:
    """Rows per chunk: ``CHUNK_ROWS_PER_INPUT_ROW`` N D / V (``CPU_16_BIT_...`` for 16-bit logits on
    CPU), at most 4 D / element_size (``ACCUMULATOR_BYTES_PER_WEIGHT``), at least ``MIN_CHUNK_ROWS``,
    at most N; a multiple of 16 (tensor-core tiles) when more than 16.

    The extra memory then grows like the input's (N D), not like the logits' (N V), and never past
    the weight gradient's: for V = 32000 and D = 256 a chunk holds ~1/31 of the rows, at most 256.
    """
    factor = CPU_16_BIT_CHUNK_ROWS_PER_INPUT_ROW if device_type == "cpu" and element_size == 2 \
        else CHUNK_ROWS_PER_INPUT_ROW
    chunk = int(factor * rows * hidden // max(vocab, 1))
    chunk = min(chunk, ACCUMULATOR_BYTES_PER_WEIGHT * hidden // element_size)
    chunk = max(MIN_CHUNK_ROWS, chunk - chunk % 16)
    return max(1, min(rows, chunk))


class _TorchCrossEntropy:
    """torch's own cross-entropy per chunk, with the backends' forward/backward contract: what
    ``cross_entropy`` runs at the plain setting (fp32/fp64, torch backend, no stats), bit for bit
    F.cross_entropy's per-row loss and gradient. It keeps no per-row state."""

    RowState = tuple

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, params: LossParams,
                with_stats: int) -> tuple[torch.Tensor, tuple[()], None]:
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


class _InPlaceCrossEntropy:
    """Cross-entropy of a chunk whose logits buffer belongs to the chunk loop: the loss and its
    gradient formed in that buffer, in place, with no chunk-sized temporary (``F.cross_entropy``'s
    forward and autograd backward hold three: log-softmax, its gradient, the logits' gradient).

    With z = the row's logits, y its target, c the class weights (1 without), C = sum_a c_a,
    eps the label smoothing and lse = log sum_a exp z_a (p = softmax z):

        loss  = (1 - eps) c_y (lse - z_y) + eps / V (C lse - sum_a c_a z_a)
        dloss/dz_a = ((1 - eps) c_y + eps C / V) p_a - (1 - eps) c_y [a = y] - eps / V c_a

    (torch's cross-entropy with class weights and label smoothing, row by row; ignored rows give 0
    and a zero gradient). 16-bit logits are computed in a fp32 copy. The gradient comes back in
    the compute dtype (fp32 for 16-bit logits): ``_chunk_gradients`` rounds it for the input's
    gradient and keeps it exact for the weight's."""

    @staticmethod
    def loss_and_gradient(
        logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, params: LossParams,
        factor: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss (rows,), factor[:, None] * dloss/dlogits in ``logits``' storage or a fp32 copy);
        ``factor`` (rows,) or None for the loss alone."""
        z = logits if logits.dtype == reference.compute_dtype(logits.dtype) else logits.float()
        vocab = z.shape[1]
        eps = params.label_smoothing
        valid = target != params.ignore_index
        safe = torch.where(valid, target, 0)[:, None]
        z_y = z.gather(1, safe)[:, 0]
        c = None if weight is None else weight.to(z.dtype)
        smooth = (z.sum(1) if c is None else z @ c) if eps else None
        shift = z.amax(1, keepdim=True)
        z.sub_(shift).exp_()
        total = z.sum(1, keepdim=True)
        lse = (total.log() + shift)[:, 0]
        c_y = torch.ones_like(lse) if c is None else c[safe[:, 0]]
        c_sum = float(vocab) if c is None else c.sum()
        loss = (1 - eps) * c_y * (lse - z_y)
        if eps:
            loss = loss + eps / vocab * (c_sum * lse - smooth)
        loss = torch.where(valid, loss, 0.0)
        if factor is None:
            return loss, None
        scale = torch.where(valid, factor.to(z.dtype), 0.0)
        z.mul_((scale * ((1 - eps) * c_y + eps / vocab * c_sum))[:, None] / total)  # p, scaled
        if eps:
            if c is None:
                z.sub_((scale * (eps / vocab))[:, None])
            else:
                z.addr_(scale, c, alpha=-eps / vocab)
        z.scatter_add_(1, safe, (-(1 - eps) * scale * c_y)[:, None])
        return loss, z

    # The backends' contract, for reduction="none" (no per-row state: the backward recomputes).
    RowState = tuple

    @classmethod
    def forward(cls, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, params: LossParams,
                with_stats: int) -> tuple[torch.Tensor, tuple[()], None]:
        return cls.loss_and_gradient(logits, target, weight, params, None)[0], (), None

    @classmethod
    def backward(cls, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, params: LossParams,
                 state: Any, grad_rows: torch.Tensor) -> torch.Tensor:
        return cls.loss_and_gradient(logits, target, weight, params, grad_rows)[1]  # type: ignore[return-value]


class _FusedReference:
    """The torch backend with each row chunk compiled once by Inductor (``reference.fused_rows``):
    what the linear ops run inside a torch.compile'd graph, as ``ops.loss_rows`` does."""

    RowState = reference.RowState
    forward = staticmethod(functools.partial(reference.forward, fused=True))
    backward = staticmethod(functools.partial(reference.backward, fused=True))


CHUNK_BACKENDS: dict[str, Any] = {
    "torch": reference, "torch_fused": _FusedReference, "torch_ce": _TorchCrossEntropy,
    "torch_ce_inplace": _InPlaceCrossEntropy, "triton": triton_backend,
}
"""What runs the loss on a chunk's logits: a module or class with the backends' ``forward`` /
``backward`` / ``RowState``, or with ``loss_and_gradient`` (the chunk's loss and gradient at once,
in the chunk's own buffer). The linear ops take the key."""

IN_PLACE_BACKWARD = frozenset({"torch", "triton"})
"""Chunk backends whose ``backward`` writes the gradient over the logits (``in_place=True``). The
chunk loop owns each chunk's logits and reads them no more after the gradient, so their buffer
takes it: no second (chunk, V) buffer, and no traffic beyond the backward's one read and one write
of the chunk (``Plan.chunk_gradient``)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything but the tensors: what the chunk loops, the autograd function and the ops need."""

    params: LossParams
    backend: str  # a key of CHUNK_BACKENDS
    reduction: str
    chunk_rows: int
    matmul_dtype: torch.dtype  # the logits' dtype: the input's, or autocast's
    with_stats: int
    acc_dtype: torch.dtype  # the weight and bias gradients' accumulators: fp32 (fp64), or 16-bit
    allow_retain_graph: bool = False  # "mean"/"sum": backward copies the stored gradients, not scales them

    @property
    def chunk_backend(self) -> Any:
        return CHUNK_BACKENDS[self.backend]

    def chunk_gradient(self, logits: torch.Tensor, target: torch.Tensor, class_weight: torch.Tensor | None,
                       state: Any, factor: torch.Tensor) -> torch.Tensor:
        """factor[:, None] * dloss/dlogits (chunk, V) of a chunk's logits, which it may overwrite."""
        in_place = {"in_place": True} if self.backend in IN_PLACE_BACKWARD else {}
        return self.chunk_backend.backward(logits, target, class_weight, self.params, state, factor, **in_place)

    def chunks(self, rows: int) -> list[slice]:
        # At least one (empty) chunk: zero rows still give empty losses, state and stats of the right dtypes.
        return [slice(start, min(start + self.chunk_rows, rows)) for start in range(0, max(rows, 1), self.chunk_rows)]

    def op_args(self) -> tuple[Any, ...]:
        """The op schemas' scalar arguments, in order: backend, reduction, chunk_rows, matmul_dtype,
        acc_dtype, then ``ops.params_args`` and ``with_stats``."""
        return (self.backend, self.reduction, self.chunk_rows, self.matmul_dtype, self.acc_dtype,
                *params_args(self.params), self.with_stats)

    @classmethod
    def from_op_args(cls, backend: str, reduction: str, chunk_rows: int, matmul_dtype: torch.dtype,
                     acc_dtype: torch.dtype, *params_and_stats: Any) -> Plan:
        return cls(params_from(*params_and_stats[:-1]), backend, reduction, chunk_rows, matmul_dtype,
                   params_and_stats[-1], acc_dtype)


def _no_autocast(device: torch.device) -> Any:
    # The matmuls run in plan.matmul_dtype, chosen once; autocast must not re-cast them per call.
    return torch.autocast(device.type, enabled=False)


def _chunk_gradients(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, grads: list[torch.Tensor | None], rows: slice,
) -> None:
    """Add one chunk's share to grads = [grad_input (N, D), grad_weight (V, D), grad_bias (V,)].

    g (chunk, V) is the chunk's logits gradient in the logits' dtype or in fp32 (the in-place
    cross-entropy's, for 16-bit logits); x (chunk, D) and weight (V, D) in the matmul dtype."""
    grad_input, grad_weight, grad_bias = grads
    if grad_input is not None:
        torch.mm(g.to(weight.dtype), weight, out=grad_input[rows])
    if grad_weight is not None:
        accumulate_product(grad_weight, g, x)
    if grad_bias is not None:
        grad_bias.add_(g.sum(0, dtype=grad_bias.dtype))


def accumulate_product(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """acc (V, D) += g^T x, the chunk's product never rounded to a dtype below ``acc``'s.

    Same dtypes: one in-place GEMM. 16-bit operands into a fp32 accumulator: on CUDA one GEMM with
    a fp32 epilogue that reads and writes ``acc`` (``out_dtype``, cuBLAS's mixed precision); the
    CPU has no such GEMM, so the chunk's operands (chunk-sized) are taken to fp32 instead. An
    accumulator in the parameter's 16-bit dtype (``acc_dtype``) is rounded once per chunk."""
    if g.dtype == acc.dtype and x.dtype == acc.dtype:
        acc.addmm_(g.t(), x)
    elif acc.is_cuda and g.dtype == x.dtype and acc.dtype == torch.float32:
        torch.addmm(acc, g.t(), x, out_dtype=acc.dtype, out=acc)
    elif acc.itemsize >= max(g.itemsize, x.itemsize):
        acc.addmm_(g.t().to(acc.dtype), x.to(acc.dtype))
    else:  # fp32 gradient of 16-bit logits into a 16-bit accumulator: one rounding of g, as F.linear's
        acc.addmm_(g.t().to(acc.dtype), x)


def _new_gradients(
    plan: Plan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: tuple[bool, ...]
) -> list[torch.Tensor | None]:
    return [
        torch.empty_like(x) if needs[0] else None,
        torch.zeros(weight.shape, dtype=plan.acc_dtype, device=weight.device) if needs[1] else None,
        torch.zeros(weight.shape[0], dtype=plan.acc_dtype, device=weight.device)
        if needs[2] and bias is not None else None,
    ]


def _finish(
    grads: list[torch.Tensor | None], dtypes: tuple[torch.dtype | None, ...], upstream: torch.Tensor | None,
    in_place: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Scale by the upstream scalar gradient (None: already in), in place unless ``in_place`` is
    False (the stored gradients kept for another backward), and return in the parameters' dtypes."""
    out = []
    for grad, dtype in zip(grads, dtypes, strict=True):
        if grad is not None:
            if upstream is not None:
                scale = upstream.to(grad.dtype)
                grad = grad.mul_(scale) if in_place else grad * scale
            grad = grad.to(dtype)
        out.append(grad)
    return tuple(out)


def _matmul_operands(
    plan: Plan, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    cast = lambda t: None if t is None else t.to(plan.matmul_dtype)  # noqa: E731
    return cast(input), cast(weight), cast(bias)


def forward_chunks(
    plan: Plan, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    class_weight: torch.Tensor | None, denominator: torch.Tensor | None, z_scale: torch.Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor, list[torch.Tensor | None], Any, RowStats | None]:
    """The forward pass over token chunks: (rows_loss (N,), grads, state, stats).

    "mean"/"sum": grads are those of the reduced loss for an upstream gradient of 1 (one scalar,
    so they can be formed here), [grad_input in the matmul dtype, grad_weight and grad_bias in fp32
    (fp64 for fp64)], None where ``needs`` says so; state is None. "none": grads are None and state
    is the backend's RowState of every row, for ``backward_chunks``.
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
            if folded and hasattr(backend, "loss_and_gradient"):
                loss, g = backend.loss_and_gradient(logits, t, class_weight, plan.params, factor.expand(len(t)))
                del logits
                losses.append(loss)
                _chunk_gradients(g, x, w, grads, chunk)
                del g  # before the next chunk's logits: one chunk buffer alive at a time
                continue
            loss, state, row_stats = backend.forward(logits, t, class_weight, plan.params, plan.with_stats)
            if z_scale is not None:
                loss, state = rescale_z_loss(logits, t, plan.params, loss, state, z_scale)
            losses.append(loss)
            if row_stats is not None:
                stats.append(row_stats)
            if folded:
                g = plan.chunk_gradient(logits, t, class_weight, state, factor.expand(len(t)))
                del logits
                _chunk_gradients(g, x, w, grads, chunk)
                del g
            elif plan.reduction == "none":
                states.append(state)
    state = backend.RowState(*map(torch.cat, zip(*states, strict=True))) if states else None
    row_stats = RowStats(*map(torch.cat, zip(*stats, strict=True))) if stats else None
    return torch.cat(losses), grads, state, row_stats


def backward_chunks(
    plan: Plan, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
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
            g = plan.chunk_gradient(logits, t, class_weight, chunk_state, grad_rows[chunk])
            del logits
            _chunk_gradients(g, x, w, grads, chunk)
            del g
    return _finish(grads, (input.dtype, weight.dtype, None if bias is None else bias.dtype), None)


class LinearCrossEntropy(torch.autograd.Function):
    """Eager autograd of the fused loss (see ``precision_ce.linear``). Its backward scales the gradients
    stored by the forward pass in place, which a custom op's outputs do not allow: compiled code
    calls the custom ops of ``precision_ce.linear.ops`` instead."""

    @staticmethod
    def forward(ctx, input, weight, bias, target, class_weight, denominator, z_scale, plan, needs):  # type: ignore[override]
        rows_loss, grads, state, stats = forward_chunks(plan, input, weight, bias, target, class_weight,
                                                        denominator, z_scale, needs)
        ctx.plan, ctx.needs, ctx.folded = plan, needs, plan.reduction != "none"
        ctx.dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)
        if ctx.folded:
            ctx.grads = grads
        elif any(needs):
            ctx.save_for_backward(input, weight, bias, target, class_weight, *state)
        row_stats = tuple(stats or ())
        ctx.mark_non_differentiable(*row_stats)
        return (_reduce_rows(rows_loss, plan.reduction, denominator), *row_stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *grad_stats):  # type: ignore[override]
        nothing = (None,) * 6
        if ctx.folded:
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_cross_entropy computes its gradients in the forward pass and hands them "
                    "out once: a second backward through the same loss (retain_graph=True) needs "
                    "options=torch.nn.LinearCrossEntropyOptions(allow_retain_graph=True) (one more "
                    "gradient-sized allocation per backward), or call linear_cross_entropy again"
                )
            grads = ctx.grads
            if not ctx.plan.allow_retain_graph:
                ctx.grads = None  # scaled in place below, so handed out once
            return (*_finish(grads, ctx.dtypes, grad_loss, in_place=not ctx.plan.allow_retain_graph), *nothing)
        input, weight, bias, target, class_weight, *state = ctx.saved_tensors
        return (*backward_chunks(ctx.plan, input, weight, bias, target, class_weight, state, grad_loss,
                                 ctx.needs), *nothing)
