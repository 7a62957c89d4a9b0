"""FSDP2 (``fully_shard``) training with the fused generalised loss: no (tokens, vocabulary) logits.

The torchtitan pattern: each block, the output layer and the root are FSDP units. The output layer
is sharded on its own, so the loss runs as its forward (``distributed.output_layer_loss``): FSDP
gathers its weight for the loss and reduce-scatters the gradient. Each rank trains on its own
batches; the loss of each rank is a plain local mean, and FSDP averages the gradients, as DDP.
Run (CPU, gloo):  torchrun --nproc_per_node 2 examples/fsdp2_train.py
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import precision_ce

VOCAB, DIM, STEPS, BATCH, SEQ = 512, 64, 30, 8, 32


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(DIM, DIM), nn.GELU()) for _ in range(2))
        self.norm = nn.LayerNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, **loss_kwargs) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + block(h)
        return precision_ce.distributed.output_layer_loss(self.output, self.norm(h), labels, **loss_kwargs)


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" with CUDA tensors
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same language and the same initial model on every rank
    successors = torch.randn(VOCAB, VOCAB).mul(3.0).softmax(-1)
    model = TinyLM()
    single = copy.deepcopy(model)  # for the step-0 check only
    for module in [*model.blocks, model.output, model]:
        # gloo has no PREMUL_SUM reduce-scatter: sum, then divide (NCCL needs no such call)
        fully_shard(module).set_force_sum_reduction_for_comms(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    config = precision_ce.PRESETS["precision"]  # beta = -0.25

    for step in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=data)
        labels = torch.multinomial(successors[tokens.flatten()], 1, generator=data).view(BATCH, SEQ)
        loss = model(tokens, labels, config=config)
        if step == 0:  # the same batch, one process, unsharded model
            expected = single(tokens, labels, config=config)
            print(f"rank {rank} step 0: FSDP2 loss {loss.item():.6f}, unsharded model {expected.item():.6f}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == STEPS - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:3d}  loss {mean.item() / world:.4f}  ({world} ranks)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
