"""Engine cases on the Triton backend (collected through test_triton_backend.py): under TRITON_INTERPRET=1 on
CPU, on the GPU where there is one. Write detection on this backend rests on `restore_group` returning, per
layer, the number of tiles found modified since perturb (the kernel contract)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process
pytest.importorskip("triton")

from flatlora import FlatLoRA, FlatLoRAConfig  # noqa: E402
from flatlora.kernels import triton_noise as K  # noqa: E402
from tests.conftest import batches, frozen_bits, make_lora_mlp  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
LIN1 = "base_model.model.lin1.base_layer.weight"


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    import flatlora.kernels as kernels

    monkeypatch.setattr(kernels, "FORCE_TRITON", True)


def _open(mode="inplace", dtype=torch.bfloat16):
    pm = make_lora_mlp(dtype).to(DEV)
    clean = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.2, total_steps=3, mode=mode, generator="philox"))
    assert set(flat.backends().values()) == {"triton"}
    flat.begin_step(2)
    return pm, clean, flat


def test_forward_mode_fixes_every_std_in_one_grouped_call_per_window(monkeypatch):
    calls = []
    real = K.row_std_group
    monkeypatch.setattr(K, "row_std_group", lambda items, s: calls.append(len(items)) or real(items, s))
    pm, clean, flat = _open("forward")
    for x in batches(3):  # three micro-batches, forward and backward each
        pm(x.to(DEV).bfloat16()).float().pow(2).mean().backward()
    flat.end_step()
    assert calls == [2]  # both layers, once for the whole window
    assert all(torch.equal(clean[k], v) for k, v in frozen_bits(pm).items())


def test_engine_names_the_layer_the_kernel_finds_written_and_restores_the_rest():
    pm, clean, flat = _open()
    with torch.no_grad():
        dict(pm.named_parameters())[LIN1].view(-1)[5] += 1.0  # one entry of lin1's noisy weight
    with pytest.raises(RuntimeError, match=r"\['base_model.model.lin1'\] were written.*\{'base_model.model.lin1': 1\}"):
        flat.end_step()  # on a GPU the kernel's finding may arrive after end_step returned: close() reads it
        flat.close()
    after = frozen_bits(pm)
    assert all(torch.equal(clean[k], after[k]) for k in clean if k != LIN1)


@pytest.mark.parametrize("kind", ["nf4-dq", "int8"])
def test_quantized_bases_on_the_triton_backend_match_the_torch_philox_stream(monkeypatch, kind):
    """QLoRA's GPU path: the kernels see the dequantized weight (row std of W + sBA, noisy copy in forward and
    again in backward), and give the gradients of the torch implementation of the same stream."""
    pytest.importorskip("bitsandbytes")
    import flatlora.kernels as kernels
    from tests.core.test_quantized import adapter_grads, assert_same_bytes, inputs, make_qnet, packed

    grads = {}
    for backend in ("torch", "triton"):
        # (use_triton, not FORCE_TRITON: on CUDA the engine would take the kernels whatever that flag says)
        monkeypatch.setattr(kernels, "use_triton", lambda device, on=backend == "triton": on)
        pm = make_qnet(kind, DEV)
        before = packed(pm)
        flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.3, schedule="constant", generator="philox"))
        assert set(flat.backends().values()) == {backend}
        x = inputs(DEV, torch.bfloat16).requires_grad_()
        with flat.step(3):
            pm(x).float().pow(2).mean().backward()
        assert_same_bytes(packed(pm), before)
        grads[backend] = {**adapter_grads(pm), "x": x.grad.float()}
        flat.close()
    # Exact under the interpreter; on a GPU the kernels' special-function normals differ from torch's by ~1e-6.
    for n, g in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][n], g, rtol=2e-2, atol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


def test_inplace_steps_after_the_first_do_not_wait_for_the_gpu_and_stay_exact(monkeypatch):
    deferred = []
    real = K.restore_group
    monkeypatch.setattr(K, "restore_group", lambda rec: deferred.append(rec.used is None) or real(rec))
    K._CAPACITY.clear()
    pm = make_lora_mlp(torch.bfloat16).to(DEV)
    clean = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.2, total_steps=4, mode="inplace", generator="philox"))
    for step, x in zip(range(1, 4), batches(3)):  # step 0 has sigma 0: no window
        with flat.step(step):
            pm(x.to(DEV).bfloat16()).float().pow(2).mean().backward()
        assert all(torch.equal(clean[k], v) for k, v in frozen_bits(pm).items())
        assert flat.metrics()["flatlora/tiles_without_noise"] == 0
        assert flat.metrics()["flatlora/restore_record_bytes"] > 0
    assert deferred == [False, True, True]  # the first perturb of the shape checks its record at once


@pytest.mark.parametrize("then", ["next_end_step", "close"])
def test_a_write_the_restore_finds_late_is_reported_by_the_next_end_step_or_close(monkeypatch, then):
    """What a GPU does when the restore's outcome has not arrived by end_step (forced here): nothing waits,
    the finding is read by the next end_step (or by close), and names the step whose window it was."""
    monkeypatch.setattr(K.Outcome, "ready", lambda self: False)
    pm, clean, flat = _open()
    with torch.no_grad():
        dict(pm.named_parameters())[LIN1].view(-1)[5] += 1.0
    flat.end_step()  # not read yet
    # what waits to be read holds no record entries (only the small header): no weight-sized memory
    assert all(r.outcome.rec.ent.untyped_storage().nbytes() == 0 for r in flat._mode.pending)
    assert [r.names for r in flat._mode.pending] == [["base_model.model.lin0", "base_model.model.lin1"]]  # one group, unread
    with pytest.raises(RuntimeError, match=r"lin1'\] were written while the noise of step 2 was on.*\{'base_model.model.lin1': 1\}"):
        if then == "close":
            flat.close()
        else:
            with flat.step(3):
                pass
    after = frozen_bits(pm)
    assert all(torch.equal(clean[k], after[k]) for k in clean if k != LIN1)


@pytest.mark.gpu
def test_an_inplace_step_after_the_first_makes_no_host_sync():
    import warnings

    pm = make_lora_mlp(torch.bfloat16).to(DEV)
    clean = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.2, total_steps=6, mode="inplace", generator="philox"))
    xs = [x.to(DEV).bfloat16() for x in batches(4)]
    with flat.step(1):
        pm(xs[0]).float().pow(2).mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step, x in zip(range(2, 5), xs[1:]):
                with flat.step(step):
                    pm(x).float().pow(2).mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert syncs == []
    flat.close()
    assert all(torch.equal(clean[k], v) for k, v in frozen_bits(pm).items())


def test_a_record_estimate_that_falls_short_is_counted_warned_and_the_next_step_checked(caplog):
    import logging

    import peft

    torch.manual_seed(0)
    K._CAPACITY.clear()
    base = torch.nn.Sequential(torch.nn.Linear(1024, 128)).bfloat16()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["0"])).to(DEV)
    clean = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.3, schedule="constant", mode="inplace", generator="philox"))
    x = torch.randn(8, 1024, device=DEV, dtype=torch.bfloat16)
    with flat.step(0):
        pm(x).float().pow(2).mean().backward()
    (key,) = K._CAPACITY  # the first perturb of the group was checked: its size is the estimate
    K._CAPACITY[key] = (0, 0.3)  # pretend it needed nothing: the next record gets the 1024-entry minimum
    with caplog.at_level(logging.WARNING, logger="flatlora"):
        with flat.step(1):
            pm(x).float().pow(2).mean().backward()
    flat.close_window()
    flat._mode.check()  # (on a GPU the outcome may not have arrived yet)
    skipped = flat._mode.tiles_without_noise
    assert 0 < skipped < 128 * 1024 // K.BLOCK
    assert f"{skipped} weight tiles got no noise at step 1" in caplog.text
    assert all(torch.equal(clean[k], v) for k, v in frozen_bits(pm).items())
    assert key not in K._CAPACITY  # so the next perturb is checked at once, and fits
    with flat.step(2):
        pm(x).float().pow(2).mean().backward()
    flat.close()
    assert flat.metrics()["flatlora/tiles_without_noise"] == skipped
    assert all(torch.equal(clean[k], v) for k, v in frozen_bits(pm).items())
