"""QLoRA bases: Flat-LoRA on PEFT's bitsandbytes LoRA layers (4-bit NF4 / FP4, with and without double
quantization, and 8-bit), in forward mode. The layer computes with the dequantized W + eps, the row std comes
from the dequantized W + sBA, eps is regenerated in backward, the packed weight is never written, and in-place
mode refuses. Every case runs on CPU (bitsandbytes' CPU backend) and again, marked gpu, on CUDA:

    pytest -q -m gpu tests/core/test_quantized.py        # the CUDA cases only (skipped without CUDA)
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from flatlora import FlatLoRA, FlatLoRAConfig  # noqa: E402

KINDS = ["nf4", "fp4", "nf4-dq", "fp4-dq", "int8"]
SIGMA = 0.1


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    return request.param


def autocast(device: str):
    """The usual QLoRA compute on a GPU (bf16 autocast, as the Trainer's bf16=True); none on CPU."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")


# ------------------------------------------------------------------------------------------- models
def quantized_linear(kind: str, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                     compute_dtype: torch.dtype | None) -> nn.Module:
    """A bitsandbytes layer holding `w` (quantized when moved to a device), as transformers builds them."""
    d_out, d_in = w.shape
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(d_in, d_out, bias=bias is not None, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(w.to(dtype), requires_grad=False, has_fp16_weights=False)
    else:
        quant, nested = kind[:3], kind.endswith("-dq")
        layer = bnb.nn.Linear4bit(d_in, d_out, bias=bias is not None, compute_dtype=compute_dtype, quant_type=quant,
                                  compress_statistics=nested)
        layer.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type=quant, compress_statistics=nested)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return layer


class QNet(nn.Module):
    """Two quantized layers and a dense head. `is_loaded_in_*bit` is what transformers sets on a quantized
    model: it makes PEFT wrap the layers in its bitsandbytes LoRA classes (lora.bnb.Linear4bit / Linear8bitLt)."""

    def __init__(self, kind: str, dtype: torch.dtype, compute_dtype: torch.dtype | None, d_in=64, d_h=48, d_out=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.is_loaded_in_8bit = kind == "int8"
        self.is_loaded_in_4bit = kind != "int8"
        w0, b0, w1 = torch.randn(d_h, d_in, generator=g) * 0.1, torch.randn(d_h, generator=g) * 0.1, torch.randn(d_h, d_h, generator=g) * 0.1
        self.q0 = quantized_linear(kind, w0, b0, dtype, compute_dtype)
        self.q1 = quantized_linear(kind, w1, None, dtype, compute_dtype)
        self.head = nn.Linear(d_h, d_out).to(dtype)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(d_out, d_h, generator=g) * 0.1)

    def forward(self, x):
        h = torch.tanh(self.q1(torch.tanh(self.q0(x))))
        return self.head(h.to(self.head.weight.dtype))


def make_qnet(kind: str, device: str, dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype | None = "same"):
    """PEFT LoRA (r=4, nonzero B) on both quantized layers, stored in `dtype` (4-bit: computing in `compute_dtype`,
    by default `dtype`; None lets the layer pick it from its first input); deterministic, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        model = QNet(kind, dtype, dtype if compute_dtype == "same" else compute_dtype).to(device)  # quantizes
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q0", "q1"],
                                                        init_lora_weights=False))
    return randomize_adapters(pm, 0.1)


def randomize_adapters(pm, scale: float):
    """Every trainable tensor ~ N(0, scale^2) from a fixed generator (LoRA B starts at zero otherwise)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return pm


def inputs(device: str, dtype: torch.dtype, rows: int = 5, d_in: int = 64, seed: int = 2):
    return (torch.randn(rows, d_in, generator=torch.Generator().manual_seed(seed)) * 2).to(device, dtype)


def packed(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Bytes of every quantized weight and the statistics that define it (4-bit: absmax, code, nested
    state; 8-bit: the row scales, wherever the layer keeps them)."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue  # (PEFT's LoRA wrappers show their base's weight too)
        w = mod.weight
        if type(w).__name__ == "Params4bit":
            qs = w.quant_state
            parts = [w.data, qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
        elif type(w).__name__ == "Int8Params":
            scb = mod.state.SCB if mod.state.SCB is not None else w.SCB
            parts = [w.data, scb]
        else:
            raise AssertionError(f"{name}: unexpected weight {type(w).__name__}")
        out[name] = [t.detach().reshape(-1).contiguous().view(torch.uint8).clone() for t in parts]
    assert out, "no quantized weight found"
    return out


def assert_same_bytes(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])), f"{k}: packed bytes changed"


def adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def dequantized(t) -> torch.Tensor:
    """The dense W of a target through PEFT's own accessor, independent of the engine's code path."""
    from peft.utils.integrations import dequantize_bnb_weight

    base = t.lora.get_base_layer()
    return dequantize_bnb_weight(base.weight, state=getattr(base, "state", None))


# ------------------------------------------------------------------------------------------- the engine
@pytest.mark.parametrize("kind", KINDS)
def test_auto_picks_forward_and_inplace_refuses_saying_why(device, kind, caplog):
    pm = make_qnet(kind, device)
    with caplog.at_level("INFO", logger="flatlora"):
        flat = FlatLoRA(pm, FlatLoRAConfig(sigma=SIGMA, total_steps=2))
    assert flat.mode == "forward"
    assert len(flat.targets) == 2 and all(t.quantized for t in flat.targets)
    lora_cls = "Linear8bitLt" if kind == "int8" else "Linear4bit"
    assert all(type(t.lora).__name__ == lora_cls and type(t.lora).__module__ == "peft.tuners.lora.bnb" for t in flat.targets)
    name = "bitsandbytes 8-bit" if kind == "int8" else f"bitsandbytes 4-bit {kind[:3]}" + (" (double quant)" if "dq" in kind else "")
    assert "mode=auto -> forward" in caplog.text and name in caplog.text
    if device == "cuda":  # the dequantized weight is what the Triton kernels see
        assert set(flat.backends().values()) == {"triton"}
    flat.close()
    with pytest.raises(ValueError) as e:
        FlatLoRA(pm, FlatLoRAConfig(sigma=SIGMA, total_steps=2, mode="inplace"))
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "re-quantize" in msg and "mode='forward'" in msg


@pytest.mark.parametrize("kind", KINDS)
def test_row_std_is_that_of_the_dequantized_w_plus_sba(device, kind):
    pm = make_qnet(kind, device)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=SIGMA, schedule="constant"))
    x = inputs(device, torch.bfloat16)
    with flat.step(4):
        pm(x).float().pow(2).mean().backward()  # quantized layers draw at their first forward of the window
        for t in flat.targets:
            lora = t.lora
            ba = lora.scaling["default"] * lora.lora_B["default"].weight.float() @ lora.lora_A["default"].weight.float()
            merged = dequantized(t).float() + ba
            expected = SIGMA * merged.norm(dim=1) / math.sqrt(t.n)
            torch.testing.assert_close(flat.row_std(t.name, 4), expected, rtol=1e-4, atol=1e-7)
            # ... and not the std of the dequantized W alone (B is nonzero): the test sees the sBA term.
            assert not torch.allclose(expected, SIGMA * dequantized(t).float().norm(dim=1) / math.sqrt(t.n), rtol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_opening_a_window_dequantizes_nothing(device, kind):
    """The draw waits for each layer's first forward: opening a window never holds every layer dense at once."""
    pm = make_qnet(kind, device)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=SIGMA, schedule="constant"))
    calls = []
    for t in flat.targets:
        inner = t.dequantize
        t.dequantize = lambda inner=inner, name=t.name: calls.append(name) or inner()
    with flat.step(0):
        assert calls == []
        pm(inputs(device, torch.bfloat16)).float().sum().backward()
    # Forward: each layer draws and computes from one dequantization. Backward: q1 regenerates W + eps for the
    # gradient of its input; q0's input (the data) needs none, so it is not dequantized again.
    q0, q1 = (t.name for t in flat.targets)
    assert sorted(calls) == sorted([q0, q1, q1])


