"""The kernels at the launch configuration a GPU will run, on LLM vocabularies.

``test_kernel`` runs 16-wide blocks so that short rows span many blocks; here the host's CUDA
choice (``triton_backend.cuda_launch_config``: 16 KiB of logits per block, 2048 logits in the rank backward)
runs on a few rows of V = 128256 (Llama 3) and 50257 (GPT-2), whose last block is ragged, in every
mode and both dtype families, with the inputs a training loop really passes: targets shifted by one
(``labels[:, 1:]``, an int64 pointer 8 bytes off a 16-byte boundary), strided targets and logits,
ignored rows. Under the interpreter on a CPU machine; compiled on a CUDA one.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_targets
from test_kernel import assert_matches_torch_backend

from precision_ce import triton_backend

MODES = {
    "cross_entropy": {},
    "precision": dict(beta=-0.25),
    "focal": dict(beta=0.5, positive_reward="focal"),
    "tail_penalty": dict(k=100, lambda_tail=-0.1),
    "head_reward": dict(k=100, lambda_head=0.1),
    "all": dict(beta=-0.25, k=50, lambda_head=0.2, lambda_tail=-0.1, label_smoothing=0.1, z_loss=1e-4,
                softcap=30.0),
}
FAST = {("cross_entropy", torch.bfloat16), ("tail_penalty", torch.bfloat16), ("all", torch.bfloat16),
        ("precision", torch.float32), ("head_reward", torch.float32), ("all", torch.float32)}
"""The cases of the default suite at V = 128256; the rest are marked slow."""


@pytest.fixture(autouse=True)
def production_launch(monkeypatch):
    """Launch with the CUDA configuration on any device (the interpreter ignores num_warps)."""
    monkeypatch.setattr(triton_backend, "_launch_config", lambda vocab, logits, rank: (
        triton_backend.cuda_launch_config(vocab, logits.element_size(), rank)))


def llm_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Logits shaped like a language model's: a few confident tokens over a wide Gaussian tail."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=generator) * 2.0
    x[:, torch.randint(0, vocab, (8,), generator=generator)] += 8.0
    return x.to(dtype)


def _cases():
    for vocab in (128256, 50257):
        for mode in MODES:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                fast = vocab == 128256 and (mode, dtype) in FAST
                marks = () if fast else (pytest.mark.slow,)
                yield pytest.param(vocab, mode, dtype, marks=marks, id=f"{vocab}-{mode}-{str(dtype)[6:]}")


@pytest.mark.parametrize(("vocab", "mode", "dtype"), _cases())
def test_production_blocks_match_torch_backend(vocab: int, mode: str, dtype: torch.dtype, device: str) -> None:
    for rank in (False, True):  # the forward (with its head) and the rank backward
        block = triton_backend.cuda_launch_config(vocab, dtype.itemsize, rank)["BLOCK"]
        assert block >= 2048 and vocab % block != 0  # many wide blocks, the last one ragged
    logits = llm_logits(3, vocab, dtype, seed=vocab % 97)
    target = random_targets(3, vocab, seed=1)
    target[1] = -100
    options = dict(MODES[mode])
    if mode == "all":
        options["weight"] = torch.rand(vocab, generator=torch.Generator().manual_seed(2)) + 0.5
    assert_matches_torch_backend(logits, target, device, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_shifted_and_strided_inputs(dtype: torch.dtype, device: str) -> None:
    """labels[:, 1:] (a misaligned int64 pointer), strided targets and strided logits rows."""
    vocab = 128256
    labels = random_targets(4, vocab, seed=3)  # (T + 1,) labels of one sequence
    shifted = labels[1:]
    assert shifted.storage_offset() * shifted.element_size() % 16 == 8
    padded = llm_logits(3, vocab + 64, dtype, seed=4)
    strided_rows = padded[:, 64:]  # row stride V + 64, each row 128 bytes off its start
    options = dict(k=100, lambda_tail=-0.1, beta=-0.25)
    assert_matches_torch_backend(strided_rows, shifted, device, **options)
    every_other = random_targets(6, vocab, seed=5)[::2]  # a stride-2 view of int64 targets
    assert_matches_torch_backend(strided_rows, every_other, device, **options)
    weight = (torch.rand(2 * vocab, generator=torch.Generator().manual_seed(6)) + 0.5)[::2]
    assert_matches_torch_backend(strided_rows, every_other, device, weight=weight, label_smoothing=0.1)


def test_lane_width_follows_the_rows_alignment() -> None:
    """16-byte lanes where Triton vectorises the loads (pointer, row stride and V divisible by 16),
    one lane (LANE = BLOCK) elsewhere (kernels/cross_entropy.py, _online_pass)."""
    lane = triton_backend.lane_width
    bf16, fp32 = torch.empty(2, 128256, dtype=torch.bfloat16), torch.empty(2, 128256)
    assert lane(bf16, 8192) == 8
    assert lane(fp32, 4096) == 4
    assert lane(torch.empty(2, 50257, dtype=torch.bfloat16), 8192) == 8192  # V % 16 != 0
    assert lane(torch.empty(2, 128257)[:, 1:], 4096) == 4096  # rows 4 bytes off 16
    assert lane(torch.empty(2, 16, dtype=torch.bfloat16), 4) == 4  # never past BLOCK


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's loads and stores")
@pytest.mark.parametrize("vocab", [128256, 50257])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["tail_penalty", "all"])
def test_the_head_takes_two_passes_at_the_production_blocks(vocab: int, dtype: torch.dtype, mode: str) -> None:
    """At the production BLOCK (1024 group slots per block) the floor is tight enough that an LLM's
    row keeps its candidates (about k groups): passes A and R and a gather, never the whole-row
    select (kernels/head.py), whatever the row's alignment."""
    from precision_ce import cross_entropy
    from precision_ce.bench.traffic import measure_passes

    logits = llm_logits(2, vocab, dtype, seed=7).requires_grad_()
    target = random_targets(2, vocab, seed=7)
    options = dict(MODES[mode])
    traffic = measure_passes(lambda: cross_entropy(logits, target, **options, backend="triton"),
                             lambda loss: loss.backward(), logits)
    room = triton_backend.candidate_room(options["k"])
    assert 2.0 + options["k"] / vocab <= traffic.forward_read <= 2.0 + (room * 8 + 2) / vocab
    assert traffic.backward_read == traffic.backward_write == 1.0


