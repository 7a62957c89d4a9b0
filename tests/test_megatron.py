"""precision_ce.integrations.megatron on 2 gloo ranks, tensor-parallel size 2 (Megatron-Core's
parallel_state): at the cross-entropy setting equal to Megatron's own
``tensor_parallel.vocab_parallel_cross_entropy`` (loss and gradient); every other preset equal to
precision_ce.cross_entropy of the whole logits; ``install`` on a GPTModel built on the CPU (its full
forward needs CUDA: Megatron's attention allocates a CUDA buffer, so the test calls its output layer
and ``compute_language_model_loss`` as the forward would).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import pytest
import torch

import precision_ce
from precision_ce import PRESETS

pytest.importorskip("megatron.core", reason="the [megatron] extra (CI installs it)")

SEQ, BATCH, VOCAB = 5, 3, 14  # Megatron shards the vocabulary evenly: 7 classes per rank


def _logits(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(SEQ, BATCH, VOCAB, dtype=torch.float64, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return logits, labels


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs() / b.double().abs().clamp(min=1.0)).max().item()


def run_megatron(rank: int, world: int) -> dict[str, Any]:
    warnings.filterwarnings("ignore")  # Megatron warns that Transformer Engine and Apex are absent
    from megatron.core import parallel_state, tensor_parallel

    from precision_ce.integrations import megatron

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    shard = slice(tp_rank * VOCAB // world, (tp_rank + 1) * VOCAB // world)
    upstream = torch.rand(BATCH, SEQ, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    out: dict[str, Any] = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        logits, labels = _logits(dtype)
        theirs_in = logits[..., shard].clone().requires_grad_()
        theirs = tensor_parallel.vocab_parallel_cross_entropy(theirs_in, labels.transpose(0, 1).contiguous())
        (theirs.transpose(0, 1) * upstream.to(theirs.dtype)).sum().backward()
        mine_in = logits[..., shard].clone().requires_grad_()
        mine = megatron.language_model_loss(labels, mine_in)
        (mine * upstream.to(mine.dtype)).sum().backward()
        out[f"megatron-{dtype}"] = {"loss": _relative(mine, theirs.transpose(0, 1)),
                                    "grad": _relative(mine_in.grad, theirs_in.grad),
                                    "dtype": str(mine.dtype), "shape": tuple(mine.shape)}
    for name, reward in PRESETS.items():
        reward = dataclasses.replace(reward, k=4)
        logits, labels = _logits()
        full = logits.clone().requires_grad_()
        ref = precision_ce.cross_entropy(full.permute(1, 2, 0), labels, config=reward, reduction="none",
                                         z_loss=1e-3)
        (ref * upstream).sum().backward()
        mine_in = logits[..., shard].clone().requires_grad_()
        mine = megatron.language_model_loss(labels, mine_in, config=reward, z_loss=1e-3)
        (mine * upstream).sum().backward()
        out[name] = {"loss": _relative(mine, ref), "grad": _relative(mine_in.grad, full.grad[..., shard])}
    out["gpt_model"] = _gpt_model(world)
    parallel_state.destroy_model_parallel()
    return out


def _gpt_model(world: int) -> dict[str, Any]:
    """install() on a GPTModel: its output layer's logits through the installed loss vs Megatron's own."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from precision_ce.integrations import megatron

    torch.manual_seed(0)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
                               tensor_model_parallel_size=world, params_dtype=torch.float32)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ)
    hidden = torch.randn(SEQ, BATCH, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    logits = model.output_layer(hidden)[0].detach()
    theirs = model.compute_language_model_loss(labels, logits.clone())  # Megatron's overwrites its logits
    megatron.install(model)
    before = logits.clone()
    mine = model.compute_language_model_loss(labels, logits)
    megatron.install(model, dataclasses.replace(PRESETS["tail_penalty"], k=4))
    shaped = model.compute_language_model_loss(labels, logits)
    return {"cross_entropy": _relative(mine, theirs), "shaped_differs": (shaped - theirs).abs().max().item(),
            "shape": tuple(mine.shape), "logits_unchanged": torch.equal(logits, before)}


@functools.cache
def _results() -> list[dict[str, Any]]:
    from distributed_worker import run_group

    return [r["test_megatron:run_megatron"] for r in run_group(2, [], (1, 1), ("test_megatron:run_megatron",))]


TOLERANCE = {"torch.float64": 1e-6, "torch.float32": 1e-6, "torch.bfloat16": 1e-6}
"""Megatron's loss computes in fp32 whatever the logits' dtype (fp64 ones too); ours in fp64 for fp64.
bf16 logits: both compute in fp32 from the same bf16 values; the gradients round to bf16 (1e-2)."""


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_equals_megatrons_vocab_parallel_cross_entropy(dtype: str) -> None:
    for rank, records in enumerate(_results()):
        record = records[f"megatron-{dtype}"]
        assert record["dtype"] == "torch.float32" or dtype == "torch.float64", (rank, record)
        assert record["shape"] == (BATCH, SEQ), (rank, record)
        assert record["loss"] <= TOLERANCE[dtype] and record["grad"] <= max(TOLERANCE[dtype], 1e-2 * (
            dtype == "torch.bfloat16")), (rank, record)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_equals_the_single_process_loss(preset: str) -> None:
    for rank, records in enumerate(_results()):
        assert records[preset]["loss"] <= 1e-12 and records[preset]["grad"] <= 1e-12, (rank, records[preset])


def test_install_on_a_gpt_model() -> None:
    for rank, records in enumerate(_results()):
        record = records["gpt_model"]
        assert record["shape"] == (BATCH, SEQ) and record["cross_entropy"] <= 1e-6, (rank, record)
        assert record["shaped_differs"] > 1e-3, (rank, record)  # the installed setting is the one used
        assert record["logits_unchanged"], (rank, record)
