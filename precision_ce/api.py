"""Public API: a drop-in for ``torch.nn.functional.cross_entropy`` with the generalised reward."""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed: nothing is a DTensor
    DTensor = ()  # type: ignore[assignment,misc]

from . import ops, reference
from .config import LossParams, RewardConfig, is_finite
from .reference import RowStats

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXACT_DTYPES = (torch.float32, torch.float64)
"""Dtypes in which torch's own cross-entropy computes exactly what we do (16-bit ones it rounds)."""

_torch_cross_entropy = F.cross_entropy
"""torch's own function, captured at import: ``F.cross_entropy = precision_ce.cross_entropy``
(how Liger-Kernel patches models) must not make us call ourselves."""


def _reward_config(config: RewardConfig | None, **fields: Any) -> RewardConfig:
    """``config`` itself, or a RewardConfig from the individual fields (never both)."""
    if config is None:
        return RewardConfig(**fields)
    if not isinstance(config, RewardConfig):
        raise TypeError(f"config must be a precision_ce.RewardConfig, got {type(config).__name__}")
    if any(value != getattr(_DEFAULT_REWARD, name) for name, value in fields.items()):
        raise ValueError(
            "pass either config= or the individual reward arguments (beta, k, lambda_head, "
            "lambda_tail, positive_reward), not both"
        )
    return config


_DEFAULT_REWARD = RewardConfig()


