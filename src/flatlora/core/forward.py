"""Forward mode: W is never written; a targeted layer computes with W + eps and regenerates eps in backward.

While a window is open, the base layer's `forward` is replaced (on the instance, removed at window end):

    forward:  W_eps = round(W + eps(key, std)),  y = layer(x, W_eps)      nothing m x n is saved
    backward: W_eps regenerated from (key, std), grad_x = grad_y . W_eps   (and grad_W if W trains)

The perturbed weight is the same rounded W + eps that in-place mode writes, so both modes give the same
outputs and gradients. eps is a pure function of (key, row, column), so gradient-checkpoint recompute,
which reruns forward, sees the same noise.

torch.compile. Under compile, a linear layer is one custom op, `flatlora::noisy_linear` (see `ops`), fed by tensors only:
the weight, the window's std and key. Each target keeps one `Armed` object for the engine's life and the
patched forward is one module-level function, so a compiled graph guards on the same objects every window
and reads the new std and key as inputs: no recompile per step. Eager calls skip the op's dispatch (host
time) and run the same computation through the autograd op below. A convolution runs its own `_conv_forward`
on `flatlora::noisy_weight` under non-reentrant checkpoint (recomputed in backward, nothing m x n saved).
Two kinds of layer keep the eager autograd op below, which dynamo does not trace (a graph break per such
layer): quantized bases, dequantized again in backward instead of keeping a dense copy alive, and weights
gathered only inside forward (FSDP1, ZeRO-3, FSDP2), whose noise is drawn at their first forward.

Quantized bases (QLoRA: bitsandbytes Linear4bit NF4/FP4, Linear8bitLt). The packed weight is never written.
Forward dequantizes it through PEFT (`Target.dequantize`), adds eps with the row std of the dequantized
W + sBA (drawn at the layer's first forward of the window), and multiplies in the dtype the layer's own
forward would use (4-bit: its compute dtype; 8-bit: the input's); backward dequantizes and regenerates eps
again. W is PEFT's dequantized weight, in the dtype the layer was quantized from. Two differences from the
layer's own forward, both far below the noise: bitsandbytes' 4-bit kernels dequantize straight into the compute
dtype (with a float32 compute dtype over bf16-stored weights, one bf16 rounding of W apart; none under bf16
autocast), and its 8-bit forward is LLM.int8()'s int8 matmul, which quantizes the activations too, where a
window multiplies in floating point.
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops
from .noise_draw import Draw
from .targets import Target

NoisyWeight = Callable[[], torch.Tensor]  # the window's round(W + eps) of one layer, in W's storage shape

_ATTR = "_flatlora_armed"


def _apply_layer(t: Target, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if t.kind == "conv":
        return t.base._conv_forward(x, w, bias)
    return F.linear(x, w.t() if t.transposed else w, bias)


class Armed:
    """One target's forward-mode state, kept for the engine's life: the current window's noise as tensors
    (`std`, `key`; the op path) or as a callback (`noisy`; the eager path), None outside windows."""

    def __init__(self, t: Target, backend: str):
        self.t = t
        self.backend = backend
        self.generator = "torch"
        self.std: torch.Tensor | None = None
        self.key: torch.Tensor | None = None
        self.key_dev: torch.Tensor | None = None  # the key on the weight's device (Triton backend, compiled)
        self.key_int = 0
        self.row0 = 0
        self.noisy: NoisyWeight | None = None

    def set_draw(self, draw: Draw) -> None:
        """Compute with `draw` through the custom ops (the weight is whole and dense)."""
        self.std, self.key, self.row0, self.noisy = draw.std, ops.key_tensor(draw.key), draw.row0, None
        self.key_int, self.generator = draw.key, draw.generator

    def set_callback(self, noisy: NoisyWeight) -> None:
        """Compute with `noisy()` through the eager op (quantized, or gathered only inside forward)."""
        self.std, self.key, self.key_dev, self.row0, self.noisy = None, None, None, 0, noisy

    def clear(self) -> None:
        self.std = self.key = self.key_dev = self.noisy = None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        t = self.t
        if self.std is None:
            return _eager(t, x, bias, self.noisy)
        if t.kind == "conv":
            # preserve_rng_state off: our noise is keyed, and the layer draws nothing from torch's RNG.
            return checkpoint(self._conv, x, t.weight, bias, use_reentrant=False, preserve_rng_state=False)
        if not torch.compiler.is_compiling():
            # Eager: the same computation as the custom op without its dispatch, which costs ~0.7 ms of host
            # time a call (forward and backward), enough to make a 7B step host-bound. The window's values are
            # bound now, so backward regenerates exactly this noise.
            w = t.weight  # one module attribute lookup, not two
            noisy = functools.partial(ops.compute_noisy_weight, w, self.std, self.key_int, t.m, self.row0,
                                      t.transposed, self.generator, self.backend)
            return _NoisyLayer.apply(x, w, bias, t, noisy)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        if self.key_dev is not None:  # the Triton backend: an op the compiled graph traces into (see ops)
            return torch.ops.flatlora.noisy_linear_triton(x, t.weight, bias, self.std, self.key_dev, self.row0,
                                                          t.transposed, dtype)
        return torch.ops.flatlora.noisy_linear(x, t.weight, bias, self.std, self.key, t.m, self.row0, t.transposed,
                                               self.generator, self.backend, dtype)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = torch.ops.flatlora.noisy_weight(weight, self.std, self.key, self.t.m, self.row0, False, self.generator,
                                            self.backend)
        return self.t.base._conv_forward(x, w, bias)


class _NoisyLayer(torch.autograd.Function):
    """The eager op: W + eps comes from a callback, called again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, t: Target, noisy: NoisyWeight):
        w = noisy()
        if t.quantized:  # the dequantized dtype (bitsandbytes: the original weight's) -> the compute dtype
            w = w.to(x.dtype)
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
        # A linear layer needs W + eps only for grad_x (none for a first layer under frozen embeddings).
        with torch.no_grad():
            w = ctx.noisy() if need_x or t.kind == "conv" else None
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
        gx, gw, gb = ops.linear_grads(grad_out, w, x, t.transposed, ctx.x_dtype, ctx.w_dtype,
                                      need_w, need_b)
        return gx, gw, gb, None, None


