"""Keep BatchNorm running statistics clean of the weight noise.

In train mode BatchNorm normalises with batch statistics and folds them into its running estimates.
Under Flat-LoRA those batches come from perturbed weights, and with the cosine ramp the noise is
largest in the last steps, exactly when the running estimates settle: measured on EfficientNet-Lite0 /
Fashion-MNIST at sigma = 0.15 this costs 3.2 points of test accuracy (14.5 on another digit task).
Recomputing the statistics with clean weights after training turns both into small gains.

So while noise is on we stop the running-stat updates (normalisation still uses batch statistics, as
in plain training), and `recalibrate` recomputes them afterwards with clean weights: a cumulative
average over the given batches, every other module in eval mode so dropout does not disturb them.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


_NONE = object()


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


class FrozenStats:
    """Context-free switch: `freeze()` stops running-stat updates of the given BN layers, `thaw()` undoes it."""

    def __init__(self, layers: list[_BatchNorm]):
        self.layers = layers
        self._frozen: list[_BatchNorm] = []

    def freeze(self) -> None:
        for bn in self.layers:
            if bn.track_running_stats:
                # With track_running_stats False a training-mode BN uses batch statistics and passes no
                # running buffers to F.batch_norm, so nothing is updated; eval mode still reads them.
                bn.track_running_stats = False
                self._frozen.append(bn)

    def thaw(self) -> None:
        for bn in self._frozen:
            bn.track_running_stats = True
        self._frozen.clear()


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
) -> int:
    """Recompute the running statistics of every BatchNorm layer from clean forward passes.

    Args:
        batches: inputs the model can take; a dict is passed as keyword arguments, a tuple/list as its
            first element (the usual `(x, y)` pair), anything else as is — or give `forward_fn`.
        forward_fn: `forward_fn(model, batch)` to run one batch.
        max_batches: stop after this many batches.

    Returns:
        The number of batches used.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    it = iter(batches)
    first = next(it, _NONE)
    if first is _NONE:  # checked before the statistics are reset, so bad input loses nothing
        raise ValueError("recalibrate_batchnorm got no batches: pass an iterable of model inputs (e.g. the train loader)")
    forward_fn = forward_fn or _default_forward
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in layers}
    used = 0
    try:
        model.eval()
        for bn in layers:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: every batch weighs the same
            bn.train()
        for batch in itertools.chain([first], it):
            if max_batches is not None and used >= max_batches:
                break
            forward_fn(model, batch)
            used += 1
    finally:
        for m, training in modes.items():
            m.training = training
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    return used
