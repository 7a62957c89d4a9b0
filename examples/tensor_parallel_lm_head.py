"""A tensor-parallel output layer with the vocabulary-parallel generalised loss.

Each rank holds a slice of the output layer's rows (its share of the vocabulary; shares may be
uneven) and computes only its slice of the logits. ``vocab_parallel_cross_entropy`` gives every
rank the loss of the full vocabulary and the gradient of its slice; nothing of size
tokens x vocabulary is gathered. The hidden states are replicated, so their gradient (a sum of
every rank's partial product) is all-reduced in the backward pass.
Run (CPU, gloo):  torchrun --nproc_per_node 2 examples/tensor_parallel_lm_head.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import precision_ce
from precision_ce.distributed import vocab_parallel_cross_entropy

VOCAB, DIM, STEPS, BATCH = 1000, 64, 30, 512


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the hidden states' gradient over the tensor-parallel ranks."""

    @staticmethod
    def forward(ctx, hidden):  # type: ignore[override]
        return hidden

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


class VocabParallelLMHead(nn.Module):
    """Rows [start, start + V_r) of a (VOCAB, DIM) output layer; returns this rank's logits (..., V_r)."""

    def __init__(self, full_weight: torch.Tensor, rank: int, world: int) -> None:
        super().__init__()
        shard = torch.tensor_split(full_weight, world)[rank]  # uneven when world does not divide VOCAB
        self.weight = nn.Parameter(shard.clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToShards.apply(hidden), self.weight)


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" with CUDA tensors
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # replicated parts start equal on every rank
    successors = torch.randn(VOCAB, VOCAB).mul(3.0).softmax(-1)
    embedding = nn.Embedding(VOCAB, DIM)
    full_head = torch.randn(VOCAB, DIM) / DIM**0.5
    head = VocabParallelLMHead(full_head, rank, world)
    optimizer = torch.optim.Adam([*embedding.parameters(), *head.parameters()], lr=1e-2)
    data = torch.Generator().manual_seed(1)  # tensor parallelism: every rank sees the same tokens
    config = precision_ce.preset("tail_penalty", k=20)

    for step in range(STEPS):
        previous = torch.randint(0, VOCAB, (BATCH,), generator=data)
        target = torch.multinomial(successors[previous], 1, generator=data)[:, 0]
        hidden = embedding(previous)
        loss, stats = vocab_parallel_cross_entropy(head(hidden), target, config=config, return_stats=True)
        if step == 0:
            # Check against the single-device loss on the whole output layer (gathered only here).
            single = precision_ce.cross_entropy(F.linear(hidden.detach(), full_head), target, config=config)
            if rank == 0:
                print(f"step 0: vocab-parallel loss {loss.item():.6f}, single-device loss {single.item():.6f}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == STEPS - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  entropy {stats.entropy.mean().item():.4f}  "
                  f"top-k mass {stats.topk_mass.mean().item():.4f}  (vocabulary over {world} ranks)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
