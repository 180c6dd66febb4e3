"""Flat-LoRA for the Hugging Face `Trainer` (and TRL's `SFTTrainer`, which keeps the Trainer's loop).

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[FlatLoRACallback(sigma=0.05)])
    trainer.train()

The callback is a thin adapter over `flatlora.FlatLoRA` (SPEC Part B §1.1 has the event order):

    on_train_begin         find the LoRA layers of `model` (SFTTrainer builds the PeftModel in __init__, so
                           not earlier); total_steps = state.max_steps; on resume, check the saved state
    on_step_begin          begin_step(state.global_step)   before the first micro-batch of the window
    on_pre_optimizer_step  end_step()                      after the last backward (under DeepSpeed also after
                           the real optimizer step: harmless, the restore replays the stored std, never B, A)
    on_log                 adds `flatlora/sigma` (sigma_t of the last window) to training logs
    on_save                writes `flatlora_state.json` next to the checkpoint
    on_train_end           closes any open window, recalibrates BatchNorm statistics if the model has BN

Evaluation, prediction, generation, saving and merging run after `on_step_end`, so they see clean weights.
The reported training loss is the loss under noise (what Flat-LoRA optimises).

Two things a callback alone cannot do, because the Trainer has no exception event and runs user callbacks
after the reporting ones (so keys added in `on_log` never reach W&B/TensorBoard/MLflow): at `on_train_begin`
the callback looks up the running Trainer on the call stack, moves itself to the front of the callback list
and wraps that Trainer's `training_step` so an exception inside the window restores the weights before it
propagates. `attach(trainer, ...)` does the same explicitly (and wraps `trainer.train` in try/finally);
use it if you prefer no stack lookup.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any

from transformers import Trainer, TrainerCallback

from ..config import FlatLoRAConfig
from ..core.engine import FlatLoRA

log = logging.getLogger("flatlora")

STATE_FILE = "flatlora_state.json"
# Fields that fix the noise stream and the schedule: a resumed run must agree on them to continue the run.
_STREAM_FIELDS = ("sigma", "total_steps", "schedule", "noise", "seed", "per_rank_noise", "target", "include", "exclude", "generator")


class FlatLoRACallback(TrainerCallback):
    """Flat-LoRA noise around every optimizer step of a `transformers.Trainer`.

    Args:
        config: a FlatLoRAConfig; keyword arguments override its fields (or build one), e.g. `sigma=0.05`.
            `total_steps` left unset is taken from the Trainer (`state.max_steps`).
        bn_max_batches: batches of the train loader used to recalibrate BatchNorm statistics at train end
            (only for models with BatchNorm, `flat.bn_policy == "recalibrate"`); None = the whole loader.
        save_state: write `flatlora_state.json` into each checkpoint folder and check it on resume.

    Attributes:
        flat: the `FlatLoRA` engine (None before `on_train_begin`).
    """

    def __init__(self, config: FlatLoRAConfig | None = None, *, bn_max_batches: int | None = 200,
                 save_state: bool = True, **overrides: Any):
        if config is None:
            config = FlatLoRAConfig(**overrides)
        elif not isinstance(config, FlatLoRAConfig):
            raise ValueError(f"config must be a FlatLoRAConfig, got {type(config).__name__}")
        else:  # a copy: the callback fills in total_steps and must not edit the caller's object
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.bn_max_batches = bn_max_batches
        self.save_state = save_state
        self.flat: FlatLoRA | None = None
        self._trainer: Trainer | None = None
        self._attached = False  # bound by attach(): stays bound across train() calls
        self._undo: list = []

    # ------------------------------------------------------------------ binding to the running Trainer
    def _bind(self, trainer: Trainer) -> None:
        """Run first among the callbacks (so `flatlora/sigma` reaches the reporters) and restore the weights
        if `training_step` raises. Idempotent."""
        if self._trainer is trainer:
            return
        self._unbind()
        self._trainer = trainer
        cbs = trainer.callback_handler.callbacks
        if cbs[0] is not self:
            # Safe even while CallbackHandler.call_event iterates this list: moving the current element from
            # index k to 0 leaves index k+1 holding the same next callback.
            if self in cbs:
                cbs.remove(self)
            cbs.insert(0, self)
        original = trainer.training_step

        def training_step(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except BaseException:
                self.restore()
                raise

        trainer.training_step = training_step
        self._undo.append(lambda: _reset_attr(trainer, "training_step", training_step, original))

    def _unbind(self) -> None:
        while self._undo:
            self._undo.pop()()
        self._trainer = None

    def _find_trainer(self) -> Trainer | None:
        # The Trainer passes no reference to itself: it is `self` a few frames up (call_event <- on_train_begin
        # <- _inner_training_loop), and it is ours if this callback is in its handler.
        frame = sys._getframe(1)
        for _ in range(12):
            if frame is None:
                break
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and self in getattr(obj.callback_handler, "callbacks", ()):
                return obj
            frame = frame.f_back
        return None

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self._find_trainer()
        if trainer is not None:
            self._bind(trainer)
        elif self._trainer is None:
            log.warning("flatlora: running Trainer not found; use flatlora.integrations.hf.attach(trainer) so that "
                        "exceptions restore the weights and flatlora/sigma reaches the reporting integrations.")
        self.restore()  # a window left open by an earlier, interrupted train() (e.g. auto_find_batch_size)
        if self.flat is None or self.flat.model is not model:
            if self.flat is not None:
                self.flat.close()
            self.flat = FlatLoRA(model, dataclasses.replace(self.config))
            log.info("flatlora: %r", self.flat)
        cfg = self.flat.config
        if self.config.total_steps is None:
            self.flat.set_total_steps(state.max_steps)
        elif self.config.total_steps != state.max_steps:
            log.warning("flatlora: total_steps=%d differs from the Trainer's max_steps=%d; the ramp follows total_steps",
                        self.config.total_steps, state.max_steps)
        if state.global_step > 0:
            self._check_resume(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.flat.active:  # only after an event flow we did not foresee; never noise twice
            log.warning("flatlora: a window was still open at step %d; closing it first", state.global_step)
            self.flat.end_step()
        self.flat.begin_step(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.restore()

    # Safety nets: in the Trainer's flow the window is already closed when these fire.
    def on_step_end(self, args, state, control, **kwargs):
        self.restore()

    def on_evaluate(self, args, state, control, **kwargs):
        self.restore()

    def on_predict(self, args, state, control, **kwargs):
        self.restore()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.flat is None or logs is None or "loss" not in logs:
            return
        metrics = self.flat.metrics()
        if "flatlora/sigma" in metrics:
            logs["flatlora/sigma"] = metrics["flatlora/sigma"]
            # Trainer.log appended a copy of `logs` to the history before calling on_log.
            if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
                state.log_history[-1]["flatlora/sigma"] = metrics["flatlora/sigma"]

    def on_save(self, args, state, control, **kwargs):
        self.restore()
        if not (self.save_state and self.flat is not None and state.is_world_process_zero):
            return
        folder = _checkpoint_dir(args, state)
        if os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self.flat.state_dict(), f, indent=2)

    def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
        self.restore()
        flat = self.flat
        if flat is not None and flat.bn_policy == "recalibrate" and flat.bn_stale and train_dataloader is not None:
            used = flat.recalibrate_batchnorm(train_dataloader, max_batches=self.bn_max_batches)
            log.info("flatlora: recalibrated BatchNorm statistics on %d clean batches", used)
        if self._trainer is not None and not self._attached:
            self._unbind()

    # ------------------------------------------------------------------ helpers
    def restore(self) -> None:
        """Remove the noise if a window is open (no-op otherwise). Call it after catching an exception
        from `trainer.train()` if you did not use `attach`."""
        if self.flat is not None and self.flat.active:
            self.flat.end_step()

    def _check_resume(self, args, state) -> None:
        path = os.path.join(_checkpoint_dir(args, state), STATE_FILE)
        if not os.path.isfile(path):
            log.info("flatlora: resuming at step %d without %s; the noise stream continues from the config's seed",
                     state.global_step, STATE_FILE)
            return
        with open(path) as f:
            saved = json.load(f)
        ours = self.flat.config.to_dict()
        diff = {k: (saved["config"].get(k), ours[k]) for k in _STREAM_FIELDS if saved["config"].get(k) != ours[k]}
        if diff:
            log.warning("flatlora: resuming with a different noise setting than the checkpoint (saved, now): %s; the "
                        "run will not continue the same schedule and noise stream", diff)
        last = saved.get("last_step")
        if last is not None and last != state.global_step - 1:
            log.warning("flatlora: checkpoint state ends at step %s but the Trainer resumes at step %d", last, state.global_step)
        self.flat.last_step = last


def attach(trainer: Trainer, config: FlatLoRAConfig | None = None, **overrides: Any) -> FlatLoRACallback:
    """Add Flat-LoRA to an existing `trainer` (or bind the FlatLoRACallback it already has) and return the callback.

    Besides adding the callback first in the list (so `flatlora/sigma` reaches every reporting integration),
    it wraps `trainer.train` in try/finally, so any exception, Ctrl-C included, leaves the weights clean.

    Example:
        trainer = SFTTrainer(model=..., args=..., train_dataset=..., peft_config=LoraConfig(...))
        attach(trainer, sigma=0.05)
        trainer.train()
    """
    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, FlatLoRACallback)), None)
    if cb is None:
        cb = FlatLoRACallback(config, **overrides)
        trainer.callback_handler.callbacks.insert(0, cb)
    elif config is not None or overrides:
        raise ValueError("this trainer already has a FlatLoRACallback; configure that one instead")
    cb._bind(trainer)
    cb._attached = True
    original = trainer.train

    def train(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            cb.restore()

    trainer.train = train
    return cb


def _checkpoint_dir(args, state) -> str:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _reset_attr(obj: Any, name: str, wrapper: Any, original: Any) -> None:
    # Undo an instance-attribute wrapper only if nobody replaced it since; drop it when the original was the
    # class's method, so the instance looks untouched.
    if obj.__dict__.get(name) is wrapper:
        if getattr(type(obj), name, None) is getattr(original, "__func__", None):
            del obj.__dict__[name]
        else:
            setattr(obj, name, original)
