"""Triton kernels for the generalised next-token loss: one program per row of logits.

Forward (``generalised_ce_forward``), all in one launch, reading the row
    A   once, online: max m, s = sum e^(z-m), the same sum without the target (-> log(1 - pi_y)
        without cancellation), sum e^(z-m) (z-m) (-> sum_a pi_a log pi_a, the entropy) and, with
        label smoothing, sum c_a (z_a - m); with stats also the target's rank;
    R   only with a head (lambda_head != lambda_tail and k < V) or stats: radix select of the k-th
        largest raw logit on order-preserving integer keys, one 8-bit digit histogram per pass
        (2 passes for 16-bit dtypes, 4 for fp32);
    H   only with a head: the head mass and sum pi log pi over K, resolving ties at the threshold
        by index with a running tie count;
and writes the row loss and the per-row state of the backward pass. No gradient is stored.

Backward (``generalised_ce_backward``) reads the row once more and writes the gradient once,
already multiplied by the incoming per-row gradient:
    g_j = pi_j (coef - scale * lambda_j) - smooth * c_j   (j != y),    g_y = grad_target,
times dz/dx = 1 - tanh(x/s)**2 under softcap. See precision_ce/reference.py for the same
formulas in PyTorch and docs/design.md for the pass and memory-traffic accounting.

All arithmetic is fp32 whatever the logits' dtype; offsets are int64.
"""

import triton
import triton.language as tl

