"""precision_ce.integrations.torchtitan against torchtitan 0.3.0's own losses.

In one process: plain logits at the cross-entropy setting equal torchtitan's ``CrossEntropyLoss``
(loss, gradient, fp32 result for bf16 logits); other presets equal ``precision_ce.cross_entropy``
summed over tokens / global_valid_tokens; the metrics; ``ChunkedLossWrapper`` with our loss inside;
the fused variant vs ``ChunkedLossWrapper``; the ``@override`` factories through torchtitan's own
``apply_overrides`` and CLI parsing. On 2 gloo ranks: the other two forms of ``pred``, a
``Shard(-1)`` DTensor (with plain or DTensor labels) and the spmd_types local shard with the mesh's
``"tp"`` group, plus batch-sharded DTensors, and the fused loss with an output layer under FSDP2.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

import precision_ce
from precision_ce import PRESETS

pytest.importorskip("torchtitan", reason="the [torchtitan] extra (CI installs it)")

from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss

from precision_ce.integrations import torchtitan as tt

B, L, V, D = 2, 6, 12, 8
SETTINGS = {"precision": {"preset": "precision"}, "tail_penalty": {"preset": "tail_penalty", "k": 3},
            "every-option": {"beta": -0.25, "lambda_tail": -0.1, "k": 3, "z_loss": 1e-3, "label_smoothing": 0.1}}


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, L, V, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, V, (B, L), generator=generator)
    labels[0, 1] = labels[1, 4] = -100
    return logits, labels, torch.tensor(23.0)  # global valid tokens: this rank's 10 and others'


def _reference(logits: torch.Tensor, labels: torch.Tensor, gvt: torch.Tensor, settings: dict[str, Any]
               ) -> torch.Tensor:
    """Our loss, straight: sum over tokens / global valid tokens."""
    settings = dict(settings)
    knobs = {k: settings.pop(k) for k in ("beta", "k", "lambda_head", "lambda_tail") if k in settings}
    config = precision_ce.preset(settings.pop("preset", "cross_entropy"), **knobs)
    return precision_ce.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), reduction="sum",
                                      config=config, **settings) / gvt


def _loss_and_grad(loss_fn: Any, logits: torch.Tensor, labels: torch.Tensor, gvt: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = logits.clone().requires_grad_()
    loss, metrics = loss_fn(x, labels, gvt)
    loss.backward()
    return loss, x.grad, metrics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_setting_equals_torchtitans(dtype: torch.dtype) -> None:
    logits, labels, gvt = _inputs(dtype)
    theirs, their_grad, _ = _loss_and_grad(CrossEntropyLoss(CrossEntropyLoss.Config()), logits, labels, gvt)
    mine, my_grad, metrics = _loss_and_grad(tt.PrecisionLoss(tt.PrecisionLoss.Config()), logits, labels, gvt)
    assert mine.dtype == torch.float32 and mine.shape == () and metrics == {}
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(my_grad, their_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_other_settings_equal_precision_ce(name: str) -> None:
    logits, labels, gvt = _inputs()
    x = logits.double().requires_grad_()
    expected = _reference(x, labels, gvt, SETTINGS[name])
    expected.backward()
    mine, my_grad, _ = _loss_and_grad(tt.PrecisionLoss(tt.PrecisionLoss.Config(**SETTINGS[name])), logits, labels,
                                      gvt)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(my_grad.double(), x.grad, rtol=1e-5, atol=1e-7)
    if name != "precision":
        assert abs(mine.item() - _reference(logits, labels, gvt, {}).item()) > 1e-3  # the setting is used


def test_metrics_are_entropy_and_target_in_top_k_per_valid_token() -> None:
    logits, labels, gvt = _inputs()
    _, metrics = tt.PrecisionLoss(tt.PrecisionLoss.Config(preset="tail_penalty", k=3, metrics=True))(logits, labels,
                                                                                                         gvt)
    valid = labels != -100
    p = logits.double().softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    rank = (logits > logits.gather(-1, labels.clamp(min=0)[..., None])).sum(-1) + 1
    assert set(metrics) == {"entropy/mean", "target_in_top_k/frac"}
    torch.testing.assert_close(metrics["entropy/mean"].double(), entropy[valid].sum() / gvt, rtol=1e-5, atol=0)
    in_top_k = (rank[valid] <= 3).sum().item()
    assert 0 < in_top_k < valid.sum().item()  # the case distinguishes
    assert metrics["target_in_top_k/frac"].item() == pytest.approx(in_top_k / gvt.item(), rel=1e-6)


def _hidden_and_head(seed: int = 3) -> tuple[torch.Tensor, nn.Linear]:
    torch.manual_seed(seed)
    return torch.randn(B, L, D), nn.Linear(D, V, bias=False)


def _chunked_step(loss_fn: Any, hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, gvt: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One step the way torchtitan's trainer runs ChunkedLossWrapper: hidden states in, lm_head set."""
    head.weight.grad = None
    h = hidden.clone().requires_grad_()
    loss_fn.set_lm_head(head)
    loss, metrics = loss_fn(h, labels, gvt)
    loss.backward()
    return loss, h.grad, head.weight.grad.clone(), metrics


