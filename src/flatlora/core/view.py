"""One logical (m, n) view of a target's local weight: the only place that knows storage layouts.

Noise, row norms and restore records all work on rows ("filters", output units) of length n. How a
weight stores them varies: nn.Linear (out, in); HF Conv1D / fan_in_fan_out (in, out), so the view is a
transpose; convolutions (out, in/groups, *kernel), flattened to (out, n); an FSDP2 shard (DTensor,
Shard(0)) holds only some rows locally, `rows` says which global rows. Everything else (backends,
modes, the engine, analysis) asks this module for the view and for the way back to storage layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .targets import Target


# Tensors of exactly these types are dense and unsharded: per-layer, per-step code tests `type(w) in PLAIN` before
# probing for DTensor/subclass methods (a failed hasattr on a tensor costs ~1 us).
PLAIN = (torch.Tensor, torch.nn.Parameter)


def local(w: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: an FSDP2 DTensor's local shard, else `w` itself."""
    return w if type(w) in PLAIN or not hasattr(w, "to_local") else w.to_local()


def is_sharded(w: torch.Tensor) -> bool:
    return hasattr(w, "device_mesh")


def local_rows(w: torch.Tensor) -> slice | None:
    """Global rows held by this process when `w` is an FSDP2 (DTensor, Shard(0)) shard; else None."""
    if not is_sharded(w):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(p, Shard) and p.dim != 0 for p in w.placements):
        raise ValueError("Flat-LoRA in-place mode supports weights sharded on dim 0 (FSDP2); use mode='forward'")
    shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    return slice(offset[0], offset[0] + shape[0])


def unmaterialised(w: torch.Tensor) -> bool:
    """FSDP1 flat-parameter views and DeepSpeed ZeRO-3 partitions hold no (or a 1-D slice of) data outside
    forward, so only forward mode, which reads the gathered weight inside forward, can work there."""
    return hasattr(w, "ds_id") or w.dim() < 2 and w.numel() != 1 or w.numel() == 0


def matrix(t: Target, w: torch.Tensor) -> torch.Tensor:
    """A tensor in `t`'s storage layout (all rows, or a row shard) -> its logical (rows, n) view (no copy)."""
    if t.transposed:
        return w.t()
    # an (m, n) weight is its own view (reshape would return an alias of it at the cost of a dispatch, per layer
    # every step)
    return w if w.dim() == 2 and w.shape[1] == t.n else w.reshape(-1, t.n)


def storage(t: Target, mat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A logical (rows, n) matrix -> a view with the storage shape of `like`."""
    return mat.t() if t.transposed else mat.reshape(like.shape)


@dataclass
class View:
    """`target`'s weight as this process holds it right now.

    `tensor` is the local tensor in storage layout (the stored parameter, an FSDP2 shard's local rows, or
    the dequantized weight of a quantized base); `rows` the global rows it holds (None: all m)."""

    target: Target
    tensor: torch.Tensor
    rows: slice | None = None

    @classmethod
    def of(cls, t: Target) -> "View":
        """The weight the layer computes with: the stored one (its local rows under FSDP2), dequantized for
        quantized bases; inside an FSDP1/ZeRO-3 forward, the gathered weight."""
        if t.quantized:
            return cls(t, local(t.dequantize()))
        w = t.weight
        if type(w) in PLAIN:  # the common case, without the sharding probes (this runs per layer every step)
            return cls(t, w)
        return cls(t, local(w), local_rows(w))

    @property
    def name(self) -> str:
        return self.target.name

    @functools.cached_property
    def mat(self) -> torch.Tensor:
        """The logical (rows, n) view of `tensor` (shares its storage: writes go to the weight); made once, as
        the row std and the perturb both ask for it."""
        return matrix(self.target, self.tensor)

    @property
    def n(self) -> int:
        return self.target.n

    def terms(self) -> tuple[tuple[torch.Tensor, torch.Tensor, float] | None, torch.Tensor | None]:
        """`Target.terms` for the rows this view holds, on the weight's device."""
        fac, dense = self.target.terms()
        dev = self.tensor.device
        if fac is not None:
            b, a, s = fac
            if self.rows is not None:
                b = b[self.rows]
            # (a no-op .to() still costs a dispatch, per layer every step)
            fac = (b if b.device == dev else b.to(dev), a if a.device == dev else a.to(dev), s)
        if dense is not None:
            dense = (dense if self.rows is None else dense[self.rows]).to(dev)
        return fac, dense
