"""The torch backend: readable PyTorch for the generalised loss and its analytical gradient.

It is the CPU path and the oracle for the Triton kernels. It follows spec section 3 literally,
row chunk by row chunk so that no more than a few fp32 copies of one chunk are alive at a time:

    w_y = pi_y ** (1 - (1 - pi_y) ** beta)   (power)   or   (1 - pi_y) ** beta   (focal)
    w_a = lambda_head * pi_a  (a in K, a != y),   w_a = lambda_tail * pi_a  (a not in K, a != y)
    w_a <- c_y (1 - eps) w_a + c_a eps / V
    loss = -sum_a w_a log pi_a + zeta lse**2
    dloss/dz_j = pi_j W - w_j + 2 zeta lse pi_j,   W = sum_a w_a

The forward pass returns the per-row loss and a few per-row numbers (``RowState``); the backward
pass recomputes pi from the saved lse and writes the gradient once, already scaled by the incoming
per-row gradient. Nothing of size (N, V) lives between the two passes. The Triton backend keeps
the same contract.

``forward_rows`` / ``backward_rows`` hold one chunk's arithmetic; ``forward`` / ``backward`` loop
over chunks, eagerly or (``fused=True``, what a torch.compile'd graph runs, see
``precision_ce.ops``) through ``fused_rows``, which compiles a chunk's arithmetic once with Inductor.
"""

from __future__ import annotations

import functools
import math
import types
from typing import NamedTuple

import torch

from .config import LossParams, RewardConfig


def log_tiny(dtype: torch.dtype) -> float:
    """log of the dtype's smallest subnormal (-103.3 for fp32): 1 - pi_y below it is 0 in that
    dtype, so log(1 - pi_y) is clamped here instead of becoming -inf (0 * inf = NaN in the weights)."""
    info = torch.finfo(dtype)
    return math.log(info.tiny * info.eps)

LOG_WEIGHT_MAX = 80.0
"""The focal reward (1 - pi_y) ** beta diverges as pi_y -> 1 for beta < 0; w_y itself is capped at
e**80 (it only scales pi_j of the other tokens, all < 1 - pi_y). The target's gradient and loss use
w_y (1 - pi_y) and -w_y log pi_y, formed from the uncapped log weight; both stay <= 1."""

CHUNK_ELEMENTS = 1 << 21
"""Rows are processed in chunks of about this many logits (8 MiB per fp32 temporary)."""

FUSED_CHUNK_ELEMENTS = 1 << 25
"""The chunk size when Inductor fuses each chunk (``fused_rows``): fused code keeps almost no
temporaries of a chunk's size, and every call of compiled code pays a fixed cost per kernel, so
chunks are 16x larger."""


class RowState(NamedTuple):
    """Per-row numbers saved by the forward pass for the backward pass, all shaped (rows,).

    The gradient of row r is  g_j = pi_j (coef - scale * lambda_j) - smooth * c_j  for j != y and
    g_y = grad_target, where lambda_j is lambda_head inside the head K and lambda_tail outside it.
    An ignored row has every field 0, so its gradient is 0.
    """

    row_max: torch.Tensor  # max of the (soft-capped) logits, m
    log_sum_exp: torch.Tensor  # log sum_a e^(z_a - m); lse = m + log_sum_exp
    coef: torch.Tensor  # W + 2 zeta lse
    scale: torch.Tensor  # c_y (1 - eps)
    smooth: torch.Tensor  # eps / V
    grad_target: torch.Tensor  # the target column's gradient, formed without cancellation
    threshold: torch.Tensor  # the k-th largest raw logit (head rows only)
    last_tie: torch.Tensor  # index of the last logit equal to threshold that is still in K


class RowStats(NamedTuple):
    """Per-row diagnostics (fp32, shaped like the unreduced loss); all 0 for ignored rows.

    The top-k mass needs the head K: it is NaN (not computed) at stats level ``STATS`` when the
    loss itself has no head, and computed at ``FULL_STATS`` (extra passes over the logits).
    """

    entropy: torch.Tensor  # H = -sum_a pi_a log pi_a
    lse: torch.Tensor  # logsumexp of the (soft-capped) logits
    target_rank: torch.Tensor  # 1-based rank of the target among the raw logits
    topk_mass: torch.Tensor  # probability mass of the k largest logits


