"""The engine's public contract for trainer callbacks: set_total_steps, resume, close_window."""

import contextlib

import pytest
import torch

from flatlora import FlatLoRA, FlatLoRAConfig
from tests.conftest import frozen_bits, make_lora_mlp


def _engine(**kw):
    return FlatLoRA(make_lora_mlp(), FlatLoRAConfig(**{"sigma": 0.1, **kw}))


def test_set_total_steps_fills_the_schedule_before_the_first_window():
    cfg = FlatLoRAConfig(sigma=0.1)
    flat = FlatLoRA(make_lora_mlp(), cfg)
    flat.set_total_steps(10)
    assert flat.config.total_steps == 10 and cfg.total_steps is None  # the caller's config is not mutated
    assert flat.sigma_at(9) == pytest.approx(0.1)
    flat.set_total_steps(10)  # the same value again is fine
    flat.set_total_steps(20)  # still no window: allowed
    assert flat.sigma_at(19) == pytest.approx(0.1) and flat.sigma_at(9) < 0.1


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10", None])
def test_set_total_steps_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match="positive number of optimizer steps"):
        _engine().set_total_steps(bad)


def test_set_total_steps_cannot_change_once_a_window_was_drawn():
    flat = _engine(total_steps=10)
    with flat.step(0):
        pass
    flat.set_total_steps(10)
    with pytest.raises(ValueError, match="from 10 to 12"):
        flat.set_total_steps(12)
    assert flat.config.total_steps == 10


def test_resume_continues_at_the_global_step():
    flat = _engine(total_steps=10, seed=4)
    for t in range(3):
        with flat.step():
            pass
    saved = flat.state_dict()
    other = _engine(total_steps=10, seed=4)
    other.resume(saved, 3)
    assert other.begin_step() == flat.sigma_at(3) and other.last_step == 3
    other.end_step()
    fresh = _engine(total_steps=10, seed=4)
    fresh.resume(None, 5)  # a checkpoint without FlatLoRA state
    fresh.begin_step()
    assert fresh.last_step == 5
    fresh.end_step()
    zero = _engine(total_steps=10)
    zero.resume(None, 0)
    zero.begin_step()
    assert zero.last_step == 0


def test_resume_names_every_differing_noise_setting():
    saved = _engine(total_steps=10, seed=4).state_dict()
    other = _engine(sigma=0.2, total_steps=20, seed=5, schedule="constant")
    with pytest.raises(ValueError) as e:
        other.resume(saved, 3)
    msg = str(e.value)
    for field in ("sigma: saved 0.1, now 0.2", "total_steps: saved 10, now 20", "seed: saved 4, now 5",
                  "schedule: saved 'cosine_increase', now 'constant'"):
        assert field in msg
    assert "noise:" not in msg and "generator" not in msg  # equal fields are not listed
    assert other.last_step is None  # nothing adopted


def test_resume_ignores_settings_that_do_not_change_the_noise():
    saved = _engine(total_steps=10, mode="inplace").state_dict()
    other = _engine(total_steps=10, mode="forward")
    other.resume(saved, 1)
    assert other.mode == "forward" and other.last_step == 0


@pytest.mark.parametrize("state, match", [
    ("not a dict", "not a FlatLoRA state dict"),
    ({"version": 99, "config": {}, "last_step": 1}, "not a FlatLoRA state dict"),
    ({"version": 1, "config": {}, "last_step": "3"}, "last_step must be None or a non-negative integer"),
    ({"version": 1, "config": {}, "last_step": -2}, "last_step must be None or a non-negative integer"),
    ({"version": 1, "config": {"sigmaa": 1}, "last_step": 1}, "config is invalid.*sigmaa"),
    ({"version": 1, "config": {"sigma": -1}, "last_step": 1}, "config is invalid.*sigma must be >= 0"),
])
def test_resume_rejects_malformed_state(state, match):
    with pytest.raises(ValueError, match=match):
        _engine(total_steps=10).resume(state, 2)


def test_resume_rejects_a_bad_global_step():
    with pytest.raises(ValueError, match="global_step must be a non-negative integer"):
        _engine().resume(None, -1)


def test_close_window_ends_an_open_window_exactly():
    pm = make_lora_mlp(torch.bfloat16)
    before = frozen_bits(pm)
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.2, total_steps=3, mode="inplace"))
    assert flat.close_window() is False  # nothing open: no error
    flat.begin_step(1)
    assert flat.active
    assert flat.close_window() is True
    assert not flat.active
    assert all(torch.equal(before[n], v) for n, v in frozen_bits(pm).items())
    assert flat.close_window() is False
    flat.begin_step()  # the counter moved on as after end_step
    assert flat.last_step == 2
    flat.close_window()


def test_load_state_dict_names_every_differing_noise_setting_and_adopts_none():
    saved = _engine(total_steps=10, seed=4, noise="layer").state_dict()
    other = _engine(sigma=0.2, total_steps=20, seed=5)
    with pytest.raises(ValueError) as e:
        other.load_state_dict(saved)
    msg = str(e.value)
    for field in ("sigma: saved 0.1, now 0.2", "total_steps: saved 10, now 20", "seed: saved 4, now 5",
                  "noise: saved 'layer', now 'filter'"):
        assert field in msg
    assert other.config.sigma == 0.2 and other.config.seed == 5 and other.last_step is None


def test_load_state_dict_continues_after_last_step_and_keeps_our_mode():
    flat = _engine(total_steps=10, mode="inplace")
    for _ in range(3):
        with flat.step():
            pass
    other = _engine(total_steps=10, mode="forward")
    flat.close()
    other.load_state_dict(flat.state_dict())
    assert other.last_step == 2 and other.mode == "forward" and other.config.mode == "forward"
    assert other.begin_step() == other.sigma_at(3)
    other.end_step()


@pytest.mark.parametrize("last", ["2", 2.0, -1, True, [2]])
def test_load_state_dict_rejects_a_malformed_last_step_at_load(last):
    flat = _engine(total_steps=10)
    state = flat.state_dict()
    state["last_step"] = last
    with pytest.raises(ValueError, match="last_step must be None or a non-negative integer"):
        flat.load_state_dict(state)
    assert flat.last_step is None
    flat.begin_step()  # nothing half-loaded: the engine still works
    flat.end_step()


def test_windows_are_named_ranges_in_a_torch_profile():
    """Under torch.profiler, begin_step and end_step each show as one range a step (the engine's host time apart
    from the model's); with no profiler recording they record nothing."""
    from torch.profiler import ProfilerActivity, profile

    pm = make_lora_mlp()
    flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=4, mode="inplace", schedule="constant"))
    x = torch.randn(2, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for t in range(3):
            with flat.step(t):
                pm(x).sum().backward()
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("flatlora.")}
    assert counts == {"flatlora.begin_step": 3, "flatlora.end_step": 3}
    from flatlora.core import engine

    assert not engine._profiler_on() and isinstance(engine._profiled("x"), contextlib.nullcontext)
