"""Noise-scale schedules: optimizer step -> factor in [0, 1] multiplying sigma.

Flat-LoRA ramps the noise up with a "cosine increasing" schedule (Li et al., ICML 2025, §4):

    sigma_t = sigma * 0.5 * (1 - cos(pi * p)),   p = t / (total_steps - 1)

t counts optimizer (update) steps from 0, so the first step is noise-free and the last step,
t = total_steps - 1, gets exactly sigma. Counting update steps rather than micro-batches keeps the
ramp right under gradient accumulation, any data-parallel world size, `max_steps` and resume.
"""

from __future__ import annotations

import math
from typing import Callable

from .registry import Registry

Schedule = Callable[[int, int], float]

_SCHEDULES: Registry[Schedule] = Registry("schedule")


def register_schedule(name: str):
    """Add a schedule `f(step, total_steps) -> factor` under `name`; a name can be registered once."""
    return _SCHEDULES.register(name)


def list_schedules() -> list[str]:
    return sorted(_SCHEDULES.names())


def get_schedule(name: str) -> Schedule:
    return _SCHEDULES.get(name)


def progress(step: int, total_steps: int) -> float:
    """Fraction of training done at update `step`: 0 at the first step, 1 at the last (and after)."""
    if total_steps <= 1:
        return 1.0
    return min(max(step, 0), total_steps - 1) / (total_steps - 1)


@register_schedule("cosine_increase")
def cosine_increase(step: int, total_steps: int) -> float:
    """0 at step 0, 1 at the last step, along half a cosine (the paper's noise warm-up)."""
    return 0.5 * (1.0 - math.cos(math.pi * progress(step, total_steps)))


@register_schedule("linear")
def linear(step: int, total_steps: int) -> float:
    """0 at step 0, 1 at the last step, linearly."""
    return progress(step, total_steps)


@register_schedule("constant")
def constant(step: int, total_steps: int) -> float:
    """Full sigma from the first step (no warm-up)."""
    return 1.0
