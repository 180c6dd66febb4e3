"""FlatLoRA: the engine behind every integration.

Flat-LoRA (Li et al., ICML 2025, arXiv:2409.14396) trains the LoRA factors on the expected loss
E_eps L(W + s B A + eps). At update step t every targeted weight gets, for the whole accumulation
window, eps_ij ~ N(0, std_i^2) with

    std_i = sigma * f(t) * ||(W + s B A)_i|| / sqrt(n)

(f = schedule, n = inputs per row), fixed when the noise is drawn. The noise is gone before the
optimizer step, and the frozen weights are bit-identical afterwards in every mode and dtype.

    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=1000, seed=0))
    for t, window in enumerate(windows):
        with flat.step(t):                 # noise on for every micro-batch of the window
            for batch in window:
                model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad()

The engine owns the window lifecycle, the schedule, the keys and the state; how noise is computed is a
backend's (`backends.py`, chosen once per target here), when it is applied a mode's (`modes.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import FlatLoRAConfig
from ..kernels import resolve_generator
from ..rng import canonical_name, layer_key, step_key
from ..schedules import get_schedule
from . import backends, batchnorm
from .interrupts import deferred_sigint
from .modes import MODES, InplaceMode, Plan, Window
from .noise_draw import Draw
from .targets import Target, find_targets
from .view import View, is_sharded, unmaterialised

log = logging.getLogger("flatlora")

# Whether a torch.profiler session records (torch's own tests, ~0.1 us; a record_function costs ~15 us even when
# none does, per window that is a few % of a small model's in-place host time). The flag catches what the first
# misses (profile_all_threads sessions).
_profiler_enabled = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)


def _profiler_on() -> bool:
    return _profiler_enabled() or bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", False))


def _profiled(name: str):
    """A named range in torch.profiler's tables and traces (the engine's host time and launches apart from the
    model's) while a profiler records; nothing otherwise."""
    return torch.profiler.record_function(name) if _profiler_on() else contextlib.nullcontext()

STATE_VERSION = 1
# Settings that define the noise stream (sigma_t and eps of every step): a resumed run must match them.
STREAM_FIELDS = ("sigma", "total_steps", "schedule", "noise", "seed", "per_rank_noise", "target", "include", "exclude",
                 "generator")

# id(weight) -> (weak weight, weak engine): which live engine puts noise on which weight. Two engines on one
# weight would perturb and restore over each other's noise, so the second is refused.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owner(w: torch.Tensor) -> "FlatLoRA | None":
    entry = _OWNERS.get(id(w))
    if entry is None:
        return None
    weight, engine = entry[0](), entry[1]()
    if weight is not w or engine is None or engine._closed:
        del _OWNERS[id(w)]
        return None
    return engine


