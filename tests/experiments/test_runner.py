"""One run: divergence saved as failed, the lr each update used, TensorBoard events, rank checks."""

import csv
import importlib.util
import json
import sys

import pytest

from flatlora.experiments.runner import run_one
from flatlora.experiments.spec import load_spec

from .conftest import tiny_text_overrides


def _spec(byo_csv, tmp_path, **extra):
    return load_spec(None, tiny_text_overrides(byo_csv, tmp_path / "out", **extra))


def _curve(run_dir):
    with open(run_dir / "curve.csv") as f:
        return list(csv.DictReader(f))


def test_divergence_is_saved_as_failed_with_its_reason_not_as_success(byo_csv, tmp_path):
    # lr 1e30 with no warm-up: the one update sends the adapter to ~1e30, the logits to nan
    spec = _spec(byo_csv, tmp_path, **{"train.lr": 1e30, "train.max_steps": 1, "train.warmup_ratio": 0, "method": "lora"})
    rec = run_one(spec, tmp_path / "r", progress=False)
    assert rec["status"] == "failed" and rec["failure"].startswith("diverged: ")
    assert rec["metrics"] == {} and rec["untrusted_metrics"]  # no accuracy of a NaN model reported as a result
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["status"] == "failed" and saved["failure"] == rec["failure"]
    assert not (tmp_path / "r" / "weights.safetensors").exists()
    assert (tmp_path / "r" / "curve.csv").exists() and not (tmp_path / "r.partial").exists()
    with pytest.raises(FileExistsError):  # a failed run is a finished result too: never overwritten
        run_one(spec, tmp_path / "r", progress=False)


def test_a_non_finite_loss_stops_training_at_that_step(byo_csv, tmp_path):
    spec = _spec(byo_csv, tmp_path, **{"train.lr": 1e30, "train.max_steps": 4, "train.warmup_ratio": 0,
                                      "train.batch_size": 16, "method": "lora"})
    rec = run_one(spec, tmp_path / "r", progress=False)
    assert rec["status"] == "failed" and "the loss became nan at step 1" in rec["failure"]
    rows = _curve(tmp_path / "r")
    assert [r["step"] for r in rows] == ["0", "1"] and rows[1]["loss"] == "nan"


def test_a_finite_run_is_done_with_weights(byo_csv, tmp_path):
    rec = run_one(_spec(byo_csv, tmp_path, method="lora"), tmp_path / "r", progress=False)
    assert rec["status"] == "done" and rec["failure"] is None and rec["metrics"]["test/accuracy"] >= 0
    assert (tmp_path / "r" / "weights.safetensors").exists()


def test_a_flat_run_folder_holds_a_peft_adapter_that_loads_and_says_how_it_was_trained(byo_csv, tmp_path):
    import torch
    from peft import PeftModel

    from flatlora.experiments.tasks import create_task
    from flatlora.integrations.card import read_adapter_card

    spec = _spec(byo_csv, tmp_path, method="flat-lora", **{"flat.sigma": 0.07})
    run_one(spec, tmp_path / "r", progress=False)
    adapter = tmp_path / "r" / "adapter"
    assert (adapter / "adapter_config.json").exists() and read_adapter_card(adapter).sigma == 0.07
    assert "Flat-LoRA" in (adapter / "README.md").read_text()
    task = create_task(spec.task, model=spec.model, **spec.task_args)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(task.build_model(), str(adapter)).eval()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "r" / "weights.safetensors"))
    state = loaded.state_dict()
    lora_keys = [k for k in saved if "lora_" in k]
    assert lora_keys and all(torch.equal(saved[k], state[k]) for k in lora_keys)  # the trained factors, bit for bit


