"""Forward mode's noise as torch custom ops (`torch.ops.flatlora.*`), so that `torch.compile` traces it.

    noisy_weight(weight, std, key, m, row0, transposed, generator, backend) -> round(W + eps)
    noisy_linear(x, weight, bias, std, key, m, row0, transposed, generator, backend, dtype) -> x (W + eps)^T + b

Only tensors, ints, bools and strings cross the op boundary: `weight` in its storage layout (`transposed`:
stored (n, rows) as HF Conv1D / fan_in_fan_out do), `std` the float32 per-row std of the rows it holds,
`row0` its first global row and `m` the layer's global rows, `generator` the stream ("torch" | "philox") and
`backend` where the noise is computed ("torch" | "triton"; chosen per target by `backends.choose`, so the
op never decides it). `dtype` is autocast's compute dtype, read by the caller: a compiled graph runs without
the autocast context, so the op applies autocast's cast itself (None: no autocast).

The 64-bit key travels as a 0-d int64 CPU tensor (`key_tensor`), not as an int: an int read from Python
state is a constant to dynamo, so a new key every window would recompile every graph every step, while a
tensor is a graph input like the weight. Keys >= 2^63 are stored in two's complement and read back unsigned
(`key_int`). (Untried with CUDA graphs, torch.compile's mode="reduce-overhead": they may skip a graph
with a CPU input.)

`noisy_linear` saves no m x n tensor: its backward regenerates W + eps from (weight, std, key) through
`noisy_weight`, as the eager autograd op did. `noisy_weight` is differentiable as the identity in `weight`
(Flat full fine-tuning: d(W + eps)/dW = I), which the convolution path (recomputed under checkpoint) uses.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from . import noise_draw
from .view import PLAIN

MASK64 = (1 << 64) - 1


def _int64(key: int) -> int:
    """A key 0 <= key < 2^64 as the int64 with its bits (keys >= 2^63 in two's complement)."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= MASK64:
        raise ValueError(f"a noise key must be an integer in [0, 2^64), got {key!r}")
    return key - (1 << 64) if key >> 63 else key


def key_tensor(key: int) -> torch.Tensor:
    """A key 0 <= key < 2^64 as a 0-d int64 CPU tensor (keys >= 2^63 in two's complement)."""
    return torch.tensor(_int64(key), dtype=torch.int64)


def key_int(key: torch.Tensor) -> int:
    """The unsigned 64-bit key held by a `key_tensor`."""
    return int(key) & MASK64


def _matrix(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Storage layout -> the logical (rows, n) view (as `view.matrix`, with n taken from the shape)."""
    if transposed:
        return w.t()
    return w if w.dim() == 2 else w.reshape(w.shape[0], -1)  # a linear weight is its own (rows, n) view


_kernels = None  # flatlora.kernels.triton_noise, imported at the first Triton call (Triton is optional)


def compute_noisy_weight(weight: torch.Tensor, std: torch.Tensor, key: int, m: int, row0: int, transposed: bool,
                         generator: str, backend: str) -> torch.Tensor:
    """round(W + eps) as a new contiguous tensor in W's storage shape and dtype (the ops' implementation).

    Forward mode calls this for every layer in forward and again in backward, so its host time counts: it
    enters no_grad only where grad mode is on (the eager op's forward and backward already run without it)."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return _noisy_copy(weight, std, key, m, row0, transposed, generator, backend)
    return _noisy_copy(weight, std, key, m, row0, transposed, generator, backend)


def _noisy_copy(weight, std, key, m, row0, transposed, generator, backend):
    global _kernels
    mat = _matrix(weight, transposed)
    rows, n = mat.shape
    if type(weight) in PLAIN:  # the same tensor as torch.empty(shape, dtype, device), for half the host time
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    else:  # a tensor subclass keeps the plain dense output it always got
        out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    out_mat = _matrix(out, transposed)
    if backend == "triton":
        if _kernels is None:
            from ..kernels import triton_noise

            _kernels = triton_noise
        _kernels.noisy_copy_(mat, std, key, row0, out_mat)  # a Draw's std: float32, contiguous (noisy_copy_ checks)
    elif backend == "torch":
        # The stream function Draw uses (eps of in-place mode), looked up there so one definition serves both.
        part = None if row0 == 0 and rows == m else slice(row0, row0 + rows)
        eps = noise_draw.standard_normal(key, m, n, weight.device, part, generator, scale=std)
        # float32 sum, rounded once into W's dtype: the value in-place mode writes, bit for bit.
        out_mat.copy_(eps.add_(mat if mat.dtype in (torch.float16, torch.bfloat16) else mat.float()))
    else:
        raise ValueError(f"unknown noise backend {backend!r}")
    return out


# ---------------------------------------------------------------------------------------------- noisy_weight

@torch.library.custom_op("flatlora::noisy_weight", mutates_args=())
def noisy_weight(weight: torch.Tensor, std: torch.Tensor, key: torch.Tensor, m: int, row0: int, transposed: bool,
                 generator: str, backend: str) -> torch.Tensor:
    return compute_noisy_weight(weight, std, key_int(key), m, row0, transposed, generator, backend)


@noisy_weight.register_fake
def _noisy_weight_fake(weight, std, key, m, row0, transposed, generator, backend):
    return weight.new_empty(weight.shape)


def _noisy_weight_setup(ctx, inputs, output):
    pass


def _noisy_weight_backward(ctx, grad):
    return grad, None, None, None, None, None, None, None


noisy_weight.register_autograd(_noisy_weight_backward, setup_context=_noisy_weight_setup)


# ---------------------------------------------------------------------------------------------- noisy_linear

def _linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool,
            dtype: Optional[torch.dtype]) -> torch.Tensor:
    if dtype is not None:  # autocast's cast of a linear layer: every input, W + eps rounded in W's dtype first
        x, w, bias = x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype)
    return F.linear(x, w.t() if transposed else w, bias)


