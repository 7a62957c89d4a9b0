"""precision-ce: the generalised next-token objective of "Diversity or Precision?" (arXiv 2512.22955).

``precision_ce.cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy`` that adds a
positive-reward scale ``beta`` and rank-aware rewards ``lambda_head`` / ``lambda_tail`` for wrong
tokens inside / outside the top-``k``, with fused Triton kernels on the GPU.
"""

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
    "linear_cross_entropy",
    "preset",
]
__version__ = "0.1.0"
