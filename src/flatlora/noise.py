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

# (row_sq_norms [m] float32, in_features n, sigma_t) -> std [m] float32
NoiseStd = Callable[[torch.Tensor, int, float], torch.Tensor]

_NOISES: dict[str, NoiseStd] = {}


def register_noise(name: str):
    def deco(fn: NoiseStd) -> NoiseStd:
        if name in _NOISES:
            raise ValueError(f"noise {name!r} is already registered")
        _NOISES[name] = fn
        return fn

    return deco


def list_noises() -> list[str]:
    return sorted(_NOISES)


def get_noise(name: str) -> NoiseStd:
    try:
        return _NOISES[name]
    except KeyError:
        raise ValueError(f"noise must be one of {list_noises()}, got {name!r}") from None


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
