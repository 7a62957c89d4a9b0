"""linear_cross_entropy: the fused output layer + loss against the unfused loss, the fp64 oracle,
the Triton backend (under the interpreter on CPU), and a memory bound."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_peak_bytes, random_targets, surrogate_loss_fp64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import precision_ce
from precision_ce import PRESETS, RewardConfig, cross_entropy, linear_cross_entropy, preset, reference
from precision_ce import linear as linear_module

TOLERANCE = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    # 16-bit: the chunk's matmuls are the same as the unfused F.linear's, but the weight gradient is
    # summed over chunks in fp32 instead of inside one matmul: a few roundings of the dtype apart.
    torch.bfloat16: dict(rtol=2**-6, atol=2e-3),
    torch.float16: dict(rtol=2**-8, atol=5e-4),
}


def chunks(rows: int) -> torch.nn.LinearCrossEntropyOptions:
    """torch's options with ``rows`` rows per chunk."""
    return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=rows)


def layer(rows: int, hidden: int, vocab: int, dtype: torch.dtype = torch.float64, seed: int = 0,
          bias: bool = True, integer: bool = False):
    """Hidden states (rows, D), output layer (V, D) and bias (V,), all requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=generator, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * (2.0 / math.sqrt(hidden))
    b = torch.randn(vocab, generator=generator, dtype=torch.float64) * 0.5 if bias else None
    if integer:  # small integers: many exactly tied logits
        x, w = x.round().clamp(-1, 1), w.sign()
        b = None if b is None else torch.zeros_like(b)
    return tuple(None if t is None else t.to(dtype).requires_grad_() for t in (x, w, b))


def fused_and_unfused(x, w, b, target, upstream=None, **options):
    """(loss, grads) of linear_cross_entropy and of cross_entropy(F.linear(...)), torch backend."""
    results = []
    leaves = [t for t in (x, w, b) if t is not None]
    for fused in (True, False):
        if fused:
            loss = linear_cross_entropy(x, w, target, linear_bias=b, backend=options.pop("backend", "torch"), **options)
        else:
            logits = F.linear(x, w, b)
            weight = options.get("weight")
            unfused = {k: v for k, v in options.items() if k not in ("weight", "options")}
            loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), weight,
                                 backend="torch", **unfused)
            if options.get("reduction") == "none":
                loss = loss.reshape(target.shape)
        grad_out = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
        grads = torch.autograd.grad(loss, leaves, grad_out)
        results.append((loss.detach(), grads))
    return results


def assert_close_results(got, want, dtype) -> None:
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    assert got_loss.dtype == want_loss.dtype and got_loss.shape == want_loss.shape
    torch.testing.assert_close(got_loss, want_loss, equal_nan=True, **TOLERANCE[dtype])
    for name, g, h in zip(("input", "weight", "bias"), got_grads, want_grads, strict=False):
        assert g.dtype == h.dtype, name
        torch.testing.assert_close(g, h, msg=lambda m, name=name: f"grad {name}: {m}", **TOLERANCE[dtype])


# ------------------------------------------------------------------ against the unfused loss

PRESET_CASES = [name for name in PRESETS]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", PRESET_CASES)
def test_every_preset_and_reduction_matches_unfused(name: str, reduction: str) -> None:
    # k = 6 < V so the rank-aware presets rank; chunks of 4 rows (fewer than k), 37 rows (ragged).
    x, w, b = layer(37, 16, 50)
    target = random_targets(37, 50, seed=1, ignore_every=5)
    upstream = torch.linspace(-1.0, 2.0, 37, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7)
    got, want = fused_and_unfused(x, w, b, target, upstream, config=preset(name, k=6), reduction=reduction,
                                  options=chunks(4))
    assert_close_results(got, want, torch.float64)


OPTIONS = {
    "class_weight": dict(weight=True),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=3.0),
    "weighted_z_loss_mean": dict(weight=True, z_loss=5e-2, beta=-0.25),
    "all": dict(beta=-0.3, k=7, lambda_head=0.2, lambda_tail=-0.1, weight=True, label_smoothing=0.05,
                z_loss=1e-3, softcap=6.0),
    "all_focal": dict(beta=0.6, positive_reward="focal", k=3, lambda_head=-0.2, lambda_tail=0.1,
                      weight=True, label_smoothing=0.2),
}


def _options(spec: dict, vocab: int, dtype: torch.dtype) -> dict:
    options = dict(spec)
    if options.pop("weight", False):
        weight = torch.rand(vocab, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.2
        options["weight"] = weight.to(dtype)
    return options


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_matches_unfused(option: str, reduction: str, bias: bool) -> None:
    x, w, b = layer(23, 8, 40, bias=bias, seed=2)
    target = random_targets(23, 40, seed=2, ignore_every=4)
    upstream = torch.randn(23, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got, want = fused_and_unfused(x, w, b, target, upstream if reduction == "none" else None,
                                  reduction=reduction, options=chunks(5),
                                  **_options(OPTIONS[option], 40, torch.float64))
    assert_close_results(got, want, torch.float64)


def test_three_dimensional_input_and_stats() -> None:
    x, w, b = layer(2 * 9, 8, 30, seed=3)
    x3 = x.detach().reshape(2, 9, 8).requires_grad_()
    target = random_targets(18, 30, seed=3, ignore_every=4).reshape(2, 9)
    options = dict(beta=-0.25, k=4, lambda_tail=-0.1)
    loss, stats = linear_cross_entropy(x3, w, target, linear_bias=b, reduction="none", return_stats=True,
                                       options=chunks(4),
                                       backend="torch", **options)
    want, want_stats = cross_entropy(F.linear(x3, w, b).reshape(-1, 30), target.reshape(-1), reduction="none",
                                     return_stats=True, backend="torch", **options)
    assert loss.shape == (2, 9) and all(s.shape == (2, 9) for s in stats)
    torch.testing.assert_close(loss, want.reshape(2, 9))
    for got_stat, want_stat in zip(stats, want_stats, strict=True):
        torch.testing.assert_close(got_stat, want_stat.reshape(2, 9))
    assert not any(s.requires_grad for s in stats)
    got, want = fused_and_unfused(x3, w, b, target, config=preset("head_reward", k=5), options=chunks(7))
    assert_close_results(got, want, torch.float64)
    assert got[1][0].shape == (2, 9, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_16_bit_and_fp32_inputs_match_unfused(dtype: torch.dtype) -> None:
    x, w, b = layer(33, 16, 64, dtype=dtype, seed=4)
    target = random_targets(33, 64, seed=4, ignore_every=6)
    for config in (PRESETS["precision"], preset("tail_penalty", k=5)):
        got, want = fused_and_unfused(x, w, b, target, config=config, options=chunks(8))
        assert got[0].dtype == dtype
        assert_close_results(got, want, dtype)


def test_autocast_computes_the_matmul_in_bf16_and_returns_fp32() -> None:
    x, w, b = layer(20, 16, 40, dtype=torch.float32, seed=5)
    target = random_targets(20, 40, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = fused_and_unfused(x, w, b, target, beta=-0.25, k=4, lambda_tail=-0.1, options=chunks(6))
    assert got[0].dtype == torch.float32 and want[0].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got[1])  # gradients in the parameters' dtype
    assert_close_results(got, want, torch.bfloat16)


def test_heavy_ignore_and_all_ignored_chunks() -> None:
    x, w, b = layer(30, 8, 20, seed=6)
    target = random_targets(30, 20, seed=6)
    target[:12] = -100  # the first three chunks of 4 have no target at all
    target[15::2] = -100
    for reduction in ("mean", "sum", "none"):
        got, want = fused_and_unfused(x, w, b, target, reduction=reduction, options=chunks(4), beta=0.5, k=3,
                                      lambda_head=0.1)
        assert_close_results(got, want, torch.float64)
        assert torch.all(got[1][0][:12] == 0)
    everything_ignored = torch.full((30,), -100)
    loss = linear_cross_entropy(x, w, everything_ignored, linear_bias=b, options=chunks(4), beta=-0.25)
    assert torch.isnan(loss)  # a mean over no rows, as torch's
    grads = torch.autograd.grad(loss, (x, w, b))
    assert all(torch.all(g == 0) for g in grads)


def test_ties_across_chunk_boundaries() -> None:
    # Identical rows on both sides of every chunk boundary, and logits tied all over each row.
    x, w, b = layer(6, 8, 24, seed=7, integer=True)
    x_tied = x.detach().repeat_interleave(3, dim=0).requires_grad_()  # rows 3i..3i+2 equal
    target = torch.tensor([0, 0, 5, 5, 23, 23, 7, 7, 7, 1, 2, 3, 0, 11, 11, 11, 4, -100])
    for chunk in (2, 4, 5):
        got, want = fused_and_unfused(x_tied, w, b, target, options=chunks(chunk), k=4, lambda_head=0.3,
                                      lambda_tail=-0.2)
        assert_close_results(got, want, torch.float64)


def test_against_fp64_oracle() -> None:
    x, w, b = layer(19, 8, 30, seed=8)
    target = random_targets(19, 30, seed=8, ignore_every=4)
    class_weight = torch.rand(30, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.3
    reward = RewardConfig(beta=-0.25, k=5, lambda_head=0.2, lambda_tail=-0.1)
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    loss = linear_cross_entropy(x, w, target, linear_bias=b, weight=class_weight, reduction="sum", config=reward,
                                options=chunks(4), **options)
    got = torch.autograd.grad(loss, (x, w, b))
    logits = F.linear(x, w, b)
    want_loss = surrogate_loss_fp64(logits, target, reward, class_weight, **options).sum()
    want = torch.autograd.grad(want_loss, (x, w, b))
    torch.testing.assert_close(loss, want_loss.detach(), **TOLERANCE[torch.float64])
    for g, h in zip(got, want, strict=True):
        torch.testing.assert_close(g, h, **TOLERANCE[torch.float64])


# ------------------------------------------------------------------ autograd behaviour


def test_no_grad_does_no_gradient_work(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, b = layer(12, 8, 20, seed=10)
    target = random_targets(12, 20, seed=10)

    def forbidden(*args, **kwargs):
        raise AssertionError("backward work under no_grad")

    with torch.no_grad():
        want = linear_cross_entropy(x, w, target, linear_bias=b, options=chunks(4), beta=-0.25)
    monkeypatch.setattr(reference, "backward", forbidden)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            loss = linear_cross_entropy(x, w, target, linear_bias=b, options=chunks(4), beta=-0.25)
        assert not loss.requires_grad and torch.equal(loss, want)
    frozen = [t.detach() for t in (x, w, b)]
    loss = linear_cross_entropy(*frozen[:2], target, linear_bias=frozen[2], options=chunks(4), beta=-0.25)
    assert not loss.requires_grad and torch.equal(loss, want)


def test_only_the_requested_gradients() -> None:
    x, w, b = layer(12, 8, 20, seed=11)
    target = random_targets(12, 20, seed=11)
    for reduction in ("mean", "none"):
        loss = linear_cross_entropy(x.detach(), w, target, linear_bias=b.detach(), options=chunks(5),
                                    reduction=reduction, k=3, lambda_tail=-0.1)
        (grad_w,) = torch.autograd.grad(loss.sum(), w)
        _, want = fused_and_unfused(x, w, b, target, options=chunks(5), reduction=reduction, k=3, lambda_tail=-0.1)
        torch.testing.assert_close(grad_w, want[1][1])


def test_second_backward_raises_a_clear_error() -> None:
    x, w, b = layer(8, 4, 10, seed=12)
    loss = linear_cross_entropy(x, w, random_targets(8, 10, seed=12), linear_bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_deterministic() -> None:
    x, w, b = layer(40, 16, 64, dtype=torch.float32, seed=13)
    target = random_targets(40, 64, seed=13)
    runs = [fused_and_unfused(x, w, b, target, options=chunks(16), k=5, lambda_tail=-0.1)[0] for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(g, h) for g, h in zip(runs[0][1], runs[1][1], strict=True))


def test_module_form() -> None:
    x, w, b = layer(10, 8, 20, seed=14)
    target = random_targets(10, 20, seed=14)
    criterion = precision_ce.PrecisionLinearCrossEntropyLoss(config=PRESETS["precision"], options=chunks(3))
    loss = criterion(x, w, target, linear_bias=b)
    torch.testing.assert_close(loss, linear_cross_entropy(x, w, target, linear_bias=b, beta=-0.25))
    assert "precision" not in repr(criterion) or "beta=-0.25" in repr(criterion)
    with pytest.raises(ValueError, match="reduction"):
        precision_ce.PrecisionLinearCrossEntropyLoss(reduction="avg")


def test_chunk_size_is_automatic_and_bounded() -> None:
    auto = linear_module.auto_chunk_rows
    assert auto(4096, 32000, 256, 4) == 128  # 4 N D / V rows: 16 MiB of logits, 4x the input's 4 MiB
    assert auto(16384, 128256, 4096, 2) == 2080  # in rows of 16
    assert auto(8192, 128256, 4096, 2, "cpu") == 4176  # 16-bit on CPU: 16 N D / V
    assert auto(1024, 32000, 256, 4, "cpu") == 32
    assert auto(10, 32000, 256, 4) == 10  # never more than N
    assert auto(100000, 10**7, 8, 4) == 16  # at least 16 rows
    # At most the fp32 weight gradient's 4 V D bytes: D rows of fp32 logits, 2 D of 16-bit, D / 2 of fp64
    assert auto(16384, 32000, 256, 4) == 256
    assert auto(16384, 128256, 4096, 2, "cpu") == 8192
    assert auto(4096, 8192, 256, 8) == 128


def test_large_rank_aware_calls_on_cpu_take_fused_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend="auto" on the CPU: from FUSED_MIN_LOGITS fp32 logits up, presets other than plain
    cross-entropy run Inductor-fused chunks; below it, with backend="torch", at plain
    cross-entropy, or for 16-bit and fp64 logits, the eager ones. (The fused backend is replaced by
    a recording eager one here: its numbers are tests/test_compile.py's.)"""
    from precision_ce.linear import chunks as chunk_module

    used = []

    class RecordingFused:
        RowState = reference.RowState
        backward = staticmethod(reference.backward)

        @staticmethod
        def forward(*args, **kwargs):
            used.append(True)
            return reference.forward(*args, **kwargs)

    monkeypatch.setitem(chunk_module.CHUNK_BACKENDS, "torch_fused", RecordingFused)
    monkeypatch.setattr(linear_module, "FUSED_MIN_LOGITS", 12 * 20)
    target = random_targets(12, 20, seed=21)
    for dtype, rows, backend, name, fused in [
        (torch.float32, 12, "auto", "tail_penalty", True), (torch.float32, 11, "auto", "tail_penalty", False),
        (torch.float32, 12, "torch", "tail_penalty", False), (torch.float32, 12, "auto", "cross_entropy", False),
        (torch.bfloat16, 12, "auto", "tail_penalty", False), (torch.float64, 12, "auto", "tail_penalty", False),
    ]:
        x, w, b = layer(12, 8, 20, dtype=dtype, seed=21)
        used.clear()
        loss = linear_cross_entropy(x[:rows], w, target[:rows], linear_bias=b, options=chunks(5), backend=backend,
                                    config=PRESETS[name])
        assert bool(used) == fused, (dtype, rows, backend, name)
        want = cross_entropy(F.linear(x[:rows], w, b), target[:rows], config=PRESETS[name], backend="torch")
        torch.testing.assert_close(loss, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("bad, match", [
    (dict(w=torch.zeros(20, 7)), "linear_weight must have shape"),
    (dict(w=torch.zeros(20, 8, dtype=torch.float64)), "linear_weight is torch.float64"),
    (dict(b=torch.zeros(19)), "linear_bias must be"),
    (dict(t=torch.zeros(11, dtype=torch.long)), "target must have shape"),
    (dict(t=torch.zeros(12)), "class-probability targets must have shape"),
    (dict(t=torch.full((12,), 20)), "outside"),
    (dict(weight=torch.ones(19)), "weight must have shape"),
    (dict(weight=torch.ones(20, 8)), "the output layer's .* is linear_weight"),
    (dict(options=torch.nn.LinearCrossEntropyOptions(acc_dtype=torch.float16)), "acc_dtype"),
    (dict(options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3, chunking_method="aspect_ratio")),
     "batch_chunk_size=3 and chunking_method"),
    (dict(options={"batch_chunk_size": 4}), "LinearCrossEntropyOptions"),
    (dict(class_weight=torch.ones(20)), r"class_weight= was renamed; pass weight="),
    (dict(bias=torch.ones(20)), r"bias= was renamed; pass linear_bias="),
    (dict(chunk_size=4), r"chunk_size= was renamed; pass options=torch.nn.LinearCrossEntropyOptions\(batch_chunk_size"),
    (dict(chunk_sise=4), "unexpected keyword argument 'chunk_sise'"),
    (dict(reduction="avg"), "reduction"),
    (dict(k=0), "k must be"),
    (dict(backend="cuda"), "backend"),
])
def test_bad_arguments_raise_clear_errors(bad: dict, match: str) -> None:
    x, w, b = layer(12, 8, 20, dtype=torch.float32, seed=15)
    args = dict(x=x, w=w, t=random_targets(12, 20, seed=15), b=b)
    for name in ("x", "w", "t", "b"):
        if name in bad:
            args[name] = bad.pop(name)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_cross_entropy(args["x"], args["w"], args["t"], linear_bias=args["b"], **bad)


