"""SAM baselines for Flat-LoRA comparisons (paper v2 Table 6): SAM on the LoRA factors and SAM on W.

SAM (Foret et al. 2021) takes the gradient at the worst-case neighbour of the current point:

    eps = rho * g / ||g||,   g = grad of L at the current point,   update with grad of L at (point + eps).

- `LoRASAM` ("LoRA-SAM"): the point is the adapter parameters (A, B); eps lives in their space only.
- `MergedWeightSAM` ("SAM on W"): the point is the merged weight W' = W + sBA of every LoRA layer.
  dL/dW' = dL/dW for a LoRA layer, so g comes from one backward with the frozen base weights briefly
  requiring grad; eps is added to W and the second backward gives A, B their gradients at W' + eps.

Both cost a second forward/backward per step, which is what Flat-LoRA avoids. The perturbed tensors
are restored from a copy (not by subtracting eps), so they end each step bit-identical.

Example (any trainable tensors; with PEFT, the adapter's A and B):
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model, x = nn.Linear(4, 1), torch.randn(8, 4)
    >>> params = [p for p in model.parameters() if p.requires_grad]
    >>> sam, optimizer = LoRASAM(params, rho=0.05), torch.optim.SGD(params, lr=0.1)
    >>> before = model.weight.detach().clone()
    >>> sam.step(lambda: model(x).pow(2).mean().backward(), zero=params)  # .grad: the gradient at the neighbour
    >>> torch.equal(model.weight, before)  # the point itself is restored bit for bit
    True
    >>> optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


class _SAM:
    def __init__(self, rho: float):
        if not rho > 0:
            raise ValueError(f"SAM needs rho > 0 (e.g. 0.05), got {rho}")
        self.rho = float(rho)

    def _point(self) -> list[torch.Tensor]:
        """The tensors eps is added to (and whose gradients define it)."""
        raise NotImplementedError

    def _grads(self) -> list[torch.Tensor | None]:
        return [t.grad for t in self._point()]

    def step(self, closure: Callable[[], None], zero: Iterable[nn.Parameter]) -> None:
        """Run `closure` (forward + backward, accumulating .grad) at the point, then at the SAM neighbour.

        Leaves in `.grad` of the trainable parameters the gradient at the neighbour; the point itself is
        restored bit for bit. `zero` = the trainable parameters (their first-pass grads are discarded).
        """
        zero = list(zero)
        self._before_first()
        try:
            closure()
            point = self._point()
            grads = self._grads()
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) or torch.tensor(0.0))
            scale = self.rho / (float(norm) + 1e-12)
            saved = [t.detach().clone() for t in point]
            eps = [None if g is None else g * scale for g in grads]
        finally:
            self._after_first()
        for p in zero:
            p.grad = None
        try:
            with torch.no_grad():
                for t, e in zip(point, eps):
                    if e is not None:
                        t.add_(e.to(t.dtype))
            closure()
        finally:
            with torch.no_grad():
                for t, s in zip(point, saved):
                    t.copy_(s)

    def _before_first(self) -> None:
        pass

    def _after_first(self) -> None:
        pass


class LoRASAM(_SAM):
    """SAM restricted to the adapter parameters (paper v2 Table 6 "LoRA-SAM", best rho 0.003)."""

    def __init__(self, params: Iterable[nn.Parameter], rho: float = 0.003):
        super().__init__(rho)
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("LoRASAM got no trainable parameters")

    def _point(self) -> list[torch.Tensor]:
        return self.params


class MergedWeightSAM(_SAM):
    """SAM on the merged weights W + sBA of every LoRA layer (paper v2 Table 6 "SAM on W", best rho 0.05)."""

    def __init__(self, model: nn.Module, rho: float = 0.05):
        super().__init__(rho)
        from peft.tuners.lora import LoraLayer

        self.weights = [m.get_base_layer().weight for m in model.modules() if isinstance(m, LoraLayer)]
        if not self.weights:
            raise ValueError("MergedWeightSAM found no PEFT LoRA layer in the model")

    def _point(self) -> list[torch.Tensor]:
        return self.weights

    def _before_first(self) -> None:
        for w in self.weights:  # dL/dW' = dL/dW: one backward with W requiring grad gives it
            w.requires_grad_(True)

    def _after_first(self) -> None:
        for w in self.weights:
            w.requires_grad_(False)
            w.grad = None
