"""ExperimentSpec: YAML + overrides, and the errors a typo gets before anything trains."""

import pytest

from flatlora.experiments.spec import ExperimentSpec, load_spec


def test_overrides_parse_yaml_values(tmp_path):
    spec = load_spec(None, ["train.lr=5e-4", "methods=[lora,flat-dora]", "seeds=[3,4]", "flat.sigma=0.1",
                            "task_args.train_size=100", "lora.targets=[query,value]"])
    assert spec.train.lr == 5e-4 and isinstance(spec.train.lr, float)
    assert spec.methods == ["lora", "flat-dora"] and spec.seeds == [3, 4]
    assert spec.flat_config(total_steps=10, seed=3).sigma == 0.1
    assert spec.task_args == {"train_size": 100} and spec.lora.targets == ["query", "value"]


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task: byo-text\ntrain: {lr: 1.0e-3, epochs: 2}\n")
    spec = load_spec(f, ["train.epochs=3"])
    assert (spec.task, spec.train.lr, spec.train.epochs) == ("byo-text", 1e-3, 3)


@pytest.mark.parametrize("override, message", [
    (["trian.lr=1"], "Did you mean train"),
    (["train.learning_rate=1"], "unknown key train.'learning_rate'"),
    (["method=flat-lorra"], "unknown method 'flat-lorra'"),
    (["methods=[lora,lora]"], "twice"),
    (["task=sst3"], "unknown task 'sst3'"),
    (["train.lr=-1"], "train.lr must be a positive number"),
    (["lora.r=0"], "lora.r must be a positive integer"),
    (["seeds=[0.5]"], "seeds must be a list of integers"),
    (["flat.sigma=-0.1"], "sigma must be >= 0"),
    (["flat.total_steps=10"], "set by the runner"),
    (["flat.sigmaa=0.1"], "unknown FlatLoRAConfig field"),
    (["baseline=dora"], "not among methods"),
    (["train.scheduler=step"], "train.scheduler must be one of"),
    (["train.lr"], "is not key=value"),
])
def test_bad_specs_fail_with_a_message_naming_the_problem(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_spec(None, override)


def test_missing_config_file():
    with pytest.raises(ValueError, match="does not exist"):
        load_spec("nope.yaml")


def test_round_trip():
    spec = load_spec(None, ["methods=[lora,sam-w]", "sam_rho_w=0.1"])
    assert ExperimentSpec.from_dict(spec.to_dict()) == spec
