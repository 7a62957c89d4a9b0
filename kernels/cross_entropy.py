"""Triton kernels for the generalised next-token loss: one program per row of logits.

Forward (``generalised_ce_forward``), all in one launch, reading the row
    A   once, online (each lane of a thread's 16-byte load on its own max, combined per row):
        max m, s = sum e^(z-m), the same sum without the target (-> log(1 - pi_y)
        without cancellation), sum e^(z-m) (z-m) (-> sum_a pi_a log pi_a, the entropy) and, with
        label smoothing, sum c_a (z_a - m); with stats also the target's rank; with a head also
        the slot maxima (the largest logit at each of the block's BLOCK positions), whose k-th
        largest is a lower bound ("floor") of the k-th largest logit;
    R   only with a head (lambda_head != lambda_tail and k < V, or return_stats="full"): the
        groups of a 16-byte load's logits that hold a logit >= the floor, "candidates" (about k
        of them: the floor is at most a few slot collisions below the k-th largest), compacted in
        index order into a small per-row buffer; the head K is among them, so the radix select of
        the k-th largest logit and the sums over K take the candidates alone (a gather, no pass).
        A row with more than CAP candidate groups (k > CAP / 2, many ties at the floor) takes the
        radix select over the whole row instead: a histogram pass per digit (16-bit keys: 2,
        fp32: 3) and a pass for the sums over K.
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
            ranked_above += tl.sum((before & in_row).to(tl.int32), 0)
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
            total_c_shifted, 1 + ranked_above, slot_max)


@triton.jit
def _radix_digit(key, selected, prefix, STEP: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr):
    """Radix step STEP (0: the top digit) of a select on ``key``: each key's digit, and which keys
    take part (those ``selected`` whose higher digits are the ``prefix`` chosen so far)."""
    PASSES: tl.constexpr = (KEY_BITS + DIGIT_BITS - 1) // DIGIT_BITS
    SHIFT: tl.constexpr = KEY_BITS - DIGIT_BITS * (STEP + 1) if STEP < PASSES - 1 else 0
    offset = _unsigned(key, KEY_BITS)
    if STEP > 0:
        ABOVE: tl.constexpr = KEY_BITS - DIGIT_BITS * STEP
        selected = selected & ((offset >> ABOVE) == (prefix >> ABOVE))
    return (offset >> SHIFT) & ((1 << DIGIT_BITS) - 1), selected


@triton.jit
def _radix_choose(histogram, remaining, prefix, STEP: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr):
    """Radix step STEP, given the histogram of its digits (``_radix_digit``): the digit of the key
    ranked ``remaining``-th from the top; returns the prefix with it and the rank left within it.

    Count from the top: the wanted digit is the largest d with >= remaining keys at digits >= d;
    the keys at larger digits are all in K. After the last step the prefix is the key (an offset,
    ``_unsigned``) and the rank left is how many keys equal to it are in K.
    """
    PASSES: tl.constexpr = (KEY_BITS + DIGIT_BITS - 1) // DIGIT_BITS
    SHIFT: tl.constexpr = KEY_BITS - DIGIT_BITS * (STEP + 1) if STEP < PASSES - 1 else 0
    bins = tl.arange(0, 1 << DIGIT_BITS)
    at_or_above = tl.sum(histogram, 0) - tl.cumsum(histogram, 0) + histogram
    chosen = tl.sum((at_or_above >= remaining).to(tl.int32), 0) - 1
    remaining -= tl.sum(tl.where(bins > chosen, histogram, 0), 0)
    return prefix | (chosen << SHIFT), remaining


@triton.jit
def _kth_largest(key, selected, k, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr):
    """Radix select in registers: the k-th largest of the ``selected`` keys (k <= their number),
    and how many keys equal to it are among the k largest."""
    PASSES: tl.constexpr = (KEY_BITS + DIGIT_BITS - 1) // DIGIT_BITS
    prefix = 0
    remaining = k
    for step in tl.static_range(PASSES):
        digit, taking_part = _radix_digit(key, selected, prefix, step, KEY_BITS, DIGIT_BITS)
        histogram = tl.histogram(digit, 1 << DIGIT_BITS, mask=taking_part)
        prefix, remaining = _radix_choose(histogram, remaining, prefix, step, KEY_BITS, DIGIT_BITS)
    return _signed(prefix, KEY_BITS), remaining


@triton.jit
def _head_floor(slot_max, k):
    """A lower bound of the k-th largest logit: the k-th largest slot maximum (pass A), rounded
    down to a 16-bit key (exact for 16-bit logits, the next lower 16-bit key for fp32).

    The slots hold distinct logits, so >= k logits are >= it. -inf when there are fewer than k
    slots, and where the rounded key is no float (the NaN bits next to -inf): every logit then."""
    SLOTS: tl.constexpr = slot_max.shape[0]
    key16 = _sortable_key(slot_max, 32) >> 16  # the top half of an order-preserving key keeps the order
    key16, _ = _kth_largest(key16, key16 == key16, tl.minimum(k, SLOTS), 16, 8)
    floor = _float_of_key(key16 << 16, tl.float32, 32)
    return tl.where((k <= SLOTS) & (floor == floor), floor, float("-inf"))


@triton.jit
def _popcount(x):
    """Set bits of each int64 (SWAR: the interpreter runs no libdevice popc)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return ((x * 0x0101010101010101) >> 56).to(tl.int32)


