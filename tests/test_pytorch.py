"""PyTorch-native behaviour: torch.compile(fullgraph=True), custom ops, autocast, meta tensors,
torch.func, double backward, CUDA graphs.

Compile on the CPU is slow (seconds per graph), so the default run compiles a few cases chosen to
cover every preset, input form, reduction and option at least once; the full grid is marked slow.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import random_logits, random_targets

import precision_ce
from precision_ce import PRESETS, RewardConfig, cross_entropy, ops, reference

ALL_OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_inputs(form: str, vocab: int = 24, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Logits and class-index targets in one of F.cross_entropy's input forms ("1d", "2d", "3d")."""
    if form == "1d":
        return random_logits(1, vocab, seed=seed)[0].to(dtype), torch.tensor(vocab // 2)
    if form == "3d":  # (N, C, d): the class dimension is not last
        logits = random_logits(2 * 3, vocab, seed=seed).reshape(2, 3, vocab).movedim(-1, 1).to(dtype)
        return logits, random_targets(6, vocab, seed=seed, ignore_every=4).reshape(2, 3)
    # "ties": integer logits, so that ties at the top-k threshold straddle K in most rows.
    logits = random_logits(7, vocab, seed=seed, scale=1.0, integer=form == "ties").to(dtype)
    return logits, random_targets(7, vocab, seed=seed, ignore_every=3)


def assert_compiled_matches_eager(cases: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> None:
    """Each case's loss (and stats) and gradient, eager vs torch.compile(fullgraph=True).

    All cases go into one compiled function (one graph, one C++ build on the CPU): compile
    time, not the cases, dominates these tests.
    """

    # Every call compiles a new closure of the same code object: start from a clean Dynamo cache,
    # or a long grid hits Dynamo's recompile cap (8 per code object) in this helper.
    torch._dynamo.reset()

    def losses(xs: list[torch.Tensor]) -> list:
        return [cross_entropy(x, target, **kwargs) for x, (_, target, kwargs) in zip(xs, cases, strict=True)]

    results = []
    for run in (losses, torch.compile(losses, fullgraph=True)):
        xs = [logits.detach().clone().requires_grad_() for logits, _, _ in cases]
        outputs = run(xs)
        total = sum((out[0] if isinstance(out, tuple) else out).sum() for out in outputs)
        results.append((outputs, torch.autograd.grad(total, xs)))
    (want, want_grads), (got, got_grads) = results
    for got_out, want_out, got_grad, want_grad in zip(got, want, got_grads, want_grads, strict=True):
        if isinstance(want_out, tuple):  # return_stats
            for got_part, want_part in zip(got_out[1], want_out[1], strict=True):
                torch.testing.assert_close(got_part, want_part)
            want_out, got_out = want_out[0], got_out[0]
        assert got_out.dtype == want_out.dtype and got_out.shape == want_out.shape
        torch.testing.assert_close(got_out, want_out)
        assert got_grad.dtype == want_grad.dtype
        torch.testing.assert_close(got_grad, want_grad)


def _case(preset: str, form: str, reduction: str, dtype: torch.dtype, options: dict):
    logits, target = make_inputs(form, dtype=dtype)
    vocab = logits.shape[-1 if form == "1d" else 1]
    options = dict(options)
    fields = {"positive_reward": options.pop("positive_reward")} if "positive_reward" in options else {}
    if options.pop("weight", False):
        options["weight"] = torch.rand(vocab, generator=torch.Generator().manual_seed(3), dtype=dtype) + 0.5
    return logits, target, {"config": precision_ce.preset(preset, k=5, **fields), "reduction": reduction, **options}


# Default run: every preset, input form, reduction, dtype and option at least once, in one graph.
QUICK_CASES = [
    ("cross_entropy", "2d", "mean", torch.float32, {}),  # F.cross_entropy's own path, traced
    ("precision", "3d", "none", torch.bfloat16, {}),
    ("diversity", "1d", "sum", torch.float32, {"positive_reward": "focal"}),
    ("tail_penalty", "2d", "mean", torch.float32, {"weight": True, **ALL_OPTIONS}),
    ("head_reward", "3d", "mean", torch.float64, {"return_stats": True}),
    ("cross_entropy", "2d", "sum", torch.float16, {"z_loss": 1e-3, "weight": True}),
    ("tail_penalty", "ties", "none", torch.float32, {"return_stats": True}),
    ("head_reward", "ties", "sum", torch.bfloat16, {}),
]


def test_compiled_fullgraph_matches_eager(monkeypatch) -> None:
    # Chunks of a few rows, so that compiled code runs several fused chunks and a shorter last one.
    monkeypatch.setattr(reference, "FUSED_CHUNK_ELEMENTS", 50)
    probabilities = torch.softmax(random_logits(5, 9, seed=5).float(), -1)
    probability_case = (random_logits(5, 9, seed=4).float(), probabilities,
                        {"z_loss": 1e-3, "softcap": 5.0, "label_smoothing": 0.1})
    assert_compiled_matches_eager([*(_case(*case) for case in QUICK_CASES), probability_case])


GRID_OPTIONS = [{}, {"weight": True}, {"label_smoothing": 0.1}, {"z_loss": 1e-3}, {"softcap": 5.0},
                {"weight": True, **ALL_OPTIONS}, {"return_stats": True}]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("form", ["1d", "2d", "3d"])
def test_compiled_fullgraph_matches_eager_full_grid(preset: str, form: str) -> None:
    """Every preset x input form x reduction x option (one graph per preset and form)."""
    cases = [_case(preset, form, reduction, torch.float32, options)
             for reduction, options in itertools.product(["none", "mean", "sum"], GRID_OPTIONS)]
    assert_compiled_matches_eager(cases)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dynamo_sees_no_graph_break(preset: str) -> None:
    logits, target = make_inputs("2d")
    weight = torch.rand(logits.shape[1]) + 0.5

    def loss(x, t):
        return cross_entropy(x, t, weight, config=PRESETS[preset], return_stats=True, **ALL_OPTIONS)

    explanation = torch._dynamo.explain(loss)(logits, target)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_changed_hyperparameters_between_compiled_calls() -> None:
    """A recompile may turn a float argument into a symbolic float; validation must still trace."""
    logits, target = make_inputs("2d")

    @torch.compile(fullgraph=True)
    def loss(x, t, beta, z_loss):
        return cross_entropy(x, t, beta=beta, z_loss=z_loss)

    for beta, z_loss in ((-0.25, 1e-3), (0.5, 2e-3), (0.25, 0.0)):
        torch.testing.assert_close(loss(logits, target, beta, z_loss),
                                   cross_entropy(logits, target, beta=beta, z_loss=z_loss))


def test_autocast_under_compile_returns_fp32() -> None:
    hidden = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    layer = torch.nn.Linear(16, 40)
    target = random_targets(6, 40, seed=5)

    def step(h, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cross_entropy(layer(h), t, config=PRESETS["precision"])

    want = step(hidden, target)
    got = torch.compile(step, fullgraph=True)(hidden, target)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)


# --- custom ops -------------------------------------------------------------------------------


def _forward_args(with_stats: bool, dtype: torch.dtype = torch.float64):
    logits = random_logits(6, 11, seed=7).to(dtype).requires_grad_()
    target = random_targets(6, 11, seed=7, ignore_every=3)
    weight = torch.rand(11, generator=torch.Generator().manual_seed(8), dtype=dtype) + 0.5
    params = precision_ce.LossParams(RewardConfig(beta=-0.25, k=3, lambda_head=0.1, lambda_tail=-0.1),
                                     label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    return (logits, target, weight, torch.tensor(0.8, dtype=dtype), *ops.params_args(params), with_stats)


@pytest.mark.parametrize("with_stats", [False, True])
def test_opcheck_torch_ops(with_stats: bool) -> None:
    args = _forward_args(with_stats)
    torch.library.opcheck(torch.ops.precision_ce.torch_forward.default, args)
    state = list(torch.ops.precision_ce.torch_forward(*args)[1:1 + ops.STATE_FIELDS])
    grad_rows = torch.rand(6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.precision_ce.torch_backward.default,
                          (grad_rows, args[0].detach(), args[1], args[2], state, *args[4:-1]))


def test_torch_op_checks_targets_itself() -> None:
    args = list(_forward_args(False))
    args[1] = args[1].clone()
    args[1][2] = 11
    with pytest.raises(ValueError, match=r"class index 11, outside \[0, 11\)"):
        torch.ops.precision_ce.torch_forward(*args)


# --- meta and fake tensors --------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_meta_tensors_give_shapes_and_dtypes(preset: str, reduction: str) -> None:
    logits = torch.empty(4, 30, 5, device="meta", dtype=torch.bfloat16)
    target = torch.empty(4, 5, device="meta", dtype=torch.long)
    loss, stats = cross_entropy(logits, target, torch.empty(30, device="meta", dtype=torch.bfloat16),
                                config=PRESETS[preset], reduction=reduction, return_stats=True, **ALL_OPTIONS)
    assert loss.device.type == "meta" and loss.dtype == torch.bfloat16
    assert loss.shape == ((4, 5) if reduction == "none" else ())
    assert all(s.shape == (4, 5) and s.dtype == torch.float32 for s in stats)


def test_fake_tensor_mode_traces_forward_and_backward() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.randn(8, 50, requires_grad=True)
        target = torch.randint(0, 50, (8,))
        loss = cross_entropy(logits, target, config=PRESETS["tail_penalty"], z_loss=1e-3)
        loss.backward()
        assert logits.grad.shape == (8, 50)


# --- torch.func and higher derivatives --------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_func_grad_and_vmap_match_autograd(backend: str, device: str) -> None:
    logits = random_logits(3 * 5, 17, seed=9).float().reshape(3, 5, 17).to(device)
    target = random_targets(5, 17, seed=9, ignore_every=4).to(device)
    reward = RewardConfig(beta=-0.25, k=4, lambda_tail=-0.1)

    def loss(x):
        return cross_entropy(x, target, config=reward, z_loss=1e-3, backend=backend)

    want = []
    for x in logits:
        x = x.clone().requires_grad_()
        loss(x).backward()
        want.append(x.grad)
    torch.testing.assert_close(torch.func.grad(loss)(logits[0]), want[0])
    torch.testing.assert_close(torch.vmap(loss)(logits), torch.stack([loss(x) for x in logits]))
    torch.testing.assert_close(torch.vmap(torch.func.grad(loss))(logits), torch.stack(want))


def test_vmap_over_targets() -> None:
    logits = random_logits(5, 17, seed=10)
    targets = torch.stack([random_targets(5, 17, seed=s) for s in range(3)])
    got = torch.vmap(lambda t: cross_entropy(logits, t, beta=0.5))(targets)
    torch.testing.assert_close(got, torch.stack([cross_entropy(logits, t, beta=0.5) for t in targets]))


def test_double_backward_raises_clear_error() -> None:
    logits = random_logits(4, 9, seed=11).requires_grad_()
    target = random_targets(4, 9, seed=11)
    (grad,) = torch.autograd.grad(cross_entropy(logits, target, beta=-0.25, backend="torch"), logits,
                                  create_graph=True)
    with pytest.raises(ops.DoubleBackwardError, match="second derivative"):
        grad.square().sum().backward()
    with pytest.raises(ops.DoubleBackwardError, match="second derivative"):
        torch.func.grad(lambda x: torch.func.grad(
            lambda y: cross_entropy(y, target, beta=-0.25, backend="torch"))(x).square().sum())(logits.detach())


# --- targets out of range and backends under compile ------------------------------------------


def test_bad_target_raises_in_eager_and_compiled_code() -> None:
    logits, target = make_inputs("2d")
    target[1] = logits.shape[1]
    with pytest.raises(ValueError, match="outside"):
        cross_entropy(logits, target, beta=-0.25)
    compiled = torch.compile(lambda x, t: cross_entropy(x, t, beta=-0.25), fullgraph=True)
    # In-graph check (torch._assert_async): a RuntimeError when the compiled code runs.
    with pytest.raises(RuntimeError, match="outside"):
        compiled(logits, target)


def test_triton_backend_under_compile_on_cpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the Triton backend compiles (see the CUDA tests)")
    logits, target = make_inputs("2d")
    compiled = torch.compile(lambda x, t: cross_entropy(x, t, backend="triton"), fullgraph=True)
    with pytest.raises(Exception, match="backend='triton' needs CUDA tensors"):
        compiled(logits, target)


# --- CUDA: Inductor with the Triton ops, CUDA graphs, determinism (scripts/gpu_check.sh) ------


@cuda_only
@pytest.mark.parametrize(("preset", "dtype"), [("cross_entropy", torch.bfloat16), ("precision", torch.float32),
                                               ("tail_penalty", torch.bfloat16)])
def test_cuda_compiled_triton_ops_match_eager(preset: str, dtype: torch.dtype) -> None:
    logits = random_logits(64, 1000, seed=12).to("cuda", dtype)
    target = random_targets(64, 1000, seed=12, ignore_every=5).cuda()
    weight = torch.rand(1000, device="cuda") + 0.5
    assert_compiled_matches_eager([(logits, target, {"weight": weight, "config": PRESETS[preset], **ALL_OPTIONS})])


@cuda_only
@pytest.mark.parametrize("with_stats", [False, True])
def test_cuda_opcheck_triton_ops(with_stats: bool) -> None:
    args = tuple(a.float().cuda() if isinstance(a, torch.Tensor) and a.is_floating_point() else
                 a.cuda() if isinstance(a, torch.Tensor) else a for a in _forward_args(with_stats))
    args = (args[0].detach().requires_grad_(), *args[1:])
    torch.library.opcheck(torch.ops.precision_ce.triton_forward.default, args)
    state = list(torch.ops.precision_ce.triton_forward(*args)[1:1 + ops.STATE_FIELDS])
    grad_rows = torch.rand(6, device="cuda")
    torch.library.opcheck(torch.ops.precision_ce.triton_backward.default,
                          (grad_rows, args[0].detach(), args[1], args[2], state, *args[4:-1]))


@cuda_only
def test_cuda_graph_captures_forward_and_backward() -> None:
    """No host syncs and no data-dependent allocation: the fwd+bwd step captures and replays."""
    logits = random_logits(32, 500, seed=13).to("cuda", torch.bfloat16).requires_grad_()
    target = random_targets(32, 500, seed=13, ignore_every=4).cuda()
    weight = torch.rand(500, device="cuda") + 0.5

    def step():
        logits.grad = None
        loss = cross_entropy(logits, target, weight, config=PRESETS["tail_penalty"], z_loss=1e-3)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step()
    captured_grad = logits.grad
    want_loss = step().detach().clone()
    want_grad = logits.grad.clone()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured_loss, want_loss)
    torch.testing.assert_close(captured_grad, want_grad)


@cuda_only
def test_cuda_reduce_overhead_compile_matches_eager() -> None:
    logits = random_logits(32, 500, seed=14).to("cuda", torch.bfloat16)
    target = random_targets(32, 500, seed=14).cuda()
    compiled = torch.compile(lambda x, t: cross_entropy(x, t, config=PRESETS["precision"]), mode="reduce-overhead",
                             fullgraph=True)
    want = cross_entropy(logits, target, config=PRESETS["precision"])
    for _ in range(3):  # warm-up, record, replay
        got = compiled(logits, target)
    torch.testing.assert_close(got, want)


@cuda_only
def test_cuda_deterministic_algorithms() -> None:
    logits = random_logits(64, 1000, seed=15).to("cuda", torch.bfloat16)
    target = random_targets(64, 1000, seed=15).cuda()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            x = logits.clone().requires_grad_()
            loss = cross_entropy(x, target, config=PRESETS["tail_penalty"], z_loss=1e-3)
            loss.backward()
            results.append((loss, x.grad))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
