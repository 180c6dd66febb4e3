"""Flat-LoRA for PyTorch Lightning: a Callback around every optimizer step.

    trainer = pl.Trainer(callbacks=[FlatLoRACallback(sigma=0.05)], accumulate_grad_batches=4)

A thin adapter over `flatlora.FlatLoRA` (SPEC Part B §2.1 has Lightning's event order):

    on_train_start            find the LoRA layers of the LightningModule; total_steps = estimated_stepping_batches
    on_train_batch_start      first micro-batch of a window (batch_idx % accumulate_grad_batches == 0):
                              begin_step(trainer.global_step), log flatlora/sigma with pl_module.log
    on_before_optimizer_step  end_step(): after the last backward of the window, before clipping and the step.
                              The DeepSpeed strategy fires it on every micro-batch, so there only at the window's end
    on_train_batch_end        safety net at the window's end (a step skipped by a None loss fires no optimizer hook)
    on_validation_start/end   validation inside a window (val_check_interval not a multiple of the accumulation)
                              runs on clean weights; the same noise is re-applied afterwards
    on_exception, on_train_end  restore; BatchNorm statistics are recalibrated on clean weights at the end

Optimizer step-pre-hooks are not used on purpose: under automatic optimisation the last micro-batch's
forward runs inside `optimizer.step(closure)`, after those hooks (SPEC §2.2).
The noise keys come from module names relative to the LightningModule (e.g. `model.base_model...`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import pytorch_lightning as pl

from ..config import FlatLoRAConfig
from ..core.engine import FlatLoRA

log = logging.getLogger("flatlora")

_STREAM_FIELDS = ("sigma", "total_steps", "schedule", "noise", "seed", "per_rank_noise", "target", "include", "exclude", "generator")


class FlatLoRACallback(pl.Callback):
    """Flat-LoRA noise around every optimizer step of a Lightning fit.

    Args:
        config: a FlatLoRAConfig; keyword arguments override its fields (or build one), e.g. `sigma=0.05`.
            `total_steps` left unset is taken from `trainer.estimated_stepping_batches`.
        bn_max_batches: train batches used to recalibrate BatchNorm statistics at the end (BN models only).
        bn_forward_fn: `fn(pl_module, batch)` running one batch for that recalibration; default: a dict batch
            as keyword arguments, a tuple/list's first element, anything else as is.
        log_sigma: log `flatlora/sigma` through `pl_module.log` (so every Lightning logger records it).

    Attributes:
        flat: the `FlatLoRA` engine (None before training starts).
    """

    def __init__(self, config: FlatLoRAConfig | None = None, *, bn_max_batches: int | None = 200,
                 bn_forward_fn: Callable[[Any, Any], Any] | None = None, log_sigma: bool = True, **overrides: Any):
        if config is None:
            config = FlatLoRAConfig(**overrides)
        elif not isinstance(config, FlatLoRAConfig):
            raise ValueError(f"config must be a FlatLoRAConfig, got {type(config).__name__}")
        else:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.bn_max_batches = bn_max_batches
        self.bn_forward_fn = bn_forward_fn
        self.log_sigma = log_sigma
        self.flat: FlatLoRA | None = None
        self._batch_idx = 0
        self._paused: int | None = None  # step whose window validation interrupted
        self._loaded: dict | None = None

    # ------------------------------------------------------------------ set-up and resume
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore()
        if self.flat is None or self.flat.model is not pl_module:
            if self.flat is not None:
                self.flat.close()
            self.flat = FlatLoRA(pl_module, dataclasses.replace(self.config))
            log.info("flatlora: %r", self.flat)
        if self.config.total_steps is None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("flatlora: the number of optimizer steps is unknown (infinite data and no max_steps): "
                                 "set Trainer(max_steps=...) or FlatLoRACallback(total_steps=...)")
            self.flat.set_total_steps(int(total))
        if self._loaded is not None:
            self._check_resume(self._loaded, trainer.global_step)
            self._loaded = None

    def state_dict(self) -> dict[str, Any]:
        return self.flat.state_dict() if self.flat is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict or None

    def _check_resume(self, saved: dict, global_step: int) -> None:
        ours = self.flat.config.to_dict()
        diff = {k: (saved["config"].get(k), ours[k]) for k in _STREAM_FIELDS if saved["config"].get(k) != ours[k]}
        if diff:
            log.warning("flatlora: resuming with a different noise setting than the checkpoint (saved, now): %s; the "
                        "run will not continue the same schedule and noise stream", diff)
        self.flat.last_step = saved.get("last_step")
        if self.flat.last_step is not None and self.flat.last_step != global_step - 1:
            log.warning("flatlora: checkpoint state ends at step %s but training resumes at step %d",
                        self.flat.last_step, global_step)

    # ------------------------------------------------------------------ the window
    def _window_end(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            return True
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return True
        n = trainer.num_training_batches
        return isinstance(n, int) and batch_idx + 1 >= n

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        if batch_idx % trainer.accumulate_grad_batches != 0:
            return
        if self.flat.active:
            log.warning("flatlora: a window was still open at step %d; closing it first", trainer.global_step)
            self.flat.end_step()
        sigma = self.flat.begin_step(trainer.global_step)
        if self.log_sigma:
            pl_module.log("flatlora/sigma", sigma, on_step=True, on_epoch=False, batch_size=1)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # DeepSpeed handles accumulation itself and calls this hook for every micro-batch.
        if trainer.strategy.handles_gradient_accumulation and not self._window_end(trainer, self._batch_idx):
            return
        self.restore()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.flat.active and self._window_end(trainer, batch_idx):
            self.restore()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.flat is not None and self.flat.active:
            self._paused = self.flat.last_step  # the open window's step
            self.flat.end_step()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._paused is not None:
            step, self._paused = self._paused, None
            # A, B have not changed within the window, so the std and hence the noise are the same again.
            self.flat.begin_step(step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._paused = None
        self.restore()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore()
        flat = self.flat
        if flat is not None and flat.bn_policy == "recalibrate" and flat.bn_stale:
            loader = trainer.train_dataloader
            if loader is not None:
                fn = self.bn_forward_fn
                batches = (trainer.strategy.batch_to_device(b) for b in loader)
                used = flat.recalibrate_batchnorm(batches, fn, max_batches=self.bn_max_batches)
                log.info("flatlora: recalibrated BatchNorm statistics on %d clean batches", used)

    def restore(self) -> None:
        """Remove the noise if a window is open (no-op otherwise)."""
        if self.flat is not None and self.flat.active:
            self.flat.end_step()
