"""``inplace_backward=True``: the backward pass writes the gradient over the logits.

Both backends (the Triton kernels under the interpreter on a CPU machine, with 16-wide blocks).
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_logits, random_targets
from torch.profiler import ProfilerActivity, profile

from precision_ce import cross_entropy, reference
from precision_ce.bench.memory import quiet_stderr

pytestmark = pytest.mark.usefixtures("small_blocks")
BACKENDS = ["torch", "triton"]
MODES = {
    "cross_entropy": {},
    "tail_penalty": dict(k=5, lambda_tail=-0.1, beta=-0.25),
    "all": dict(k=4, lambda_head=0.2, lambda_tail=-0.1, label_smoothing=0.1, z_loss=1e-3, softcap=5.0),
}


def _problem(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    logits = random_logits(8, 40, seed=20).to(dtype)
    return logits, random_targets(8, 40, seed=20, ignore_every=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_overwrites_the_logits(backend: str, mode: str, dtype: torch.dtype, device: str) -> None:
    logits, target = _problem(dtype)
    options = dict(MODES[mode], backend=backend, reduction="sum")
    x = logits.to(device).requires_grad_()
    loss = cross_entropy(x, target.to(device), **options)
    (want,) = torch.autograd.grad(loss * 0.5, x)
    x_in_place = logits.to(device).requires_grad_()
    loss_in_place = cross_entropy(x_in_place, target.to(device), inplace_backward=True, **options)
    torch.testing.assert_close(loss_in_place, loss)
    (got,) = torch.autograd.grad(loss_in_place * 0.5, x_in_place)
    assert got.data_ptr() == x_in_place.data_ptr()  # the logits' own buffer
    assert torch.equal(x_in_place.detach(), got)  # which now holds the gradient
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_use_of_the_overwritten_logits_raises(backend: str, device: str) -> None:
    logits, target = _problem()
    x = logits.to(device).requires_grad_()
    loss = cross_entropy(x, target.to(device), backend=backend, inplace_backward=True, k=5, lambda_tail=-0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Another op that saved the logits for its backward, which autograd runs after the loss's.
    y = logits.to(device).requires_grad_()
    squares = (y * y).sum()
    total = squares + cross_entropy(y, target.to(device), backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) while ``fn()`` runs, from the profiler's allocator events."""
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return max([0, *sizes])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_allocates_no_logits_sized_buffer(backend: str, device: str, monkeypatch) -> None:
    if device != "cpu":
        pytest.skip("CPU allocator events; tests/test_memory covers CUDA")
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 8 * 64)  # torch backend: 8-row chunks of temporaries
    logits = random_logits(64, 64, seed=21).float()
    target = random_targets(64, 64, seed=21, ignore_every=5)
    logits_bytes = logits.numel() * logits.element_size()
    largest = {}
    for in_place in (False, True):
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, target, backend=backend, inplace_backward=in_place, k=5, lambda_tail=-0.1)
        largest[in_place] = _largest_allocation(lambda x=x, loss=loss: torch.autograd.grad(loss, x))
    assert largest[False] >= logits_bytes  # the gradient's own buffer, without the option
    assert largest[True] < logits_bytes / 4


def test_inplace_backward_refuses_torch_func() -> None:
    logits, target = _problem()
    with pytest.raises(NotImplementedError, match="eagerly only"):
        torch.func.grad(lambda x: cross_entropy(x, target, backend="torch", inplace_backward=True))(logits)


def test_inplace_backward_refuses_probability_targets() -> None:
    logits = random_logits(4, 10, seed=22).float().requires_grad_()
    probabilities = torch.softmax(random_logits(4, 10, seed=23).float(), -1)
    with pytest.raises(ValueError, match="inplace_backward=True needs class-index targets"):
        cross_entropy(logits, probabilities, inplace_backward=True)