def _loss_params(
    reward: RewardConfig, ignore_index: int, label_smoothing: float, z_loss: float,
    softcap: float | None,
) -> LossParams:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not (is_finite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and not (is_finite(softcap) and softcap > 0.0):
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    return LossParams(reward, ignore_index, float(label_smoothing), float(z_loss),
                      None if softcap is None else float(softcap))


def _check_tensors(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Validate dtypes and shapes; returns True for class-probability targets."""
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor of logits, got {_describe(input)}")
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: shape (C,), (N, C) or (N, C, d1, ...)")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}; move one")
    classes = input.shape[0 if input.dim() == 1 else 1]
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {_describe(weight)}")
        if weight.shape != (classes,):
            raise ValueError(f"weight must have shape ({classes},) (one per class), got {tuple(weight.shape)}")
        if weight.device != input.device:
            raise ValueError(f"weight is on {weight.device} but input is on {input.device}; move one")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "weight (the class weights) requires grad, but the loss treats class weights as "
                "constants and has no gradient for them; pass weight.detach()"
            )
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"class-probability targets must have the input's shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}; class-index targets must be an integer tensor"
            )
        return True
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold int64 class indices (or float probabilities), got {target.dtype}")
    expected = () if input.dim() == 1 else (input.shape[0], *input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must have shape {expected} for input of shape {tuple(input.shape)} "
            f"(the input without its class dimension), got {tuple(target.shape)}"
        )
    return False


def result_dtype(input: torch.Tensor) -> torch.dtype:
    """The loss's dtype: the logits', or float32 for 16-bit logits under autocast, as
    ``F.cross_entropy`` (an autocast-to-fp32 op) returns there. Computed in fp32 either way."""
    device = input.device.type
    if (input.dtype in (torch.bfloat16, torch.float16) and torch.amp.is_autocast_available(device)
            and torch.is_autocast_enabled(device)):
        return torch.float32
    return input.dtype


def _reduce_rows(rows_loss: torch.Tensor, reduction: str, denominator: torch.Tensor | None) -> torch.Tensor:
    """The per-row losses (rows,) reduced: "none" keeps them, "sum" sums them, "mean" divides their
    sum by ``denominator`` (#rows or sum_r c_{y_r} over the non-ignored rows, ``_mean_denominator``)."""
    if reduction == "none":
        return rows_loss
    return rows_loss.sum() if reduction == "sum" else rows_loss.sum() / denominator


def _result(
    loss: torch.Tensor, stats: tuple[torch.Tensor, ...] | None, reduction: str, shape: torch.Size,
    dtype: torch.dtype,
) -> torch.Tensor | tuple[torch.Tensor, RowStats]:
    """What the public losses return: ``loss`` in ``dtype`` (shaped ``shape``, the target's, for
    "none") and, when ``stats`` (per row) are given, (loss, RowStats) with each shaped ``shape``."""
    loss = loss.to(dtype)
    if reduction == "none":
        loss = loss.reshape(shape)
    if stats is None:
        return loss
    return loss, RowStats(*(s.reshape(shape) for s in stats))


def stats_level(return_stats: bool | str) -> int:
    """``return_stats`` (False, True or "full") as a stats level of the backends (``reference.STATS``)."""
    if return_stats == "full":
        return reference.FULL_STATS
    if not isinstance(return_stats, bool):
        raise ValueError(f'return_stats must be False, True or "full", got {return_stats!r}')
    return reference.STATS if return_stats else reference.NO_STATS


def _describe(value: object) -> str:
    return f"tensor of {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def _check_target_range(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """Targets outside [0, classes) that are not ``ignore_index``: a ValueError in eager code.

    Under torch.compile a Python branch on tensor data would break the graph, so the check is an
    in-graph ``torch._assert_async`` there (a RuntimeError when the compiled code runs; on CUDA an
    asynchronous device assert). Meta and fake tensors hold no values to check; under torch.func
    transforms the torch backend's op checks each batch entry itself.
    """
    if torch.compiler.is_compiling():
        bad = (target != ignore_index) & ((target < 0) | (target >= classes))
        torch._assert_async(~bad.any(), "precision_ce: target holds a class index outside [0, C) "
                            "that is not ignore_index")
    elif not (target.device.type == "meta" or is_fake(target) or ops.under_torch_func(target)):
        ops.check_target_range(target, classes, ignore_index)


SumOver = Callable[[torch.Tensor], torch.Tensor]
"""Sums a small tensor over the ranks that hold other rows of one batch (an all-reduce), so that
"mean" divides by the global count; ``precision_ce.dtensor`` passes one for batch-sharded DTensors."""


def _mean_denominator(
    rows_target: torch.Tensor, weight: torch.Tensor | None, params: LossParams, classes: int,
    sum_over: SumOver | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """reduction="mean": the denominator of the row losses' sum, #rows or sum_r c_{y_r} over the
    non-ignored rows (of every rank of ``sum_over``), and the z-loss's ``z_scale`` for
    ``ops.rescale_z_loss`` (None when it is 1)."""
    valid = rows_target != params.ignore_index
    count = valid.sum()
    if weight is None:
        return (count if sum_over is None else sum_over(count)), None
    # Clamped: an unchecked out-of-range target must not index out of bounds (its row is NaN).
    class_weight = weight[torch.where(valid, rows_target, 0).clamp(0, classes - 1)]
    denominator = torch.where(valid, class_weight, 0).sum()
    if sum_over is not None:
        denominator, count = sum_over(torch.stack([denominator.double(), count.double()])).to(denominator.dtype)
    # The z-loss is a plain mean over positions (spec section 3).
    return denominator, (denominator / count if params.has_z_loss else None)


def _backend_module(name: str, logits: torch.Tensor) -> ModuleType:
    """The backend module that ``_backend`` chooses (``reference`` or ``triton_backend``), for host
    code that runs the backends' forward/backward itself (``distributed``)."""
    return ops.backend_module(_backend(name, logits))


def _backend(name: str, logits: torch.Tensor) -> str:
    """The backend that runs: "torch" or "triton" (the key of ``ops.FORWARD``)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return "torch"
    triton_ready = "triton" in ops.FORWARD
    if name == "auto":
        return "triton" if logits.is_cuda and logits.dtype in KERNEL_DTYPES and triton_ready else "torch"
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 logits, got {logits.dtype}")
    if not triton_ready:
        raise RuntimeError("backend='triton' needs the triton package; pip install triton")
    if not logits.is_cuda:
        if torch.compiler.is_compiling() or os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' needs CUDA tensors; on the CPU the kernels run only eagerly, under "
                "the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
            )
    return "triton"


def _probability_targets(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str,
    params: LossParams, return_stats: bool, backend: str,
) -> torch.Tensor:
    """Class-probability targets: cross-entropy (plus z-loss and softcap) by torch autograd.

    The generalised reward is defined for one ground-truth token per row, so shaped settings
    are rejected here rather than given an invented meaning.
    """
    if not params.reward.is_cross_entropy:
        raise ValueError(
            "the generalised reward (beta, lambda_head, lambda_tail) needs class-index targets; "
            "class-probability targets only support the cross-entropy setting"
        )
    if return_stats:
        raise ValueError("return_stats=True needs class-index targets (the target rank is undefined)")
    if backend == "triton":
        raise ValueError("backend='triton' needs class-index targets; use backend='torch' or 'auto'")
    logits = reference.apply_softcap(input, params.softcap)
    loss = _torch_cross_entropy(logits, target, weight, reduction=reduction,
                           label_smoothing=params.label_smoothing)
    if params.has_z_loss:
        z_term = params.z_loss * torch.logsumexp(logits, dim=0 if input.dim() == 1 else 1).square()
        loss = loss + (z_term if reduction == "none" else getattr(z_term, reduction)())
    return loss


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
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
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, RowStats]:
    """Generalised next-token loss; ``F.cross_entropy`` when beta = lambda_head = lambda_tail = 0.

    Args:
        input: logits, (N, C), (C,) or (N, C, d1, ...); float32, bfloat16, float16 or float64.
        target: class indices, (N,), () or (N, d1, ...), integer dtype, or class probabilities
            shaped like ``input`` (cross-entropy setting only).
        weight, size_average, ignore_index, reduce, reduction, label_smoothing: as in
            ``F.cross_entropy``.
        beta, k, lambda_head, lambda_tail, positive_reward: the reward (see ``RewardConfig``);
            or pass ``config=`` instead, e.g. ``precision_ce.PRESETS["precision"]``.
        z_loss: coefficient zeta of the auxiliary ``zeta * logsumexp**2`` per row.
        softcap: s in ``z = s * tanh(x / s)`` applied to the logits first, or None.
        return_stats: also return per-position fp32 ``RowStats`` (entropy, lse, target rank,
            top-k mass), shaped like the unreduced loss; 0 at ignored positions. True: the
            top-k mass only where the loss has a head (``lambda_head != lambda_tail``, ``k < C``),
            NaN elsewhere, so that stats cost no pass over the logits beyond the loss's own;
            "full": the top-k mass always (at the cross-entropy or beta setting, the head's
            extra passes).
        backend: "auto" (Triton kernel for CUDA tensors, else torch), "torch" or "triton".
        check_targets: check that targets are in range (a host sync on CUDA). Default: always,
            except for the Triton kernel on CUDA, which never reads out of bounds and gives such
            rows a NaN loss instead of synchronising. Eagerly a ValueError; under torch.compile
            an in-graph assert (RuntimeError). The torch backend's op always checks itself.
        inplace_backward: the backward pass writes the gradient over ``input`` (as flash-attn's
            option): no second (N, C) buffer. Afterwards ``input`` holds its gradient; autograd
            raises (its "modified by an inplace operation" error) if anything else saved ``input``
            for its own backward and runs after the loss's, or on a second backward. ``input`` is
            overwritten where the loss reads it in place ((N, C) or (C,) with a dense class
            dimension; otherwise the loss's own copy is). Eager only: NotImplementedError under
            torch.compile and torch.func.

    Returns:
        The loss in ``input``'s dtype (float32 for 16-bit logits under autocast, as torch's): a
        scalar, or shaped like ``target`` for reduction="none";
        with ``return_stats``, the tuple (loss, stats).
    """
    if size_average is not None or reduce is not None:
        reduction = nn.modules.loss._Reduction.legacy_get_string(size_average, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    reward = _reward_config(config, beta=beta, k=k, lambda_head=lambda_head, lambda_tail=lambda_tail,
                            positive_reward=positive_reward)
    params = _loss_params(reward, ignore_index, label_smoothing, z_loss, softcap)
    if any(isinstance(value, DTensor) for value in (input, target, weight)):
        if inplace_backward:
            raise NotImplementedError("inplace_backward=True takes plain tensors; drop it for DTensor logits")
        from . import dtensor  # DTensor in, DTensor out: the local loss below on each rank's shard

        return dtensor.cross_entropy(input, target, weight, reduction, params, return_stats, backend, check_targets)
    return _cross_entropy(input, target, weight, reduction, params, return_stats, backend, check_targets,
                          inplace_backward=inplace_backward)


def _cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str, params: LossParams,
    return_stats: bool | str, backend: Backend, check_targets: bool | None, sum_over: SumOver | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, RowStats]:
    """``cross_entropy`` of plain tensors, arguments checked; ``sum_over``: see ``SumOver``."""
    with_stats = stats_level(return_stats)
    if _check_tensors(input, target, weight):
        if inplace_backward:
            raise ValueError("inplace_backward=True needs class-index targets; drop it for class-probability targets")
        return _probability_targets(input, target, weight, reduction, params, return_stats, backend)

    classes = input.shape[0 if input.dim() == 1 else 1]
    if input.dim() == 1:
        logits, rows_target = input[None], target.reshape(1)
    else:
        logits, rows_target = input.movedim(1, -1).reshape(-1, classes), target.reshape(-1)
    rows_target = rows_target.long()
    chosen = _backend(backend, logits)
    # Only the kernel is safe with unchecked targets (it writes NaN rows); elsewhere check.
    if check_targets or (check_targets is None and (not input.is_cuda or chosen == "torch")):
        _check_target_range(target, classes, params.ignore_index)

    # torch's own loss where it is exact: fp32/fp64 at the plain setting. 16-bit logits take our
    # path, which computes in fp32 (torch's CPU kernels round the target's gradient to 16 bits).
    if (chosen == "torch" and params.is_plain_cross_entropy and not return_stats and not inplace_backward
            and input.dtype in EXACT_DTYPES and not (sum_over and reduction == "mean")):
        return _torch_cross_entropy(input, target.long(), weight, ignore_index=params.ignore_index,
                                    reduction=reduction, label_smoothing=params.label_smoothing)

    denominator = z_scale = None
    if reduction == "mean":
        denominator, z_scale = _mean_denominator(rows_target, weight, params, classes, sum_over)
    rows_loss, stats = ops.loss_rows(chosen, logits, rows_target, weight, z_scale, params, with_stats,
                                     inplace_backward)
    return _result(_reduce_rows(rows_loss, reduction, denominator), stats, reduction, target.shape,
                   result_dtype(input))


class PrecisionCrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss`` with the generalised reward.

    Takes ``nn.CrossEntropyLoss``'s arguments, then ``config`` or the reward fields (``beta``,
    ``k``, ``lambda_head``, ``lambda_tail``, ``positive_reward``), ``z_loss``, ``softcap`` and
    ``backend``, all as in ``cross_entropy``.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        config: RewardConfig | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        backend: Backend = "auto",
        **reward: Any,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = nn.modules.loss._Reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.config = _reward_config(config, **reward)
        _loss_params(self.config, ignore_index, label_smoothing, z_loss, softcap)
        self.z_loss = z_loss
        self.softcap = softcap
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """input: logits (N, C) / (C,) / (N, C, d1, ...); target: class indices or probabilities."""
        return cross_entropy(  # type: ignore[return-value]
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, config=self.config, z_loss=self.z_loss,
            softcap=self.softcap, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"config={self.config}, reduction={self.reduction!r}"