@pytest.mark.parametrize("compute", ["bf16", "unset"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["x32", "xbf16", "x16"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_window_computes_in_the_dtypes_of_the_layers_own_forward(device, kind, x_dtype, compute, monkeypatch):
    """With noise far below every rounding step, the noisy layer returns what the layer's own forward returns, in
    its dtype; it multiplies in the layer's compute dtype (4-bit: `compute_dtype`, which bitsandbytes fixes from
    the first input when unset; 8-bit: the input's) and leaves the layer's compute dtype as its own forward would."""
    compute_dtype = torch.bfloat16 if compute == "bf16" else None
    plain, noisy = (make_qnet(kind, device, compute_dtype=compute_dtype) for _ in range(2))
    x = inputs(device, x_dtype)
    y = plain.base_model.model.q0(x)
    q_plain, q_flat = plain.base_model.model.q0.get_base_layer(), noisy.base_model.model.q0.get_base_layer()
    expected = getattr(q_plain, "compute_dtype", None) or x_dtype

    flat = FlatLoRA(noisy, FlatLoRAConfig(sigma=1e-30, schedule="constant"))
    linear, seen = F.linear, []

    def spy(inp, weight, bias=None):
        if weight.shape == (q_flat.out_features, q_flat.in_features):
            seen.append((inp.dtype, weight.dtype))
        return linear(inp, weight, bias)

    monkeypatch.setattr(F, "linear", spy)
    with flat.step(0):
        y_flat = noisy.base_model.model.q0(x)
    monkeypatch.undo()
    assert seen == [(expected, expected)]
    assert y_flat.dtype == y.dtype == x_dtype
    assert getattr(q_flat, "compute_dtype", None) == getattr(q_plain, "compute_dtype", None)
    if kind == "int8":  # LLM.int8() quantizes the activations too; inside a window the product is a float one
        # (on the H200: max |diff| 0.0234 in 1 of 240 outputs, the rest within 0.02)
        torch.testing.assert_close(y_flat.float(), y.float(), rtol=0.05, atol=0.04)
    elif expected == torch.bfloat16 and device == "cpu":
        torch.testing.assert_close(y_flat, y, rtol=0, atol=0)  # the same dequantized W, the same product
    else:
        # bitsandbytes dequantizes straight into the compute dtype; PEFT's accessor (and so the window) goes
        # through the stored bf16 first, a difference of one bf16 rounding of W (and on CUDA, its own kernels).
        torch.testing.assert_close(y_flat.float(), y.float(), rtol=2e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", KINDS)
def test_packed_weights_byte_identical_after_100_steps(device, kind):
    pm = make_qnet(kind, device)
    before = packed(pm)
    adapters0 = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=SIGMA, schedule="constant", seed=7))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = inputs(device, torch.bfloat16, rows=8)
    with torch.no_grad():
        clean = pm(x).float().pow(2).mean()
    for t in range(100):
        with flat.step(t), autocast(device):
            loss = pm(x).float().pow(2).mean()
            loss.backward()
        if t == 0:
            assert not torch.equal(loss.detach(), clean)  # the noise was on
        opt.step()
        opt.zero_grad()
    assert flat.draws == 100
    assert_same_bytes(packed(pm), before)
    moved = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, adapters0[n])]
    assert len(moved) == len(adapters0)  # every A and B trained


