"""Worker side of tests/test_distributed.py: one gloo process group per world size runs every case.

Spawning processes is slow on CI's 2 cores, so the test module starts one group per world size
and each rank runs the whole case list, writing what it measured to ``rank{r}.pt``; the tests
assert on those records. ``python tests/distributed_worker.py [world]`` prints the figures of
docs/distributed.md (bytes per row, memory, errors).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import tempfile
from collections import defaultdict
from typing import Any

import torch

if not torch.cuda.is_available():
    # The spawned ranks run the Triton cases under the interpreter: set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import random_logits, random_targets

import precision_ce
from precision_ce import reference
from precision_ce.bench.memory import peak_extra_bytes
from precision_ce.distributed import vocab_parallel_cross_entropy

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "scatter", "gather",
    "send", "recv", "isend", "irecv", "broadcast_object_list", "all_reduce_coalesced", "batch_isend_irecv",
    "all_gather_single", "reduce_scatter_single",  # FSDP2's
)


class CommunicationCounter:
    """Wraps every torch.distributed collective: bytes this rank hands in (payload) and gets back."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> CommunicationCounter:
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            lists = [a for a in args if isinstance(a, list)]
            self.calls[name] += 1
            if name == "all_gather":
                self.sent[name] += tensors[0].nbytes
                self.received[name] += sum(t.nbytes for t in lists[0])
            elif tensors:
                self.sent[name] += tensors[0].nbytes
                self.received[name] += tensors[0].nbytes
            else:
                self.sent[name] += 1 << 40  # an unexpected collective must fail the bounds
            return fn(*args, **kwargs)

        return counted


def _targets(rows: int, sizes: tuple[int, ...], seed: int, ignore_every: int, ignore_index: int) -> torch.Tensor:
    """Random targets; the first rows hit the first and last class of every rank's shard."""
    vocab = sum(sizes)
    target = random_targets(rows, vocab, seed=seed)
    edges = [c for r in range(len(sizes)) for c in (sum(sizes[:r]), sum(sizes[: r + 1]) - 1)]
    count = min(rows, len(edges))
    target[:count] = torch.tensor(edges[:count])
    if ignore_every:
        target[ignore_every - 1 :: ignore_every] = ignore_index
    return target


