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
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import FlatLoRAConfig
from ..kernels import resolve_generator
from ..noise import get_noise
from ..rng import canonical_name, noise_key
from ..schedules import get_schedule
from . import batchnorm, forward, inplace
from .interrupts import deferred_sigint
from .noise_draw import Draw
from .norms import merged_row_sq_norms
from .targets import Target, find_targets

log = logging.getLogger("flatlora")

STATE_VERSION = 1
# Settings that define the noise stream (sigma_t and eps of every step): a resumed run must match them.
STREAM_FIELDS = ("sigma", "total_steps", "schedule", "noise", "seed", "per_rank_noise", "target", "include", "exclude",
                 "generator")


@dataclass
class _Window:
    step: int
    sigma: float
    draws: dict[str, Draw] = field(default_factory=dict)
    applied: list[inplace.Applied] = field(default_factory=list)
    data_ptrs: dict[str, int] = field(default_factory=dict)
    armed: list[Target] = field(default_factory=list)


def _local_rows(w: torch.Tensor) -> slice | None:
    """Global rows held by this process when `w` is an FSDP2 (DTensor, Shard(0)) shard; else None."""
    if not hasattr(w, "device_mesh"):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(isinstance(p, Shard) and p.dim != 0 for p in w.placements):
        raise ValueError("Flat-LoRA in-place mode supports weights sharded on dim 0 (FSDP2); use mode='forward'")
    shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    return slice(offset[0], offset[0] + shape[0])


def _unmaterialised(w: torch.Tensor) -> bool:
    # FSDP1 flat-parameter views and DeepSpeed ZeRO-3 partitions hold no (or a 1-D slice of) data outside
    # forward, so only forward mode, which reads the gathered weight inside forward, can work there.
    return hasattr(w, "ds_id") or w.dim() < 2 and w.numel() != 1 or w.numel() == 0