# ------------------------------------------------------------------------------------------- gradients
class DenseReference(nn.Module):
    """What a quantized layer computes inside a window, written out: the explicit dense W + eps, multiplied in
    the layer's compute dtype (4-bit: its compute_dtype; 8-bit: the input's), returned in the input's dtype."""

    def __init__(self, w_noisy: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype | None):
        super().__init__()
        self.register_buffer("w", w_noisy)
        self.bias = bias
        self.compute_dtype = compute_dtype

    def forward(self, x):
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.w.to(dtype), bias).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_grads_equal_an_explicit_dequantized_w_plus_eps_model(device, kind, dtype):
    step = 3
    pm = make_qnet(kind, device, dtype)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.3, schedule="constant", seed=5))
    x = inputs(device, dtype).requires_grad_()
    saved = []
    with flat.step(step):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            out = pm(x)
        out.float().pow(2).mean().backward()
        noise = {t.name: flat.noise(t.name, step) for t in flat.targets}
    grads, gx = adapter_grads(pm), x.grad.detach().float().clone()
    # eps is regenerated in backward: no (m, n) tensor was kept for it.
    for t in flat.targets:
        assert all(math.prod(s) != t.m * t.n for s in saved), f"{t.name}: an m x n tensor was saved for backward"

    ref = make_qnet(kind, device, dtype)
    for t in flat.targets:
        layer = ref.get_submodule(t.name)
        base = layer.get_base_layer()
        w = dequantized(t)
        w_noisy = (w.float() + noise[t.name]).to(w.dtype)  # round(W + eps) in the dequantized dtype
        layer.base_layer = DenseReference(w_noisy, base.bias, getattr(t.base, "compute_dtype", None))
    xr = x.detach().clone().requires_grad_()
    ref(xr).float().pow(2).mean().backward()

    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    if device == "cuda" and dtype == torch.bfloat16:
        # The Triton stream's normals differ from the torch reference by ~1e-6, which can move a bf16 rounding.
        tol = dict(rtol=3e-2, atol=2e-3)
    ref_grads = adapter_grads(ref)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], **tol, msg=lambda m, n=n: f"{n}: {m}")
    torch.testing.assert_close(gx, xr.grad.float(), **tol)

    # The comparison can fail: without the noise the gradients are measurably different.
    pm.zero_grad()
    pm(x.detach()).float().pow(2).mean().backward()
    clean = adapter_grads(pm)
    assert any((clean[n] - g).norm() > 10 * (tol["atol"] + tol["rtol"] * g.norm()) for n, g in grads.items())


