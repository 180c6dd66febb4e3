"""When the noise is applied: the two modes, each an object with open(window) / close(window).

    InplaceMode  W <- round(W + eps) for the window, then back to the exact original bits (see backends)
    ForwardMode  W is never written; each targeted layer computes with round(W + eps) (see forward.py)

A mode works on the targets grouped by backend (`Plan`) and asks the window for draws; it never decides
how noise is computed (that is the backend's) nor when a window opens (that is the engine's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import forward, ops
from .backends import BITS, Applied, Backend
from .noise_draw import Draw
from .targets import Target
from .view import View, is_sharded, local, local_rows, unmaterialised

log = logging.getLogger("flatlora")

Plan = list[tuple[Backend, list[Target]]]  # targets grouped by backend, in model order


@dataclass
class Window:
    """One open window: update step, sigma_t, and what the mode must undo.

    `draw(views)` fixes the noise of the given views (std from their current weights, one grouped call per
    backend) and returns their Draws by target name; `draws` holds every draw of the window."""

    step: int
    sigma: float
    draw: Callable[[list[View]], dict[str, Draw]]
    draws: dict[str, Draw] = field(default_factory=dict)
    applied: list[Applied] = field(default_factory=list)  # in-place: noise in the weights, undone LIFO
    armed: list[Target] = field(default_factory=list)  # forward: layers whose forward is patched
    record_bytes: int = 0  # in-place: bytes of the restore records undone so far


class WeightsWrittenError(RuntimeError):
    """Frozen weights were written while the noise was on, so they could not be restored exactly."""


class InplaceMode:
    name = "inplace"

    def __init__(self, plan: Plan):
        self.plan = plan
        self.pending: list[_Restore] = []
        self.tiles_without_noise = 0
        self._closes = 0

    @staticmethod
    def refusal(t: Target) -> str | None:
        """Why in-place noise cannot serve `t` (None when it can)."""
        w = t.weight
        if unmaterialised(w):
            return (f"layer {t.name!r} has no materialised weight here (FSDP1 flat parameter or DeepSpeed ZeRO-3 "
                    f"partition): in-place noise cannot be applied. Use mode='forward', or FSDP2 (fully_shard).")
        if t.quantized:
            return (f"layer {t.name!r} has a quantized base ({t.quantization}): in-place noise would have to "
                    f"re-quantize W + eps, and re-quantizing cannot be undone (its error is as large as the noise). "
                    f"Use FlatLoRAConfig(mode='forward') (mode='auto' picks it): it computes with the dequantized "
                    f"W + eps and never writes the packed weight.")
        if w.dtype not in BITS:
            return (f"layer {t.name!r} stores its weight as {type(w).__name__}/{w.dtype}: in-place noise cannot be "
                    f"removed exactly from it. Use FlatLoRAConfig(mode='forward') (or mode='auto').")
        try:
            local_rows(w)
        except ValueError as e:
            return f"layer {t.name!r}: {e}"
        return None

    def open(self, window: Window) -> None:
        views = [(backend, [View.of(t) for t in targets]) for backend, targets in self.plan]
        # Every std first, from the clean weights; then the noise goes in.
        window.draws.update(window.draw([v for _, vs in views for v in vs]))
        for backend, vs in views:
            for applied in backend.perturb([(v, window.draws[v.name]) for v in vs], window.sigma):
                window.applied.append(applied)

    def close(self, window: Window) -> None:
        """Restore every layer (queued on the GPU, nothing waits), then read what the restores of earlier
        windows found, and this window's where it has arrived (at once on CPU); raise WeightsWrittenError
        naming the layers found written. A replaced weight is known at once: then every outcome is read now."""
        self._closes += 1
        replaced = False
        # Entries are popped as they are undone, so a close that fails part-way can be finished later.
        while window.applied:
            applied = window.applied.pop()
            gone = [v.name for v, ptr in zip(applied.views, applied.data_ptrs) if local(v.target.weight).data_ptr() != ptr]
            replaced = replaced or bool(gone)
            window.record_bytes += applied.nbytes
            # A backend leaves a replaced storage alone or restores the old one (a kernel group: harmless,
            # and the rest of the group needs the launch); either way the layer is reported as replaced.
            self.pending.append(_Restore(window.step, self._closes, [v.name for v in applied.views], gone,
                                         applied.backend.restore(applied)))
        self.check(wait=replaced)

    def check(self, wait: bool = True) -> None:
        """Read the restores' outcomes: all of them (`wait`), else those of earlier windows (their copies have
        long arrived) and any that has. Raises WeightsWrittenError for the layers found written."""
        found: dict[int, tuple[list[str], dict[str, int]]] = {}
        keep = []
        for r in self.pending:
            if not (wait or r.close < self._closes or r.outcome.ready()):
                keep.append(r)
                continue
            counts = r.outcome.counts()
            if r.outcome.skipped:
                self.tiles_without_noise += r.outcome.skipped
                log.warning("flatlora: %d weight tiles got no noise at step %d: the restore record, sized from the "
                            "previous step, was too small (the next step sizes it exactly); the weights were "
                            "restored exactly either way", r.outcome.skipped, r.step)
            replaced, modified = found.setdefault(r.step, ([], {}))
            replaced += r.gone
            modified.update({n: c for n, c in zip(r.names, counts) if c and n not in r.gone})
        self.pending = keep
        msgs = [_written_message(step, rep, mod) for step, (rep, mod) in sorted(found.items()) if rep or mod]
        if msgs:
            raise WeightsWrittenError(" ".join(msgs))

    def record_bytes(self, window: Window) -> int:
        """Bytes of the restore records held (open window) or undone (a closed one): the entries used, or
        where a deferred record's size is not read yet, what it allocated."""
        return sum(a.nbytes for a in window.applied) + window.record_bytes

    def metrics(self, window: Window) -> dict[str, float]:
        """The record's bytes, and the tiles left without noise so far in the run (0 but in a rare step)."""
        return {"flatlora/restore_record_bytes": float(self.record_bytes(window)),
                "flatlora/tiles_without_noise": float(self.tiles_without_noise)}


