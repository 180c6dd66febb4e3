"""Frozen weights come back bit-identical: any dtype, both modes, exceptions and Ctrl-C included."""

import pytest
import torch

from flatlora import FlatLoRA, FlatLoRAConfig
from tests.conftest import batches, frozen_bits, make_lora_mlp

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("mode", ["inplace", "forward"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_exact_after_200_steps(dtype, mode):
    pm = make_lora_mlp(dtype)
    before = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.15, total_steps=200, mode=mode, schedule="constant"))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.01)
    for t, x in enumerate(batches(200, dtype=dtype)):
        with flat.step(t):
            pm(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = frozen_bits(pm)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_bf16_round_trip_really_needs_the_record():
    """Without the record, add-then-subtract in bf16 would drift: the test above is not vacuous."""
    pm = make_lora_mlp(torch.bfloat16)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.15, total_steps=1, mode="inplace"))
    flat.begin_step(0)
    assert flat.restore_record_bytes() > 0
    flat.end_step()
    assert flat.metrics()["flatlora/restore_record_bytes"] > 0


@pytest.mark.parametrize("mode", ["inplace", "forward"])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_step_restores(mode, exc):
    pm = make_lora_mlp(torch.bfloat16)
    before = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=1, mode=mode))
    with pytest.raises(exc):
        with flat.step(0):
            pm(batches(1, dtype=torch.bfloat16)[0]).float().sum().backward()
            raise exc()
    assert not flat.active
    assert all(torch.equal(before[n], v) for n, v in frozen_bits(pm).items())
    assert all("forward" not in t.base.__dict__ for t in flat.targets)


def test_weights_are_perturbed_inside_and_clean_after():
    pm = make_lora_mlp()
    before = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=1, mode="inplace"))
    with flat.step(0):
        assert not all(torch.equal(before[n], v) for n, v in frozen_bits(pm).items())
    assert all(torch.equal(before[n], v) for n, v in frozen_bits(pm).items())


def test_unbalanced_calls_raise():
    flat = FlatLoRA(make_lora_mlp(), FlatLoRAConfig(sigma=0.1, total_steps=5))
    with pytest.raises(RuntimeError, match="without an open window"):
        flat.end_step()
    flat.begin_step(1)
    with pytest.raises(RuntimeError, match="still open"):
        flat.begin_step(2)
    with pytest.raises(RuntimeError, match="still open"):
        with flat.step(2):
            pass
    flat.end_step()
    with pytest.raises(ValueError, match="non-negative integer"):
        flat.begin_step(-1)
    assert not flat.active


def test_replaced_weight_inside_window_is_reported():
    pm = make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=1, mode="inplace"))
    flat.begin_step(0)
    t = flat.targets[0]
    t.base.weight.data = t.base.weight.data.clone()  # what a careless merge / load would do
    with pytest.raises(RuntimeError, match="replaced while the noise was on"):
        flat.end_step()
    assert not flat.active


def test_ctrl_c_during_perturb_is_delivered_after_the_window_is_consistent(monkeypatch):
    import os
    import signal

    from flatlora.core.backends import TorchBackend

    pm = make_lora_mlp(torch.bfloat16)
    before = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=1, mode="inplace"))
    real = TorchBackend.perturb_layer
    calls = []

    def perturb_then_ctrl_c(self, view, draw):
        calls.append(view.name)
        out = real(self, view, draw)
        if len(calls) == 1:  # Ctrl-C after the first of two layers
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(TorchBackend, "perturb_layer", perturb_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        with flat.step(0):
            raise AssertionError("the body must not run: Ctrl-C came during begin_step")
    assert len(calls) == 2  # the interrupt waited for the whole perturb loop
    assert not flat.active
    assert all(torch.equal(before[n], v) for n, v in frozen_bits(pm).items())


def test_eval_inside_a_window_is_warned(caplog):
    pm = make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=2))
    x = batches(1)[0]
    pm.eval()
    pm(x)
    assert "eval mode while the noise" not in caplog.text  # no window, no warning
    with flat.step(1):
        pm(x)
    assert "eval mode while the noise of step 1 was on" in caplog.text
    flat.close()
    assert not pm._forward_pre_hooks