def test_a_head_over_unaligned_16_bit_rows_takes_narrow_blocks() -> None:
    """triton_backend._online_pass_config: the forward with a head keeps the cross-entropy blocks
    except over unaligned 16-bit rows (scalar loads), where 2048-wide blocks hold fewer registers."""
    config = triton_backend._online_pass_config
    bf16_unaligned, bf16 = torch.empty(2, 50257, dtype=torch.bfloat16), torch.empty(2, 128256, dtype=torch.bfloat16)
    assert config(50257, bf16_unaligned, has_head=True) == {"BLOCK": 2048, "num_warps": 8, "LANE": 2048}
    assert config(50257, bf16_unaligned)["BLOCK"] == 8192
    assert config(128256, bf16, has_head=True) == {"BLOCK": 8192, "num_warps": 16, "LANE": 8}
    assert config(50257, torch.empty(2, 50257), has_head=True)["BLOCK"] == 4096


@pytest.mark.parametrize("k", [1000, 5000])  # CAP 2048 groups; past the largest buffer (4096): whole-row select
def test_large_heads_at_the_production_blocks(k: int, device: str) -> None:
    logits = llm_logits(3, 128256, torch.bfloat16, seed=11)
    target = random_targets(3, 128256, seed=11)
    assert_matches_torch_backend(logits, target, device, k=k, lambda_head=0.2, lambda_tail=-0.1)
