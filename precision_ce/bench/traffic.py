"""HBM traffic of the Triton kernels, counted under the Triton interpreter, in passes over the logits.

Every masked load and store the interpreter executes is counted, element by element under its
mask, and attributed to the kernel argument whose storage the address falls in. Bytes moved in
"logits-sized" buffers (at least N x V elements: the logits, the gradient) are reported in passes,
i.e. divided by N x V x the logits' element size; a fused loss needs 1.0 read in the forward and
1.0 read + 1.0 write in the backward. Everything else (targets, class weights, per-row state) is
reported in bytes.

    from precision_ce.bench.traffic import measure_passes   # with TRITON_INTERPRET=1
    x = logits.requires_grad_()
    traffic = measure_passes(lambda: cross_entropy(x, t, backend="triton"),
                             lambda loss: loss.backward(), x)
    traffic.forward_read, traffic.backward_write             # 1.0, 1.0

    python -m precision_ce.bench.traffic --vocab 128256 --dtype bf16   # the table of every mode

The caller must set ``TRITON_INTERPRET=1`` in the environment before triton is imported (importing
``precision_ce`` imports it): ``measure_passes`` raises otherwise, since compiled kernels run unseen.
The command line above re-runs itself with the variable set.
Only Triton kernels are counted: PyTorch ops the host code runs between them are not (they are
listed by ``torch_ops_on_logits`` of the result, see ``measure_passes``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Traffic of one forward and one backward, split by phase and by buffer.

    ``forward_read`` ... ``backward_write``: bytes read / written by the kernels in logits-sized
    buffers (>= N x V elements), in passes over the logits (N x V x element size of the logits).
    ``*_other_*_bytes``: bytes the kernels moved in every other buffer (targets, weights, row state).
    ``torch_ops_on_logits``: aten ops (outside the kernels) that read or wrote a logits-sized
    tensor, e.g. a ``.contiguous()`` copy or a gradient accumulation; their traffic is not counted.
    Ops inside a custom op (``precision_ce::...``) are not seen: the mode sees the custom op only.
    """

    forward_read: float
    forward_write: float
    backward_read: float
    backward_write: float
    forward_other_read_bytes: int = 0
    forward_other_write_bytes: int = 0
    backward_other_read_bytes: int = 0
    backward_other_write_bytes: int = 0
    torch_ops_on_logits: tuple[str, ...] = ()

    @property
    def forward(self) -> float:
        return self.forward_read + self.forward_write

    @property
    def backward(self) -> float:
        return self.backward_read + self.backward_write

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def as_dict(self) -> dict[str, Any]:
        """The fields and the three sums, JSON-ready."""
        return dict(dataclasses.asdict(self), torch_ops_on_logits=list(self.torch_ops_on_logits),
                    forward=self.forward, backward=self.backward, total=self.total)


class _Tally:
    """Bytes by (direction, large buffer or not) for the kernel launches of one phase."""

    def __init__(self, unit_numel: int) -> None:
        self.unit_numel = unit_numel
        self.large_ranges: list[tuple[int, int]] = []  # [start, end) addresses of the current launch
        self.bytes = {("read", True): 0, ("read", False): 0, ("write", True): 0, ("write", False): 0}

    def launch(self, host_args: list[Any], host_kwargs: dict[str, Any]) -> None:
        ranges = []
        for arg in [*host_args, *host_kwargs.values()]:
            if isinstance(arg, torch.Tensor) and arg.numel() >= self.unit_numel:
                storage = arg.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        self.large_ranges = ranges

    def add(self, direction: str, pointers: Any, mask: Any, element_bytes: int) -> None:
        addresses = np.asarray(pointers).reshape(-1)
        active = np.broadcast_to(np.asarray(mask), np.asarray(pointers).shape).reshape(-1)
        addresses = addresses[active]
        in_large = np.zeros(addresses.shape, dtype=bool)
        for start, end in self.large_ranges:
            in_large |= (addresses >= start) & (addresses < end)
        large = int(np.count_nonzero(in_large))
        self.bytes[(direction, True)] += large * element_bytes
        self.bytes[(direction, False)] += (addresses.size - large) * element_bytes


_NO_DATA_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "detach", "alias", "view",
                           "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "select",
                           "slice", "unsqueeze", "squeeze", "reshape"})
"""Ops that allocate or alias without moving data."""