@torch.library.custom_op("flatlora::noisy_linear", mutates_args=())
def noisy_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], std: torch.Tensor,
                 key: torch.Tensor, m: int, row0: int, transposed: bool, generator: str, backend: str,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    w = compute_noisy_weight(weight, std, key_int(key), m, row0, transposed, generator, backend)
    return _linear(x, w, bias, transposed, dtype)


@noisy_linear.register_fake
def _noisy_linear_fake(x, weight, bias, std, key, m, row0, transposed, generator, backend, dtype=None):
    return _linear(x, weight, bias, transposed, dtype)


def linear_grads(grad_out: torch.Tensor, w: Optional[torch.Tensor], x: Optional[torch.Tensor], transposed: bool,
                 x_dtype: torch.dtype, w_dtype: torch.dtype, need_w: bool, need_b: bool):
    """(grad_x, grad_W, grad_b) of y = x (W + eps)^T + b, W + eps given as `w` in storage layout (None: no
    grad_x). d(W + eps)/dW is the identity, so grad_W is the usual one taken at W + eps."""
    gx = gw = gb = None
    if w is not None:
        w_oi = w.t() if transposed else w  # (out, in)
        # dtype checks before .to(): a no-op conversion still costs a dispatch, and this runs for every layer a step
        gx = grad_out @ (w_oi if w_oi.dtype == grad_out.dtype else w_oi.to(grad_out.dtype))
        gx = gx if gx.dtype == x_dtype else gx.to(x_dtype)
    if need_w:
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gw = (g2.t().to(x.dtype) @ x.reshape(-1, x.shape[-1])).to(w_dtype)
        gw = gw.t() if transposed else gw
    if need_b:
        gb = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return gx, gw, gb


def _noisy_linear_setup(ctx, inputs, output):
    x, weight, bias, std, key, m, row0, transposed, generator, backend, dtype = inputs
    need_w = ctx.needs_input_grad[1]
    ctx.noise = (m, row0, transposed, generator, backend)
    ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
    # x only when grad_W is wanted (Flat full fine-tuning); the weight is the parameter itself, not a copy.
    ctx.save_for_backward(x if need_w else None, weight, std, key)


