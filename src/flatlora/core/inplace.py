"""In-place mode: W <- round(W + eps) for the window, then back to the exact original bits.

Adding and subtracting eps in the weight's dtype does not return W: rounding W + eps loses low bits
wherever the sum lands in a coarser binade (a few % of entries per round trip in bf16, also in fp32),
and the error random-walks over training. So at perturb time we replay the restore, round(round(W + eps)
- eps), find the entries where it would not give W back bit for bit, and keep their indices and original
values. Restore replays the noise from the key and the stored std, subtracts it and patches those
entries: W is bit-identical afterwards in every dtype, with no weight-sized copy kept.

With the Philox stream on a device the Triton kernels serve (CUDA), perturb is one fused pass (read W,
draw, write round(W + eps), append the off entries to a per-tile record) and restore another
(`flatlora.kernels.triton_noise`); the record then costs 4 bytes per off entry for 16-bit weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .noise_draw import Draw
from .targets import Target

_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@dataclass
class Patch:
    """Entries (flat indices into the contiguous weight) whose replayed restore would be off, and their bits."""

    index: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.values.numel() * self.values.element_size()


def _kernel_layer(t: Target, w: torch.Tensor, draw: Draw):
    """The local weight as a logical (rows, n) view for the kernels, or None when they do not apply."""
    from .. import kernels

    if draw.generator != "philox" or not kernels.use_triton(w.device):
        return None
    from ..kernels import triton_noise

    if not triton_noise.supported(w):
        return None
    view = w.t() if t.transposed else w.reshape(w.shape[0], -1)
    return triton_noise.Layer(view, draw.std.float().contiguous(), draw.key, draw.row0)


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if hasattr(w, "to_local") else w


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(_BITS[x.dtype])


def check_dtype(t: Target) -> None:
    w = t.weight
    if t.quantized or w.dtype not in _BITS:
        raise ValueError(
            f"layer {t.name!r} stores its weight as {type(w).__name__}/{w.dtype}: in-place noise cannot be "
            f"removed exactly from it. Use FlatLoRAConfig(mode='forward') (or mode='auto')."
        )


@torch.no_grad()
def perturb(t: Target, draw: Draw) -> Patch:
    """W <- round(W + eps) with the torch ops; returns the Patch that makes `restore` exact."""
    w = _local(t.weight)
    eps = draw.storage(t, w)
    noisy = (w.float() + eps).to(w.dtype)
    replay = (noisy.float() - eps).to(w.dtype)
    off = (_bits(replay) != _bits(w)).view(-1).nonzero().squeeze(1)
    index = off.to(torch.int32) if w.numel() < 2**31 else off
    patch = Patch(index, w.contiguous().view(-1)[off].clone())
    w.copy_(noisy)
    return patch


@torch.no_grad()
def restore(t: Target, draw: Draw, patch: Patch) -> None:
    w = _local(t.weight)
    eps = draw.storage(t, w)
    clean = (w.float() - eps).to(w.dtype).contiguous()
    clean.view(-1)[patch.index.long()] = patch.values
    w.copy_(clean)


@dataclass
class Applied:
    """Noise applied to one layer (torch path) or to a group of same-dtype layers in one kernel launch."""

    targets: list[Target]
    draws: list[Draw]
    record: Any  # Patch, or a kernel Record for a group
    layers: list | None = None  # kernel Layers of a group; None for the torch path

    @property
    def nbytes(self) -> int:
        return self.record.nbytes


def perturb_all(pairs: list[tuple[Target, Draw]]) -> Iterator[Applied]:
    """Perturb every (target, draw); yields each Applied as soon as it is in place, so a failure part-way
    leaves the caller knowing exactly what to undo. Layers the Triton kernels serve go in one launch per
    dtype (small models are launch-bound); the rest take the torch path one by one."""
    groups: dict[torch.dtype, list[tuple[Target, Draw, Any]]] = {}
    for t, draw in pairs:
        w = _local(t.weight)
        layer = _kernel_layer(t, w, draw)
        if layer is None:
            yield Applied([t], [draw], perturb(t, draw))
        else:
            groups.setdefault(w.dtype, []).append((t, draw, layer))
    if groups:
        from ..kernels import triton_noise

        for items in groups.values():
            layers = [layer for _, _, layer in items]
            record = triton_noise.perturb_group(layers)
            yield Applied([t for t, _, _ in items], [d for _, d, _ in items], record, layers)


def restore_applied(a: Applied) -> None:
    if a.layers is None:
        restore(a.targets[0], a.draws[0], a.record)
    else:
        from ..kernels import triton_noise

        triton_noise.restore_group(a.layers, a.record)