# ------------------------------------------------------------------ memory


def test_memory_stays_far_below_the_logits() -> None:
    """N x V logits take 8 MiB here; the fused loss must peak near a chunk plus the gradients."""
    rows, hidden, vocab = 512, 32, 4096
    x, w, _ = layer(rows, hidden, vocab, dtype=torch.float32, seed=16, bias=False)
    target = random_targets(rows, vocab, seed=16)
    logits_bytes = rows * vocab * 4
    returned = (rows * hidden + vocab * hidden) * 4

    def fused():
        loss = linear_cross_entropy(x, w, target, options=chunks(8), config=preset("tail_penalty", k=10))
        return torch.autograd.grad(loss, (x, w))

    def unfused():
        loss = cross_entropy(F.linear(x, w), target, config=preset("tail_penalty", k=10), backend="torch")
        return torch.autograd.grad(loss, (x, w))

    fused(), unfused()
    fused_peak, unfused_peak = cpu_peak_bytes(fused), cpu_peak_bytes(unfused)
    assert unfused_peak > 2 * logits_bytes  # the probe sees the logits and their gradient when they exist
    # 8-row chunks of 128 KiB: the torch backend's dozen chunk-sized temporaries on top of the returned
    # gradients, about 1/8 of the logits; one (N, V) tensor alone would break the bound.
    assert fused_peak - returned < 0.2 * logits_bytes, (fused_peak, logits_bytes)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunk_gradient_overwrites_the_chunks_logits(monkeypatch: pytest.MonkeyPatch, device: str, backend: str,
                                                      reduction: str) -> None:
    """Each chunk's gradient goes into the buffer of that chunk's logits (no second (chunk, V)
    buffer), in the forward pass ("mean") and in the backward's recomputation ("none"), and the
    result is the unfused loss's."""
    module = precision_ce.triton_backend if backend == "triton" else reference
    where = device if backend == "triton" else "cpu"
    calls = []
    backward = module.backward

    def recording_backward(logits, *args, **kwargs):
        grad = backward(logits, *args, **kwargs)
        calls.append(grad.data_ptr() == logits.data_ptr())
        return grad

    monkeypatch.setattr(module, "backward", recording_backward)
    x, w, b = (t.detach().to(where).requires_grad_() for t in layer(10, 8, 40, dtype=torch.float32, seed=19))
    target = random_targets(10, 40, seed=19, ignore_every=3).to(where)
    options = dict(k=5, lambda_tail=-0.1, reduction=reduction)
    loss = linear_cross_entropy(x, w, target, linear_bias=b, options=chunks(4), backend=backend, **options)
    grads = torch.autograd.grad(loss.sum(), (x, w, b))
    assert calls == [True] * 3  # 3 chunks of 4, 4, 2 rows
    monkeypatch.setattr(module, "backward", backward)
    want_loss = cross_entropy(F.linear(x, w, b), target, backend=backend, **options)
    want = torch.autograd.grad(want_loss.sum(), (x, w, b))
    torch.testing.assert_close(loss, want_loss)
    for g, h in zip(grads, want, strict=True):
        torch.testing.assert_close(g, h)


