"""Methods compared by the runner: LoRA and its variants (paper Table 4), full fine-tuning, SAM baselines,
and the Flat- version of each (the same method with the Flat-LoRA engine switched on).

Variants come from PEFT itself: DoRA (`use_dora`), PiSSA (`init_lora_weights="pissa"`), LoRA-GA
(`init_lora_weights="lora_ga"` after `peft.preprocess_loraga`), rsLoRA (`use_rslora`) and LoRA+
(`peft.optimizers.create_loraplus_optimizer`). SAM baselines (paper v2 Table 6) live in
`flatlora.baselines.sam`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..registry import Registry

ADAPTERS = ("lora", "dora", "pissa", "lora-ga", "rslora", "lora+", "full")


@dataclass(frozen=True)
class Method:
    name: str
    adapter: str                 # one of ADAPTERS
    flat: bool = False           # Flat-LoRA engine on
    sam: str | None = None       # None | "ab" (LoRA-SAM on A, B) | "w" (SAM on the merged weight)
    help: str = ""

    @property
    def full(self) -> bool:
        return self.adapter == "full"


_METHODS: Registry[Method] = Registry("method")


def register_method(method: Method) -> Method:
    if method.adapter not in ADAPTERS:
        raise ValueError(f"method {method.name!r}: adapter must be one of {ADAPTERS}, got {method.adapter!r}")
    return _METHODS.add(method.name, method)


def get_method(name: str) -> Method:
    return _METHODS.get(name)


def list_methods() -> list[str]:
    return _METHODS.names()


def paired_baseline(name: str) -> str | None:
    """The method a result is compared with by default: flat-X -> X, SAM baselines -> lora."""
    m = get_method(name)
    if m.flat:
        return m.name[len("flat-"):]
    if m.sam:
        return "lora"
    return None


_HELP = {
    "lora": "LoRA (Hu et al. 2022)",
    "dora": "DoRA: weight-decomposed LoRA (PEFT use_dora)",
    "pissa": "PiSSA: LoRA initialised from the principal singular vectors (PEFT init_lora_weights='pissa')",
    "lora-ga": "LoRA-GA: LoRA initialised from gradient SVD (PEFT preprocess_loraga)",
    "rslora": "rsLoRA: scale alpha/sqrt(r) (PEFT use_rslora)",
    "lora+": "LoRA+: lr of B = ratio x lr of A (PEFT create_loraplus_optimizer)",
    "full": "full fine-tuning (every parameter trained, lr = train.full_lr)",
}
for _a in ADAPTERS:
    register_method(Method(_a, _a, help=_HELP[_a]))
    _where = "every Linear/Conv weight" if _a == "full" else "the adapted weights W + sBA"
    register_method(Method(f"flat-{_a}", _a, flat=True, help=f"{_a} + Flat-LoRA noise on {_where}"
                           + (" (the paper's method)" if _a == "lora" else "")))
register_method(Method("lora-sam", "lora", sam="ab", help="LoRA-SAM: SAM on the adapter parameters A, B (rho = sam_rho_ab)"))
register_method(Method("sam-w", "lora", sam="w", help="LoRA + SAM on the merged weight W + sBA (rho = sam_rho_w)"))


def lora_config(method: Method, *, r: int, alpha: float, dropout: float, targets: Any, modules_to_save: Any,
                task_type: str | None = None):
    """The PEFT LoraConfig of an adapter method (task_type="CAUSAL_LM" gives the PEFT model `generate`)."""
    import peft

    kw: dict[str, Any] = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                              modules_to_save=modules_to_save, task_type=task_type)
    if method.adapter == "dora":
        kw["use_dora"] = True
    elif method.adapter == "pissa":
        kw["init_lora_weights"] = "pissa"
    elif method.adapter == "rslora":
        kw["use_rslora"] = True
    elif method.adapter == "lora-ga":
        kw["init_lora_weights"] = "lora_ga"
        kw["lora_ga_config"] = peft.LoraGAConfig()
    return peft.LoraConfig(**kw)


# Initialisations PEFT computes for its Linear layer only. On any other layer kind PEFT raises for PiSSA
# ("Unknown initialization init_lora_weights='pissa'") and silently falls back to the plain LoRA init for
# LoRA-GA, so a LoRA-GA run on a conv net would be plain LoRA under another name: both are refused up front.
LINEAR_ONLY = {"pissa": "PiSSA's SVD initialisation", "lora-ga": "LoRA-GA's gradient-SVD initialisation"}
# Adapters that cannot work on some layers, checked against the targeted ones by `check_targets`.
LAYER_CHECKED = frozenset({*LINEAR_ONLY, "dora"})


def _linear_like(module: nn.Module) -> bool:
    """A layer PEFT wraps as lora.Linear: nn.Linear (bitsandbytes' 4/8-bit layers subclass it) or GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _targeted(model: nn.Module, targets: Any) -> list[tuple[str, nn.Module]]:
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = peft.LoraConfig(target_modules=targets)  # PEFT's own name matching (list suffixes, regex strings)
    return [(name, m) for name, m in model.named_modules() if name and check_target_module_exists(probe, name)]


def _check_dora_norms(method: Method, targeted: list[tuple[str, nn.Module]]) -> None:
    """DoRA rescales each output filter by magnitude / ||W_i + sBA_i||, initialised to ||W_i||: a filter with
    ||W_i|| = 0 (pruned, dead) gives 0 / 0 = nan at the very first forward, whatever the lr (PEFT does not
    check). Computed as PEFT does, in the weight's dtype on its device."""
    bad = []
    for name, m in targeted:
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() < 2 or w.device.type == "meta":
            continue  # quantized (packed) or absent weights: PEFT dequantizes them, nothing to check here
        if type(m).__name__ == "Conv1D":  # GPT-2's Conv1D stores (in, out): its output filters are the columns
            w = w.t()
        with torch.no_grad():
            norms = w.flatten(1).norm(p=2, dim=1) if w.dim() > 2 else torch.linalg.norm(w, dim=1)
            n = int((~(norms > 0) | ~torch.isfinite(norms)).sum())  # 0, nan or inf
        if n:
            bad.append((name, n, w.shape[0]))
    if bad:
        name, n, rows = bad[0]
        raise ValueError(f"method {method.name!r}: DoRA divides each output filter by its norm ||W_i||, and {sum(b[1] for b in bad)} "
                         f"filter(s) of {len(bad)} targeted layer(s) have norm 0 or non-finite (first {name}: {n} of "
                         f"{rows}), which makes the first forward nan: leave those layers out of lora.targets, or "
                         "use lora instead of dora")


def check_targets(method: Method, model: nn.Module, targets: Any) -> None:
    """Refuse, in one line naming the layers and the fix, a method that cannot work on the layers `targets`
    (PEFT target_modules) selects in `model`: PiSSA/LoRA-GA on a non-Linear layer (their PEFT initialisation
    is Linear-only), DoRA on a layer with a zero-norm filter. Call it on the bare model."""
    if method.full or targets is None or method.adapter not in LAYER_CHECKED:
        return
    targeted = _targeted(model, targets)
    if method.adapter == "dora":
        return _check_dora_norms(method, targeted)
    what = LINEAR_ONLY[method.adapter]
    other: dict[str, list[str]] = {}
    for name, module in targeted:
        if not _linear_like(module):
            other.setdefault(type(module).__name__, []).append(name)
    if other:
        n = sum(len(v) for v in other.values())
        first = [x for v in other.values() for x in v][:3]
        kinds = ", ".join(f"{len(v)} {k}" for k, v in other.items())
        raise ValueError(f"method {method.name!r}: {what} exists in PEFT for Linear layers only, but lora.targets "
                         f"selects {kinds} layer{'s' if n > 1 else ''} ({', '.join(first)}{', ...' if n > 3 else ''}): "
                         f"set lora.targets to Linear layers only, or leave {method.adapter}/flat-{method.adapter} out "
                         "of methods")


def prepare_model(method: Method, model: nn.Module, *, lora_cfg=None, grad_step: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Wrap `model` for `method`: PEFT adapters, or every parameter trainable for full fine-tuning.

    Args:
        grad_step: LoRA-GA only: runs forward + backward of a few training batches on the given model
            (its gradients pick the initial subspace).
    """
    if method.full:
        model.requires_grad_(True)
        return model
    import peft

    check_targets(method, model, lora_cfg.target_modules)
    if method.adapter == "lora-ga":
        if grad_step is None:
            raise ValueError("lora-ga needs training batches to estimate gradients (grad_step)")
        peft.preprocess_loraga(model, lora_cfg, lambda: grad_step(model))
        model.zero_grad(set_to_none=True)
    return peft.get_peft_model(model, lora_cfg)


def create_optimizer(method: Method, model: nn.Module, *, lr: float, weight_decay: float, loraplus_ratio: float):
    """AdamW over the trainable parameters (LoRA+ gives B a `loraplus_ratio` times larger lr)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {method.name!r} left no trainable parameter: check lora.targets")
    if method.adapter == "lora+":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_ratio,
                                         weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
