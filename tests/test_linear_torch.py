"""precision_ce.linear_cross_entropy as a drop-in for torch 2.13's F.linear_cross_entropy and
nn.LinearCrossEntropyLoss: every call over torch's own argument space gives torch's result, the
weight gradient's accumulator (options.acc_dtype) and its memory, and the renamed keywords."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_peak_bytes, random_targets

import precision_ce
from precision_ce import linear_cross_entropy

Options = torch.nn.LinearCrossEntropyOptions
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def layer(rows: int | None, hidden: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """Hidden states ((rows,) D), output layer (V, D), bias (V,) and class weights (V,)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*(() if rows is None else (rows,)), hidden, generator=generator, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * (2.0 / math.sqrt(hidden))
    b = torch.randn(vocab, generator=generator, dtype=torch.float64) * 0.5
    class_weight = torch.rand(vocab, generator=generator, dtype=torch.float64) + 0.2
    return [t.to(dtype) for t in (x, w, b, class_weight)]


def both(x, w, target, upstream=None, leaves_bias=None, torch_options=None, **kwargs):
    """(loss, grads) of ours and of torch's, each on fresh leaves (input, linear_weight[, linear_bias])."""
    results = []
    for fn in (linear_cross_entropy, F.linear_cross_entropy):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w) + (() if leaves_bias is None else (leaves_bias,))]
        bias = {} if leaves_bias is None else {"linear_bias": leaves[2]}
        options = torch_options if fn is F.linear_cross_entropy and torch_options is not None else kwargs.get("options")
        loss = fn(leaves[0], leaves[1], target, **bias, **{**kwargs, "options": options})
        grads = torch.autograd.grad(loss, leaves, torch.ones_like(loss) if upstream is None else upstream)
        results.append((loss.detach(), grads))
    return results


def assert_same(results, dtype) -> None:
    (got, got_grads), (want, want_grads) = results
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, equal_nan=True, **TOLERANCE[dtype])
    assert len(got_grads) == len(want_grads)
    for name, g, h in zip(("input", "linear_weight", "linear_bias"), got_grads, want_grads, strict=False):
        assert g.dtype == h.dtype, name
        torch.testing.assert_close(g, h, msg=lambda m, name=name: f"grad {name}: {m}", **TOLERANCE[dtype])


