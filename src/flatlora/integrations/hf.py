"""Flat-LoRA for the Hugging Face `Trainer` (and TRL's `SFTTrainer`, which keeps the Trainer's loop).

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[FlatLoRACallback(sigma=0.05)])
    trainer.train()

or with the settings on the command line, next to the Trainer's own (see examples/hf_trainer_cli.py):

    training_args, flat_args = HfArgumentParser((TrainingArguments, FlatLoRAArguments)).parse_args_into_dataclasses()
    callback = FlatLoRACallback.from_args(training_args, flat_args)      # --flatlora_sigma 0.05 ...

The callback is a thin adapter over `flatlora.FlatLoRA` (SPEC Part B §1.1 has the event order):

    on_train_begin         build the engine on `model` (SFTTrainer builds the PeftModel in __init__, so not
                           earlier) with total_steps = state.max_steps and seed = args.seed unless given;
                           on resume, check the checkpoint's state and continue its noise stream
    on_step_begin          open the window of state.global_step, before the first micro-batch
    on_pre_optimizer_step  close it after the last backward (under DeepSpeed also after the real optimizer
                           step: harmless, the restore replays the stored std, never B, A)
    on_log                 adds `flatlora/sigma` (sigma_t of the last window) to training logs
    on_save                writes `flatlora_state.json` (resume) and `flatlora_config.json` into the checkpoint
    on_train_end           closes any open window, recalibrates BatchNorm statistics if the model has BN

Clean weights, whatever happened in the window (`_guard.CleanWeightsGuard`, hooks on the model, so with or
without `attach()`): an eval-mode forward (evaluate, predict, generation), `generate()`, `state_dict()` (every
save and checkpoint) and a PEFT merge first remove the noise; an exception in `training_step` or in any
callback closes the window before it propagates. The reported training loss is the loss under noise.

The settings travel with the adapter: every `save_pretrained` of the trained model (trainer.save_model,
checkpoints, your own call) writes `flatlora_config.json` next to `adapter_config.json` and a Flat-LoRA
section into the model card (`flatlora.integrations.card.write_adapter_card`).

A callback cannot reorder the callback list or see exceptions by itself (the Trainer has no exception event
and runs user callbacks after the reporting ones, so keys added in `on_log` would never reach
W&B/TensorBoard/MLflow): at `on_train_begin` it looks up the running Trainer on the call stack, moves itself
to the front of the callback list and wraps that Trainer's `training_step` and callback dispatch.
`attach(trainer, ...)` does the same explicitly and also wraps `trainer.train` in try/finally.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from ._deps import require

require("transformers", "hf", "flatlora.integrations.hf")
require("peft", "hf", "flatlora.integrations.hf")

from transformers import Trainer, TrainerCallback  # noqa: E402

from ..config import FlatLoRAConfig  # noqa: E402
from ._engine import DEFAULT_SEED, CallbackEngine, EngineOwner  # noqa: E402
from ._guard import CleanWeightsGuard, install, wrap_before  # noqa: E402
from .card import CONFIG_FILE, read_adapter_card, write_adapter_card  # noqa: E402

__all__ = ["FlatLoRAArguments", "FlatLoRACallback", "attach", "write_adapter_card", "read_adapter_card",
           "CONFIG_FILE", "STATE_FILE"]

log = logging.getLogger("flatlora")

STATE_FILE = "flatlora_state.json"


def _like(name: str, **changes: Any) -> Any:
    """A `flatlora_<name>` field with FlatLoRAConfig's default and help text (so the two cannot drift)."""
    f = FlatLoRAConfig.__dataclass_fields__[name]
    meta = dict(f.metadata)
    meta.update(changes.pop("metadata", {}))
    default = changes.pop("default", f.default)
    return field(default=default, metadata=meta)


@dataclass
class FlatLoRAArguments:
    """Flat-LoRA settings for `HfArgumentParser`, next to `TrainingArguments` (fields prefixed `flatlora_`).

    Example:
        >>> from transformers import HfArgumentParser, TrainingArguments
        >>> parser = HfArgumentParser((TrainingArguments, FlatLoRAArguments))
        >>> targs, fargs = parser.parse_args_into_dataclasses(
        ...     ["--output_dir", "out", "--seed", "7", "--flatlora_sigma", "0.1"])
        >>> FlatLoRACallback.from_args(targs, fargs).config.seed   # the noise seed follows --seed
        7
    """

    flatlora_sigma: float = _like("sigma")
    flatlora_total_steps: Optional[int] = _like(  # noqa: UP045 (HfArgumentParser reads Optional)
        "total_steps", metadata={"help": "optimizer steps of the sigma ramp; default: the Trainer's max_steps"})
    flatlora_schedule: str = _like("schedule")
    flatlora_noise: str = _like("noise")
    flatlora_mode: str = _like("mode")
    flatlora_seed: Optional[int] = _like(  # noqa: UP045
        "seed", default=None,
        metadata={"help": "noise seed (the noise is a pure function of (seed, step, layer)); default: --seed"})
    flatlora_target: str = _like("target")
    flatlora_include: Optional[list[str]] = _like("include")  # noqa: UP045
    flatlora_exclude: Optional[list[str]] = _like("exclude")  # noqa: UP045
    flatlora_per_rank_noise: bool = _like("per_rank_noise")
    flatlora_bn_policy: str = _like("bn_policy")
    flatlora_generator: str = _like("generator")
    flatlora_bn_max_batches: Optional[int] = field(  # noqa: UP045
        default=200, metadata={"help": "train batches used to recalibrate BatchNorm statistics at the end "
                                       "(BatchNorm models only); None = the whole loader"})

    def __post_init__(self):
        self.to_config()  # validate now: a bad value fails at parse time with FlatLoRAConfig's message

    def to_config(self) -> FlatLoRAConfig:
        """The FlatLoRAConfig these arguments describe (an unset `flatlora_seed` becomes the config's default;
        the callback then follows the Trainer's seed)."""
        values = {f.name: getattr(self, "flatlora_" + f.name) for f in dataclasses.fields(FlatLoRAConfig)}
        if values["seed"] is None:
            values["seed"] = DEFAULT_SEED
        return FlatLoRAConfig(**values)