# ------------------------------------------------------------------------------------------- a real QLoRA model
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=128, max_position_embeddings=64)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama saved as a checkpoint folder, so that from_pretrained quantizes it (no hub)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = tmp_path_factory.mktemp("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def bnb_config(kind: str):
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind[:3], bnb_4bit_use_double_quant=kind.endswith("-dq"),
                              bnb_4bit_compute_dtype=torch.bfloat16)


def qlora_llama(llama_dir, kind: str, device: str, checkpointing: bool = True, reentrant: bool = True):
    """The usual QLoRA set-up: from_pretrained with a BitsAndBytesConfig, prepare_model_for_kbit_training
    (fp32 norms, input grads, gradient checkpointing), LoRA on every linear layer."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama_dir, quantization_config=bnb_config(kind), dtype=torch.bfloat16,
                                             device_map=device)
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                 gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with torch.random.fork_rng(devices=[]):
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                        lora_dropout=0.0, init_lora_weights=False))
    return randomize_adapters(pm, 0.05)


def rel_dist(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every tensor of two {name: tensor} dicts."""
    num = sum((a[n].float() - b[n].float()).square().sum().item() for n in b)
    return math.sqrt(num / sum(v.float().square().sum().item() for v in b.values()))


def tokens(n: int, seq: int = 16, seed: int = 4) -> torch.Tensor:
    return torch.randint(0, LLAMA["vocab_size"], (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_gradient_checkpointing_recompute_sees_the_same_noise(llama_dir, device, kind, reentrant):
    ids = tokens(2).to(device)
    grads, calls = {}, {}
    for checkpointing in (True, False):
        pm = qlora_llama(llama_dir, kind, device, checkpointing=checkpointing, reentrant=reentrant)
        pm.train()
        before = packed(pm)
        flat = FlatLoRA(pm, FlatLoRAConfig(sigma=SIGMA, schedule="constant", seed=3))
        assert flat.mode == "forward" and len(flat.targets) == 14
        q = flat.targets[0].base
        calls[checkpointing] = []
        hook = q.register_forward_hook(lambda *a, c=calls[checkpointing]: c.append(1))
        with flat.step(2), autocast(device):
            pm(input_ids=ids, labels=ids).loss.backward()
        hook.remove()
        assert_same_bytes(packed(pm), before)
        grads[checkpointing] = adapter_grads(pm)
        if checkpointing:  # the comparison can fail: clean gradients differ from the noisy ones
            pm.zero_grad()
            with autocast(device):
                pm(input_ids=ids, labels=ids).loss.backward()
            clean = adapter_grads(pm)
            assert rel_dist(clean, grads[True]) > 0.05  # 0.21 on CPU
        flat.close()
    assert len(calls[True]) == 2 and len(calls[False]) == 1  # the recompute did run the layer again
    if device == "cpu":  # bit-identical here; on CUDA bf16 kernels (attention backward) need not be deterministic
        for n, g in grads[True].items():
            torch.testing.assert_close(g, grads[False][n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    else:
        assert rel_dist(grads[True], grads[False]) < 1e-2


def test_hf_trainer_callback_on_a_4bit_model(llama_dir, device, tmp_path):
    """The usual QLoRA recipe (4-bit NF4 with double quant, prepare_model_for_kbit_training, gradient
    checkpointing, bf16 on GPU) under the Trainer with FlatLoRACallback: forward mode, sigma logged, packed
    weights untouched, and the adapters those of the plain `with flat.step(t)` loop, not of plain QLoRA."""
    from transformers import Trainer, TrainingArguments

    from flatlora.integrations.hf import FlatLoRACallback

    steps, batch, accum, lr = 3, 2, 2, 0.5
    ids = tokens(steps * batch * accum)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(len(ids))]

    def optimizer(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    def train(callbacks, out):
        pm = qlora_llama(llama_dir, "nf4-dq", device)
        before = packed(pm)
        args = TrainingArguments(
            output_dir=str(tmp_path / out), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
            max_steps=steps, max_grad_norm=0.0, logging_steps=1, report_to="none", save_strategy="no",
            use_cpu=device == "cpu", bf16=device == "cuda", disable_tqdm=True, remove_unused_columns=False,
            train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=pm, args=args, train_dataset=data, optimizers=optimizer(pm), callbacks=callbacks)
        trainer.train()
        assert_same_bytes(packed(pm), before)
        return {n: p.detach().float().clone() for n, p in pm.named_parameters() if p.requires_grad}, trainer

    sigma = 0.3  # a visible effect within 3 steps (the ramp gives steps 1 and 2 noise)
    cb = FlatLoRACallback(sigma=sigma, seed=3)
    flat_adapters, trainer = train([cb], "flat")
    assert cb.flat.mode == "forward" and cb.flat.config.total_steps == steps and cb.flat.draws == steps - 1
    logged = [h["flatlora/sigma"] for h in trainer.state.log_history if "flatlora/sigma" in h]
    assert logged == pytest.approx([cb.flat.sigma_at(t) for t in range(steps)]) and logged[-1] == sigma
    bare_adapters, _ = train([], "bare")

    # The plain loop with the same noise: one window per optimizer step, the same micro-batches.
    pm = qlora_llama(llama_dir, "nf4-dq", device)
    pm.train()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=sigma, total_steps=steps, seed=3))
    opt, _ = optimizer(pm)
    for t in range(steps):
        with flat.step(t):
            for k in range(accum):
                mb = ids[(t * accum + k) * batch:(t * accum + k + 1) * batch].to(device)
                with autocast(device):
                    loss = pm(input_ids=mb, labels=mb).loss / accum
                loss.backward()
        opt.step()
        opt.zero_grad()
    loop_adapters = {n: p.detach().float() for n, p in pm.named_parameters() if p.requires_grad}

    def dist(a, b):
        return math.sqrt(sum((a[n] - b[n]).square().sum().item() for n in a))

    # The Trainer's loss is a token sum over the window divided by its token count, the loop's a mean per
    # micro-batch divided by the accumulation: equal up to rounding (bit-identical on CPU; bf16 on CUDA), so
    # "equal" is measured against the effect of the noise itself.
    assert dist(flat_adapters, bare_adapters) > 1e-3 * math.sqrt(sum(v.square().sum().item() for v in bare_adapters.values()))
    assert dist(flat_adapters, loop_adapters) < 0.05 * dist(flat_adapters, bare_adapters)