NO_STATS, STATS, FULL_STATS = 0, 1, 2
"""Stats levels (``with_stats`` of the backends; ``return_stats`` False / True / "full"): none;
entropy, lse and target rank, which cost nothing beyond the loss's own pass, and the top-k mass
only where the loss finds the head anyway; all of them."""


def finds_head(reward: RewardConfig, vocab: int, with_stats: int) -> bool:
    """Whether the forward pass finds the top-k head K: the loss needs it or full stats ask for its mass."""
    return reward.needs_rank(vocab) or with_stats == FULL_STATS


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """All arithmetic in fp32, or fp64 for fp64 logits."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_softcap(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """z = s tanh(x / s); -inf stays -inf (padding must not become -s)."""
    if softcap is None:
        return x
    return torch.where(x == -math.inf, x, softcap * torch.tanh(x / softcap))


def softcap_derivative(x: torch.Tensor, softcap: float) -> torch.Tensor:
    """dz/dx = 1 - tanh(x / s)**2."""
    return 1.0 - torch.tanh(x / softcap).square()


def target_weight(
    log_pi_y: torch.Tensor, log1m_pi_y: torch.Tensor, beta: float, positive_reward: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shaped ground-truth weight w_y and the two products the loss and gradient need.

    Args: log pi_y and log(1 - pi_y), shaped (rows,); the second computed from the mass of the
    other tokens so that it is accurate when pi_y -> 1.
    Returns (w_y, w_y * (1 - pi_y), -w_y * log pi_y), each formed in log space so that none of
    them is inf * 0 when pi_y is 0 or 1.
    """
    log1m = log1m_pi_y.clamp(min=log_tiny(log1m_pi_y.dtype))
    # log pi_y = log1p(-(1 - pi_y)) is the accurate form when pi_y > 1/2.
    log_pi = torch.where(log1m < -math.log(2.0), torch.log1p(-torch.exp(log1m)), log_pi_y)
    log_neg_log_pi = torch.log(-log_pi)  # -inf when pi_y rounds to 1
    if beta == 0.0:
        log_w = torch.zeros_like(log_pi)
    elif positive_reward == "focal":
        log_w = beta * log1m
    else:
        # log w_y = log pi_y * (1 - (1 - pi_y)**beta). For pi_y > 1/2 write it as
        # log pi_y + exp(log(-log pi_y) + beta log(1 - pi_y)), finite even when (1 - pi_y)**beta
        # overflows; below, -expm1 keeps 1 - (1 - pi_y)**beta accurate. pi_y = 0 takes the limit, 0.
        near_one = log_pi + torch.exp(log_neg_log_pi + beta * log1m)
        elsewhere = torch.where(log_pi == -math.inf, 0.0, log_pi * -torch.expm1(beta * log1m))
        log_w = torch.where(log1m < -math.log(2.0), near_one, elsewhere)
    # Cap w_y alone; the two products come from the uncapped log weight and stay finite.
    return log_w.clamp(max=LOG_WEIGHT_MAX).exp(), (log_w + log1m).exp(), (log_w + log_neg_log_pi).exp()


CROWDED = -1
"""``last_tie`` of a row whose ties at the threshold straddle K, as compiled code leaves it."""


class Head(NamedTuple):
    """The top-k head K of each row and the sums over it, all shaped (rows,)."""

    threshold: torch.Tensor  # the k-th largest raw logit
    last_tie: torch.Tensor  # logits equal to threshold are in K up to this index (V - 1: all)
    mass: torch.Tensor  # sum of pi over K
    mass_others: torch.Tensor  # the same without the target
    plogp_others: torch.Tensor  # sum of pi log pi over K without the target


