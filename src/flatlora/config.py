"""FlatLoRAConfig: every knob of the Flat-LoRA engine, validated at construction.

Field names are flat so that host configs can carry them with a prefix (`flatlora_sigma: 0.05` in an
axolotl/LLaMA-Factory style YAML, `--flatlora_sigma` through HfArgumentParser): see `from_dict`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
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

    def __post_init__(self):
        _check_number("sigma", self.sigma)
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0 (a noise scale relative to row norms, e.g. 0.05), got {self.sigma}")
        if self.total_steps is not None:
            _check_int("total_steps", self.total_steps)
            if self.total_steps <= 0:
                raise ValueError(f"total_steps must be a positive number of optimizer steps, got {self.total_steps}")
        _check_int("seed", self.seed)
        _check_choice("schedule", self.schedule, list_schedules())
        _check_choice("noise", self.noise, list_noises())
        _check_choice("mode", self.mode, MODES)
        _check_choice("target", self.target, TARGETS)
        _check_choice("bn_policy", self.bn_policy, BN_POLICIES)
        _check_choice("generator", self.generator, GENERATORS)
        if not isinstance(self.per_rank_noise, bool):
            raise ValueError(f"per_rank_noise must be True or False, got {self.per_rank_noise!r}")
        self.include = _check_patterns("include", self.include)
        self.exclude = _check_patterns("exclude", self.exclude)

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


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")


def _check_choice(name: str, value: Any, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}, got {value!r}")


def _check_patterns(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name} must be a list of fnmatch patterns on module names (e.g. ['*q_proj']), got {value!r}")
    return list(value)
