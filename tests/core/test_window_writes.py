"""Writes to a perturbed weight inside a window are detected, never restored into garbage, and named;
a second engine on weights a live engine owns is refused."""

import pytest
import torch

from flatlora import FlatLoRA, FlatLoRAConfig
from tests.conftest import frozen_bits, make_lora_mlp

LIN0 = "base_model.model.lin0.base_layer.weight"
LIN1 = "base_model.model.lin1.base_layer.weight"


def _open(dtype=torch.bfloat16):
    pm = make_lora_mlp(dtype)
    clean = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.2, total_steps=3, mode="inplace"))
    flat.begin_step(2)
    assert not torch.equal(frozen_bits(pm)[LIN0], clean[LIN0])  # noise is on
    return pm, clean, flat


def _weight(pm, key):
    return dict(pm.named_parameters())[key]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_state_dict_of_clean_weights_inside_a_window_is_reported_and_left_as_loaded(dtype):
    pm, clean, flat = _open(dtype)
    clean_lin0 = {LIN0: clean[LIN0].view(dtype).clone()}
    pm.load_state_dict(clean_lin0, strict=False)  # copy_ into the existing storage: no version bump seen by us
    with pytest.raises(RuntimeError) as e:
        flat.end_step()
    msg = str(e.value)
    assert "lin0" in msg and "lin1" not in msg and "step 2" in msg
    assert "load" in msg and "outside the window" in msg
    assert not flat.active
    after = frozen_bits(pm)
    assert torch.equal(after[LIN0], clean[LIN0])  # what was loaded, not clean - eps
    assert torch.equal(after[LIN1], clean[LIN1])  # the untouched layer was restored exactly
    with flat.step(0):  # the engine goes on
        pass


def test_peft_merge_adapter_inside_a_window_is_reported_for_every_merged_layer():
    pm, clean, flat = _open()
    pm.base_model.merge_adapter()
    with pytest.raises(RuntimeError, match=r"\['base_model.model.lin0', 'base_model.model.lin1'\] were written") as e:
        flat.end_step()
    assert "merged an adapter" in str(e.value)
    # Nothing was "restored": the merged weight still holds W + eps + s B A (unmerging leaves W + eps, not W).
    assert not torch.equal(frozen_bits(pm)[LIN0], clean[LIN0])


@pytest.mark.parametrize("write", ["copy_", "data_iadd", "one_entry"])
def test_in_place_writes_inside_a_window_are_detected(write):
    pm, clean, flat = _open()
    w = _weight(pm, LIN1)
    with torch.no_grad():
        if write == "copy_":
            w.copy_(w * 1.5)
        elif write == "data_iadd":
            w.data += 1e-2
        else:
            w.view(-1)[7] += 1.0  # a single entry
    with pytest.raises(RuntimeError, match=r"\['base_model.model.lin1'\] were written"):
        flat.end_step()
    assert torch.equal(frozen_bits(pm)[LIN0], clean[LIN0])


def test_replaced_weight_storage_is_still_reported():
    pm, clean, flat = _open()
    w = _weight(pm, LIN0)
    w.data = w.data.clone()
    with pytest.raises(RuntimeError, match="replaced while the noise was on"):
        flat.end_step()
    assert torch.equal(frozen_bits(pm)[LIN1], clean[LIN1])


def test_an_untouched_window_restores_silently_in_every_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        pm, clean, flat = _open(dtype)
        flat.end_step()
        assert all(torch.equal(clean[k], v) for k, v in frozen_bits(pm).items())


def test_second_engine_on_owned_weights_is_refused_until_the_first_is_closed():
    pm = make_lora_mlp()
    first = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3))
    with pytest.raises(ValueError) as e:
        FlatLoRA(pm, FlatLoRAConfig(sigma=0.3, total_steps=3))
    msg = str(e.value)
    assert "lin0" in msg and "lin1" in msg and "another live FlatLoRA engine" in msg and "close()" in msg
    with first.step(1):  # the refused build changed nothing
        pass
    first.close()
    with pytest.raises(RuntimeError, match="was closed"):
        first.begin_step(2)
    second = FlatLoRA(pm, FlatLoRAConfig(sigma=0.3, total_steps=3))  # released: fine now
    with second.step(1):
        pass


def test_second_engine_on_an_overlapping_subset_is_refused_and_disjoint_layers_are_fine():
    pm = make_lora_mlp()
    first = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3, include=["*lin0"]))
    with pytest.raises(ValueError, match=r"\['base_model.model.lin0'\]"):
        FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3))
    other = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3, include=["*lin1"]))
    assert [t.name for t in other.targets] == ["base_model.model.lin1"] and first.active is False


def test_an_engine_nobody_holds_releases_its_weights():
    pm = make_lora_mlp()
    FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3))  # dropped at once, never closed
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3))
    assert len(pm._forward_pre_hooks) == 1  # the dropped engine's eval hook went with it
    flat.close()
    assert not pm._forward_pre_hooks


def test_close_with_an_open_window_restores_and_releases():
    pm = make_lora_mlp(torch.bfloat16)
    clean = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3, mode="forward"))
    flat.begin_step(1)
    flat.close()
    assert not flat.active and all("forward" not in t.base.__dict__ for t in flat.targets)
    assert all(torch.equal(clean[k], v) for k, v in frozen_bits(pm).items())
    FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=3))
