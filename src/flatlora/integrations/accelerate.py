"""Flat-LoRA in an accelerate loop: one context manager in place of `accelerator.accumulate(model)`.

    flat = FlatLoRA(accelerator.unwrap_model(model), sigma=0.05, total_steps=num_update_steps)
    for batch in loader:
        with accumulate(accelerator, flat, model):      # was: with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

It follows accelerate's own accumulation boundary. Entering the first micro-batch of a window opens the
window of the next update step (`flat.begin_step()`: 0, 1, ... or where `flat.resume(...)` left off);
`accelerator.backward` on the micro-batch where `accelerator.sync_gradients` is True (the last of the window,
or the end of the dataloader) closes it, so `optimizer.step()` runs on clean weights. An exception closes the
window; if you catch it and go on, the next micro-batch re-opens the same step with the same noise (A and B
have not changed in between). Under DeepSpeed, `accelerator.backward` runs the optimizer step itself, so the
window closes just after it: harmless for LoRA, whose frozen weights the optimizer never touches.
Call `accelerator.backward(loss)`, not `loss.backward()`: with the latter the window only closes when the
`with` block ends, after your `optimizer.step()`.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

from ._deps import require
from ._guard import wrap_before

require("accelerate", "hf", "flatlora.integrations.accelerate")

# Engines whose window an exception interrupted: the step to re-open at the next micro-batch.
_interrupted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def accumulate(accelerator: Any, flat: Any, *models: Any) -> Iterator[float]:
    """`accelerator.accumulate(*models)` with the Flat-LoRA window of `flat` around each update step.

    Args:
        accelerator: the `accelerate.Accelerator` (its `gradient_accumulation_steps` sets the window).
        flat: the `FlatLoRA` engine, built on the unwrapped model with `total_steps` = update steps.
        models: what you would pass to `accelerator.accumulate`.

    Yields:
        sigma_t of the open window.
    """
    with accelerator.accumulate(*models):
        if not flat.active:
            step = _interrupted.pop(flat, None)
            flat.begin_step(step)  # None: the step after the last one (or after flat.resume's)
        sigma = flat.sigma_at(flat.last_step)  # the open window's step
        # Every accelerator.backward of the window's last micro-batch closes the window right after it.
        undo = wrap_before(accelerator, "backward", lambda: None,
                           after=lambda *a, **k: accelerator.sync_gradients and flat.close_window())
        try:
            yield sigma
        except BaseException:
            if flat.active:
                _interrupted[flat] = flat.last_step
                flat.close_window()
            raise
        finally:
            undo()
        if accelerator.sync_gradients:  # backward not called through accelerator (or not at all)
            flat.close_window()
