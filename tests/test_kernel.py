"""The Triton kernels against the torch backend and the fp64 surrogate.

On a CPU machine they run under the Triton interpreter with 16-wide blocks (``small_blocks``), so
every row spans several blocks and most end in a ragged tail; on a CUDA machine the same tests
run the compiled kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_logits, random_targets, surrogate_loss_fp64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from precision_ce import RewardConfig, cross_entropy, triton_backend

pytestmark = pytest.mark.usefixtures("small_blocks")

# The kernel and the torch backend both compute in fp32 and round the gradient once to the
# logits' dtype, so they may differ by one rounding of that dtype.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def run(backend: str, logits: torch.Tensor, target: torch.Tensor, device: str = "cpu", return_stats="full",
        **options):
    """Per-row loss (fp32), gradient (logits' dtype) and stats of one backend."""
    options = {name: value.to(device) if isinstance(value, torch.Tensor) else value
               for name, value in options.items()}
    x = logits.to(device).requires_grad_()
    loss, stats = cross_entropy(x, target.to(device), reduction="none", return_stats=return_stats,
                                backend=backend, **options)
    (grad,) = torch.autograd.grad(loss.float().sum(), x)
    return loss.detach().float().cpu(), grad.cpu(), [s.cpu() for s in stats]


def assert_matches_torch_backend(logits: torch.Tensor, target: torch.Tensor, device: str, **options) -> None:
    got_loss, got_grad, got_stats = run("triton", logits, target, device, **options)
    want_loss, want_grad, want_stats = run("torch", logits, target, **options)
    assert_same_results((got_loss, got_grad, got_stats), (want_loss, want_grad, want_stats), logits.dtype)


def assert_same_results(got, want, dtype: torch.dtype) -> None:
    """``run``'s results of the kernels (got) and of the torch backend (want)."""
    (got_loss, got_grad, got_stats), (want_loss, want_grad, want_stats) = got, want
    assert got_grad.dtype == dtype
    loss_rtol = 1e-5 if dtype == torch.float32 else 2**-7  # the loss is returned in the logits' dtype
    torch.testing.assert_close(got_loss, want_loss, rtol=loss_rtol, atol=1e-6)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=GRAD_RTOL[dtype], atol=1e-6)
    names = ("entropy", "lse", "target_rank", "topk_mass")
    for name, got, want in zip(names, got_stats, want_stats, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True, msg=f"stat {name}")


# Every option alone, then in combination.
OPTIONS = {
    "cross_entropy": {},
    "power_beta": dict(beta=-0.25),
    "power_beta_positive": dict(beta=0.5),
    "focal_beta": dict(beta=-0.4, positive_reward="focal"),
    "tail_penalty": dict(k=5, lambda_tail=-0.1),
    "head_reward": dict(k=5, lambda_head=0.1),
    "both_lambdas": dict(k=9, lambda_head=0.3, lambda_tail=-0.2),
    "class_weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=4.0),
    "all": dict(beta=-0.3, k=7, lambda_head=0.2, lambda_tail=-0.1, weight=True, label_smoothing=0.05,
                z_loss=1e-3, softcap=6.0),
    "all_focal": dict(beta=0.6, positive_reward="focal", k=3, lambda_head=-0.2, lambda_tail=0.1,
                      weight=True, label_smoothing=0.2),
}


def with_weight(options: dict, vocab: int, dtype: torch.dtype) -> dict:
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.rand(vocab, generator=torch.Generator().manual_seed(5)).to(dtype) + 0.2
    return options


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_option_matches_torch_backend(option: str, dtype: torch.dtype, device: str) -> None:
    rows, vocab = 6, 70  # 16-wide blocks: four full blocks and a ragged tail of 6
    logits = random_logits(rows, vocab, seed=1).to(dtype)
    target = random_targets(rows, vocab, seed=1, ignore_every=4)
    options = with_weight(OPTIONS[option], vocab, dtype)
    if "weight" in options and dtype != torch.float32:
        options["weight"] = options["weight"].float()  # class weights stay fp32 beside 16-bit logits
    assert_matches_torch_backend(logits, target, device, **options)


