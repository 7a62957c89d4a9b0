"""DTensor in, DTensor out (precision_ce/dtensor.py) on 2 gloo processes: every preset and option with
logits sharded over the classes (inside and outside ``loss_parallel()``), over the batch or a
spatial dimension, replicated, and on a 2-D mesh; loss, gradient and stats equal the single-process
loss of the whole tensors; placements are torch's (except "mean" on a sharded batch: the exact
global mean as Partial("sum"), where torch gives Partial("avg") of shard means).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import precision_ce
from precision_ce import PRESETS

ROWS, VOCAB = 10, 13  # odd vocabulary: uneven class shards (7 + 6); ignored targets on rank 0 only
LAYOUTS = ("vocab", "vocab-loss_parallel", "batch", "replicate", "spatial", "mesh2d-vocab", "mesh2d-batch")
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "every-option": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "return_stats": True},
    "weight-z_loss": {"weight": True, "z_loss": 1e-2},
    "ignore_index-2": {"ignore_index": 2},
}


def _cases() -> list[dict[str, Any]]:
    cases = []
    for layout, preset, option, reduction in itertools.product(LAYOUTS, PRESETS, OPTIONS, ("mean", "sum", "none")):
        if option != "plain" and preset not in ("cross_entropy", "tail_penalty"):
            continue  # the options on two presets; every preset plain
        cases.append({"layout": layout, "preset": preset, "option": option, "reduction": reduction,
                      "name": f"{layout}-{preset}-{option}-{reduction}"})
    for layout, reduction in itertools.product(("batch", "replicate"), ("mean", "sum", "none")):
        cases.append({"layout": layout, "preset": "cross_entropy", "option": "probabilities", "reduction": reduction,
                      "name": f"{layout}-probabilities-{reduction}"})
    return cases


CASES = _cases()


def _inputs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    generator = torch.Generator().manual_seed(3)
    options = {**OPTIONS.get(case["option"], {})}
    ignore_index = options.get("ignore_index", -100)
    if case["layout"] == "spatial":
        x = torch.randn(3, VOCAB, 4, dtype=torch.float64, generator=generator) * 3
        target = torch.randint(0, VOCAB, (3, 4), generator=generator)
        target[0, :3] = ignore_index
    else:
        x = torch.randn(ROWS, VOCAB, dtype=torch.float64, generator=generator) * 3
        target = torch.randint(0, VOCAB, (ROWS,), generator=generator)
        target[:3] = ignore_index  # rank 0's half of the batch holds every ignored target
    if case["option"] == "probabilities":
        target = torch.softmax(torch.randn(x.shape, dtype=torch.float64, generator=generator), dim=1)
    weight = torch.rand(VOCAB, dtype=torch.float64, generator=generator) + 0.5 if options.pop("weight", False) else None
    return x, target, weight, {**options, "config": PRESETS[case["preset"]]}


def _placements(layout: str) -> tuple[tuple[int, ...], list[Any]]:
    from torch.distributed.tensor import Replicate, Shard

    return {"vocab": ((2,), [Shard(1)]), "vocab-loss_parallel": ((2,), [Shard(1)]), "batch": ((2,), [Shard(0)]),
            "replicate": ((2,), [Replicate()]), "spatial": ((2,), [Shard(2)]),
            "mesh2d-vocab": ((1, 2), [Shard(0), Shard(1)]), "mesh2d-batch": ((2, 1), [Shard(0), Shard(1)])}[layout]


def run_dtensor(rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Every case on this rank: errors against the single-process loss, and the result's placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    meshes = {shape: init_device_mesh("cpu", shape) for shape in ((2,), (1, 2), (2, 1))}
    out = {}
    for case in CASES:
        x, target, weight, options = _inputs(case)
        reduction, stats_wanted = case["reduction"], options.get("return_stats", False)
        full = x.clone().requires_grad_()
        ref = precision_ce.cross_entropy(full, target, weight, reduction=reduction, backend="torch", **options)
        ref_loss, ref_stats = ref if stats_wanted else (ref, None)
        upstream = torch.rand(ref_loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
        (ref_loss * upstream).sum().backward()

        shape, placements = _placements(case["layout"])
        mesh = meshes[shape]
        dx = distribute_tensor(x, mesh, placements).requires_grad_()
        # The target as a DTensor (sharded like the batch) in half the layouts, a plain tensor in the others.
        plain_target = case["layout"] in ("vocab-loss_parallel", "replicate", "mesh2d-vocab")
        target_placements = [_target_placement(p, case) for p in placements]
        dy = target if plain_target else distribute_tensor(target, mesh, target_placements)
        parallel = loss_parallel() if case["layout"] == "vocab-loss_parallel" else contextlib.nullcontext()
        with parallel:
            result = precision_ce.cross_entropy(dx, dy, weight, reduction=reduction, **options)
            loss, stats = result if stats_wanted else (result, None)
            if reduction == "none":
                (loss * distribute_tensor(upstream, mesh, loss.placements)).sum().backward()
            else:
                (loss * float(upstream)).backward()
        record = {
            "loss_error": _relative(loss.full_tensor().detach(), ref_loss.detach()),
            "grad_error": _relative(dx.grad.full_tensor(), full.grad),
            "grad_placements": str(dx.grad.placements) == str(dx.placements),
            "placements": [str(p) for p in loss.placements],
            "is_dtensor": type(loss).__name__ == "DTensor",
        }
        if stats_wanted:
            record["stats_error"] = max(_relative(s.full_tensor(), r) for s, r in zip(stats, ref_stats, strict=True))
        out[case["name"]] = record
    out["torch_placements"] = _torch_placements(meshes[(2,)])
    return out


def _target_placement(p: Any, case: dict[str, Any]) -> Any:
    """The logits' placement on a mesh dimension, as the target's: the class dimension replicated."""
    from torch.distributed.tensor import Replicate, Shard

    if not isinstance(p, Shard) or case["option"] == "probabilities":
        return p
    return Replicate() if p.dim == 1 else Shard(p.dim if p.dim == 0 else p.dim - 1)


def _torch_placements(mesh: Any) -> dict[str, list[str]]:
    """What torch's own F.cross_entropy returns on the same layouts (the cross-entropy setting)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    x, target = torch.randn(ROWS, VOCAB), torch.randint(0, VOCAB, (ROWS,))
    placements = {}
    for reduction in ("mean", "sum", "none"):
        batch = F.cross_entropy(distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(target, mesh, [Shard(0)]),
                                reduction=reduction)
        placements[f"batch-{reduction}"] = [str(p) for p in batch.placements]
        with loss_parallel():
            vocab = F.cross_entropy(distribute_tensor(x, mesh, [Shard(1)]),
                                    distribute_tensor(target, mesh, [Replicate()]), reduction=reduction)
        placements[f"vocab-{reduction}"] = [str(p) for p in vocab.placements]
    return placements


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs() / b.abs().clamp(min=1.0)).max().item() if a.numel() else 0.0