class _LogitsOpsLog(TorchDispatchMode):
    """Names of the aten ops that touch a tensor of at least ``unit_numel`` elements."""

    def __init__(self, unit_numel: int) -> None:
        super().__init__()
        self.unit_numel = unit_numel
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, result))
                   if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        # Custom ops (precision_ce's own) are opaque here: their kernels are what the tally counts.
        if func.namespace == "aten" and name not in _NO_DATA_OPS and any(t.numel() >= self.unit_numel for t in tensors):
            self.ops.append(name)
        return result


@contextlib.contextmanager
def _counting(tally: _Tally) -> Iterator[None]:
    """Route the interpreter's loads, stores and launches into ``tally`` while the block runs."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    executor = interpreter.GridExecutor
    original_load = builder.create_masked_load
    original_store = builder.create_masked_store
    original_init = executor._init_args_hst

    def element_bytes(pointers) -> int:
        return pointers.get_element_ty().primitive_bitwidth // 8

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        tally.add("read", ptrs.data, mask.data, element_bytes(ptrs))
        return original_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        tally.add("write", ptrs.data, mask.data, element_bytes(ptrs))
        return original_store(self, ptrs, value, mask, cache_policy)

    def init_args(self, args_dev, kwargs):
        host_args, host_kwargs = original_init(self, args_dev, kwargs)
        tally.launch(host_args, host_kwargs)
        return host_args, host_kwargs

    builder.create_masked_load, builder.create_masked_store = load, store
    executor._init_args_hst = init_args
    try:
        yield
    finally:
        builder.create_masked_load, builder.create_masked_store = original_load, original_store
        executor._init_args_hst = original_init


def _require_interpreter() -> None:
    import triton

    if not triton.knobs.runtime.interpret:
        raise RuntimeError(
            "measure_passes counts the Triton interpreter's loads and stores, but triton was imported "
            "without TRITON_INTERPRET=1; set TRITON_INTERPRET=1 in the environment before the process "
            "imports triton or precision_ce"
        )


def measure_passes(
    fn_forward: Callable[[], Any],
    fn_backward: Callable[[Any], Any],
    logits: torch.Tensor,
    *,
    unit_numel: int | None = None,
) -> Traffic:
    """Count the kernels' traffic of ``fn_forward()`` and then of ``fn_backward(its result)``.

    Args:
        fn_forward: runs the forward, e.g. ``lambda: cross_entropy(x, t, backend="triton")``;
            its return value is passed to ``fn_backward``.
        fn_backward: runs the backward, e.g. ``lambda loss: loss.backward()``.
        logits: the (N, V) logits (any float dtype): fixes the unit, N x V x element size bytes.
        unit_numel: elements of a logits-sized buffer (default N x V); a buffer with at least this
            many elements counts as logits traffic. N must be >= 2 so that (V,) class weights do not.

    Returns:
        ``Traffic``: passes over the logits per phase and direction, other bytes, and the PyTorch
        ops that touched logits-sized tensors outside the kernels.
    """
    _require_interpreter()
    if logits.dim() != 2 or logits.shape[0] < 2:
        raise ValueError(f"logits must be (N, V) with N >= 2, got shape {tuple(logits.shape)}")
    numel = logits.numel() if unit_numel is None else unit_numel
    unit_bytes = logits.numel() * logits.element_size()
    phases = []
    ops_log = _LogitsOpsLog(numel)
    result: Any = None
    for phase in ("forward", "backward"):
        tally = _Tally(numel)
        with _counting(tally), ops_log:
            result = fn_forward() if phase == "forward" else fn_backward(result)
        phases.append(tally.bytes)
    forward, backward = phases
    return Traffic(
        forward_read=forward[("read", True)] / unit_bytes,
        forward_write=forward[("write", True)] / unit_bytes,
        backward_read=backward[("read", True)] / unit_bytes,
        backward_write=backward[("write", True)] / unit_bytes,
        forward_other_read_bytes=forward[("read", False)],
        forward_other_write_bytes=forward[("write", False)],
        backward_other_read_bytes=backward[("read", False)],
        backward_other_write_bytes=backward[("write", False)],
        torch_ops_on_logits=tuple(ops_log.ops),
    )


MODES: dict[str, dict[str, Any]] = {
    "cross_entropy": {},
    "beta": {"beta": 0.5},
    "tail_penalty": {"k": 100, "lambda_tail": -0.1},
    "head_reward": {"k": 100, "lambda_head": 0.1},
    "cross_entropy+stats": {"return_stats": True},
    "all_ignored": {"k": 100, "lambda_tail": -0.1},  # tail_penalty with every target ignore_index
}
"""Keyword arguments of ``precision_ce.cross_entropy`` per mode of the traffic table (with the
optional modes of ``_optional_modes``)."""


def _optional_modes() -> dict[str, dict[str, Any]]:
    """Modes of options that only some versions of ``precision_ce.cross_entropy`` have."""
    from precision_ce import cross_entropy

    parameters = inspect.signature(cross_entropy).parameters
    modes: dict[str, dict[str, Any]] = {}
    if "full" in str(parameters["return_stats"].annotation):  # return_stats: bool | Literal["full"]
        modes["cross_entropy+full_stats"] = {"return_stats": "full"}
    if "inplace_backward" in parameters:
        modes["cross_entropy+inplace"] = {"inplace_backward": True}
    return modes


MODES.update(_optional_modes())

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mode_forward(mode: str, *, rows: int = 4, vocab: int = 128256, dtype: str = "bf16",
                 seed: int = 0) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """Random (rows, vocab) logits of ``dtype`` (a key of ``DTYPES``) with ``requires_grad``, and a
    function that runs ``precision_ce.cross_entropy(backend="triton", reduction="sum")`` in ``mode``
    on them and returns the loss (a scalar; its ``backward()`` is the backward)."""
    from precision_ce import cross_entropy

    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator).to(DTYPES[dtype]).requires_grad_()
    target = torch.randint(0, vocab, (rows,), generator=generator)
    if mode == "all_ignored":
        target.fill_(-100)
    kwargs = MODES[mode]

    def forward() -> torch.Tensor:
        out = cross_entropy(logits, target, backend="triton", reduction="sum", **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return logits, forward


@contextlib.contextmanager
def launch_config(block: int | None = None) -> Iterator[None]:
    """Kernels launched with ``block`` as BLOCK, or (None) with the CUDA launch configuration each
    kernel gets on a GPU (``triton_backend.cuda_launch_config``), whatever the tensors' device."""
    from precision_ce import triton_backend

    saved_block, saved_config = triton_backend.FORCED_BLOCK, triton_backend._launch_config
    if block is None:
        def cuda_config(vocab, logits, *args, **kwargs):
            return triton_backend.cuda_launch_config(vocab, logits.element_size(), *args, **kwargs)

        triton_backend._launch_config = cuda_config
    else:
        triton_backend.FORCED_BLOCK = block
    try:
        yield
    finally:
        triton_backend.FORCED_BLOCK, triton_backend._launch_config = saved_block, saved_config