def head_of(
    x: torch.Tensor, y: torch.Tensor, k: int, softcap: float | None, row_max: torch.Tensor,
    log_sum_exp: torch.Tensor,
) -> Head:
    """K = the first k positions of a stable descending sort of the raw logits x (rows, V).

    The sums over K need only the k largest values: equal logits have equal probabilities, so
    they do not depend on which of several tied indices ``topk`` returns. Index order matters
    only for membership: of the ties at the threshold, the lower indices enter K first.
    y: targets (rows, 1); softcap, row_max and log_sum_exp (rows,) turn logits into log pi.
    """
    vocab = x.shape[-1]
    top = x.topk(min(k + 1, vocab), dim=-1).values  # descending; one extra to spot crowded ties
    threshold = top[:, k - 1]
    ties_wanted = (top[:, :k] == threshold[:, None]).sum(-1)
    last_tie = torch.full_like(ties_wanted, vocab - 1)
    if k < vocab:
        crowded = top[:, k] == threshold  # some logits equal to the threshold stay outside K
        # The ties_wanted-th tie's index: the positions whose running tie count is below it,
        # for the (rare) crowded rows only. Compiled code cannot branch on data: it marks them
        # CROWDED and ``forward`` recomputes those rows eagerly.
        if torch.compiler.is_compiling():
            last_tie = torch.where(crowded, CROWDED, last_tie)
        elif crowded.any():
            running = (x[crowded] == threshold[crowded, None]).cumsum(-1)
            last_tie[crowded] = (running < ties_wanted[crowded, None]).sum(-1)
    x_y = x.gather(1, y)[:, 0]
    target_in = (x_y > threshold) | ((x_y == threshold) & (y[:, 0] <= last_tie))
    return Head(threshold, last_tie, *head_sums(top[:, :k], x_y, target_in, softcap, row_max, log_sum_exp))


def head_sums(
    top: torch.Tensor, x_y: torch.Tensor, target_in: torch.Tensor, softcap: float | None,
    row_max: torch.Tensor, log_sum_exp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mass, mass_others, plogp_others) of ``Head`` from the k largest raw logits ``top`` (rows, k).

    x_y: the target's raw logit and target_in: whether the target is in K, both (rows,).
    """
    log_p_top = (apply_softcap(top, softcap) - row_max[:, None]) - log_sum_exp[:, None]
    p_top = log_p_top.exp()
    # The target's own entry among the top values: the first one equal to its logit.
    own = (top == x_y[:, None]) & target_in[:, None]
    own &= own.cumsum(-1) == 1
    p_others = p_top.masked_fill(own, 0.0)
    return p_top.sum(-1), p_others.sum(-1), _xlogy_safe(p_others, log_p_top).sum(-1)


def in_head(x: torch.Tensor, threshold: torch.Tensor, last_tie: torch.Tensor) -> torch.Tensor:
    """Membership of K (rows, V) from the threshold and last tie index (see ``Head``)."""
    head = x >= threshold[:, None]
    index = torch.arange(x.shape[-1], device=x.device)
    if torch.compiler.is_compiling():  # no branch on data; fused, the extra terms cost little
        return head & ((x > threshold[:, None]) | (index <= last_tie[:, None]))
    cut = last_tie < x.shape[-1] - 1
    if cut.any():
        head[cut] &= (x[cut] > threshold[cut, None]) | (index <= last_tie[cut, None])
    return head


def target_rank(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 + #{a : x_a > x_y or (x_a == x_y and a < y)}; x (rows, V) raw logits, target (rows,)."""
    x_y = x.gather(1, target[:, None])
    index = torch.arange(x.shape[-1], device=x.device)
    before = (x > x_y) | ((x == x_y) & (index < target[:, None]))
    return 1 + before.sum(-1)