@pytest.mark.parametrize("scheduler, warmup, expected", [
    ("linear", 0, [1.0, 0.75, 0.5, 0.25]),
    ("linear", 0.5, [0.0, 0.5, 1.0, 0.5]),   # HF warm-up: step / warmup_steps, from 0
    ("constant", 0.5, [1.0, 1.0, 1.0, 1.0]),  # HF "constant" has no warm-up
    ("constant_with_warmup", 0.25, [0.0, 1.0, 1.0, 1.0]),
])
def test_curve_logs_the_lr_each_update_used(byo_csv, tmp_path, scheduler, warmup, expected):
    spec = _spec(byo_csv, tmp_path, **{"train.scheduler": scheduler, "train.warmup_ratio": warmup, "train.lr": 0.01,
                                      "train.max_steps": 4, "train.batch_size": 16, "method": "lora"})
    run_one(spec, tmp_path / "r", progress=False)
    assert [float(r["lr"]) for r in _curve(tmp_path / "r")] == pytest.approx([0.01 * e for e in expected])


def test_rank_and_seed_of_a_run_are_checked(byo_csv, tmp_path):
    spec = _spec(byo_csv, tmp_path, method="lora")
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        run_one(spec, tmp_path / "r", rank=0, progress=False)
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        run_one(spec, tmp_path / "r", seed=-1, progress=False)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_events_hold_loss_sigma_and_lr(byo_csv, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = _spec(byo_csv, tmp_path, **{"method": "flat-lora", "flat.sigma": 0.5, "train.batch_size": 16, "train.max_steps": 3})
    run_one(spec, tmp_path / "r", progress=False)
    ev = EventAccumulator(str(tmp_path / "r" / "tb"))
    ev.Reload()
    rows = _curve(tmp_path / "r")
    for tag, col in (("train/loss", "loss"), ("train/sigma", "sigma"), ("train/lr", "lr")):
        got = [(e.step, e.value) for e in ev.Scalars(tag)]
        assert got == [(int(r["step"]), pytest.approx(float(r[col]), rel=1e-4, abs=1e-5)) for r in rows], tag
    run_one(spec.replace(tensorboard=False), tmp_path / "r2", progress=False)
    assert not (tmp_path / "r2" / "tb").exists()


def test_without_tensorboard_a_run_skips_the_events_cleanly(byo_csv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it now raises ImportError
    rec = run_one(_spec(byo_csv, tmp_path, method="lora"), tmp_path / "r", progress=False)
    assert rec["status"] == "done" and not (tmp_path / "r" / "tb").exists() and _curve(tmp_path / "r")


def test_source_hash_names_the_code_that_ran(tmp_path):
    """The provenance hash covers every .py file's path and bytes: a changed byte or a renamed file changes it."""
    from flatlora.experiments.runner import source_hash, versions

    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not code")
    first = source_hash(tmp_path)
    assert len(first) == 16 and first == source_hash(tmp_path)
    (tmp_path / "notes.txt").write_text("still not code")
    assert source_hash(tmp_path) == first
    (tmp_path / "b.py").write_text("y = 3\n")
    changed = source_hash(tmp_path)
    assert changed != first
    (tmp_path / "b.py").rename(tmp_path / "c.py")
    assert source_hash(tmp_path) not in (first, changed)
    assert versions()["flatlora_source_sha256"] == source_hash()


def test_a_nan_first_forward_names_its_first_module_instead_of_blaming_the_lr(byo_csv, tmp_path):
    import torch

    from flatlora.experiments.tasks import create_task

    spec = _spec(byo_csv, tmp_path, **{"train.max_steps": 2, "method": "lora"})
    task = create_task(spec.task, model=spec.model, **spec.task_args)
    build = task.build_model

    def broken_base():  # one frozen bias of the base model is nan, as a broken checkpoint would be
        model = build()
        name = next(n for n, _ in model.named_parameters() if n.endswith("layer.0.attention.self.query.bias"))
        with torch.no_grad():
            model.get_parameter(name)[0] = float("nan")
        return model

    task.build_model = broken_base
    rec = run_one(spec, tmp_path / "r", task=task, progress=False)
    assert rec["status"] == "failed"
    assert rec["failure"] == ("diverged: the loss became nan at step 0, before any update: the untrained model's forward "
                              "is non-finite (first at base_model.model.bert.encoder.layer.0.attention.self.query."
                              "base_layer, a Linear); check the base weights and lora.targets")
