"""``precision-ce rl``: pre-train a small causal LM with each preset, then GRPO, and measure Pass@k.

Modules, one concern each: ``task`` (the path-finding task, its verifier and the pre-training
corpus), ``pretrain`` (stage 1, with
``precision_ce.cross_entropy`` as the only loss), ``grpo`` (stage 2), ``metrics`` (unbiased Pass@k),
``experiment`` (presets x seeds), ``report`` (tables, CSVs, figures) and ``cli``.
"""

from ..training import DEFAULT_PRESETS
from .experiment import DEFAULT_SEEDS, QUICK, ExperimentResult, RLSettings, run_experiment
from .metrics import pass_at_k

__all__ = ["DEFAULT_PRESETS", "DEFAULT_SEEDS", "QUICK", "ExperimentResult", "RLSettings", "pass_at_k",
           "run_experiment"]
