"""Every integration example runs on its tiny default model (in-process; the scripts' main() with small args)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plain_loop():
    pytest.importorskip("peft")
    assert load("plain_loop").main(steps=6, grad_accum=2)["sigma_last"] == 0.05


def test_hf_trainer(tmp_path):
    pytest.importorskip("transformers")
    out = load("hf_trainer").main(steps=4, output_dir=str(tmp_path))
    assert out["logged"][-1]["flatlora/sigma"] == 0.05 and out["sigma_last"] == 0.05


def test_hf_trainer_cli(tmp_path):
    pytest.importorskip("transformers")
    import json

    from transformers import HfArgumentParser, TrainingArguments

    from flatlora.integrations.hf import FlatLoRAArguments

    out = load("hf_trainer_cli").main([
        "--output_dir", str(tmp_path), "--max_steps", "4", "--seed", "3", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--use_cpu", "--report_to", "none", "--logging_steps", "1",
        "--disable_tqdm", "true", "--flatlora_sigma", "0.1", "--flatlora_include", "*q_proj", "*v_proj"])
    cfg = out["config"]
    assert (cfg.sigma, cfg.seed, cfg.total_steps, cfg.include) == (0.1, 3, 4, ["*q_proj", "*v_proj"])
    assert [h["flatlora/sigma"] for h in out["logged"]][-1] == 0.1
    saved = json.load(open(tmp_path / "flatlora_config.json"))["config"]
    assert saved["seed"] == 3 and (tmp_path / "adapter_config.json").is_file()
    assert "Trained with [Flat-LoRA]" in (tmp_path / "README.md").read_text()
    help_text = HfArgumentParser((TrainingArguments, FlatLoRAArguments)).format_help()
    assert "--flatlora_sigma" in help_text and "noise scale relative to each row's norm" in help_text


def test_trl_sft(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    out = load("trl_sft").main(steps=3, output_dir=str(tmp_path))
    assert out["targets"] == 14 and out["sigmas"][-1] == 0.05  # 7 projections x 2 layers; ramp ends at sigma


def test_lightning_loop():
    pytest.importorskip("flatlora.integrations.lightning")
    assert load("lightning_loop").main(max_steps=6)["flatlora/sigma"] == pytest.approx(0.05)


def test_accelerate_loop():
    pytest.importorskip("accelerate")
    out = load("accelerate_loop").main(epochs=1)
    assert out["steps"] == 8 and out["sigma_last"] == 0.05


def test_torchrun_ddp_single_process(monkeypatch):
    pytest.importorskip("peft")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_PORT", "29541")
    out = load("torchrun_ddp").main(steps=4)
    assert out["world"] == 1 and out["sigma_last"] == 0.05


def test_quickstart_peft():
    pytest.importorskip("transformers")
    out = load("quickstart_peft").main(steps=3, grad_accum=1)
    assert out["sigma_last"] == 0.05 and out["final_loss"] > 0
