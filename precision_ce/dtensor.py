"""DTensor in, DTensor out: ``precision_ce.cross_entropy`` of DTensor logits (``api`` calls this).

Each mesh dimension shards the logits in one of three ways, and each is handled by the code that
already computes the loss of plain tensors, run on this rank's local shard:

    Shard(class dim)  the vocabulary is split: the vocabulary-parallel loss (``distributed``) over
                      that mesh dimension's process group (what ``loss_parallel()`` does for
                      torch's loss, here with or without it); the target is replicated there
    Shard(other dim)  the batch (or sequence) is split: the local loss of the local rows; the
                      target is sharded alike
    Replicate         nothing to do; Partial logits are first summed (redistributed to Replicate)

A plain target or class-weight tensor is taken to be the whole tensor on every rank (as in
``loss_parallel()``); DTensor ones are redistributed to the placements above, and so are the class
weights (sharded with the vocabulary, else replicated).

Reductions over a sharded batch. "none" is sharded like the target (``Shard``); "sum" is the
``Partial("sum")`` of the local sums, as torch's own loss returns it. "mean" is the exact mean over
the global batch: sum of the row losses over every rank / the global count of non-ignored targets
(or the global sum of their class weights), returned as ``Partial("sum")`` of local sum / global
denominator. torch's ``F.cross_entropy`` returns ``Partial("avg")`` of the shard means instead, which
differs from the batch's mean whenever ranks hold different numbers of ignored targets. The global
denominator costs one all-reduce of two numbers per call. Over a vocabulary-split dimension the
result is ``Replicate``. Stats are placed like the "none" loss.

Gradients reach the sharded logits through ``DTensor.to_local``'s autograd, placed like the logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from . import api, distributed
from .config import LossParams
from .reference import RowStats


def _as_dtensor(value: torch.Tensor, mesh: Any, placements: list[Placement]) -> DTensor:
    """``value`` redistributed to ``placements``; a plain tensor is taken as replicated on ``mesh``."""
    if not isinstance(value, DTensor):
        value = DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)
    elif value.device_mesh != mesh:
        raise ValueError(f"target and weight must live on the logits' device mesh {mesh}, got {value.device_mesh}")
    return value.redistribute(mesh, placements)


def _sum_over(mesh: Any, mesh_dims: list[int]) -> api.SumOver | None:
    """An all-reduce (SUM) over the given mesh dimensions' groups, or None when there are none."""
    if not mesh_dims:
        return None

    def sum_over(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        for mesh_dim in mesh_dims:
            dist.all_reduce(tensor, group=mesh.get_group(mesh_dim))
        return tensor

    return sum_over


def cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str, params: LossParams,
    return_stats: bool, backend: api.Backend, check_targets: bool | None,
) -> DTensor | tuple[DTensor, RowStats]:
    """``api.cross_entropy`` of DTensor arguments (checked there for everything but tensors)."""
    if not isinstance(input, DTensor):
        raise TypeError("target or weight is a DTensor but input (the logits) is not; pass the logits as a "
                        "DTensor too (DTensor.from_local(logits, mesh, placements)) or plain tensors throughout")
    mesh, ndim = input.device_mesh, input.dim()
    probabilities = isinstance(target, torch.Tensor) and target.is_floating_point()
    class_dim = 0 if ndim == 1 else 1
    if any(p.is_partial() for p in input.placements):
        input = input.redistribute(mesh, [Replicate() if p.is_partial() else p for p in input.placements])
    shard_dims = [None if not isinstance(p, Shard) else p.dim % ndim for p in input.placements]
    vocab_dims = [i for i, d in enumerate(shard_dims) if d == class_dim]
    batch_dims = [i for i, d in enumerate(shard_dims) if d is not None and d != class_dim]
    if len(vocab_dims) > 1:
        raise ValueError(f"the logits' class dimension is sharded over {len(vocab_dims)} mesh dimensions "
                         f"({input.placements}); shard it over one (redistribute the logits)")
    if vocab_dims and probabilities:
        raise ValueError("class-probability targets need the logits' classes on one rank: redistribute the "
                         "logits to Replicate() on the class dimension, or use class-index targets")

    def target_dim(d: int) -> int:  # the target has no class dimension (unless it holds probabilities)
        return d if probabilities or d < class_dim else d - 1

    target_placements = [Shard(target_dim(d)) if i in batch_dims else Replicate() for i, d in enumerate(shard_dims)]
    target = _as_dtensor(target, mesh, target_placements)
    if weight is not None:
        weight = _as_dtensor(weight, mesh, [Shard(0) if i in vocab_dims else Replicate() for i in range(mesh.ndim)])
        weight = weight.to_local()
    logits, local_target = input.to_local(), target.to_local()
    sum_over = _sum_over(mesh, batch_dims)

    if vocab_dims:
        out = distributed._vocab_parallel_cross_entropy(
            logits.movedim(class_dim, -1) if ndim > 1 else logits, local_target, weight, reduction, params,
            return_stats, backend, mesh.get_group(vocab_dims[0]), sum_over)
    elif probabilities and reduction == "mean" and sum_over is not None:
        # torch's mean over positions, global: the local sum / the global number of positions.
        positions = sum_over(torch.tensor(logits.numel() // logits.shape[class_dim], device=logits.device))
        out = api._cross_entropy(logits, local_target, weight, "sum", params, return_stats, backend,
                                 check_targets) / positions
    else:
        out = api._cross_entropy(logits, local_target, weight, reduction, params, return_stats, backend,
                                 check_targets, sum_over)

    rows_placements = [p if i in batch_dims else Replicate() for i, p in enumerate(target_placements)]
    if probabilities:
        rows_placements = [Shard(target_dim(d) - (d > class_dim)) if i in batch_dims else Replicate()
                           for i, d in enumerate(shard_dims)]
    rows_shape = target.shape if not probabilities else target.shape[:class_dim] + target.shape[class_dim + 1:]

    def wrap(local: torch.Tensor, rows: bool) -> DTensor:
        if rows:
            return DTensor.from_local(local, mesh, rows_placements, run_check=False, shape=rows_shape,
                                      stride=_contiguous_stride(rows_shape))
        placements = [Partial("sum") if i in batch_dims else Replicate() for i in range(mesh.ndim)]
        return DTensor.from_local(local, mesh, placements, run_check=False)

    if return_stats:
        loss, stats = out
        return wrap(loss, reduction == "none"), RowStats(*(wrap(s, True) for s in stats))
    return wrap(out, reduction == "none")


def check_plain_layer(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``linear_cross_entropy`` takes plain tensors: a DTensor weight or input gets an error naming the fix."""
    if isinstance(weight, DTensor) or isinstance(bias, DTensor):
        raise TypeError(
            "linear_cross_entropy: linear_weight (or linear_bias) is a DTensor "
            f"({weight.placements if isinstance(weight, DTensor) else ''}), "
            "i.e. sharded by FSDP2's fully_shard or by tensor parallelism, but the fused loss needs the whole "
            "(V, D) matrix on every rank. Under fully_shard, compute the loss inside the output layer's forward, "
            "where FSDP2 has gathered the weight: precision_ce.distributed.output_layer_loss(layer, input, "
            "target, ...) does (or fully_shard the output layer together with its parent, whose forward computes "
            "the loss). With a vocabulary-sharded weight (tensor parallelism), compute the logits with the layer "
            "(ColwiseParallel(use_local_output=False)) and call precision_ce.cross_entropy on them"
        )
    if isinstance(input, DTensor):
        raise TypeError(
            "linear_cross_entropy: input is a DTensor; pass this rank's rows (input.to_local(), and the "
            "target's) with a plain weight, and reduce across ranks yourself (reduction='sum' / the global "
            "count of targets), or compute DTensor logits and call precision_ce.cross_entropy on them"
        )


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= size
    return tuple(reversed(stride))