def _row_chunks(rows: int, vocab: int, fused: bool = False) -> list[slice]:
    step = max(1, (FUSED_CHUNK_ELEMENTS if fused else CHUNK_ELEMENTS) // max(vocab, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _xlogy_safe(weight: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """weight * log_p with 0 * -inf = 0 (a token of probability 0 that carries no weight)."""
    return torch.where(weight == 0, 0.0, weight * log_p)


class RowSums(NamedTuple):
    """Per-row numbers from which the loss and ``RowState`` follow (compute dtype, shaped (rows,)).

    The torch backend forms them from a chunk of whole rows; precision_ce.distributed from partial
    sums over vocabulary shards.
    """

    row_max: torch.Tensor  # m
    log_sum_exp: torch.Tensor  # log sum_a e^(z_a - m)
    log_pi_y: torch.Tensor
    log1m_pi_y: torch.Tensor  # log(1 - pi_y), from the mass of the other tokens
    plogp: torch.Tensor | None  # sum_a pi_a log pi_a (needed with negatives or stats)
    smooth_log_p: torch.Tensor | None  # sum_a c_a log pi_a (label smoothing)
    head: Head | None  # K and its sums (rank modes or stats)
    c_y: torch.Tensor | float  # the target's class weight


def shaped_rows(
    sums: RowSums, valid: torch.Tensor, class_weight_sum: torch.Tensor | float, vocab: int, params: LossParams
) -> tuple[torch.Tensor, RowState]:
    """Row loss and state from the per-row sums (spec section 3); ignored rows (``valid`` False) get 0.

    class_weight_sum: sum_a c_a over the whole vocabulary (V without class weights).
    """
    reward = params.reward
    eps = params.label_smoothing
    valid_c = valid.to(sums.row_max.dtype)
    w_y, w_y_times_1m, target_term = target_weight(
        sums.log_pi_y, sums.log1m_pi_y, reward.beta, reward.positive_reward
    )
    pi_y = sums.log_pi_y.exp()
    one_minus_pi_y = sums.log1m_pi_y.exp()
    head = sums.head

    # Shaped negatives w_a = lambda_a pi_a (a != y): only their sums, over the wrong tokens
    # in K and over all wrong tokens, enter the loss and W.
    if reward.lambda_head == 0.0 and reward.lambda_tail == 0.0:
        negative_mass, negative_loss = 0.0, 0.0
    else:
        plogp_others = sums.plogp - _xlogy_safe(pi_y, sums.log_pi_y)
        if reward.needs_rank(vocab):
            lambda_head, lambda_tail = reward.lambda_head, reward.lambda_tail
            negative_mass = lambda_tail * one_minus_pi_y + (lambda_head - lambda_tail) * head.mass_others
            negative_loss = -(lambda_tail * plogp_others + (lambda_head - lambda_tail) * head.plogp_others)
        else:
            uniform_lambda = reward.uniform_lambda(vocab)
            negative_mass = uniform_lambda * one_minus_pi_y
            negative_loss = -uniform_lambda * plogp_others

    c_y = sums.c_y
    scale = c_y * (1.0 - eps) * valid_c
    smooth = eps / vocab * valid_c
    row_loss = scale * (target_term + negative_loss)
    w_rest = scale * negative_mass  # W without the target's own weight
    if params.has_smoothing:
        row_loss = row_loss - smooth * sums.smooth_log_p
        w_rest = w_rest + smooth * (class_weight_sum - c_y)
    lse = sums.row_max + sums.log_sum_exp
    if params.has_z_loss:
        z_loss_grad = torch.where(valid, 2.0 * params.z_loss * lse, 0.0)
        row_loss = row_loss + params.z_loss * lse.square()
    else:
        z_loss_grad = 0.0

    w_y_final = scale * w_y + smooth * c_y
    state = RowState(
        row_max=sums.row_max,
        log_sum_exp=sums.log_sum_exp,
        coef=w_rest + w_y_final + z_loss_grad,
        scale=scale,
        smooth=smooth,
        # pi_y W - w_y = pi_y W_rest - (1 - pi_y) w_y: no cancellation when pi_y -> 1.
        grad_target=pi_y * (w_rest + z_loss_grad) - scale * w_y_times_1m - smooth * c_y * one_minus_pi_y,
        threshold=torch.zeros_like(lse) if head is None else head.threshold,
        last_tie=torch.zeros_like(lse, dtype=torch.long) if head is None else head.last_tie,
    )
    return torch.where(valid, row_loss, 0.0), state


def forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    params: LossParams,
    with_stats: int,
    fused: bool = False,
) -> tuple[torch.Tensor, RowState, RowStats | None]:
    """Loss per row and the state the backward pass needs.

    logits: (rows, V) float; target: (rows,) int64 with ignore_index for ignored rows;
    weight: (V,) class weights or None. Returns (loss (rows,) in the compute dtype, state, stats).
    ``fused``: run each chunk through Inductor (``fused_rows``) instead of eagerly.
    """
    rows, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    class_weight = None if weight is None else weight.to(cdt)
    class_weight_sum = float(vocab) if class_weight is None else class_weight.sum()
    loss = torch.empty(rows, dtype=cdt, device=logits.device)
    state = RowState(*(torch.empty(rows, dtype=cdt, device=logits.device) for _ in range(7)),
                     torch.zeros(rows, dtype=torch.long, device=logits.device))
    stats = RowStats(*(torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(4)))
    configuration = (params, logits.dtype, weight is None, with_stats)
    rows_fn = fused_rows(forward_rows, *configuration) if fused else forward_rows
    for chunk in _row_chunks(rows, vocab, fused):
        outputs = rows_fn(logits[chunk], target[chunk], class_weight, class_weight_sum, params, with_stats)
        _store(loss, state, stats, chunk, *outputs)
        if fused:  # rows whose ties at the threshold straddle K, eagerly (see ``head_of``)
            crowded = chunk.start + (outputs[1].last_tie == CROWDED).nonzero()[:, 0]
            if len(crowded):
                outputs = forward_rows(logits[crowded], target[crowded], class_weight, class_weight_sum,
                                       params, with_stats)
                _store(loss, state, stats, crowded, *outputs)
    return loss, state, (stats if with_stats else None)


