"""precision_ce.hf against transformers' own causal-LM loss, on tiny random models (no Hub access).

At the cross-entropy setting the loss and every parameter gradient must equal the model's own
(unfused: bit for bit in fp32; fused: within fp32 rounding, the logits are summed in another
order). Shaped settings are checked against ``precision_ce.cross_entropy`` on the model's logits.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import cpu_peak_bytes

import precision_ce
from precision_ce import PRESETS, hf

VOCAB = 97
ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "gemma2")


def tiny_config(name: str, vocab: int = VOCAB, hidden: int = 32, layers: int = 1) -> transformers.PretrainedConfig:
    decoder = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2)
    if name == "llama":
        return transformers.LlamaConfig(**decoder)
    if name == "qwen2":
        return transformers.Qwen2Config(**decoder)
    if name == "mistral":
        return transformers.MistralConfig(**decoder)
    if name == "gemma2":  # final_logit_softcapping = 30 by default: the logits are transformed
        return transformers.Gemma2Config(**decoder, head_dim=hidden // 4, final_logit_softcapping=3.0,
                                         attn_implementation="eager")
    if name == "cohere":  # logits * logit_scale: a transform the fused path does not know
        return transformers.CohereConfig(**decoder, logit_scale=0.5)
    if name == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    raise ValueError(name)


def tiny_model(name: str, seed: int = 0, **config: object) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(name, **config))
    return model.eval()  # no dropout: two forwards must see the same network


def batch(rows: int = 3, seq: int = 10, seed: int = 1, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """input_ids and labels with padding (-100) at the ends of some rows."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (rows, seq), generator=generator)
    labels = input_ids.clone()
    labels[1, -3:] = -100
    labels[-1, :2] = -100
    return {"input_ids": input_ids, "labels": labels}


def loss_and_grads(model: torch.nn.Module, **inputs: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine OpenMP threads
    waiting for each other made a 20-step Trainer run take 5 to 50 s instead of under 1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_importing_precision_ce_does_not_import_transformers() -> None:
    code = "import sys, precision_ce; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("fused", [False, True])
def test_cross_entropy_setting_equals_model_loss(name: str, fused: bool) -> None:
    """Loss and every gradient: plain labels, num_items_in_batch, shift_labels."""
    model = tiny_model(name)
    inputs = batch()
    shift = F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].clone()
    shift[0, 4] = -100  # shift_labels need not be labels shifted: they are used as given
    cases = [inputs, {**inputs, "num_items_in_batch": torch.tensor(41)}, {**inputs, "shift_labels": shift}]
    wanted = [loss_and_grads(model, **case) for case in cases]

    hf.apply(model, fused=fused)
    assert isinstance(model.loss_function, hf.CausalLMLoss)
    assert (getattr(model, "_precision_ce", None) is not None) == fused
    for case, (want_loss, want_grads) in zip(cases, wanted, strict=True):
        got_loss, got_grads = loss_and_grads(model, **case)
        assert got_loss.dtype == torch.float32
        assert got_grads.keys() == want_grads.keys()
        if fused:
            torch.testing.assert_close(got_loss, want_loss)
            for key in want_grads:
                torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(got_loss, want_loss)
            for key in want_grads:
                assert torch.equal(got_grads[key], want_grads[key]), key


@pytest.mark.parametrize("fused", [False, True])
def test_shaped_loss_is_precision_ce_on_the_models_logits(fused: bool) -> None:
    model = tiny_model("gemma2")  # soft-capped logits: the fused path passes softcap= on
    inputs = batch()
    config = precision_ce.preset("tail_penalty", k=5)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"]).logits
    target = F.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
    want = precision_ce.cross_entropy(logits.reshape(-1, VOCAB), target, config=config)
    hf.apply(model, config, fused=fused)
    output = model(**inputs)
    torch.testing.assert_close(output.loss, want)
    assert (output.logits is None) == fused  # a fused training forward never builds the logits
    with torch.no_grad():  # no autograd: the logits are built, the loss comes from them
        output = model(**inputs)
    assert output.logits is not None
    torch.testing.assert_close(output.loss, want)
    # Positional input_ids and tuple outputs take the same path: (loss, ...) without the logits.
    loss, *rest = model(inputs["input_ids"], labels=inputs["labels"], return_dict=False)
    torch.testing.assert_close(loss, want)
    assert all(not (isinstance(value, torch.Tensor) and value.shape[-1] == VOCAB) for value in rest) == fused


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_accumulation_is_exact(fused: bool) -> None:
    """4 micro-batches of 2 with the Trainer's num_items_in_batch == one batch of 8."""
    model = tiny_model("llama")
    hf.apply(model, PRESETS["precision"], fused=fused)
    inputs = batch(rows=8, seq=12, seed=3)
    items = (inputs["labels"][:, 1:] != -100).sum()
    whole_loss, whole_grads = loss_and_grads(model, **inputs, num_items_in_batch=items)
    model.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, 8, 2):
        part = {key: value[start:start + 2] for key, value in inputs.items()}
        loss = model(**part, num_items_in_batch=items)
        loss.loss.backward()
        total += loss.loss.detach()
    torch.testing.assert_close(total, whole_loss)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, whole_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_logit_scale_falls_back_to_unfused_with_a_warning() -> None:
    model = tiny_model("cohere")
    inputs = batch()
    want_loss, want_grads = loss_and_grads(model, **inputs)
    with pytest.warns(UserWarning, match="transforms the output layer's logits"):
        hf.apply(model)
    assert getattr(model, "_precision_ce", None) is None
    got_loss, got_grads = loss_and_grads(model, **inputs)
    assert torch.equal(got_loss, want_loss)
    assert all(torch.equal(got_grads[name], want_grads[name]) for name in want_grads)
    with pytest.raises(ValueError, match="fused=True is not possible for CohereForCausalLM"):
        hf.apply(model, fused=True)


