import math

import pytest

from flatlora import FlatLoRA, FlatLoRAConfig, list_schedules
from flatlora.schedules import cosine_increase, get_schedule, register_schedule
from tests.conftest import make_lora_mlp


@pytest.mark.parametrize("total", [1, 2, 10, 1000])
def test_cosine_endpoints(total):
    assert cosine_increase(total - 1, total) == pytest.approx(1.0)
    assert cosine_increase(total, total) == pytest.approx(1.0)
    assert cosine_increase(10 * total, total) == pytest.approx(1.0)
    if total > 1:
        assert cosine_increase(0, total) == 0.0


def test_cosine_matches_formula_and_is_monotone():
    T = 101
    vals = [cosine_increase(t, T) for t in range(T)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert vals[50] == pytest.approx(0.5)
    assert vals[25] == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.25)))


def test_linear_and_constant():
    assert get_schedule("linear")(0, 11) == 0.0 and get_schedule("linear")(5, 11) == 0.5
    assert get_schedule("constant")(0, 11) == 1.0


def test_registry_is_loud():
    assert {"cosine_increase", "linear", "constant"} <= set(list_schedules())
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("linear")(lambda s, t: 1.0)


def test_engine_sigma_at_endpoints_and_missing_total():
    flat = FlatLoRA(make_lora_mlp(), FlatLoRAConfig(sigma=0.05, total_steps=20))
    assert flat.sigma_at(0) == 0.0
    assert flat.sigma_at(19) == pytest.approx(0.05)
    assert flat.sigma_at(20) == pytest.approx(0.05)
    flat2 = FlatLoRA(make_lora_mlp(), FlatLoRAConfig(sigma=0.05))
    with pytest.raises(ValueError, match="total_steps is not set"):
        flat2.begin_step(0)
    assert not flat2.active