@triton.jit
def _collect_candidates(row_ptr, V, floor, candidates_ptr, CAP: tl.constexpr, BLOCK: tl.constexpr,
                        GROUP: tl.constexpr):
    """Pass R: the groups of GROUP contiguous logits that hold a logit >= ``floor`` (their first
    columns) into ``candidates_ptr[:CAP]``; returns how many there are (only the first CAP are
    written when there are more). At most 64 blocks per row (the caller's limit).

    Groups, not logits: candidates are sparse (about k of V), and a group is one thread's vector
    load on aligned rows. The loop only sets bits, in the thread that holds the group: bit b of
    ``hits[g]`` says group g of block b holds a candidate. The groups are written after the loop,
    with one scan per row: group position by group position, each position's blocks in order
    (a fixed order, not the index order)."""
    GROUPS: tl.constexpr = BLOCK // GROUP
    positions = tl.arange(0, GROUPS) * GROUP
    hits = tl.zeros((GROUPS,), tl.int64)
    for start in range(0, V, BLOCK):
        x_raw = tl.load(row_ptr + start + tl.arange(0, BLOCK), mask=start + tl.arange(0, BLOCK) < V,
                        other=float("-inf"))
        # The group's max in the logits' dtype (exact), one compare per group; a group past the row
        # (all -inf) must not pass a floor of -inf.
        hit = (tl.max(tl.reshape(x_raw, (GROUPS, GROUP)), 1).to(tl.float32) >= floor) & (start + positions < V)
        hits |= hit.to(tl.int64) << (start // BLOCK)
    counts = _popcount(hits)
    slot = tl.cumsum(counts, 0) - counts
    for start in range(0, V, BLOCK):
        hit = ((hits >> (start // BLOCK)) & 1) != 0
        tl.store(candidates_ptr + slot, start + positions, mask=hit & (slot < CAP))
        slot += hit.to(tl.int32)
    return tl.sum(counts, 0)


@triton.jit
def _head_terms(x_raw, cols, in_head, target, row_max, log_sum_exp, softcap, HAS_SOFTCAP: tl.constexpr):
    """A block's share of the sums over K (``in_head``): sum pi and sum pi log pi over K without
    the target, and 1 if the target is in K (else 0)."""
    log_p = (_softcap(x_raw.to(tl.float32), softcap, HAS_SOFTCAP) - row_max) - log_sum_exp
    p = _exp(log_p)
    counted = in_head & (cols != target) & (p > 0.0)
    return (tl.sum(tl.where(counted, p, 0.0), 0), tl.sum(tl.where(counted, p * log_p, 0.0), 0),
            tl.sum((in_head & (cols == target)).to(tl.int32), 0))


@triton.jit
def _head_of_candidates(
    row_ptr, V, candidates_ptr, count, k, target, row_max, log_sum_exp, softcap,
    CAP: tl.constexpr, GROUP: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """The head K from pass R's ``count`` <= CAP groups (K is among their logits: the rest of the
    row is below the floor): the threshold key (the k-th largest logit), the column of the last
    logit equal to it in K, the mass of K and the sums over K without the target (``_head_terms``).
    No pass over the row: a gather of CAP x GROUP logits.

    K takes the ties at the threshold lowest column first; the candidates are not in index order,
    so the last tie in K is found by a radix select on the ties' columns (the ties_in_head-th
    smallest), which no order of the candidates changes."""
    slots = tl.arange(0, CAP)
    starts = tl.load(candidates_ptr + slots, mask=slots < count, other=V)
    cols = tl.reshape(starts[:, None] + tl.arange(0, GROUP)[None, :], (CAP * GROUP,))
    valid = cols < V
    x_raw = tl.load(row_ptr + cols, mask=valid, other=0.0)
    key = _sortable_key(x_raw, KEY_BITS)
    threshold, ties_in_head = _kth_largest(key, valid, k, KEY_BITS, DIGIT_BITS)
    tie = valid & (key == threshold)
    minus_last_tie, _ = _kth_largest(-cols, tie, ties_in_head, 32, 8)
    in_head = (valid & (key > threshold)) | (tie & (cols <= -minus_last_tie))
    mass_others, plogp_others, target_in = _head_terms(
        x_raw, cols, in_head, target, row_max, log_sum_exp, softcap, HAS_SOFTCAP)
    return threshold, -minus_last_tie, mass_others, plogp_others, target_in


@triton.jit
def _head_of_row(
    row_ptr, V, k, target, row_max, log_sum_exp, softcap,
    BLOCK: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """``_head_of_candidates`` for a row whose candidates overflowed (ties at the floor, k > the
    candidates' room): radix select over the whole row, a histogram pass per digit (16-bit keys:
    2, fp32: 3), then a pass for the sums over K."""
    PASSES: tl.constexpr = (KEY_BITS + DIGIT_BITS - 1) // DIGIT_BITS
    prefix = 0
    remaining = k
    for step in tl.static_range(PASSES):
        histogram = tl.zeros((1 << DIGIT_BITS,), tl.int32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < V
            key = _sortable_key(tl.load(row_ptr + cols, mask=in_row, other=0.0), KEY_BITS)
            digit, taking_part = _radix_digit(key, in_row, prefix, step, KEY_BITS, DIGIT_BITS)
            histogram += tl.histogram(digit, 1 << DIGIT_BITS, mask=taking_part)
        prefix, remaining = _radix_choose(histogram, remaining, prefix, step, KEY_BITS, DIGIT_BITS)
    threshold = _signed(prefix, KEY_BITS)
    ties_seen = 0
    mass_others = 0.0
    plogp_others = 0.0
    target_in = 0
    last_tie = -1
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x_raw = tl.load(row_ptr + cols, mask=in_row, other=0.0)
        key = _sortable_key(x_raw, KEY_BITS)
        tie = in_row & (key == threshold)
        ties = tie.to(tl.int32)
        tie_in = tie & (ties_seen + tl.cumsum(ties, 0) <= remaining)  # in index order: a running count
        mass, plogp, own = _head_terms(x_raw, cols, (in_row & (key > threshold)) | tie_in, target, row_max,
                                       log_sum_exp, softcap, HAS_SOFTCAP)
        mass_others += mass
        plogp_others += plogp
        target_in += own
        ties_seen += tl.sum(ties, 0)
        last_tie = tl.maximum(last_tie, tl.max(tl.where(tie_in, cols, -1), 0))
    return threshold, last_tie, mass_others, plogp_others, target_in


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
