"""What the loss costs under each engine of docs/distributed.md: communication per row, memory per rank.

Run (CPU, gloo):  torchrun --nproc_per_node 2 scripts/distributed_costs.py
For each engine, one forward + backward of the loss alone (the model around it excluded), fp32,
V = 4096 classes, at 2048 and 4096 rows per rank (64 MiB of full logits: several of the torch
backend's row chunks of 2**21 logits): every torch.distributed collective is wrapped
(``tests/distributed_worker.CommunicationCounter``: the bytes each rank hands in, and gets back),
and the peak extra memory of the call is read from torch.profiler's allocator events. Per row =
(bytes at 4096 rows - bytes at 2048 rows) / 2048. Rank 0 prints a markdown table; the memory column
gives both ranks.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from distributed_worker import CommunicationCounter

import precision_ce
from precision_ce.bench.memory import peak_extra_bytes

VOCAB, DIM, ROWS = 4096, 256, (2048, 4096)
PRESETS = {"cross_entropy": precision_ce.PRESETS["cross_entropy"],
           "tail_penalty, k=100": precision_ce.PRESETS["tail_penalty"]}


def _cases(rank: int, world: int) -> dict[str, Callable[[int, Any], Callable[[], Any]]]:
    """engine -> (rows, reward) -> a function running one fwd+bwd of the loss on this rank."""
    warnings.filterwarnings("ignore")
    tp = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    shard = slice(rank * VOCAB // world, (rank + 1) * VOCAB // world)

    def logits(rows: int, columns: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(rows)  # the same full logits on every rank
        full = torch.randn(rows, VOCAB, generator=generator)
        target = torch.randint(0, VOCAB, (rows,), generator=generator)
        local = full[:, columns] if columns is not None else full
        return local.clone().requires_grad_(), target

    def ddp(rows: int, reward: Any) -> Callable[[], Any]:  # DDP (and FSDP with a plain output layer): local
        x, y = logits(rows)
        return lambda: precision_ce.cross_entropy(x, y, config=reward).backward()

    def dtensor_tp(rows: int, reward: Any) -> Callable[[], Any]:  # class-sharded DTensor logits
        x, y = logits(rows, shard)
        return lambda: precision_ce.cross_entropy(DTensor.from_local(x, tp, [Shard(1)]), y, config=reward).backward()

    def dtensor_batch(rows: int, reward: Any) -> Callable[[], Any]:  # batch-sharded DTensor, exact global mean
        x, y = logits(rows)
        xs, ys = DTensor.from_local(x, tp, [Shard(0)]), DTensor.from_local(y, tp, [Shard(0)])
        return lambda: precision_ce.cross_entropy(xs, ys, config=reward).to_local().backward()

    def fsdp2(rows: int, reward: Any, fused: bool = True) -> Callable[[], Any]:  # output layer under fully_shard
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        layer = nn.Linear(DIM, VOCAB, bias=False)
        fully_shard(layer).set_force_sum_reduction_for_comms(True)
        hidden = torch.randn(rows, DIM, generator=torch.Generator().manual_seed(rows)).requires_grad_()
        y = torch.randint(0, VOCAB, (rows,), generator=torch.Generator().manual_seed(rows + 1))
        if not fused:
            return lambda: precision_ce.cross_entropy(layer(hidden), y, config=reward).backward()
        return lambda: precision_ce.distributed.output_layer_loss(layer, hidden, y, config=reward).backward()

    def torchtitan(rows: int, reward: Any) -> Callable[[], Any]:  # PrecisionLoss, Shard(-1) DTensor (B, L, V)
        from torchtitan.distributed.utils import set_spmd_backend

        from precision_ce.integrations.torchtitan import PrecisionLoss

        set_spmd_backend("partial_dtensor")
        x, y = logits(rows, shard)
        loss_fn = PrecisionLoss(PrecisionLoss.Config(**{f: getattr(reward, f) for f in ("beta", "k", "lambda_head",
                                                                                           "lambda_tail")}))
        pred = DTensor.from_local(x.view(1, rows, -1), tp, [Shard(2)])
        return lambda: loss_fn(pred, y.view(1, rows), torch.tensor(float(rows)))[0].backward()

    def megatron(rows: int, reward: Any) -> Callable[[], Any]:  # language_model_loss, logits [s, b, V/tp]
        from precision_ce.integrations import megatron as integration

        x, y = logits(rows, shard)
        return lambda: integration.language_model_loss(y.view(1, rows), x.view(rows, 1, -1), tp_group=tp.get_group(),
                                                       config=reward).mean().backward()

    def megatron_own(rows: int, reward: Any) -> Callable[[], Any] | None:  # for comparison: Megatron's own CE
        if not reward.is_cross_entropy:
            return None
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        x, y = logits(rows, shard)
        return lambda: vocab_parallel_cross_entropy(x.view(rows, 1, -1), y.view(rows, 1)).mean().backward()

    cases = {"DDP (local loss)": ddp, "FSDP2, output layer sharded, fused loss": fsdp2,
             "FSDP2, output layer sharded, F.linear + cross_entropy": lambda rows, reward: fsdp2(rows, reward, False),
             "DTensor TP (Shard(1) logits)": dtensor_tp, "DTensor batch-sharded, global mean": dtensor_batch,
             "torchtitan PrecisionLoss (Shard(-1))": torchtitan, "Megatron language_model_loss": megatron}
    if _megatron_ready():
        cases["Megatron's own vocab_parallel_cross_entropy"] = megatron_own
    return cases


def _megatron_ready() -> bool:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    return True


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows_table = []
    for engine, make in _cases(rank, world).items():
        for preset, reward in PRESETS.items():
            bytes_at, calls, memory = {}, {}, {}
            for rows in ROWS:
                if make(rows, reward) is None:
                    break
                make(rows, reward)()  # warm-up (FSDP's lazy init, imports)
                with CommunicationCounter() as counter:
                    make(rows, reward)()
                bytes_at[rows] = (sum(counter.sent.values()), sum(counter.received.values()))
                calls[rows] = dict(counter.calls)
                run = make(rows, reward)
                memory[rows] = peak_extra_bytes("cpu", run)
            if not bytes_at:
                continue
            small, large = ROWS
            per_row = [(bytes_at[large][i] - bytes_at[small][i]) / (large - small) for i in range(2)]
            sharded = any(word in engine for word in ("Shard(1)", "Shard(-1)", "Megatron"))
            local_logits = large * (VOCAB // world if sharded else VOCAB) * 4  # FSDP2: the logits it never makes
            gathered = [None] * world
            dist.all_gather_object(gathered, memory[large] / 2**20)
            collectives = ", ".join(f"{n} x {name}" for name, n in sorted(calls[large].items())) or "none"
            memories = " / ".join(f"{m:.1f}" for m in gathered)
            rows_table.append(f"| {engine} | {preset} | {collectives} | {per_row[0]:g} B | {per_row[1]:g} B | "
                              f"{memories} MiB | {local_logits / 2**20:.1f} MiB |")
    if rank == 0:
        print(f"{world} ranks, fp32, V = {VOCAB}; per row from {ROWS[0]} and {ROWS[1]} rows per rank; "
              f"memory at {ROWS[1]} rows.\n")
        print("| engine | setting | collectives per call | payload per row | received per row | "
              "peak extra memory per rank (fwd+bwd) | this rank's logits |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(rows_table))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