def measure_mode(mode: str, *, rows: int = 4, vocab: int = 128256, dtype: str = "bf16",
                 block: int | None = None, seed: int = 0) -> Traffic:
    """Traffic of one forward and backward of ``mode_forward(mode, ...)``.

    ``block``: the kernels' BLOCK (default: each kernel's CUDA launch configuration, as on a GPU).
    """
    logits, forward = mode_forward(mode, rows=rows, vocab=vocab, dtype=dtype, seed=seed)
    with launch_config(block):
        return measure_passes(forward, lambda loss: loss.backward(), logits)


def traffic_table(modes: list[str], vocabs: list[int], dtypes: list[str], rows: int = 4) -> list[dict[str, Any]]:
    """One JSON-ready row per (mode, dtype, V): ``Traffic.as_dict()`` plus the case."""
    return [dict(mode=mode, dtype=dtype, vocab=vocab, rows=rows,
                 **measure_mode(mode, rows=rows, vocab=vocab, dtype=dtype).as_dict())
            for vocab in vocabs for dtype in dtypes for mode in modes]


def format_table(table: list[dict[str, Any]]) -> str:
    """A Markdown table of passes over the logits."""
    lines = ["| mode | dtype | V | fwd read | fwd write | bwd read | bwd write | total |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        passes = " | ".join(f"{row[key]:.2f}" for key in
                            ("forward_read", "forward_write", "backward_read", "backward_write", "total"))
        lines.append(f"| {row['mode']} | {row['dtype']} | {row['vocab']} | {passes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HBM passes over the logits of each mode, counted "
                                                 "under the Triton interpreter at the CUDA launch BLOCK")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--vocab", nargs="+", type=int, default=[128256])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    import triton

    if not triton.knobs.runtime.interpret:  # re-run with the interpreter on
        import subprocess

        command = [sys.executable, "-m", "precision_ce.bench.traffic", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(command, env=dict(os.environ, TRITON_INTERPRET="1")).returncode
    table = traffic_table(args.modes, args.vocab, args.dtype, args.rows)
    print(json.dumps(table, indent=1) if args.json else format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
