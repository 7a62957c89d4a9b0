"""The interpreter's traffic counter (precision_ce.bench.traffic): synthetic kernels, then the loss."""

import pytest
import torch
import triton
import triton.language as tl

from precision_ce import triton_backend
from precision_ce.bench.traffic import format_table, measure_mode, measure_passes

pytestmark = pytest.mark.skipif(not triton.knobs.runtime.interpret,
                                reason="counts the Triton interpreter's loads and stores")


@triton.jit
def _read_twice_write_half(x_ptr, y_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * V + cols, mask=cols < V, other=0.0)
        x += tl.load(x_ptr + row * V + cols, mask=cols < V, other=0.0)
        tl.store(y_ptr + row * V + cols, x, mask=cols < V // 2)


def test_counter_counts_masked_elements_of_each_buffer():
    rows, vocab = 3, 100  # BLOCK 32: a ragged last block whose masked lanes must not count
    x = torch.randn(rows, vocab, dtype=torch.bfloat16)
    y = torch.zeros(rows, vocab, dtype=torch.bfloat16)
    small = torch.zeros(rows, 1, dtype=torch.bfloat16)

    def forward():
        _read_twice_write_half[(rows,)](x, y, vocab, BLOCK=32)

    def backward(_):
        _read_twice_write_half[(rows,)](x, small, 1, BLOCK=32)  # rows-sized buffer: "other" bytes

    traffic = measure_passes(forward, backward, x)
    assert traffic.forward_read == 2.0
    assert traffic.forward_write == (vocab // 2) / vocab
    assert traffic.forward_other_read_bytes == traffic.forward_other_write_bytes == 0
    assert traffic.backward_read == pytest.approx(2 * rows / (rows * vocab))  # x: one element per row
    assert traffic.backward_write == 0.0
    assert traffic.backward_other_write_bytes == 0  # cols < 1 // 2 masks every store


def test_counter_lists_torch_ops_on_logits_sized_tensors():
    x = torch.randn(4, 64)
    traffic = measure_passes(lambda: x * 2, lambda y: y.sum(), x)
    assert traffic.forward_read == traffic.backward_read == 0.0  # no kernel ran
    assert traffic.torch_ops_on_logits == ("mul", "sum")


def test_counter_requires_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        measure_passes(lambda: None, lambda _: None, torch.zeros(2, 2))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("block", [None, 512])  # the CUDA launch BLOCK (one ragged block); several
def test_cross_entropy_reads_once_forward_and_reads_and_writes_once_backward(dtype, block):
    # docs/design.md: the forward reads the logits once, the backward reads them once and writes
    # the gradient once; no PyTorch op touches an (N, V) tensor outside the kernels.
    traffic = measure_mode("cross_entropy", rows=3, vocab=5003, dtype=dtype, block=block)
    assert traffic.forward_read == pytest.approx(1.0, abs=1e-3)  # + the target's logit per row
    assert traffic.forward_write == 0.0
    assert traffic.backward_read == 1.0
    assert traffic.backward_write == 1.0
    assert traffic.torch_ops_on_logits == ()
    assert 0 < traffic.forward_other_write_bytes <= 3 * 64  # per-row loss and state only


@pytest.mark.parametrize("dtype, mode, reads", [
    (torch.bfloat16, {}, 2.0), (torch.float32, {}, 2.0),  # cross-entropy: 1 + 1
    (torch.bfloat16, {"k": 5, "lambda_tail": -0.1}, 3.0), (torch.float32, {"k": 5, "lambda_tail": -0.1}, 3.0),
])
def test_fused_linear_chunks_are_read_by_both_kernels_and_written_once_in_the_forward(dtype, mode, reads):
    # docs/linear.md: with a scalar upstream gradient ("mean"), each chunk's logits are read by the
    # forward kernel (once; a rank mode's: twice, and the few candidates of its head), then read and
    # overwritten with their gradient by the backward kernel, all in the forward pass; the backward
    # pass only scales the small gradients.
    from precision_ce import linear_cross_entropy

    rows, hidden, vocab, chunk = 12, 8, 301, 4  # three chunks; (chunk, V) buffers count as logits
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=generator).to(dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=generator).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=generator)
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk)
    traffic = measure_passes(
        lambda: linear_cross_entropy(x, w, target, options=options, backend="triton", **mode),
        lambda loss: loss.backward(),
        torch.empty(rows, vocab, dtype=dtype), unit_numel=chunk * vocab,
    )
    candidates = 0.0 if not mode else triton_backend.candidate_room(mode["k"]) * 8 / vocab  # groups gathered, at most
    assert reads <= traffic.forward_read <= reads + candidates + 2 / vocab  # + the target's logit per row
    assert traffic.forward_write == 1.0
    assert traffic.backward_read == traffic.backward_write == 0.0


def test_format_table_has_one_line_per_case():
    row = dict(mode="cross_entropy", dtype="bf16", vocab=7, forward_read=1.0, forward_write=0.0,
               backward_read=1.0, backward_write=1.0, total=3.0)
    assert format_table([row, row]).count("\n| cross_entropy | bf16 | 7 | 1.00 | 0.00 | 1.00 | 1.00 | 3.00 |") == 2
