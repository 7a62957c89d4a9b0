"""Hypothesis properties of the loss, run against both backends (the kernel on small shapes).

Profiles: the default "ci" profile keeps CI fast; PRECISION_CE_HYPOTHESIS=thorough runs thousands
of examples per property.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from precision_ce import RewardConfig, cross_entropy

BACKENDS = {
    # backend: (compute dtype, largest vocabulary drawn)
    "torch": (torch.float64, 60),
    "triton": (torch.float32, 40),
}


@st.composite
def problems(draw, backend: str, distinct: bool = False):
    """Logits (multiples of 1/64, so shifts by integers are exact), targets and loss options."""
    dtype, max_vocab = BACKENDS[backend]
    rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(2, max_vocab))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if distinct:
        logits = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(rows)]) * 0.375
    else:
        logits = torch.randint(-256, 256, (rows, vocab), generator=generator) / 64.0
    target = torch.randint(0, vocab, (rows,), generator=generator)
    reward = RewardConfig(
        beta=draw(st.sampled_from([0.0, -0.25, -0.6, 0.5, 1.3])),
        k=draw(st.integers(1, vocab + 2)),
        lambda_head=draw(st.sampled_from([0.0, 0.1, -0.3, 0.5])),
        lambda_tail=draw(st.sampled_from([0.0, -0.1, 0.2])),
        positive_reward=draw(st.sampled_from(["power", "focal"])),
    )
    weight = torch.rand(vocab, generator=generator, dtype=dtype) + 0.1 if draw(st.booleans()) else None
    options = dict(config=reward, weight=weight, label_smoothing=draw(st.sampled_from([0.0, 0.1])),
                   reduction="none", backend=backend)
    return logits.to(dtype), target, options


# The kernel runs compiled on CUDA when there is a GPU, else under the interpreter on the CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def loss_and_grad(logits: torch.Tensor, target: torch.Tensor, **options):
    """Per-row loss and gradient, computed on the backend's device and returned on the CPU."""
    device = KERNEL_DEVICE if options["backend"] == "triton" else "cpu"
    options = {name: value.to(device) if isinstance(value, torch.Tensor) else value
               for name, value in options.items()}
    x = logits.to(device).requires_grad_()
    loss = cross_entropy(x, target.to(device), **options)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach().cpu(), grad.cpu()


def tolerance(dtype: torch.dtype, magnitude: float = 4.0) -> dict[str, float]:
    """Log-probabilities z - lse carry an absolute error of a few ulp(|z|): scale with it."""
    eps = torch.finfo(dtype).eps * 16 * (1.0 + magnitude)
    return dict(rtol=eps, atol=eps / 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_rows_sum_to_zero(backend: str, small_blocks) -> None:
    @given(problems(backend))
    def check(problem):
        logits, target, options = problem
        _, grad = loss_and_grad(logits, target, **options)
        torch.testing.assert_close(grad.sum(-1), torch.zeros_like(grad[:, 0]), **tolerance(logits.dtype))

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_adding_a_constant_per_row_changes_nothing(backend: str, small_blocks) -> None:
    @given(problems(backend), st.integers(-20, 20))
    def check(problem, shift):
        logits, target, options = problem
        loss, grad = loss_and_grad(logits, target, **options)
        shifted = logits + shift * torch.arange(1, len(logits) + 1, dtype=logits.dtype)[:, None]
        shifted_loss, shifted_grad = loss_and_grad(shifted, target, **options)
        magnitude = shifted.abs().max().item()
        torch.testing.assert_close(shifted_loss, loss, **tolerance(logits.dtype, magnitude))
        torch.testing.assert_close(shifted_grad, grad, **tolerance(logits.dtype, magnitude))

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_permuting_the_vocabulary_permutes_the_gradient(backend: str, small_blocks) -> None:
    @given(problems(backend, distinct=True), st.integers(0, 2**31 - 1))
    def check(problem, seed):
        logits, target, options = problem
        loss, grad = loss_and_grad(logits, target, **options)
        permutation = torch.randperm(logits.shape[1], generator=torch.Generator().manual_seed(seed))
        inverse = torch.argsort(permutation)
        permuted = dict(options, weight=None if options["weight"] is None else options["weight"][permutation])
        permuted_loss, permuted_grad = loss_and_grad(logits[:, permutation], inverse[target], **permuted)
        torch.testing.assert_close(permuted_loss, loss, **tolerance(logits.dtype))
        torch.testing.assert_close(permuted_grad, grad[:, permutation], **tolerance(logits.dtype))

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_beta_pushes_the_target_harder(backend: str, small_blocks) -> None:
    @given(problems(backend), st.sampled_from(["power", "focal"]))
    def check(problem, form):
        logits, target, options = problem
        rows = torch.arange(len(target))
        target_grads = []
        for beta in (-0.25, 0.0, 0.5):
            config = RewardConfig(beta=beta, positive_reward=form)
            _, grad = loss_and_grad(logits, target, **dict(options, config=config, label_smoothing=0.0))
            target_grads.append(grad[rows, target])
        precision, cross_entropy_grad, diversity = target_grads
        # Rows where the target is neither certain nor impossible: a strict ordering.
        open_rows = (cross_entropy_grad < -1e-6) & (cross_entropy_grad > -1 + 1e-6)
        assert torch.all(precision[open_rows] < cross_entropy_grad[open_rows])
        assert torch.all(cross_entropy_grad[open_rows] < diversity[open_rows])

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_penalty_lowers_tail_mass_after_one_step(backend: str, small_blocks) -> None:
    @given(problems(backend, distinct=True))
    def check(problem):
        logits, target, options = problem
        vocab = logits.shape[1]
        k = max(1, vocab // 4)
        head = torch.zeros_like(logits, dtype=torch.bool).scatter(1, logits.topk(k, -1).indices, True)
        # The tail of wrong tokens: the only tokens lambda_tail rewards.
        wrong_tail = (~head).scatter(1, target[:, None], False)

        def tail_mass_after_step(config: RewardConfig) -> torch.Tensor:
            _, grad = loss_and_grad(logits, target, **dict(options, config=config, label_smoothing=0.0))
            probs = torch.softmax(logits.double() - 0.5 * grad.double(), -1)
            return (probs * wrong_tail).sum(-1)

        penalised = tail_mass_after_step(RewardConfig(k=k, lambda_tail=-0.3))
        baseline = tail_mass_after_step(RewardConfig(k=k))
        tail_now = (torch.softmax(logits.double(), -1) * wrong_tail).sum(-1)
        movable = (tail_now > 1e-4) & (tail_now < 1 - 1e-4)
        assert torch.all(penalised[movable] < baseline[movable])

    check()
