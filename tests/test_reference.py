"""The torch backend and the public API: parity with F.cross_entropy, the fp64 surrogate, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import random_logits, random_targets, surrogate_loss_fp64

import precision_ce
from precision_ce import PRESETS, PrecisionCrossEntropyLoss, RewardConfig, cross_entropy
from precision_ce.reference import target_weight

# Honest tolerances: fp64 and fp32 compute; bf16 rounds the result once (8 significant bits).
TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
}


def general_path(*args, **kwargs):
    """The loss through our own forward/backward (return_stats bypasses the F.cross_entropy path)."""
    return cross_entropy(*args, return_stats=True, backend="torch", **kwargs)[0]


def loss_and_grad(fn, logits: torch.Tensor, *args, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


CE_CASES = {
    "plain": {},
    "weight": {"weight": True},
    "ignore_some": {"ignore_every": 3},
    "ignore_all": {"ignore_every": 1},
    "sum": {"reduction": "sum", "ignore_every": 4},
    "none": {"reduction": "none", "ignore_every": 4},
    "smoothing": {"label_smoothing": 0.1},
    "smoothing_weight_ignore": {"label_smoothing": 0.2, "weight": True, "ignore_every": 3},
    "weight_none": {"weight": True, "reduction": "none"},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CE_CASES)
def test_cross_entropy_setting_matches_torch(case: str, dtype: torch.dtype) -> None:
    spec = dict(CE_CASES[case])
    rows, vocab = 12, 37
    logits = random_logits(rows, vocab, seed=1).to(dtype)
    target = random_targets(rows, vocab, seed=1, ignore_every=spec.pop("ignore_every", 0))
    weight = torch.rand(vocab, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    kwargs = dict(spec, weight=weight.to(dtype) if spec.get("weight") else None)
    # Reference values: F.cross_entropy on the exact upcast input, in fp32 or fp64.
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    kwargs_exact = dict(kwargs, weight=None if kwargs["weight"] is None else weight.to(exact))
    want_loss, want_grad = loss_and_grad(F.cross_entropy, logits.to(exact), target, **kwargs_exact)
    got_loss, got_grad = loss_and_grad(general_path, logits, target, **kwargs)
    assert got_loss.dtype == dtype and got_grad.dtype == dtype
    if case == "ignore_all":
        assert torch.isnan(got_loss) and torch.isnan(want_loss)
        assert torch.all(got_grad == 0)
        return
    torch.testing.assert_close(got_loss.to(exact), want_loss, **TOLERANCE[dtype])
    torch.testing.assert_close(got_grad.to(exact), want_grad, **TOLERANCE[dtype])
    default_loss, default_grad = loss_and_grad(cross_entropy, logits, target, **kwargs)
    if dtype in (torch.float32, torch.float64):
        # The default path at this setting is F.cross_entropy itself, bit for bit.
        native_loss, native_grad = loss_and_grad(F.cross_entropy, logits, target, **kwargs)
        assert torch.equal(default_loss, native_loss) and torch.equal(default_grad, native_grad)
    else:
        # 16-bit logits are computed in fp32 on every path: the same result as the general path.
        assert torch.equal(default_loss, got_loss) and torch.equal(default_grad, got_grad)


@pytest.mark.parametrize("shape", [(7,), (3, 7, 4), (2, 7, 3, 2)])
def test_unbatched_and_nd_inputs_match_torch(shape: tuple[int, ...]) -> None:
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    target = torch.randint(0, 7, target_shape, generator=torch.Generator().manual_seed(1))
    for reduction in ("none", "mean", "sum"):
        want_loss, want_grad = loss_and_grad(F.cross_entropy, logits, target, reduction=reduction)
        got_loss, got_grad = loss_and_grad(general_path, logits, target, reduction=reduction)
        assert got_loss.shape == want_loss.shape
        torch.testing.assert_close(got_loss, want_loss)
        torch.testing.assert_close(got_grad, want_grad)


def test_noncontiguous_and_int_targets_match_torch() -> None:
    base = random_logits(9, 40, seed=4)
    logits = base[:, ::2]  # strided class dimension
    target = random_targets(9, 20, seed=4)
    want_loss, want_grad = loss_and_grad(F.cross_entropy, logits.contiguous(), target)
    got_loss, got_grad = loss_and_grad(general_path, logits, target.int())
    torch.testing.assert_close(got_loss, want_loss)
    torch.testing.assert_close(got_grad, want_grad)


def test_empty_batch_matches_torch() -> None:
    logits = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    for reduction in ("none", "mean", "sum"):
        got = general_path(logits, target, reduction=reduction)
        want = F.cross_entropy(logits, target, reduction=reduction)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_probability_targets(softcap: float | None, z_loss: float) -> None:
    logits = random_logits(6, 11, seed=5)
    probs = torch.softmax(random_logits(6, 11, seed=6), dim=-1)
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    for reduction in ("none", "mean", "sum"):
        want = F.cross_entropy(z, probs, reduction="none", label_smoothing=0.1)
        want = want + z_loss * torch.logsumexp(z, -1) ** 2
        want = {"none": want, "mean": want.mean(), "sum": want.sum()}[reduction]
        got = cross_entropy(logits, probs, reduction=reduction, label_smoothing=0.1,
                            softcap=softcap, z_loss=z_loss)
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="class-index targets"):
        cross_entropy(logits, probs, beta=-0.25)


# Settings for the fp64 surrogate: every knob alone and in combination.
SURROGATE_CASES = {
    "power_neg_beta": dict(reward=RewardConfig(beta=-0.5)),
    "power_pos_beta": dict(reward=RewardConfig(beta=0.7)),
    "focal_neg_beta": dict(reward=RewardConfig(beta=-0.4, positive_reward="focal")),
    "focal_pos_beta": dict(reward=RewardConfig(beta=1.5, positive_reward="focal")),
    "tail_penalty": dict(reward=RewardConfig(k=5, lambda_tail=-0.1)),
    "head_reward": dict(reward=RewardConfig(k=5, lambda_head=0.2)),
    "both_signs": dict(reward=RewardConfig(k=3, lambda_head=-0.3, lambda_tail=0.2)),
    "k1": dict(reward=RewardConfig(k=1, lambda_head=0.5, lambda_tail=-0.2)),
    "k_v_minus_1": dict(reward=RewardConfig(k=29, lambda_head=0.5, lambda_tail=-0.2)),
    "k_is_v": dict(reward=RewardConfig(k=30, lambda_head=0.5, lambda_tail=-0.2)),
    "k_above_v": dict(reward=RewardConfig(k=1000, lambda_head=0.3, lambda_tail=-0.2)),
    "equal_lambdas": dict(reward=RewardConfig(k=4, lambda_head=-0.1, lambda_tail=-0.1)),
    "ties": dict(reward=RewardConfig(k=6, lambda_head=0.3, lambda_tail=-0.2), integer=True),
    "smoothing": dict(reward=RewardConfig(beta=-0.25), label_smoothing=0.1),
    "class_weight": dict(reward=RewardConfig(beta=0.5, k=4, lambda_tail=-0.1), weight=True),
    "z_loss": dict(reward=RewardConfig(beta=-0.25), z_loss=1e-2),
    "softcap": dict(reward=RewardConfig(k=4, lambda_head=0.1), softcap=3.0),
    "everything": dict(
        reward=RewardConfig(beta=-0.3, k=7, lambda_head=0.2, lambda_tail=-0.1, positive_reward="focal"),
        label_smoothing=0.05, weight=True, z_loss=1e-3, softcap=5.0, integer=True,
    ),
}


@pytest.mark.parametrize("case", SURROGATE_CASES)
def test_gradient_equals_autograd_of_fp64_surrogate(case: str) -> None:
    spec = dict(SURROGATE_CASES[case])
    integer = spec.pop("integer", False)
    rows, vocab = 10, 30
    logits = random_logits(rows, vocab, seed=7, integer=integer, scale=2.0)
    target = random_targets(rows, vocab, seed=7, ignore_every=4)
    if spec.get("weight"):
        spec["weight"] = torch.rand(vocab, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    else:
        spec.pop("weight", None)
    reward = spec.pop("reward")
    want_loss, want_grad = loss_and_grad(surrogate_loss_fp64, logits, target, reward, **spec)
    got_loss, got_grad = loss_and_grad(
        general_path, logits, target, reduction="none", config=reward, **spec
    )
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


def test_target_weight_closed_forms_and_limits() -> None:
    pi = torch.tensor([1e-30, 1e-6, 0.1, 0.5, 0.9, 1 - 1e-9, 1.0], dtype=torch.float64)
    for beta in (-0.9, -0.25, 0.5, 2.0):
        for form in ("power", "focal"):
            w, w_1m, term = target_weight(pi.log(), torch.log1p(-pi), beta, form)
            assert torch.isfinite(w).all() and torch.isfinite(w_1m).all() and torch.isfinite(term).all()
            inner = pi[1:-1]
            closed = inner ** (1 - (1 - inner) ** beta) if form == "power" else (1 - inner) ** beta
            torch.testing.assert_close(w[1:-1], closed, rtol=1e-12, atol=0)
            torch.testing.assert_close(w_1m[1:-1], closed * (1 - inner), rtol=1e-12, atol=0)
            torch.testing.assert_close(term[1:-1], -closed * inner.log(), rtol=1e-12, atol=0)
        power_w = target_weight(pi.log(), torch.log1p(-pi), beta, "power")[0]
        assert abs(power_w[-1] - 1.0) < 1e-12  # the pi_y -> 1 limit of the power form
        assert abs(power_w[0] - 1.0) < 1e-12  # and the pi_y -> 0 limit


def test_stats_match_direct_computation() -> None:
    logits = random_logits(8, 25, seed=9, integer=True)
    target = random_targets(8, 25, seed=9, ignore_every=5)
    _, stats = cross_entropy(logits, target, reduction="none", k=4, return_stats="full", backend="torch")
    p = torch.softmax(logits, -1)
    valid = target != -100  # every stat is 0 on ignored rows
    on_valid = lambda values: torch.where(valid, values, 0.0).float()  # noqa: E731
    torch.testing.assert_close(stats.entropy, on_valid(-(p * p.log()).sum(-1)))
    torch.testing.assert_close(stats.lse, on_valid(torch.logsumexp(logits, -1)))
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    position = torch.argsort(order, dim=-1)  # 0-based rank of every token in the stable order
    want_rank = torch.where(valid, position.gather(1, target.clamp(min=0)[:, None])[:, 0] + 1, 0)
    assert torch.equal(stats.target_rank, want_rank.float())
    torch.testing.assert_close(stats.topk_mass, on_valid(p.gather(1, order[:, :4]).sum(-1)))
    # return_stats=True: the same, but the top-k mass only where the loss has a head.
    _, cheap = cross_entropy(logits, target, reduction="none", k=4, return_stats=True, backend="torch")
    for got, want in zip(cheap[:3], stats[:3], strict=True):
        assert torch.equal(got, want)
    assert torch.isnan(cheap.topk_mass[valid]).all() and torch.all(cheap.topk_mass[~valid] == 0)
    _, ranked = cross_entropy(logits, target, reduction="none", k=4, lambda_tail=-0.1, return_stats=True,
                              backend="torch")
    torch.testing.assert_close(ranked.topk_mass, stats.topk_mass)
    with pytest.raises(ValueError, match="return_stats"):
        cross_entropy(logits, target, return_stats="entropy", backend="torch")


def test_module_mirrors_cross_entropy_loss() -> None:
    logits = random_logits(6, 9, seed=10).float()
    target = random_targets(6, 9, seed=10)
    weight = torch.rand(9) + 0.5
    ours = PrecisionCrossEntropyLoss(weight=weight, label_smoothing=0.1)
    reference_module = torch.nn.CrossEntropyLoss(weight, label_smoothing=0.1)
    torch.testing.assert_close(ours(logits, target), reference_module(logits, target))
    shaped = PrecisionCrossEntropyLoss(config=PRESETS["precision"], reduction="sum")
    torch.testing.assert_close(
        shaped(logits, target), cross_entropy(logits, target, beta=-0.25, reduction="sum")
    )
    assert "beta=-0.25" in repr(shaped)
    by_field = PrecisionCrossEntropyLoss(beta=-0.25, k=3, lambda_tail=-0.1)
    assert by_field.config == RewardConfig(beta=-0.25, k=3, lambda_tail=-0.1)
    with pytest.raises(TypeError, match="gamma"):
        PrecisionCrossEntropyLoss(gamma=2.0)


def test_presets_are_the_papers_settings() -> None:
    assert PRESETS["cross_entropy"].is_cross_entropy
    assert PRESETS["precision"].beta == -0.25 and PRESETS["diversity"].beta == 0.5
    assert (PRESETS["tail_penalty"].lambda_tail, PRESETS["tail_penalty"].k) == (-0.1, 100)
    assert (PRESETS["head_reward"].lambda_head, PRESETS["head_reward"].k) == (0.1, 100)
    assert precision_ce.preset("tail_penalty", k=7).k == 7


BAD_CALLS = [
    (dict(target=torch.tensor([0, 9, 1])), ValueError, "outside \\[0, 5\\)"),
    (dict(target=torch.tensor([0, -3, 1])), ValueError, "outside"),
    (dict(target=torch.tensor([0.0, 1.0, 2.0])), ValueError, "class-probability targets"),
    (dict(target=torch.tensor([True, False, True])), TypeError, "int64 class indices"),
    (dict(target=torch.tensor([0, 1])), ValueError, "target must have shape"),
    (dict(input=torch.zeros(3, 5, dtype=torch.long)), TypeError, "floating-point"),
    (dict(weight=torch.ones(4)), ValueError, "weight must have shape"),
    (dict(beta=-1.0), ValueError, "beta must be > -1"),
    (dict(beta=float("nan")), ValueError, "beta must be a finite"),
    (dict(k=0), ValueError, "k must be an integer >= 1"),
    (dict(k=2.5), ValueError, "k must be an integer"),
    (dict(positive_reward="cubic"), ValueError, "positive_reward must be one of"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be in"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(config=RewardConfig(), beta=0.5), ValueError, "either config"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_CALLS)
def test_bad_input_raises_clear_error(overrides: dict, error: type, message: str) -> None:
    kwargs = dict(input=torch.randn(3, 5), target=torch.tensor([0, 1, 2]))
    kwargs.update(overrides)
    with pytest.raises(error, match=message):
        cross_entropy(**kwargs)


def test_triton_backend_refuses_fp64() -> None:
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        cross_entropy(torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2]), backend="triton")


def confident_oracle(logits: torch.Tensor, target: torch.Tensor, reward: RewardConfig):
    """Loss and target-column gradient (no negative rewards) from S = sum_{a != y} e^(z_a - z_y)
    in fp64: pi_y = 1 / (1 + S), 1 - pi_y = S / (1 + S), log pi_y = -log1p(S). Exact where
    log_softmax is not (z_y - lse loses everything below ulp(lse))."""
    rows = torch.arange(len(target))
    gap = logits - logits[rows, target][:, None]
    gap[rows, target] = -math.inf
    s = gap.exp().sum(-1)
    log_pi, one_minus = -torch.log1p(s), s / (1 + s)
    if reward.positive_reward == "power":
        w_y = torch.exp(log_pi * (1 - one_minus**reward.beta))
    else:
        w_y = one_minus**reward.beta
    return -w_y * log_pi, -one_minus * w_y


def test_confident_prediction_fp32_is_exact() -> None:
    """pi_y > 0.9999 in fp32: finite, and loss and target gradient keep their relative precision."""
    logits64 = random_logits(4, 50, seed=11)
    target = torch.tensor([3, 10, 20, 49])
    logits64[torch.arange(4), target] = torch.tensor([12.0, 20.0, 40.0, 90.0], dtype=torch.float64)
    for reward in (RewardConfig(), RewardConfig(beta=-0.25), RewardConfig(beta=0.5),
                   RewardConfig(beta=-0.5, positive_reward="focal")):
        want_loss, want_grad_target = confident_oracle(logits64, target, reward)
        got_loss, got_grad = loss_and_grad(general_path, logits64.float(), target, reduction="none",
                                           config=reward)
        assert torch.isfinite(got_loss).all() and torch.isfinite(got_grad).all()
        torch.testing.assert_close(got_loss.double(), want_loss, rtol=1e-4, atol=0)
        got_grad_target = got_grad[torch.arange(4), target].double()
        torch.testing.assert_close(got_grad_target, want_grad_target, rtol=1e-4, atol=0)


def test_minus_inf_logits_give_no_nan() -> None:
    logits = random_logits(4, 20, seed=12)
    logits[:, 5:15] = -math.inf
    target = torch.tensor([0, 1, 17, -100])
    reward = RewardConfig(beta=-0.25, k=3, lambda_tail=-0.1)
    for softcap in (None, 5.0):
        got_loss, got_grad = loss_and_grad(general_path, logits, target, config=reward,
                                           softcap=softcap, reduction="none", z_loss=1e-3)
        want_loss, want_grad = loss_and_grad(surrogate_loss_fp64, logits, target, reward,
                                             softcap=softcap, z_loss=1e-3)
        assert not got_loss.isnan().any() and not got_grad.isnan().any()
        torch.testing.assert_close(got_loss, want_loss)
        torch.testing.assert_close(got_grad, want_grad)
        assert torch.all(got_grad[:, 5:15] == 0)


# Regression tests for defects found against Liger-Kernel's test grid and by new users.


def test_bf16_confident_rows_target_gradient_is_exact() -> None:
    """bf16 at the plain setting: the target column's gradient is pi_y - 1 to bf16 rounding
    (torch's CPU kernel gave every row -0.007751 where the exact values run -0.00497..-0.00990)."""
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 64, 512
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64)
    target = torch.randint(0, vocab, (rows,), generator=generator)
    logits[torch.arange(rows), target] = 12.0 + 2.0 * torch.rand(rows, generator=generator, dtype=torch.float64)
    x = logits.to(torch.bfloat16)
    _, grad = loss_and_grad(cross_entropy, x, target, reduction="sum")
    _, exact = loss_and_grad(F.cross_entropy, x.double(), target, reduction="sum")
    got, want = grad[torch.arange(rows), target].double(), exact[torch.arange(rows), target]
    torch.testing.assert_close(got, want, rtol=2**-7, atol=0.0)


