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


def assert_compiled_matches_eager(cases: list[tuple[dict, dict]], loss_fn=cross_entropy) -> None:
    """Each case's loss (and stats) and gradients, eager vs torch.compile(fullgraph=True).

    A case is (leaves, constants): ``loss_fn(**leaves, **constants)``, with gradients for the
    tensors in ``leaves``. All cases go into one compiled function (one graph, one C++ build on the
    CPU): compile time, not the cases, dominates these tests.
    """

    # Every call compiles a new closure of the same code object: start from a clean Dynamo cache,
    # or a long grid hits Dynamo's recompile cap (8 per code object) in this helper.
    torch._dynamo.reset()

    def losses(all_leaves: list[dict]) -> list:
        return [loss_fn(**leaves, **constants) for leaves, (_, constants) in zip(all_leaves, cases, strict=True)]

    results = []
    for run in (losses, torch.compile(losses, fullgraph=True)):
        all_leaves = [{name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
                      for leaves, _ in cases]
        outputs = run(all_leaves)
        total = sum((out[0] if isinstance(out, tuple) else out).sum() for out in outputs)
        flat = [t for leaves in all_leaves for t in leaves.values()]
        results.append((outputs, torch.autograd.grad(total, flat)))
    (want, want_grads), (got, got_grads) = results
    for got_out, want_out in zip(got, want, strict=True):
        if isinstance(want_out, tuple):  # return_stats
            for got_part, want_part in zip(got_out[1], want_out[1], strict=True):
                # The top-k mass is NaN (not computed) where the loss has no head: NaN in both.
                torch.testing.assert_close(got_part, want_part, equal_nan=True)
            want_out, got_out = want_out[0], got_out[0]
        assert got_out.dtype == want_out.dtype and got_out.shape == want_out.shape
        torch.testing.assert_close(got_out, want_out)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        assert got_grad.dtype == want_grad.dtype
        torch.testing.assert_close(got_grad, want_grad)


def _case(preset: str, form: str, reduction: str, dtype: torch.dtype, options: dict):
    logits, target = make_inputs(form, dtype=dtype)
    vocab = logits.shape[-1 if form == "1d" else 1]
    options = dict(options)
    fields = {"positive_reward": options.pop("positive_reward")} if "positive_reward" in options else {}
    if options.pop("weight", False):
        options["weight"] = torch.rand(vocab, generator=torch.Generator().manual_seed(3), dtype=dtype) + 0.5
    return {"input": logits}, {"target": target, "config": precision_ce.preset(preset, k=5, **fields),
                               "reduction": reduction, **options}


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
    probability_case = ({"input": random_logits(5, 9, seed=4).float()},
                        {"target": probabilities, "z_loss": 1e-3, "softcap": 5.0, "label_smoothing": 0.1})
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


# --- the fused linear + loss under compile ----------------------------------------------------


def _linear_case(preset: str, reduction: str, dtype: torch.dtype, options: dict, bias: bool = True,
                 frozen: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """linear_cross_entropy on (2, 5, 8) hidden states, V = 24, chunks of 4 rows; ``frozen`` names
    the layer tensors passed without requiring grad."""
    generator = torch.Generator().manual_seed(6)
    tensors = {"input": torch.randn(2, 5, 8, generator=generator).to(dtype),
               "linear_weight": (torch.randn(24, 8, generator=generator) * 0.7).to(dtype)}
    if bias:
        tensors["linear_bias"] = (torch.randn(24, generator=generator) * 0.3).to(dtype)
    options = dict(options)
    if options.pop("class_weight", False):
        options["weight"] = torch.rand(24, generator=generator, dtype=dtype) + 0.5
    constants = {"target": random_targets(10, 24, seed=6, ignore_every=3).reshape(2, 5),
                 "config": precision_ce.preset(preset, k=5), "reduction": reduction,
                 "options": torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4), **options}
    leaves = {name: t for name, t in tensors.items() if name not in frozen}
    return leaves, {**{name: tensors[name] for name in frozen}, **constants}


# Every preset, reduction and option at least once, frozen layers, 16-bit and fp64, in one graph.
LINEAR_QUICK_CASES = [
    ("cross_entropy", "mean", torch.float32, {}),  # F.cross_entropy per chunk
    ("cross_entropy", "none", torch.float32, {"label_smoothing": 0.1}),
    ("precision", "sum", torch.bfloat16, {}),
    ("tail_penalty", "mean", torch.float32, {"class_weight": True, **ALL_OPTIONS}),  # z-loss rescaled
    ("head_reward", "none", torch.float64, {"return_stats": True, "positive_reward": "focal"}),
    ("diversity", "mean", torch.float32, {"return_stats": True}, False, ("linear_weight",)),
    ("tail_penalty", "none", torch.bfloat16, {"z_loss": 1e-3}, True, ("input",)),
]


def test_linear_compiled_fullgraph_matches_eager(monkeypatch) -> None:
    monkeypatch.setattr(reference, "FUSED_CHUNK_ELEMENTS", 50)  # several fused row chunks per token chunk
    cases = []
    for preset, reduction, dtype, options, *layer in LINEAR_QUICK_CASES:
        options = dict(options)
        fields = {"positive_reward": options.pop("positive_reward")} if "positive_reward" in options else {}
        leaves, constants = _linear_case(preset, reduction, dtype, options, *layer)
        constants["config"] = precision_ce.preset(preset, k=5, **fields)
        cases.append((leaves, constants))
    assert_compiled_matches_eager(cases, loss_fn=precision_ce.linear_cross_entropy)


LINEAR_GRID_OPTIONS = [{}, {"class_weight": True}, {"label_smoothing": 0.1}, {"z_loss": 1e-3}, {"softcap": 5.0},
                       {"class_weight": True, **ALL_OPTIONS}, {"return_stats": True}]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_linear_compiled_fullgraph_matches_eager_full_grid(preset: str) -> None:
    """Every preset x reduction x option, with and without bias (one graph per preset)."""
    cases = [_linear_case(preset, reduction, torch.float32, options, bias)
             for reduction, options, bias in itertools.product(["none", "mean", "sum"], LINEAR_GRID_OPTIONS,
                                                               [True, False])]
    assert_compiled_matches_eager(cases, loss_fn=precision_ce.linear_cross_entropy)


def test_linear_dynamo_sees_no_graph_break() -> None:
    leaves, constants = _linear_case("tail_penalty", "mean", torch.float32, {"class_weight": True, **ALL_OPTIONS})

    def loss(input, linear_weight, linear_bias):
        return precision_ce.linear_cross_entropy(input, linear_weight, linear_bias=linear_bias, **constants)

    explanation = torch._dynamo.explain(loss)(**leaves)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def _linear_op_args(with_stats: bool) -> tuple[torch.Tensor | None, ...]:
    leaves, constants = _linear_case("tail_penalty", "mean", torch.float64, {"class_weight": True})
    x, w, b = (t.detach().requires_grad_()
               for t in (leaves["input"].reshape(-1, 8), leaves["linear_weight"], leaves["linear_bias"]))
    params = precision_ce.LossParams(RewardConfig(beta=-0.25, k=3, lambda_head=0.1, lambda_tail=-0.1),
                                     label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    return (x, w, b, constants["target"].reshape(-1), constants["weight"],
            ("torch", "none", 4, torch.float64, torch.float64, *ops.params_args(params), with_stats))


@pytest.mark.parametrize("with_stats", [False, True])
def test_opcheck_linear_ops(with_stats: bool) -> None:
    x, w, b, target, class_weight, (backend, _, chunk_rows, dtype, *params) = _linear_op_args(with_stats)
    layer = (x, w, b, target, class_weight)
    reduced_args = (*layer, torch.tensor(5.5, dtype=dtype), torch.tensor(0.9, dtype=dtype), [True, True, True],
                    backend, "mean", chunk_rows, dtype, *params)
    torch.library.opcheck(torch.ops.precision_ce.linear_reduced.default, reduced_args)
    rows_args = (*layer, backend, "none", chunk_rows, dtype, *params)
    torch.library.opcheck(torch.ops.precision_ce.linear_rows.default, rows_args)
    state = list(torch.ops.precision_ce.linear_rows(*rows_args)[1:1 + ops.STATE_FIELDS])
    grad_rows = torch.rand(x.shape[0], dtype=dtype)
    for needs in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.precision_ce.linear_rows_backward.default,
                              (grad_rows, *(t.detach() for t in layer[:3]), target, class_weight, state, needs,
                               *rows_args[5:]))


def test_linear_ops_refuse_a_second_derivative() -> None:
    x, w, b, target, class_weight, (backend, _, chunk_rows, dtype, *params) = _linear_op_args(False)
    layer = (x, w, b, target, class_weight)
    loss = torch.ops.precision_ce.linear_reduced(*layer, torch.tensor(5.5, dtype=dtype), None, [True, True, True],
                                                 backend, "mean", chunk_rows, dtype, *params)[0]
    with pytest.raises(ops.DoubleBackwardError, match="second derivative"):
        torch.autograd.grad(loss, x, create_graph=True)
    rows = torch.ops.precision_ce.linear_rows(*layer, backend, "none", chunk_rows, dtype, *params)[0]
    (grad,) = torch.autograd.grad(rows.sum(), x, create_graph=True)
    with pytest.raises(ops.DoubleBackwardError, match="second derivative"):
        grad.square().sum().backward()


def test_linear_under_torch_func_is_a_clear_error() -> None:
    leaves, constants = _linear_case("precision", "mean", torch.float32, {})
    with pytest.raises(NotImplementedError, match=r"torch\.func transforms"):
        torch.func.grad(lambda x: precision_ce.linear_cross_entropy(x, leaves["linear_weight"], **constants))(
            leaves["input"])


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
    assert_compiled_matches_eager([({"input": logits}, {"target": target, "weight": weight, "config": PRESETS[preset],
                                                        **ALL_OPTIONS})])


@cuda_only
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_compiled_linear_matches_eager(reduction: str) -> None:
    cases = []
    for preset, dtype in (("cross_entropy", torch.bfloat16), ("tail_penalty", torch.float32)):
        leaves, constants = _linear_case(preset, reduction, dtype, {"class_weight": True, **ALL_OPTIONS})
        cases.append(({name: t.cuda() for name, t in leaves.items()},
                      {name: t.cuda() if isinstance(t, torch.Tensor) else t for name, t in constants.items()}))
    assert_compiled_matches_eager(cases, loss_fn=precision_ce.linear_cross_entropy)


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
