"""Under flat.step the gradients of A and B are those of an explicit model whose base weight is W + eps."""

import copy

import pytest
import torch

from flatlora import FlatLoRA, FlatLoRAConfig
from tests.conftest import batches, make_lora_mlp


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def explicit_grads(pm, flat, step, xs):
    """Gradients of a copy whose base weights are set to round(W + eps) by hand, no engine involved."""
    ref = copy.deepcopy(pm)
    names = dict(ref.named_modules())
    with torch.no_grad():
        for t in flat.targets:
            eps = flat.noise(t.name, step)
            w = names[t.name].get_base_layer().weight
            w.copy_((w.float() + t.to_storage(eps, w)).to(w.dtype))
    for x in xs:
        ref(x).float().pow(2).mean().backward()
    return grads(ref)


@pytest.mark.parametrize("mode", ["inplace", "forward"])
def test_grads_equal_explicit_perturbed_model(mode):
    pm = make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.2, total_steps=4, mode=mode))
    xs = batches(3)  # three micro-batches in one window
    step = 2
    expected = explicit_grads(pm, flat, step, xs)
    with flat.step(step):
        for x in xs:
            pm(x).float().pow(2).mean().backward()
    got = grads(pm)
    clean = copy.deepcopy(pm)
    clean.zero_grad()
    for x in xs:
        clean(x).float().pow(2).mean().backward()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(got[name], grads(clean)[name]), "noise had no effect on " + name


def test_both_modes_give_identical_gradients_in_bf16():
    xs = batches(2, dtype=torch.bfloat16)
    out = {}
    for mode in ("inplace", "forward"):
        pm = make_lora_mlp(torch.bfloat16)
        flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=2, mode=mode))
        with flat.step(1):
            for x in xs:
                pm(x).float().pow(2).mean().backward()
        out[mode] = grads(pm)
    for name in out["inplace"]:
        assert torch.equal(out["inplace"][name], out["forward"][name]), name


def test_forward_mode_survives_gradient_checkpointing():
    from torch.utils.checkpoint import checkpoint

    xs = batches(1)
    results = {}
    for use_ckpt in (False, True):
        pm = make_lora_mlp()
        flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.2, total_steps=2, mode="forward"))
        with flat.step(1):
            out = checkpoint(pm, xs[0], use_reentrant=False) if use_ckpt else pm(xs[0])
            out.pow(2).mean().backward()
        results[use_ckpt] = grads(pm)
    for name in results[False]:
        torch.testing.assert_close(results[True][name], results[False][name], rtol=0, atol=0)


def test_flat_full_finetuning_grads_at_perturbed_weight():
    from tests.conftest import MLP

    torch.manual_seed(0)
    model = MLP()
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.2, total_steps=2, target="linear", exclude=["head"], mode="forward"))
    assert sorted(t.name for t in flat.targets) == ["lin0", "lin1"]
    x = batches(1)[0]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for t in flat.targets:
            getattr(ref, t.name).weight.add_(flat.noise(t.name, 1))
    ref(x).pow(2).mean().backward()
    with flat.step(1):
        model(x).pow(2).mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