# Globals a kernel reads must be tl.constexpr instances (an annotation is not enough).
LN2 = tl.constexpr(0.6931471805599453)
LOG_TINY = tl.constexpr(-103.27892990343185)  # log(2**-149), fp32's smallest subnormal
LOG_WEIGHT_MAX = tl.constexpr(80.0)  # cap of log w_y (focal reward, beta < 0, pi_y -> 1)


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
    """Raw 16/32-bit floats -> int64 keys in [0, 2**KEY_BITS) with the order of the floats.

    Negative floats flip all bits, positive ones flip the sign bit; -0.0 is first made +0.0 so
    that equal logits get equal keys.
    """
    if KEY_BITS == 16:
        bits = x_raw.to(tl.int16, bitcast=True).to(tl.int64)
    else:
        bits = x_raw.to(tl.int32, bitcast=True).to(tl.int64)
    sign: tl.constexpr = 1 << (KEY_BITS - 1)
    bits = tl.where(bits == -sign, 0, bits)
    flip = (bits >> 63) | sign
    return (bits ^ flip) & ((1 << KEY_BITS) - 1)


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
    BLOCK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_STATS: tl.constexpr, HAS_PLOGP: tl.constexpr,
):
    """Pass A. Returns m, s, s without the target, sum e^(z-m)(z-m), sum c (z-m), target rank."""
    m = float("-inf")
    sum_exp = 0.0
    sum_exp_others = 0.0
    sum_exp_shifted = 0.0  # sum e^(z-m) (z-m); rescaled like sum_exp when m grows
    sum_c_shifted = 0.0  # sum c (z-m); shifted by the change of m times the classes seen
    c_seen = 0.0
    rank = 1
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        z = _softcap(x, softcap, HAS_SOFTCAP)
        m_new = tl.maximum(m, tl.max(z, 0))
        # Guards for blocks (and rows) that are all -inf: never -inf - (-inf).
        shift = tl.where(m == float("-inf"), 0.0, m - m_new)
        alpha = tl.where(m == float("-inf"), 0.0, tl.exp(shift))
        z_shifted = tl.where(z == float("-inf"), z, z - m_new)
        e = tl.exp(z_shifted)
        if HAS_PLOGP:
            sum_exp_shifted = alpha * (sum_exp_shifted + shift * sum_exp) + tl.sum(
                tl.where(e > 0.0, e * z_shifted, 0.0), 0
            )
        sum_exp = alpha * sum_exp + tl.sum(e, 0)
        sum_exp_others = alpha * sum_exp_others + tl.sum(tl.where(cols == target, 0.0, e), 0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                c = tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            else:
                c = tl.where(in_row, 1.0, 0.0)
            sum_c_shifted += shift * c_seen + tl.sum(tl.where(c == 0.0, 0.0, c * z_shifted), 0)
            c_seen += tl.sum(c, 0)
        if HAS_STATS:
            before = (x > x_target) | ((x == x_target) & (cols < target))
            rank += tl.sum((before & in_row).to(tl.int32), 0)
        m = m_new
    return m, sum_exp, sum_exp_others, sum_exp_shifted, sum_c_shifted, rank


@triton.jit
def _radix_select(row_ptr, V, k, BLOCK: tl.constexpr, KEY_BITS: tl.constexpr):
    """Pass R. Key of the k-th largest raw logit, and how many logits equal to it are in K."""
    prefix = tl.zeros((), tl.int64)
    remaining = k  # rank of the wanted key among the keys that share the prefix
    bins = tl.arange(0, 256)
    for digit_pass in tl.static_range(KEY_BITS // 8):
        shift = KEY_BITS - 8 * (digit_pass + 1)
        histogram = tl.zeros((256,), tl.int32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < V
            key = _sortable_key(tl.load(row_ptr + cols, mask=in_row, other=0.0), KEY_BITS)
            selected = in_row & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            digit = ((key >> shift) & 255).to(tl.int32)
            histogram += tl.histogram(digit, 256, mask=selected)
        # Count from the top: the wanted key's digit is the largest d with >= remaining keys at
        # digits >= d; the keys at larger digits are all in K.
        at_or_above = tl.sum(histogram, 0) - tl.cumsum(histogram, 0) + histogram
        chosen = tl.sum((at_or_above >= remaining).to(tl.int32), 0) - 1
        remaining -= tl.sum(tl.where(bins > chosen, histogram, 0), 0)
        prefix = prefix | (chosen.to(tl.int64) << shift)
    return prefix, remaining


@triton.jit
def _head_pass(
    row_ptr, V, target, row_max, log_sum_exp, threshold, ties_wanted, softcap,
    BLOCK: tl.constexpr, KEY_BITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HEAD_SUMS: tl.constexpr,
):
    """Pass H. Index of the last tie in K, and over K: mass, mass without y, sum pi log pi without y.

    Without HEAD_SUMS only the last tie (the sums stay 0): a vocabulary shard's pass, whose sums
    over K come from the gathered top values (kernels/vocab_parallel.py).
    """
    ties_seen = 0
    last_tie = -1
    mass = 0.0
    mass_others = 0.0
    plogp_others = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x_raw = tl.load(row_ptr + cols, mask=in_row, other=float("-inf"))
        key = _sortable_key(x_raw, KEY_BITS)
        tie = in_row & (key == threshold)
        # Ties enter K in index order: the running count decides.
        tie_in = tie & (ties_seen + tl.cumsum(tie.to(tl.int32), 0) <= ties_wanted)
        head = (in_row & (key > threshold)) | tie_in
        last_tie = tl.maximum(last_tie, tl.max(tl.where(tie_in, cols, -1), 0))
        ties_seen += tl.sum(tie.to(tl.int32), 0)
        if HEAD_SUMS:
            log_p = (_softcap(x_raw.to(tl.float32), softcap, HAS_SOFTCAP) - row_max) - log_sum_exp
            p = tl.where(head, tl.exp(log_p), 0.0)
            others = head & (cols != target) & (p > 0.0)
            mass += tl.sum(p, 0)
            mass_others += tl.sum(tl.where(others, p, 0.0), 0)
            plogp_others += tl.sum(tl.where(others, p * log_p, 0.0), 0)
    return last_tie, mass, mass_others, plogp_others


@triton.jit
def generalised_ce_forward(
    logits_ptr, stride_row, target_ptr, weight_ptr,
    loss_ptr, row_max_ptr, log_sum_exp_ptr, coef_ptr, scale_ptr, smooth_ptr, grad_target_ptr,
    threshold_ptr, last_tie_ptr,
    entropy_ptr, rank_ptr, topk_mass_ptr,
    class_weight_sum_ptr, V, ignore_index, k, beta, lambda_head, lambda_tail, label_smoothing,
    z_loss, softcap,
    BLOCK: tl.constexpr, KEY_BITS: tl.constexpr, SHAPED: tl.constexpr, FOCAL: tl.constexpr,
    HAS_HEAD: tl.constexpr, HAS_STATS: tl.constexpr, HAS_NEGATIVES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """Row loss and backward state. ``lambda_tail`` is the reward of every wrong token when
    HAS_HEAD is False (the host passes the uniform reward there)."""
    tl.static_assert(HAS_HEAD or not HAS_STATS, "the top-k mass of the stats needs the head passes")
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < V)
    target = tl.where(in_range, target, 0).to(tl.int32)  # never read out of bounds
    x_target = tl.load(row_ptr + target).to(tl.float32)

    m, sum_exp, sum_exp_others, sum_exp_shifted, sum_c_shifted, rank = _online_pass(
        row_ptr, weight_ptr, V, target, x_target, softcap,
        BLOCK, HAS_SOFTCAP, HAS_WEIGHT, HAS_SMOOTHING, HAS_STATS, HAS_NEGATIVES or HAS_STATS,
    )
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
        threshold, ties_wanted = _radix_select(row_ptr, V, k, BLOCK, KEY_BITS)
        last_tie, head_mass, head_mass_others, head_plogp_others = _head_pass(
            row_ptr, V, target, m, log_sum_exp, threshold, ties_wanted, softcap,
            BLOCK, KEY_BITS, HAS_SOFTCAP, True,
        )
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
    valid = ~ignored & in_range
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
    bad = ~ignored & ~in_range
    tl.store(loss_ptr + row, tl.where(bad, float("nan"), tl.where(ignored, 0.0, loss)))
    tl.store(row_max_ptr + row, m)
    tl.store(log_sum_exp_ptr + row, log_sum_exp)
    tl.store(coef_ptr + row, tl.where(bad, float("nan"), coef))
    tl.store(scale_ptr + row, scale)
    tl.store(smooth_ptr + row, smooth)
    tl.store(grad_target_ptr + row, grad_target)
    if HAS_STATS:
        tl.store(entropy_ptr + row, -plogp)
        tl.store(rank_ptr + row, tl.where(ignored, 0, rank).to(tl.float32))
        tl.store(topk_mass_ptr + row, head_mass)


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
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_ptr = grad_ptr + row * grad_stride_row
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
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
        last_tie = tl.load(last_tie_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x_raw = tl.load(row_ptr + cols, mask=in_row, other=float("-inf"))
        x = x_raw.to(tl.float32)
        z = _softcap(x, softcap, HAS_SOFTCAP)
        p = tl.where(z == float("-inf"), 0.0, tl.exp((z - row_max) - log_sum_exp))
        if HAS_RANK:
            key = _sortable_key(x_raw, KEY_BITS)
            head = (key > threshold) | ((key == threshold) & (cols <= last_tie))
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
        g = tl.where(valid, g, 0.0)
        tl.store(out_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=in_row)