def test_peft_lora() -> None:
    peft = pytest.importorskip("peft")  # part of the test extra; importorskip names it if missing
    base = tiny_model("llama")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora)
    inputs = batch()
    want_loss, want_grads = loss_and_grads(model, **inputs)
    assert want_grads and all("lora_" in name for name in want_grads)
    hf.apply(model)
    assert getattr(base, "_precision_ce", None) is not None  # fused: the output layer is plain
    got_loss, got_grads = loss_and_grads(model, **inputs)
    torch.testing.assert_close(got_loss, want_loss)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-7, msg=name)

    # LoRA on the output layer: its weight alone is not the layer, so the fused path must not be used.
    head_lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.warns(UserWarning, match="not a plain nn.Linear"):
        hf.apply(head_lora)
    assert getattr(hf.causal_lm_of(head_lora), "_precision_ce", None) is None


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_autocast(fused: bool) -> None:
    model = tiny_model("qwen2")
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(**inputs).loss  # transformers: bf16 logits, .float(), cross-entropy in fp32
    hf.apply(model, fused=fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(**inputs).loss
    assert got.dtype == want.dtype == torch.float32
    if fused:  # bf16 logits of a chunked matmul: the same up to bf16 rounding of the logits
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bf16_model_loss_is_fp32_without_a_logits_copy() -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    inputs = batch()
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"]).logits
        want = model(**inputs).loss  # transformers: logits.float(), then cross-entropy
    hf.apply(model, fused=False)
    with torch.no_grad():
        got = model(**inputs).loss
    assert got.dtype == torch.float32 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compute_loss_func_equals_model_loss() -> None:
    model = tiny_model("mistral")
    inputs = batch()
    with torch.no_grad():
        want = model(**inputs).loss
        outputs = model(input_ids=inputs["input_ids"])
    compute_loss = hf.compute_loss_func()
    assert torch.equal(compute_loss(outputs, inputs["labels"]), want)
    items = torch.tensor(17)
    with torch.no_grad():
        want_items = model(**inputs, num_items_in_batch=items).loss
    assert torch.equal(compute_loss(outputs, inputs["labels"], num_items_in_batch=items), want_items)


def test_auto_class_and_reapply() -> None:
    model = hf.AutoPrecisionCEForCausalLM.from_config(tiny_config("llama"), loss_config=PRESETS["diversity"])
    assert model.loss_function.config == PRESETS["diversity"]
    head = model.get_output_embeddings()
    assert "forward" in vars(head)  # the fused path's capture
    hf.apply(model, PRESETS["precision"], fused=False)  # replaces the setting, unwraps the forwards
    assert model.loss_function.config == PRESETS["precision"]
    assert "forward" not in vars(model) and getattr(model, "_precision_ce", None) is None
    assert "forward" not in vars(head) and "_precision_ce_capture" not in vars(head)
    hf.apply(model, fused=True)
    clone = copy.deepcopy(model)  # the wrapped forwards follow the copy, not the original
    assert clone.forward.__self__ is clone
    assert clone.get_output_embeddings().forward.__self__ is clone.get_output_embeddings()
    inputs = batch()
    torch.testing.assert_close(clone(**inputs).loss, model(**inputs).loss)


@pytest.mark.parametrize("fused", [False, True])
def test_torch_compile_of_the_model(fused: bool) -> None:
    """torch.compile(model, fullgraph=True): no graph break, the eager loss and gradients."""
    model = tiny_model("llama")
    hf.apply(model, PRESETS["precision"], fused=fused)
    inputs = batch()
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    want_loss, want_grads = loss_and_grads(model, **inputs)
    torch._dynamo.reset()
    got_loss, got_grads = loss_and_grads(torch.compile(model, fullgraph=True), **inputs)
    torch.testing.assert_close(got_loss, want_loss)
    assert [name.removeprefix("_orig_mod.") for name in got_grads] == list(want_grads)
    for got, want in zip(got_grads.values(), want_grads.values(), strict=True):
        torch.testing.assert_close(got, want)


def test_auto_class_from_pretrained(tmp_path) -> None:
    tiny_model("gpt2").save_pretrained(tmp_path)
    model = hf.AutoPrecisionCEForCausalLM.from_pretrained(tmp_path, loss_config=PRESETS["precision"],
                                                         loss_kwargs={"z_loss": 1e-4})
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert model.loss_function.config == PRESETS["precision"] and model.loss_function.loss_kwargs == {"z_loss": 1e-4}
    assert getattr(model, "_precision_ce", None) is not None  # GPT-2's tied output layer fuses


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="unknown loss argument"):
        hf.causal_lm_loss(temperature=2.0)
    with pytest.raises(ValueError, match="beta must be > -1"):
        hf.causal_lm_loss(beta=-1.0)
    with pytest.raises(ValueError, match="either config= or"):
        hf.causal_lm_loss(PRESETS["precision"], beta=0.5)
    with pytest.raises(ValueError, match="fused must be"):
        hf.apply(tiny_model("llama"), fused="yes")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.apply(torch.nn.Linear(2, 2))


