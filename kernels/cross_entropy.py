"""Triton kernels for the generalised next-token loss: one program per row of logits.

Forward (``generalised_ce_forward``), all in one launch, reading the row
    A   once, online (each lane of a thread's 16-byte load on its own max, combined per row):
        max m, s = sum e^(z-m), the same sum without the target (-> log(1 - pi_y)
        without cancellation), sum e^(z-m) (z-m) (-> sum_a pi_a log pi_a, the entropy) and, with
        label smoothing, sum c_a (z_a - m); with stats also the target's rank; with a head also
        the first radix step of the head: the histogram of the top digit of the logits'
        order-preserving int32 keys (8 bits of 16-bit keys, 11 of fp32 keys);
    R   only with a head (lambda_head != lambda_tail and k < V, or return_stats="full"): the rest
        of the radix select of the k-th largest raw logit, one histogram pass per digit (16-bit:
        one pass, fp32: two). The last pass also sums pi and pi log pi over the keys above the
        threshold's bucket; its histogram counts exact keys, and equal keys are equal logits, so
        the sums over the rest of K are count x pi per bin: no pass after the select.
and writes the row loss and the per-row state of the backward pass. No gradient is stored. An
ignored row reads nothing of its logits.

Backward (``generalised_ce_backward``) reads the row once more and writes the gradient once
(an ignored row: zeros, unread), already multiplied by the incoming per-row gradient:
    g_j = pi_j (coef - scale * lambda_j) - smooth * c_j   (j != y),    g_y = grad_target,
times dz/dx = 1 - tanh(x/s)**2 under softcap. See precision_ce/reference.py for the same
formulas in PyTorch and docs/design.md for the pass and memory-traffic accounting.

All arithmetic is fp32 whatever the logits' dtype; offsets are int64.
"""

import torch
import triton
import triton.language as tl

# Globals a kernel reads must be tl.constexpr instances (an annotation is not enough).
LN2 = tl.constexpr(0.6931471805599453)
LOG_TINY = tl.constexpr(-103.27892990343185)  # log(2**-149), fp32's smallest subnormal
LOG_WEIGHT_MAX = tl.constexpr(80.0)  # cap of log w_y (focal reward, beta < 0, pi_y -> 1)
LOG2E = tl.constexpr(1.4426950408889634)
# Compiled kernels take e^x from one ex2.approx.ftz (MUFU.EX2 after a multiply); tl.exp's
# ex2.approx without .ftz adds a compare and two multiplies per element to keep subnormal results
# (< 2**-126, ~1e-38). Flushed here: such a term changes no sum of the row (its max term is 1) and
# no gradient beyond the flush. The interpreter and ROCm run no PTX: they take tl.exp.
PTX_EXP = tl.constexpr(not triton.knobs.runtime.interpret and torch.version.hip is None)


@triton.jit
def _exp(x):
    """e^x (fp32) for the per-element exponentials; subnormal results flushed to 0 when compiled."""
    if PTX_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * LOG2E], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _log1p(x):
    # Goldberg: log(1 + x) accurate for small x with plain log.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _expm1(x):
    # Kahan: exp(x) - 1 accurate for small x with plain exp and log.
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (u - 1.0) * (x / tl.log(u))))