def _inputs(case: dict[str, Any], sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    shape = tuple(case.get("shape", (12,)))
    rows, vocab = math.prod(shape), sum(sizes)
    integer = case.get("integer", False)
    x = random_logits(rows, vocab, seed=case.get("seed", 0), integer=integer, scale=1.0 if integer else 3.0)
    if case.get("constant_rows"):
        x[: case["constant_rows"]] = 1.0  # every class tied
    if case.get("pad"):
        x[:, -case["pad"] :] = -torch.inf  # a padded vocabulary, as tensor parallelism often has
    ignore_index = case.get("options", {}).get("ignore_index", -100)
    target = _targets(rows, sizes, case.get("seed", 0), case.get("ignore_every", 5), ignore_index)
    weight = None
    if case.get("weight"):
        weight = torch.rand(vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 0.5
    dtype = case.get("dtype", torch.float64)
    return x.reshape(*shape, vocab).to(dtype), target.reshape(shape), None if weight is None else weight.to(dtype)


def _shard(t: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[..., start : start + sizes[rank]]


def run_exact(case: dict[str, Any], sizes: tuple[int, ...], rank: int, group: Any = None) -> dict[str, Any]:
    """Sharded loss, gradient and stats against precision_ce.cross_entropy of the gathered logits.

    case["backend"] = "triton": the sharded loss runs the kernels (the interpreter on CPU) with
    blocks of case["block"] (default 4) logits, so shard rows span several blocks and end ragged.
    """
    if case.get("backend") != "triton":
        return _run_exact(case, sizes, rank, group)
    from precision_ce import triton_backend

    saved, triton_backend.FORCED_BLOCK = triton_backend.FORCED_BLOCK, case.get("block", 4)
    try:
        return _run_exact(case, sizes, rank, group)
    finally:
        triton_backend.FORCED_BLOCK = saved


def _run_exact(case: dict[str, Any], sizes: tuple[int, ...], rank: int, group: Any = None) -> dict[str, Any]:
    x, target, weight = _inputs(case, sizes)
    options = dict(case.get("options", {}))
    reduction = options.pop("reduction", "mean")
    stats_wanted = case.get("stats", False)
    autocast = case.get("autocast", False)

    full = x.clone().requires_grad_()
    moved = full.movedim(-1, 1) if full.dim() > 1 else full
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ref = precision_ce.cross_entropy(moved, target, weight, reduction=reduction, backend="torch",
                                         return_stats=stats_wanted, **options)
    ref_loss, ref_stats = ref if stats_wanted else (ref, None)
    upstream = torch.rand(ref_loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    (ref_loss * upstream.to(ref_loss.dtype)).sum().backward()

    # The Triton cases run compiled kernels on CUDA tensors where a GPU is present (gloo moves them).
    device = "cuda" if case.get("backend") == "triton" and torch.cuda.is_available() else "cpu"
    shard = _shard(x, sizes, rank).clone().to(device).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        shard_weight = None if weight is None else _shard(weight, sizes, rank).to(device)
        out = vocab_parallel_cross_entropy(shard, target.to(device), weight=shard_weight, reduction=reduction,
                                           return_stats=stats_wanted, group=group,
                                           backend=case.get("backend", "auto"), **options)
    loss, stats = out if stats_wanted else (out, None)
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    loss, stats = loss.detach().cpu(), None if stats is None else reference.RowStats(*(s.cpu() for s in stats))

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        if a.numel() == 0:
            return 0.0
        a, b = a.double(), b.double()
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return math.inf
        finite = torch.isfinite(b)
        return ((a - b)[finite].abs() / b[finite].abs().clamp(min=1.0)).max().item() if finite.any() else 0.0

    record = {
        "loss_error": relative(loss.detach(), ref_loss.detach()),
        "grad_error": relative(shard.grad.cpu(), _shard(full.grad, sizes, rank)),
        "dtype_matches": loss.dtype == ref_loss.dtype and shard.grad.dtype == shard.dtype,
        "shape_matches": loss.shape == ref_loss.shape,
        "loss_bits": loss.detach().double().flatten(),
    }
    if stats_wanted:
        for name, mine, theirs in zip(reference.RowStats._fields, stats, ref_stats, strict=True):
            record[f"{name}_error"] = relative(mine, theirs)
        record["target_rank_equal"] = torch.equal(stats.target_rank, ref_stats.target_rank)
    return record


def run_subgroup(rank: int) -> dict[str, Any]:
    """A vocabulary sharded over ranks 1 and 2 of a 3-rank world (group=); rank 0 is not in it."""
    group = dist.new_group([1, 2])  # every rank must take part in creating it
    sizes = (6, 11)
    case = {"name": "subgroup", "stats": True, "options": {"lambda_tail": -0.1, "k": 8, "beta": -0.25}}
    if rank == 0:
        try:
            vocab_parallel_cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), group=group)
            return {"raised": "nothing"}
        except ValueError as error:
            return {"raised": str(error)}
    record = run_exact(case, sizes, dist.get_rank(group), group=group)
    record.pop("loss_bits")
    return record


def run_errors(sizes: tuple[int, ...], rank: int) -> dict[str, str]:
    """Bad input raises the same clear error on every rank (nobody is left in a collective)."""
    x = torch.randn(6, sizes[rank], dtype=torch.float64)
    target = torch.zeros(6, dtype=torch.long)
    attempts = {
        "rows_differ": lambda: vocab_parallel_cross_entropy(x[: 4 + rank], target[: 4 + rank]),
        "weight_on_some_ranks": lambda: vocab_parallel_cross_entropy(
            x, target, weight=torch.ones(sizes[rank], dtype=torch.float64) if rank == 0 else None),
        "target_out_of_range": lambda: vocab_parallel_cross_entropy(x, torch.full((6,), sum(sizes))),
        "triton_fp64": lambda: vocab_parallel_cross_entropy(x, target, backend="triton"),
        "probabilities": lambda: vocab_parallel_cross_entropy(x, torch.rand(6, sizes[rank], dtype=torch.float64)),
        "wrong_target_shape": lambda: vocab_parallel_cross_entropy(x, target[:, None]),
    }
    raised = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            raised[name] = "nothing"
        except Exception as error:  # the test checks the type and message
            raised[name] = f"{type(error).__name__}: {error}"
    return raised


COMM_MODES: dict[str, dict[str, Any]] = {
    "cross_entropy": {},
    "precision (beta)": {"beta": -0.25},
    "tail_penalty, k=8": {"lambda_tail": -0.1, "k": 8},
    "head_reward, k=8": {"lambda_head": 0.1, "k": 8},
    "tail_penalty, k=32": {"lambda_tail": -0.1, "k": 32},
    "every option, k=8": {"lambda_head": 0.1, "lambda_tail": -0.1, "k": 8, "beta": -0.25, "label_smoothing": 0.1,
                          "z_loss": 1e-4, "softcap": 30.0, "weight": True},
    "cross_entropy + stats, k=8": {"k": 8, "return_stats": True},
}


TRITON_COMM_MODES = ("precision (beta)", "every option, k=8")
"""The modes whose bytes the Triton path is measured at too (the interpreter is slow)."""


def run_communication(rank: int, world: int, dtype: torch.dtype = torch.float32, backend: str = "auto",
                      modes: tuple[str, ...] = tuple(COMM_MODES)) -> dict[str, dict]:
    """Bytes each rank hands to collectives in one fwd+bwd, per mode, for two row counts and two
    shard widths: {mode: {(rows, V_r): (sent, received, calls)}} by collective."""
    out: dict[str, dict] = {}
    for mode in modes:
        options = COMM_MODES[mode]
        options = dict(options)
        with_weight = options.pop("weight", False)
        out[mode] = {}
        for rows, shard_vocab in ((64, 64), (64, 512), (128, 512)):
            x = torch.randn(rows, shard_vocab, dtype=dtype, generator=torch.Generator().manual_seed(rank))
            x.requires_grad_()
            target = torch.randint(0, shard_vocab * world, (rows,), generator=torch.Generator().manual_seed(9))
            weight = torch.ones(shard_vocab, dtype=dtype) if with_weight else None
            with CommunicationCounter() as counter:
                loss = vocab_parallel_cross_entropy(x, target, weight=weight, backend=backend, **options)
                (loss[0] if isinstance(loss, tuple) else loss).backward()
            out[mode][(rows, shard_vocab)] = (dict(counter.sent), dict(counter.received), dict(counter.calls))
    return out


def run_memory(rank: int, rows: int = 256, shard_vocab: int = 2048, chunk_elements: int = 1 << 15) -> dict[str, float]:
    """Peak extra bytes of one fwd+bwd on this rank / bytes of its shard of the logits (fp32).

    The default: chunks of 16 rows, so the shard is 16 chunks deep (as a large shard is at the
    torch backend's own chunk size of 2**21 logits)."""
    ratios = {}
    saved_chunk = reference.CHUNK_ELEMENTS
    reference.CHUNK_ELEMENTS = chunk_elements
    try:
        for mode, options in (("cross_entropy", {"z_loss": 1e-4}), ("tail_penalty", {"lambda_tail": -0.1, "k": 100}),
                              ("every option", {"lambda_head": 0.1, "lambda_tail": -0.1, "k": 100, "beta": -0.25,
                                                "label_smoothing": 0.1, "softcap": 30.0, "return_stats": True})):
            x = torch.randn(rows, shard_vocab - 64 * rank, generator=torch.Generator().manual_seed(rank))
            x.requires_grad_()
            target = torch.randint(0, shard_vocab, (rows,), generator=torch.Generator().manual_seed(3))

            def step(x: torch.Tensor = x, target: torch.Tensor = target, options: dict = options) -> torch.Tensor:
                loss = vocab_parallel_cross_entropy(x, target, **options)
                loss = loss[0] if isinstance(loss, tuple) else loss
                loss.backward()
                return loss

            step()  # warm up (first-call allocations of gloo and the profiler)
            x.grad = None
            peak = peak_extra_bytes("cpu", step)
            ratios[mode] = peak / (x.numel() * x.element_size())
            x.grad = None
    finally:
        reference.CHUNK_ELEMENTS = saved_chunk
    return ratios


def worker(rank: int, world: int, store: str, cases: list[dict[str, Any]], sizes: tuple[int, ...],
           out_dir: str, extras: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {"exact": {}}
        for case in cases:
            results["exact"][case["name"]] = run_exact(case, sizes, rank)
        for name, record in results["exact"].items():
            # Is the loss bit-identical on every rank? (Gathered outside any counted region.)
            bits = record.pop("loss_bits")
            parts = [torch.empty_like(bits) for _ in range(world)]
            dist.all_gather(parts, bits)
            record["same_on_every_rank"] = all(torch.equal(p, parts[0]) for p in parts if not p.isnan().any()) and \
                all(torch.equal(p.isnan(), parts[0].isnan()) for p in parts)
            results["exact"][name] = record
        if "errors" in extras:
            results["errors"] = run_errors(sizes, rank)
        if "subgroup" in extras:
            results["subgroup"] = run_subgroup(rank)
        if "communication" in extras:
            results["communication"] = run_communication(rank, world)
        if "communication_triton" in extras:
            results["communication_triton"] = run_communication(rank, world, backend="triton",
                                                                modes=TRITON_COMM_MODES)
        if "memory" in extras:
            results["memory"] = run_memory(rank)
        if "memory_large" in extras:  # 64 MiB shards at the torch backend's own chunk size
            results["memory_large"] = run_memory(rank, 4096, 4096, reference.CHUNK_ELEMENTS)
        for extra in extras:
            if ":" in extra:  # "module:function", a worker of another test module: function(rank, world)
                module, function = extra.split(":")
                results[extra] = getattr(importlib.import_module(module), function)(rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Every rank done before any tears its group down: a rank that destroyed the group while
        # another still had gloo work in flight aborted it once under a loaded machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_group(world: int, cases: list[dict[str, Any]], sizes: tuple[int, ...],
              extras: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Spawn ``world`` gloo ranks, run everything, return each rank's records."""
    with tempfile.TemporaryDirectory() as out_dir:
        store = os.path.join(out_dir, "store")
        mp.start_processes(worker, args=(world, store, cases, sizes, out_dir, extras), nprocs=world,
                           start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def summary(world: int = 2) -> str:
    """Markdown: bytes per row each rank hands to collectives (fp32 logits) per mode, per-rank peak
    memory, and the largest errors against the single-process loss over the test cases."""
    from test_distributed import CASES, SIZES

    records = run_group(world, CASES, SIZES[world], ("communication", "memory", "memory_large"))
    lines = [f"{world} ranks, fp32 logits, per row (the difference between 128 and 64 rows, 512 classes per rank):", "",
             "| mode | collectives per call | payload per row | received per row |", "| --- | --- | --- | --- |"]
    for mode, by_size in records[0]["communication"].items():
        sent_small, received_small = (sum(d.values()) for d in by_size[(64, 512)][:2])
        sent_large, received_large = (sum(d.values()) for d in by_size[(128, 512)][:2])
        calls = ", ".join(f"{n} x {name}" for name, n in sorted(by_size[(128, 512)][2].items()))
        lines.append(f"| {mode} | {calls} | {(sent_large - sent_small) / 64:g} B | "
                     f"{(received_large - received_small) / 64:g} B |")
    for key, label in (("memory", "256 x ~2048 fp32, 16-row chunks"), ("memory_large", "4096 x ~4096 fp32")):
        lines += ["", f"peak extra memory of fwd+bwd / shard of the logits ({label}), by rank: " + "; ".join(
            f"{mode} " + ", ".join(f"{r[key][mode]:.2f}" for r in records) for mode in records[0][key])]
    worst: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for case in CASES:
        dtype = case.get("backend", "torch") + " path, " + str(case.get("dtype", torch.float64)).replace("torch.", "")
        for r in records:
            for key, value in r["exact"][case["name"]].items():
                if key.endswith("_error"):
                    worst[dtype][key] = max(worst[dtype][key], value)
    for dtype, errors in worst.items():
        lines.append(f"largest relative error, {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(int(sys.argv[1]) if len(sys.argv) > 1 else 2))
