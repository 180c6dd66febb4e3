"""Clean weights at every entry point that must see them, whatever left a noise window open.

A trainer callback opens the window of update step t before the first micro-batch and closes it after the
last backward. Between the two, anything may happen: another callback raises, Ctrl-C lands between two
micro-batches, a callback evaluates or saves, the user catches the exception and calls `evaluate()`,
`generate()`, `save_pretrained()` or `merge_and_unload()`. The guard hooks those entry points on the model
itself, so it works with or without access to the trainer:

    forward in eval mode (evaluate, predict, validation, generation after model.eval())   pause
    generate() (in any mode), state_dict() (every save and checkpoint), PEFT merge/unmerge  pause

"Pause" ends the window (noise removed, exact) and remembers its step; the next training-mode forward of
the same window re-opens it with the same noise (A and B have not changed within a window, so the std and
the draw are the same). `close()` ends the window for good (window end, train end, exception).
Hooks sit on the root module and on every targeted layer (a PEFT model's `generate` runs the inner model,
not the root) and are prepended, so they run before any other hook sees noisy weights.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from torch import nn

log = logging.getLogger("flatlora")


class CleanWeightsGuard:
    """Opens and closes the windows of `flat` for a trainer integration and keeps entry points clean.

    Args:
        flat: the engine (`flatlora.FlatLoRA`).
    """

    def __init__(self, flat: Any):
        self.flat = flat
        self.step: int | None = None  # the window being trained (open or paused)
        self.paused = False
        self._warned = False
        self._undo: list[Callable[[], None]] = []
        root = flat.model
        modules = [root] + [root.get_submodule(t.name) for t in flat.targets]
        seen = set()
        for mod in modules:
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            self._undo.append(mod.register_forward_pre_hook(self._before_forward, prepend=True).remove)
            self._undo.append(mod.register_state_dict_pre_hook(self._before_state_dict).remove)
            for name in ("merge", "unmerge"):  # PEFT LoRA layers: every merge path calls these
                if mod is not root and callable(getattr(mod, name, None)):
                    self._undo.append(wrap_before(mod, name, lambda: self.pause(f"{name}()")))
        if callable(getattr(root, "generate", None)):
            self._undo.append(wrap_before(root, "generate", lambda: self.pause("generate()")))

    # ------------------------------------------------------------------ windows
    def open(self, step: int) -> float:
        """Begin the window of update step `step` (closing one left open first). Returns sigma_t."""
        if self.flat.active:
            log.warning("flatlora: a window was still open at step %d; closing it first", step)
        self.close()
        sigma = self.flat.begin_step(step)
        self.step = step
        return sigma

    def close(self) -> bool:
        """End the window for good (noise removed if on). Returns whether noise was on."""
        self.step, self.paused = None, False
        return self.flat.close_window()

    def pause(self, why: str = "") -> None:
        """Remove the noise of the open window until the next training forward of the same window."""
        if not self.flat.active:
            return
        self.flat.close_window()
        self.paused = self.step is not None
        log.debug("flatlora: noise of step %s removed for %s", self.step, why)

    def remove(self) -> None:
        """Close any window and take every hook and wrapper off the model."""
        self.close()
        while self._undo:
            self._undo.pop()()

    # ------------------------------------------------------------------ hooks
    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if module.training:
            if self.paused and not self.flat.active:
                self.paused = False
                self.flat.begin_step(self.step)
        elif self.flat.active:
            if not self._warned:
                self._warned = True
                log.warning("flatlora: the model ran in eval mode inside the noise window of step %s: the noise was "
                            "removed first (evaluation sees clean weights) and comes back at the next training "
                            "forward of that window", self.step)
            self.pause("an eval-mode forward")

    def _before_state_dict(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        self.pause("state_dict()")


def wrap_before(obj: Any, name: str, before: Callable[[], None], after: Callable[..., None] | None = None
                ) -> Callable[[], None]:
    """Make `obj.name(...)` call `before()` first (and `after(result, *args, **kwargs)` on success), as an
    instance attribute; returns the undo, which removes the wrapper only if nobody replaced it since."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        before()
        result = original(*args, **kwargs)
        if after is not None:
            after(result, *args, **kwargs)
        return result

    return install(obj, name, original, wrapper)


def install(obj: Any, name: str, original: Callable, wrapper: Callable) -> Callable[[], None]:
    """Set `wrapper` as the instance attribute `obj.name` (wrapping `original`); returns the undo, which removes
    the wrapper only if nobody replaced it since (and drops the instance attribute when `original` was the
    class's own method)."""
    setattr(obj, name, wrapper)

    def undo() -> None:
        if obj.__dict__.get(name) is wrapper:
            if getattr(type(obj), name, None) is getattr(original, "__func__", None):
                del obj.__dict__[name]
            else:
                setattr(obj, name, original)

    return undo
