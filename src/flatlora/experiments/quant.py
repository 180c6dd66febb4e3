"""QLoRA bases for the runner (`quant: {type: nf4}` in a spec): the frozen base quantized by bitsandbytes
through transformers' BitsAndBytesConfig, then peft.prepare_model_for_kbit_training, LoRA on top.

The task builds its base in full precision as always (a tiny random config, a local folder, or the SmolLM2
gguf, which transformers dequantizes on load and cannot combine with a quantization config); that model is
written to a temporary checkpoint folder and read back with `from_pretrained(..., quantization_config=...)`
onto the run's device, so the quantization is transformers' own (its choice of modules to keep in full
precision, lm_head and tied embeddings included) whatever the source. The seeded init is unchanged: the full
precision build draws from the global RNG exactly as an unquantized run does, and reading a checkpoint back
draws nothing.

Flat-LoRA runs on such a base in forward mode (`flat.mode: auto` picks it; `inplace` is refused by the spec):
the packed weight is never written. Results folders hold the adapter (adapter/ and weights.safetensors, the
trainable tensors only); nothing is merged, since merging into a 4-bit weight would re-quantize it.
"""

from __future__ import annotations

import importlib.util
import tempfile
from typing import Any

import torch
from torch import nn

from .spec import ExperimentSpec


def check_quantization(spec: ExperimentSpec, task: Any) -> None:
    """Before anything trains: bitsandbytes importable, and a task whose model can be quantized."""
    q = spec.quant.type
    if q is None:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quant.type={q} needs bitsandbytes, which is not installed: pip install bitsandbytes "
                         "(or set quant.type=null for a full-precision base)")
    if not getattr(task, "quantizable", False):
        raise ValueError(f"quant.type={q}: task {spec.task!r} builds a model that cannot be quantized (only causal-LM "
                         "tasks, e.g. reasoning-arith, gsm-templates): remove quant.type")


def compute_dtype(spec: ExperimentSpec, device: torch.device) -> torch.dtype:
    """The 4-bit layers' matmul dtype: quant.compute_dtype, or (auto) bfloat16 on CUDA as QLoRA does and the
    run's train.dtype elsewhere (bitsandbytes' CPU backend dequantizes to it)."""
    name = spec.quant.compute_dtype
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else getattr(torch, spec.train.dtype)
    return getattr(torch, name)


def bnb_config(spec: ExperimentSpec, device: torch.device):
    """transformers.BitsAndBytesConfig of the spec's `quant` section."""
    from transformers import BitsAndBytesConfig

    q = spec.quant
    if q.type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.type, bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(spec, device))


def quantized_base(model: nn.Module, spec: ExperimentSpec, device: torch.device) -> nn.Module:
    """`model` (full precision, from the task) quantized onto `device` the QLoRA way, ready for LoRA."""
    from peft import prepare_model_for_kbit_training
    from safetensors.torch import save_model

    if not hasattr(model, "config") or not hasattr(type(model), "from_pretrained"):
        raise ValueError(f"quant.type={spec.quant.type}: the task's model ({type(model).__name__}) is not a transformers "
                         "model, so bitsandbytes cannot load it quantized: remove quant.type")
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):  # a gguf source records its own (dequantized) quantization
        del config.quantization_config
    dtype, cls, source = getattr(torch, spec.train.dtype), type(model), model.config._name_or_path
    with tempfile.TemporaryDirectory(prefix="flatlora-qbase-") as folder:
        config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        # save_model keeps one copy of tied tensors (lm_head = embed_tokens) and from_pretrained re-ties them.
        save_model(model.to(dtype), f"{folder}/model.safetensors")
        del model
        q = cls.from_pretrained(folder, quantization_config=bnb_config(spec, device), dtype=dtype,
                                device_map={"": _map_target(device)})
    q.config._name_or_path = q.name_or_path = source  # adapter_config.json names the real base, not the temp folder
    _check_cpu_blocks(q, spec, device)
    q = prepare_model_for_kbit_training(q, use_gradient_checkpointing=spec.quant.gradient_checkpointing)
    return q.train()


def _check_cpu_blocks(model: nn.Module, spec: ExperimentSpec, device: torch.device, block: int = 64) -> None:
    """bitsandbytes' CPU backend repacks a 4-bit weight in blocks of 64 inputs at its first forward and fails
    deep inside for a layer with fewer or a ragged number of inputs; say so before training."""
    if device.type != "cpu" or spec.quant.type == "int8":
        return
    import bitsandbytes as bnb

    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit) and m.in_features % block:
            raise ValueError(f"quant.type={spec.quant.type} on CPU: layer {name} has {m.in_features} inputs, and "
                             f"bitsandbytes' CPU backend needs a multiple of {block}: train on CUDA "
                             "(train.device=cuda) or use a model whose layers are that wide")



def _map_target(device: torch.device) -> int | str:
    """A device_map value: the GPU index for CUDA (bare `cuda` = the current device), else the device name."""
    if device.type == "cuda":
        return torch.cuda.current_device() if device.index is None else device.index
    return str(device)
