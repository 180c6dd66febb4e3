"""Flat-LoRA for PyTorch Lightning: a Callback around every optimizer step.

    trainer = L.Trainer(callbacks=[FlatLoRACallback(sigma=0.05)], accumulate_grad_batches=4)

Lightning is imported as `lightning.pytorch` (the `lightning` package, `pip install 'flatlora[lightning]'`),
or as `pytorch_lightning` when only that is installed; `flatlora.integrations.lightning.pl` is the one in
use, and the Trainer must come from the same package.

A thin adapter over `flatlora.FlatLoRA` (SPEC Part B §2.1 has Lightning's event order):

    on_train_start            build the engine on the LightningModule: total_steps = estimated_stepping_batches,
                              seed = the one given, else `seed_everything`'s (PL_GLOBAL_SEED), else 0
    on_train_batch_start      first micro-batch of a window (batch_idx % accumulate_grad_batches == 0):
                              open the window of trainer.global_step, log flatlora/sigma with pl_module.log
    on_before_optimizer_step  close it: after the last backward of the window, before clipping and the step.
                              The DeepSpeed strategy fires it on every micro-batch, so there only at the window's end
    on_train_batch_end        safety net at the window's end (a step skipped by a None loss fires no optimizer hook)
    on_validation/test/predict_start  the noise is removed first; inside a window (val_check_interval not a
                              multiple of the accumulation) the same noise comes back at the next training forward
    checkpoints               no hook: Lightning takes the weights through state_dict(), whose pre-hook (the guard's)
                              removes the noise first; inside a window it comes back at the next training forward
    on_exception, on_train_end  close; BatchNorm statistics are recalibrated on clean weights at the end

Optimizer step-pre-hooks are not used on purpose: under automatic optimisation the last micro-batch's
forward runs inside `optimizer.step(closure)`, after those hooks (SPEC §2.2).
The noise keys come from module names relative to the LightningModule (e.g. `model.base_model...`).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable

from ..config import FlatLoRAConfig
from ._deps import require
from ._engine import CallbackEngine, EngineOwner


# `lightning.pytorch` first (the `lightning` package), `pytorch_lightning` when only that is installed.
pl = require(("lightning.pytorch", "pytorch_lightning"), "lightning", "flatlora.integrations.lightning")

log = logging.getLogger("flatlora")


def _global_seed() -> int | None:
    """The seed of Lightning's `seed_everything` (it exports PL_GLOBAL_SEED), None when it was not called."""
    value = os.environ.get("PL_GLOBAL_SEED", "")
    return int(value) if value.lstrip("-").isdigit() else None


class FlatLoRACallback(EngineOwner, pl.Callback):
    """Flat-LoRA noise around every optimizer step of a Lightning fit.

    Args:
        config: a FlatLoRAConfig; keyword arguments override its fields (or build one), e.g. `sigma=0.05`.
            `total_steps` left unset is taken from `trainer.estimated_stepping_batches`. The noise seed
            follows `seed_everything` unless you give one (a `seed=` keyword, or a config whose seed is not
            the default).
        bn_max_batches: train batches used to recalibrate BatchNorm statistics at the end (BN models only).
        bn_forward_fn: `fn(pl_module, batch)` running one batch for that recalibration; default: a dict batch
            as keyword arguments, a tuple/list's first element, anything else as is.
        log_sigma: log `flatlora/sigma` through `pl_module.log` (so every Lightning logger records it).

    Attributes:
        flat: the `FlatLoRA` engine (None before training starts).
    """

    def __init__(self, config: FlatLoRAConfig | None = None, *, bn_max_batches: int | None = 200,
                 bn_forward_fn: Callable[[Any, Any], Any] | None = None, log_sigma: bool = True, **overrides: Any):
        self._engine = CallbackEngine(config, overrides)
        self.config = self._engine.config
        self.bn_max_batches = bn_max_batches
        self.bn_forward_fn = bn_forward_fn
        self.log_sigma = log_sigma
        self._batch_idx = 0
        self._loaded: dict | None = None

    # ------------------------------------------------------------------ set-up and resume
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore()
        total = None
        if self.config.total_steps is None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("flatlora: the number of optimizer steps is unknown (infinite data and no max_steps): "
                                 "set Trainer(max_steps=...) or FlatLoRACallback(total_steps=...)")
        self._engine.build(pl_module, _global_seed(), total_steps=total)
        log.info("flatlora: %r", self.flat)
        if self._loaded is not None or trainer.global_step > 0:
            loaded, self._loaded = self._loaded, None
            self.flat.resume(loaded, trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return self.flat.state_dict() if self.flat is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict or None

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
        sigma = self._guard.open(trainer.global_step)
        if self.log_sigma:
            pl_module.log("flatlora/sigma", sigma, on_step=True, on_epoch=False, batch_size=1)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # DeepSpeed handles accumulation itself and calls this hook for every micro-batch.
        if trainer.strategy.handles_gradient_accumulation and not self._window_end(trainer, self._batch_idx):
            return
        self.restore()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._window_end(trainer, batch_idx):
            self.restore()

    # Validation inside a window pauses it: the next training forward of the window brings the same noise back
    # (A, B have not changed within the window, so the std and hence the noise are the same again). The guard's
    # eval-mode and state_dict() hooks would do this too; the events make it explicit and independent of them.
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause("validation")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause("test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause("predict")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.restore()

    def _pause(self, why: str) -> None:
        if self._guard is not None:
            self._guard.pause(why)

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
        """End the open window if there is one (noise removed, exact); no-op otherwise."""
        if self._guard is not None:
            self._guard.close()
