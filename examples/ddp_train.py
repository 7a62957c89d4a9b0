"""Data-parallel training with DDP and the generalised loss: nothing special is needed.

Each rank trains on its own batches; DDP all-reduces the gradients. The loss is per token, so
``precision_ce.cross_entropy`` drops in for ``F.cross_entropy`` unchanged.
Run (CPU, gloo):  torchrun --nproc_per_node 2 examples/ddp_train.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import precision_ce

VOCAB, DIM, STEPS, BATCH = 256, 64, 40, 256


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" with CUDA tensors
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same language and the same initial model on every rank
    successors = torch.randn(VOCAB, VOCAB).mul(2.5).softmax(-1)
    model = DistributedDataParallel(nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB)))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    data = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    config = precision_ce.PRESETS["precision"]  # beta = -0.25
    for step in range(STEPS):
        previous = torch.randint(0, VOCAB, (BATCH,), generator=data)
        target = torch.multinomial(successors[previous], 1, generator=data)[:, 0]
        loss, stats = precision_ce.cross_entropy(model(previous), target, config=config, return_stats=True)
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over ranks here
        optimizer.step()
        if step % 10 == 0 or step == STEPS - 1:
            summary = torch.stack([loss.detach(), stats.entropy.mean()])
            dist.all_reduce(summary)
            if rank == 0:
                loss_mean, entropy_mean = (summary / world).tolist()
                print(f"step {step:3d}  loss {loss_mean:.4f}  entropy {entropy_mean:.4f}  ({world} ranks)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
