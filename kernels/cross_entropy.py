"""Triton kernels for the generalised next-token loss: one program per row of logits.

Forward (``generalised_ce_forward``), all in one launch, reading the row
    A   once, online (each lane of a thread's 16-byte load on its own max, combined per row):
        max m, s = sum e^(z-m), the same sum without the target (-> log(1 - pi_y)
        without cancellation), sum e^(z-m) (z-m) (-> sum_a pi_a log pi_a, the entropy) and, with
        label smoothing, sum c_a (z_a - m); with stats also the target's rank; with a head also
        the slot maxima (the largest logit of each 16-byte group position of the block), whose
        k-th largest is a lower bound ("floor") of the k-th largest logit;
    R   only with a head (lambda_head != lambda_tail and k < V, or return_stats="full"): the
        groups of a 16-byte load's logits that hold a logit >= the floor, "candidates" (about k
        of them: the floor is a few slot collisions below the k-th largest), marked by a bit per
        group position and block, then written once per row into a small per-row buffer; the
        head K is among them, so the radix select of the k-th largest logit, of the last tie in
        K, and the sums over K take the candidates alone (a gather, no pass).
        A row with more than CAP candidate groups (k > CAP / 2, many ties at the floor, more than
        64 blocks) takes the radix select over the whole row instead: a histogram pass per 8-bit
        digit (16-bit keys: 2, fp32: 4) and a pass for the sums over K.
and writes the row loss and the per-row state of the backward pass. No gradient is stored. An
ignored row reads nothing of its logits.

Backward (``generalised_ce_backward``) reads the row once more and writes the gradient once
(an ignored row: zeros, unread), already multiplied by the incoming per-row gradient:
    g_j = pi_j (coef - scale * lambda_j) - smooth * c_j   (j != y),    g_y = grad_target,
times dz/dx = 1 - tanh(x/s)**2 under softcap; with a head, lambda_j from two float compares
against the threshold and the column of the last tie in K, both from the forward. See
precision_ce/reference.py for the same formulas in PyTorch and docs/design.md for the pass and
memory-traffic accounting.

All arithmetic is fp32 whatever the logits' dtype; offsets are int64.
"""

import triton
import triton.language as tl

from .head import _collect_candidates, _float_of_key, _head_floor, _head_of_candidates, _head_of_row
from .numerics import _exp, _expm1, _log1p, _softcap, _tanh

# Globals a kernel reads must be tl.constexpr instances (an annotation is not enough).
LN2 = tl.constexpr(0.6931471805599453)
LOG_TINY = tl.constexpr(-103.27892990343185)  # log(2**-149), fp32's smallest subnormal
LOG_WEIGHT_MAX = tl.constexpr(80.0)  # cap of log w_y (focal reward, beta < 0, pi_y -> 1)


@triton.jit
def _target_weight(log_pi_y, log1m_pi_y, beta, SHAPED: tl.constexpr, FOCAL: tl.constexpr):
    """(w_y, w_y (1 - pi_y), -w_y log pi_y), each formed in log space; see reference.target_weight."""
    log1m = tl.maximum(log1m_pi_y, LOG_TINY)
    log_pi = tl.where(log1m < -LN2, _log1p(-tl.exp(log1m)), log_pi_y)
    log_neg_log_pi = tl.log(-log_pi)
    if not SHAPED:
        log_w = 0.0 * log1m
    elif FOCAL:
        log_w = beta * log1m
    else:
        near_one = log_pi + tl.exp(log_neg_log_pi + beta * log1m)
        elsewhere = tl.where(log_pi == float("-inf"), 0.0, -log_pi * _expm1(beta * log1m))
        log_w = tl.where(log1m < -LN2, near_one, elsewhere)
    # Cap w_y alone; the two products come from the uncapped log weight and stay finite.
    w_y = tl.exp(tl.minimum(log_w, LOG_WEIGHT_MAX))
    return w_y, tl.exp(log_w + log1m), tl.exp(log_w + log_neg_log_pi)


