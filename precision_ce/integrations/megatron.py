"""Megatron-Core integration: the generalised loss as a GPT model's language-model loss.

    from precision_ce.integrations import megatron
    megatron.install(gpt_model, precision_ce.PRESETS["precision"])    # or beta=..., lambda_tail=..., k=...

Megatron's ``LanguageModule.compute_language_model_loss(labels [b, s], logits [s, b, V/tp])``
returns the per-token fp32 loss [b, s] of logits sharded over the vocabulary across the model's
tensor-parallel group; the training loop masks and averages it. ``language_model_loss`` is the same
contract with the generalised loss, computed by ``precision_ce.distributed`` (two small collectives
per call, nothing of size V gathered); ``install`` sets it on a model instance. At the
cross-entropy setting it equals ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``.
Tested with megatron-core 0.16.1 (``pip install 'precision-ce[megatron]'``).
"""

from __future__ import annotations

import types
from typing import Any

import torch

from ..api import _reward_config
from ..config import RewardConfig
from ..distributed import vocab_parallel_cross_entropy
from . import float32_loss

try:
    from megatron.core import parallel_state
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        f"precision_ce.integrations.megatron needs Megatron-Core ({error}); install it with: "
        "pip install 'precision-ce[megatron]'"
    ) from error

_REWARD_FIELDS = ("beta", "k", "lambda_head", "lambda_tail", "positive_reward")


def language_model_loss(
    labels: torch.Tensor, logits: torch.Tensor, *, tp_group: Any = None, config: RewardConfig | None = None,
    **loss_kwargs: Any,
) -> torch.Tensor:
    """Per-token loss of vocabulary-sharded logits, as Megatron's ``compute_language_model_loss``.

    Args:
        labels: (b, s) int64 global token ids (``ignore_index``, default -100, gives a 0 loss).
        logits: (s, b, V/tp) this rank's vocabulary shard, any float dtype (computed in fp32).
        tp_group: the tensor-parallel process group (default: Megatron's, from ``parallel_state``).
        config, loss_kwargs: the loss, as in ``precision_ce.cross_entropy`` (beta, k, lambda_head,
            lambda_tail, label_smoothing, z_loss, softcap, ignore_index, backend).

    Returns:
        (b, s) float32 (float64 for float64 logits), the same on every rank of ``tp_group``; gradients
        reach this rank's logits. Unlike Megatron's own loss, the logits are left unchanged.
    """
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if labels.dim() != 2 or logits.dim() != 3 or logits.shape[:2] != labels.shape[::-1]:
        raise ValueError(f"labels must be (b, s) and logits (s, b, V/tp); got {tuple(labels.shape)} and "
                         f"{tuple(logits.shape)}")
    with float32_loss(logits):
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), group=tp_group, reduction="none",
                                            config=config, **loss_kwargs)
    return loss.to(torch.promote_types(loss.dtype, torch.float32)).transpose(0, 1).contiguous()


def install(model: torch.nn.Module, config: RewardConfig | None = None, **loss_kwargs: Any) -> torch.nn.Module:
    """Make ``model`` (a Megatron ``LanguageModule``: GPTModel, ...) compute the generalised loss.

    Sets ``compute_language_model_loss`` on the instance (used whatever ``cross_entropy_loss_fusion``
    says), over the model's own tensor-parallel group (``model.pg_collection.tp``, Megatron's global
    one if the model has none); installing again replaces the setting. Returns the model.
    """
    if not hasattr(model, "compute_language_model_loss"):
        raise TypeError(f"install takes a Megatron LanguageModule (e.g. GPTModel), got {type(model).__name__}")
    config = _reward_config(config, **{k: loss_kwargs.pop(k) for k in list(loss_kwargs) if k in _REWARD_FIELDS})
    tp_group = getattr(getattr(model, "pg_collection", None), "tp", None)

    def compute_language_model_loss(self: torch.nn.Module, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return language_model_loss(labels, logits, tp_group=tp_group, config=config, **loss_kwargs)

    model.compute_language_model_loss = types.MethodType(compute_language_model_loss, model)
    return model
