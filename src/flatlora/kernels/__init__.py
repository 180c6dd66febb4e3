"""Noise kernels: `philox` (the counter-based stream in pure torch, any device; the reference) and
`triton_noise` (fused Triton kernels on CUDA). `use_triton(device)` says whether the engine dispatches
to Triton for tensors on `device`.
"""

from __future__ import annotations

import functools

import torch

# Tests set this to run the Triton kernels on CPU tensors through TRITON_INTERPRET=1.
FORCE_TRITON = False


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(device: torch.device | str) -> bool:
    """True when noise on `device` should go through the Triton kernels."""
    dev = torch.device(device)
    return triton_importable() and (dev.type == "cuda" or FORCE_TRITON)


def resolve_generator(name: str, device: torch.device | str) -> str:
    """FlatLoRAConfig.generator -> the stream a draw uses: "torch" or "philox"."""
    if name == "auto":
        return "philox" if torch.device(device).type == "cuda" and triton_importable() else "torch"
    if name in ("torch", "philox"):
        return name
    raise ValueError(f"generator must be 'auto', 'torch' or 'philox', got {name!r}")