def _store(loss: torch.Tensor, state: RowState, stats: RowStats, rows: slice | torch.Tensor,
           rows_loss: torch.Tensor, rows_state: RowState, rows_stats: RowStats | None) -> None:
    loss[rows] = rows_loss
    for field, value in zip(state, rows_state, strict=True):
        field[rows] = value
    if rows_stats is not None:
        for field, value in zip(stats, rows_stats, strict=True):
            field[rows] = value


def forward_rows(
    x: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    class_weight_sum: torch.Tensor | float,
    params: LossParams,
    with_stats: int,
) -> tuple[torch.Tensor, RowState, RowStats | None]:
    """``forward`` for one chunk of rows: x (rows, V) raw logits, target (rows,), class_weight (V,)
    in the compute dtype or None and its sum. Returns the chunk's loss, state and stats."""
    vocab = x.shape[1]
    reward = params.reward
    cdt = compute_dtype(x.dtype)
    has_negatives = reward.lambda_head != 0.0 or reward.lambda_tail != 0.0
    x = x.to(cdt)
    valid = target != params.ignore_index
    y = torch.where(valid, target, 0)[:, None]
    z = apply_softcap(x, params.softcap)

    # Work relative to the row max: z - m is exact, so log pi keeps full precision even for
    # logits in the thousands (z - lse would lose ulp(lse) to rounding). Every sum over the row
    # below reads only z - m and e^(z-m): two passes over the chunk once fused (max, then sums).
    row_max = z.amax(dim=-1)
    z_shifted = z - row_max[:, None]
    e = z_shifted.exp()
    is_target = torch.arange(vocab, device=x.device) == y
    sum_exp = e.sum(-1)
    log_sum_exp = sum_exp.log()
    lse = row_max + log_sum_exp
    log_pi_y = z_shifted.gather(1, y)[:, 0] - log_sum_exp
    # log(1 - pi_y) from the mass of the other tokens, exact where pi_y -> 1.
    log1m_pi_y = torch.where(is_target, 0.0, e).sum(-1).log() - log_sum_exp
    plogp = None
    if has_negatives or with_stats:
        # sum_a pi_a log pi_a = sum_a e^(z_a-m) (z_a-m) / s - log s
        plogp = _xlogy_safe(e, z_shifted).sum(-1) / sum_exp - log_sum_exp
    head = None
    if finds_head(reward, vocab, with_stats):
        head = head_of(x, y, min(reward.k, vocab), params.softcap, row_max, log_sum_exp)
    smooth_log_p = None
    if params.has_smoothing:
        # sum_a c_a log pi_a = sum_a c_a (z_a - m) - C log s
        c_z = z_shifted if class_weight is None else _xlogy_safe(class_weight, z_shifted)
        smooth_log_p = c_z.sum(-1) - class_weight_sum * log_sum_exp
    c_y = 1.0 if class_weight is None else class_weight[y[:, 0]]
    sums = RowSums(row_max, log_sum_exp, log_pi_y, log1m_pi_y, plogp, smooth_log_p, head, c_y)
    loss, state = shaped_rows(sums, valid, class_weight_sum, vocab, params)
    stats = None
    if with_stats:
        topk_mass = torch.full_like(lse, math.nan) if head is None else head.mass
        stats = RowStats(*(torch.where(valid, value, 0).float() for value in
                           (-plogp, lse, target_rank(x, y[:, 0]), topk_mass)))
    return loss, state, stats


def backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    params: LossParams,
    state: RowState,
    grad_rows: torch.Tensor,
    fused: bool = False,
    *,
    vocab: int | None = None,
    vocab_start: int = 0,
    in_place: bool = False,
) -> torch.Tensor:
    """d(sum_r grad_rows[r] * loss[r]) / d logits, shaped and typed like ``logits``.

    ``logits`` may be a vocabulary shard (precision_ce.distributed): columns ``vocab_start`` on of
    a vocabulary of ``vocab`` classes (default: all of them); ``weight`` is then the shard's too.
    ``in_place``: write the gradient over the logits, chunk by chunk, and return them.
    """
    rows, shard_vocab = logits.shape
    vocab = shard_vocab if vocab is None else vocab
    class_weight = None if weight is None else weight.to(compute_dtype(logits.dtype))
    grad = logits if in_place else torch.empty_like(logits, memory_format=torch.contiguous_format)
    rows_fn = fused_rows(backward_rows, params, logits.dtype, weight is None) if fused else backward_rows
    for chunk in _row_chunks(rows, shard_vocab, fused):
        chunk_state = RowState(*(field[chunk] for field in state))
        rows_fn(logits[chunk], target[chunk], class_weight, params, chunk_state, grad_rows[chunk], grad[chunk],
                vocab, vocab_start)
    return grad


def backward_rows(
    x: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    params: LossParams,
    state: RowState,
    grad_rows: torch.Tensor,
    out: torch.Tensor,
    vocab: int,
    vocab_start: int,
) -> None:
    """``backward`` for one chunk of rows, written into ``out`` (the chunk's rows of the gradient;
    fused, the one write of the gradient, not a temporary and a copy). x holds columns
    ``vocab_start`` on of a vocabulary of ``vocab`` classes."""
    shard_vocab = x.shape[1]
    reward = params.reward
    x = x.to(compute_dtype(x.dtype))
    s = state._replace(**{f: getattr(state, f)[:, None] for f in RowState._fields})
    valid = target != params.ignore_index
    y = torch.where(valid, target, 0)[:, None]
    p = ((apply_softcap(x, params.softcap) - s.row_max) - s.log_sum_exp).exp()
    if reward.needs_rank(vocab):
        head = in_head(x, s.threshold[:, 0], s.last_tie[:, 0])
        coef = torch.where(head, s.coef - s.scale * reward.lambda_head, s.coef - s.scale * reward.lambda_tail)
    else:
        coef = s.coef - s.scale * reward.uniform_lambda(vocab)
    g = p * coef
    if params.has_smoothing:
        g = g - s.smooth * (1.0 if class_weight is None else class_weight)
    # The target's column, where this shard holds it.
    is_target = torch.arange(vocab_start, vocab_start + shard_vocab, device=x.device) == y
    g = torch.where(is_target, s.grad_target, g) * grad_rows[:, None].to(x.dtype)
    g = torch.where(valid[:, None], g, 0.0)  # also when an ignored row's logits are all -inf
    if params.has_softcap:
        g = g * softcap_derivative(x, params.softcap)
    out.copy_(g)


@functools.cache
def fused_rows(rows_fn, *configuration):  # type: ignore[no-untyped-def]
    """``rows_fn`` (``forward_rows`` or ``backward_rows``) compiled by Inductor, once per process
    and ``configuration`` (the params, dtype and flags that its code specialises on).

    What the torch backend runs inside a torch.compile'd graph (``precision_ce.ops``): Dynamo
    compiles one chunk's arithmetic, with the number of rows symbolic (so the last, shorter chunk
    reuses it), instead of unrolling the chunk loop; Inductor fuses the elementwise work and the
    reductions into a few passes over each chunk. Dynamo caps recompiles per code object (8), so
    each configuration gets its own copy of the code object.
    """
    code = rows_fn.__code__.replace()
    copy = types.FunctionType(code, rows_fn.__globals__, rows_fn.__name__, rows_fn.__defaults__, rows_fn.__closure__)
    compiled = torch.compile(copy, dynamic=True, fullgraph=True)

    @functools.wraps(rows_fn)
    def run(x: torch.Tensor, *args):  # type: ignore[no-untyped-def]
        # The same dispatch keys and no autograd on every call, whichever path (autograd's
        # forward, a compiled graph, opcheck) reached the op: else Dynamo guards recompile.
        with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
            return compiled(x.detach(), *args)

    return run
