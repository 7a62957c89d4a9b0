"""DTensor tensor parallelism: a vocabulary-sharded output layer and the generalised loss.

``parallelize_module`` splits the output layer's rows over the mesh (``ColwiseParallel`` with
``use_local_output=False``, as torchtitan does), so the logits are a DTensor sharded on the class
dimension. ``precision_ce.cross_entropy`` takes it as it is: the vocabulary-parallel loss over the
mesh's group, nothing of size tokens x vocabulary gathered, the result a replicated DTensor and the
gradient sharded like the logits. (Inside ``torch.distributed.tensor.parallel.loss_parallel()``
too, where ``F.cross_entropy`` would be used.) Every rank sees the same tokens.
Run (CPU, gloo):  torchrun --nproc_per_node 2 examples/dtensor_tp_train.py
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import precision_ce

VOCAB, DIM, STEPS, BATCH = 1000, 64, 30, 512


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" with CUDA tensors
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    torch.manual_seed(0)  # the same language and the same initial model on every rank
    successors = torch.randn(VOCAB, VOCAB).mul(3.0).softmax(-1)
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB, bias=False))
    single = copy.deepcopy(model)  # for the step-0 check only
    parallelize_module(model, mesh, {"1": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                                                          use_local_output=False)})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)  # tensor parallelism: every rank sees the same tokens
    config = precision_ce.preset("tail_penalty", k=20)

    for step in range(STEPS):
        previous = torch.randint(0, VOCAB, (BATCH,), generator=data)
        target = torch.multinomial(successors[previous], 1, generator=data)[:, 0]
        logits = model(previous)  # DTensor (BATCH, VOCAB), Shard(1): this rank's VOCAB / world classes
        loss, stats = precision_ce.cross_entropy(logits, target, config=config, return_stats=True)
        if step == 0:
            expected = precision_ce.cross_entropy(single(previous), target, config=config)
            if rank == 0:
                print(f"step 0: logits {logits.placements}, local {tuple(logits.to_local().shape)}; "
                      f"loss {loss.placements} {loss.full_tensor().item():.6f}, single device {expected.item():.6f}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == STEPS - 1):
            print(f"step {step:3d}  loss {loss.full_tensor().item():.4f}  "
                  f"entropy {stats.entropy.full_tensor().mean().item():.4f}  (vocabulary over {world} ranks)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