def test_fp16_mean_does_not_overflow() -> None:
    """1000 rows of 8 fp16 logits with the target at -70: mean 71.95, not inf."""
    logits = torch.zeros(1000, 8, dtype=torch.float16)
    logits[:, 0] = -70.0
    target = torch.zeros(1000, dtype=torch.long)
    want = F.cross_entropy(logits.double(), target)
    got = cross_entropy(logits, target)
    assert got.dtype == torch.float16 and torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=2**-10, atol=0.0)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_z_loss_mean_does_not_depend_on_class_weight_scale(backend: str) -> None:
    """Spec section 3: the z-loss is a plain mean over positions, the shaped loss a weighted mean."""
    logits = torch.zeros(1, 2, dtype=torch.float64)
    target = torch.zeros(1, dtype=torch.long)
    weight = torch.tensor([0.5, 1.0], dtype=torch.float64)
    small = cross_entropy(logits, target, weight, z_loss=1.0, backend=backend)
    large = cross_entropy(logits, target, 10 * weight, z_loss=1.0, backend=backend)
    torch.testing.assert_close(small, large)
    torch.testing.assert_close(small, torch.tensor(math.log(2) + math.log(2) ** 2, dtype=torch.float64))


@pytest.mark.parametrize("reward", [RewardConfig(), RewardConfig(beta=-0.25, k=3, lambda_tail=-0.1)])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_z_loss_weighted_mean_matches_spec(reward: RewardConfig, softcap: float | None) -> None:
    """mean = sum_r (l_r - zeta lse_r**2) / sum_r c_{y_r} + zeta sum_r lse_r**2 / #rows, and its gradient."""
    rows, vocab, zeta = 11, 13, 0.05
    logits = random_logits(rows, vocab, seed=21)
    target = random_targets(rows, vocab, seed=21, ignore_every=4)
    weight = torch.rand(vocab, generator=torch.Generator().manual_seed(22), dtype=torch.float64) + 0.2
    valid = target != -100

    def spec_mean(x: torch.Tensor) -> torch.Tensor:
        shaped = surrogate_loss_fp64(x, target, reward, weight=weight, softcap=softcap)
        with_z = surrogate_loss_fp64(x, target, reward, weight=weight, softcap=softcap, z_loss=zeta)
        z_term = with_z - shaped
        return shaped.sum() / weight[target[valid]].sum() + z_term.sum() / valid.sum()

    want_loss, want_grad = loss_and_grad(spec_mean, logits)
    for path in (general_path, cross_entropy):
        got_loss, got_grad = loss_and_grad(path, logits, target, weight, config=reward, z_loss=zeta,
                                           softcap=softcap)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)


