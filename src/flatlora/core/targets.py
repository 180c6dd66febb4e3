"""What gets noise: the weights of PEFT LoRA layers (or plain Linear/Conv layers), seen as m x n matrices.

Each `Target` presents one frozen weight in its logical layout: m = output units ("filters"), n = the
inputs of one unit (in_features, or in_channels/groups * kh * kw for a convolution), whatever the
storage layout (HF `Conv1D`/`fan_in_fan_out` stores (in, out)). It also exposes the active, unmerged
adapters' low-rank update s * B @ A as factors, so the merged weight W' = W + s * B @ A is never built.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..rng import layer_id
from .view import PLAIN, matrix, storage

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# LoRA layer types whose base is not a matrix map; reported as skipped, never silently dropped.
_UNSUPPORTED_BASES = (nn.Embedding, nn.MultiheadAttention)


@dataclass
class Target:
    """One perturbed weight.

    `lora` is the PEFT layer (None for plain modules); `base` is the module whose forward uses
    `base.weight`; `transposed` marks (in, out) storage; `dequantize` rebuilds a dense weight from a
    quantized one (forward mode only).
    """

    name: str
    base: nn.Module
    lora: nn.Module | None
    kind: str  # "linear" | "conv"
    transposed: bool
    m: int
    n: int
    dequantize: Callable[[], torch.Tensor] | None = None

    def __post_init__(self):
        self.layer_id = layer_id(self.name)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def quantized(self) -> bool:
        return self.dequantize is not None

    @property
    def quantization(self) -> str | None:
        """How a quantized base stores its weight ("bitsandbytes 4-bit nf4 (double quant)", ...); None if dense."""
        return _quantization(self.weight) if self.quantized else None

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a dense float tensor in storage layout (dequantized if needed)."""
        return self.dequantize() if self.dequantize is not None else self.weight

    def as_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """Storage layout -> logical (m, n) view (see flatlora.core.view)."""
        return matrix(self, w)

    def to_storage(self, mat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Logical (m, n) -> a view with the storage shape of `like` (see flatlora.core.view)."""
        return storage(self, mat, like)

    def adapters(self) -> list[str]:
        """Active adapters whose update is not already inside W (merged ones are, so they are skipped)."""
        lora = self.lora
        if lora is None or getattr(lora, "disable_adapters", False):
            return []
        merged = getattr(lora, "merged_adapters", ())
        lora_a = _submodule(lora, "lora_A")
        return [a for a in lora.active_adapters if a in lora_a and a not in merged]

    def terms(self) -> tuple[tuple[torch.Tensor, torch.Tensor, float] | None, torch.Tensor | None]:
        """The active adapters' update in one pass: `(B [m, R], A [R, n], s)` with s * B @ A the sum of the
        plain low-rank products, and the (m, n) sum of the adapters that have no factor form (grouped convs,
        unknown LoRA kinds); None for either when there is none. A single adapter's B and A are its parameters
        themselves (no copy, no launch: the Triton row std reads them and applies s); several are
        concatenated in float32 with their scalings folded into B (s = 1)."""
        facs, dense = [], None
        for a in self.adapters():
            fac = _factors(self.lora, a, self)
            if fac is None:
                d = self.as_matrix(self.lora.get_delta_weight(a).float().reshape(self.weight.shape))
                dense = d if dense is None else dense + d
            else:
                facs.append(fac)
        if len(facs) <= 1:
            return (facs[0] if facs else None), dense
        return (torch.cat([b.float() * s for b, _, s in facs], 1), torch.cat([a.float() for _, a, _ in facs], 0), 1.0), dense


# This module's per-step functions run for every layer at every step (the host time of a launch-bound model), so
# they look submodules and parameters up where nn.Module keeps them: `module.name` goes through Module.__getattr__
# after a failed instance lookup, and hasattr on a plain tensor raises and catches an AttributeError.


def _submodule(module: nn.Module, name: str):
    sub = module._modules.get(name)
    return sub if sub is not None else getattr(module, name)


def _param(x) -> torch.Tensor:
    p = x
    if isinstance(x, nn.Module):
        # where attribute lookup finds it: the instance dict (a plain tensor set there, as FSDP1's unsharded
        # views are), else the registered parameter, else whatever the class provides
        p = x.__dict__.get("weight")
        if p is None:
            # indexed, not .get(): DeepSpeed ZeRO-3's _parameters gathers a partitioned parameter in __getitem__
            ps = x._parameters
            p = ps["weight"] if "weight" in ps else None
        if p is None:
            p = x.weight
    if type(p) in PLAIN:
        return p
    # Sharded adapters (FSDP2 DTensors) are tiny: gather them whole.
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _factors(lora: nn.Module, adapter: str, t: Target):
    """(B [m, r], A [r, n], scale) of one adapter, or None if it is not a plain low-rank product."""
    A = _param(_submodule(lora, "lora_A")[adapter])
    B = _param(_submodule(lora, "lora_B")[adapter])
    scale = lora.scaling[adapter]
    # AdaLoRA's ParameterDict, looked up where nn.Module keeps submodules: getattr on a plain LoRA layer would
    # go through Module.__getattr__'s AttributeError (this runs for every layer at every step)
    lora_E = lora._modules.get("lora_E")
    if lora_E is not None and adapter in lora_E:  # AdaLoRA: B (A * E) * scaling / (ranknum + 1e-5)
        A = A * lora_E[adapter]
        scale = scale / (lora.ranknum[adapter] + 1e-5)
    if t.kind == "conv" and getattr(t.base, "groups", 1) != 1:
        return None
    if A.dim() != 2:  # conv factors: (r, in, kh, kw) and (out, r, 1, 1)
        A = A.reshape(A.shape[0], -1)
    if B.dim() != 2:
        B = B.reshape(B.shape[0], -1)
    if A.shape[1] != t.n or B.shape != (t.m, A.shape[0]):
        return None
    return B, A, float(scale)


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2 style): weight stored (in, out); matched by name so the
    # core does not import transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


_BNB_PARAMS = ("Params4bit", "Int8Params")  # bitsandbytes' packed weight classes, matched by name (no import)


def _dequantizer(base: nn.Module) -> Callable[[], torch.Tensor] | None:
    """A function rebuilding `base`'s dense weight through PEFT's accessors, or None for a dense float weight."""
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point() and type(w).__name__ not in _BNB_PARAMS:
        return None

    def dequantize() -> torch.Tensor:
        from peft.utils.integrations import dequantize_bnb_weight, dequantize_module_weight

        weight = base.weight
        if type(weight).__name__ in _BNB_PARAMS:
            # PEFT's bitsandbytes accessor (4-bit: the weight's quant_state; 8-bit: the layer's state holds the
            # scales after its first forward). Not dequantize_module_weight: on CPU it re-assigns layer.weight
            # with a new 8-bit parameter on every call, and the engine tracks the parameter it found.
            return dequantize_bnb_weight(weight, state=getattr(base, "state", None))
        return dequantize_module_weight(base)  # HQQ, torchao and whatever else PEFT knows how to dequantize

    return dequantize


def _quantization(w: torch.Tensor) -> str:
    """A short name of how `w` is stored, for messages: "bitsandbytes 4-bit nf4 (double quant)", ..."""
    name = type(w).__name__
    if name == "Params4bit":
        nested = getattr(getattr(w, "quant_state", None), "nested", False)
        return f"bitsandbytes 4-bit {getattr(w, 'quant_type', '?')}" + (" (double quant)" if nested else "")
    if name == "Int8Params":
        return "bitsandbytes 8-bit"
    return f"{name}/{w.dtype}"


def _describe(name: str, base: nn.Module, lora: nn.Module | None) -> Target | str:
    """A Target for `base`, or the reason it cannot be one."""
    if isinstance(base, _UNSUPPORTED_BASES):
        return f"{type(base).__name__} layers are not matrix maps with output rows; not perturbed"
    if isinstance(base, _CONV_TYPES):
        w = base.weight
        return Target(name, base, lora, "conv", False, w.shape[0], w[0].numel())
    if _is_hf_conv1d(base):
        return Target(name, base, lora, "linear", True, base.weight.shape[1], base.weight.shape[0])
    if hasattr(base, "in_features") and hasattr(base, "out_features") and hasattr(base, "weight"):
        transposed = bool(getattr(lora, "fan_in_fan_out", False)) if lora is not None else False
        return Target(name, base, lora, "linear", transposed, base.out_features, base.in_features,
                      dequantize=_dequantizer(base))
    return f"base layer {type(base).__name__} is not a Linear/Conv layer"


def _lora_layer_type():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    return LoraLayer


def _selected(name: str, include, exclude) -> bool:
    cname = name
    if include is not None and not any(fnmatch.fnmatchcase(cname, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(cname, p) for p in exclude))


def find_targets(model: nn.Module, target: str = "lora", include=None, exclude=None) -> tuple[list[Target], dict[str, str]]:
    """All perturbed weights of `model`, and {module name: why it was skipped}.

    target="lora": every PEFT `LoraLayer` (Linear incl. fan_in_fan_out and quantized bases, Conv1d/2d/3d,
    DoRA, AdaLoRA). target="linear": every plain nn.Linear / nn.Conv* / HF Conv1D outside LoRA layers
    (Flat full fine-tuning). `include`/`exclude` are fnmatch patterns on module names.
    """
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    if target == "lora":
        lora_type = _lora_layer_type()
        if lora_type is not None:
            for name, mod in model.named_modules():
                if not isinstance(mod, lora_type) or not _selected(name, include, exclude):
                    continue
                found = _describe(name, mod.get_base_layer(), mod)
                (targets.append(found) if isinstance(found, Target) else skipped.__setitem__(name, found))
        searched = "PEFT LoRA layers (peft.tuners.lora.LoraLayer" + (")" if lora_type else "; peft is not installed)")
        hint = "Wrap the model with peft.get_peft_model first, or pass target='linear' for Flat full fine-tuning."
    else:
        inside_lora = set()
        lora_type = _lora_layer_type()
        if lora_type is not None:
            for name, mod in model.named_modules():
                if isinstance(mod, lora_type):
                    inside_lora.update(n for n, _ in mod.named_modules(prefix=name))
        for name, mod in model.named_modules():
            if name in inside_lora or not _selected(name, include, exclude):
                continue
            if isinstance(mod, (nn.Linear, *_CONV_TYPES)) or _is_hf_conv1d(mod):
                found = _describe(name, mod, None)
                (targets.append(found) if isinstance(found, Target) else skipped.__setitem__(name, found))
        searched = "plain nn.Linear / nn.Conv1d/2d/3d / transformers Conv1D modules outside LoRA layers"
        hint = "Check the include/exclude patterns, or use target='lora' for a PEFT model."
    if not targets:
        n_modules = sum(1 for _ in model.modules())
        raise ValueError(
            f"Flat-LoRA found nothing to perturb: searched {n_modules} modules of {type(model).__name__} for "
            f"{searched} with include={include!r}, exclude={exclude!r}"
            + (f"; skipped {skipped}" if skipped else "") + f". {hint}"
        )
    return targets, skipped
