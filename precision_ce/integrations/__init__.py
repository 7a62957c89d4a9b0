"""Integrations with training frameworks, one module each; the core never imports them.

- ``precision_ce.integrations.hf``: Hugging Face transformers (``pip install 'precision-ce[hf]'``),
  also reachable as ``precision_ce.hf``.
- ``precision_ce.integrations.torchtitan``: torchtitan's loss interface (``[torchtitan]``).
- ``precision_ce.integrations.megatron``: Megatron-Core's language-model loss (``[megatron]``).

Each imports its framework on import and raises an ImportError naming the extra when it is missing.
"""

import contextlib

import torch


def float32_loss(logits: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which the loss of 16-bit logits (or hidden states) comes back in fp32, as the
    frameworks' own losses return it, without an fp32 copy of the logits: autocast at their dtype
    (precision_ce computes in fp32 and returns fp32 under autocast, as ``F.cross_entropy``). Under
    the caller's own autocast the loss is fp32 already, and that autocast is left as it is."""
    if logits.dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(logits.device.type):
        return torch.autocast(logits.device.type, dtype=logits.dtype)
    return contextlib.nullcontext()