# ------------------------------------------------------------------ Triton path (interpreter on CPU)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path_matches_unfused(device: str, reduction: str, dtype: torch.dtype) -> None:
    """fp32: against the torch backend; bf16: against the unfused Triton loss, since the two backends
    may round a logit's gradient to bf16 one ulp apart, and a weight-gradient sum can cancel."""
    x, w, b = layer(11, 8, 40, dtype=dtype, seed=17)
    target = random_targets(11, 40, seed=17, ignore_every=4)
    class_weight = torch.rand(40, generator=torch.Generator().manual_seed(18)) + 0.2
    options = dict(beta=-0.25, k=5, lambda_head=0.1, lambda_tail=-0.1, z_loss=1e-3, label_smoothing=0.1,
                   reduction=reduction)
    upstream = torch.linspace(-1, 1, 11) if reduction == "none" else torch.tensor(1.0)
    results = []
    for fused in (True, False):
        backend, where = ("torch", "cpu") if not fused and dtype == torch.float32 else ("triton", device)
        leaves = [t.detach().to(where).requires_grad_() for t in (x, w, b)]
        if fused:
            loss = linear_cross_entropy(*leaves[:2], target.to(where), linear_bias=leaves[2], options=chunks(4),
                                        weight=class_weight.to(where), backend=backend, **options)
        else:
            loss = cross_entropy(F.linear(*leaves), target.to(where), class_weight.to(where), backend=backend,
                                 **options)
        grads = torch.autograd.grad(loss, leaves, upstream.to(where, loss.dtype))
        results.append((loss.detach().cpu(), [g.cpu() for g in grads]))
    (got_loss, got_grads), (want_loss, want_grads) = results
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got_loss, want_loss, **tolerance)
    for g, h in zip(got_grads, want_grads, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g, h, **tolerance)