@pytest.mark.parametrize("vocab", [5, 16, 33])
@pytest.mark.parametrize("k", [1, 3, "V-1", "V", "V+4"])
def test_head_sizes_and_short_rows(vocab: int, k, device: str) -> None:
    k = {"V-1": vocab - 1, "V": vocab, "V+4": vocab + 4}.get(k, k)
    logits = random_logits(5, vocab, seed=2, scale=2.0).float()
    target = random_targets(5, vocab, seed=2)
    assert_matches_torch_backend(logits, target, device, k=k, lambda_head=0.4, lambda_tail=-0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_at_the_threshold_follow_index_order(dtype: torch.dtype, device: str) -> None:
    # Integer logits in a small range: many ties, and the k-th value is tied almost surely.
    logits = random_logits(8, 50, seed=3, integer=True, scale=1.5).to(dtype)
    logits[0] = 1.0  # a whole row of ties
    logits[1, ::2] = -0.0  # -0.0 and +0.0 are the same logit
    logits[1, 1::2] = 0.0
    target = random_targets(8, 50, seed=3)
    for k in (1, 4, 17, 49):
        assert_matches_torch_backend(logits, target, device, k=k, lambda_head=0.3, lambda_tail=-0.1)
    reward = RewardConfig(k=4, lambda_head=0.3, lambda_tail=-0.1)
    x64 = logits.double().requires_grad_()
    want = surrogate_loss_fp64(x64, target, reward)
    (want_grad,) = torch.autograd.grad(want.sum(), x64)
    got_loss, got_grad, _ = run("triton", logits, target, device, config=reward)
    torch.testing.assert_close(got_loss, want.float(), rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=GRAD_RTOL[dtype], atol=1e-6)


def overflowing_rows(dtype: torch.dtype, monkeypatch) -> torch.Tensor:
    """Rows of 600 logits for k = 12 (room for 64 candidate groups of 8 bf16 / 4 fp32 logits), in
    128-wide blocks (16 / 32 slots, enough for k): a row whose candidates fit, then rows with
    logits at or above the floor in more than 64 groups."""
    monkeypatch.setattr(triton_backend, "FORCED_BLOCK", 128)
    logits = random_logits(4, 600, seed=21, scale=2.0).to(dtype)
    logits[1] = 0.5  # every logit tied: all 600 are candidates
    logits[2, ::3] = logits[2].max() + 1  # 200 ties at the top, the k-th among them
    logits[3, ::2] = -math.inf  # -inf below the floor, ties above it: 300 candidates
    logits[3, 1::2] = 2.0
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_whose_candidates_overflow_take_the_whole_row_select(dtype: torch.dtype, device: str,
                                                                  monkeypatch) -> None:
    """Pass R keeps the groups holding logits at or above the floor (the k-th largest slot
    maximum); a row with more of them than the buffer holds, or k above the slots (floor -inf),
    selects over the whole row: the same head, ties in index order."""
    logits = overflowing_rows(dtype, monkeypatch)
    target = torch.tensor([5, 7, 3, 1])  # the target tied at the threshold in rows 1-3
    assert_matches_torch_backend(logits, target, device, k=12, lambda_head=0.3, lambda_tail=-0.1)
    assert_matches_torch_backend(logits, target, device, k=40, lambda_head=0.3, lambda_tail=-0.1)  # > bf16's slots
    # Rows of more than 64 blocks (pass R's block masks are 64 bits) take the whole-row select.
    monkeypatch.setattr(triton_backend, "FORCED_BLOCK", 8)
    assert_matches_torch_backend(logits, target, device, k=12, lambda_head=0.3, lambda_tail=-0.1)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_minus_inf_logits_and_whole_minus_inf_blocks(softcap: float | None, device: str) -> None:
    logits = random_logits(5, 70, seed=4).float()
    logits[:, 16:48] = -math.inf  # two whole 16-wide blocks
    logits[2, :16] = -math.inf  # the first block of a row too
    logits[3, 60:] = -math.inf  # the ragged tail
    target = torch.tensor([0, 50, 55, 5, -100])
    options = dict(beta=-0.25, k=4, lambda_head=0.2, lambda_tail=-0.1, z_loss=1e-3, softcap=softcap)
    got_loss, got_grad, got_stats = run("triton", logits, target, device, **options)
    assert torch.isfinite(got_loss).all() and torch.isfinite(got_grad).all()
    assert all(torch.isfinite(s).all() for s in got_stats)
    assert torch.all(got_grad[:, 16:48] == 0)
    assert_matches_torch_backend(logits, target, device, **options)


@pytest.mark.parametrize("lane", [1, 2, 8, 16])  # 16 = BLOCK: one lane, a block reduction per block
@pytest.mark.parametrize("option", ["cross_entropy", "all", "stats_smoothing"])
def test_every_lane_width_of_the_online_pass_agrees(monkeypatch, lane: int, option: str, device: str) -> None:
    """The online pass's per-lane maxima and sums (``_online_pass``, LANE) combine to the row's, with
    lanes that start, stay or end at -inf, a ragged tail and the target inside any lane; the host
    picks 16-byte lanes on aligned rows and one lane elsewhere (``triton_backend.lane_width``)."""
    monkeypatch.setattr(triton_backend, "lane_width", lambda logits, block: lane)
    logits = random_logits(6, 75, seed=40).float()
    logits[0, 16:48] = -math.inf  # whole blocks
    logits[1, :5] = -math.inf  # the first lanes of the row
    logits[2, 70:] = -math.inf  # the ragged tail
    logits[3, 33] = 40.0  # the max in a late lane: earlier lanes rescale
    target = torch.tensor([50, 9, 17, 33, -100, 74])
    options = {"cross_entropy": {}, "stats_smoothing": dict(label_smoothing=0.1, weight=torch.rand(75) + 0.5),
               "all": dict(beta=-0.25, k=4, lambda_head=0.2, lambda_tail=-0.1, z_loss=1e-3, softcap=8.0,
                           label_smoothing=0.05)}[option]
    for dtype in (torch.float32, torch.bfloat16):
        assert_matches_torch_backend(logits.to(dtype), target, device, **options)


def test_confident_bf16_target_gradient_is_exact(device: str) -> None:
    """pi_y >= 0.9999: the target's gradient -(1 - pi_y) w_y keeps full bf16 precision."""
    logits = random_logits(4, 40, seed=5).to(torch.bfloat16)
    target = torch.tensor([1, 7, 30, 39])
    rows = torch.arange(4)
    logits[rows, target] = torch.tensor([14.0, 18.0, 30.0, 60.0], dtype=torch.bfloat16)
    for reward in (RewardConfig(), RewardConfig(beta=-0.25), RewardConfig(beta=-0.5, positive_reward="focal")):
        _, got_grad, _ = run("triton", logits, target, device, config=reward)
        # Exact oracle from S = sum_{a != y} e^(x_a - x_y) in fp64 (see test_reference).
        x = logits.double()
        gap = (x - x[rows, target][:, None]).index_put((rows, target), torch.tensor(-math.inf, dtype=x.dtype))
        s = gap.exp().sum(-1)
        one_minus = s / (1 + s)
        if reward.positive_reward == "power":
            w_y = torch.exp(-torch.log1p(s) * (1 - one_minus**reward.beta))
        else:
            w_y = one_minus**reward.beta
        want = (-one_minus * w_y).to(torch.bfloat16)
        assert torch.all(got_grad[rows, target] < 0)
        torch.testing.assert_close(got_grad[rows, target], want, rtol=2**-7, atol=0)


def test_ignored_rows_write_zero_loss_and_gradient(device: str) -> None:
    logits = random_logits(6, 40, seed=6).float()
    target = torch.tensor([-100, 3, -100, -100, 39, -100])
    loss, grad, stats = run("triton", logits, target, device, beta=-0.25, k=3, lambda_tail=-0.1,
                            label_smoothing=0.1, z_loss=1e-2)
    ignored = target == -100
    assert torch.all(loss[ignored] == 0) and torch.all(grad[ignored] == 0)
    assert torch.all(loss[~ignored] > 0) and torch.all(grad[~ignored].abs().sum(-1) > 0)
    assert torch.all(stats[2][ignored] == 0)  # no target, no rank
    all_ignored = cross_entropy(logits.to(device), torch.full((6,), -100, device=device), backend="triton",
                                beta=0.5)
    assert torch.isnan(all_ignored)  # mean over no rows, as torch


def test_large_magnitude_logits(device: str) -> None:
    logits = (random_logits(4, 50, seed=7) * 100 + 3e4).float()
    target = random_targets(4, 50, seed=7)
    assert_matches_torch_backend(logits, target, device, beta=-0.25, k=6, lambda_tail=-0.1)


def test_out_of_range_target_is_nan_not_out_of_bounds(device: str) -> None:
    logits = random_logits(3, 20, seed=8).float().to(device)
    target = torch.tensor([1, 25, -7], device=device)
    loss = cross_entropy(logits, target, reduction="none", backend="triton", check_targets=False)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    weight = torch.rand(20, device=device)
    assert torch.isnan(cross_entropy(logits, target, weight, backend="triton", check_targets=False))
    with pytest.raises(ValueError, match="outside"):
        cross_entropy(logits, target, backend="triton", check_targets=True)


def test_results_are_deterministic(device: str) -> None:
    logits = random_logits(5, 90, seed=9).to(torch.bfloat16)
    target = random_targets(5, 90, seed=9)
    first = run("triton", logits, target, device, k=7, lambda_tail=-0.1, beta=-0.25)
    second = run("triton", logits, target, device, k=7, lambda_tail=-0.1, beta=-0.25)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_noncontiguous_rows_and_nd_input(device: str) -> None:
    base = random_logits(4, 3 * 40, seed=10).float()
    strided = base.reshape(4, 3, 40)[:, 1]  # row stride 120, class stride 1
    target = random_targets(4, 40, seed=10)
    assert_matches_torch_backend(strided, target, device, beta=0.5)
    nd = random_logits(2 * 3, 30, seed=11).float().reshape(2, 3, 30).transpose(1, 2)  # (N, C, d)
    nd_target = random_targets(6, 30, seed=11).reshape(2, 3)
    got = cross_entropy(nd.to(device), nd_target.to(device), backend="triton", reduction="none", beta=-0.25)
    want = cross_entropy(nd, nd_target, backend="torch", reduction="none", beta=-0.25)
    torch.testing.assert_close(got.cpu(), want)


def test_reductions_and_upstream_gradient(device: str) -> None:
    logits = random_logits(6, 30, seed=12).float()
    target = random_targets(6, 30, seed=12, ignore_every=3)
    weight = torch.rand(30) + 0.5
    for reduction in ("mean", "sum", "none"):
        results = []
        for backend, dev in (("triton", device), ("torch", "cpu")):
            x = logits.to(dev).requires_grad_()
            loss = cross_entropy(x, target.to(dev), weight.to(dev), reduction=reduction, backend=backend,
                                 k=4, lambda_head=0.1)
            upstream = torch.linspace(-1, 2, loss.numel(), device=dev).reshape(loss.shape)
            (grad,) = torch.autograd.grad(loss, x, upstream)
            results.append((loss.detach().cpu(), grad.cpu()))
        torch.testing.assert_close(results[0][0], results[1][0])
        torch.testing.assert_close(results[0][1], results[1][1])


def test_row_offsets_beyond_int32(device: str) -> None:
    """Rows 2**31 elements apart: the kernel's offsets must be int64. Only the three rows are
    touched, so the 4 GiB span stays mostly unallocated virtual memory."""
    vocab, row_stride = 40, 2**30
    storage = torch.empty(2 * row_stride + vocab, dtype=torch.bfloat16, device=device)
    logits = storage.as_strided((3, vocab), (row_stride, 1))
    logits.copy_(random_logits(3, vocab, seed=13).to(torch.bfloat16))
    target = random_targets(3, vocab, seed=13)
    got_loss, got_grad, _ = run("triton", logits, target, device, beta=-0.25, k=5, lambda_tail=-0.1)
    compact = logits.detach().cpu().contiguous()
    want_loss, want_grad, _ = run("torch", compact, target, beta=-0.25, k=5, lambda_tail=-0.1)
    torch.testing.assert_close(got_loss, want_loss, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=2**-7, atol=1e-6)


def test_empty_batch(device: str) -> None:
    logits = torch.zeros(0, 30, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    for reduction, want in (("mean", math.nan), ("sum", 0.0)):
        loss = cross_entropy(logits, target, reduction=reduction, backend="triton", k=3, lambda_tail=-0.1)
        torch.testing.assert_close(loss.cpu(), torch.tensor(want), equal_nan=True)
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.shape == (0, 30)
    assert cross_entropy(logits, target, reduction="none", backend="triton").shape == (0,)


@st.composite
def kernel_problems(draw):
    """Small rows of any kernel dtype, with ties, -inf logits and every option drawn at random."""
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 70))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.5, 3.0, 20.0]))
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    if draw(st.booleans()):
        logits = logits.round()  # ties
    target = torch.randint(0, vocab, (rows,), generator=generator)
    if draw(st.booleans()):
        # -inf padding that never hides the target
        padding = torch.rand(rows, vocab, generator=generator) < 0.3
        padding[torch.arange(rows), target] = False
        logits[padding] = -math.inf
    if draw(st.booleans()):
        target[0] = -100
    options = dict(
        beta=draw(st.sampled_from([0.0, -0.25, -0.7, 0.5])),
        positive_reward=draw(st.sampled_from(["power", "focal"])),
        k=draw(st.integers(1, vocab + 1)),
        lambda_head=draw(st.sampled_from([0.0, 0.2, -0.3])),
        lambda_tail=draw(st.sampled_from([0.0, -0.1, 0.15])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        z_loss=draw(st.sampled_from([0.0, 1e-3])),
        softcap=draw(st.sampled_from([None, 5.0])),
    )
    if draw(st.booleans()):
        options["weight"] = torch.rand(vocab, generator=generator) + 0.1
    # 64-wide blocks: 8 (16-bit) or 16 (fp32) slots, so the head's floor is above -inf for small k.
    block = draw(st.sampled_from([16, 64]))
    return logits.to(dtype), target, options, block


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kernel_problems())
def test_kernel_matches_torch_backend_on_random_problems(device: str, monkeypatch, problem) -> None:
    logits, target, options, block = problem
    monkeypatch.setattr(triton_backend, "FORCED_BLOCK", block)
    assert_matches_torch_backend(logits, target, device, **options)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_z_loss_weighted_mean_matches_torch_backend(device: str, softcap: float | None) -> None:
    """The z-loss's plain mean under class weights rescales the kernel's per-row state (api level)."""
    logits = random_logits(9, 40, seed=8).float()
    target = random_targets(9, 40, seed=8, ignore_every=3)
    weight = torch.rand(40, generator=torch.Generator().manual_seed(9)) + 0.2
    options = dict(beta=-0.25, k=4, lambda_tail=-0.1, z_loss=0.05, softcap=softcap)
    results = []
    for backend, where in (("triton", device), ("torch", "cpu")):
        x = logits.to(where).requires_grad_()
        loss = cross_entropy(x, target.to(where), weight.to(where), backend=backend, **options)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss.detach().cpu(), grad.cpu()))
    (got_loss, got_grad), (want_loss, want_grad) = results
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def _passes(logits: torch.Tensor, target: torch.Tensor, **options):
    """Passes over the logits of the kernels' forward and backward (the interpreter's loads and stores)."""
    from precision_ce.bench.traffic import measure_passes

    x = logits.requires_grad_()

    def forward() -> torch.Tensor:
        out = cross_entropy(x, target, reduction="sum", backend="triton", **options)
        return out[0] if isinstance(out, tuple) else out

    return measure_passes(forward, lambda loss: loss.backward(), x)


needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's loads and stores")


@needs_interpreter
@pytest.mark.parametrize("option", ["cross_entropy", "tail_penalty", "all"])
def test_ignored_rows_read_nothing(option: str) -> None:
    """An ignored row's forward reads none of its logits; its backward writes zeros without reading."""
    logits = random_logits(4, 70, seed=14).to(torch.bfloat16)
    options = with_weight(OPTIONS[option], 70, torch.float32)
    traffic = _passes(logits, torch.full((4,), -100), **options)
    assert traffic.forward_read == 0 and traffic.backward_read == 0 and traffic.forward_write == 0
    assert traffic.backward_write == 1.0
    half = _passes(logits, torch.tensor([-100, 3, -100, 60]), **options)
    assert half.forward_read <= 0.5 * (3 if option == "cross_entropy" else 5) and half.backward_read == 0.5


@needs_interpreter
@pytest.mark.parametrize("dtype, row_passes", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_the_head_reads_a_row_twice_unless_its_candidates_overflow(dtype: torch.dtype, row_passes: int,
                                                                    monkeypatch) -> None:
    """Passes A and R, then only the candidates (a gather); a row whose candidates overflow adds the
    whole-row select: a histogram pass per 8-bit digit and one for the sums over K."""
    logits = overflowing_rows(dtype, monkeypatch)
    one_row = lambda row: _passes(logits[[row, row]], torch.tensor([5, 5]), k=12, lambda_tail=-0.1)  # noqa: E731
    target_logit = 1 / 600
    fitting = one_row(0).forward_read
    assert 2.0 + 12 / 600 <= fitting - target_logit <= 2.0 + 64 * 8 / 600
    for row in (1, 2, 3):
        assert one_row(row).forward_read == pytest.approx(2.0 + row_passes + 1 + target_logit)


@needs_interpreter
@pytest.mark.parametrize("option", ["cross_entropy", "power_beta", "smoothing"])
def test_stats_cost_no_pass_without_a_head(option: str) -> None:
    """return_stats=True reads the logits once in the forward where the loss has no head; "full" adds
    the head's passes for the top-k mass."""
    logits = random_logits(3, 70, seed=15).float()
    target = random_targets(3, 70, seed=15)
    options = OPTIONS[option]
    one_pass = 1.0 + 1 / 70  # and the target's logit, read before the pass for its rank
    assert _passes(logits, target, return_stats=True, **options).forward_read == pytest.approx(one_pass)
    assert _passes(logits, target, return_stats="full", k=5, **options).forward_read > 1.0


@pytest.mark.parametrize("option", ["cross_entropy", "power_beta", "tail_penalty", "all"])
def test_stats_without_the_top_k_mass_match_torch_backend(option: str, device: str) -> None:
    """return_stats=True: both backends give the same stats, the top-k mass NaN without a head."""
    logits = random_logits(6, 40, seed=16).to(torch.bfloat16)
    target = random_targets(6, 40, seed=16, ignore_every=3)
    options = with_weight(OPTIONS[option], 40, torch.float32)
    got = run("triton", logits, target, device, return_stats=True, **options)
    want = run("torch", logits, target, return_stats=True, **options)
    assert_same_results(got, want, logits.dtype)
    topk_mass, valid = got[2][3], target != -100
    assert torch.all(topk_mass[~valid] == 0) and torch.all(got[2][2][~valid] == 0)
    has_head = option in ("tail_penalty", "all")
    assert torch.isnan(topk_mass[valid]).all() != has_head
