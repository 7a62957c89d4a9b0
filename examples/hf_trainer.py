"""Train a tiny Llama with the Hugging Face Trainer and the generalised loss, on the CPU.

The one line that matters is ``precision_ce.hf.apply(model, precision_ce.PRESETS["precision"])``;
everything else is a plain transformers training script. The data is the synthetic Markov-chain
language of ``precision-ce demo`` (no downloads), so the entropy the model should reach is known.
Run: pip install -e ".[hf]" && python examples/hf_trainer.py [--preset precision] [--seconds 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import transformers

import precision_ce
from precision_ce.demo import make_markov_chain, sample_corpus

VOCAB, SEQ = 512, 64


class StopAfter(transformers.TrainerCallback):
    """Ends training after a wall-clock budget."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = time.monotonic() > self.deadline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="precision", choices=sorted(precision_ce.PRESETS))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; a model this small trains fastest on one (several times faster "
                             "than two on a busy 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    chain = make_markov_chain(VOCAB, likely_successors=8, head_mass=0.9, seed=0)
    corpus = sample_corpus(chain, 400_000, torch.Generator().manual_seed(0), parallel_sequences=400_000 // SEQ)
    dataset = [{"input_ids": row, "labels": row} for row in corpus]

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)
    model = transformers.AutoModelForCausalLM.from_config(config)
    precision_ce.hf.apply(model, precision_ce.PRESETS[args.preset], log_stats=True)  # <- the one line

    with tempfile.TemporaryDirectory() as out:
        trainer = transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(
                output_dir=out, max_steps=100_000, per_device_train_batch_size=16, learning_rate=3e-3,
                warmup_steps=20, logging_steps=50, report_to=[], save_strategy="no", use_cpu=True,
                disable_tqdm=True,
            ),
            train_dataset=dataset,
            callbacks=[precision_ce.hf.PrecisionCECallback(), StopAfter(args.seconds)],
        )
        trainer.train()

    print(f"\npreset {args.preset}: {precision_ce.PRESETS[args.preset]}")
    print(f"true next-token entropy of the language: {chain.entropy_rate():.3f} nats")
    print(f"{'step':>6}  {'loss':>7}  {'entropy':>7}  {'top-k mass':>10}  {'target in top-k':>15}")
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"{entry['step']:>6}  {entry['loss']:>7.3f}  {entry['precision_ce/entropy']:>7.3f}  "
                  f"{entry['precision_ce/top_k_mass']:>10.3f}  {entry['precision_ce/target_in_top_k']:>15.3f}")


if __name__ == "__main__":
    main()
