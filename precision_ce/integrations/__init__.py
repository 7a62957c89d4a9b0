"""Integrations with training frameworks, one module each; the core never imports them.

- ``precision_ce.integrations.hf``: Hugging Face transformers (``pip install 'precision-ce[hf]'``),
  also reachable as ``precision_ce.hf``.
- ``precision_ce.integrations.torchtitan``: torchtitan's loss interface (``[torchtitan]``).
- ``precision_ce.integrations.megatron``: Megatron-Core's language-model loss (``[megatron]``).

Each imports its framework on import and raises an ImportError naming the extra when it is missing.
"""
