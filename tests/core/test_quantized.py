"""QLoRA-style bases (bitsandbytes 4-bit): forward mode perturbs the dequantized weight; in-place refuses."""

import copy

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from flatlora import FlatLoRA, FlatLoRAConfig  # noqa: E402


class QNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        self.q.weight = bnb.nn.Params4bit(torch.randn(32, 64, generator=g) * 0.1, requires_grad=False, quant_type="nf4")
        self.q = self.q.to("cpu")  # quantizes
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.q(x)))


def make():
    pm = peft.get_peft_model(QNet(), peft.LoraConfig(r=4, target_modules=["q"], init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def test_auto_picks_forward_and_inplace_refuses():
    pm = make()
    assert FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=2)).mode == "forward"
    with pytest.raises(ValueError, match="mode='forward'"):
        FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=2, mode="inplace"))


def test_grads_equal_dense_model_with_dequantized_weight_plus_noise():
    from peft.utils.integrations import dequantize_module_weight

    pm = make()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.3, total_steps=2))
    (t,) = flat.targets
    packed = t.weight.detach().clone()
    dense_w = dequantize_module_weight(t.base).detach().float()
    eps = flat.noise(t.name, 1)

    ref = copy.deepcopy(pm)
    layer = ref.base_model.model.q
    dense = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        dense.weight.copy_(dense_w + eps)
    layer.base_layer = dense
    ref(x).pow(2).mean().backward()

    with flat.step(1):
        pm(x).pow(2).mean().backward()
    assert torch.equal(t.weight, packed)  # the packed 4-bit weight was never written
    refg = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, refg[n], rtol=1e-4, atol=1e-6, msg=n)