@triton.jit
def _tanh(x):
    # tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|)): no overflow, accurate near 0.
    t = _expm1(-2.0 * tl.abs(x))
    r = -t / (2.0 + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def _softcap(x, softcap, HAS_SOFTCAP: tl.constexpr):
    # -inf stays -inf: padding must keep probability 0, not become -softcap.
    if HAS_SOFTCAP:
        x = tl.where(x == float("-inf"), x, softcap * _tanh(x / softcap))
    return x


@triton.jit
def _sortable_key(x_raw, KEY_BITS: tl.constexpr):
    """Raw 16/32-bit floats -> int32 keys whose signed order is the order of the floats.

    Negative floats reverse the order of their magnitude bits; -0.0 is first made +0.0, so equal
    logits get equal keys and equal keys are equal logits.
    """
    if KEY_BITS == 16:
        bits = x_raw.to(tl.int16, bitcast=True).to(tl.int32)
    else:
        bits = x_raw.to(tl.int32, bitcast=True)
    sign: tl.constexpr = -(1 << (KEY_BITS - 1))
    magnitude: tl.constexpr = (1 << (KEY_BITS - 1)) - 1
    bits = tl.where(bits == sign, 0, bits)
    return tl.where(bits < 0, bits ^ magnitude, bits)


@triton.jit
def _float_of_key(key, dtype: tl.constexpr, KEY_BITS: tl.constexpr):
    """The inverse of ``_sortable_key``: the logit (as fp32) whose key is ``key``."""
    magnitude: tl.constexpr = (1 << (KEY_BITS - 1)) - 1
    bits = tl.where(key < 0, key ^ magnitude, key)
    if KEY_BITS == 16:
        bits = bits.to(tl.int16)
    return bits.to(dtype, bitcast=True).to(tl.float32)


@triton.jit
def _choose_digit(histogram, remaining, prefix, shift: tl.constexpr, BINS: tl.constexpr):
    """One radix step: the digit (at ``shift``) of the key ranked ``remaining``-th from the top
    among those counted in ``histogram``; returns the prefix with it and the rank left within it.

    Count from the top: the wanted digit is the largest d with >= remaining keys at digits >= d;
    the keys at larger digits are all in K.
    """
    bins = tl.arange(0, BINS)
    at_or_above = tl.sum(histogram, 0) - tl.cumsum(histogram, 0) + histogram
    chosen = tl.sum((at_or_above >= remaining).to(tl.int32), 0) - 1
    remaining -= tl.sum(tl.where(bins > chosen, histogram, 0), 0)
    return prefix | (chosen << shift), remaining


@triton.jit
def _unsigned(key, KEY_BITS: tl.constexpr):
    """Key -> its offset in [0, 2**KEY_BITS) (int32 bits; wrapping for 32-bit keys): digit order is key order."""
    if KEY_BITS == 16:
        return key + 32768
    else:
        return key ^ -2147483648


@triton.jit
def _signed(offset, KEY_BITS: tl.constexpr):
    """The inverse of ``_unsigned``."""
    if KEY_BITS == 16:
        return offset - 32768
    else:
        return offset ^ -2147483648


@triton.jit
def _digit(key, shift: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr):
    return (_unsigned(key, KEY_BITS) >> shift) & ((1 << DIGIT_BITS) - 1)


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
    HAS_HEAD: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr,
):
    """Pass A. Returns m, s, s without the target, sum e^(z-m)(z-m), sum c (z-m), the target's rank,
    and with HAS_HEAD the first radix step of the head: the histogram of the keys' top digit and
    the number of logits equal to the target's before it (its place among ties).

    Per lane: the block is viewed as BLOCK // LANE lanes of LANE contiguous elements, and each lane
    keeps its own running max and sums, rescaled by its own max; the lanes are combined once, after
    the loop. With LANE = the elements of one thread's 16-byte load (the host's choice for aligned
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
    ranked_above = 0
    ties_before_target = 0
    histogram = tl.zeros((1 << DIGIT_BITS,), tl.int32)
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
        # Equal floats are equal keys: the float compare places the target among its ties. Block
        # reductions (integer counts need no rescaling; per-lane counters would cost registers).
        if HAS_STATS and HAS_HEAD:
            # Both counts from one block reduction: each is at most BLOCK < 2**16, ties in the high half.
            tl.static_assert(BLOCK < 65536)
            tie = (x == x_target) & (cols < target) & in_row
            packed = tl.sum(((x > x_target) & in_row).to(tl.int32) + (tie.to(tl.int32) << 16), 0)
            ranked_above += packed & 0xFFFF
            ties_before_target += packed >> 16
        elif HAS_STATS:  # the rank only: ties before the target counted with those above it
            before = (x > x_target) | ((x == x_target) & (cols < target))
            ranked_above += tl.sum((before & in_row).to(tl.int32), 0)
        elif HAS_HEAD:
            ties_before_target += tl.sum(((x == x_target) & (cols < target) & in_row).to(tl.int32), 0)
        if HAS_HEAD:
            key = _sortable_key(x_raw, KEY_BITS)
            histogram += tl.histogram(_digit(key, KEY_BITS - DIGIT_BITS, KEY_BITS, DIGIT_BITS), 1 << DIGIT_BITS,
                                      mask=in_row)
        m = m_new
    # The lanes, each rescaled to the row max (lanes that saw only -inf hold zero sums).
    row_max = tl.max(m, 0)
    shift = tl.where(m == float("-inf"), 0.0, m - row_max)
    factor = tl.where(m == float("-inf"), 0.0, tl.exp(shift))
    total_shifted = tl.sum(factor * (sum_exp_shifted + shift * sum_exp), 0)
    total_c_shifted = tl.sum(sum_c_shifted + shift * c_seen, 0)
    rank = 1 + ranked_above + ties_before_target
    return (row_max, tl.sum(factor * sum_exp, 0), tl.sum(factor * sum_exp_others, 0), total_shifted,
            total_c_shifted, rank, histogram, ties_before_target)


@triton.jit
def _bucket_histogram(
    row_ptr, V, prefix_key, PREFIX_SHIFT: tl.constexpr, SHIFT: tl.constexpr,
    BLOCK: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr,
):
    """A middle radix step (fp32 only): the histogram of the digit at SHIFT of the keys whose bits
    from PREFIX_SHIFT up are those of ``prefix_key``."""
    histogram = tl.zeros((1 << DIGIT_BITS,), tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        key = _sortable_key(tl.load(row_ptr + cols, mask=in_row, other=0.0), KEY_BITS)
        selected = in_row & ((key >> PREFIX_SHIFT) == (prefix_key >> PREFIX_SHIFT))
        histogram += tl.histogram(_digit(key, SHIFT, KEY_BITS, DIGIT_BITS), 1 << DIGIT_BITS, mask=selected)
    return histogram


@triton.jit
def _head(
    row_ptr, V, k, target, x_target_raw, ties_before_target, top_histogram, row_max, log_sum_exp, softcap,
    BLOCK: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """Passes R after pass A's top digit: the head K and its sums, by radix select on the keys.

    The middle digits (fp32: one) take a histogram pass each; the last pass takes the histogram of
    the last digit within the bucket that holds the k-th key, and sums pi and pi log pi over the
    keys above that bucket. The last histogram counts exact keys, and equal keys are equal logits
    with equal pi, so the sums over the rest of K are count x pi per bin: no pass after the select.
    Returns the threshold key (the k-th largest), how many logits equal to it are in K (the first
    ones in index order), and over K: the mass, the mass without the target, sum pi log pi without
    the target.
    """
    BINS: tl.constexpr = 1 << DIGIT_BITS
    PASSES: tl.constexpr = (KEY_BITS + DIGIT_BITS - 1) // DIGIT_BITS
    LAST_PREFIX_SHIFT: tl.constexpr = KEY_BITS - DIGIT_BITS * (PASSES - 1)
    prefix, remaining = _choose_digit(top_histogram, k, 0, KEY_BITS - DIGIT_BITS, BINS)  # an offset
    for middle in tl.static_range(1, PASSES - 1):
        shift: tl.constexpr = KEY_BITS - DIGIT_BITS * (middle + 1)
        histogram = _bucket_histogram(row_ptr, V, _signed(prefix, KEY_BITS), shift + DIGIT_BITS, shift,
                                      BLOCK, KEY_BITS, DIGIT_BITS)
        prefix, remaining = _choose_digit(histogram, remaining, prefix, shift, BINS)

    bucket = _signed(prefix, KEY_BITS) >> LAST_PREFIX_SHIFT
    histogram = tl.zeros((BINS,), tl.int32)
    mass_above = 0.0  # over the keys above the bucket, without the target
    plogp_above = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x_raw = tl.load(row_ptr + cols, mask=in_row, other=float("-inf"))
        key = _sortable_key(x_raw, KEY_BITS)
        key_bucket = key >> LAST_PREFIX_SHIFT
        histogram += tl.histogram(_digit(key, 0, KEY_BITS, DIGIT_BITS), BINS, mask=in_row & (key_bucket == bucket))
        log_p = (_softcap(x_raw.to(tl.float32), softcap, HAS_SOFTCAP) - row_max) - log_sum_exp
        p = _exp(log_p)
        above = in_row & (key_bucket > bucket) & (cols != target) & (p > 0.0)
        mass_above += tl.sum(tl.where(above, p, 0.0), 0)
        plogp_above += tl.sum(tl.where(above, p * log_p, 0.0), 0)
    prefix, ties_in_head = _choose_digit(histogram, remaining, prefix, 0, BINS)
    threshold = _signed(prefix, KEY_BITS)

    key_target = _sortable_key(x_target_raw, KEY_BITS)
    target_in = (key_target > threshold) | ((key_target == threshold) & (ties_before_target < ties_in_head))
    # Each bin of the last digit is one logit value: pi from the value, times how many are in K.
    bins = tl.arange(0, BINS)
    chosen = prefix & (BINS - 1)
    value = _float_of_key(_signed((prefix & ~(BINS - 1)) | bins, KEY_BITS), row_ptr.dtype.element_ty, KEY_BITS)
    log_p = (_softcap(value, softcap, HAS_SOFTCAP) - row_max) - log_sum_exp
    p = _exp(log_p)
    count = tl.where(bins > chosen, histogram, 0) + tl.where(bins == chosen, ties_in_head, 0)
    # The target's own entry, when it is in K and in this bucket, is not a wrong token.
    target_bin = _digit(key_target, 0, KEY_BITS, DIGIT_BITS)
    own = target_in & ((key_target >> LAST_PREFIX_SHIFT) == bucket) & (bins == target_bin)
    count -= own.to(tl.int32)
    counted = (count > 0) & (p > 0.0)
    mass_others = mass_above + tl.sum(tl.where(counted, count * p, 0.0), 0)
    plogp_others = plogp_above + tl.sum(tl.where(counted, count * (p * log_p), 0.0), 0)
    p_target = tl.exp((_softcap(x_target_raw.to(tl.float32), softcap, HAS_SOFTCAP) - row_max) - log_sum_exp)
    mass = mass_others + tl.where(target_in, p_target, 0.0)
    return threshold, ties_in_head, mass, mass_others, plogp_others


@triton.jit
def _last_tie_in_head(row_ptr, V, threshold, ties_wanted, BLOCK: tl.constexpr, KEY_BITS: tl.constexpr):
    """Index of the last logit equal to the threshold key that is in K (the first ``ties_wanted``
    of them in index order; -1: none), by a running tie count."""
    ties_seen = 0
    last_tie = -1
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        key = _sortable_key(tl.load(row_ptr + cols, mask=in_row, other=float("-inf")), KEY_BITS)
        tie = in_row & (key == threshold)
        tie_in = tie & (ties_seen + tl.cumsum(tie.to(tl.int32), 0) <= ties_wanted)
        last_tie = tl.maximum(last_tie, tl.max(tl.where(tie_in, cols, -1), 0))
        ties_seen += tl.sum(tie.to(tl.int32), 0)
    return last_tie


@triton.jit
def generalised_ce_forward(
    logits_ptr, stride_row, target_ptr, weight_ptr,
    loss_ptr, row_max_ptr, log_sum_exp_ptr, coef_ptr, scale_ptr, smooth_ptr, grad_target_ptr,
    threshold_ptr, ties_in_head_ptr,
    entropy_ptr, rank_ptr, topk_mass_ptr,
    class_weight_sum_ptr, V, ignore_index, k, beta, lambda_head, lambda_tail, label_smoothing,
    z_loss, softcap,
    BLOCK: tl.constexpr, LANE: tl.constexpr, KEY_BITS: tl.constexpr, SHAPED: tl.constexpr, FOCAL: tl.constexpr,
    HAS_HEAD: tl.constexpr, HAS_STATS: tl.constexpr, HAS_NEGATIVES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
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
            tl.store(ties_in_head_ptr + row, 0)
        if HAS_STATS:
            tl.store(entropy_ptr + row, 0.0)
            tl.store(rank_ptr + row, 0.0)
            tl.store(topk_mass_ptr + row, 0.0)
        return
    in_range = (target >= 0) & (target < V)
    target = tl.where(in_range, target, 0).to(tl.int32)  # never read out of bounds
    x_target_raw = 0.0
    if HAS_STATS or HAS_HEAD:  # pass A places the target among the logits
        x_target_raw = tl.load(row_ptr + target)
    # Radix digits: 8 bits (2 passes of the head) for 16-bit keys, 11 (3 passes) for fp32 keys.
    DIGIT_BITS: tl.constexpr = 8 if KEY_BITS == 16 else 11

    m, sum_exp, sum_exp_others, sum_exp_shifted, sum_c_shifted, rank, top_histogram, ties_before_target = (
        _online_pass(
            row_ptr, weight_ptr, V, target, x_target_raw.to(tl.float32), softcap,
            BLOCK, LANE, HAS_SOFTCAP, HAS_WEIGHT, HAS_SMOOTHING, HAS_STATS, HAS_NEGATIVES or HAS_STATS,
            HAS_HEAD, KEY_BITS, DIGIT_BITS,
        )
    )
    if not (HAS_STATS or HAS_HEAD):  # loaded after the pass: not held in a register across it
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
        threshold, ties_in_head, head_mass, head_mass_others, head_plogp_others = _head(
            row_ptr, V, k, target, x_target_raw, ties_before_target, top_histogram, m, log_sum_exp, softcap,
            BLOCK, KEY_BITS, DIGIT_BITS, HAS_SOFTCAP,
        )
        tl.store(threshold_ptr + row, threshold)
        tl.store(ties_in_head_ptr + row, ties_in_head)
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
    ties_in_head_ptr, V, vocab_start, ignore_index, lambda_head, lambda_tail, softcap,
    BLOCK: tl.constexpr, KEY_BITS: tl.constexpr, HAS_RANK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """d(sum_r grad_rows[r] loss[r]) / d logits, written once in the logits' dtype.

    The row may be a vocabulary shard, classes [vocab_start, vocab_start + V) of a larger
    vocabulary (0 and the whole vocabulary otherwise): the per-row state carries every global
    number (eps / V of the whole vocabulary in ``smooth``), so only the target's column moves.
    With a head, of the logits equal to the threshold the first ``ties_in_head`` (of the row or
    shard, in index order) are in K: a running tie count, with a cumsum only in blocks that hold ties.
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
        threshold = tl.load(threshold_ptr + row)
        ties_in_head = tl.load(ties_in_head_ptr + row)
        ties_seen = 0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x_raw = tl.load(row_ptr + cols, mask=in_row, other=float("-inf"))
        x = x_raw.to(tl.float32)
        z = _softcap(x, softcap, HAS_SOFTCAP)
        p = tl.where(z == float("-inf"), 0.0, _exp((z - row_max) - log_sum_exp))
        if HAS_RANK:
            key = _sortable_key(x_raw, KEY_BITS)
            head = key > threshold  # -inf padding never is: the threshold is a key of the row
            tie = in_row & (key == threshold)
            block_ties = tl.sum(tie.to(tl.int32), 0)
            if block_ties > 0:
                head |= tie & (ties_seen + tl.cumsum(tie.to(tl.int32), 0) <= ties_in_head)
            ties_seen += block_ties
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
