"""FSDP2 (``fully_shard``) on 2 gloo processes: linear_cross_entropy and precision_ce.hf.apply(fused=True)
train exactly as one process on the global batch (loss and every parameter's gradient), with the
torchtitan pattern (each block, then the root); an output layer sharded on its own works through
``precision_ce.distributed.output_layer_loss`` and, used outside its forward, raises an error naming it.
gloo has no PREMUL_SUM/AVG reduce-scatter: ``set_force_sum_reduction_for_comms(True)`` on every module.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from torch import nn

import precision_ce
from precision_ce import PRESETS

VOCAB, DIM, BATCH, SEQ = 40, 16, 4, 6
LOSSES = {"cross_entropy": {}, "tail_penalty": {"lambda_tail": -0.1, "k": 5},
          "every-option": {"beta": -0.25, "lambda_tail": -0.1, "k": 5, "z_loss": 1e-3, "label_smoothing": 0.1}}


class TinyLM(nn.Module):
    """Embedding, residual blocks, norm, output layer; the loss is fused with the output layer."""

    def __init__(self, separate_output: bool = False, loss_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()) for _ in range(2))
        self.norm = nn.LayerNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.separate_output = separate_output
        self.loss_kwargs = loss_kwargs or {}

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        h = self.norm(h)
        if self.separate_output:  # the output layer is an FSDP unit of its own: the loss runs as its forward
            return precision_ce.distributed.output_layer_loss(self.output, h, labels, **self.loss_kwargs)
        return precision_ce.linear_cross_entropy(h, self.output.weight, labels, **self.loss_kwargs)


def _shard(model: nn.Module, blocks: list[nn.Module], separate: list[nn.Module] = ()) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in [*blocks, *separate]:
        fully_shard(module).set_force_sum_reduction_for_comms(True)
    fully_shard(model).set_force_sum_reduction_for_comms(True)


def _compare(model: nn.Module, sharded: nn.Module, step: Any, rank: int, world: int) -> dict[str, float]:
    """One step of the single-process model on the global batch vs the sharded one on this rank's half."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    reference = step(model, tokens, labels)
    reference.backward()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = step(sharded, tokens[rows], labels[rows])
    loss.backward()
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)  # FSDP averages gradients: the global loss is the ranks' mean
    grads = dict(sharded.named_parameters())
    grad_error = max((grads[name].grad.full_tensor() - p.grad).abs().max().item()
                     for name, p in model.named_parameters())
    return {"loss_error": abs(mean_loss.item() / world - reference.item()), "grad_error": grad_error}


def run_fsdp(rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    call = lambda m, tokens, labels: m(tokens, labels)  # noqa: E731
    for name, kwargs in LOSSES.items():
        for separate in (False, True):
            torch.manual_seed(0)
            model = TinyLM(separate, kwargs).double()
            sharded = copy.deepcopy(model)
            _shard(sharded, list(sharded.blocks), [sharded.output] if separate else [])
            out[f"{name}-{'separate_output' if separate else 'root_output'}"] = _compare(model, sharded, call, rank,
                                                                                       world)
    # The output layer sharded on its own but its weight used outside its forward: a clear error.
    model = TinyLM()
    _shard(model, list(model.blocks), [model.output])
    try:
        model(torch.zeros(1, SEQ, dtype=torch.long), torch.zeros(1, SEQ, dtype=torch.long))
        out["outside_forward"] = "nothing"
    except TypeError as error:
        out["outside_forward"] = str(error)
    out["hf"] = _run_hf(rank, world)
    return out


def _run_hf(rank: int, world: int) -> dict[str, Any]:
    """precision_ce.hf.apply(fused=True) on a tiny Llama, fully_shard per decoder layer and root."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    out = {}
    for name in ("cross_entropy", "tail_penalty"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
        sharded = copy.deepcopy(model)
        reward = PRESETS[name]
        precision_ce.hf.apply(model, reward, fused=True)
        precision_ce.hf.apply(sharded, reward, fused=True)
        _shard(sharded, list(sharded.model.layers))
        step = lambda m, tokens, labels: m(input_ids=tokens, labels=labels).loss  # noqa: E731
        out[name] = _compare(model, sharded, step, rank, world)
    return out


@functools.cache
def _results() -> list[dict[str, Any]]:
    from distributed_worker import run_group

    return [r["test_fsdp:run_fsdp"] for r in run_group(2, [], (1, 1), ("test_fsdp:run_fsdp",))]


@pytest.mark.parametrize("name", [f"{n}-{where}" for n in LOSSES for where in ("root_output", "separate_output")])
def test_linear_cross_entropy_under_fully_shard_equals_one_process(name: str) -> None:
    for rank, records in enumerate(_results()):
        assert records[name]["loss_error"] <= 1e-12 and records[name]["grad_error"] <= 1e-12, (rank, records[name])


def test_output_layer_weight_used_outside_its_forward_names_the_fix() -> None:
    for records in _results():
        assert "output_layer_loss" in records["outside_forward"], records["outside_forward"]


@pytest.mark.parametrize("name", ["cross_entropy", "tail_penalty"])
def test_hf_fused_under_fully_shard_equals_one_process(name: str) -> None:
    for rank, records in enumerate(_results()):
        assert records["hf"][name]["loss_error"] <= 1e-12 and records["hf"][name]["grad_error"] <= 1e-12, (rank,
                                                                                                         records["hf"])
