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


def test_a_field_set_after_construction_is_validated():
    cfg = FlatLoRAConfig(sigma=0.1)
    for field, bad, accepted in (("sigma", -1.0, ">= 0"), ("total_steps", 0, "positive"), ("schedule", "cosine", "cosine_increase"),
                                 ("seed", "7", "integer"), ("mode", "fast", "inplace"), ("per_rank_noise", "yes", "True or False")):
        with pytest.raises(ValueError, match=accepted):
            setattr(cfg, field, bad)
    assert cfg == FlatLoRAConfig(sigma=0.1)  # nothing bad was stored
    cfg.total_steps = 5
    cfg.include = "*lin0"  # normalised on assignment as at construction
    assert cfg.total_steps == 5 and cfg.include == ["*lin0"]


def test_the_engine_config_is_a_read_only_copy():
    import copy
    import dataclasses

    from tests.conftest import make_lora_mlp

    cfg = FlatLoRAConfig(sigma=0.1, total_steps=4)
    flat = FlatLoRA(make_lora_mlp(), cfg)
    cfg.sigma = 0.5  # the caller's config stays theirs
    assert flat.config.sigma == 0.1
    with pytest.raises(AttributeError, match=r"cannot set sigma.*read-only.*set_total_steps"):
        flat.config.sigma = 0.2
    with pytest.raises(AttributeError, match="read-only"):
        flat.config.total_steps = 8
    assert flat.config.total_steps == 4
    flat.set_total_steps(8)
    assert flat.config.total_steps == 8
    for other in (dataclasses.replace(flat.config), copy.deepcopy(flat.config), copy.copy(flat.config)):
        other.sigma = 0.3  # copies are ordinary configs
        assert other.sigma == 0.3 and other == dataclasses.replace(flat.config, sigma=0.3)