class FlatLoRA:
    """Flat-LoRA noise on the LoRA layers of `model` (or its plain layers with target='linear').

    Args:
        model: a PEFT model (or any module holding PEFT LoRA layers), or a plain model with target='linear'.
        config: a FlatLoRAConfig; keyword arguments override its fields (or build one).
    """

    def __init__(self, model: nn.Module, config: FlatLoRAConfig | None = None, **overrides: Any):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config is None:
            config = FlatLoRAConfig(**overrides)
        elif not isinstance(config, FlatLoRAConfig):
            raise ValueError(f"config must be a FlatLoRAConfig, got {type(config).__name__}")
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.model = model
        self.config = config
        self.targets, self.skipped = find_targets(model, config.target, config.include, config.exclude)
        for name, why in self.skipped.items():
            log.warning("flatlora: skipping %s: %s", name, why)
        self._by_name = {t.name: t for t in self.targets}
        self._by_name.update({canonical_name(t.name): t for t in self.targets})
        self.mode = self._resolve_mode(config.mode)
        bn_layers = batchnorm.batchnorm_layers(model)
        policy = config.bn_policy
        self.bn_policy = ("recalibrate" if bn_layers else "none") if policy == "auto" else policy
        self._bn = batchnorm.FrozenStats(bn_layers if self.bn_policy in ("freeze", "recalibrate") else [])
        self._bn_warned = False
        self.bn_stale = False  # running stats were frozen through some windows and not recalibrated since
        self._window: _Window | None = None
        self.last_step: int | None = None
        self.draws = 0  # windows that drew noise
        self._last_metrics: dict[str, float] = {}
        self._record_bytes = 0
        self._warned_eval = False
        # One cheap hook on the root module catches evaluation or generation run while noise is on.
        self._eval_guard = model.register_forward_pre_hook(self._warn_eval_in_window)

    # ------------------------------------------------------------------ set-up
    def _resolve_mode(self, mode: str) -> str:
        special = [t for t in self.targets if t.quantized or _unmaterialised(t.weight)]
        if mode == "inplace":
            for t in self.targets:
                if _unmaterialised(t.weight):
                    raise ValueError(
                        f"layer {t.name!r} has no materialised weight here (FSDP1 flat parameter or DeepSpeed "
                        f"ZeRO-3 partition): in-place noise cannot be applied. Use mode='forward', or FSDP2 (fully_shard)."
                    )
                inplace.check_dtype(t)
            return "inplace"
        if mode == "forward":
            return "forward"
        if special:
            log.info("flatlora: mode=auto -> forward (%s has a quantized or unmaterialised weight)", special[0].name)
            return "forward"
        for t in self.targets:
            inplace.check_dtype(t)
        log.info("flatlora: mode=auto -> inplace (dense float weights; exact restore)")
        return "inplace"

    # ------------------------------------------------------------------ schedule
    def sigma_at(self, step: int) -> float:
        """The noise scale sigma_t of update step `step` (0-based)."""
        total = self.config.total_steps
        if total is None:
            if self.config.schedule != "constant":
                raise ValueError(
                    "FlatLoRAConfig.total_steps is not set: the schedule needs the number of optimizer steps "
                    "(pass total_steps=..., or use a trainer callback, which reads it from the trainer)."
                )
            total = 1
        return self.config.sigma * get_schedule(self.config.schedule)(step, total)

    # ------------------------------------------------------------------ drawing
    def _rank(self) -> int | None:
        if not self.config.per_rank_noise:
            return None
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _draw(self, t: Target, step: int, sigma: float, rows: slice | None = None) -> Draw:
        gen = resolve_generator(self.config.generator, t.weight.device)
        sq = merged_row_sq_norms(t, rows, fused=gen == "philox")
        std = get_noise(self.config.noise)(sq, t.n, sigma)
        return Draw(noise_key(self.config.seed, step, t.layer_id, self._rank()), std, rows, gen)

    def _grouped_draws(self, step: int, sigma: float) -> dict[str, Draw]:
        """Draws of the layers whose filter-noise std one grouped Triton launch computes (in-place mode).

        Small models on CUDA are launch-bound: `_draw` costs ~15-20 small launches per layer (norm
        kernel, W A^T B, A A^T, sqrt, scale...), while `triton_noise.row_std_group` computes the std of
        every eligible layer in one launch. Eligible: Philox stream on a device the kernels serve,
        noise "filter", no dense delta, weight not sharded (FSDP2 shards keep the per-layer path).
        Elsewhere (CPU by default, whose generator is "torch") this returns {} and `_draw` does it all."""
        from .. import kernels

        if self.config.noise != "filter":
            return {}
        eligible = [t for t in self.targets
                    if resolve_generator(self.config.generator, t.weight.device) == "philox"
                    and kernels.use_triton(t.weight.device) and not t.quantized and t.weight.dim() >= 2
                    and _local_rows(t.weight) is None and t.dense_delta() is None]
        if not eligible:
            return {}
        from ..kernels import triton_noise  # imported only where the kernels serve the device

        eligible = [t for t in eligible if triton_noise.supported(t.weight)]
        items = []
        for t in eligible:
            w = t.weight
            lowrank = t.lowrank()
            b, a = (None, None) if lowrank is None else lowrank
            items.append(triton_noise.StdItem(w.t() if t.transposed else w.reshape(w.shape[0], -1), a, b))
        stds = triton_noise.row_std_group(items, sigma)
        rank = self._rank()
        return {t.name: Draw(noise_key(self.config.seed, step, t.layer_id, rank), std, None, "philox")
                for t, std in zip(eligible, stds)}

    def _target(self, name: str) -> Target:
        try:
            return self._by_name[name] if name in self._by_name else self._by_name[canonical_name(name)]
        except KeyError:
            raise KeyError(f"{name!r} is not a Flat-LoRA target; targets: {[t.name for t in self.targets]}") from None

    def row_std(self, name: str, step: int) -> torch.Tensor:
        """Per-row std of layer `name` at `step` (the open window's, or computed from the current weights)."""
        w = self._window
        if w is not None and w.step == step and name in w.draws:
            return w.draws[name].std
        t = self._target(name)
        return self._draw(t, step, self.sigma_at(step)).std

    def noise(self, name: str, step: int) -> torch.Tensor:
        """Materialise layer `name`'s noise at `step` as a float32 (out, in) matrix (for tests and analysis)."""
        t = self._target(name)
        w = self._window
        draw = w.draws[t.name] if w is not None and w.step == step and t.name in w.draws else self._draw(t, step, self.sigma_at(step))
        return draw.matrix(t, t.weight.device)

    # ------------------------------------------------------------------ windows
    @property
    def active(self) -> bool:
        """True while a window is open (noise on)."""
        return self._window is not None

    def begin_step(self, step: int | None = None) -> float:
        """Turn the noise of update step `step` on (default: the step after the last one). Returns sigma_t."""
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
        window = _Window(step, sigma)
        self._window = window
        self.last_step = step
        if sigma == 0.0:
            return sigma
        try:
            with deferred_sigint():
                if self.mode == "inplace":
                    # All draws first (the std is fixed from the clean weights), then apply them.
                    window.draws.update(self._grouped_draws(step, sigma))
                    for t in self.targets:
                        if t.name not in window.draws:
                            window.draws[t.name] = self._draw(t, step, sigma, _local_rows(t.weight))
                        window.data_ptrs[t.name] = inplace._local(t.weight).data_ptr()
                    pairs = [(t, window.draws[t.name]) for t in self.targets]
                    for applied in inplace.perturb_all(pairs):
                        window.applied.append(applied)
                else:
                    for t in self.targets:
                        forward.arm(t, self._lazy_draw(window, t))
                        window.armed.append(t)
                self._bn.freeze()
        except BaseException:
            # An error part-way, or a Ctrl-C held back until the loop ended: undo what was applied, so a
            # begin_step that raises leaves no noise behind.
            with deferred_sigint():
                self._close(window)
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

    def _lazy_draw(self, window: _Window, t: Target) -> Callable[[], Draw]:
        # Forward mode draws at the layer's first forward of the window: under FSDP1/ZeRO-3 the weight is
        # only gathered then. The std is then fixed for every later micro-batch and backward.
        def get() -> Draw:
            draw = window.draws.get(t.name)
            if draw is None:
                draw = window.draws[t.name] = self._draw(t, window.step, window.sigma)
            return draw

        return get

    def _warn_eval_in_window(self, module: nn.Module, args: Any) -> None:
        if self._window is not None and not module.training and not self._warned_eval:
            self._warned_eval = True
            log.warning(
                "flatlora: the model ran in eval mode while the noise of step %d was on: evaluation, generation "
                "and saving should happen outside flat.step() (between end_step and the next begin_step).",
                self._window.step,
            )

    def close(self) -> None:
        """End any open window and remove the engine's hook from the model."""
        if self._window is not None:
            self.end_step()
        self._eval_guard.remove()

    def end_step(self) -> None:
        """Remove the noise of the open window; the frozen weights are bit-identical afterwards."""
        window = self._window
        if window is None:
            raise RuntimeError("end_step() without an open window: call begin_step(t) first (or use `with flat.step(t):`).")
        self._record_bytes = sum(a.nbytes for a in window.applied)
        try:
            with deferred_sigint():
                self._close(window)
        finally:
            # Whatever could be restored has been; a layer that could not raises above, and the window
            # is over either way, so the next step starts clean.
            self._window = None
            self._last_metrics = self._metrics(window)

    def _close(self, window: _Window) -> None:
        # Entries are popped as they are undone, so a close that fails part-way can be finished later.
        errors = []
        while window.applied:
            applied = window.applied.pop()
            replaced = [t.name for t in applied.targets if inplace._local(t.weight).data_ptr() != window.data_ptrs[t.name]]
            if replaced:
                errors += replaced
                continue
            inplace.restore_applied(applied)
        while window.armed:
            forward.disarm(window.armed.pop())
        self._bn.thaw()
        if errors:
            raise RuntimeError(
                f"the weights of {errors} were replaced while the noise was on (an adapter merge, a state-dict "
                f"load?): they cannot be restored exactly. Merge, load and save only outside flat.step()."
            )

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
    def _metrics(self, window: _Window) -> dict[str, float]:
        m = {"flatlora/sigma": window.sigma, "flatlora/step": float(window.step)}
        if self.mode == "inplace":
            m["flatlora/restore_record_bytes"] = float(self._record_bytes)
        return m

    def metrics(self) -> dict[str, float]:
        """Scalars of the last closed window for the host's logger: sigma_t, step, and (in-place mode) the
        bytes of the exact-restore record."""
        return dict(self._last_metrics)

    def restore_record_bytes(self) -> int:
        """Bytes of the in-place restore record held by the open window (0 when closed)."""
        w = self._window
        return sum(a.nbytes for a in w.applied) if w else 0

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
        self.config = dataclasses.replace(self.config, total_steps=total)

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
            saved = self._checked_state(state)
            last = saved["last_step"]
            if last is not None and last != global_step - 1:
                log.warning("flatlora: the checkpoint's state ends at step %s but training resumes at step %d",
                            last, global_step)
        else:
            log.info("flatlora: resuming at step %d without a saved FlatLoRA state; the noise stream continues "
                     "from this config's seed", global_step)
        self.last_step = global_step - 1 if global_step > 0 else None

    def close_window(self) -> bool:
        """End the open window if there is one (noise removed exactly); returns whether one was open.
        Call it before anything that must see clean weights: evaluation, prediction, saving, merging."""
        if self._window is None:
            return False
        self.end_step()
        return True

    def _checked_state(self, state: Any) -> dict[str, Any]:
        """`state` validated against this engine: a well-formed state dict whose noise-stream settings are ours."""
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
        return {"config": saved, "last_step": last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "config" not in state:
            raise ValueError(f"not a FlatLoRA state dict (expected keys version={STATE_VERSION}, config, last_step)")
        if self._window is not None:
            raise RuntimeError("load_state_dict() inside an open window: call end_step() first")
        loaded = FlatLoRAConfig(**state["config"])
        for key in ("target", "include", "exclude"):
            if getattr(loaded, key) != getattr(self.config, key):
                raise ValueError(
                    f"the checkpoint's FlatLoRA {key}={getattr(loaded, key)!r} differs from this run's "
                    f"{getattr(self.config, key)!r}: the targets would differ. Build FlatLoRA with the same config."
                )
        self.config = dataclasses.replace(loaded, mode=self.config.mode)
        self.last_step = state["last_step"]

    def __repr__(self) -> str:
        c = self.config
        return (f"FlatLoRA(sigma={c.sigma}, schedule={c.schedule!r}, total_steps={c.total_steps}, mode={self.mode!r}, "
                f"targets={len(self.targets)}, bn_policy={self.bn_policy!r}, seed={c.seed})")