@pytest.mark.parametrize("name", ["cross_entropy", "tail_penalty"])
def test_inside_chunked_loss_wrapper_and_fused(name: str) -> None:
    """ChunkedLossWrapper(loss_fn=ours) and PrecisionFusedLoss equal our loss of the full logits;
    at the cross-entropy setting also torchtitan's ChunkedLossWrapper(CrossEntropyLoss)."""
    settings = {} if name == "cross_entropy" else SETTINGS[name]
    hidden, head = _hidden_and_head()
    _, labels, gvt = _inputs()
    h = hidden.clone().requires_grad_()
    head.weight.grad = None
    reference = _reference(head(h), labels, gvt, settings)
    reference.backward()
    ref_h, ref_w = h.grad, head.weight.grad.clone()
    chunked = ChunkedLossWrapper(ChunkedLossWrapper.Config(num_chunks=2, loss_fn=tt.PrecisionLoss.Config(
        metrics=True, **settings)))
    fused = tt.PrecisionFusedLoss(tt.PrecisionFusedLoss.Config(metrics=True, **settings))
    runs = {"chunked": _chunked_step(chunked, hidden, head, labels, gvt),
            "fused": _chunked_step(fused, hidden, head, labels, gvt)}
    if name == "cross_entropy":
        runs["torchtitan"] = _chunked_step(ChunkedLossWrapper(ChunkedLossWrapper.Config(num_chunks=3)), hidden, head,
                                           labels, gvt)
    for run, (loss, grad_h, grad_w, _) in runs.items():
        torch.testing.assert_close(loss.double(), reference.double(), rtol=1e-6, atol=0, msg=run)
        torch.testing.assert_close(grad_h, ref_h, rtol=1e-5, atol=1e-7, msg=run)
        torch.testing.assert_close(grad_w, ref_w, rtol=1e-5, atol=1e-7, msg=run)
    torch.testing.assert_close(runs["chunked"][3], runs["fused"][3], rtol=1e-5, atol=0)  # chunk metrics add up


@pytest.mark.slow
def test_compiled_as_torchtitan_compiles_losses() -> None:
    """compile.components=["loss"]: BaseLoss._maybe_compile wraps our loss in torch.compile (about 20 s)."""
    from torchtitan.config import CompileConfig

    logits, labels, gvt = _inputs()
    compile_config = CompileConfig(enable=True, components=["loss"], backend="aot_eager")
    config = tt.PrecisionLoss.Config(preset="tail_penalty", k=3, metrics=True)
    compiled = tt.PrecisionLoss(config, compile_config=compile_config)
    assert hasattr(compiled.fn, "_torchdynamo_orig_callable")  # torchtitan did wrap it
    loss, grad, metrics = _loss_and_grad(compiled, logits, labels, gvt)
    expected, expected_grad, expected_metrics = _loss_and_grad(tt.PrecisionLoss(config), logits, labels, gvt)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(metrics, expected_metrics, rtol=1e-6, atol=0)


def test_fused_without_an_output_layer_says_what_to_do() -> None:
    hidden, _ = _hidden_and_head()
    _, labels, gvt = _inputs()
    with pytest.raises(RuntimeError, match="set_lm_head"):
        tt.PrecisionFusedLoss(tt.PrecisionFusedLoss.Config())(hidden, labels, gvt)


