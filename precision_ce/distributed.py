"""Vocabulary-parallel generalised loss: each rank holds a contiguous slice of the classes.

Tensor parallelism shards the output layer, so rank r holds logits x[:, s_r : s_r + V_r] (ranks in
group-rank order). The loss of a row needs a few global numbers; everything else is local:

    collective 1, MAX (cross-entropy, beta):   m = max_a z_a and the target's raw logit x_y
    collective 1, all-gather (rank modes, stats): each rank's min(k, V_r) largest raw logits (and
                  x_y); every rank merges them into the k largest of the row: m, the threshold
                  t = k-th largest, and how many ties at t each rank contributes to K (the lower
                  global index first), hence the last tie in K on this rank
    collective 2, SUM of partial sums: S = sum_a e^(z_a - m), the same without the target (log(1 - pi_y)
                  without cancellation), sum_a e^(z_a - m)(z_a - m) (sum pi log pi = that / S - log S),
                  sum_a c_a (z_a - m) (label smoothing), c_y and "y in K" from the target's owner,
                  the count of logits ranked before the target (stats)

From these the per-row arithmetic is the torch backend's own (``reference.shaped_rows``); the sums
over K come from the k largest values (``reference.head_sums``), which every rank holds after
collective 1. The backward pass is local (every per-row number is replicated): the backend's own
backward on the shard. Nothing of size rows x V is gathered; docs/distributed.md counts the bytes.

The Triton path (``triton_backend.shard_partials``, kernels/vocab_parallel.py) computes the local
passes in one kernel: without a head before collective 1, its sums relative to the shard's max and
rescaled here to the global max (``_rescale_to_global_max``); with a head after it, given the global
threshold and this shard's tie budget. The collectives and the per-row arithmetic are the same.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from . import reference
from .api import (
    REDUCTIONS,
    SumOver,
    _backend_module,
    _check_target_range,
    _check_tensors,
    _loss_params,
    _reduce_rows,
    _result,
    _reward_config,
    result_dtype,
    stats_level,
)
from .config import LossParams, RewardConfig
from .ops import rescale_z_loss
from .reference import Head, RowStats, RowSums, apply_softcap, compute_dtype, finds_head


@dataclasses.dataclass(frozen=True)
class Shard:
    """Where this rank's logits sit in the vocabulary; the same shard sizes on every rank."""

    group: Any  # the process group (None: the default group)
    sizes: tuple[int, ...]  # V_r of every rank, in group-rank order
    rank: int  # this rank's index in ``sizes``
    class_weight_sum: float | None  # sum of the class weights over the whole vocabulary

    @property
    def vocab(self) -> int:
        return sum(self.sizes)

    @property
    def vocab_start(self) -> int:
        return sum(self.sizes[: self.rank])


