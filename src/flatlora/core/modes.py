"""When the noise is applied: the two modes, each an object with open(window) / close(window).

    InplaceMode  W <- round(W + eps) for the window, then back to the exact original bits (see backends)
    ForwardMode  W is never written; each targeted layer computes with round(W + eps) (see forward.py)

A mode works on the targets grouped by backend (`Plan`) and asks the window for draws; it never decides
how noise is computed (that is the backend's) nor when a window opens (that is the engine's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import forward
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
    skipped: int = 0  # in-place: parts (kernel tiles) that got no noise this window (see perturb_group)


class WeightsWrittenError(RuntimeError):
    """Frozen weights were written while the noise was on, so they could not be restored exactly."""


class InplaceMode:
    name = "inplace"

    def __init__(self, plan: Plan):
        self.plan = plan

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
        """Restore every layer that can be restored exactly; then raise WeightsWrittenError naming the others."""
        replaced, modified = [], {}
        # Entries are popped as they are undone, so a close that fails part-way can be finished later.
        while window.applied:
            applied = window.applied.pop()
            gone = [v.name for v, ptr in zip(applied.views, applied.data_ptrs) if local(v.target.weight).data_ptr() != ptr]
            replaced += gone
            # A backend leaves a replaced storage alone or restores the old one (a kernel group: harmless,
            # and the rest of the group needs the launch); either way the layer is reported as replaced.
            for v, count in zip(applied.views, applied.backend.restore(applied)):
                if count and v.name not in gone:
                    modified[v.name] = count
            window.record_bytes += applied.nbytes
            window.skipped += applied.skipped
        if window.skipped:
            log.warning("flatlora: %d weight tiles got no noise at step %d: the restore record, sized from the "
                        "previous step, was too small (the next step sizes it exactly); the weights are restored "
                        "exactly either way", window.skipped, window.step)
        if replaced or modified:
            raise WeightsWrittenError(_written_message(window.step, replaced, modified))

    def record_bytes(self, window: Window) -> int:
        """Bytes of the restore records held (open window) or undone (a closed one)."""
        return sum(a.nbytes for a in window.applied) + window.record_bytes

    def metrics(self, window: Window) -> dict[str, float]:
        """After close: the record's bytes, and the tiles left without noise (0 but in a rare step)."""
        return {"flatlora/restore_record_bytes": float(self.record_bytes(window)),
                "flatlora/tiles_without_noise": float(window.skipped)}


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
        for backend, targets in self.plan:
            for t in targets:
                armed = self.armed[t.name]
                draw = window.draws.get(t.name)
                if draw is not None and not t.quantized:
                    armed.set_draw(draw)  # the custom ops (torch.compile traces them)
                else:
                    armed.set_callback(_noisy_weight(window, backend, t))
                forward.arm(t, armed)
                window.armed.append(t)

    def close(self, window: Window) -> None:
        while window.armed:
            forward.disarm(window.armed.pop())

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
