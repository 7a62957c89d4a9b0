"""Cases (device, dtype, shape) and the candidates measured in them."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


BASELINE_CANDIDATE = "F.cross_entropy"
LINEAR_BASELINE = "F.linear+F.cross_entropy"
"""The baseline of the fused-linear cases: every ratio of such a case is taken against it."""
UNFUSED_LINEAR = "F.linear+precision_ce"
FUSED_LINEAR = "linear_cross_entropy"
TORCH_CHUNKED = "F.linear_cross_entropy[chunked]"
"""torch 2.13's own fused linear + cross-entropy (``options=nn.LinearCrossEntropyOptions()``): the
fused-linear cases' ``*_vs_torch_chunked`` ratios are taken against it."""
PRESET_NAMES: tuple[str, ...] = ("cross_entropy", "precision", "diversity", "tail_penalty", "head_reward")

DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Command-line dtype names and the torch dtype attribute they stand for."""

DEFAULT_CPU_SHAPES = "1024x8192,1024x32000,4096x32000"
DEFAULT_CPU_DTYPES = "fp32"
DEFAULT_CUDA_CASES: tuple[tuple[str, int, int], ...] = (
    ("bf16", 16384, 32000),
    ("bf16", 16384, 128256),
    ("bf16", 16384, 151936),
    ("fp32", 16384, 32000),
)
"""CUDA grid used when neither --shapes nor --dtype is given: (dtype, tokens, vocab)."""
DEFAULT_CUDA_SHAPES = "16384x32000,16384x128256,16384x151936"
DEFAULT_CUDA_DTYPES = "bf16"

DEFAULT_LINEAR_SHAPES = {"cpu": "1024x256x32000", "cuda": "16384x4096x128256"}
"""Fused-linear cases (TOKENSxHIDDENxVOCAB) of a default run."""
DEFAULT_LINEAR_PRESETS = {"cpu": "cross_entropy,tail_penalty", "cuda": "cross_entropy,precision,tail_penalty"}

DEFAULT_REPEATS = {"cpu": 5, "cuda": 3}
DEFAULT_COMPILE_PRESETS = {"cpu": "precision,tail_penalty", "cuda": "all"}
"""Presets whose torch backend is wrapped in torch.compile by default. On CPU each costs 10-25 s
of compilation per case, so the default keeps one beta-only and one top-k preset."""
DEFAULT_COMPILE_MAX_ELEMENTS: int | None = None
"""torch.compile of the torch backend only for N * V up to this (None: every case). The loss is a
custom op (precision_ce.ops), opaque to Dynamo: its row-chunk loop is no longer unrolled, so compile
time does not grow with N * V (it did before: 260 s at 4096 x 32000 on 2 CPU cores)."""

TRITON_CPU_SKIP = (
    "skipped: the Triton backend needs CUDA; on CPU only the Triton interpreter "
    "(TRITON_INTERPRET=1) runs it, far too slow to time"
)



def _parse_sizes(text: str, names: str, example: str, what: str) -> list[tuple[int, ...]]:
    """Comma-separated ``AxB[xC]`` items, each of ``len(names.split("x"))`` positive sizes."""
    count = len(names.split("x"))
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        parts = item.split("x")
        if len(parts) != count or not all(p.strip().isdigit() for p in parts) or min(map(int, parts)) < 1:
            raise ValueError(f"{what} {item!r} is not {names} of positive sizes, e.g. {example}")
        shapes.append(tuple(int(p) for p in parts))
    if not shapes:
        raise ValueError(f"no {what}s given")
    return shapes


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4096x32000,1024x8192"`` -> ``[(4096, 32000), (1024, 8192)]`` (tokens, vocab)."""
    return _parse_sizes(text, "TOKENSxVOCAB", "4096x32000", "shape")  # type: ignore[return-value]


def parse_linear_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"4096x256x32000"`` -> ``[(4096, 256, 32000)]`` (tokens, hidden, vocab)."""
    return _parse_sizes(text, "TOKENSxHIDDENxVOCAB", "4096x256x32000", "fused-linear shape")  # type: ignore[return-value]


def parse_names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """Comma list of names from ``allowed``; "all" for every one, "none" or "" for none."""
    text = text.strip()
    if text == "all":
        return list(allowed)
    if text in ("", "none"):
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return names


def candidate_label(row: dict[str, Any]) -> str:
    """Short name of a candidate for tables and legends, e.g. ``precision_ce[torch] precision``."""
    if row["candidate"] == "precision_ce":
        return f"precision_ce[{row['backend']}] {row['preset']}"
    if row["candidate"] == "torch.compile(precision_ce)":
        return f"compile(precision_ce) {row['preset']}"
    if row["candidate"] in (UNFUSED_LINEAR, FUSED_LINEAR):
        return f"{row['candidate']}[{row['backend']}] {row['preset']}"
    return str(row["candidate"])


# --------------------------------------------------------------------------------------------
# Candidates


@dataclasses.dataclass
class Candidate:
    """One loss implementation to measure in one case.

    ``make`` builds ``loss_fn(logits (N, V), target (N,) int64) -> scalar loss``; a candidate
    with a ``skip`` note is reported without being run. ``reference`` is the label of the
    candidate whose loss value this one must reproduce. ``mutates_input``: the loss writes into
    its logits (Liger stores the gradient there), so it gets its own copy.
    """

    candidate: str
    backend: str
    preset: str
    make: Callable[[], LossFn] | None = None
    skip: str = ""
    note: str = ""
    reference: str | None = None
    compiled: bool = False
    mutates_input: bool = False

    @property
    def label(self) -> str:
        return candidate_label({"candidate": self.candidate, "backend": self.backend, "preset": self.preset})


@dataclasses.dataclass(frozen=True)
class Case:
    """One grid point: ``tokens`` x ``vocab`` logits of ``dtype`` ("fp32", "bf16", "fp16"), or with
    ``hidden`` set, a fused-linear case: ``tokens`` x ``hidden`` hidden states and a ``vocab`` x
    ``hidden`` output layer, whose logits the candidates may or may not materialise."""

    device: str
    dtype: str
    tokens: int
    vocab: int
    hidden: int | None = None

    @property
    def elements(self) -> int:
        return self.tokens * self.vocab


def _precision_ce_loss(config: Any, backend: str) -> LossFn:
    import precision_ce

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return precision_ce.cross_entropy(logits, target, config=config, backend=backend)  # type: ignore[return-value]

    return loss_fn


def _torch_cross_entropy() -> LossFn:
    import torch.nn.functional as F

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target)

    return loss_fn


def _compiled(make: Callable[[], LossFn]) -> Callable[[], LossFn]:
    def build() -> LossFn:
        import torch

        return torch.compile(make(), dynamic=False)  # type: ignore[return-value]

    return build


def _liger_loss() -> LossFn:
    """Liger-Kernel's ``LigerCrossEntropyLoss`` (mean reduction), or its functional form."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger: Callable[..., Any] = LigerCrossEntropyLoss()
    except ImportError:
        from liger_kernel.transformers.functional import liger_cross_entropy as liger

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = liger(logits, target)
        return out[0] if isinstance(out, tuple) else out  # some versions also return the z-loss

    return loss_fn


