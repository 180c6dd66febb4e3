"""QLoRA bases in the runner (`quant.type`): a quantized compare of LoRA vs Flat-LoRA end to end on CPU
(bitsandbytes' CPU backend), the packed base untouched by Flat-LoRA training, and the one-line errors."""

import json

import pytest
import torch

from flatlora.experiments import fetch
from flatlora.experiments.spec import ExperimentSpec, SpecError

bnb = pytest.importorskip("bitsandbytes")
needs_math_data = pytest.mark.skipif(not fetch.status()["math-data"],
                                     reason="needs `python -m flatlora.experiments.fetch math-data` (make test fetches it)")
SMALL = {"train_size": 16, "dev_size": 4, "test_size": 4, "ood_size": 4, "max_new_tokens": 4}


def qspec(tmp_path, quant="nf4", **extra) -> ExperimentSpec:
    d = {"task": "reasoning-arith", "model": "tiny-llama", "methods": ["lora", "flat-lora"], "seeds": [0],
         "task_args": SMALL, "quant": {"type": quant}, "plot": False, "tensorboard": False,
         "out_dir": str(tmp_path / "out"), "flat": {"sigma": 0.1},
         "train": {"max_steps": 3, "batch_size": 8, "device": "cpu", "threads": 1, "lr": 1e-2}}
    d.update(extra)
    return ExperimentSpec.from_dict(d)


def packed(model) -> dict[str, list[torch.Tensor]]:
    """Bytes of every quantized weight and the statistics that define it."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            qs = mod.weight.quant_state
            parts = [mod.weight.data, qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            parts = [mod.weight.data, mod.state.SCB if mod.state.SCB is not None else mod.weight.SCB]
        else:
            continue
        out[name] = [t.detach().reshape(-1).contiguous().view(torch.uint8).clone() for t in parts]
    return out


@needs_math_data
def test_quantized_compare_of_lora_and_flat_lora_runs_end_to_end(tmp_path):
    from safetensors.torch import load_file

    from flatlora.experiments.compare import compare

    compare(qspec(tmp_path), progress=False, log=lambda s: None)
    runs = tmp_path / "out" / "runs"
    for name, mode in (("lora_r8_s0", None), ("flat-lora_r8_s0", "forward")):
        rec = json.loads((runs / name / "metrics.json").read_text())
        assert rec["status"] == "done", rec["failure"]
        assert rec["flatlora_mode"] == mode  # auto picks forward on the 4-bit layers
        assert rec["run_key"]["quant"] == {"type": "nf4", "double_quant": True, "compute_dtype": "auto",
                                           "gradient_checkpointing": False}
        assert set(rec["metrics"]) >= {"test/exact_match", "dev/exact_match"}
        # The adapter and the trainable tensors only: no 4-bit statistics (absmax, quant_map) of the frozen base.
        saved = load_file(str(runs / name / "weights.safetensors"))
        assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)[:3]
        assert len(saved) == 2 * 7 * 2  # A and B of the seven projections of both layers
        assert (runs / name / "adapter" / "adapter_model.safetensors").exists()
        cfg = json.loads((runs / name / "adapter" / "adapter_config.json").read_text())
        assert "flatlora-qbase" not in str(cfg.get("base_model_name_or_path"))  # not the temporary checkpoint
    assert (runs / "flat-lora_r8_s0" / "adapter" / "flatlora_config.json").exists()
    # Same seed: the two methods start from the same A (and B = 0), so any difference is the noise's.
    a = load_file(str(runs / "lora_r8_s0" / "weights.safetensors"))
    b = load_file(str(runs / "flat-lora_r8_s0" / "weights.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@needs_math_data
@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_flat_lora_training_leaves_the_packed_base_byte_identical(tmp_path, quant):
    from flatlora.experiments.methods import get_method
    from flatlora.experiments.runner import _Log, _setup, _train
    from flatlora.experiments.tasks import create_task

    spec = qspec(tmp_path, quant, train={"max_steps": 6, "batch_size": 4, "device": "cpu", "threads": 1, "lr": 1e-2})
    task = create_task(spec.task, model=spec.model, **spec.task_args)
    run = _setup(spec, get_method("flat-lora"), 8, 0, task, torch.device("cpu"))
    assert run.flat.mode == "forward"
    with torch.no_grad():  # bitsandbytes' CPU backend repacks a 4-bit weight at its first forward: before the snapshot
        task.loss(run.model, next(task.batches(4, 0, 0)))
    before = packed(run.model)
    assert len(before) == 2 * 7
    lora_before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    assert _train(run, _Log(tmp_path, run, progress=False, position=0)) is None
    after = packed(run.model)
    assert before.keys() == after.keys()
    for k in before:
        assert all(torch.equal(x, y) for x, y in zip(before[k], after[k])), f"{k}: packed bytes changed"
    moved = [n for n, p in run.model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert len(moved) == len(lora_before)  # every A and B trained
    assert run.flat.sigma_at(5) > 0


def test_unknown_quant_type_names_the_accepted_values(tmp_path):
    with pytest.raises(SpecError, match=r"^quant.type must be one of nf4 \| fp4 \| int8, or null, got 'nf8'"):
        qspec(tmp_path, "nf8")


def test_inplace_mode_on_a_quantized_base_is_refused_with_the_fix(tmp_path):
    with pytest.raises(SpecError, match=r"flat.mode=inplace cannot run on a quant.type=nf4 base .*use flat.mode=auto or forward"):
        qspec(tmp_path, flat={"sigma": 0.1, "mode": "inplace"})


def test_missing_bitsandbytes_is_named_with_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    from flatlora.experiments.quant import check_quantization

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"^quant.type=nf4 needs bitsandbytes, which is not installed: pip install bitsandbytes"):
        check_quantization(qspec(tmp_path), task=object())


def test_a_task_whose_model_cannot_be_quantized_fails_before_training(tmp_path, byo_csv):
    from flatlora.experiments.compare import compare

    spec = ExperimentSpec.from_dict({"task": "byo-text", "model": "tiny-bert", "quant": {"type": "nf4"},
                                     "task_args": {"path": str(byo_csv), "text_column": "sentence", "label_column": "sentiment"},
                                     "out_dir": str(tmp_path / "out"), "train": {"max_steps": 1, "device": "cpu"}})
    with pytest.raises(ValueError, match=r"^quant.type=nf4: task 'byo-text' builds a model that cannot be quantized .*remove quant.type"):
        compare(spec, progress=False, log=lambda s: None)
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained, nothing written


def test_run_key_of_an_unquantized_spec_is_unchanged(tmp_path):
    from flatlora.experiments.runner import RUN_FIELDS, run_key

    key = run_key(qspec(tmp_path, None))
    assert "quant" not in key and set(key) == set(RUN_FIELDS)  # runs finished before `quant` existed still resume