def _noisy_linear_backward(ctx, grad_out):
    x, weight, std, key = ctx.saved_tensors
    m, row0, transposed, generator, backend = ctx.noise
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    w = torch.ops.flatlora.noisy_weight(weight, std, key, m, row0, transposed, generator, backend) if need_x else None
    gx, gw, gb = linear_grads(grad_out, w, x, transposed, ctx.x_dtype, ctx.w_dtype, need_w, need_b)
    return gx, gw, gb, None, None, None, None, None, None, None, None


noisy_linear.register_autograd(_noisy_linear_backward, setup_context=_noisy_linear_setup)


# ------------------------------------------------------------------------- the Triton backend, traced
#
# On the Triton backend a compiled forward-mode layer runs `flatlora::noisy_linear_triton` instead: a
# torch.library.triton_op, whose body torch.compile traces (the noisy copy becomes a kernel launch in the
# compiled graph, the casts and the matmul ordinary graph ops), where `noisy_linear` is opaque and runs its
# Python body through the dispatcher at every call (on the H200's host ~75 us a layer in forward and ~70 us
# for its backward's noisy_weight: most of a compiled MiniLM step's forward-mode overhead,
# benchmarks/overhead/op_host.py). The key is a 0-d int64 tensor on the weight's device (`device_keys`), which
# the kernel reads itself: the body reads no value on the host. Registered at first use (Triton is optional).

_TRITON_OPS = False


def device_keys(keys: list[int], device: torch.device) -> list[torch.Tensor]:
    """The keys as 0-d int64 tensors on `device` (views of one tensor: one copy for a window's layers)."""
    return list(torch.tensor([_int64(k) for k in keys], dtype=torch.int64).to(device, non_blocking=True).unbind())


def register_triton_ops() -> bool:
    """Define `flatlora::noisy_weight_triton` and `flatlora::noisy_linear_triton` (once); False where a compiled
    graph cannot trace them: under Triton's interpreter wrap_triton hands back the bare interpreted kernel,
    which fake tensors cannot run (the layers keep `noisy_linear` there; eager calls of these ops still work),
    and before torch 2.6, which has no triton_op."""
    global _TRITON_OPS
    from ..kernels import triton_noise

    if _TRITON_OPS:
        return triton_noise.compiled()
    try:
        from torch.library import triton_op, wrap_triton
    except ImportError:  # torch < 2.6: the layers keep noisy_linear
        return False

    def noisy(weight, std, key, row0, transposed, after=None):
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
        triton_noise.noisy_copy_traced(weight, std, key, row0, out, transposed, after, launch=wrap_triton)
        return out

    @triton_op("flatlora::noisy_weight_triton", mutates_args=())
    def noisy_weight_triton(weight: torch.Tensor, std: torch.Tensor, key: torch.Tensor, row0: int,
                            transposed: bool, after: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`after`: a tensor the copy waits for, never read (the backward passes its gradient: see the kernel)."""
        return noisy(weight, std, key, row0, transposed, after)

    @triton_op("flatlora::noisy_linear_triton", mutates_args=())
    def noisy_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], std: torch.Tensor,
                            key: torch.Tensor, row0: int, transposed: bool,
                            dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return _linear(x, noisy(weight, std, key, row0, transposed), bias, transposed, dtype)

    def setup(ctx, inputs, output):
        x, weight, bias, std, key, row0, transposed, dtype = inputs
        ctx.noise = (row0, transposed)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, std, key)

    def backward(ctx, grad_out):
        x, weight, std, key = ctx.saved_tensors
        row0, transposed = ctx.noise
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # W + eps again from (weight, std, key), after grad_out: the forward's copy is not kept
        w = torch.ops.flatlora.noisy_weight_triton(weight, std, key, row0, transposed, grad_out) if need_x else None
        gx, gw, gb = linear_grads(grad_out, w, x, transposed, ctx.x_dtype, ctx.w_dtype, need_w, need_b)
        return gx, gw, gb, None, None, None, None, None

    noisy_weight_triton.register_autograd(_noisy_weight_backward_triton, setup_context=_noisy_weight_setup)
    noisy_linear_triton.register_autograd(backward, setup_context=setup)
    _TRITON_OPS = True
    return triton_noise.compiled()


def _noisy_weight_backward_triton(ctx, grad):
    return grad, None, None, None, None, None