class FlatLoRACallback(EngineOwner, TrainerCallback):
    """Flat-LoRA noise around every optimizer step of a `transformers.Trainer`.

    Args:
        config: a FlatLoRAConfig; keyword arguments override its fields (or build one), e.g. `sigma=0.05`.
            `total_steps` left unset is taken from the Trainer (`state.max_steps`). The noise seed follows
            `TrainingArguments.seed` unless you give one: a `seed=` keyword, or a config whose seed is not
            the default (pass `seed=0` to pin seed 0 under a Trainer with another seed).
        bn_max_batches: batches of the train loader used to recalibrate BatchNorm statistics at train end
            (only for models with BatchNorm, `flat.bn_policy == "recalibrate"`); None = the whole loader.
        save_state: write `flatlora_state.json` into each checkpoint folder and check it on resume.
        save_card: write `flatlora_config.json` and the model-card section wherever the model is saved.

    Attributes:
        flat: the `FlatLoRA` engine (None before `on_train_begin`).
    """

    def __init__(self, config: FlatLoRAConfig | None = None, *, bn_max_batches: int | None = 200,
                 save_state: bool = True, save_card: bool = True, **overrides: Any):
        self._engine = CallbackEngine(config, overrides)
        self.config = self._engine.config
        self.bn_max_batches = bn_max_batches
        self.save_state = save_state
        self.save_card = save_card
        self._trainer: Trainer | None = None
        self._attached = False  # bound by attach(): stays bound across train() calls
        self._undo: list = []  # trainer wrappers
        self._model_undo: list = []  # model wrappers (save_pretrained), kept after training
        self._sigint_undo = None

    @classmethod
    def from_args(cls, training_args: Any, flatlora_args: FlatLoRAArguments, **kwargs: Any) -> "FlatLoRACallback":
        """The callback for parsed `(TrainingArguments, FlatLoRAArguments)`; the noise seed is
        `flatlora_seed`, or `training_args.seed` when that is unset. `kwargs` go to the constructor."""
        if not isinstance(flatlora_args, FlatLoRAArguments):
            raise ValueError(f"flatlora_args must be a FlatLoRAArguments, got {type(flatlora_args).__name__}")
        seed = flatlora_args.flatlora_seed
        if seed is None:
            seed = getattr(training_args, "seed", None)
            if seed is None:
                raise ValueError(f"training_args has no seed (got {type(training_args).__name__}): pass "
                                 "TrainingArguments, or set flatlora_seed")
        kwargs.setdefault("bn_max_batches", flatlora_args.flatlora_bn_max_batches)
        return cls(flatlora_args.to_config(), seed=seed, **kwargs)

    # ------------------------------------------------------------------ binding to the running Trainer
    def _bind(self, trainer: Trainer) -> None:
        """Run first among the callbacks (so `flatlora/sigma` reaches the reporters) and close the window
        if `training_step` or any callback raises. Idempotent."""
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
        self._undo.append(_close_on_raise(trainer, "training_step", self._fault))
        # Another callback raising in on_step_begin (after ours opened the window) never reaches training_step.
        self._undo.append(_close_on_raise(trainer.callback_handler, "call_event", self._fault))

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
                        "flatlora/sigma reaches the reporting integrations and exceptions close the window at once.")
        self.restore()  # a window left open by an earlier, interrupted train() (e.g. auto_find_batch_size)
        self._build(model, args, state)
        self._release_sigint()  # left by a train() that died before on_train_end
        self._sigint_undo = _close_on_sigint(self._guard)
        if state.global_step > 0:
            self.flat.resume(self._checkpoint_state(args, state), state.global_step)

    def _build(self, model, args, state) -> None:
        """A fresh engine for this train() call, with total_steps and seed resolved from the Trainer."""
        self._drop_engine()
        self._engine.build(model, args.seed, total_steps=state.max_steps)
        if self.config.total_steps is not None and self.config.total_steps != state.max_steps:
            log.warning("flatlora: total_steps=%d differs from the Trainer's max_steps=%d; the ramp follows total_steps",
                        self.config.total_steps, state.max_steps)
        if self.save_card:
            guard = self._guard
            if callable(getattr(model, "save_pretrained", None)):
                self._model_undo.append(wrap_before(model, "save_pretrained", lambda: guard.pause("save_pretrained()"),
                                                    after=self._after_save_pretrained))
            trainer = self._trainer
            if trainer is not None:  # Trainer.create_model_card (push_to_hub) rewrites README.md: re-add ours
                self._model_undo.append(wrap_before(trainer, "create_model_card", lambda: None,
                                                    after=lambda *a, **k: self._after_trainer_card(trainer)))
        log.info("flatlora: %r", self.flat)

    def _drop_engine(self) -> None:
        while self._model_undo:
            self._model_undo.pop()()
        self._engine.drop()

    def on_step_begin(self, args, state, control, **kwargs):
        self._guard.open(state.global_step)

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
        if self.flat is None or not state.is_world_process_zero:
            return
        folder = _checkpoint_dir(args, state)
        if not os.path.isdir(folder):
            return
        if self.save_state:
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self.flat.state_dict(), f, indent=2)
        # save_pretrained already wrote it for PEFT models; this covers saves that bypass it (DeepSpeed, FSDP).
        if self.save_card and not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
            write_adapter_card(folder, self.flat.config)

    def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
        self.restore()
        flat = self.flat
        if flat is not None and flat.bn_policy == "recalibrate" and flat.bn_stale and train_dataloader is not None:
            used = flat.recalibrate_batchnorm(train_dataloader, max_batches=self.bn_max_batches)
            log.info("flatlora: recalibrated BatchNorm statistics on %d clean batches", used)
        if self._trainer is not None and not self._attached:
            self._unbind()
        self._release_sigint()

    def _fault(self) -> None:
        """An exception is leaving train(): clean weights, and Ctrl-C handling back to what it was."""
        self.restore()
        self._release_sigint()

    def _release_sigint(self) -> None:
        if self._sigint_undo is not None:
            self._sigint_undo()
            self._sigint_undo = None

    # ------------------------------------------------------------------ helpers
    def restore(self) -> None:
        """End the open window if there is one (noise removed, exact); no-op otherwise."""
        if self._guard is not None:
            self._guard.close()

    def _after_save_pretrained(self, result, *args, **kwargs) -> None:
        if not kwargs.get("is_main_process", True) or self.flat is None:
            return
        save_directory = args[0] if args else kwargs["save_directory"]
        model = self.flat.model
        peft_config = getattr(model, "peft_config", None)
        if isinstance(peft_config, dict) and peft_config:
            # PeftModel.save_pretrained puts the "default" adapter in the folder, others in subfolders.
            names = kwargs.get("selected_adapters") or list(peft_config)
            folders = [save_directory if n == "default" else os.path.join(save_directory, n) for n in names]
        else:
            folders = [save_directory]
        for folder in folders:
            write_adapter_card(folder, self.flat.config)

    def _after_trainer_card(self, trainer: Trainer) -> None:
        if self.flat is not None and trainer.is_world_process_zero():
            write_adapter_card(trainer.args.output_dir, self.flat.config)

    def _checkpoint_state(self, args, state) -> dict | None:
        path = os.path.join(_checkpoint_dir(args, state), STATE_FILE)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)


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
    _close_on_raise(trainer, "train", cb._fault, always=True)
    return cb


