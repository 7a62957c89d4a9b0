"""torchtitan's loss interface with the generalised loss (``pip install 'precision-ce[torchtitan]'``).

In a torchtitan run one argument switches the loss (every ``CrossEntropyLoss``, also the one inside
``ChunkedLossWrapper``, becomes ``PrecisionLoss``)::

    --override.imports 'precision_ce.integrations.torchtitan.precision_loss={"preset": "precision"}'

This example calls the loss as torchtitan's trainer does, ``loss_fn(pred, labels,
global_valid_tokens)``, with its tensor-parallel output layer (``ColwiseParallel``,
``use_local_output=False``): ``pred`` is a (B, L, V) DTensor sharded on the vocabulary. At step 0 it
prints torchtitan's own cross-entropy next to ours at the cross-entropy setting, and the loss of
the chosen preset next to the single-device one.
Run (CPU, gloo):  torchrun --nproc_per_node 2 examples/torchtitan_loss.py
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

warnings.filterwarnings("ignore", module="torchtitan")
from torchtitan.components.loss import IGNORE_INDEX, CrossEntropyLoss  # noqa: E402
from torchtitan.distributed.utils import set_spmd_backend  # noqa: E402

import precision_ce  # noqa: E402
from precision_ce.integrations.torchtitan import PrecisionLoss  # noqa: E402

VOCAB, DIM, STEPS, BATCH, SEQ = 1000, 64, 30, 8, 64


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" with CUDA tensors
    rank, world = dist.get_rank(), dist.get_world_size()
    set_spmd_backend("partial_dtensor")  # torchtitan's DTensor backend (its trainer sets it from the config)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    successors = torch.randn(VOCAB, VOCAB).mul(3.0).softmax(-1)
    model = nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB, bias=False))
    single = copy.deepcopy(model)
    parallelize_module(model, mesh, {"1": ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1),
                                                          use_local_output=False)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = PrecisionLoss(PrecisionLoss.Config(preset="precision"))
    data = torch.Generator().manual_seed(1)

    for step in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=data)
        labels = torch.multinomial(successors[tokens.flatten()], 1, generator=data).view(BATCH, SEQ)
        labels[:, :4] = IGNORE_INDEX  # e.g. a prompt
        global_valid_tokens = (labels != IGNORE_INDEX).sum().float()  # one TP group: this rank's batch
        pred = model(tokens)  # DTensor (BATCH, SEQ, VOCAB), Shard(-1)
        loss, _ = loss_fn(pred, labels, global_valid_tokens)
        if step == 0:
            theirs, _ = CrossEntropyLoss(CrossEntropyLoss.Config())(pred, labels, global_valid_tokens)
            ours, _ = PrecisionLoss(PrecisionLoss.Config())(pred, labels, global_valid_tokens)
            expected = precision_ce.cross_entropy(single(tokens).flatten(0, 1), labels.flatten(),
                                                  config=precision_ce.PRESETS["precision"])
            if rank == 0:
                print(f"step 0: cross-entropy: torchtitan's {theirs.item():.6f}, ours {ours.item():.6f}; "
                      f"precision: ours {loss.item():.6f}, single device {expected.item():.6f}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == STEPS - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  (vocabulary over {world} ranks)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
