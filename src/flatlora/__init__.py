"""flatlora: Flat-LoRA (Li et al., ICML 2025) — LoRA trained over a flat loss landscape, exact and fast.

Imports torch only; integrations (HF Trainer, Lightning), experiments and analysis live in submodules
with their own optional dependencies.
"""

from .config import FlatLoRAConfig
from .core.engine import FlatLoRA
from .noise import list_noises, register_noise
from .schedules import list_schedules, register_schedule

__all__ = ["FlatLoRA", "FlatLoRAConfig", "list_noises", "list_schedules", "register_noise", "register_schedule"]
__version__ = "0.1.0"