@torch.compiler.disable
def _eager(t: Target, x: torch.Tensor, bias: torch.Tensor | None, noisy: NoisyWeight) -> torch.Tensor:
    if t.quantized:
        return _quantized(t, x, bias, noisy)
    return _NoisyLayer.apply(x, t.weight, bias, t, noisy)


def _quantized(t: Target, x: torch.Tensor, bias: torch.Tensor | None, noisy: NoisyWeight) -> torch.Tensor:
    """A quantized base's forward with W + eps for W, in the dtypes of the layer's own forward: bitsandbytes'
    Linear4bit computes in `compute_dtype` (fixed from the first input it sees), Linear8bitLt in the input's
    dtype; both return the input's dtype."""
    base = t.base
    if hasattr(base, "set_compute_type") and not getattr(base, "compute_type_is_set", True):
        # What the layer's own first forward does (a float32/bfloat16 input sets the compute dtype), so a window
        # that comes first computes in the dtype every later plain forward will use.
        base.set_compute_type(x)
        base.compute_type_is_set = True
    dtype = getattr(base, "compute_dtype", None) or x.dtype
    y = _NoisyLayer.apply(x.to(dtype), t.weight, None if bias is None else bias.to(dtype), t, noisy)
    return y.to(x.dtype)


def _forward(self, x, *args, **kwargs):
    # One function for every layer and window (compiled graphs guard on it); the state is the layer's Armed.
    return getattr(self, _ATTR)(x, getattr(self, "bias", None))


def arm(t: Target, armed: Armed) -> None:
    """Make `t.base` compute with the window's W + eps (held by `armed`) instead of W until `disarm`."""
    base = t.base
    if "forward" in base.__dict__:
        raise RuntimeError(
            f"layer {t.name!r} already has an instance-level forward (e.g. accelerate offload hooks or "
            f"another patch); forward-mode noise would bypass it. Use FlatLoRAConfig(mode='inplace')."
        )
    base.__dict__[_ATTR] = armed
    base.forward = types.MethodType(_forward, base)


def disarm(t: Target) -> None:
    t.base.__dict__.pop("forward", None)
    armed = t.base.__dict__.pop(_ATTR, None)
    if armed is not None:
        armed.clear()
