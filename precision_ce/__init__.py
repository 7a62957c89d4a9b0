"""precision-ce: the generalised next-token objective of "Diversity or Precision?" (arXiv 2512.22955).

``precision_ce.cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy`` that adds a
positive-reward scale ``beta`` and rank-aware rewards ``lambda_head`` / ``lambda_tail`` for wrong
tokens inside / outside the top-``k``, with fused Triton kernels on the GPU.
"""

import importlib
from typing import Any

from . import distributed
from .api import BACKENDS, PrecisionCrossEntropyLoss, cross_entropy
from .config import PRESETS, LossParams, RewardConfig, preset
from .linear import LinearCrossEntropyLoss, PrecisionLinearCrossEntropyLoss, linear_cross_entropy
from .reference import RowStats

__all__ = [
    "BACKENDS",
    "PRESETS",
    "LinearCrossEntropyLoss",
    "LossParams",
    "PrecisionCrossEntropyLoss",
    "PrecisionLinearCrossEntropyLoss",
    "RewardConfig",
    "RowStats",
    "cross_entropy",
    "distributed",
    "linear_cross_entropy",
    "preset",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``precision_ce.hf``: the transformers integration (precision_ce.integrations.hf), imported on
    first use so that ``import precision_ce`` does not import transformers."""
    if name == "hf":
        return importlib.import_module(f"{__name__}.hf")
    raise AttributeError(f"module 'precision_ce' has no attribute {name!r}")
