"""Time one GRPO step of the built-in loop against TRL's GRPOTrainer, same task, sizes and recipe.

Interleaved repeats; wall clock and process CPU time (the machine may be shared, CPU time is the
steadier figure). Usage: python scripts/rl_trainer_timing.py [--steps 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from precision_ce.causal_lm import TinyCausalLM
from precision_ce.rl.experiment import RLSettings
from precision_ce.rl.grpo import train_grpo
from precision_ce.rl.task import make_task
from precision_ce.rl.trl_trainer import HFCausalLM, train_grpo_trl
from precision_ce.training import single_thread_on_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    settings = RLSettings()
    grpo = dataclasses.replace(settings.grpo, steps=args.steps)
    task = make_task(settings.num_nodes, settings.out_degree, settings.max_answer_len, settings.test_prompts, 100,
                     settings.min_distance)
    times: dict[str, list[tuple[float, float]]] = {"builtin": [], "trl": []}
    with single_thread_on_cpu(torch.device("cpu")):
        for repeat in range(args.repeats):
            for trainer in ("builtin", "trl"):
                torch.manual_seed(repeat)
                wall, cpu = time.perf_counter(), time.process_time()
                if trainer == "builtin":
                    model = TinyCausalLM(task.vocab_size, task.sequence_len, settings.model_dim, settings.layers,
                                         settings.heads)
                    train_grpo(model, task, grpo, torch.Generator().manual_seed(repeat))
                else:
                    model = HFCausalLM(task, settings.model_dim, settings.layers, settings.heads)
                    train_grpo_trl(model, task, grpo, repeat)
                times[trainer].append((time.perf_counter() - wall, time.process_time() - cpu))
    print(f"{args.steps} GRPO steps of {grpo.prompts_per_step} prompts x {grpo.group_size} samples, "
          f"model dim {settings.model_dim}, {settings.layers} layers, torch threads 1 (setup included)")
    for trainer, runs in times.items():
        print(f"{trainer:8s} " + "  ".join(f"wall {w:6.1f} s cpu {c:6.1f} s ({1000 * c / args.steps:.0f} ms/step)"
                                           for w, c in runs))


if __name__ == "__main__":
    main()
