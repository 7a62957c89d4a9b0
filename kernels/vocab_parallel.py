"""Triton pass of a vocabulary shard: partial results that the host combines across ranks.

Rank r holds columns [s_r, s_r + V_r) of each row. One program per row runs the passes of
kernels/cross_entropy.py on the shard (the backward pass is ``generalised_ce_backward`` itself,
given ``vocab_start``):

    A   ``_online_pass``: the shard's max m_r and, relative to it, s_r = sum e^(z - m_r), the same
        without the target (when this shard owns it), sum e^(z - m_r)(z - m_r), sum c (z - m_r);
        with stats the count of logits ranked before the target, given the global x_y.
    H   only with a head: ``_last_tie_in_head``, given the global threshold (the k-th
        largest raw logit, gathered by the host) and this shard's tie budget (how many of its
        logits equal to the threshold are in K): the index of its last tie in K.

The host rescales the sums to the global max m after an all-reduce MAX,
    sum e^(z - m) = e^(m_r - m) s_r,   sum e^(z - m)(z - m) = e^(m_r - m) (t_r + (m_r - m) s_r),
    sum c (z - m) = sum c (z - m_r) + (m_r - m) sum c,
and sums them over ranks (precision_ce/distributed.py). The sums over K come from the gathered
top values, so H needs neither m nor log-sum-exp.
"""

import triton
import triton.language as tl

from .cross_entropy import _online_pass
from .head import _last_tie_in_head, _sortable_key

PARTIAL_COLUMNS = tl.constexpr(6)
"""m_r, s_r, s_r without the target, sum e^(z - m_r)(z - m_r), sum c (z - m_r), logits before the target."""


@triton.jit
def vocab_shard_partials(
    logits_ptr, stride_row, target_ptr, weight_ptr, x_target_ptr, threshold_value_ptr, tie_budget_ptr,
    partial_ptr, threshold_key_ptr, last_tie_ptr, V, vocab_start, softcap,
    BLOCK: tl.constexpr, LANE: tl.constexpr, KEY_BITS: tl.constexpr, HAS_HEAD: tl.constexpr, HAS_STATS: tl.constexpr,
    HAS_PLOGP: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """Row partials of the shard, (rows, PARTIAL_COLUMNS) fp32; with a head, the threshold's
    order-preserving key and this shard's last tie in K (a local index, -1: none).

    target_ptr: global class indices (an ignored row reads class 0); x_target_ptr: the target's
    global raw logit (read with stats); threshold_value_ptr: the k-th largest raw logit in the logits'
    dtype, tie_budget_ptr: int32 (read with a head).
    """
    tl.static_assert(HAS_HEAD or not HAS_STATS, "the target rank needs the global target logit of the head exchange")
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    # Outside [0, V) when another shard owns the target: no column matches it, none is read.
    target_column = tl.load(target_ptr + row) - vocab_start
    x_target = 0.0
    if HAS_STATS:
        x_target = tl.load(x_target_ptr + row)
    m, sum_exp, sum_exp_others, sum_exp_shifted, sum_c_shifted, rank, _ = _online_pass(
        row_ptr, weight_ptr, V, target_column, x_target, softcap,
        BLOCK, LANE, HAS_SOFTCAP, HAS_WEIGHT, HAS_SMOOTHING, HAS_STATS, HAS_PLOGP, False, 1,
    )
    out = partial_ptr + row * PARTIAL_COLUMNS
    tl.store(out, m)
    tl.store(out + 1, sum_exp)
    tl.store(out + 2, sum_exp_others)
    # Columns of features that are off are left unwritten (the host does not read them).
    if HAS_PLOGP:
        tl.store(out + 3, sum_exp_shifted)
    if HAS_SMOOTHING:
        tl.store(out + 4, sum_c_shifted)
    if HAS_STATS:
        tl.store(out + 5, (rank - 1).to(tl.float32))
    if HAS_HEAD:
        threshold = _sortable_key(tl.load(threshold_value_ptr + row), KEY_BITS)
        tie_budget = tl.load(tie_budget_ptr + row)
        last_tie = _last_tie_in_head(row_ptr, V, threshold, tie_budget, BLOCK, KEY_BITS)
        tl.store(threshold_key_ptr + row, threshold)
        tl.store(last_tie_ptr + row, last_tie)