class FlatLoRA:
    """Flat-LoRA noise on the LoRA layers of `model` (or its plain layers with target='linear').

    Args:
        model: a PEFT model (or any module holding PEFT LoRA layers), or a plain model with target='linear'.
        config: a FlatLoRAConfig (copied: later changes to it do not reach the engine); keyword arguments
            override its fields (or build one).

    `flat.config` is the engine's own copy and read-only: the targets, mode, backends and noise stream are
    derived from it when the engine is built. `set_total_steps` is the one setting that may come later.
    """

    def __init__(self, model: nn.Module, config: FlatLoRAConfig | None = None, **overrides: Any):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config is None:
            config = FlatLoRAConfig(**overrides)
        elif not isinstance(config, FlatLoRAConfig):
            raise ValueError(f"config must be a FlatLoRAConfig, got {type(config).__name__}")
        else:
            config = dataclasses.replace(config, **overrides)
        self._closed = False
        self.model = model
        self.config = config._read_only()
        self.targets, self.skipped = find_targets(model, config.target, config.include, config.exclude)
        for name, why in self.skipped.items():
            log.warning("flatlora: skipping %s: %s", name, why)
        self._by_name = {t.name: t for t in self.targets}
        self._by_name.update({canonical_name(t.name): t for t in self.targets})
        self.mode = self._resolve_mode(config.mode)
        # Each target's stream and backend, decided once here and nowhere else.
        self._generators = {t.name: resolve_generator(config.generator, t.weight.device) for t in self.targets}
        self._backends = {t.name: backends.choose(t, self._generators[t.name]) for t in self.targets}
        plan: dict[backends.Backend, list[Target]] = {}
        for t in self.targets:
            plan.setdefault(self._backends[t.name], []).append(t)
        self._plan: Plan = list(plan.items())
        log.info("flatlora: %s mode; noise backend %s", self.mode,
                 ", ".join(f"{b.name} for {len(ts)} layer(s)" for b, ts in self._plan))
        self._mode = MODES[self.mode](self._plan)
        bn_layers = batchnorm.batchnorm_layers(model)
        policy = config.bn_policy
        self.bn_policy = ("recalibrate" if bn_layers else "none") if policy == "auto" else policy
        self._bn = batchnorm.FrozenStats(bn_layers if self.bn_policy in ("freeze", "recalibrate") else [])
        self._bn_warned = False
        self.bn_stale = False  # running stats were frozen through some windows and not recalibrated since
        self._window: Window | None = None
        self.last_step: int | None = None
        self.draws = 0  # windows that drew noise
        self._last_metrics: dict[str, float] = {}
        self._warned_eval = False
        self._claim()
        # One cheap hook on the root module catches evaluation or generation run while noise is on. It holds
        # the engine weakly, so an engine dropped without close() is freed (and releases its weights).
        warn = weakref.WeakMethod(self._warn_eval_in_window)

        def eval_guard(module: nn.Module, args: Any) -> None:
            if module.training:  # first, so that torch.compile traces a training forward without a graph break
                return
            method = warn()
            if method is not None:
                method(module, args)

        self._eval_guard = model.register_forward_pre_hook(eval_guard)
        weakref.finalize(self, self._eval_guard.remove)

    # ------------------------------------------------------------------ set-up
    def _resolve_mode(self, mode: str) -> str:
        if mode == "forward":
            return "forward"
        if mode == "auto":
            # in-place (exact restore, no per-micro-batch cost) wherever the weights are dense floats held here
            special = [t for t in self.targets if t.quantized or unmaterialised(t.weight)
                       or is_sharded(t.weight) and InplaceMode.refusal(t) is not None]
            if special:
                t = special[0]
                why = (f"a quantized base: {t.quantization}; in-place noise could not be removed from it" if t.quantized
                       else "an unmaterialised or column-sharded weight")
                log.info("flatlora: mode=auto -> forward (%s has %s)", t.name, why)
                return "forward"
        for t in self.targets:
            why = InplaceMode.refusal(t)
            if why is not None:
                raise ValueError(why)
        if mode == "auto":
            log.info("flatlora: mode=auto -> inplace (dense float weights; exact restore)")
        return "inplace"

    def _claim(self) -> None:
        """Refuse weights another live engine puts noise on; then take ours."""
        taken = [t.name for t in self.targets if _owner(t.weight) not in (None, self)]
        if taken:
            gc.collect()  # an engine nobody references any more is not an owner
            taken = [t.name for t in self.targets if _owner(t.weight) not in (None, self)]
        if taken:
            other = next(_owner(t.weight) for t in self.targets if t.name in taken)
            raise ValueError(
                f"the weights of {taken} already get noise from another live FlatLoRA engine ({other!r}): two engines "
                f"would perturb and restore over each other's noise. Call close() on that engine first (or keep using it)."
            )
        for t in self.targets:
            _OWNERS[id(t.weight)] = (weakref.ref(t.weight), weakref.ref(self))

    def _release(self) -> None:
        for t in self.targets:
            entry = _OWNERS.get(id(t.weight))
            if entry is not None and entry[1]() is self:
                del _OWNERS[id(t.weight)]

    def backends(self) -> dict[str, str]:
        """{layer name: the backend computing its noise ("torch" or "triton")}, as chosen when the engine was built."""
        return {name: b.name for name, b in self._backends.items()}

    # ------------------------------------------------------------------ schedule
    def sigma_at(self, step: int) -> float:
        """The noise scale sigma_t of update step `step` (0-based)."""
        total = self.config.total_steps
        if total is None:
            if self.config.schedule != "constant":
                raise ValueError(
                    "FlatLoRAConfig.total_steps is not set: the schedule needs the number of optimizer steps "
                    "(pass total_steps=..., call flat.set_total_steps(n), or use a trainer callback, which reads it "
                    "from the trainer)."
                )
            total = 1
        return self.config.sigma * get_schedule(self.config.schedule)(step, total)

    # ------------------------------------------------------------------ drawing
    def _rank(self) -> int | None:
        if not self.config.per_rank_noise:
            return None
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @torch.no_grad()  # a std is fixed at draw time, never differentiated (and views of A, B cost less without grad)
    def _draws(self, views: list[View], step: int, sigma: float) -> dict[str, Draw]:
        """The draws of `views` at `step`: std from their current weights, one grouped call per backend."""
        groups: dict[backends.Backend, list[View]] = {}
        for v in views:
            groups.setdefault(self._backends[v.name], []).append(v)
        rank, skey = self._rank(), step_key(self.config.seed, step)
        out = {}
        for backend, vs in groups.items():
            stds = (backend.row_std(vs, self.config.noise, sigma) if sigma != 0.0 else  # no weight read for no noise
                    [torch.zeros(v.mat.shape[0], dtype=torch.float32, device=v.tensor.device) for v in vs])
            for v, std in zip(vs, stds):
                t = v.target
                out[t.name] = Draw(layer_key(skey, t.layer_id, rank), std, v.rows, self._generators[t.name])
        return out

    def _target(self, name: str) -> Target:
        try:
            return self._by_name[name] if name in self._by_name else self._by_name[canonical_name(name)]
        except KeyError:
            raise KeyError(f"{name!r} is not a Flat-LoRA target; targets: {[t.name for t in self.targets]}") from None

    def _draw_of(self, name: str, step: int) -> tuple[Target, Draw]:
        t = self._target(name)
        w = self._window
        if w is not None and w.step == step and t.name in w.draws:
            return t, w.draws[t.name]
        return t, self._draws([View.of(t)], step, self.sigma_at(step))[t.name]

    def row_std(self, name: str, step: int) -> torch.Tensor:
        """Per-row std of layer `name` at `step` (the open window's, or computed from the current weights)."""
        return self._draw_of(name, step)[1].std

    def noise(self, name: str, step: int) -> torch.Tensor:
        """Materialise layer `name`'s noise at `step` as a float32 (out, in) matrix (for tests and analysis)."""
        t, draw = self._draw_of(name, step)
        return draw.matrix(t, t.weight.device)

    # ------------------------------------------------------------------ windows
    @property
    def active(self) -> bool:
        """True while a window is open (noise on)."""
        return self._window is not None

    def begin_step(self, step: int | None = None) -> float:
        """Turn the noise of update step `step` on (default: the step after the last one). Returns sigma_t."""
        if self._closed:
            raise RuntimeError("this FlatLoRA engine was closed (its weights were released): build a new FlatLoRA")
        if self._window is not None:
            raise RuntimeError(
                f"begin_step({step}) while step {self._window.step} is still open: call end_step() first, "
                f"or use `with flat.step(t):`, which pairs them."
            )
        if step is None:
            step = 0 if self.last_step is None else self.last_step + 1
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer (the optimizer step index), got {step!r}")
        sigma = self.sigma_at(step)
        window = Window(step, sigma, lambda views: self._draws(views, step, sigma))
        self._window = window
        self.last_step = step
        if sigma == 0.0:
            return sigma
        try:
            with deferred_sigint(), _profiled("flatlora.begin_step"):
                self._mode.open(window)
                self._bn.freeze()
        except BaseException:
            # An error part-way, or a Ctrl-C held back until the loop ended: undo what was applied, so a
            # begin_step that raises leaves no noise behind.
            try:
                with deferred_sigint():
                    self._close(window)
            finally:
                self._window = None
            raise
        if self._bn.layers:
            self.bn_stale = self.bn_policy == "recalibrate"
            if self.bn_policy == "recalibrate" and not self._bn_warned:
                self._bn_warned = True
                log.warning(
                    "flatlora: %d BatchNorm layers keep their running statistics frozen while noise is on; call "
                    "flat.recalibrate_batchnorm(train_batches) after training (the trainer callbacks do it).",
                    len(self._bn.layers),
                )
        self.draws += 1
        return sigma

    def _warn_eval_in_window(self, module: nn.Module, args: Any) -> None:
        if self._window is not None and not module.training and not self._warned_eval:
            self._warned_eval = True
            log.warning(
                "flatlora: the model ran in eval mode while the noise of step %d was on: evaluation, generation "
                "and saving should happen outside flat.step() (between end_step and the next begin_step).",
                self._window.step,
            )

    def close(self) -> None:
        """End any open window, remove the engine's hook from the model and release its weights (another
        engine may then be built on them). A closed engine draws no more windows."""
        if self._closed:
            return
        try:
            self.close_window()
            self._mode.check()  # the last restores' outcomes (a GPU reads them a window late)
        finally:
            self._closed = True
            self._eval_guard.remove()
            self._release()

    def end_step(self) -> None:
        """Remove the noise of the open window; the frozen weights are bit-identical afterwards.

        Raises RuntimeError when a targeted weight was written inside the window (a load, a merge, an optimizer
        step on a frozen weight): that layer is left as it is, every other one is restored exactly. On a GPU
        the restore kernels' findings are read without waiting for them: a write is then reported by the next
        end_step(), or by close() after the last window."""
        window = self._window
        if window is None:
            raise RuntimeError("end_step() without an open window: call begin_step(t) first (or use `with flat.step(t):`).")
        try:
            with deferred_sigint(), _profiled("flatlora.end_step"):
                self._close(window)
        finally:
            # Whatever could be restored has been; a layer that could not raises above, and the window
            # is over either way, so the next step starts clean. The metrics are read after the restore,
            # which is where a deferred record's size becomes known.
            self._window = None
            self._last_metrics = {"flatlora/sigma": window.sigma, "flatlora/step": float(window.step),
                                  **self._mode.metrics(window)}

    def _close(self, window: Window) -> None:
        try:
            self._mode.close(window)
        finally:
            self._bn.thaw()

    @contextlib.contextmanager
    def step(self, step: int | None = None):
        """`with flat.step(t):` noise on for the body, removed on exit, on exceptions and Ctrl-C included."""
        sigma = self.begin_step(step)
        try:
            yield sigma
        finally:
            self.end_step()

    # ------------------------------------------------------------------ BatchNorm
    def recalibrate_batchnorm(
        self,
        batches: Iterable[Any],
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        max_batches: int | None = None,
    ) -> int:
        """Recompute BatchNorm running statistics with clean weights (see flatlora.core.batchnorm)."""
        if self._window is not None:
            raise RuntimeError("recalibrate_batchnorm() inside a window would measure noisy weights: call it after end_step().")
        used = batchnorm.recalibrate(self.model, batches, forward_fn, max_batches)
        self.bn_stale = False
        return used

    # ------------------------------------------------------------------ reporting and state
    def metrics(self) -> dict[str, float]:
        """Scalars of the last closed window for the host's logger: sigma_t, step, and (in-place mode) the
        bytes of the exact-restore record."""
        return dict(self._last_metrics)

    def restore_record_bytes(self) -> int:
        """Bytes of the in-place restore record held by the open window (0 when closed)."""
        w = self._window
        return self._mode.record_bytes(w) if w else 0

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: the config (seed, schedule, ...) and the last step. The noise itself is
        a pure function of (seed, step, layer), so nothing else is stored."""
        return {"version": STATE_VERSION, "config": self.config.to_dict(), "last_step": self.last_step}

    # ------------------------------------------------------------------ run length and resume
    def set_total_steps(self, total: int) -> None:
        """Set the number of optimizer steps the schedule ramps over (trainer callbacks call it with the
        trainer's max_steps). Allowed before the first window, or to the value already set: changing it once
        a step has been drawn would change the noise of steps already taken and of every later one."""
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ValueError(f"total_steps must be a positive number of optimizer steps, got {total!r}")
        current = self.config.total_steps
        if total == current:
            return
        if self.last_step is not None:
            raise ValueError(
                f"total_steps cannot change from {current} to {total} after step {self.last_step} was drawn: the "
                f"schedule of the steps already taken would change. Set it before the first window (or build a new FlatLoRA)."
            )
        self.config = dataclasses.replace(self.config, total_steps=total)._read_only()

    def resume(self, state: dict[str, Any] | None, global_step: int) -> None:
        """Continue a run from a checkpoint: the next `begin_step()` without an argument draws `global_step`.

        `state` is the checkpoint's `flat.state_dict()` (None when it has none: the stream then continues
        from this config's seed). Its noise-stream settings must equal this engine's; every differing field
        is named in one ValueError."""
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be a non-negative integer (the next optimizer step), got {global_step!r}")
        if self._window is not None:
            raise RuntimeError("resume() inside an open window: call end_step() (or close_window()) first")
        if state is not None:
            last = self._checked_state(state)
            if last is not None and last != global_step - 1:
                log.warning("flatlora: the checkpoint's state ends at step %s but training resumes at step %d",
                            last, global_step)
        else:
            log.info("flatlora: resuming at step %d without a saved FlatLoRA state; the noise stream continues "
                     "from this config's seed", global_step)
        self.last_step = global_step - 1 if global_step > 0 else None

    def close_window(self) -> bool:
        """End the open window if there is one (noise removed exactly); returns whether one was open.
        Call it before anything that must see clean weights: evaluation, prediction, saving, merging. (Work
        queued after it sees the restored weights; on a GPU, whether a weight was written inside the window is
        read a window later, see end_step.)"""
        if self._window is None:
            return False
        self.end_step()
        return True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (a `state_dict()`): the next `begin_step()` draws its last_step + 1.

        The saved noise settings (STREAM_FIELDS) must equal this engine's, else a ValueError names every
        difference: a checkpoint never silently changes sigma, the schedule or the seed. Settings that do not
        change the noise (mode, bn_policy) stay this engine's."""
        if self._window is not None:
            raise RuntimeError("load_state_dict() inside an open window: call end_step() first")
        self.last_step = self._checked_state(state)

    def _checked_state(self, state: Any) -> int | None:
        """Validate `state` against this engine; returns its last_step."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not isinstance(state.get("config"), dict):
            raise ValueError(f"not a FlatLoRA state dict (expected keys version={STATE_VERSION}, config, last_step)")
        last = state.get("last_step")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ValueError(f"the FlatLoRA state's last_step must be None or a non-negative integer, got {last!r}")
        try:
            saved = FlatLoRAConfig.from_dict(state["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"the FlatLoRA state's config is invalid: {e}") from None
        diff = [f"{k}: saved {getattr(saved, k)!r}, now {getattr(self.config, k)!r}"
                for k in STREAM_FIELDS if getattr(saved, k) != getattr(self.config, k)]
        if diff:
            raise ValueError(
                "the checkpoint's FlatLoRA noise settings differ from this run's (" + "; ".join(diff) + "): resuming "
                "would not continue the same schedule and noise stream. Build FlatLoRA with the checkpoint's settings "
                "(or start a new run without its state)."
            )
        return last

    def __repr__(self) -> str:
        c = self.config
        return (f"FlatLoRA(sigma={c.sigma}, schedule={c.schedule!r}, total_steps={c.total_steps}, mode={self.mode!r}, "
                f"targets={len(self.targets)}, bn_policy={self.bn_policy!r}, seed={c.seed})")
