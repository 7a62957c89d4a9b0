"""Public API: a drop-in for ``torch.nn.functional.cross_entropy`` with the generalised reward."""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .config import LossParams, RewardConfig
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


class _GeneralisedCrossEntropy(torch.autograd.Function):
    """Per-row loss of (rows, V) logits; the backend's backward recomputes the gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, z_scale, params, backend, with_stats):  # type: ignore[override]
        loss, state, stats = backend.forward(logits, target, weight, params, with_stats)
        if z_scale is not None:
            loss, state = _rescale_z_loss(logits, target, params, loss, state, z_scale)
        ctx.save_for_backward(logits, target, weight, *state)
        ctx.params, ctx.backend = params, backend
        if stats is None:
            return loss
        ctx.mark_non_differentiable(*stats)
        return (loss, *stats)

    @staticmethod
    def backward(ctx, grad_loss, *grad_stats):  # type: ignore[override]
        logits, target, weight, *state = ctx.saved_tensors
        state = ctx.backend.RowState(*state)
        grad = ctx.backend.backward(logits, target, weight, ctx.params, state, grad_loss)
        return grad, None, None, None, None, None, None


def _rescale_z_loss(
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
    # Clamped like the mean's weight gather: an unchecked out-of-range target's row is NaN, never an OOB read.
    column = torch.where(valid, target, 0).clamp(0, logits.shape[1] - 1)
    x_y = logits.gather(1, column[:, None])[:, 0].to(lse.dtype)
    pi_y = ((reference.apply_softcap(x_y, params.softcap) - state.row_max) - state.log_sum_exp).exp()
    z_grad = torch.where(valid, 2.0 * extra * lse, 0.0)
    loss = loss + torch.where(valid, extra * lse.square(), 0.0)
    return loss, state._replace(coef=state.coef + z_grad, grad_target=state.grad_target + pi_y * z_grad)


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
    if not (math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0.0):
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
    if input.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(input.device.type):
        return torch.float32
    return input.dtype


def _describe(value: object) -> str:
    return f"tensor of {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def _check_target_range(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bad.any():
        value = target[bad][0].item()
        raise ValueError(
            f"target holds class index {value}, outside [0, {classes}); use class indices in "
            f"range or ignore_index={ignore_index} for positions without a target"
        )


def _mean_denominator(
    rows_target: torch.Tensor, weight: torch.Tensor | None, params: LossParams, classes: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """reduction="mean": the denominator of the row losses' sum, #rows or sum_r c_{y_r} over the
    non-ignored rows, and the z-loss's ``z_scale`` for ``_rescale_z_loss`` (None when it is 1)."""
    valid = rows_target != params.ignore_index
    if weight is None:
        return valid.sum(), None
    # Clamped: an unchecked out-of-range target must not index out of bounds (its row is NaN).
    class_weight = weight[torch.where(valid, rows_target, 0).clamp(0, classes - 1)]
    denominator = torch.where(valid, class_weight, 0).sum()
    # The z-loss is a plain mean over positions (spec section 3).
    return denominator, (denominator / valid.sum() if params.has_z_loss else None)


def _backend(name: str, logits: torch.Tensor) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return reference
    kernel_ready = logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if name == "auto":
        if not (logits.is_cuda and logits.dtype in KERNEL_DTYPES):
            return reference
        try:
            from . import triton_backend
        except ImportError:
            return reference
        return triton_backend
    if logits.dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='triton' takes float32, bfloat16 or float16 logits, got {logits.dtype}")
    if not kernel_ready:
        raise RuntimeError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            "imported to run the kernels on the CPU under the Triton interpreter"
        )
    try:
        from . import triton_backend
    except ImportError as error:
        raise RuntimeError(f"backend='triton' needs the triton package: {error}") from error
    return triton_backend


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
    return_stats: bool = False,
    backend: Backend = "auto",
    check_targets: bool | None = None,
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
            top-k mass), shaped like the unreduced loss.
        backend: "auto" (Triton kernel for CUDA tensors, else torch), "torch" or "triton".
        check_targets: check that targets are in range (a host sync on CUDA). Default: always,
            except for the Triton kernel on CUDA, which never reads out of bounds and gives such
            rows a NaN loss instead of synchronising.

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
    if _check_tensors(input, target, weight):
        return _probability_targets(input, target, weight, reduction, params, return_stats, backend)

    classes = input.shape[0 if input.dim() == 1 else 1]
    if input.dim() == 1:
        logits, rows_target = input[None], target.reshape(1)
    else:
        logits, rows_target = input.movedim(1, -1).reshape(-1, classes), target.reshape(-1)
    rows_target = rows_target.long()
    chosen = _backend(backend, logits)
    # Only the kernel is safe with unchecked targets (it writes NaN rows); elsewhere check.
    if check_targets or (check_targets is None and (not input.is_cuda or chosen is reference)):
        _check_target_range(target, classes, ignore_index)

    # torch's own loss where it is exact: fp32/fp64 at the plain setting. 16-bit logits take our
    # path, which computes in fp32 (torch's CPU kernels round the target's gradient to 16 bits).
    if (chosen is reference and params.is_plain_cross_entropy and not return_stats
            and input.dtype in EXACT_DTYPES):
        return _torch_cross_entropy(input, target.long(), weight, ignore_index=ignore_index,
                                    reduction=reduction, label_smoothing=label_smoothing)

    z_scale = None
    if reduction == "mean":
        denominator, z_scale = _mean_denominator(rows_target, weight, params, classes)
    outputs = _GeneralisedCrossEntropy.apply(logits, rows_target, weight, z_scale, params, chosen, return_stats)
    rows_loss, stats = (outputs[0], RowStats(*outputs[1:])) if return_stats else (outputs, None)

    if reduction == "none":
        loss = rows_loss.reshape(target.shape)
    elif reduction == "sum":
        loss = rows_loss.sum()
    else:
        loss = rows_loss.sum() / denominator
    loss = loss.to(result_dtype(input))
    if stats is None:
        return loss
    return loss, RowStats(*(s.reshape(target.shape) for s in stats))


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