def build_candidates(case: Case, presets: Sequence[str], compile_presets: Sequence[str],
                     compile_enabled: bool, compile_max_elements: int | None) -> list[Candidate]:
    """Every candidate of a logits ``case`` (``linear_cases.build_linear_candidates`` for the
    fused-linear ones), in measuring order; the ones that cannot run carry a skip note."""
    import precision_ce

    on_cuda = case.device == "cuda"
    candidates = [Candidate(BASELINE_CANDIDATE, "aten", "cross_entropy", _torch_cross_entropy)]
    compile_fce = Candidate("torch.compile(F.cross_entropy)", "inductor", "cross_entropy",
                            reference=BASELINE_CANDIDATE, compiled=True)
    if compile_enabled:
        compile_fce.make = _compiled(_torch_cross_entropy)
    else:
        compile_fce.skip = "skipped: --no-compile"
    candidates.append(compile_fce)

    triton_missing = importlib.util.find_spec("precision_ce.triton_backend") is None
    for name in presets:
        config = precision_ce.PRESETS[name]
        fast_path = "torch backend takes F.cross_entropy's fast path" if config.is_cross_entropy else ""
        eager = Candidate("precision_ce", "torch", name, lambda c=config: _precision_ce_loss(c, "torch"),
                          note=fast_path,
                          reference=BASELINE_CANDIDATE if config.is_cross_entropy else None)
        candidates.append(eager)

        triton = Candidate("precision_ce", "triton", name, reference=eager.label)
        if not on_cuda:
            triton.skip = TRITON_CPU_SKIP
        elif triton_missing:
            triton.skip = "skipped: precision_ce.triton_backend is not present in this checkout"
        else:
            triton.make = lambda c=config: _precision_ce_loss(c, "triton")
        candidates.append(triton)

        compiled = Candidate("torch.compile(precision_ce)", "torch+inductor", name,
                             reference=eager.label, compiled=True)
        if not compile_enabled:
            compiled.skip = "skipped: --no-compile"
        elif name not in compile_presets:
            compiled.skip = (f"skipped: not in --compile-presets (10-25 s of compilation per case "
                             f"on CPU); default {DEFAULT_COMPILE_PRESETS[case.device]!r}")
        elif compile_max_elements is not None and case.elements > compile_max_elements:
            compiled.skip = f"skipped: N*V = {case.elements} > --compile-max-elements {compile_max_elements}"
        else:
            compiled.make = _compiled(lambda c=config: _precision_ce_loss(c, "torch"))
        candidates.append(compiled)

    liger = Candidate("liger_cross_entropy", "liger", "cross_entropy", reference=BASELINE_CANDIDATE,
                      mutates_input=True,
                      note="writes the gradient into the logits' storage: its extra peak excludes it")
    if importlib.util.find_spec("liger_kernel") is None:
        liger.skip = "skipped: Liger-Kernel is not installed (pip install liger-kernel)"
    elif not on_cuda:
        liger.skip = "skipped: Liger-Kernel's Triton kernels need CUDA"
    else:
        liger.make = _liger_loss
    candidates.append(liger)
    return candidates


def make_inputs(case: Case, seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The differentiable inputs and int64 targets (N,) of ``case``, in ``case.dtype``.

    Logits cases: ``(logits,)``, logits (N, V) ~ 2 * standard normal. Fused-linear cases:
    ``(hidden states (N, D) ~ standard normal, weight (V, D) ~ 2 / sqrt(D) * standard normal)``,
    so that their logits have the same spread as the logits cases'.
    """
    import torch

    generator = torch.Generator(case.device).manual_seed(seed)
    dtype = getattr(torch, DTYPES[case.dtype])

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=generator, device=case.device) * scale
        return x.to(dtype).requires_grad_()

    if case.hidden is None:
        leaves: tuple[torch.Tensor, ...] = (randn(case.tokens, case.vocab, scale=2.0),)
    else:
        leaves = (randn(case.tokens, case.hidden), randn(case.vocab, case.hidden, scale=2.0 / math.sqrt(case.hidden)))
    target = torch.randint(0, case.vocab, (case.tokens,), generator=generator, device=case.device)
    return leaves, target
