"""The head K of a row (its k largest logits, ties lowest column first), for the forward kernel.

Keys: raw 16/32-bit floats as int32 whose signed order is the floats' (``_sortable_key``); radix
select in registers on 8-bit digits (``_kth_largest``). The forward finds K from a few
candidates: pass A's slot maxima give a floor of the k-th largest logit (``_head_floor``), pass R
marks the 16-byte groups holding a logit at or above it (``_collect_candidates``), and the
select and the sums over K take those groups alone (``_head_of_candidates``); a row whose
candidates overflow selects over the whole row (``_head_of_row``). ``_last_tie_in_head`` serves a
vocabulary shard, given the global threshold.
"""

import triton
import triton.language as tl

from .numerics import _exp, _softcap


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
        cols = start + tl.arange(0, BLOCK)
        x_raw = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
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
def _ties_in_head(tie, ties_seen, ties_wanted):
    """Of a block's ties (logits equal to the threshold), those in K: the row's first ``ties_wanted``
    in index order, ``ties_seen`` of them in earlier blocks. Returns them and the block's ties."""
    ties = tie.to(tl.int32)
    return tie & (ties_seen + tl.cumsum(ties, 0) <= ties_wanted), tl.sum(ties, 0)


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
    so where the ties straddle K the last tie in K is found by a radix select on the ties' columns
    (the ties_in_head-th smallest), which no order of the candidates changes."""
    slots = tl.arange(0, CAP)
    starts = tl.load(candidates_ptr + slots, mask=slots < count, other=V)
    cols = tl.reshape(starts[:, None] + tl.arange(0, GROUP)[None, :], (CAP * GROUP,))
    valid = cols < V
    x_raw = tl.load(row_ptr + cols, mask=valid, other=0.0)
    key = _sortable_key(x_raw, KEY_BITS)
    threshold, ties_in_head = _kth_largest(key, valid, k, KEY_BITS, DIGIT_BITS)
    tie = valid & (key == threshold)
    last_tie = tl.max(tl.where(tie, cols, -1), 0)
    if ties_in_head < tl.sum(tie.to(tl.int32), 0):  # the ties straddle K (rare but for 16-bit logits)
        minus_last_tie, _ = _kth_largest(-cols, tie, ties_in_head, 32, 8)
        last_tie = -minus_last_tie
    in_head = (valid & (key > threshold)) | (tie & (cols <= last_tie))
    mass_others, plogp_others, target_in = _head_terms(
        x_raw, cols, in_head, target, row_max, log_sum_exp, softcap, HAS_SOFTCAP)
    return threshold, last_tie, mass_others, plogp_others, target_in


@triton.jit
def _head_of_row(
    row_ptr, V, k, target, row_max, log_sum_exp, softcap,
    BLOCK: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """``_head_of_candidates`` for a row whose candidates overflowed (ties at the floor, k > the
    candidates' room): radix select over the whole row, a histogram pass per 8-bit digit (16-bit
    keys: 2, fp32: 4), then a pass for the sums over K."""
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
        tie_in, ties = _ties_in_head(in_row & (key == threshold), ties_seen, remaining)
        mass, plogp, own = _head_terms(x_raw, cols, (in_row & (key > threshold)) | tie_in, target, row_max,
                                       log_sum_exp, softcap, HAS_SOFTCAP)
        mass_others += mass
        plogp_others += plogp
        target_in += own
        ties_seen += ties
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
        tie_in, ties = _ties_in_head(in_row & (key == threshold), ties_seen, ties_wanted)
        last_tie = tl.maximum(last_tie, tl.max(tl.where(tie_in, cols, -1), 0))
        ties_seen += ties
    return last_tie
