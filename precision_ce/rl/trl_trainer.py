"""Stage 2 through the field's tools (``precision-ce rl --trainer trl``): a transformers Llama and TRL's
``GRPOTrainer`` with the recipe of ``grpo.GRPOSettings``.

Optional (``pip install -e ".[rl-trl]"``): the built-in loop in ``grpo.py`` is the default because it
needs no extra dependencies and is seeded end to end; docs/rl.md compares the two. Pre-training and
evaluation are the same code for both trainers: ``HFCausalLM`` gives the Llama the (B, T) -> (B, T, V)
interface of ``model.TinyCausalLM``.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn
from tqdm import tqdm

from .grpo import GRPOSettings, RLCurves
from .metrics import answer_lengths
from .task import PathTask


def _require_trl() -> None:
    try:
        import datasets  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError as error:
        raise ImportError(f"--trainer trl needs TRL and transformers ({error}); "
                          'install them with pip install -e ".[rl-trl]"') from error


class HFCausalLM(nn.Module):
    """A transformers ``LlamaForCausalLM`` behind the (B, T) tokens -> (B, T, V) logits interface."""

    def __init__(self, task: PathTask, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        _require_trl()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=task.vocab_size, hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=task.sequence_len,
            bos_token_id=None, eos_token_id=task.eos, pad_token_id=task.eos, tie_word_embeddings=False,
        )
        self.model = LlamaForCausalLM(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits


def make_tokenizer(task: PathTask):
    """A word-level tokenizer whose ids are the task's tokens: nodes "0".."N-1", "|" (SEP), "<eos>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(node): node for node in range(task.num_nodes)} | {"|": task.sep, "<eos>": task.eos}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


def train_grpo_trl(model: HFCausalLM, task: PathTask, settings: GRPOSettings, seed: int,
                   bar: tqdm | None = None) -> RLCurves:
    """GRPO with ``trl.GRPOTrainer``: same rewards, group size, batch, rate, clip and no KL term as ``grpo.py``.

    ``loss_type="grpo"`` averages the clipped surrogate over each answer's tokens, then over answers,
    as ``grpo.clipped_surrogate_loss`` does. Curves come from TRL's per-step logs.
    """
    _require_trl()
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    pairs = task.train_pairs.tolist()
    # One row per prompt draw: TRL samples prompts from the dataset, shuffled with the seed.
    draws = settings.steps * settings.prompts_per_step
    rows = [pairs[i % len(pairs)] for i in range(draws)]
    dataset = Dataset.from_dict({"prompt": [f"{s} {g} |" for s, g in rows], "s": [s for s, _ in rows],
                                 "g": [g for _, g in rows]})

    rewards, lengths = [], []  # per generation batch = per step (one update per batch of samples)

    def verified(completion_ids: list[list[int]], s: list[int], g: list[int], **_: object) -> list[float]:
        answers = torch.full((len(completion_ids), task.max_answer_len + 1), task.sep)  # no EOS: wrong
        for row, ids in enumerate(completion_ids):
            ids = ids[: task.max_answer_len + 1]
            answers[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        correct = task.verify(torch.tensor(list(zip(s, g, strict=True))), answers).float()
        rewards.append(float(correct.mean()))
        lengths.append(float(answer_lengths(answers, task.eos).mean()))
        return correct.tolist()

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if bar is not None:
                bar.update(1)

    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, max_steps=settings.steps, learning_rate=settings.learning_rate,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
            per_device_train_batch_size=settings.prompts_per_step * settings.group_size,
            num_generations=settings.group_size, max_completion_length=task.max_answer_len + 1,
            temperature=1.0, top_p=1.0, top_k=0, num_iterations=settings.updates_per_step, epsilon=settings.clip,
            beta=0.0, loss_type="grpo", scale_rewards="group", max_grad_norm=settings.max_grad_norm,
            logging_steps=1, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
            seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=model.model, reward_funcs=verified, args=config, train_dataset=dataset,
                              processing_class=make_tokenizer(task), callbacks=[Progress()])
        trainer.remove_callback(PrinterCallback)  # our progress bar and curves replace its per-step dicts
        trainer.train()
    # Reward and length as the built-in loop measures them (answer nodes before EOS); entropy from TRL's
    # logs (mean over the completion tokens of the step).
    entropy = [float(entry["entropy"]) for entry in trainer.state.log_history if "entropy" in entry]
    return RLCurves(rewards, entropy, lengths)
