"""How large the noise is: per-row standard deviations from the merged weight's row norms.

Filter-wise noise (Li et al., ICML 2025, Eq. 7), the default: row i ("filter", one output unit) of the
merged weight W' = W + s * B @ A, of length n = in_features, gets

    std_i = sigma_t * ||W'_i||_2 / sqrt(n)

so the added pre-activation variance, sigma_t^2 * ||W'_i||^2 * var(x), does not depend on the width.
"layer" uses one std for the whole matrix, sigma_t * ||W'||_F / sqrt(m * n), i.e. the same total noise
energy spread evenly over rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from .registry import Registry

# (row_sq_norms [m] float32, in_features n, sigma_t) -> std [m] float32
NoiseStd = Callable[[torch.Tensor, int, float], torch.Tensor]

_NOISES: Registry[NoiseStd] = Registry("noise")


def register_noise(name: str):
    """Add a std rule `f(row_sq_norms, n, sigma) -> std` under `name`; a name can be registered once."""
    return _NOISES.register(name)


def list_noises() -> list[str]:
    return sorted(_NOISES.names())


def get_noise(name: str) -> NoiseStd:
    return _NOISES.get(name)


@register_noise("filter")
def filter_std(row_sq_norms: torch.Tensor, n: int, sigma: float) -> torch.Tensor:
    """std_i = sigma * ||W'_i|| / sqrt(n) (the paper)."""
    return row_sq_norms.clamp_min(0).sqrt().mul_(sigma / n**0.5)


@register_noise("layer")
def layer_std(row_sq_norms: torch.Tensor, n: int, sigma: float) -> torch.Tensor:
    """One std for the layer: sigma * ||W'||_F / sqrt(m * n)."""
    m = row_sq_norms.numel()
    value = row_sq_norms.clamp_min(0).sum().sqrt() * (sigma / (m * n) ** 0.5)
    return value.expand(m).clone()
