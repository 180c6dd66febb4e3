"""accelerate: `with accumulate(accelerator, flat, model):` gives the plain loop's bits (windows follow
accelerate's sync boundary, the short last window included), and an exception leaves clean weights."""

import pytest
import torch

pytest.importorskip("peft")
accelerate = pytest.importorskip("accelerate")

from flatlora import FlatLoRA, FlatLoRAConfig  # noqa: E402
from flatlora.integrations.accelerate import accumulate  # noqa: E402
from tests.integrations.helpers import (  # noqa: E402
    adapters, assert_same_bits, bits, collate, make_data, make_model, make_optimizer)

SIGMA = 0.1


def plain_windows(model, data, batch, grad_accum, flat):
    """Reference: `with flat.step(t):` around each window of `grad_accum` micro-batches (the last may be short)."""
    opt, _ = make_optimizer(model)
    mbs = [collate(data[i:i + batch]) for i in range(0, len(data), batch)]
    for t, start in enumerate(range(0, len(mbs), grad_accum)):
        with flat.step(t):
            for mb in mbs[start:start + grad_accum]:
                (model(**mb)["loss"] / grad_accum).backward()
        opt.step()
        model.zero_grad()


def accelerate_loop(model, data, batch, grad_accum, flat, fail_at=None, sigmas=None):
    acc = accelerate.Accelerator(gradient_accumulation_steps=grad_accum, cpu=True)
    opt, _ = make_optimizer(model)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False, collate_fn=collate)
    model, opt, loader = acc.prepare(model, opt, loader)
    for i, mb in enumerate(loader):
        with accumulate(acc, flat, model) as sigma:
            if sigmas is not None:
                sigmas.append(sigma)
            loss = model(**mb)["loss"]
            if i == fail_at:
                raise RuntimeError("boom")
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
    return acc


@pytest.mark.parametrize("n_batches,grad_accum", [(8, 2), (5, 2), (6, 1)])
def test_accumulate_matches_plain_loop_bit_for_bit(n_batches, grad_accum):
    data = make_data(4 * n_batches)
    steps = -(-n_batches // grad_accum)  # a 5-batch epoch at GA 2: windows of 2, 2 and 1
    ref = make_model()
    plain_windows(ref, data, 4, grad_accum, FlatLoRA(ref, FlatLoRAConfig(sigma=SIGMA, total_steps=steps, seed=1)))
    model = make_model()
    clean = bits(model)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=steps, seed=1))
    sigmas = []
    acc = accelerate_loop(model, data, 4, grad_accum, flat, sigmas=sigmas)
    assert_same_bits(adapters(model), adapters(ref))
    assert_same_bits(bits(model), clean) and not flat.active
    assert flat.last_step == steps - 1 and sigmas[-1] == SIGMA
    assert sigmas == [flat.sigma_at(i // grad_accum) for i in range(n_batches)]
    assert "backward" not in vars(acc)  # the per-window wrapper is gone


def test_exception_closes_the_window_and_a_caught_one_resumes_the_same_step():
    data = make_data(32)
    model = make_model()
    clean = bits(model)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=SIGMA, total_steps=4, seed=1))
    with pytest.raises(RuntimeError, match="boom"):
        accelerate_loop(model, data, 4, 2, flat, fail_at=3)  # second micro-batch of step 1: noise on
    assert not flat.active and flat.last_step == 1
    assert_same_bits(bits(model), clean)
    # Caught and continued: the next micro-batch re-opens step 1 (same noise), not step 2.
    acc = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    with accumulate(acc, flat, model):
        assert flat.last_step == 1 and flat.active
