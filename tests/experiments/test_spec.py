"""ExperimentSpec: YAML + overrides, and the one-line errors a typo or a bad file gets before anything trains."""

import re
from dataclasses import fields

import pytest

from flatlora.experiments.spec import ExperimentSpec, LoraSection, QuantSection, SpecError, TrainSection, config_keys, load_spec


def test_overrides_parse_yaml_values(tmp_path):
    spec = load_spec(None, ["train.lr=5e-4", "methods=[lora,flat-dora]", "seeds=[3,4]", "flat.sigma=0.1",
                            "task_args.train_size=100", "lora.targets=[query,value]"])
    assert spec.train.lr == 5e-4 and isinstance(spec.train.lr, float)
    assert spec.methods == ["lora", "flat-dora"] and spec.seeds == [3, 4]
    assert spec.flat_config(total_steps=10, seed=3).sigma == 0.1
    assert spec.task_args == {"train_size": 100} and spec.lora.targets == ["query", "value"]


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task: byo-text\ntrain: {lr: 1e-3, epochs: 2}\n")  # 1e-3: a number, not YAML 1.1's string
    spec = load_spec(f, ["train.epochs=3"])
    assert (spec.task, spec.train.lr, spec.train.epochs) == ("byo-text", 1e-3, 3)


@pytest.mark.parametrize("override, message", [
    (["trian.lr=1"], "Did you mean train"),
    (["train.learning_rate=1"], "unknown key train.'learning_rate'"),
    (["method=flat-lorra"], "unknown method 'flat-lorra'"),
    (["methods=[lora,lora]"], "methods must be a non-empty list of distinct names"),
    (["methods=[]"], "methods must be a non-empty list"),
    (["task=sst3"], "unknown task 'sst3'"),
    (["train.lr=-1"], "train.lr must be a positive finite number, got -1"),
    (["train.lr=abc"], "train.lr must be a positive finite number, got 'abc' (str)"),
    (["train.lr=!!python/object/apply:os.system [echo]"], "train.lr must be a positive finite number, got '!!python"),
    (["train.epochs=.inf"], "train.epochs must be a positive finite number, got inf"),
    (["train.batch_size=32.0"], "train.batch_size must be a positive integer, got 32.0"),
    (["train.batch_size=true"], "train.batch_size must be a positive integer, got True"),
    (["train.device=tpu"], "train.device must be auto | cpu | cuda | cuda:N, got 'tpu'"),
    (["train.threads=-2"], "train.threads must be a positive integer, or null, got -2"),
    (["train.warmup_ratio=1"], "train.warmup_ratio must be a finite number >= 0 and < 1, got 1"),
    (["train.dtype=float8"], "train.dtype must be one of float32 | bfloat16 | float16"),
    (["lora.r=0"], "lora.r must be a positive integer, got 0"),
    (["lora.dropout=1.5"], "lora.dropout must be a finite number >= 0 and < 1"),
    (["ranks=[0]"], "ranks must be a non-empty list of distinct integers >= 1"),
    (["ranks=[8,-4]"], "ranks must be a non-empty list of distinct integers >= 1"),
    (["seeds=[0.5]"], "seeds must be a non-empty list of distinct integers >= 0"),
    (["seeds=[1,1]"], "seeds must be a non-empty list of distinct integers >= 0"),
    (["seed=-1"], "seed must be an integer >= 0"),
    (["jobs=0"], "jobs must be a positive integer, got 0"),
    (["plot=maybe"], "plot must be true or false, got 'maybe'"),
    (["task_args=[1,2]"], "task_args must be a mapping"),
    (["flat.sigma=-0.1"], "flat: sigma must be >= 0"),
    (["flat.sigma=abc"], "flat: sigma must be a number"),
    (["flat.total_steps=10"], "set by the runner"),
    (["flat.sigmaa=0.1"], "unknown FlatLoRAConfig field"),
    (["baseline=dora"], "not among methods"),
    (["train.scheduler=step"], "train.scheduler must be one of linear | cosine"),
    (["train=5"], "train must be a mapping"),
    (["train.lr"], "is not key=value"),
])
def test_bad_specs_fail_with_a_message_naming_the_problem(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_spec(None, override)


def test_every_spec_field_is_checked_and_documented():
    keys = {k for k, *_ in config_keys()}
    for prefix, cls in (("", ExperimentSpec), ("lora.", LoraSection), ("train.", TrainSection), ("quant.", QuantSection)):
        for f in fields(cls):
            if f.name in ("lora", "train", "quant"):
                continue
            assert "check" in f.metadata and f.metadata.get("help"), f"{prefix}{f.name} has no check or help"
            assert prefix + f.name in keys
    assert {"flat.sigma", "flat.mode", "train.lr", "jobs", "quant.type"} <= keys and "flat.total_steps" not in keys


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(SpecError, match="out_dir .* is not a folder: give a folder path"):
        load_spec(None, [f"out_dir={f}"])
    with pytest.raises(SpecError, match=r"is not a folder \(.*taken' is a file\)"):
        load_spec(None, [f"out_dir={f}/sub"])


def test_errors_in_a_file_name_the_file_and_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task: byo-text\ntrain:\n  epochs: 2\n  lr: fast\nflat: {sigma: -1}\n")
    with pytest.raises(SpecError, match=re.escape(f"{f}:4: train.lr must be a positive finite number, got 'fast'")):
        load_spec(f)
    # an override of the bad key: the message names the key only (the file is not where the value came from)
    with pytest.raises(SpecError, match=r"^train.lr must be"):
        load_spec(f, ["train.lr=x"])
    f.write_text("task: byo-text\nflat: {sigma: -1}\n")
    with pytest.raises(SpecError, match=re.escape(f"{f}:2: flat: sigma must be >= 0")):
        load_spec(f)


@pytest.mark.parametrize("content, message", [
    (b"task: [byo-text\nseeds: [1]\n", r":2:6: not valid YAML: expected ',' or ']'"),
    (b"train:\n  lr: !!python/object/apply:os.system [echo hacked]\n",
     r":2: the tag !!python/object/apply:os.system is not allowed: a config holds plain values"),
    (b"task: byo-text\ndescription: caf\xe9\n", r":2: not UTF-8 text \(byte 0xe9\); save the config as UTF-8"),
    (b"- a\n- b\n", r"must hold a mapping of keys to values at the top level, got list"),
    (b"train: {lr: 1.0e-3}\ntrain: {epochs: 2}\n", r":2: train is given twice \(also on line 1\): keep one"),
])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, content, message):
    f = tmp_path / "bad.yaml"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(f)) + ".*" + message) as e:
        load_spec(f)
    assert "\n" not in str(e.value)


def test_missing_config_file_and_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_spec("nope.yaml")
    with pytest.raises(ValueError, match="is not a file"):
        load_spec(tmp_path)


def test_round_trip():
    spec = load_spec(None, ["methods=[lora,sam-w]", "sam_rho_w=0.1", "jobs=3"])
    assert ExperimentSpec.from_dict(spec.to_dict()) == spec
