"""Shared tiny models. GPU-only tests are marked `gpu` and skipped where CUDA is absent (CI)."""

import pytest
import torch
from torch import nn


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class MLP(nn.Module):
    """Two linear layers and a head, the PEFT-tests classic."""

    def __init__(self, d_in=16, d_hidden=32, d_out=8, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden, bias=bias)
        self.lin1 = nn.Linear(d_hidden, d_hidden, bias=bias)
        self.head = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def make_lora_mlp(dtype=torch.float32, seed=0, r=4, targets=("lin0", "lin1"), **lora_kwargs):
    """A PEFT LoRA MLP with nonzero B (init_lora_weights=False) so that W' = W + sBA differs from W."""
    import peft

    g = torch.Generator().manual_seed(seed)
    model = MLP()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model = model.to(dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **lora_kwargs)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # deterministic adapters, independent of torch's global RNG
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def frozen_bits(model):
    """Bit patterns of every frozen floating parameter, for exact comparisons (-0.0 vs 0.0, NaN bits)."""
    ints = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return {n: p.detach().clone().view(ints[p.dtype]) for n, p in model.named_parameters()
            if not p.requires_grad and p.dtype in ints}


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def batches(n, d_in=16, batch=4, seed=123, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d_in, generator=g).to(dtype) for _ in range(n)]