@functools.cache
def _results() -> list[dict[str, Any]]:
    from distributed_worker import run_group

    return [r["test_dtensor:run_dtensor"] for r in run_group(2, [], (7, 6), ("test_dtensor:run_dtensor",))]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_dtensor_equals_single_process_loss(case: dict[str, Any]) -> None:
    for rank, records in enumerate(_results()):
        record = records[case["name"]]
        assert record["is_dtensor"], (rank, record)
        assert record["loss_error"] <= 1e-9 and record["grad_error"] <= 1e-9, (rank, record)
        assert record["grad_placements"], (rank, record)
        assert record.get("stats_error", 0.0) <= 1e-9, (rank, record)


def test_placements_are_torchs_except_the_exact_mean() -> None:
    """Shard for "none", Partial(sum) for "sum", Replicate over a split vocabulary, as torch gives;
    "mean" on a split batch is Partial(sum) of local sum / global count, not torch's Partial(avg)."""
    for rank, records in enumerate(_results()):
        torch_gives = records["torch_placements"]
        for layout, torch_layout in (("batch", "batch"), ("vocab", "vocab"), ("vocab-loss_parallel", "vocab")):
            for reduction in ("sum", "none"):
                mine = records[f"{layout}-cross_entropy-plain-{reduction}"]["placements"]
                assert mine == torch_gives[f"{torch_layout}-{reduction}"], (rank, layout, reduction, mine)
        assert torch_gives["batch-mean"] == ["P(avg)"], torch_gives
        assert records["batch-cross_entropy-plain-mean"]["placements"] == ["P(sum)"], rank
        assert records["vocab-precision-plain-mean"]["placements"] == torch_gives["vocab-mean"] == ["R"]
        assert records["mesh2d-vocab-tail_penalty-plain-none"]["placements"] == ["S(0)", "R"]
