import math

import pytest

from flatlora import FlatLoRA, FlatLoRAConfig


@pytest.mark.parametrize(
    "kwargs, field, accepted",
    [
        ({"sigma": -0.1}, "sigma", ">= 0"),
        ({"sigma": math.nan}, "sigma", "finite"),
        ({"sigma": math.inf}, "sigma", "finite"),
        ({"sigma": "0.05"}, "sigma", "number"),
        ({"sigma": True}, "sigma", "number"),
        ({"total_steps": 0}, "total_steps", "positive"),
        ({"total_steps": -3}, "total_steps", "positive"),
        ({"total_steps": 10.5}, "total_steps", "integer"),
        ({"seed": 1.0}, "seed", "integer"),
        ({"schedule": "cosine"}, "schedule", "cosine_increase"),
        ({"noise": "gaussian"}, "noise", "filter"),
        ({"mode": "fast"}, "mode", "inplace"),
        ({"target": "all"}, "target", "linear"),
        ({"bn_policy": "reset"}, "bn_policy", "recalibrate"),
        ({"per_rank_noise": 1}, "per_rank_noise", "True or False"),
        ({"include": 3}, "include", "fnmatch"),
    ],
)
def test_bad_config_names_field_and_accepted_values(kwargs, field, accepted):
    with pytest.raises(ValueError) as e:
        FlatLoRAConfig(**kwargs)
    assert field in str(e.value) and accepted in str(e.value)


def test_from_dict_with_prefix_and_unknown_keys():
    cfg = FlatLoRAConfig.from_dict({"flatlora_sigma": 0.1, "flatlora_total_steps": 7, "learning_rate": 1e-4}, prefix="flatlora_")
    assert cfg.sigma == 0.1 and cfg.total_steps == 7
    assert FlatLoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown FlatLoRAConfig field.*'sigmaa'"):
        FlatLoRAConfig.from_dict({"sigmaa": 0.1})


def test_include_string_becomes_list():
    assert FlatLoRAConfig(include="*lin0").include == ["*lin0"]


def test_engine_rejects_wrong_types():
    with pytest.raises(ValueError, match="torch.nn.Module"):
        FlatLoRA("model")
    import torch

    with pytest.raises(ValueError, match="FlatLoRAConfig"):
        FlatLoRA(torch.nn.Linear(2, 2), {"sigma": 0.1})