def _trainer(model, tmp_path, callbacks=(), max_steps=20, **args):
    """A short Trainer run on a learnable language: each row counts up from a random start."""
    starts = torch.randint(0, VOCAB, (64, 1), generator=torch.Generator().manual_seed(0))
    rows = (starts + torch.arange(16)) % VOCAB
    data = [{"input_ids": row, "labels": row} for row in rows]
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, **args,
    )
    return transformers.Trainer(model=model, args=arguments, train_dataset=data, callbacks=list(callbacks))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_trainer_run_lowers_the_loss(name: str, tmp_path) -> None:
    model = tiny_model("llama", hidden=32).train()
    hf.apply(model, PRESETS[name], log_stats=True)
    trainer = _trainer(model, tmp_path, callbacks=[hf.PrecisionCECallback()], gradient_accumulation_steps=2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["loss"] < 0.9 * logs[0]["loss"], logs
    for key in hf.STATS_KEYS:
        assert all(key in entry for entry in logs), key
    assert logs[-1]["precision_ce/entropy"] < logs[0]["precision_ce/entropy"]  # it learns the language
    assert 0.0 <= logs[-1]["precision_ce/target_in_top_k"] <= 1.0


def test_trainer_bf16_mixed_precision(tmp_path) -> None:
    """TrainingArguments(bf16=True): accelerate wraps the (fused) forward in autocast."""
    model = hf.apply(tiny_model("llama").train(), PRESETS["precision"])
    trainer = _trainer(model, tmp_path, bf16=True)
    trainer.train()
    assert model._precision_ce is not None
    logs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1] < 0.9 * logs[0], logs


def test_callback_refuses_label_smoothing(tmp_path) -> None:
    model = hf.apply(tiny_model("llama"), fused=False)
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0.1.*label_smoothing="):
        _trainer(model, tmp_path, callbacks=[hf.PrecisionCECallback()], label_smoothing_factor=0.1)


def training_step_peak_bytes(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """Peak CPU bytes allocated during forward + backward (torch.profiler allocator events)."""
    model.zero_grad(set_to_none=True)
    return cpu_peak_bytes(lambda: model(**inputs).loss.backward())


def test_fused_step_peak_memory_is_under_0_3x_the_models_own() -> None:
    """Tiny Llama (2 layers, hidden 64, V 32000), batch 8 x 512: one training step's peak, fused
    vs the model's own loss, measured in the same run (about 1.5 GiB and 10 s on one thread)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    inputs = batch(rows=8, seq=512, seed=0, vocab=32000)
    own = training_step_peak_bytes(model, inputs)
    hf.apply(model, PRESETS["precision"], fused=False)
    unfused = training_step_peak_bytes(model, inputs)
    hf.apply(model, PRESETS["precision"], fused=True)
    fused = training_step_peak_bytes(model, inputs)
    print(f"\npeak of one training step: model's own loss {own / 2**20:.1f} MiB, precision_ce.hf unfused "
          f"{unfused / 2**20:.1f} MiB ({unfused / own:.3f}x), fused {fused / 2**20:.1f} MiB ({fused / own:.3f}x)")
    assert fused <= 0.3 * own
    assert unfused < own  # the loss keeps per-row numbers for its backward, not the softmax
