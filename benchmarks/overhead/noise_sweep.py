"""Where does a noise kernel's time go? Variants of one flat elementwise kernel out <- round(W + eps) over
the 7B group's 6.48 G bf16 elements, side by side with torch's copy (a development experiment, one call):

    no-rng       eps = std * (a cheap function of the index): the memory pattern alone
    philox10     Philox4x32-10 integers only (uniforms, no normal transform)
    randn10      tl.randn4x (Philox-10 + Triton's Box-Muller)
    fastbm10/7   Philox-10/-7 + Box-Muller on the MUFU approximations (lg2/sqrt/sin/cos.approx)
and the row-std kernel at several row blocks. Prints ms and the fraction of copy bandwidth.

    python benchmarks/overhead/noise_sweep.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from flatlora.kernels import triton_noise as K  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import cuda_ms  # noqa: E402  (benchmarks/overhead/kernel_bench.py)


@triton.jit
def _u(x):
    return tl.uint_to_uniform_float(x)


@triton.jit
def _bm32(i1, i2, FAST: tl.constexpr):
    """Box-Muller on two 32-bit Philox words as the stream before 16-bit halves had it (triton_noise.py's
    _box_muller until the 8-normals-per-call stream): u1 = max(U(i1), 1e-7), u2 = U(i2)."""
    u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(i1))
    u2 = tl.uint_to_uniform_float(i2)
    if FAST:
        r = K._approx(-1.3862943611198906 * K._approx(u1, 0), 3)  # -2 ln u1 = -2 ln(2) log2(u1)
        th = 6.283185307179586 * u2 - 3.141592653589793  # the approximations are best on [-pi, pi]
        return -r * K._approx(th, 2), -r * K._approx(th, 1)  # cos(x + pi) = -cos x, sin(x + pi) = -sin x
    else:
        r = tl.sqrt(-2.0 * tl.log(u1))
        th = 6.283185307179586 * u2
        return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _flat_kernel(w_ptr, out_ptr, std_ptr, NUMEL, N, KEY, VAR: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    q = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)  # quad index
    o = q[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = o < NUMEL
    bits = tl.load(w_ptr + o, mask=mask, other=0)
    std = tl.load(std_ptr + (q * 4) // N, mask=q * 4 < NUMEL, other=0.0)
    if VAR == 0:
        z = (o & 7).to(tl.float32) - 3.5
    elif VAR == 1:
        i1, i2, i3, i4 = tl.randint4x(KEY, q, ROUNDS)
        z = tl.join(tl.join(_u(i1), _u(i3)), tl.join(_u(i2), _u(i4)))
        z = tl.reshape(z, (BLOCK // 4, 4))
    elif VAR == 2:
        n1, n2, n3, n4 = tl.randn4x(KEY, q, ROUNDS)
        z = tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), (BLOCK // 4, 4))
    else:
        i1, i2, i3, i4 = tl.randint4x(KEY, q, ROUNDS)
        n1, n2 = _bm32(i1, i2, True)
        n3, n4 = _bm32(i3, i4, True)
        z = tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), (BLOCK // 4, 4))
    x = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True) + std[:, None] * z
    b = x.to(tl.int32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int16)
    tl.store(out_ptr + o, r, mask=mask)


def main():
    numel, n = 6_476_005_376 // 4, 4096  # a quarter of the 7B group keeps two buffers small; rates are per byte
    w = torch.empty(numel, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
    out = torch.empty_like(w)
    std = torch.full((numel // n,), 1e-3, device="cuda")
    ms_copy = cuda_ms(lambda: out.copy_(w))
    gb = 2 * numel * 2 / 1e9
    print(f"torch copy: {ms_copy:.3f} ms  {gb / ms_copy * 1e3:.0f} GB/s  ({numel / 1e9:.2f} G bf16)", flush=True)
    wb, ob = w.view(torch.int16), out.view(torch.int16)
    for name, var, rounds in (("no-rng", 0, 10), ("philox10", 1, 10), ("randn10", 2, 10), ("fastbm10", 3, 10),
                              ("fastbm7", 3, 7)):
        for block, warps in ((1024, 4), (2048, 4), (4096, 8)):
            grid = (triton.cdiv(numel, block),)
            try:
                ms = cuda_ms(lambda: _flat_kernel[grid](wb, ob, std, numel, n, 1234, VAR=var, ROUNDS=rounds, BLOCK=block,
                                                        num_warps=warps))
            except Exception as e:  # an experiment: report and go on
                print(f"  {name:<10} block {block} warps {warps}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            print(f"  {name:<10} block {block:5d} warps {warps}: {ms:8.3f} ms  {ms_copy / ms:6.1%} of copy", flush=True)

    shapes = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
    del w, out
    ws = [torch.empty(s, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02) for s in shapes * 8]
    items = [K.StdItem(x, torch.randn(8, x.shape[1], device="cuda") * 0.01, torch.randn(x.shape[0], 8, device="cuda") * 1e-3)
             for x in ws]
    tot = sum(x.numel() for x in ws) * 2
    for bm, bk in ((4, 512), (16, 256), (32, 256), (64, 128), (32, 512)):
        K._STD_BM, K._STD_BK = bm, bk
        ms = cuda_ms(lambda: K.row_std_group(items, 0.05))
        print(f"  row_std BM {bm:3d} BK {bk:4d}: {ms:8.3f} ms  {tot / ms / 1e6:6.0f} GB/s read", flush=True)


if __name__ == "__main__":
    main()
