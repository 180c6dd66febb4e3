"""The drawn noise has the paper's per-row std, computed from the merged weight W + sBA."""

import math

import peft
import pytest
import torch
from torch import nn

from flatlora import FlatLoRA, FlatLoRAConfig
from tests.conftest import make_lora_mlp


def merged_rows(layer) -> torch.Tensor:
    """Explicit W' = W + sum_a delta_a in (out, in) layout, built the slow way through PEFT."""
    W = layer.get_base_layer().weight.detach().float()
    if getattr(layer, "fan_in_fan_out", False):
        W = W.t()
    W = W.reshape(W.shape[0], -1).clone()
    for a in layer.active_adapters:
        if a in layer.lora_A and a not in layer.merged_adapters:
            d = layer.get_delta_weight(a).detach().float()
            d = d.t() if getattr(layer, "fan_in_fan_out", False) else d
            W += d.reshape(W.shape[0], -1)
    return W


def test_per_row_std_matches_formula_statistically():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4096, 48))
    with torch.no_grad():  # rows of very different norms, so a wrong row scale cannot hide
        base[0].weight.mul_(torch.logspace(-1, 1, 48)[:, None])
    pm = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False))
    sigma, T = 0.1, 5
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=sigma, total_steps=T, schedule="cosine_increase"))
    (t,) = flat.targets
    layer = t.lora
    step = 3
    eps = flat.noise(t.name, step)
    n = 4096
    expected = flat.sigma_at(step) * merged_rows(layer).norm(dim=1) / math.sqrt(n)
    sample_std = eps.std(dim=1)
    # The sample std of n Gaussians has relative sd ~ 1/sqrt(2n) ~ 1.1 %; 5 sd over 48 rows.
    tol = 5 / math.sqrt(2 * n)
    assert torch.all((sample_std / expected - 1).abs() < tol), (sample_std / expected - 1).abs().max()
    assert eps.mean(dim=1).abs().max() < 5 * expected.max() / math.sqrt(n)
    # The row std the engine stores is the formula itself, to float32 precision.
    torch.testing.assert_close(flat.row_std(t.name, step), expected, rtol=1e-5, atol=0)


def test_lowrank_norms_equal_materialised_norms_for_every_layer_kind():
    from flatlora.core.norms import merged_row_sq_norms

    pm = make_lora_mlp(r=4)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3))
    for t in flat.targets:
        torch.testing.assert_close(merged_row_sq_norms(t), merged_rows(t.lora).pow(2).sum(1), rtol=1e-5, atol=1e-6)


def test_layer_noise_uses_one_std():
    pm = make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3, noise="layer"))
    t = flat.targets[0]
    std = flat.row_std(t.name, 2)
    Wm = merged_rows(t.lora)
    assert torch.all(std == std[0])
    assert std[0].item() == pytest.approx(0.1 * Wm.norm().item() / math.sqrt(Wm.numel()), rel=1e-5)


def test_sigma_zero_step_draws_nothing():
    pm = make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=10))
    with flat.step(0) as s:
        assert s == 0.0
    assert flat.draws == 0
    with flat.step(1):
        pass
    assert flat.draws == 1
