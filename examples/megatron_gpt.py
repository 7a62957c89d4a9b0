"""Megatron-Core's GPTModel with the generalised loss (``pip install 'precision-ce[megatron]'``).

``megatron.install(model, config)`` replaces the model's ``compute_language_model_loss``: the
per-token fp32 loss [b, s] of the vocabulary-sharded logits [s, b, V/tp], over the model's
tensor-parallel group, as Megatron's training loop expects (it masks and averages it).
GPTModel's full forward needs CUDA (its attention allocates a CUDA buffer), so on CPU this example
trains the parts that run there: the embedding and the tensor-parallel output layer, with the loss
called as ``GPTModel.forward`` calls it. At step 0 it prints Megatron's own loss (the cross-entropy
setting) next to ours, and the chosen preset's loss next to the single-device one.
Run (CPU, gloo):  torchrun --nproc_per_node 2 examples/megatron_gpt.py
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")  # Megatron warns that Transformer Engine and Apex are absent
from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

import precision_ce  # noqa: E402
from precision_ce.integrations import megatron  # noqa: E402

VOCAB, HIDDEN, STEPS, BATCH, SEQ = 1024, 64, 30, 8, 32


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" with CUDA tensors
    rank, world = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    torch.manual_seed(0)  # Megatron's CPU initialisation: the full weight, then this rank's rows
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, use_cpu_initialization=True,
                               tensor_model_parallel_size=world, params_dtype=torch.float32)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ)
    successors = torch.randn(VOCAB, VOCAB).mul(3.0).softmax(-1)
    preset = precision_ce.PRESETS["precision"]
    trained = [*model.embedding.parameters(), *model.output_layer.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    data = torch.Generator().manual_seed(1)  # tensor parallelism: every rank sees the same tokens

    for step in range(STEPS):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=data)
        labels = torch.multinomial(successors[tokens.flatten()], 1, generator=data).view(BATCH, SEQ)
        positions = torch.arange(SEQ).expand(BATCH, SEQ)
        hidden = model.embedding(input_ids=tokens, position_ids=positions)  # [s, b, h]
        logits = model.output_layer(hidden)[0]  # [s, b, V/tp]: this rank's classes
        if step == 0:
            theirs = model.compute_language_model_loss(labels, logits.detach().clone()).mean()
            megatron.install(model)  # the cross-entropy setting
            ours = model.compute_language_model_loss(labels, logits.detach()).mean()
            megatron.install(model, preset)
        loss = model.compute_language_model_loss(labels, logits).mean()  # [b, s] -> the batch mean
        if step == 0:
            gathered = [torch.empty_like(logits) for _ in range(world)]
            dist.all_gather(gathered, logits.detach().contiguous())  # for the check only
            single = precision_ce.cross_entropy(torch.cat(gathered, -1).permute(1, 2, 0), labels, config=preset)
            if rank == 0:
                print(f"step 0: cross-entropy: Megatron's {theirs.item():.6f}, ours {ours.item():.6f}; "
                      f"precision: ours {loss.item():.6f}, single device {single.item():.6f}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == STEPS - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  (vocabulary over {world} ranks)")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
