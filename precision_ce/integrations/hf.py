"""Hugging Face transformers integration: one call trains any causal LM with the generalised loss.

    model = AutoModelForCausalLM.from_pretrained(...)
    precision_ce.hf.apply(model, precision_ce.PRESETS["precision"])   # PEFT-wrapped models too
    Trainer(model=model, ..., callbacks=[precision_ce.hf.PrecisionCECallback()]).train()

How it plugs in. Every causal LM of transformers computes ``logits = lm_head(hidden)``, maybe
transforms them (Gemma 2's final soft-cap), and calls ``self.loss_function(logits, labels,
vocab_size, **kwargs)``. ``apply`` sets ``loss_function`` on the model instance (its
``loss_type`` stays, so the Trainer still counts ``num_items_in_batch`` over the shifted labels),
then checks with one tiny forward that the model calls it. The fused path (``fused=``) also needs
the output layer's input: it wraps the instance's ``forward`` so that, in a forward with labels and
autograd on, the output layer returns a shape-only meta tensor instead of the logits, keeps its
input (the final hidden states) and the loss is ``precision_ce.linear_cross_entropy`` of those and
the output layer's weight. The same tiny forward decides whether that is exact: the output layer
must be a plain ``nn.Linear`` called once, and the model's logits must be its output, or its output
soft-capped by ``config.final_logit_softcapping`` (passed on as ``softcap=``). Anything else (logit
scales, adapters on the output layer) warns once and keeps the unfused path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import precision_ce

from .. import api
from ..config import RewardConfig
from . import float32_loss

try:
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedModel, TrainerCallback
    from transformers.loss.loss_utils import ForCausalLMLoss
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        f"precision_ce.hf needs transformers ({error}); install it with: pip install 'precision-ce[hf]'"
    ) from error

Fused = Literal["auto"] | bool
LOSS_ARGUMENTS: frozenset[str] = frozenset(
    {"beta", "k", "lambda_head", "lambda_tail", "positive_reward", "label_smoothing", "z_loss", "softcap", "backend"}
)
"""Keywords of ``precision_ce.cross_entropy`` that ``causal_lm_loss`` / ``apply`` pass on."""
STATS_KEYS: tuple[str, ...] = ("precision_ce/entropy", "precision_ce/top_k_mass", "precision_ce/target_in_top_k")
"""What ``log_stats=True`` adds to the Trainer's logs: means over the target tokens of the training
batches since the last log (entropy in nats, probability mass of the top-k, share of targets in it)."""


# ---------------------------------------------------------------------------------------------
# The loss function
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _StatsSum:
    """Running sums of the per-token diagnostics over target tokens (on the loss's device)."""

    entropy: torch.Tensor | float = 0.0
    top_k_mass: torch.Tensor | float = 0.0
    target_in_top_k: torch.Tensor | float = 0.0
    tokens: torch.Tensor | float = 0.0


class CausalLMLoss:
    """``transformers.loss.loss_utils.ForCausalLMLoss`` with the generalised reward.

    Same call and semantics: ``(logits, labels, vocab_size, num_items_in_batch=None,
    ignore_index=-100, shift_labels=None, **kwargs)``; labels are shifted left by one unless
    ``shift_labels`` is given; the loss is the mean over target tokens, or their sum divided by
    ``num_items_in_batch`` (gradient accumulation). 16-bit logits are read in place (no fp32 copy)
    and computed in fp32; the loss is fp32. Build it with ``causal_lm_loss``.
    """

    def __init__(self, config: RewardConfig | None, log_stats: bool, loss_kwargs: dict[str, Any]) -> None:
        unknown = sorted(set(loss_kwargs) - LOSS_ARGUMENTS)
        if unknown:
            raise TypeError(f"unknown loss argument(s) {unknown}; the loss takes config= and {sorted(LOSS_ARGUMENTS)}")
        reward_fields = {name: loss_kwargs[name] for name in api._DEFAULT_REWARD.__dataclass_fields__
                         if name in loss_kwargs}
        self.config = api._reward_config(config, **reward_fields)
        self.loss_kwargs = {name: value for name, value in loss_kwargs.items() if name not in reward_fields}
        api._loss_params(self.config, -100, self.loss_kwargs.get("label_smoothing", 0.0),
                         self.loss_kwargs.get("z_loss", 0.0), self.loss_kwargs.get("softcap"))
        self.log_stats = log_stats
        self._stats = _StatsSum()

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """logits: (batch, seq, V) any float dtype; labels: (batch, seq) int. Returns a scalar fp32 loss."""
        target = _targets(labels, ignore_index, shift_labels).to(logits.device)
        return self._reduce(precision_ce.cross_entropy, (logits.reshape(-1, vocab_size), target),
                            num_items_in_batch, ignore_index, {})

    def fused(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """The same loss from the output layer's input: hidden (batch, seq, H), weight (V, H), bias (V,)."""
        target = _targets(labels, ignore_index, shift_labels).to(hidden.device)
        extra = {"linear_bias": bias} if softcap is None else {"linear_bias": bias, "softcap": softcap}
        return self._reduce(precision_ce.linear_cross_entropy, (hidden.reshape(-1, hidden.shape[-1]), weight, target),
                            num_items_in_batch, ignore_index, extra)

    def _reduce(
        self, loss_fn: Callable[..., Any], tensors: tuple[torch.Tensor, ...],
        num_items_in_batch: torch.Tensor | int | None, ignore_index: int, extra: dict[str, Any],
    ) -> torch.Tensor:
        """loss_fn(*tensors, ...) (tensors: input first, flat targets last), normalised as transformers does."""
        input, target = tensors[0], tensors[-1]
        reduction = "mean" if num_items_in_batch is None else "sum"
        with_stats = self.log_stats and torch.is_grad_enabled()
        with float32_loss(input):
            result = loss_fn(*tensors, ignore_index=ignore_index, reduction=reduction, config=self.config,
                             return_stats=with_stats, **self.loss_kwargs, **extra)
        loss, stats = result if with_stats else (result, None)
        if stats is not None:
            self._add_stats(stats, target != ignore_index)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    def _add_stats(self, stats: precision_ce.RowStats, valid: torch.Tensor) -> None:
        valid_f = valid.float()
        in_top_k = ((stats.target_rank >= 1) & (stats.target_rank <= self.config.k)).float()
        s = self._stats
        s.entropy = s.entropy + (stats.entropy * valid_f).sum()
        s.top_k_mass = s.top_k_mass + (stats.topk_mass * valid_f).sum()
        s.target_in_top_k = s.target_in_top_k + (in_top_k * valid_f).sum()
        s.tokens = s.tokens + valid_f.sum()

    def pop_stats(self) -> dict[str, float]:
        """Means since the last call (``STATS_KEYS``), then reset; {} when no target token was seen."""
        s, self._stats = self._stats, _StatsSum()
        tokens = float(s.tokens)
        if tokens == 0.0:
            return {}
        values = (s.entropy, s.top_k_mass, s.target_in_top_k)
        return {key: float(value) / tokens for key, value in zip(STATS_KEYS, values, strict=True)}

    def __repr__(self) -> str:
        return f"CausalLMLoss(config={self.config}, loss_kwargs={self.loss_kwargs}, log_stats={self.log_stats})"


def causal_lm_loss(config: RewardConfig | None = None, *, log_stats: bool = False, **loss_kwargs: Any) -> CausalLMLoss:
    """A drop-in for transformers' ``ForCausalLMLoss`` with the generalised reward.

    config: a ``RewardConfig`` (e.g. ``precision_ce.PRESETS["precision"]``), or the reward fields
    as keywords; loss_kwargs: also ``label_smoothing``, ``z_loss``, ``softcap``, ``backend`` as in
    ``precision_ce.cross_entropy``. Set it with ``model.loss_function = causal_lm_loss(...)``, or
    let ``apply`` do that and check it.
    """
    return CausalLMLoss(config, log_stats, loss_kwargs)


def _targets(labels: torch.Tensor | None, ignore_index: int, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """Flat targets: ``shift_labels``, or labels shifted left by one with ``ignore_index`` appended."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("the causal-LM loss needs labels (batch, seq) or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


# ---------------------------------------------------------------------------------------------
# apply: the loss on a model instance, fused where exact
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Attached:
    """What ``apply`` keeps on the model (``model._precision_ce``)."""

    loss: CausalLMLoss
    original_forward: Callable[..., Any]
    head: nn.Linear | None  # the output layer when the fused path is on, else None
    softcap: float | None  # the model's final logit soft-cap, applied by the fused loss


def apply(
    model: nn.Module,
    config: RewardConfig | None = None,
    *,
    fused: Fused = "auto",
    log_stats: bool = False,
    **loss_kwargs: Any,
) -> nn.Module:
    """Train ``model`` (a transformers causal LM, or a PEFT model around one) with the generalised loss.

    config / loss_kwargs: as in ``causal_lm_loss``. fused: "auto" uses
    ``precision_ce.linear_cross_entropy`` (no logits in training forwards with labels) where it
    is exact for this model, else the unfused loss with a one-line warning; True requires it
    (raises otherwise); False never. log_stats: keep the batch diagnostics for ``PrecisionCECallback``.
    Calling it again replaces the previous setting. Returns ``model``.
    """
    if fused not in ("auto", True, False):
        raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
    lm = causal_lm_of(model)
    loss = causal_lm_loss(config, log_stats=log_stats, **loss_kwargs)
    previous = getattr(lm, "_precision_ce", None)
    if previous is not None:  # undo the last apply: the forwards it wrapped, as they were
        _remove_head_capture(previous.head)
        del lm.forward, lm._precision_ce
        if getattr(previous.original_forward, "__func__", None) is not type(lm).forward:
            lm.forward = previous.original_forward
    current = lm.loss_function
    if current is not ForCausalLMLoss and not isinstance(current, CausalLMLoss):
        raise ValueError(
            f"{type(lm).__name__}'s loss_function is {getattr(current, '__name__', current)!r}, not "
            "transformers' ForCausalLMLoss; apply() only replaces the causal-LM loss"
        )
    lm.loss_function = loss
    probe = _probe(lm, loss)
    if not probe.calls_loss:
        raise ValueError(
            f"{type(lm).__name__} computes its loss without calling self.loss_function, so apply() "
            "cannot replace it; compute the loss from the logits with causal_lm_loss(...) instead"
        )
    head, softcap = None, None
    if fused is not False:
        reason = _fused_blocker(lm, probe, loss)
        if reason is None:
            head, softcap = probe.head, probe.softcap
        elif fused is True:
            raise ValueError(f"fused=True is not possible for {type(lm).__name__}: {reason}")
        else:
            warnings.warn(f"precision_ce.hf: {type(lm).__name__} uses the unfused loss: {reason}", stacklevel=2)
    if head is not None:
        lm._precision_ce = _Attached(loss, lm.forward, head, softcap)
        _wrap_forward(lm)
        _install_head_capture(head)
    return model


def causal_lm_of(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside ``model`` (itself, or the one a PEFT or other wrapper holds)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if module.get_output_embeddings() is None:
                raise ValueError(f"{type(module).__name__} has no output layer (get_output_embeddings() is None); "
                                 "apply() needs a causal LM such as AutoModelForCausalLM gives")
            return module
    raise TypeError(f"expected a transformers PreTrainedModel (or a PEFT model around one), got {type(model).__name__}")


@dataclasses.dataclass
class _Probe:
    calls_loss: bool
    head: nn.Module
    head_calls: int
    head_input: torch.Tensor | None
    head_output: torch.Tensor | None
    logits: torch.Tensor | None
    softcap: float | None = None
    meta_error: str | None = None


@contextlib.contextmanager
def _eval_no_grad(lm: nn.Module) -> Iterator[None]:
    """Deterministic forward (no dropout), each module's own train/eval flag restored after."""
    modes = [(module, module.training) for module in lm.modules()]
    lm.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _probe(lm: PreTrainedModel, loss: CausalLMLoss) -> _Probe:
    """One forward of a few tokens: is ``loss_function`` called, and how do the logits arise from
    the output layer? Also runs the fused path's capture once, so a model it cannot handle is
    found here rather than in training."""
    head = lm.get_output_embeddings()
    embeddings = lm.get_input_embeddings()
    device = embeddings.weight.device if embeddings is not None else next(lm.parameters()).device
    tokens = torch.arange(4, device=device)[None] % lm.config.get_text_config().vocab_size
    calls = {"loss": 0}
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def counting_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["loss"] += 1
        return loss(*args, **kwargs)

    def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            seen.append((inputs[0], output))

    lm.loss_function = counting_loss
    hook = head.register_forward_hook(record)
    try:
        with _eval_no_grad(lm):
            output = lm(input_ids=tokens, labels=tokens)
    finally:
        hook.remove()
        lm.loss_function = loss
    logits = output["logits"] if isinstance(output, dict) else output[1]
    h, z = seen[0] if seen else (None, None)
    probe = _Probe(calls["loss"] == 1, head, len(seen), h, z, logits)
    if isinstance(head, nn.Linear):
        try:
            with _eval_no_grad(lm), _capture_head_input(head) as captured:
                lm(input_ids=tokens)
            if captured.hidden is None:
                probe.meta_error = "the output layer was not called"
        except Exception as error:  # any failure means: not fusable; say why
            probe.meta_error = f"{type(error).__name__}: {error}"
    return probe


def _fused_blocker(lm: PreTrainedModel, probe: _Probe, loss: CausalLMLoss) -> str | None:
    """Why the fused loss would not equal the model's own for ``lm``, or None (and set probe.softcap)."""
    head = probe.head
    if type(head).forward is not nn.Linear.forward or not isinstance(head, nn.Linear):
        return f"the output layer is a {type(head).__name__}, not a plain nn.Linear"
    if getattr(head, "_hf_hook", None) is not None or "forward" in vars(head):
        return "the output layer's forward is replaced on the instance (e.g. an accelerate device-map hook)"
    if probe.head_calls != 1 or probe.head_input is None:
        return f"the output layer was called {probe.head_calls} times in one forward, not once"
    if probe.meta_error is not None:
        return f"the forward fails when the output layer returns no logits ({probe.meta_error})"
    z, logits = probe.head_output, probe.logits
    if not torch.equal(z, F.linear(probe.head_input, head.weight, head.bias)):
        return "the output layer does not compute F.linear(hidden, weight, bias)"
    if logits is None or logits.shape != z.shape:
        return "the model's logits are not the output layer's output"
    if torch.equal(logits, z):
        return None
    cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    if cap is not None and torch.allclose(logits, cap * torch.tanh(z / cap), rtol=1e-5, atol=1e-5):
        if loss.loss_kwargs.get("softcap") is not None:
            return f"the model soft-caps its logits (final_logit_softcapping={cap}) and softcap= was passed too"
        probe.softcap = float(cap)
        return None
    return "the model transforms the output layer's logits (e.g. a logit scale) in a way the fused loss does not know"


@dataclasses.dataclass
class _Captured:
    hidden: torch.Tensor | None = None


_CAPTURE = "_precision_ce_capture"
"""The output layer's attribute that holds the active ``_Captured`` (None outside a capture)."""


def _head_forward(self: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer's forward while ``apply``'s fused path is on: its own, or, inside
    ``_capture_head_input``, keep ``hidden`` and return a meta tensor of the logits' shape."""
    captured = getattr(self, _CAPTURE)
    if captured is None:
        return type(self).forward(self, hidden)
    captured.hidden = hidden
    # promote_types on the dtypes, not result_type on the tensors: Dynamo folds it (no graph break).
    device = hidden.device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else torch.promote_types(hidden.dtype, self.weight.dtype))
    return torch.empty((*hidden.shape[:-1], self.out_features), dtype=dtype, device="meta")


def _install_head_capture(head: nn.Linear) -> None:
    # A method bound to the head: copy.deepcopy(model) rebinds it to the copy's head.
    head.forward = types.MethodType(_head_forward, head)
    setattr(head, _CAPTURE, None)


def _remove_head_capture(head: nn.Linear) -> None:
    del head.forward
    delattr(head, _CAPTURE)


@contextlib.contextmanager
def _capture_head_input(head: nn.Linear) -> Iterator[_Captured]:
    """While active, ``head(x)`` keeps ``x`` and returns a meta tensor of the logits' shape: the
    model's code after the output layer runs on shapes only, and no logits are allocated.

    ``apply`` installs ``_head_forward`` on a fused head once, so that a capture inside a
    torch.compile'd forward only sets an attribute (Dynamo does not replay a forward set and
    deleted within one trace). The probe, on any head and eagerly, installs it for its duration
    and puts back an instance-level forward (a hook's) afterwards.
    """
    probing = _CAPTURE not in vars(head)
    own_forward = vars(head).get("forward") if probing else None
    if probing:
        _install_head_capture(head)
    captured = _Captured()
    setattr(head, _CAPTURE, captured)
    try:
        yield captured
    finally:
        setattr(head, _CAPTURE, None)
        if probing:
            _remove_head_capture(head)
            if own_forward is not None:
                head.forward = own_forward


def _fused_forward(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
    """The model's forward; with labels and autograd on, the loss without the logits (logits=None)."""
    attached: _Attached = self._precision_ce
    if args:  # model(input_ids, ...): name them, to find and replace the labels
        names = [p.name for p in inspect.signature(attached.original_forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
    labels = kwargs.get("labels")
    if labels is None or not torch.is_grad_enabled():
        return attached.original_forward(**kwargs)
    kwargs["labels"] = None
    with _capture_head_input(attached.head) as captured:
        output = attached.original_forward(**kwargs)
    if captured.hidden is None:
        raise RuntimeError(f"{type(self).__name__}'s forward did not call its output layer; "
                           "use precision_ce.hf.apply(model, ..., fused=False)")
    loss = attached.loss.fused(
        captured.hidden, attached.head.weight, attached.head.bias, labels,
        num_items_in_batch=kwargs.get("num_items_in_batch"), ignore_index=kwargs.get("ignore_index", -100),
        shift_labels=kwargs.get("shift_labels"), softcap=attached.softcap,
    )
    if isinstance(output, transformers.utils.ModelOutput):
        fields = {name: value for name, value in output.items() if name not in ("loss", "logits")}
        return type(output)(loss=loss, **fields)
    return (loss, *output[1:])  # return_dict=False: (logits, ...) becomes (loss, ...), logits dropped


def _wrap_forward(lm: PreTrainedModel) -> None:
    """Put ``_fused_forward`` on the instance with the original's signature (the Trainer reads it
    to pick dataset columns and to pass ``num_items_in_batch``). The function holds no reference
    to ``lm``, so ``copy.deepcopy(model)`` rebinds it to the copy."""
    original = lm._precision_ce.original_forward

    def forward(self: PreTrainedModel, *args: Any, **kwargs: Any) -> Any:
        return _fused_forward(self, *args, **kwargs)

    functools.update_wrapper(forward, getattr(original, "__func__", original))
    lm.forward = types.MethodType(forward, lm)


# ---------------------------------------------------------------------------------------------
# Trainer glue
# ---------------------------------------------------------------------------------------------


def compute_loss_func(config: RewardConfig | None = None, **loss_kwargs: Any) -> Callable[..., torch.Tensor]:
    """For ``Trainer(compute_loss_func=...)``: the loss from the model's outputs and the labels.

    The Trainer then calls the model without labels (the logits are built) and this function with
    ``(outputs, labels, num_items_in_batch)``. ``apply`` on the model is the leaner way.
    """
    loss = causal_lm_loss(config, **loss_kwargs)

    def compute_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
                     ) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return loss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)

    return compute_loss


class AutoPrecisionCEForCausalLM:
    """``AutoModelForCausalLM`` whose models come with ``apply`` already done.

    ``AutoPrecisionCEForCausalLM.from_pretrained(name, loss_config=PRESETS["precision"], **kwargs)``;
    ``fused``, ``log_stats`` and ``loss_kwargs`` (a dict) go to ``apply``, the rest to transformers.
    """

    @classmethod
    def from_pretrained(cls, *args: Any, loss_config: RewardConfig | None = None, fused: Fused = "auto",
                        log_stats: bool = False, loss_kwargs: dict[str, Any] | None = None, **kwargs: Any
                        ) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(*args, **kwargs)
        return apply(model, loss_config, fused=fused, log_stats=log_stats, **(loss_kwargs or {}))

    @classmethod
    def from_config(cls, *args: Any, loss_config: RewardConfig | None = None, fused: Fused = "auto",
                    log_stats: bool = False, loss_kwargs: dict[str, Any] | None = None, **kwargs: Any
                    ) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_config(*args, **kwargs)
        return apply(model, loss_config, fused=fused, log_stats=log_stats, **(loss_kwargs or {}))


class PrecisionCECallback(TrainerCallback):
    """Refuses ``label_smoothing_factor > 0`` (the Trainer would skip the model's loss for its own
    label smoother) and adds ``STATS_KEYS`` to the logs of a model applied with ``log_stats=True``."""

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.label_smoothing_factor > 0:
            raise ValueError(
                f"TrainingArguments(label_smoothing_factor={args.label_smoothing_factor}) makes the Trainer "
                "replace the model's loss with its own label smoother, silently dropping the generalised "
                "loss; set it to 0 and pass label_smoothing= to precision_ce.hf.apply instead"
            )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               model: nn.Module | None = None, **kwargs: Any) -> None:
        if logs is None or model is None or "loss" not in logs:
            return
        loss = causal_lm_of(model).loss_function
        if not isinstance(loss, CausalLMLoss) or not loss.log_stats:
            return
        stats = {key: round(value, 4) for key, value in loss.pop_stats().items()}
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)


__all__ = [
    "LOSS_ARGUMENTS",
    "STATS_KEYS",
    "AutoPrecisionCEForCausalLM",
    "CausalLMLoss",
    "PrecisionCECallback",
    "apply",
    "causal_lm_loss",
    "causal_lm_of",
    "compute_loss_func",
]
