"""One layer's noise for one window: eps = std[:, None] * z(key), replayable from (key, std)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rng import standard_normal
from .targets import Target


@dataclass
class Draw:
    """Everything needed to regenerate a layer's noise: the key and the per-row std fixed at draw time.

    `rows` is the slice of global rows this process holds (FSDP2 shards); None means all rows.
    `generator` is the stream ("torch" or "philox", see flatlora.rng.standard_normal).
    """

    key: int
    std: torch.Tensor  # [rows] float32, on the weight's device
    rows: slice | None = None
    generator: str = "torch"

    @property
    def row0(self) -> int:
        return 0 if self.rows is None else self.rows.start or 0

    def matrix(self, t: Target, device: torch.device) -> torch.Tensor:
        """eps in the logical (m, n) layout (only this process's rows), float32."""
        return standard_normal(self.key, t.m, t.n, device, self.rows, self.generator, scale=self.std)

    def storage(self, t: Target, like: torch.Tensor) -> torch.Tensor:
        """eps shaped like the stored weight `like`."""
        return t.to_storage(self.matrix(t, like.device), like)
