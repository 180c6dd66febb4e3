"""The engine a trainer callback owns: its settings, the seed it follows, its build and its teardown.

Both trainer callbacks (`hf`, `lightning`) take a FlatLoRAConfig and/or keyword overrides, build a fresh
engine with a `CleanWeightsGuard` on the model each time training starts, and tear the previous one down
first. The noise seed follows the trainer's seed (`TrainingArguments.seed`, Lightning's `seed_everything`)
unless the user gave one: a `seed=` keyword, or a config whose seed is not the default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..config import FlatLoRAConfig
from ..core.engine import FlatLoRA
from ._guard import CleanWeightsGuard

DEFAULT_SEED = FlatLoRAConfig().seed


class CallbackEngine:
    """The settings of a callback and the engine and guard it built last.

    Args:
        config: a FlatLoRAConfig (copied, never edited) or None; `overrides` replace its fields (or build one).

    Attributes:
        config: the callback's own copy of the settings (seed and total_steps as given).
        seed_explicit: whether the user chose the seed (else it follows the trainer's).
        flat: the engine built last (None before `build`; after `drop` still there to read, closed).
        guard: its CleanWeightsGuard (None before `build` and after `drop`).
    """

    def __init__(self, config: FlatLoRAConfig | None, overrides: dict[str, Any]):
        if config is None:
            config = FlatLoRAConfig(**overrides)
        elif not isinstance(config, FlatLoRAConfig):
            raise ValueError(f"config must be a FlatLoRAConfig, got {type(config).__name__}")
        else:  # a copy: the callback resolves total_steps and seed and must not edit the caller's object
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.seed_explicit = "seed" in overrides or config.seed != DEFAULT_SEED
        self.flat: FlatLoRA | None = None
        self.guard: CleanWeightsGuard | None = None

    def seed(self, trainer_seed: int | None) -> int:
        """The noise seed: the one the user chose, else `trainer_seed`, else the config's default."""
        if self.seed_explicit or trainer_seed is None:
            return self.config.seed
        return int(trainer_seed)

    def build(self, model: nn.Module, trainer_seed: int | None, total_steps: int | None = None) -> FlatLoRA:
        """Drop the previous engine, then build one on `model` with the resolved seed (and `total_steps`
        when the config leaves it unset) and put a guard on it."""
        self.drop()
        config = dataclasses.replace(self.config, seed=self.seed(trainer_seed))
        self.flat = FlatLoRA(model, config)
        if self.config.total_steps is None and total_steps is not None:
            self.flat.set_total_steps(int(total_steps))
        self.guard = CleanWeightsGuard(self.flat)
        return self.flat

    def drop(self) -> None:
        """Close any window, take the guard's hooks off the model and close the engine (its hooks too)."""
        if self.guard is not None:
            self.guard.remove()
            self.guard = None
        if self.flat is not None:
            self.flat.close()


class EngineOwner:
    """What a trainer callback shows of the CallbackEngine it keeps in `self._engine`."""

    _engine: CallbackEngine

    @property
    def flat(self) -> FlatLoRA | None:
        """The engine of the current (or last) training run."""
        return self._engine.flat

    @property
    def _guard(self) -> CleanWeightsGuard | None:
        return self._engine.guard