@triton.jit
def _online_pass(
    row_ptr, weight_ptr, V, target, x_target, softcap,
    BLOCK: tl.constexpr, LANE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_STATS: tl.constexpr, HAS_PLOGP: tl.constexpr,
    HAS_HEAD: tl.constexpr, GROUP: tl.constexpr,
):
    """Pass A. Returns m, s, s without the target, sum e^(z-m)(z-m), sum c (z-m), the target's rank,
    and with HAS_HEAD the slot maxima: the largest raw logit (as fp32) of each GROUP-wide group of
    the block, over the row's blocks (BLOCK // GROUP slots holding distinct logits, so the k-th
    largest slot maximum is a lower bound of the k-th largest logit). A group is one thread's
    vector on aligned rows: its max stays in the thread, and without softcap it is the lanes' max.

    Per lane: the block is viewed as BLOCK // LANE lanes of LANE contiguous elements, and each lane
    keeps its own running max, sums (rescaled by its own max) and rank count; the lanes are
    combined once, after the loop. With LANE = the elements of one thread's 16-byte load (the host's choice for aligned
    rows, where loads are vectorised) a lane lives in one thread, and the loop has no block
    reduction for them (warp shuffles, shared memory, barriers): one rescaling exponential per
    lane per block instead. LANE = BLOCK is one lane, a block reduction per block (the host's
    choice where a lane would straddle threads)."""
    LANES: tl.constexpr = BLOCK // LANE
    m = tl.full((LANES,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((LANES,), tl.float32)
    sum_exp_others = tl.zeros((LANES,), tl.float32)
    sum_exp_shifted = tl.zeros((LANES,), tl.float32)  # sum e^(z-m) (z-m); rescaled like sum_exp when m grows
    sum_c_shifted = tl.zeros((LANES,), tl.float32)  # sum c (z-m); shifted by the change of m times the classes seen
    c_seen = tl.zeros((LANES,), tl.float32)
    ranked_above = tl.zeros((LANES,), tl.int32)  # per lane, like the sums: no block reduction per block
    slot_max = tl.full((BLOCK // GROUP,), float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x_raw = tl.load(row_ptr + cols, mask=in_row, other=float("-inf"))
        x = x_raw.to(tl.float32)
        lane_cols = tl.reshape(cols, (LANES, LANE))
        z = tl.reshape(_softcap(x, softcap, HAS_SOFTCAP), (LANES, LANE))
        m_new = tl.maximum(m, tl.max(z, 1))
        # Guards for lanes that are all -inf so far (a ragged tail, -inf logits): never -inf - (-inf).
        # On the lanes' scalars only: while a lane's max is -inf its z are -inf, and -inf - 0 stays
        # -inf (e = 0).
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        alpha = tl.where(m == float("-inf"), 0.0, _exp(shift))
        z_shifted = z - tl.where(m_new == float("-inf"), 0.0, m_new)[:, None]
        e = _exp(z_shifted)
        if HAS_PLOGP:
            sum_exp_shifted = alpha * (sum_exp_shifted + shift * sum_exp) + tl.sum(
                tl.where(e > 0.0, e * z_shifted, 0.0), 1
            )
        sum_exp = alpha * sum_exp + tl.sum(e, 1)
        sum_exp_others = alpha * sum_exp_others + tl.sum(tl.where(lane_cols == target, 0.0, e), 1)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                c = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            else:
                c = tl.where(in_row, 1.0, 0.0)
            c = tl.reshape(c, (LANES, LANE))
            sum_c_shifted += shift * c_seen + tl.sum(tl.where(c == 0.0, 0.0, c * z_shifted), 1)
            c_seen += tl.sum(c, 1)
        if HAS_STATS:  # the rank: ties before the target counted with those above it
            before = (x > x_target) | ((x == x_target) & (cols < target))
            ranked_above += tl.sum(tl.reshape((before & in_row).to(tl.int32), (LANES, LANE)), 1)
        if HAS_HEAD:
            slot_max = tl.maximum(slot_max, tl.max(tl.reshape(x, (BLOCK // GROUP, GROUP)), 1))
        m = m_new
    # The lanes, each rescaled to the row max (lanes that saw only -inf hold zero sums).
    row_max = tl.max(m, 0)
    shift = tl.where(m == float("-inf"), 0.0, m - row_max)
    factor = tl.where(m == float("-inf"), 0.0, tl.exp(shift))
    total_shifted = tl.sum(factor * (sum_exp_shifted + shift * sum_exp), 0)
    total_c_shifted = tl.sum(sum_c_shifted + shift * c_seen, 0)
    return (row_max, tl.sum(factor * sum_exp, 0), tl.sum(factor * sum_exp_others, 0), total_shifted,
            total_c_shifted, 1 + tl.sum(ranked_above, 0), slot_max)


@triton.jit
def generalised_ce_forward(
    logits_ptr, stride_row, target_ptr, weight_ptr,
    loss_ptr, row_max_ptr, log_sum_exp_ptr, coef_ptr, scale_ptr, smooth_ptr, grad_target_ptr,
    threshold_ptr, last_tie_ptr, candidates_ptr,
    entropy_ptr, rank_ptr, topk_mass_ptr,
    class_weight_sum_ptr, V, ignore_index, k, beta, lambda_head, lambda_tail, label_smoothing,
    z_loss, softcap,
    BLOCK: tl.constexpr, LANE: tl.constexpr, CAP: tl.constexpr, KEY_BITS: tl.constexpr, SHAPED: tl.constexpr,
    FOCAL: tl.constexpr, HAS_HEAD: tl.constexpr, HAS_STATS: tl.constexpr, HAS_NEGATIVES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """Row loss and backward state. ``lambda_tail`` is the reward of every wrong token when
    HAS_HEAD is False (the host passes the uniform reward there). With HAS_STATS the entropy and
    the target's rank come from pass A; the top-k mass needs HAS_HEAD (NaN without).

    An ignored row reads nothing of its logits: its loss, state and stats are 0."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row)
    ignored = target == ignore_index
    if ignored:
        tl.store(loss_ptr + row, 0.0)
        tl.store(row_max_ptr + row, 0.0)
        tl.store(log_sum_exp_ptr + row, 0.0)
        tl.store(coef_ptr + row, 0.0)
        tl.store(scale_ptr + row, 0.0)
        tl.store(smooth_ptr + row, 0.0)
        tl.store(grad_target_ptr + row, 0.0)
        if HAS_HEAD:
            tl.store(threshold_ptr + row, 0)
            tl.store(last_tie_ptr + row, 0)
        if HAS_STATS:
            tl.store(entropy_ptr + row, 0.0)
            tl.store(rank_ptr + row, 0.0)
            tl.store(topk_mass_ptr + row, 0.0)
        return
    in_range = (target >= 0) & (target < V)
    target = tl.where(in_range, target, 0).to(tl.int32)  # never read out of bounds
    x_target_raw = 0.0
    if HAS_STATS:  # pass A places the target among the logits
        x_target_raw = tl.load(row_ptr + target)
    # A group: the logits of one 16-byte load (fewer in a block narrower than that).
    VECTOR: tl.constexpr = 8 if KEY_BITS == 16 else 4
    GROUP: tl.constexpr = VECTOR if VECTOR <= BLOCK else BLOCK
    m, sum_exp, sum_exp_others, sum_exp_shifted, sum_c_shifted, rank, slot_max = _online_pass(
        row_ptr, weight_ptr, V, target, x_target_raw.to(tl.float32), softcap,
        BLOCK, LANE, HAS_SOFTCAP, HAS_WEIGHT, HAS_SMOOTHING, HAS_STATS, HAS_NEGATIVES or HAS_STATS, HAS_HEAD, GROUP,
    )
    if not HAS_STATS:  # loaded after the pass: not held in a register across it
        x_target_raw = tl.load(row_ptr + target)
    x_target = x_target_raw.to(tl.float32)
    # Everything relative to the row max m: z - m is exact, z - lse would lose ulp(lse).
    log_sum_exp = tl.log(sum_exp)
    lse = m + log_sum_exp
    log_pi_y = (_softcap(x_target, softcap, HAS_SOFTCAP) - m) - log_sum_exp
    log1m_pi_y = tl.log(sum_exp_others) - log_sum_exp
    pi_y = tl.exp(log_pi_y)
    one_minus_pi_y = tl.exp(log1m_pi_y)
    # sum_a pi_a log pi_a = sum e^(z-m)(z-m) / s - log s; then without the target's own term.
    plogp = sum_exp_shifted / sum_exp - log_sum_exp
    plogp_others = plogp - tl.where(pi_y > 0.0, pi_y * log_pi_y, 0.0)

    w_y, w_y_times_1m, target_term = _target_weight(log_pi_y, log1m_pi_y, beta, SHAPED, FOCAL)

    if HAS_HEAD:
        # Radix digits of 8 bits: 256-bin histograms (2 steps for 16-bit keys, 4 for fp32).
        DIGIT_BITS: tl.constexpr = 8
        floor = _head_floor(slot_max, k)
        row_candidates_ptr = candidates_ptr + row * CAP
        count = CAP + 1  # rows of more than 64 blocks take the whole-row select
        if V <= 64 * BLOCK:
            count = _collect_candidates(row_ptr, V, floor, row_candidates_ptr, CAP, BLOCK, GROUP)
        if count <= CAP:
            threshold, last_tie, head_mass_others, head_plogp_others, target_in = _head_of_candidates(
                row_ptr, V, row_candidates_ptr, count, k, target, m, log_sum_exp, softcap,
                CAP, GROUP, KEY_BITS, DIGIT_BITS, HAS_SOFTCAP,
            )
        else:
            HEAD_BLOCK: tl.constexpr = BLOCK if BLOCK < 2048 else 2048
            threshold, last_tie, head_mass_others, head_plogp_others, target_in = _head_of_row(
                row_ptr, V, k, target, m, log_sum_exp, softcap, HEAD_BLOCK, KEY_BITS, DIGIT_BITS, HAS_SOFTCAP,
            )
        head_mass = head_mass_others + tl.where(target_in > 0, pi_y, 0.0)
        tl.store(threshold_ptr + row, threshold)
        tl.store(last_tie_ptr + row, last_tie)
        negative_mass = lambda_head * head_mass_others + lambda_tail * (one_minus_pi_y - head_mass_others)
        negative_loss = -(
            lambda_head * head_plogp_others + lambda_tail * (plogp_others - head_plogp_others)
        )
    else:
        negative_mass = lambda_tail * one_minus_pi_y
        negative_loss = -lambda_tail * plogp_others

    if HAS_WEIGHT:
        c_y = tl.load(weight_ptr + target).to(tl.float32)
        class_weight_sum = tl.load(class_weight_sum_ptr)
    else:
        c_y = 1.0
        class_weight_sum = V * 1.0
    valid = in_range
    scale = tl.where(valid, c_y * (1.0 - label_smoothing), 0.0)
    smooth = tl.where(valid, label_smoothing / V, 0.0)
    loss = scale * (target_term + negative_loss)
    w_rest = scale * negative_mass  # W without the target's own weight
    if HAS_SMOOTHING:
        # sum_a c_a log pi_a = sum c (z - m) + C (m - lse)
        loss -= smooth * (sum_c_shifted - class_weight_sum * log_sum_exp)
        w_rest += smooth * (class_weight_sum - c_y)
    z_loss_grad = 0.0
    if HAS_Z_LOSS:
        z_loss_grad = tl.where(valid, 2.0 * z_loss * lse, 0.0)
        loss += z_loss * lse * lse
    w_y_final = scale * w_y + smooth * c_y
    # pi_y W - w_y = pi_y W_rest - (1 - pi_y) w_y: no cancellation when pi_y -> 1.
    grad_target = pi_y * (w_rest + z_loss_grad) - scale * w_y_times_1m - smooth * c_y * one_minus_pi_y
    coef = w_rest + w_y_final + z_loss_grad
    # A target outside [0, V) that is not ignore_index gets NaN: visible, never out of bounds.
    bad = ~in_range
    tl.store(loss_ptr + row, tl.where(bad, float("nan"), loss))
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_exp_ptr + row, log_sum_exp)
    tl.store(coef_ptr + row, tl.where(bad, float("nan"), coef))
    tl.store(scale_ptr + row, scale)
    tl.store(smooth_ptr + row, smooth)
    tl.store(grad_target_ptr + row, grad_target)
    if HAS_STATS:
        tl.store(entropy_ptr + row, -plogp)
        tl.store(rank_ptr + row, rank.to(tl.float32))
        if HAS_HEAD:
            tl.store(topk_mass_ptr + row, head_mass)
        else:
            tl.store(topk_mass_ptr + row, float("nan"))  # not computed: the loss has no head


@triton.jit
def generalised_ce_backward(
    logits_ptr, stride_row, target_ptr, weight_ptr, grad_rows_ptr, grad_rows_stride,
    grad_ptr, grad_stride_row,
    row_max_ptr, log_sum_exp_ptr, coef_ptr, scale_ptr, smooth_ptr, grad_target_ptr, threshold_ptr,
    last_tie_ptr, V, vocab_start, ignore_index, lambda_head, lambda_tail, softcap,
    BLOCK: tl.constexpr, KEY_BITS: tl.constexpr, HAS_RANK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """d(sum_r grad_rows[r] loss[r]) / d logits, written once in the logits' dtype.

    The row may be a vocabulary shard, classes [vocab_start, vocab_start + V) of a larger
    vocabulary (0 and the whole vocabulary otherwise): the per-row state carries every global
    number (eps / V of the whole vocabulary in ``smooth``), so only the target's column moves.
    With a head, K is the logits above the threshold and those equal to it up to column
    ``last_tie`` (of the row or shard; the forward found it): no tie count in the loop.
    An ignored row writes zeros without reading its logits.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_ptr = grad_ptr + row * grad_stride_row
    target = tl.load(target_ptr + row)
    if target == ignore_index:  # zeros, without reading the row
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(out_ptr + cols, tl.zeros((BLOCK,), grad_ptr.dtype.element_ty), mask=cols < V)
        return
    target_column = target - vocab_start  # outside [0, V) when another shard owns the target
    upstream = tl.load(grad_rows_ptr + row * grad_rows_stride).to(tl.float32)
    row_max = tl.load(row_max_ptr + row)
    log_sum_exp = tl.load(log_sum_exp_ptr + row)
    coef = tl.load(coef_ptr + row) * upstream
    scale = tl.load(scale_ptr + row) * upstream
    smooth = tl.load(smooth_ptr + row) * upstream
    grad_target = tl.load(grad_target_ptr + row) * upstream
    if HAS_RANK:
        threshold = _float_of_key(tl.load(threshold_ptr + row), logits_ptr.dtype.element_ty, KEY_BITS)
        last_tie = tl.load(last_tie_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x_raw = tl.load(row_ptr + cols, mask=in_row, other=float("-inf"))
        x = x_raw.to(tl.float32)
        z = _softcap(x, softcap, HAS_SOFTCAP)
        p = tl.where(z == float("-inf"), 0.0, _exp((z - row_max) - log_sum_exp))
        if HAS_RANK:
            # Float compares (equal keys are equal floats, -0.0 == 0.0). -inf padding past the row
            # is never in K: the threshold is a logit of the row, and the padding is past the last tie.
            head = (x > threshold) | ((x == threshold) & (cols <= last_tie))
            g = p * (coef - scale * tl.where(head, lambda_head, lambda_tail))
        else:
            g = p * (coef - scale * lambda_tail)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g -= smooth * tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            else:
                g -= smooth
        g = tl.where(cols == target_column, grad_target, g)
        if HAS_SOFTCAP:
            t = _tanh(x / softcap)
            g *= (1.0 - t) * (1.0 + t)
        tl.store(out_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)