# ------------------------------------------------------------------ random problems


@st.composite
def problems(draw):
    rows, hidden, vocab = draw(st.integers(1, 24)), draw(st.integers(1, 12)), draw(st.integers(2, 40))
    bias = draw(st.booleans())
    x, w, b = layer(rows, hidden, vocab, seed=draw(st.integers(0, 2**31 - 1)), bias=bias,
                    integer=draw(st.booleans()))
    target = random_targets(rows, vocab, seed=draw(st.integers(0, 1000)), ignore_every=draw(st.integers(0, 3)))
    options = dict(
        beta=draw(st.sampled_from([0.0, -0.25, 0.5])),
        positive_reward=draw(st.sampled_from(["power", "focal"])),
        k=draw(st.integers(1, vocab + 1)),
        lambda_head=draw(st.sampled_from([0.0, 0.2])),
        lambda_tail=draw(st.sampled_from([0.0, -0.1])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        z_loss=draw(st.sampled_from([0.0, 1e-2])),
        softcap=draw(st.sampled_from([None, 4.0])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        options=chunks(draw(st.integers(1, rows + 2))),
    )
    if draw(st.booleans()):
        options["weight"] = torch.rand(vocab, dtype=torch.float64) + 0.1
    return x, w, b, target, options


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_problems_match_unfused(problem) -> None:
    x, w, b, target, options = problem
    upstream = torch.randn(target.shape, dtype=torch.float64) if options["reduction"] == "none" else None
    got, want = fused_and_unfused(x, w, b, target, upstream, **options)
    assert_close_results(got, want, torch.float64)