OPTIONS = {
    "none": None,
    "defaults": Options(),
    "chunks_of_3": Options(batch_chunk_size=3),
    "aspect_ratio_2": Options(chunking_method="aspect_ratio:2"),
    "one_chunk": Options(chunking_method=None),
    "explicit_acc": "acc_dtype=dtype",  # the input's own dtype, given explicitly
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_index_targets_match_torch_over_its_argument_space(reduction: str, options: str, dtype: torch.dtype) -> None:
    # torch's reference path (options=None) is the oracle for every combination; ours with each option.
    x, w, b, class_weight = layer(13, 8, 24, dtype, seed=1)
    chosen = Options(acc_dtype=dtype, batch_chunk_size=5) if options == "explicit_acc" else OPTIONS[options]
    for ignore_index, smoothing, weighted, bias in itertools.product([None, -100, 3], [0.0, 0.15], [False, True],
                                                                     [False, True]):
        target = random_targets(13, 24, seed=2, ignore_every=4)
        if ignore_index == 3:
            target[target == -100] = 3
        upstream = torch.linspace(-1.0, 2.0, 13, dtype=dtype) if reduction == "none" else None
        results = both(x, w, target, upstream, b if bias else None, torch_options=None, reduction=reduction,
                       ignore_index=ignore_index, label_smoothing=smoothing,
                       weight=class_weight if weighted else None, options=chosen)
        assert_same(results, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_chunked_path_agrees_too(reduction: str) -> None:
    x, w, b, class_weight = layer(20, 8, 30, torch.float64, seed=3)
    target = random_targets(20, 30, seed=3, ignore_every=3)
    options = Options(batch_chunk_size=6)
    upstream = torch.rand(20, dtype=torch.float64) if reduction == "none" else None
    assert_same(both(x, w, target, upstream, b, reduction=reduction, weight=class_weight, options=options),
                torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_match_torch(reduction: str) -> None:
    x, w, b, class_weight = layer(11, 8, 20, torch.float64, seed=4)
    target = torch.rand(11, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64).softmax(-1)
    upstream = torch.rand(11, dtype=torch.float64) if reduction == "none" else None
    for smoothing, weighted in itertools.product([0.0, 0.2], [False, True]):
        results = both(x, w, target, upstream, b, reduction=reduction, label_smoothing=smoothing,
                       weight=class_weight if weighted else None, options=Options(batch_chunk_size=4))
        assert_same(results, torch.float64)


def test_one_dimensional_input_matches_torch() -> None:
    x, w, b, class_weight = layer(None, 8, 20, torch.float64, seed=5)
    for target in (torch.tensor(7), torch.tensor(-100), torch.rand(20, dtype=torch.float64).softmax(-1)):
        for reduction in ("mean", "sum", "none"):
            results = both(x, w, target, None, b, reduction=reduction, weight=class_weight)
            assert results[0][0].shape == ()
            assert_same(results, torch.float64)


def test_where_torch_raises_we_raise() -> None:
    x, w, b, _ = layer(6, 8, 20, torch.float32, seed=6)
    target = random_targets(6, 20, seed=6)
    probabilities = torch.rand(6, 20).softmax(-1)
    bad_calls = [
        dict(input=x, linear_weight=w[:, :7], target=target),  # D mismatch
        dict(input=x, linear_weight=w, target=target, linear_bias=b[:19]),  # bias shape
        dict(input=x, linear_weight=w, target=probabilities, ignore_index=-100),  # ignore_index with probabilities
        dict(input=x, linear_weight=w, target=target, label_smoothing=1.5),
        dict(input=x, linear_weight=w, target=target, reduction="avg"),
        dict(input=x, linear_weight=w, target=torch.full((6,), 20)),  # class index out of range
    ]
    for call in bad_calls:
        with pytest.raises((RuntimeError, ValueError, IndexError)):
            F.linear_cross_entropy(**call)
        with pytest.raises((ValueError, TypeError)):
            linear_cross_entropy(**call)


def test_k_dimensional_outputs_are_a_clear_error() -> None:
    x, w, _, _ = layer(4, 8, 6, torch.float32, seed=7)
    weight_k = w.reshape(2, 3, 8)  # (C = 2, d_1 = 3, D): torch's K-dimensional loss
    target = torch.zeros(4, 3, dtype=torch.long)
    F.linear_cross_entropy(x, weight_k, target)  # torch supports it
    with pytest.raises(NotImplementedError, match="K-dimensional"):
        linear_cross_entropy(x, weight_k, target)
    with pytest.raises(NotImplementedError, match="K-dimensional"):
        precision_ce.LinearCrossEntropyLoss(8, 2, out_features=(3,))


def test_module_is_torchs_with_our_loss() -> None:
    torch.manual_seed(8)
    class_weight = torch.rand(24) + 0.2
    kwargs = dict(bias=True, weight=class_weight, reduction="sum", label_smoothing=0.1, ignore_index=None,
                  options=Options(batch_chunk_size=5))
    ours = precision_ce.LinearCrossEntropyLoss(8, 24, **kwargs)
    theirs = torch.nn.LinearCrossEntropyLoss(8, 24, **kwargs)
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(17, 8)
    target = random_targets(17, 24, seed=8, ignore_every=4)
    got, want = ours(x, target), theirs(x, target)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
    got.backward()
    want.backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name, **TOLERANCE[torch.float32])
    shaped = precision_ce.LinearCrossEntropyLoss(8, 24, config=precision_ce.PRESETS["tail_penalty"])
    assert "tail_penalty" in repr(shaped) or "lambda_tail" in repr(shaped)


def test_allow_retain_graph_gives_a_second_backward() -> None:
    x, w, b, _ = layer(9, 8, 20, torch.float64, seed=9)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    target = random_targets(9, 20, seed=9)
    loss = linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2],
                                options=Options(allow_retain_graph=True, batch_chunk_size=4))
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(2 * loss, leaves)
    for g, h in zip(first, second, strict=True):
        torch.testing.assert_close(2 * g, h)
    loss = linear_cross_entropy(leaves[0], leaves[1], target, options=Options())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="allow_retain_graph=True"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_accumulator_options(dtype: torch.dtype) -> None:
    """fp32 accumulation (the default) against torch's fp32 result on the same 16-bit numbers; the
    parameters' dtype as accumulator (acc_dtype) rounds once per chunk: within a few ulps of it."""
    x, w, b, _ = layer(40, 16, 64, dtype, seed=10)
    target = random_targets(40, 64, seed=10, ignore_every=5)
    want_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    want = F.linear_cross_entropy(want_leaves[0], want_leaves[1], target, linear_bias=want_leaves[2])
    want_grads = torch.autograd.grad(want, want_leaves)
    grads = {}
    for acc in (None, torch.float32, dtype):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        loss = linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2],
                                    options=Options(batch_chunk_size=8, acc_dtype=acc))
        grads[acc] = torch.autograd.grad(loss, leaves)
        assert loss.dtype == dtype and all(g.dtype == dtype for g in grads[acc])
        torch.testing.assert_close(loss.double(), want.detach(), rtol=2**-7, atol=0)
        ulps = 2 if acc != dtype else 8  # 5 chunks: a rounding each
        for g, h in zip(grads[acc], want_grads, strict=True):
            torch.testing.assert_close(g.double(), h, rtol=ulps * torch.finfo(dtype).eps,
                                       atol=ulps * torch.finfo(dtype).eps * h.abs().max().item())
    assert all(torch.equal(g, h) for g, h in zip(grads[None], grads[torch.float32], strict=True))


