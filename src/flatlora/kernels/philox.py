"""Counter-based normals in pure torch: the exact integer stream of Triton's `tl.randn4x`, on any device.

Element o = i * n + j (global row i, column j) of a layer's noise with key k is

    z(k, o) = randn4x(seed=k, offset=o >> 2)[o & 3]

i.e. one Philox4x32-10 call (counter (c, c >> 32, 0, 0), key (k mod 2^32, k >> 32)) gives four uint32, each
pair (u1, u2) of them becomes two normals by Box-Muller, r = sqrt(-2 log max(u1, 1e-7)),
(r cos 2pi u2, r sin 2pi u2). The value depends only on (k, o): a shard draws its own rows without the
rest of the matrix, and the Triton kernels in `triton_noise.py` reproduce the same integers bit for bit
(the float transforms may differ from the GPU's libdevice in the last ulp).

uint32 arithmetic is emulated in int64: a 32 x 32-bit product is split into 16-bit halves so that no
intermediate exceeds 2^49.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
# Triton's uint_to_uniform_float scale for 32-bit ints ((2^23 - 1) / 2^23 * 2^-31, rounded to float32).
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of the constant `a` and uint32 values `x` (int64)."""
    xl, xh = x & 0xFFFF, x >> 16
    p1, p2 = xl * a, xh * a  # each < 2^48
    hi = (p2 + (p1 >> 16)) >> 16
    lo = (((p2 & 0xFFFF) << 16) + p1) & _M32
    return hi, lo


def philox4x32(key: int, counter: torch.Tensor, n_rounds: int = N_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Four uint32 words (as int64 tensors) of Philox4x32 at `counter` (int64 >= 0) with a 64-bit key,
    as Triton's `randint4x(seed=key, offset=counter)` computes them."""
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = key & _M32, (key >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & _M32, (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float for 32-bit words: bitcast to int32, fold negatives (~x), scale."""
    x = torch.where(x >= 2**31, x - 2**32, x)  # as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp_min(u1, 1.0e-7)
    th = torch.tensor(_TWO_PI, dtype=torch.float32, device=u1.device) * u2
    r = torch.sqrt(torch.log(u1) * -2.0)
    return r * torch.cos(th), r * torch.sin(th)


def randn4x(key: int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four float32 normals Triton's `randn4x(key, counter)` returns."""
    u = [uint_to_uniform(w) for w in philox4x32(key, counter)]
    n1, n2 = _box_muller(u[0], u[1])
    n3, n4 = _box_muller(u[2], u[3])
    return n1, n2, n3, n4


def normal_at(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """z(key, o) for int64 offsets `o` (any shape), float32."""
    offsets = offsets.to(torch.int64)
    flat = offsets.reshape(-1)
    counters, lane = flat >> 2, flat & 3
    # Generate each distinct counter once (consecutive offsets share a Philox call).
    uniq, inv = torch.unique(counters, return_inverse=True)
    four = torch.stack(randn4x(key, uniq), 1)  # [u, 4]
    return four[inv, lane].reshape(offsets.shape)


def standard_normal_rows(key: int, m: int, n: int, device, rows: slice | None = None) -> torch.Tensor:
    """Rows `rows` (default all) of the m x n matrix z[i, j] = z(key, i * n + j), float32 on `device`."""
    r0, r1, _ = (rows or slice(0, m)).indices(m)
    if r1 <= r0:
        return torch.empty((0, n), dtype=torch.float32, device=device)
    start, stop = r0 * n, r1 * n
    c0, c1 = start >> 2, (stop + 3) >> 2
    counters = torch.arange(c0, c1, dtype=torch.int64, device=device)
    four = torch.stack(randn4x(key, counters), 1).reshape(-1)  # offsets 4*c0 ...
    return four[start - 4 * c0: stop - 4 * c0].reshape(r1 - r0, n)