def _all_reduce(tensor: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _all_gather(tensor: torch.Tensor, group: Any) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def shard_of(logits: torch.Tensor, weight: torch.Tensor | None, group: Any = None) -> Shard:
    """Every rank's shard size, and the class-weight sum, from one small all-gather (O(1) per call).

    logits: (rows, V_r). Raises the same error on every rank (no rank is left waiting in a
    collective) if the ranks disagree on the number of rows or on whether class weights are given.
    """
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group=; pass the group its vocabulary shard belongs to")
    rows, shard_vocab = logits.shape
    mine = torch.tensor([shard_vocab, rows, weight is not None, 0.0], dtype=torch.float64, device=logits.device)
    if weight is not None:
        mine[3] = weight.double().sum()
    table = torch.stack(_all_gather(mine, group)).cpu()  # the one host synchronisation
    sizes = tuple(int(v) for v in table[:, 0].tolist())
    if len(set(table[:, 1].tolist())) != 1:
        raise ValueError(
            f"every rank must pass the same positions (rows of logits, target); got rows "
            f"{[int(r) for r in table[:, 1].tolist()]} by rank"
        )
    if len(set(table[:, 2].tolist())) != 1:
        raise ValueError("pass weight= (this rank's shard of the class weights) on every rank or on none")
    if min(sizes) < 1:
        raise ValueError(f"every rank needs at least one class in its shard; shard sizes by rank: {list(sizes)}")
    weight_sum = None if weight is None else float(table[:, 3].sum())
    return Shard(group, sizes, rank, weight_sum)


def _zero_target(values: torch.Tensor, column: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """``values`` (rows, V_r) with the target's column set to 0 in the rows whose target is here."""
    keep = values.gather(1, column[:, None])
    return values.scatter(1, column[:, None], torch.where(owned[:, None], 0.0, keep))


def forward(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, params: LossParams, shard: Shard,
    with_stats: int, z_loss_plain_mean: bool, backend: ModuleType = reference, sum_over: SumOver | None = None,
) -> tuple[torch.Tensor, Any, RowStats | None, torch.Tensor]:
    """Loss per row (identical on every rank), this rank's row state, stats and the mean's denominator.

    logits: (rows, V_r) this rank's shard; target: (rows,) int64 global classes; weight: (V_r,) or None.
    z_loss_plain_mean: rescale the z-loss so that the class-weighted mean leaves it a plain mean.
    backend: ``reference`` (torch ops) or ``triton_backend`` (the shard's passes in one kernel,
    ``triton_backend.shard_partials``); the row state is that backend's ``RowState``.
    The denominator is sum_r c_{y_r} (or the count) over non-ignored rows, summed by ``sum_over``
    over the ranks that hold other rows of the batch (``api.SumOver``; a DTensor sharded on both).
    """
    rows, shard_vocab = logits.shape
    reward, group, vocab, start = params.reward, shard.group, shard.vocab, shard.vocab_start
    cdt = compute_dtype(logits.dtype)
    device = logits.device
    ranked = reward.needs_rank(vocab) or with_stats > 0
    has_plogp = reward.lambda_head != 0.0 or reward.lambda_tail != 0.0 or with_stats > 0
    kernels = backend is not reference
    k = min(reward.k, vocab)
    class_weight = None if weight is None else weight.to(cdt)
    valid = target != params.ignore_index
    y = torch.where(valid, target, 0)  # ignored rows read class 0, as the torch backend does
    owned = (y >= start) & (y < start + shard_vocab)
    column = torch.where(owned, y - start, 0)
    x_y_here = torch.where(owned, logits.gather(1, column[:, None])[:, 0].to(cdt), -torch.inf)
    chunks = reference._row_chunks(rows, shard_vocab)
    if kernels and not ranked:
        # Pass A needs nothing global here: it runs first, relative to this shard's max.
        found = backend.shard_partials(logits, y, weight, params, start, has_plogp)

    # Collective 1.
    if not ranked:
        local = torch.empty(rows, 2, dtype=cdt, device=device)
        if kernels:
            local[:, 0] = found.partial[:, 0]
        else:
            for chunk in chunks:
                local[chunk, 0] = apply_softcap(logits[chunk].to(cdt), params.softcap).amax(-1)
        local[:, 1] = x_y_here
        row_max, x_y = _all_reduce(local, dist.ReduceOp.MAX, group).unbind(1)
    else:
        # The k largest of the row are among the union of each rank's k largest. One more value
        # locally tells whether ties at the threshold continue past this rank's share of K.
        local_top = torch.empty(rows, min(k + 1, shard_vocab), dtype=cdt, device=device)
        for chunk in chunks:
            local_top[chunk] = logits[chunk].to(cdt).topk(local_top.shape[1], dim=-1).values
        width = min(k, max(shard.sizes))
        send = torch.full((rows, width + 1), -torch.inf, dtype=cdt, device=device)
        send[:, : min(k, shard_vocab)] = local_top[:, :k]
        send[:, width] = x_y_here
        parts = _all_gather(send, group)
        shares = [part[:, : min(k, size)] for part, size in zip(parts, shard.sizes, strict=True)]
        top = torch.cat(shares, dim=1).topk(k, dim=-1).values
        x_y = torch.stack([part[:, width] for part in parts]).amax(0)
        threshold = top[:, k - 1]
        row_max = apply_softcap(top[:, 0], params.softcap)  # softcap is monotone
        last_tie, crowded, ties_in_k = _last_tie_here(local_top, shares, top, threshold, shard)
        if kernels:
            # Passes A and H, given the global target logit (stats), threshold and this shard's tie budget.
            found = backend.shard_partials(logits, y, weight, params, start, has_plogp,
                                           x_target=x_y if with_stats else None, threshold=threshold,
                                           tie_budget=ties_in_k)
            last_tie = found.last_tie.long()

    # Pass 2: this rank's partial sums, one column each, summed over ranks by collective 2.
    names = ["sum_exp", "sum_exp_others"]
    names += ["sum_exp_shifted"] * has_plogp + ["smooth"] * params.has_smoothing
    names += ["c_y"] * (weight is not None) + ["target_in"] * ranked + ["before_target"] * (with_stats > 0)
    partial = torch.zeros(rows, len(names), dtype=cdt, device=device)
    col = {name: i for i, name in enumerate(names)}
    index = torch.arange(start, start + shard_vocab, device=device)
    if kernels:
        _rescale_to_global_max(found.partial, row_max, partial, col, weight, shard_vocab)
    else:
        for chunk in chunks:
            x = logits[chunk].to(cdt)
            shifted = apply_softcap(x, params.softcap) - row_max[chunk, None]
            e = shifted.exp()
            partial[chunk, col["sum_exp"]] = e.sum(-1)
            partial[chunk, col["sum_exp_others"]] = _zero_target(e, column[chunk], owned[chunk]).sum(-1)
            if has_plogp:
                partial[chunk, col["sum_exp_shifted"]] = reference._xlogy_safe(e, shifted).sum(-1)
            if params.has_smoothing:
                partial[chunk, col["smooth"]] = (shifted if class_weight is None else class_weight * shifted).sum(-1)
            if ranked:
                # The index of the ties_in_k-th tie on this rank, for rows whose ties continue past it.
                cut = crowded[chunk]
                if cut.any():
                    running = (x[cut] == threshold[chunk][cut, None]).cumsum(-1)
                    last_tie[chunk][cut] = (running < ties_in_k[chunk][cut, None]).sum(-1)
            if with_stats:
                x_y_c = x_y[chunk, None]
                before = (x > x_y_c) | ((x == x_y_c) & (index < y[chunk, None]))
                partial[chunk, col["before_target"]] = before.sum(-1).to(cdt)
    if weight is not None:
        partial[:, col["c_y"]] = torch.where(owned, class_weight[column], 0.0)
    if ranked:
        target_in = (x_y_here > threshold) | ((x_y_here == threshold) & (column <= last_tie))
        partial[:, col["target_in"]] = (owned & target_in).to(cdt)

    # Collective 2.
    total = dict(zip(names, _all_reduce(partial, dist.ReduceOp.SUM, group).unbind(1), strict=True))

    log_sum_exp = total["sum_exp"].log()
    log_pi_y = (apply_softcap(x_y, params.softcap) - row_max) - log_sum_exp
    log1m_pi_y = total["sum_exp_others"].log() - log_sum_exp
    plogp = total["sum_exp_shifted"] / total["sum_exp"] - log_sum_exp if has_plogp else None
    class_weight_sum = float(vocab) if shard.class_weight_sum is None else shard.class_weight_sum
    smooth_log_p = total["smooth"] - log_sum_exp * class_weight_sum if params.has_smoothing else None
    head = None
    if ranked:
        sums = reference.head_sums(top, x_y, total["target_in"] > 0.5, params.softcap, row_max, log_sum_exp)
        head = Head(threshold, last_tie, *sums)
    c_y = total["c_y"] if weight is not None else 1.0
    row_sums = RowSums(row_max, log_sum_exp, log_pi_y, log1m_pi_y, plogp, smooth_log_p, head, c_y)
    loss, state = reference.shaped_rows(row_sums, valid, class_weight_sum, vocab, params)

    count = valid.sum().to(cdt)
    denominator = torch.where(valid, c_y, 0.0).sum() if weight is not None else count
    if sum_over is not None:
        denominator, count = sum_over(torch.stack([denominator, count]))
    if z_loss_plain_mean:
        # api's convention (spec section 3), applied to the target's logit as a one-column shard.
        target_column = torch.where(valid, 0, -1)
        loss, state = rescale_z_loss(x_y[:, None], target_column, dataclasses.replace(params, ignore_index=-1),
                                      loss, state, denominator / count)
    if kernels:
        # The kernels index per-row numbers densely; columns of the all-reduced tensors are strided.
        # With a head, the backward kernel takes this shard's last tie in K (a local column).
        state = backend.RowState(*(field.float().contiguous() for field in state[:6]), found.threshold,
                                 found.last_tie)
    stats = None
    if with_stats:
        # As the single-device backends: 0 on ignored rows; the top-k mass NaN unless asked for
        # or the loss has a head (here the exchange finds K for the target rank anyway).
        topk_mass = head.mass if finds_head(reward, vocab, with_stats) else torch.full_like(head.mass, torch.nan)
        stats = RowStats(*(torch.where(valid, value, 0.0).float() for value in
                           (-plogp, row_max + log_sum_exp, 1.0 + total["before_target"], topk_mass)))
    return loss, state, stats, denominator


def _rescale_to_global_max(
    found: torch.Tensor, row_max: torch.Tensor, partial: torch.Tensor, col: dict[str, int],
    weight: torch.Tensor | None, shard_vocab: int,
) -> None:
    """Fill ``partial``'s sums from the kernel's, taken relative to this shard's max m_r, now relative
    to the global max m (kernels/vocab_parallel.py has the formulas). found: (rows, PARTIAL_COLUMNS)."""
    local_max, sum_exp, sum_exp_others, sum_exp_shifted, sum_c_shifted, before = found.unbind(1)
    # A shard row of -inf only has sums 0 (or -inf, where c_a * -inf): any shift leaves them, 0 keeps them finite.
    shift = torch.where(local_max == -torch.inf, 0.0, local_max - row_max)
    alpha = shift.exp()
    partial[:, col["sum_exp"]] = alpha * sum_exp
    partial[:, col["sum_exp_others"]] = alpha * sum_exp_others
    if "sum_exp_shifted" in col:
        partial[:, col["sum_exp_shifted"]] = alpha * (sum_exp_shifted + shift * sum_exp)
    if "smooth" in col:
        class_weight_here = shard_vocab if weight is None else weight.float().sum()
        partial[:, col["smooth"]] = sum_c_shifted + shift * class_weight_here
    if "before_target" in col:
        partial[:, col["before_target"]] = before


def _last_tie_here(
    local_top: torch.Tensor, shares: list[torch.Tensor], top: torch.Tensor, threshold: torch.Tensor, shard: Shard,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which logits equal to the threshold t are in K on this rank: (last_tie, crowded, ties_in_k).

    K takes ties_wanted = k - #{a : x_a > t} of the ties, lowest global index first, i.e. rank by
    rank. Every rank's share of the gathered values holds all its ties up to the number K needs,
    so every rank knows how many ties the ranks before it give. This rank's ties up to ties_in_k
    are in K: last_tie = -1 (none), V_r - 1 (all), or for ``crowded`` rows (more ties here than
    K takes) the index of the ties_in_k-th tie, found in pass 2.
    """
    k = top.shape[1]
    ties_wanted = k - (top > threshold[:, None]).sum(-1)
    ties_by_rank = torch.stack([(share == threshold[:, None]).sum(-1) for share in shares])
    ties_before = ties_by_rank[: shard.rank].sum(0)
    ties_in_k = ties_wanted - ties_before
    shard_vocab = shard.sizes[shard.rank]
    # The value after this rank's ties_in_k-th tie in its sorted top values: a tie again means crowded.
    after = (local_top > threshold[:, None]).sum(-1) + ties_in_k
    next_value = local_top.gather(1, after.clamp(0, local_top.shape[1] - 1)[:, None])[:, 0]
    crowded = (ties_in_k > 0) & (after < local_top.shape[1]) & (next_value == threshold)
    last_tie = torch.where(ties_in_k > 0, shard_vocab - 1, -1)
    return last_tie, crowded, ties_in_k


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row loss of a vocabulary shard; the backward pass is the backend's own, on the shard."""

    @staticmethod
    def forward(ctx, logits, target, weight, params, shard, with_stats, z_loss_plain_mean, backend,  # type: ignore[override]
                sum_over):
        loss, state, stats, denominator = forward(logits, target, weight, params, shard, with_stats,
                                                  z_loss_plain_mean, backend, sum_over)
        ctx.save_for_backward(logits, target, weight, *state)
        ctx.params, ctx.shard, ctx.backend = params, shard, backend
        outputs = (loss, denominator, *(stats or ()))
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused):  # type: ignore[override]
        logits, target, weight, *state = ctx.saved_tensors
        shard = ctx.shard
        grad = ctx.backend.backward(logits, target, weight, ctx.params, ctx.backend.RowState(*state), grad_loss,
                                    vocab=shard.vocab, vocab_start=shard.vocab_start)
        return grad, None, None, None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Any = None,
    weight: torch.Tensor | None = None,
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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, RowStats]:
    """The generalised loss of logits sharded over the vocabulary: ``precision_ce.cross_entropy``
    of the gathered logits, without gathering them.

    Args:
        input: this rank's shard of the logits, (..., V_r), class dimension LAST (as Megatron's
            vocab-parallel loss); ranks of ``group`` hold contiguous shards in group-rank order,
            sizes may differ. float32, bfloat16, float16 (computed in fp32) or float64.
        target: global class indices, shaped ``input.shape[:-1]``, the same on every rank.
        group: the process group over which the vocabulary is sharded (default: the world).
        weight: this rank's shard of the class weights, (V_r,), or None.
        ignore_index, reduction, label_smoothing, beta, k, lambda_head, lambda_tail,
            positive_reward, config, z_loss, softcap, return_stats: as in ``cross_entropy``.
        backend: "auto" (the Triton kernels for CUDA tensors of float32, bfloat16 or float16, else
            torch ops), "torch" (torch ops on any device) or "triton" (CUDA tensors, or CPU ones
            under the Triton interpreter). NCCL for CUDA tensors, gloo for CPU ones.

    Returns:
        The same loss (and stats) on every rank, in ``input``'s dtype (float32 for 16-bit logits
        under autocast); its backward pass gives the gradient of this rank's shard only.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    reward = _reward_config(config, beta=beta, k=k, lambda_head=lambda_head, lambda_tail=lambda_tail,
                            positive_reward=positive_reward)
    params = _loss_params(reward, ignore_index, label_smoothing, z_loss, softcap)
    return _vocab_parallel_cross_entropy(input, target, weight, reduction, params, return_stats, backend, group)


def _vocab_parallel_cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str, params: LossParams,
    return_stats: bool | str, backend: str, group: Any, sum_over: SumOver | None = None,
) -> torch.Tensor | tuple[torch.Tensor, RowStats]:
    """``vocab_parallel_cross_entropy`` with its arguments checked; ``sum_over``: see ``api.SumOver``."""
    with_stats = stats_level(return_stats)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "vocab_parallel_cross_entropy needs torch.distributed: call "
            "torch.distributed.init_process_group(...) first (gloo for CPU tensors, nccl for CUDA)"
        )
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        raise TypeError("vocab_parallel_cross_entropy takes class-index targets (int64), not class probabilities")
    # Validate with the drop-in's checks, which expect the class dimension second.
    _check_tensors(input.movedim(-1, 1) if isinstance(input, torch.Tensor) and input.dim() > 1 else input,
                   target, weight)
    chosen = _backend_module(backend, input)

    logits = input.reshape(-1, input.shape[-1])
    rows_target = target.reshape(-1).long()
    shard = shard_of(logits, weight, group)
    _check_target_range(target, shard.vocab, params.ignore_index)
    z_loss_plain_mean = reduction == "mean" and weight is not None and params.has_z_loss
    outputs = _VocabParallelCrossEntropy.apply(logits, rows_target, weight, params, shard, with_stats,
                                               z_loss_plain_mean, chosen, sum_over if reduction == "mean" else None)
    rows_loss, denominator = outputs[:2]
    return _result(_reduce_rows(rows_loss, reduction, denominator), outputs[2:] if return_stats else None,
                   reduction, target.shape, result_dtype(input))


def output_layer_loss(layer: nn.Module, input: torch.Tensor, target: torch.Tensor, **loss_kwargs: Any) -> Any:
    """``linear_cross_entropy(input, layer.weight, target, linear_bias=layer.bias, **loss_kwargs)`` computed as
    ``layer``'s forward, so that its module hooks apply to the loss: FSDP2's ``fully_shard`` gathers
    the weight before and reshards it after, and reduce-scatters its gradient, as for ``layer(input)``.

    layer: the output layer (an ``nn.Linear`` with weight (V, D), maybe wrapped by fully_shard);
    input: hidden states (..., D); target: class indices ``input.shape[:-1]``. Returns what
    ``linear_cross_entropy`` returns. Needed where the layer is sharded on its own (not with the
    module whose forward computes the loss): outside its forward its weight is a sharded DTensor.
    """
    from .linear import linear_cross_entropy

    def loss_forward(hidden: torch.Tensor) -> Any:
        return linear_cross_entropy(hidden, layer.weight, target, linear_bias=layer.bias, **loss_kwargs)

    had_own_forward = "forward" in layer.__dict__
    saved = layer.__dict__.get("forward")
    layer.forward = loss_forward
    try:
        return layer(input)
    finally:
        if had_own_forward:
            layer.forward = saved
        else:
            del layer.forward
