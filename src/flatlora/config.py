"""FlatLoRAConfig: every knob of the Flat-LoRA engine, validated whenever a field is set.

Every assignment is checked (at construction, and `cfg.sigma = -1` later raises at that line), rather
than the dataclass being frozen: host code builds and tweaks configs as plain mutable dataclasses
(HfArgumentParser, `cfg.total_steps = ...` before building, `dataclasses.replace`), and a late check
still catches the bad value where it is written. The engine keeps its own read-only copy
(`_read_only`): the targets, mode, backends and noise stream are derived from it when the engine is
built, so a later change there would be ignored or would break replay and resume; it says so instead.

Field names are flat so that host configs can carry them with a prefix (`flatlora_sigma: 0.05` in an
axolotl/LLaMA-Factory style YAML, `--flatlora_sigma` through HfArgumentParser): see `from_dict`.
"""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError, asdict, dataclass, field, fields, replace
from typing import Any

from .noise import list_noises
from .schedules import list_schedules

MODES = ("auto", "inplace", "forward")
TARGETS = ("lora", "linear")
BN_POLICIES = ("auto", "recalibrate", "freeze", "none")
GENERATORS = ("auto", "torch", "philox")


@dataclass
class FlatLoRAConfig:
    sigma: float = field(default=0.05, metadata={"help": "noise scale relative to each row's norm (the paper's rho/sigma)"})
    total_steps: int | None = field(
        default=None,
        metadata={"help": "optimizer steps in the run; the ramp reaches sigma at step total_steps-1. "
                  "Trainer callbacks fill it from max_steps"},
    )
    schedule: str = field(default="cosine_increase", metadata={"help": f"one of {list_schedules()}"})
    noise: str = field(default="filter", metadata={"help": f"one of {list_noises()}: per-row (paper) or per-layer std"})
    mode: str = field(
        default="auto",
        metadata={"help": "inplace: add noise to W for the window and restore it exactly; forward: W is never "
                  "written, layers compute with W+eps and regenerate eps in backward; auto: inplace for dense "
                  "float weights, forward otherwise"},
    )
    seed: int = field(default=0, metadata={"help": "noise seed; the noise is a pure function of (seed, step, layer)"})
    target: str = field(default="lora", metadata={"help": "lora: PEFT LoRA layers; linear: plain Linear/Conv weights (Flat full fine-tuning)"})
    include: list[str] | None = field(default=None, metadata={"help": "fnmatch patterns on module names to keep"})
    exclude: list[str] | None = field(default=None, metadata={"help": "fnmatch patterns on module names to drop"})
    per_rank_noise: bool = field(default=False, metadata={"help": "each data-parallel rank draws its own noise"})
    bn_policy: str = field(
        default="auto",
        metadata={"help": "BatchNorm running stats: freeze = no updates while noise is on; recalibrate = freeze, "
                  "then recompute them with clean weights (recalibrate_batchnorm); none = paper (noisy stats); "
                  "auto = recalibrate when the model has BatchNorm"},
    )

    generator: str = field(
        default="auto",
        metadata={"help": "noise stream: philox = counter-based Philox4x32 (element (i, j) a function of (key, i*n+j), "
                  "so shards draw only their rows; fused Triton kernels on CUDA, pure torch elsewhere); torch = a "
                  "private torch.Generator per (seed, step, layer), full m x n draw; auto = philox on CUDA when "
                  "triton is importable, else torch"},
    )

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_read_only_"):
            raise FrozenInstanceError(
                f"cannot set {name}: a FlatLoRA engine's config is read-only (its targets, mode, backends and noise "
                f"stream were derived from it when it was built). Use flat.set_total_steps(n) for total_steps; for "
                f"anything else close the engine and build a new FlatLoRA with dataclasses.replace(flat.config, {name}=...)."
            )
        check = _CHECKS.get(name)
        object.__setattr__(self, name, value if check is None else check(name, value))

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles are ordinary, mutable configs.
        return {k: v for k, v in self.__dict__.items() if k != "_read_only_"}

    def _read_only(self) -> "FlatLoRAConfig":
        """A copy that refuses assignment (the engine's own)."""
        copy = replace(self)
        object.__setattr__(copy, "_read_only_", True)
        return copy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], prefix: str = "") -> "FlatLoRAConfig":
        """Build from a mapping; with `prefix="flatlora_"` keys like `flatlora_sigma` are read and others ignored."""
        names = {f.name for f in fields(cls)}
        if prefix:
            d = {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown FlatLoRAConfig field(s) {unknown}; accepted: {sorted(names)}")
        return cls(**d)


def _check_number(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_int(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return value


def _check_choice(name: str, value: Any, accepted) -> Any:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}, got {value!r}")
    return value


def _check_sigma(name: str, value: Any) -> Any:
    _check_number(name, value)
    if value < 0:
        raise ValueError(f"sigma must be >= 0 (a noise scale relative to row norms, e.g. 0.05), got {value}")
    return value


def _check_total_steps(name: str, value: Any) -> Any:
    if value is not None:
        _check_int(name, value)
        if value <= 0:
            raise ValueError(f"total_steps must be a positive number of optimizer steps, got {value}")
    return value


def _check_bool(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _choice(accepted):
    return lambda name, value: _check_choice(name, value, accepted() if callable(accepted) else accepted)


def _check_patterns(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name} must be a list of fnmatch patterns on module names (e.g. ['*q_proj']), got {value!r}")
    return list(value)


# Field -> check(name, value) returning the value to store (include/exclude normalise a string to a list).
# Schedules and noises are looked up when checked, so rules registered later are accepted.
_CHECKS = {
    "sigma": _check_sigma,
    "total_steps": _check_total_steps,
    "schedule": _choice(list_schedules),
    "noise": _choice(list_noises),
    "mode": _choice(MODES),
    "seed": _check_int,
    "target": _choice(TARGETS),
    "include": _check_patterns,
    "exclude": _check_patterns,
    "per_rank_noise": _check_bool,
    "bn_policy": _choice(BN_POLICIES),
    "generator": _choice(GENERATORS),
}
