"""torchtitan integration: the generalised loss behind torchtitan's loss interface.

One argument switches a torchtitan run to it (the ``@override`` mechanism)::

    --override.imports 'precision_ce.integrations.torchtitan.precision_loss={"preset": "precision"}'
    --override.imports precision_ce.integrations.torchtitan.precision_fused_loss   # the fused one

- ``PrecisionLoss`` follows ``BaseLoss``'s contract, ``(pred, labels, global_valid_tokens) ->
  (loss, metrics)``: the fp32 sum over this rank's tokens divided by the global number of valid
  tokens (the trainer all-reduces the rest). It takes the three forms of ``pred`` torchtitan
  produces: plain logits (B, L, V); a vocabulary-sharded DTensor (``Shard(-1)``, the output layer
  under ``ColwiseParallel(use_local_output=False)``), through ``precision_ce.cross_entropy``'s
  DTensor support; and, under the ``spmd_types`` backend, the local shard (B, L, V/tp) with the
  current mesh's ``"tp"`` group, through ``precision_ce.distributed``. Nothing of size V is gathered.
  It also serves as ``ChunkedLossWrapper``'s per-chunk ``loss_fn`` (``precision_loss`` replaces
  the ``CrossEntropyLoss`` inside one).
- ``PrecisionFusedLoss`` takes ``ChunkedLossWrapper``'s place (the trainer hands it the hidden
  states and the output layer) and computes ``linear_cross_entropy`` in one call, no (N, V) logits
  held; an output layer under FSDP2's ``fully_shard`` works (``distributed.output_layer_loss``).
- ``metrics=True`` adds ``entropy/mean`` (mean predictive entropy) and ``target_in_top_k/frac``
  (fraction of targets among the k largest logits), per valid token, in ``ChunkedLossWrapper``'s
  naming (normalised by the global valid tokens, so chunks add up). Off by default: the trainer
  discards loss metrics, and the target rank costs a top-k pass (and, vocabulary-parallel, an
  all-gather of k values per row).

Tested with torchtitan 0.3.0 (``pip install 'precision-ce[torchtitan]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import api
from ..config import RewardConfig, preset
from ..distributed import output_layer_loss, vocab_parallel_cross_entropy
from ..reference import RowStats
from . import float32_loss

try:
    import spmd_types as spmd
    from torchtitan.components.loss import IGNORE_INDEX, BaseLoss, ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.config import CompileConfig, override
    from torchtitan.distributed.spmd_types import current_spmd_mesh, spmd_mesh_size
    from torchtitan.distributed.utils import get_spmd_backend
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        f"precision_ce.integrations.torchtitan needs torchtitan ({error}); install it with: "
        "pip install 'precision-ce[torchtitan]'"
    ) from error


def _metrics(stats: RowStats, labels: torch.Tensor, k: int, denominator: torch.Tensor | None) -> dict[str, Any]:
    """Entropy and target-in-top-k per valid token; ignored positions count for nothing."""
    with torch.no_grad():
        valid = (labels != IGNORE_INDEX).reshape(stats.entropy.shape)
        if denominator is None:
            denominator = valid.sum().clamp(min=1)
        in_top_k = (stats.target_rank >= 1) & (stats.target_rank <= k)  # rank 0: ignored
        return {"entropy/mean": torch.where(valid, stats.entropy, 0.0).sum() / denominator,
                "target_in_top_k/frac": in_top_k.sum().float() / denominator}


class PrecisionLoss(BaseLoss):
    """The generalised loss in ``BaseLoss``'s contract (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        preset: str = "cross_entropy"
        """A name of ``precision_ce.PRESETS``; the fields below, where set, replace its values."""
        beta: float | None = None
        k: int | None = None
        lambda_head: float | None = None
        lambda_tail: float | None = None
        z_loss: float = 0.0
        label_smoothing: float = 0.0
        softcap: float | None = None
        metrics: bool = False
        """Also return entropy/mean and target_in_top_k/frac (costs a top-k pass)."""
        backend: str = "auto"
        """precision_ce's backend: "auto" (Triton for CUDA tensors), "torch" or "triton"."""

        def reward(self) -> RewardConfig:
            knobs = {name: getattr(self, name) for name in ("beta", "k", "lambda_head", "lambda_tail")}
            return preset(self.preset, **{name: value for name, value in knobs.items() if value is not None})

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None) -> None:
        self.reward = config.reward()
        self.with_metrics = config.metrics
        self.loss_kwargs = {"config": self.reward, "z_loss": config.z_loss, "softcap": config.softcap,
                            "label_smoothing": config.label_smoothing, "backend": config.backend,
                            "ignore_index": IGNORE_INDEX}
        self.fn = self.loss_sum
        self._maybe_compile(compile_config)

    def loss_sum(self, pred: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, RowStats | None]:
        """The loss summed over this rank's tokens (fp32) and, with metrics, the per-token stats."""
        kwargs = dict(self.loss_kwargs, reduction="sum", return_stats=self.with_metrics)
        with float32_loss(pred):
            if isinstance(pred, DTensor):  # torch's layout, classes in dim 1; the DTensor path of cross_entropy
                out = api.cross_entropy(pred.movedim(-1, 1), labels, **kwargs)
                if not isinstance(labels, DTensor):  # as torchtitan's loss: plain labels, a plain local sum
                    out = _to_local(out)
            elif get_spmd_backend() == "spmd_types" and spmd_mesh_size("tp") > 1:
                with spmd.no_typecheck():
                    out = vocab_parallel_cross_entropy(pred, labels, group=current_spmd_mesh().get_group("tp"),
                                                       **kwargs)
            else:
                out = api.cross_entropy(pred.flatten(0, -2), labels.flatten(), **kwargs)
        return out if self.with_metrics else (out, None)

    def __call__(
        self, pred: torch.Tensor, labels: torch.Tensor, global_valid_tokens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """pred: logits (B, L, V) in one of the three forms; labels: (B, L) int64, -100 ignored.
        Returns (fp32 loss sum / global_valid_tokens, metrics). Other keyword inputs are ignored."""
        del kwargs
        loss, stats = self.fn(pred, labels)
        return _finish(loss, stats, labels, self.reward.k, global_valid_tokens)


def _to_local(out: Any) -> Any:
    if isinstance(out, tuple):
        return out[0].to_local(), RowStats(*(s.to_local() for s in out[1]))
    return out.to_local()


def _finish(loss: torch.Tensor, stats: RowStats | None, labels: torch.Tensor, k: int,
            global_valid_tokens: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    metrics = _metrics(stats, labels, k, global_valid_tokens) if stats is not None else {}
    if global_valid_tokens is not None:
        # As BaseLoss: under spmd_types type checking, a partial sum over dp/cp divided stays partial.
        checking = spmd.is_type_checking()
        with spmd.no_typecheck():
            loss = loss / global_valid_tokens
        if checking:
            spmd.assert_type(loss, {"dp": spmd.P, "cp": spmd.P, "tp": spmd.I})
    return loss, metrics


class PrecisionFusedLoss(ChunkedLossWrapper):
    """``ChunkedLossWrapper``'s role (hidden states in, ``set_lm_head`` wiring, ``_skip_lm_head``
    in the trainer) with one fused ``linear_cross_entropy`` call instead of chunked logits.

    pred: hidden states (B, L, D); the output layer's weight (V, D) is used as it is held: plain, or
    sharded by FSDP2 (gathered by its hooks for the call). A tensor-parallel (vocabulary-sharded)
    output layer is not fused: use ``PrecisionLoss``, which takes its DTensor logits.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(PrecisionLoss.Config):
        chunk_size: int | None = None
        """Rows per chunk of the fused loss (None: its default)."""

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None) -> None:
        self.loss_fn = PrecisionLoss(config)  # the settings; compiled on its own, as ChunkedLossWrapper's
        self.chunk_size = config.chunk_size
        self.num_chunks = 1
        self.lm_head: torch.nn.Module | None = None

    def __call__(
        self, pred: torch.Tensor, labels: torch.Tensor, global_valid_tokens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        del kwargs
        if self.lm_head is None:
            raise RuntimeError("PrecisionFusedLoss needs the output layer: call set_lm_head(model.lm_head) first "
                               "(torchtitan's trainer does, as for ChunkedLossWrapper)")
        inner = self.loss_fn
        options = (None if self.chunk_size is None
                   else torch.nn.LinearCrossEntropyOptions(batch_chunk_size=self.chunk_size))
        kwargs = dict(inner.loss_kwargs, reduction="sum", return_stats=inner.with_metrics, options=options)
        with float32_loss(pred):  # pred: the hidden states
            out = output_layer_loss(self.lm_head, pred.flatten(0, -2), labels.flatten(), **kwargs)
        loss, stats = out if inner.with_metrics else (out, None)
        return _finish(loss, stats, labels.flatten(), inner.reward.k, global_valid_tokens)


@override(target=CrossEntropyLoss.Config, description="precision-ce: the generalised next-token loss")
def precision_loss(config: CrossEntropyLoss.Config, **settings: Any) -> PrecisionLoss.Config:
    """``--override.imports 'precision_ce.integrations.torchtitan.precision_loss={"preset": "precision"}'``:
    every ``CrossEntropyLoss`` (also the one inside ``ChunkedLossWrapper``) becomes ``PrecisionLoss``."""
    del config
    return PrecisionLoss.Config(**settings)


@override(target=ChunkedLossWrapper.Config, exact=True, description="precision-ce: the fused generalised loss")
def precision_fused_loss(config: ChunkedLossWrapper.Config, **settings: Any) -> PrecisionFusedLoss.Config:
    """``--override.imports precision_ce.integrations.torchtitan.precision_fused_loss``: a
    ``ChunkedLossWrapper`` becomes ``PrecisionFusedLoss`` (settings as ``precision_loss``'s)."""
    del config
    return PrecisionFusedLoss.Config(**settings)