def test_weight_gradient_accumulates_without_a_16_bit_product() -> None:
    """bf16 parameters, (V, D) = (4096, 256): the fp32 accumulator (4 V D bytes) and the returned bf16
    gradient (2 V D) are the whole weight-gradient memory; a (V, D) product per chunk (2 V D in bf16,
    4 V D more once copied to fp32, as before) would break the bound. acc_dtype=bf16 holds 2 V D for
    the accumulator, which is returned as is; on CPU the in-place bf16 GEMM (``addmm_``) forms its
    product in a (V, D) temporary (2 V D), which cuBLAS does not."""
    rows, hidden, vocab = 64, 256, 4096
    x, w, _, _ = layer(rows, hidden, vocab, torch.bfloat16, seed=11)
    x, w = x.requires_grad_(), w.requires_grad_()
    target = random_targets(rows, vocab, seed=11)
    vd = vocab * hidden
    others = rows * hidden * 2 + 16 * vocab * (2 + 4 + 2) + (256 << 10)  # grad_input, a 16-row chunk, slack

    def run(acc):
        loss = linear_cross_entropy(x, w, target, options=Options(batch_chunk_size=16, acc_dtype=acc))
        return torch.autograd.grad(loss, (x, w))

    run(None)
    fp32_peak, bf16_peak = cpu_peak_bytes(lambda: run(None)), cpu_peak_bytes(lambda: run(torch.bfloat16))
    assert fp32_peak <= 4 * vd + 2 * vd + others, fp32_peak / vd
    assert bf16_peak <= 2 * vd + 2 * vd + others, bf16_peak / vd
    assert fp32_peak - bf16_peak >= 1.9 * vd


@pytest.mark.parametrize("stale, replacement", [
    (dict(class_weight=torch.ones(20)), "weight="),
    (dict(bias=torch.ones(20)), "linear_bias="),
    (dict(chunk_size=4), r"options=torch\.nn\.LinearCrossEntropyOptions\(batch_chunk_size"),
])
def test_renamed_keywords_name_the_new_one(stale: dict, replacement: str) -> None:
    x, w, _, _ = layer(6, 8, 20, torch.float32, seed=12)
    with pytest.raises(TypeError, match=f"was renamed; pass {replacement}"):
        linear_cross_entropy(x, w, random_targets(6, 20, seed=12), **stale)
    with pytest.raises(TypeError, match=f"was renamed; pass {replacement}"):
        precision_ce.PrecisionLinearCrossEntropyLoss(**stale)
    # The 0.1 call with the output layer as ``weight=`` (now the class weights) fails loudly:
    with pytest.raises(TypeError, match="linear_weight"):
        linear_cross_entropy(x, weight=w, target=random_targets(6, 20, seed=12))  # type: ignore[call-arg]