def test_override_switches_with_one_argument() -> None:
    """torchtitan's own CLI parsing and apply_overrides: the loss inside a ChunkedLossWrapper, and
    (the fused factory) the wrapper itself, become ours with the settings given."""
    from torchtitan.components.loss import BaseLoss
    from torchtitan.config import Configurable, apply_overrides
    from torchtitan.config.override import OverrideConfig, parse_cli_imports

    class Holder(Configurable):
        @dataclass(kw_only=True, slots=True)
        class Config(Configurable.Config):
            loss: BaseLoss.Config = field(default_factory=lambda: ChunkedLossWrapper.Config(num_chunks=2))

        def __init__(self, config: Config) -> None:
            self.config = config

    root = Holder.Config()
    argument = 'precision_ce.integrations.torchtitan.precision_loss={"preset": "tail_penalty", "k": 7}'
    imports = parse_cli_imports([argument])
    assert len(apply_overrides(OverrideConfig(imports=imports), root)) == 1
    assert isinstance(root.loss, ChunkedLossWrapper.Config) and isinstance(root.loss.loss_fn, tt.PrecisionLoss.Config)
    built = root.loss.build()
    assert built.loss_fn.reward == dataclasses.replace(PRESETS["tail_penalty"], k=7)

    root = Holder.Config()
    imports = parse_cli_imports(["precision_ce.integrations.torchtitan.precision_fused_loss"])
    assert len(apply_overrides(OverrideConfig(imports=imports), root)) == 1
    fused = root.loss.build()
    assert isinstance(fused, tt.PrecisionFusedLoss) and isinstance(fused, ChunkedLossWrapper)  # the trainer wires it
    assert fused.loss_fn.reward == PRESETS["cross_entropy"]


# ---- 2 gloo ranks --------------------------------------------------------------------------------------------


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs() / b.double().abs().clamp(min=1.0)).max().item()