def _close_on_raise(obj: Any, name: str, close, always: bool = False):
    """Wrap `obj.name` so that `close()` runs when it raises (or, with `always`, whenever it returns)."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        try:
            result = original(*args, **kwargs)
        except BaseException:
            close()
            raise
        if always:
            close()
        return result

    return install(obj, name, original, wrapper)


def _close_on_sigint(guard: CleanWeightsGuard):
    """While training, Ctrl-C removes the noise before KeyboardInterrupt is raised, wherever it lands (between
    two micro-batches no wrapper sees it). A handler installed before ours that does not raise (a graceful stop
    flag) is honoured: the window is only paused then, and training continues under the same noise.
    Returns the undo, or None where handlers cannot be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    # A handler of an earlier train() that died unobserved is skipped: chain to what it replaced.
    previous = getattr(previous, "_flatlora_previous", previous)
    if previous in (signal.SIG_IGN, None):
        return None

    def handler(signum, frame):
        if previous is signal.default_int_handler or previous == signal.SIG_DFL:
            guard.close()
            undo()  # training is over: the process's Ctrl-C handling is back to what it was
            raise KeyboardInterrupt
        guard.pause("Ctrl-C")
        previous(signum, frame)

    handler._flatlora_previous = previous
    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:
        return None

    def undo() -> None:
        if signal.getsignal(signal.SIGINT) is handler:
            signal.signal(signal.SIGINT, previous)

    return undo


def _checkpoint_dir(args, state) -> str:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
