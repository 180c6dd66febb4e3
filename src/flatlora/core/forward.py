"""Forward mode: W is never written; a targeted layer computes with W + eps and regenerates eps in backward.

While a window is open, the base layer's `forward` is replaced (on the instance, removed at window end)
by a custom autograd op:

    forward:  W_eps = round(W + eps(key, std)),  y = layer(x, W_eps)      nothing m x n is saved
    backward: W_eps regenerated from (key, std), grad_x = grad_y . W_eps   (and grad_W if W trains)

The perturbed weight is the same rounded W + eps that in-place mode writes, so both modes give the same
outputs and gradients. eps is a pure function of (key, row, column), so gradient-checkpoint recompute,
which reruns forward, sees the same noise. Quantized bases are dequantized, perturbed and used the same way.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F

from .targets import Target

NoisyWeight = Callable[[], torch.Tensor]  # the window's round(W + eps) of one layer, in W's storage shape


def _apply_layer(t: Target, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if t.kind == "conv":
        return t.base._conv_forward(x, w, bias)
    return F.linear(x, w.t() if t.transposed else w, bias)


class _NoisyLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, t: Target, noisy: NoisyWeight):
        w = noisy()
        # Flat full fine-tuning: d(W + eps)/dW is the identity, so grad_W is the usual one taken at W + eps.
        ctx.t, ctx.noisy, ctx.x_dtype, ctx.w_dtype = t, noisy, x.dtype, weight.dtype
        needs_x = t.kind == "conv" or weight.requires_grad
        ctx.save_for_backward(x if needs_x else None, bias)
        return _apply_layer(t, x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, bias = ctx.saved_tensors
        t = ctx.t
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.no_grad():
            w = ctx.noisy()
        if t.kind == "conv":
            # Recompute the conv under autograd: conv layers are small, and this reuses the layer's own
            # padding mode and geometry instead of restating them.
            with torch.enable_grad():
                xi = x.detach().requires_grad_(need_x)
                wi = w.detach().requires_grad_(need_w)
                bi = bias.detach().requires_grad_(need_b) if bias is not None else None
                y = _apply_layer(t, xi, wi, bi)
                inputs = [v for v, need in ((xi, need_x), (wi, need_w), (bi, need_b)) if need]
                grads = iter(torch.autograd.grad(y, inputs, grad_out)) if inputs else iter(())
            gx = next(grads) if need_x else None
            gw = next(grads) if need_w else None
            gb = next(grads) if need_b else None
            return gx, gw, gb, None, None
        w_oi = w.t() if t.transposed else w  # (out, in)
        gx = (grad_out @ w_oi.to(grad_out.dtype)).to(ctx.x_dtype) if need_x else None
        gw = gb = None
        if need_w:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            gw = (g2.t().to(x.dtype) @ x.reshape(-1, x.shape[-1])).to(ctx.w_dtype)
            gw = gw.t() if t.transposed else gw
        if need_b:
            gb = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return gx, gw, gb, None, None


def arm(t: Target, noisy: NoisyWeight) -> None:
    """Make `t.base` compute with `noisy()` (the window's W + eps) instead of W until `disarm`."""
    base = t.base
    if "forward" in base.__dict__:
        raise RuntimeError(
            f"layer {t.name!r} already has an instance-level forward (e.g. accelerate offload hooks or "
            f"another patch); forward-mode noise would bypass it. Use FlatLoRAConfig(mode='inplace')."
        )

    def forward(self, x, *args, **kwargs):
        bias = getattr(self, "bias", None)
        return _NoisyLayer.apply(x, t.weight, bias, t, noisy)

    base.forward = types.MethodType(forward, base)


def disarm(t: Target) -> None:
    t.base.__dict__.pop("forward", None)