def _sharded_cases(rank: int, world: int) -> dict[str, Any]:
    """Each form of pred on this rank vs the expected (torchtitan's, or ours on the full logits)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torchtitan.distributed.spmd_types import set_current_spmd_mesh
    from torchtitan.distributed.utils import set_spmd_backend

    logits, labels, gvt = _inputs()
    shard = slice(rank * V // world, (rank + 1) * V // world)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    tp = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    dp = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    out: dict[str, Any] = {}
    _, single_metrics = tt.PrecisionLoss(tt.PrecisionLoss.Config(**SETTINGS["tail_penalty"], metrics=True))(
        logits, labels, gvt)  # one process (before any spmd mesh is current)

    def run(loss_fn: Any, make_pred: Any, local: torch.Tensor, label_input: Any) -> tuple[Any, Any, Any]:
        local = local.clone().requires_grad_()
        loss, metrics = loss_fn(make_pred(local), label_input, gvt)
        (loss.full_tensor() if isinstance(loss, DTensor) else loss).backward()
        def full(t: Any) -> Any:
            return t.full_tensor() if isinstance(t, DTensor) else t

        return full(loss).detach(), local.grad, {k: full(v) for k, v in metrics.items()}

    forms = {  # name: (backend, pred from the local tensor, local tensor, labels, the slice of the full gradient)
        "dtensor": ("partial_dtensor", lambda t: DTensor.from_local(t, tp, [Shard(2)]), logits[..., shard], labels,
                    (..., shard)),
        "dtensor_labels": ("partial_dtensor", lambda t: DTensor.from_local(t, tp, [Shard(2)]), logits[..., shard],
                           DTensor.from_local(labels, tp, [Replicate()]), (..., shard)),
        "batch_sharded": ("partial_dtensor", lambda t: DTensor.from_local(t, dp, [Shard(0)]), logits[rows],
                          DTensor.from_local(labels[rows], dp, [Shard(0)]), (rows,)),
        "spmd_local_shard": ("spmd_types", lambda t: t, logits[..., shard], labels, (..., shard)),
    }
    for form, (backend, make_pred, local, label_input, grad_slice) in forms.items():
        set_spmd_backend(backend)
        with set_current_spmd_mesh(tp) if backend == "spmd_types" else _nothing():
            loss, grad, _ = run(CrossEntropyLoss(CrossEntropyLoss.Config(global_vocab_size=V)), make_pred, local,
                                label_input)
            mine, my_grad, _ = run(tt.PrecisionLoss(tt.PrecisionLoss.Config()), make_pred, local, label_input)
            out[f"{form}/torchtitan"] = {"loss": _relative(mine, loss), "grad": _relative(my_grad, grad),
                                         "dtype": str(mine.dtype)}
            for name, settings in SETTINGS.items():
                x = logits.double().requires_grad_()
                expected = _reference(x, labels, gvt, settings)
                expected.backward()
                with_metrics = dict(settings, metrics=name == "tail_penalty")
                mine, my_grad, metrics = run(tt.PrecisionLoss(tt.PrecisionLoss.Config(**with_metrics)), make_pred,
                                             local, label_input)
                record = {"loss": _relative(mine, expected), "grad": _relative(my_grad, x.grad[grad_slice])}
                if metrics:
                    record["metrics"] = max(_relative(metrics[k], single_metrics[k]) for k in single_metrics)
                out[f"{form}/{name}"] = record
    set_spmd_backend("spmd_types")
    out["fsdp_fused"] = _fsdp_fused(rank, world)
    return out


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


def _fsdp_fused(rank: int, world: int) -> dict[str, float]:
    """PrecisionFusedLoss with an output layer under fully_shard: this rank's half of the batch, the
    gradients summed over ranks equal one process's on the whole batch."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    hidden, head = _hidden_and_head()
    _, labels, gvt = _inputs()
    settings = SETTINGS["tail_penalty"]
    single = tt.PrecisionFusedLoss(tt.PrecisionFusedLoss.Config(**settings))
    loss, _, grad_w, _ = _chunked_step(single, hidden, head, labels, gvt)
    sharded_head = nn.Linear(D, V, bias=False)
    sharded_head.load_state_dict(head.state_dict())
    fully_shard(sharded_head).set_force_sum_reduction_for_comms(True)  # gloo: no PREMUL_SUM
    sharded_head.set_gradient_divide_factor(1.0)  # as torchtitan: the loss is already over the global tokens
    rows = slice(rank * B // world, (rank + 1) * B // world)
    fused = tt.PrecisionFusedLoss(tt.PrecisionFusedLoss.Config(**settings))
    fused.set_lm_head(sharded_head)
    mine, _ = fused(hidden[rows].clone().requires_grad_(), labels[rows], gvt)
    mine.backward()
    total = mine.detach().clone()
    dist.all_reduce(total)
    grad = sharded_head.weight.grad.full_tensor()
    return {"loss": _relative(total, loss), "grad": _relative(grad, grad_w)}


def run_torchtitan(rank: int, world: int) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    return _sharded_cases(rank, world)


@functools.cache
def _results() -> list[dict[str, Any]]:
    from distributed_worker import run_group

    return [r["test_torchtitan:run_torchtitan"] for r in run_group(2, [], (1, 1), ("test_torchtitan:run_torchtitan",))]


FORMS = ("dtensor", "dtensor_labels", "batch_sharded", "spmd_local_shard")


@pytest.mark.parametrize("form", FORMS)
def test_sharded_forms_equal_torchtitans_cross_entropy(form: str) -> None:
    for rank, records in enumerate(_results()):
        record = records[f"{form}/torchtitan"]
        assert record["dtype"] == "torch.float32" and record["loss"] <= 1e-6 and record["grad"] <= 1e-6, (rank, record)


@pytest.mark.parametrize("form", FORMS)
def test_sharded_forms_equal_the_single_process_loss(form: str) -> None:
    for rank, records in enumerate(_results()):
        for name in SETTINGS:
            record = records[f"{form}/{name}"]
            assert record["loss"] <= 1e-6 and record["grad"] <= 1e-6, (rank, name, record)
        assert records[f"{form}/tail_penalty"]["metrics"] <= 1e-6, (rank, records[f"{form}/tail_penalty"])


def test_fused_with_an_fsdp2_output_layer() -> None:
    for rank, records in enumerate(_results()):
        assert records["fsdp_fused"]["loss"] <= 1e-6 and records["fsdp_fused"]["grad"] <= 1e-6, (rank, records)