def test_patching_torch_cross_entropy_does_not_recurse(monkeypatch) -> None:
    """``F.cross_entropy = precision_ce.cross_entropy`` is how Liger-Kernel patches models."""
    logits, target = random_logits(5, 7, seed=2), random_targets(5, 7, seed=2)
    want = F.cross_entropy(logits, target)
    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    assert torch.equal(F.cross_entropy(logits, target), want)
    probabilities = torch.softmax(random_logits(5, 7, seed=3), -1)
    torch.testing.assert_close(F.cross_entropy(logits, probabilities),
                               torch.sum(-probabilities * torch.log_softmax(logits, -1)) / 5)


@pytest.mark.parametrize("config", ["cross_entropy", "precision", "tail_penalty"])
def test_autocast_returns_fp32_loss_like_torch(config: str) -> None:
    """F.cross_entropy is an autocast-to-fp32 op; ours computes in fp32 and returns fp32 there too."""
    hidden = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    layer = torch.nn.Linear(16, 200)
    target = random_targets(6, 200, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(hidden)
        assert logits.dtype == torch.bfloat16
        got = cross_entropy(logits, target, config=PRESETS[config])
        native = F.cross_entropy(logits, target)
    assert got.dtype == native.dtype == torch.float32
    exact = general_path(logits.float(), target, config=PRESETS[config])
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-6)
    got.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_class_weight_requiring_grad_raises() -> None:
    logits = random_logits(4, 6, seed=1).requires_grad_()
    weight = torch.ones(6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"weight.*detach"):
        cross_entropy(logits, random_targets(4, 6, seed=1), weight, beta=-0.25)
    with torch.no_grad():
        cross_entropy(logits, random_targets(4, 6, seed=1), weight, beta=-0.25)