@dataclass
class _Restore:
    """A queued restore whose outcome the host has not read yet."""

    step: int
    close: int  # which close() queued it
    names: list[str]
    gone: list[str]  # replaced weights (known when queued)
    outcome: Any  # backends.Restored or triton_noise.Outcome: ready(), counts(), skipped


class ForwardMode:
    name = "forward"

    def __init__(self, plan: Plan):
        self.plan = plan
        # One Armed per target for the engine's life: compiled graphs see the same objects every window.
        self.armed = {t.name: forward.Armed(t, backend.name) for backend, targets in plan for t in targets}

    def open(self, window: Window) -> None:
        # The std of every dense weight this process holds whole is fixed now, in one grouped call per backend.
        # A weight gathered only inside forward (FSDP1, ZeRO-3, FSDP2) is drawn at its layer's first forward of
        # the window, from the gathered weight; every later micro-batch and backward reuse the draw. So is a
        # quantized base, from the weight its forward dequantizes anyway: dequantizing every layer here would
        # hold all of them dense at once (13 GB for a 7B model), the memory QLoRA exists to save.
        whole = [View.of(t) for _, targets in self.plan for t in targets
                 if not t.quantized and not unmaterialised(t.weight) and not is_sharded(t.weight)]
        window.draws.update(window.draw(whole))
        traced: list[forward.Armed] = []
        for backend, targets in self.plan:
            for t in targets:
                armed = self.armed[t.name]
                draw = window.draws.get(t.name)
                if draw is not None and not t.quantized:
                    armed.set_draw(draw)  # the custom ops (torch.compile traces them)
                    if backend.name == "triton" and t.kind != "conv":
                        traced.append(armed)
                else:
                    armed.set_callback(_noisy_weight(window, backend, t))
                forward.arm(t, armed)
                window.armed.append(t)
        # The Triton layers' keys on their devices (one copy a device a window): what the op a compiled graph
        # traces into reads (ops.noisy_linear_triton); eager calls never read them.
        if traced and ops.register_triton_ops():
            by_device: dict[torch.device, list[forward.Armed]] = {}
            for armed in traced:
                by_device.setdefault(armed.std.device, []).append(armed)
            for dev, group in by_device.items():
                for armed, key in zip(group, ops.device_keys([a.key_int for a in group], dev)):
                    armed.key_dev = key

    def close(self, window: Window) -> None:
        while window.armed:
            forward.disarm(window.armed.pop())

    def check(self, wait: bool = True) -> None:
        """Nothing is restored in forward mode, so nothing is left to read."""

    def record_bytes(self, window: Window) -> int:
        return 0

    def metrics(self, window: Window) -> dict[str, float]:
        return {}


MODES = {"inplace": InplaceMode, "forward": ForwardMode}


def _noisy_weight(window: Window, backend: Backend, t: Target) -> forward.NoisyWeight:
    def noisy() -> torch.Tensor:
        view = View.of(t)  # the weight as the layer sees it now (gathered, dequantized)
        draw = window.draws.get(t.name)
        if draw is None:
            draw = window.draws[t.name] = window.draw([view])[t.name]
        return backend.noisy_weight(view, draw)

    return noisy


def _written_message(step: int, replaced: list[str], modified: dict[str, int]) -> str:
    parts = []
    if modified:
        parts.append(f"the frozen weights of {sorted(modified)} were written while the noise of step {step} was on "
                     f"(modified parts: {dict(sorted(modified.items()))}); they were left as they are (noisy plus "
                     f"whatever was written) instead of being restored to garbage")
    if replaced:
        parts.append(f"the weights of {sorted(replaced)} were replaced while the noise was on (new storage); they "
                     f"cannot be restored exactly")
    return ("; ".join(parts) + ". Something loaded a state dict, merged an adapter or let an optimizer step a frozen "
            "weight inside the window; every other layer was restored exactly. Merge, load, save and step only "
            "outside the window (after end_step() / close_window()), and reload the affected weights from a clean copy.")
