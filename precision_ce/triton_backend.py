"""The Triton backend: launches the kernels of ``precision_ce.kernels.cross_entropy``.

Same contract as ``precision_ce.reference``: ``forward`` returns the per-row loss and a small
per-row ``RowState``; ``backward`` recomputes the gradient from it in one read of the logits.
On the CPU it runs under the Triton interpreter (TRITON_INTERPRET=1 before triton is imported).
Launches go through ``wrap_triton`` so that ``precision_ce.ops`` can register both functions as
``triton_op`` bodies that Inductor traces (on CUDA; interpreted kernels run eagerly only).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch.library import wrap_triton

from .config import LossParams
from .kernels.cross_entropy import generalised_ce_backward, generalised_ce_forward
from .kernels.vocab_parallel import PARTIAL_COLUMNS, vocab_shard_partials
from .reference import RowStats, finds_head

FORCED_BLOCK: int | None = None
"""Block size override (tests use small blocks to exercise multi-block rows and ragged tails)."""


class RowState(NamedTuple):
    """Per-row numbers saved by the forward kernel (see ``reference.RowState``), shaped (rows,)."""

    row_max: torch.Tensor
    log_sum_exp: torch.Tensor
    coef: torch.Tensor
    scale: torch.Tensor
    smooth: torch.Tensor
    grad_target: torch.Tensor
    threshold: torch.Tensor  # int32 order-preserving key of the k-th largest raw logit
    last_tie: torch.Tensor  # int32: the logits equal to it are in K up to this column


def cuda_launch_config(vocab: int, element_size: int, rank: bool = False) -> dict[str, int]:
    """BLOCK and num_warps of a kernel on CUDA, for logits of ``element_size`` bytes; ``rank``: the
    backward of a rank mode (HAS_RANK)."""
    # 16 KiB of logits per block keeps loads wide; about 16 elements per thread keeps the block's
    # live values (x, z, e^z) in registers. The rank backward runs 2048-wide blocks over 8 warps:
    # 32 registers and 8 programs per SM, where 8192 x 16 warps take 50 and 2 (bf16 tail_penalty
    # at N 16384, V 128256, predicted by scripts/kernel_report.py: 4.63 vs 4.69 ms a step). The
    # forward with a head takes the cross-entropy blocks (4.63 vs 6.80 ms at 2048 x 8 warps;
    # fp32 8.24 vs 8.75), but over unaligned 16-bit rows (``head_takes_narrow_blocks``).
    # Untuned: no GPU has timed these choices yet.
    if rank:
        return {"BLOCK": min(2048, triton.next_power_of_2(vocab)), "num_warps": 8}
    block = min(16384 // element_size, triton.next_power_of_2(vocab))
    return {"BLOCK": block, "num_warps": min(16, max(4, block // 512))}


def _launch_config(vocab: int, logits: torch.Tensor, rank: bool) -> dict[str, int]:
    if FORCED_BLOCK is not None:
        return {"BLOCK": FORCED_BLOCK}
    if not logits.is_cuda:
        return {"BLOCK": min(1024, triton.next_power_of_2(vocab))}
    return cuda_launch_config(vocab, logits.element_size(), rank)


def _rows_aligned(logits: torch.Tensor) -> bool:
    """Whether Triton will vectorise the rows' loads: it specialises a pointer and integers
    divisible by 16 (the rows' start, row stride and V)."""
    return logits.data_ptr() % 16 == 0 and logits.stride(0) % 16 == 0 and logits.shape[1] % 16 == 0


def lane_width(logits: torch.Tensor, block: int) -> int:
    """LANE of the online pass (kernels/cross_entropy.py, ``_online_pass``): the elements of one
    16-byte load where rows are 16-byte aligned (the loads are vectorised, so a lane stays in one
    thread), else BLOCK (one lane: a block reduction per block)."""
    vector = 16 // logits.element_size()
    if not _rows_aligned(logits) or vector > block:
        return block
    return vector


def head_takes_narrow_blocks(element_size: int, aligned: bool) -> bool:
    """Whether a forward with a head takes the rank backward's 2048-wide blocks: over unaligned
    16-bit rows (scalar loads, one lane), where 8192 x 16 warps need 128 registers, one program per
    SM (predicted at V = 50257 by scripts/kernel_report.py: 2.12x the cross-entropy step against
    3.07x); fp32 rows keep the wide blocks (1.69x against 2.15x)."""
    return element_size == 2 and not aligned


def _online_pass_config(vocab: int, logits: torch.Tensor, has_head: bool = False) -> dict[str, int]:
    """The launch configuration of a kernel that runs the online pass: BLOCK, num_warps and LANE."""
    narrow = has_head and head_takes_narrow_blocks(logits.element_size(), _rows_aligned(logits))
    config = _launch_config(vocab, logits, rank=narrow)
    return dict(config, LANE=lane_width(logits, config["BLOCK"]))


def candidate_room(k: int) -> int:
    """CAP of the forward with a head: room for 2k candidate groups (at least 64, at most 4096) a row.

    Pass R keeps the 16-byte groups holding logits at or above the floor (kernels/head.py): about
    k, plus a few slot collisions and ties; a row with more takes the whole-row radix select. The
    select holds CAP x 8 (or 4) logits in registers: more registers as k grows (docs/design.md,
    "Larger k"), and past k = 2048 every row takes the whole-row select."""
    return min(4096, max(64, triton.next_power_of_2(2 * k)))


def _key_bits(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 16


def _rows_contiguous(logits: torch.Tensor) -> torch.Tensor:
    # Rows may be strided; the class dimension must be dense for wide loads.
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _dense(
    target: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Targets and class weights as the kernels index them, densely (a strided view such as
    ``labels[:, ::2]`` is copied: N or V numbers, not a pass over the logits)."""
    return target.contiguous(), None if weight is None else weight.contiguous()


def forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    params: LossParams,
    with_stats: int,
) -> tuple[torch.Tensor, RowState, RowStats | None]:
    """logits (rows, V) fp32/bf16/fp16, target (rows,) int64, weight (V,) or None -> fp32 loss (rows,).

    with_stats: a stats level of ``reference`` (NO_STATS, STATS or FULL_STATS)."""
    logits = _rows_contiguous(logits)
    target, weight = _dense(target, weight)
    rows, vocab = logits.shape
    reward = params.reward
    needs_rank = reward.needs_rank(vocab)
    has_head = finds_head(reward, vocab, with_stats)
    lambda_head = reward.lambda_head if needs_rank else reward.uniform_lambda(vocab)
    lambda_tail = reward.lambda_tail if needs_rank else reward.uniform_lambda(vocab)
    device = logits.device
    new = lambda dtype=torch.float32: torch.empty(rows, dtype=dtype, device=device)  # noqa: E731
    loss = new()
    state = RowState(*(new() for _ in range(6)), new(torch.int32), new(torch.int32))
    stats = RowStats(new(), new(), new(), new()) if with_stats else None
    k = min(reward.k, vocab)
    room = candidate_room(k) if has_head else 1
    candidates = torch.empty(rows if has_head else 0, room, dtype=torch.int32, device=device)
    weight_arg = weight if weight is not None else loss  # unread when HAS_WEIGHT is False
    # A device tensor, not a Python float: no host sync.
    class_weight_sum = loss if weight is None else weight.float().sum().reshape(1)
    if rows > 0:
        stats_args = stats if stats is not None else (loss,) * 4
        wrap_triton(generalised_ce_forward)[(rows,)](
            logits, logits.stride(0), target, weight_arg,
            loss, *state, candidates if has_head else loss, stats_args[0], stats_args[2], stats_args[3],
            class_weight_sum, vocab, params.ignore_index, k, reward.beta, lambda_head, lambda_tail,
            params.label_smoothing, params.z_loss, params.softcap or 1.0,
            CAP=room,
            KEY_BITS=_key_bits(logits.dtype),
            SHAPED=reward.beta != 0.0,
            FOCAL=reward.positive_reward == "focal",
            HAS_HEAD=has_head,
            HAS_STATS=bool(with_stats),
            HAS_NEGATIVES=lambda_head != 0.0 or lambda_tail != 0.0,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=params.has_smoothing,
            HAS_Z_LOSS=params.has_z_loss,
            HAS_SOFTCAP=params.has_softcap,
            **_online_pass_config(vocab, logits, has_head),
        )
    if stats is not None:
        stats = stats._replace(lse=state.row_max + state.log_sum_exp)
    return loss, state, stats


def backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    params: LossParams,
    state: RowState,
    grad_rows: torch.Tensor,
    *,
    vocab: int | None = None,
    vocab_start: int = 0,
    in_place: bool = False,
) -> torch.Tensor:
    """d(sum_r grad_rows[r] * loss[r]) / d logits: (rows, V) in the logits' dtype.

    ``logits`` may be a vocabulary shard (precision_ce.distributed): columns ``vocab_start`` on of
    a vocabulary of ``vocab`` classes (default: all of them); ``weight`` is then the shard's too.
    ``in_place``: write the gradient over the logits (each block is read before it is written) and
    return them; logits whose class dimension is strided are copied first, and the copy is written.
    """
    logits = _rows_contiguous(logits)
    target, weight = _dense(target, weight)
    rows, shard_vocab = logits.shape
    vocab = shard_vocab if vocab is None else vocab
    reward = params.reward
    needs_rank = reward.needs_rank(vocab)
    lambda_tail = reward.lambda_tail if needs_rank else reward.uniform_lambda(vocab)
    grad = logits if in_place else torch.empty_like(logits)
    grad_rows = grad_rows.float()
    if rows > 0:
        wrap_triton(generalised_ce_backward)[(rows,)](
            logits, logits.stride(0), target, weight if weight is not None else grad_rows,
            grad_rows, grad_rows.stride(0), grad, grad.stride(0), *state,
            shard_vocab, vocab_start, params.ignore_index, reward.lambda_head, lambda_tail, params.softcap or 1.0,
            KEY_BITS=_key_bits(logits.dtype),
            HAS_RANK=needs_rank,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=params.has_smoothing,
            HAS_SOFTCAP=params.has_softcap,
            **_launch_config(shard_vocab, logits, rank=needs_rank),
        )
    return grad


class ShardPartials(NamedTuple):
    """What ``vocab_shard_partials`` writes for a vocabulary shard, shaped (rows, ...)."""

    partial: torch.Tensor  # (rows, PARTIAL_COLUMNS) fp32: m_r and sums relative to it (kernels/vocab_parallel.py)
    threshold: torch.Tensor  # int32 order-preserving key of the global threshold (head rows; else 0)
    last_tie: torch.Tensor  # int32, this shard's last tie in K, a local index (head rows; else 0)


def shard_partials(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    params: LossParams,
    vocab_start: int,
    has_plogp: bool,
    x_target: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    tie_budget: torch.Tensor | None = None,
) -> ShardPartials:
    """Passes A (and H) of a vocabulary shard; precision_ce.distributed combines them across ranks.

    logits (rows, V_r) fp32/bf16/fp16, columns vocab_start on of the vocabulary; target (rows,)
    int64 global classes; weight (V_r,) or None. has_plogp: also sum e^(z - m_r)(z - m_r).
    x_target (rows,) fp32, the target's global raw logit: given for stats (the target rank).
    threshold (rows,) in the logits' dtype, the k-th largest raw logit of the whole row, and
    tie_budget (rows,) int, how many of this shard's logits equal to it are in K: given for a head.
    """
    logits = _rows_contiguous(logits)
    target, weight = _dense(target, weight)
    rows, shard_vocab = logits.shape
    device = logits.device
    partial = torch.empty(rows, PARTIAL_COLUMNS.value, dtype=torch.float32, device=device)
    key = torch.zeros(rows, dtype=torch.int32, device=device)
    last_tie = torch.zeros(rows, dtype=torch.int32, device=device)
    unread = partial  # pointer arguments of features that are off
    if rows > 0:
        vocab_shard_partials[(rows,)](
            logits, logits.stride(0), target, unread if weight is None else weight,
            unread if x_target is None else x_target.float().contiguous(),
            unread if threshold is None else threshold.to(logits.dtype).contiguous(),
            unread if tie_budget is None else tie_budget.to(torch.int32).contiguous(),
            partial, key, last_tie, shard_vocab, vocab_start, params.softcap or 1.0,
            KEY_BITS=_key_bits(logits.dtype),
            HAS_HEAD=threshold is not None,
            HAS_STATS=x_target is not None,
            HAS_PLOGP=has_plogp,
            HAS_WEIGHT=weight is not None,
            HAS_SMOOTHING=params.has_smoothing,
            HAS_SOFTCAP=params.has_softcap,
            **_online_pass_config(shard_vocab, logits),  # <= 128 registers at 16 KiB
        )
    return ShardPartials(partial, key, last_tie)
