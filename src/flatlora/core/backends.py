"""Noise backends: how row std, perturb, restore and the noisy weight are computed over a `View`.

    TorchBackend   torch ops, any device, either stream ("torch" or the Philox reference in torch)
    TritonBackend  the fused kernels of `flatlora.kernels.triton_noise` (Philox stream, CUDA, or CPU under
                   TRITON_INTERPRET=1 in tests): one launch per dtype group for std, perturb and restore

`choose(target, generator)` picks one per target when the engine is built; nothing else decides where a
layer's noise is computed. Both backends compute the row std the same way (merged rows W_i + (B A)_i
built block by block, see `norms`), both make in-place noise exactly removable (see below), and both
check, before restoring a layer, that nothing wrote to it while the noise was on.

Exact restore. Adding and subtracting eps in the weight's dtype does not return W: rounding W + eps
loses low bits wherever the sum lands in a coarser binade (a few % of entries per round trip in bf16,
also in fp32), and the error random-walks over training. So at perturb time we replay the restore,
round(round(W + eps) - eps), find the entries where it would not give W back bit for bit, and keep their
indices and original values. Restore replays the noise from the key and the stored std, subtracts it and
patches those entries: W is bit-identical afterwards in every dtype, with no weight-sized copy kept.

Write detection. A weight written while the noise is on (a state-dict load, an adapter merge, an optimizer
stepping a frozen weight) cannot be restored: subtracting eps from it gives garbage. The torch backend
keeps a checksum of each noisy weight (the int64 sum of its bit patterns; one extra read) and compares it
before restoring; the Triton restore kernel checks every tile it restores and returns, per layer, how many
tiles it found modified (and leaves those as they are). A layer found modified is not restored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .. import kernels
from ..noise import get_noise
from . import ops
from .noise_draw import Draw
from .norms import row_sq_norms
from .targets import Target
from .view import View, local

log = logging.getLogger("flatlora")

BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(BITS[x.dtype])


def checksum(x: torch.Tensor) -> int:
    """Sum of the bit patterns of `x` in int64, wrapping: changes when any entry changes (barring exact
    cancellation). The bytes are summed as int64 words where they tile into them (a sum without the
    widening copy, 3x faster on CPU); the value is only ever compared with another checksum of this process."""
    flat = x.contiguous().view(-1)
    if flat.numel() * flat.element_size() % 8 == 0 and flat.storage_offset() * flat.element_size() % 8 == 0:
        return int(torch.sum(flat.view(torch.int64)))
    return int(torch.sum(_bits(flat), dtype=torch.int64))


@dataclass
class Patch:
    """Entries (flat indices into the contiguous weight) whose replayed restore would be off, and their bits."""

    index: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.values.numel() * self.values.element_size()


@dataclass
class Applied:
    """Noise one backend call put in place: one layer (torch) or a same-dtype group (one kernel launch)."""

    backend: "Backend"
    views: list[View]
    draws: list[Draw]
    record: Any  # Patch (torch) or triton_noise.Record (a group)
    data_ptrs: list[int]  # storage of each weight when perturbed: a replaced weight is not restored
    checks: list[int] | None = None  # torch: checksum of each noisy weight

    @property
    def nbytes(self) -> int:
        return self.record.nbytes


class Restored:
    """What a restore found, known at once: per layer, 0 when restored, else how many parts (tiles; 1 for a
    whole layer) were found modified and left as they are; `skipped`: parts the perturb left without noise.
    (The kernel group's `triton_noise.Outcome` has the same face and arrives later.)"""

    skipped = 0

    def __init__(self, counts: list[int]):
        self._counts = counts

    def ready(self) -> bool:
        return True

    def counts(self) -> list[int]:
        return self._counts


class Backend:
    """Row std, in-place perturb / restore and the forward-mode noisy weight over logical (m, n) views."""

    name = "?"

    def row_std(self, views: list[View], noise: str, sigma: float) -> list[torch.Tensor]:
        """Per-row noise std [rows] float32 of every view, by the registered noise rule `noise`."""
        raise NotImplementedError

    def perturb(self, pairs: list[tuple[View, Draw]], sigma: float | None = None) -> Iterator[Applied]:
        """W <- round(W + eps) for every (view, draw) at noise level `sigma` (sigma_t, a hint for sizing the
        restore record); yields each Applied as soon as it is in place, so a failure part-way leaves the
        caller knowing exactly what to undo."""
        raise NotImplementedError

    def restore(self, applied: Applied) -> "Restored":
        """Undo `applied` exactly, except layers found written since perturb; what it found comes as a
        Restored (on a GPU without waiting for it: the kernel group's outcome is read later)."""
        raise NotImplementedError

    def noisy_weight(self, view: View, draw: Draw) -> torch.Tensor:
        """A new tensor round(W + eps) in the storage shape and dtype of `view.tensor` (the forward-mode
        custom ops' implementation, computed where this backend computes)."""
        t = view.target
        return ops.compute_noisy_weight(view.tensor, draw.std, draw.key, t.m, draw.row0, t.transposed,
                                        draw.generator, self.name)

    def __repr__(self) -> str:
        return self.name


class TorchBackend(Backend):
    name = "torch"

    def row_std(self, views, noise, sigma):
        rule = get_noise(noise)
        return [rule(row_sq_norms(v), v.n, sigma) for v in views]

    def perturb(self, pairs, sigma=None):
        for view, draw in pairs:
            ptr = view.tensor.data_ptr()
            patch, check = self.perturb_layer(view, draw)
            yield Applied(self, [view], [draw], patch, [ptr], checks=[check])

    @torch.no_grad()
    def perturb_layer(self, view: View, draw: Draw) -> tuple[Patch, int]:
        """W <- round(W + eps); returns the Patch that makes `restore` exact and the noisy weight's checksum."""
        w = view.tensor
        eps = draw.storage(view.target, w)
        noisy = (w.float() + eps).to(w.dtype)
        replay = (noisy.float() - eps).to(w.dtype)
        off = (_bits(replay) != _bits(w)).view(-1).nonzero().squeeze(1)
        index = off.to(torch.int32) if w.numel() < 2**31 else off
        patch = Patch(index, w.contiguous().view(-1)[off].clone())
        w.copy_(noisy)
        return patch, checksum(noisy)

    @torch.no_grad()
    def restore(self, applied):
        (view,), (draw,), (check,) = applied.views, applied.draws, applied.checks
        if local(view.target.weight).data_ptr() != applied.data_ptrs[0]:
            return Restored([0])  # the weight has new storage (the caller reports it): nothing of ours is in it
        w = view.tensor
        if checksum(w) != check:
            return Restored([1])
        eps = draw.storage(view.target, w)
        patch = applied.record
        if w.is_contiguous():
            # In place: a mixed-dtype sub_ computes in float32 and rounds once into W's dtype, the value
            # perturb replayed; no weight-sized temporary.
            w.sub_(eps)
            w.view(-1)[patch.index.long()] = patch.values
        else:
            clean = (w.float() - eps).to(w.dtype).contiguous()
            clean.view(-1)[patch.index.long()] = patch.values
            w.copy_(clean)
        return Restored([0])

class TritonBackend(Backend):
    name = "triton"

    def row_std(self, views, noise, sigma):
        from ..kernels import triton_noise as K

        items = []
        for v in views:
            mat = v.mat
            fac, dense = v.terms()  # one pass over the adapters; B and A uncopied, s applied in the kernel
            if dense is not None:
                # Adapters without a factor form (grouped convs, unknown LoRA kinds) are small layers: the
                # kernel gets W + D as its weight, and still adds s B A tile by tile.
                mat = mat.float() + dense
            items.append(K.StdItem(mat) if fac is None else K.StdItem(mat, fac[1], fac[0], fac[2]))
        if noise == "filter":
            return K.row_std_group(items, sigma)
        # Other rules need ||W'_i||^2: the same kernel at scale 1 gives ||W'_i|| / sqrt(n).
        rule = get_noise(noise)
        return [rule(s.square_().mul_(v.n), v.n, sigma) for s, v in zip(K.row_std_group(items, 1.0), views)]

    def perturb(self, pairs, sigma=None):
        from ..kernels import triton_noise as K

        groups: dict[torch.dtype, list[tuple[View, Draw]]] = {}
        for view, draw in pairs:
            groups.setdefault(view.tensor.dtype, []).append((view, draw))
        for items in groups.values():
            views = [v for v, _ in items]
            draws = [d for _, d in items]
            layers = [K.Layer(v.mat, d.std, d.key, d.row0) for v, d in items]  # std: float32 [rows] from row_std
            ptrs = [v.tensor.data_ptr() for v in views]
            record = K.perturb_group(layers, sigma=sigma)  # deferred: no host sync (see perturb_group)
            yield Applied(self, views, draws, record, ptrs)

    def restore(self, applied):
        from ..kernels import triton_noise as K

        rec = applied.record
        K.restore_group(rec)
        outcome = K.Outcome(rec)  # copied to the host behind an event: nothing waits
        rec.release()
        return outcome

TORCH = TorchBackend()
TRITON = TritonBackend()


def choose(t: Target, generator: str) -> Backend:
    """The backend of target `t` given its resolved stream ("torch" | "philox"): the Triton kernels where they
    serve the weight's device and dtype and the stream is theirs, torch everywhere else."""
    if generator != "philox":
        return TORCH
    w = t.weight
    if not kernels.use_triton(w.device):
        return TORCH
    from ..kernels import triton_noise as K

    # A quantized base is perturbed in its dequantized form: that is the dtype the kernels see.
    probe = t.dense_weight() if t.quantized else local(w)
    return TRITON if K.supported(probe) else TORCH
