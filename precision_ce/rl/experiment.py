"""The two-stage experiment: pre-train one model per preset and seed, then the same GRPO from each.

For every seed: one task (graph, prompt split, corpus), one initialisation, one batch order and one
RL sampling stream, shared by all presets, so that presets differ only in the pre-training loss.
Pass@k is measured on the held-out test prompts before and after RL.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from ..causal_lm import TinyCausalLM
from ..config import PRESETS, RewardConfig, preset
from ..training import DEFAULT_PRESETS, single_thread_on_cpu
from .grpo import GRPOSettings, RLCurves, train_grpo
from .metrics import Evaluation, default_ks, evaluate
from .pretrain import PretrainSettings, pretrain
from .task import Corpus, PathTask, make_corpus, make_task

TRAINERS: tuple[str, ...] = ("builtin", "trl")
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
"""Report seeds. The task and recipe were sized on seeds 100-102 only (docs/rl.md), never on these."""


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """Everything that defines a run besides presets, seeds and device. Defaults: ``precision-ce rl``."""

    num_nodes: int = 64
    out_degree: int = 3  # successors per node; also the loss's k for the rank-aware presets
    max_answer_len: int = 8
    min_distance: int = 4  # shortest path of a prompt, in edges
    test_min_distance: int | None = None  # shortest path of a test prompt (default: min_distance)
    test_prompts: int = 64  # held out from pre-training and RL; Pass@k is measured on them
    corpus_size: int = 16384
    mistake_rate: float = 0.3
    noise_rate: float = 0.1
    model_dim: int = 32
    layers: int = 2
    heads: int = 4
    pretrain: PretrainSettings = dataclasses.field(default_factory=PretrainSettings)
    grpo: GRPOSettings = dataclasses.field(default_factory=GRPOSettings)
    eval_samples: int = 64  # samples per test prompt; Pass@k for k = 1, 2, 4, ..., eval_samples
    trainer: str = "builtin"  # "builtin": grpo.py on TinyCausalLM; "trl": TRL's GRPOTrainer on a transformers Llama

    @property
    def k(self) -> int:
        """The head size of the rank-aware presets, scaled to this task.

        The paper's k = 100 is a set of plausible next tokens in a ~150K vocabulary; here the
        plausible next nodes are the current node's successors (and k = 100 >= V would put every
        token in the head, turning both rank-aware presets into something else).
        """
        return self.out_degree


QUICK = RLSettings(
    num_nodes=16, max_answer_len=5, min_distance=2, test_prompts=16, corpus_size=4096, layers=1, eval_samples=16,
    pretrain=PretrainSettings(steps=200, batch_size=128),
    grpo=GRPOSettings(steps=60, prompts_per_step=8, group_size=8, learning_rate=2e-3),
)
"""``--quick``: a run of seconds for tests and smoke checks."""


KNOBS: tuple[str, ...] = ("beta", "lambda_head", "lambda_tail")


def reward_config(name: str, k: int) -> RewardConfig:
    """A preset by name (``"precision"``), or one knob set away from cross-entropy (``"beta=-0.5"``,
    ``"lambda_tail=-0.2"``, ``"lambda_head=0.1"``); k is the task's k either way."""
    if name in PRESETS:
        return preset(name, k=k)
    knob, _, value = name.partition("=")
    try:
        return RewardConfig(k=k, **{knob: float(value)}) if knob in KNOBS else preset(name)
    except ValueError as error:
        raise ValueError(f"unknown preset or knob setting {name!r}: use a name from {sorted(PRESETS)} or "
                         f"KNOB=VALUE with KNOB in {KNOBS} ({error})") from error


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One preset, one seed."""

    preset: str
    seed: int
    config: RewardConfig
    corpus_ce: float  # cross-entropy of the pre-trained model on its corpus (nats per answer token)
    before: Evaluation
    after: Evaluation
    curves: RLCurves
    seconds: float


@dataclasses.dataclass(frozen=True)
class ExperimentResult:
    settings: RLSettings
    presets: tuple[str, ...]
    seeds: tuple[int, ...]
    runs: list[RunResult]
    corpus_composition: dict[str, float]  # of the first seed's corpus

    def run(self, name: str, seed: int) -> RunResult:
        return next(r for r in self.runs if r.preset == name and r.seed == seed)


def run_experiment(presets: Sequence[str] = DEFAULT_PRESETS, seeds: Sequence[int] = DEFAULT_SEEDS,
                   settings: RLSettings | None = None, device: str | torch.device = "cpu",
                   progress: bool = True) -> ExperimentResult:
    """Pre-train and RL every (seed, preset); evaluate Pass@k before and after RL."""
    settings = settings or RLSettings()
    if not presets:
        raise ValueError(f"presets must be a non-empty list of names from {sorted(PRESETS)} or knob settings")
    for name in presets:
        reward_config(name, settings.k)  # raises on an unknown name
    if not seeds:
        raise ValueError("give at least one seed")
    if settings.trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {settings.trainer!r}")
    device = torch.device(device)
    steps_per_run = settings.pretrain.steps + settings.grpo.steps
    bar = tqdm(total=steps_per_run * len(presets) * len(seeds), disable=not progress, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    runs: list[RunResult] = []
    composition: dict[str, float] = {}
    with single_thread_on_cpu(device):
        for seed in seeds:
            task = make_task(settings.num_nodes, settings.out_degree, settings.max_answer_len,
                             settings.test_prompts, seed, settings.min_distance, settings.test_min_distance)
            corpus = make_corpus(task, settings.corpus_size, settings.mistake_rate, settings.noise_rate, seed + 1)
            composition = composition or corpus.composition()
            for name in presets:
                bar.set_description(f"seed {seed} {name}")
                runs.append(_run_one(name, seed, task, corpus, settings, device, bar))
    bar.close()
    return ExperimentResult(settings, tuple(presets), tuple(seeds), runs, composition)


def _run_one(name: str, seed: int, task: PathTask, corpus: Corpus, settings: RLSettings, device: torch.device,
             bar: tqdm) -> RunResult:
    start = time.perf_counter()
    config = reward_config(name, settings.k)
    torch.manual_seed(seed)  # same initial weights for every preset
    if settings.trainer == "trl":
        from .trl_trainer import HFCausalLM

        model = HFCausalLM(task, settings.model_dim, settings.layers, settings.heads).to(device)
    else:
        model = TinyCausalLM(task.vocab_size, task.sequence_len, settings.model_dim, settings.layers,
                             settings.heads).to(device)
    corpus_ce = pretrain(model, corpus, config, settings.pretrain, torch.Generator().manual_seed(seed + 2), bar)
    ks = default_ks(settings.eval_samples)

    def evaluation() -> Evaluation:
        # The same sampling stream before and after RL and for every preset.
        generator = torch.Generator(device=device).manual_seed(seed + 3)
        return evaluate(model, task, task.test_pairs, settings.eval_samples, ks, generator)

    before = evaluation()
    if settings.trainer == "trl":
        from .trl_trainer import train_grpo_trl

        curves = train_grpo_trl(model, task, settings.grpo, seed + 4, bar)
    else:
        curves = train_grpo(model, task, settings.grpo, torch.Generator(device=device).manual_seed(seed + 4), bar)
    after = evaluation()
    return RunResult(name, seed, config, corpus_ce, before, after, curves, time.perf_counter() - start)
