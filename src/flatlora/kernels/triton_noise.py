"""Triton kernels for Flat-LoRA noise: row std of the merged weight, in-place perturb with an exact-restore
record, restore, and the forward-mode noisy copy. Noise is `philox.py`'s stream: z(key, i * n + j) from one
Philox call (`randint4x`) per 8 consecutive elements, Box-Muller on the 16-bit halves of its four words, so a
tile of rows needs nothing but (key, global row, column).

One elementwise kernel serves three modes over tiles of BLOCK consecutive elements of a logical (m, n)
weight (any strides; row-major contiguous views get vector loads):

    PERTURB  W <- round(W + eps); entries where round(round(W + eps) - eps) != W are appended to a record
    RESTORE  W <- round(W - eps), then the recorded entries get their original bits back (exact)
    COPY     out <- round(W + eps)                       (forward mode; W is only read)

with eps = std[row] * z in float32 and round = round-to-nearest-even into W's dtype, done on the bits
(bf16 by integer arithmetic, so the result is the same on a GPU and in TRITON_INTERPRET=1).

Every launch is grouped: a table holds one row per layer (pointers, sizes, strides, key; columns named
below), and a per-tile map says which layer a program serves (one load, not a search through the table).
One launch per dtype covers every layer, so small models stay launch-bound on nothing.

The record is per tile: a header (slot, count, checksum) and, for each off entry, one packed word holding its
in-tile offset above its original bits (int32 = offset << 16 | bits for bf16/fp16, int64 = offset << 32 | bits
for fp32): 4 bytes per entry for 16-bit weights, written with one store (two arrays, offsets and values, took
two 64-bit addresses per element: the perturb's 128 registers a thread, against 96 with one). Tiles
append with one atomic add on a shared counter; a tile whose entries would not fit leaves W untouched and
marks its slot -1, and the host reruns just those tiles into a larger buffer (RETRY). The checksum is a
position-weighted sum of the noisy bits the perturb wrote; restore recomputes it from what it reads and
leaves a tile whose weight changed since (a merge, a state-dict load) untouched, counting it per layer,
instead of "restoring" someone else's values into garbage.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

PERTURB, RESTORE, COPY = 0, 1, 2
BLOCK = 2048  # noise tile: 2048 consecutive elements of a layer's (m, n) view; in-tile offsets fit int16
# Warps a tile, per mode: 16 elements a thread, the fastest on the H200 for the noisy copy and the perturb
# (perturb_sweep.py: 2048 x 4 warps against 4096 x 4 or x 8).
NUM_WARPS = {PERTURB: 4, RESTORE: 4, COPY: 4}
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_ENT = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}  # a record entry

# Columns of the layer table of the noise kernel (int64 each).
C_W = tl.constexpr(0)  # weight (bits) pointer
C_OUT = tl.constexpr(1)  # output pointer (COPY; = C_W otherwise)
C_STD = tl.constexpr(2)  # float32 per-row std pointer
C_M = tl.constexpr(3)  # local rows
C_N = tl.constexpr(4)  # columns
C_ROW0 = tl.constexpr(5)  # global index of the first local row (FSDP2 shards)
C_KEY = tl.constexpr(6)  # Philox key
C_SR = tl.constexpr(7)  # weight row stride (elements)
C_SC = tl.constexpr(8)  # weight column stride
C_OSR = tl.constexpr(9)  # output row stride
C_OSC = tl.constexpr(10)  # output column stride
C_TILE0 = tl.constexpr(11)  # first tile of this layer in the launch
N_COLS = tl.constexpr(12)

# Columns of the layer table of the row-std kernel.
S_W = tl.constexpr(0)
S_A = tl.constexpr(1)  # float32 A_cat [R, n]
S_B = tl.constexpr(2)  # float32 B_cat [m, R] (scalings folded in)
S_M = tl.constexpr(3)
S_N = tl.constexpr(4)
S_SR = tl.constexpr(5)
S_SC = tl.constexpr(6)
S_R = tl.constexpr(7)
S_BLK0 = tl.constexpr(8)  # first row block of this layer in the launch
S_OUT0 = tl.constexpr(9)  # first output row
S_BS = tl.constexpr(10)  # scale of B (float64 bits): the adapter's scaling, applied here instead of copying B
S_COLS = tl.constexpr(11)


@triton.jit
def _to_f32(bits, KIND: tl.constexpr):
    if KIND == 0:  # bfloat16
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 1:  # float16
        return bits.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_bits(x, KIND: tl.constexpr, FAST: tl.constexpr):
    """float32 -> bits of the nearest (ties to even) value in the storage dtype. bfloat16: compiled (FAST), the
    GPU's own conversion (cvt.rn.bf16x2.f32: one instruction for two values, where the integer rounding below
    took ~7 a value, twice per element in the perturb); the interpreter has no bfloat16 rounding of its own,
    so there the same round-to-nearest-even is done on the bits. The two agree on every non-NaN value (NaN
    stays NaN, its payload may differ)."""
    if KIND == 0 and FAST:
        return x.to(tl.bfloat16).to(tl.int16, bitcast=True)
    elif KIND == 0:
        b = x.to(tl.int32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, (b >> 16) | 0x40, r)  # keep NaN a NaN
        return r.to(tl.int16)
    elif KIND == 1:
        return x.to(tl.float16).to(tl.int16, bitcast=True)
    else:
        return x.to(tl.int32, bitcast=True)


@triton.jit
def _approx(x, OP: tl.constexpr):
    """The GPU's special-function unit (one MUFU instruction each): lg2, sin, cos, sqrt."""
    if OP == 0:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    elif OP == 1:
        return tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    elif OP == 2:
        return tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("sqrt.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _add_rn(a, b, FAST: tl.constexpr):
    """a + b with one rounding, never fused with the multiply that made b: compiled, PTX's add.rn, which no
    contraction touches (a kernel launched from a traced op compiles with Triton's default fp fusion on, where
    the grouped kernels turn it off at their launch); the interpreter does not contract."""
    if FAST:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return a + b


@triton.jit
def _box_muller(w, FAST: tl.constexpr):
    """The two normals of one Philox word (uint32), as `philox.py` defines them: its 16-bit halves h1, h2
    give u1 = (h1 + 1/2) 2^-16, r = sqrt(-2 ln u1), theta = 2 pi (h2 + 1/2) 2^-16 - pi, computed as
    pi 2^-16 (2 h2 + 1 - 2^16) (one rounding), and (r cos theta, r sin theta). FAST (compiled on a GPU)
    takes the transcendentals from the special-function unit (absolute error ~1e-6 on z, up to ~4e-5 for the
    smallest r, where lg2's absolute error ~2^-22 is large against ln u1; theta in (-pi, pi), where
    sin/cos.approx are most accurate; libdevice's would make the kernels compute-bound at a third of the
    memory bandwidth); the interpreter uses the precise ones."""
    tl.static_assert(w.dtype == tl.uint32, "Philox words are uint32 (logical shifts)")
    h1 = (w & 0xFFFF).to(tl.int32)
    h2 = (w >> 16).to(tl.int32)
    u1 = (h1.to(tl.float32) + 0.5) * 1.52587890625e-05  # exact: 2^-16
    th = (h2 * 2 - 65535).to(tl.float32) * 4.7936899621426287e-05  # float32(pi) 2^-16, as philox.THETA_SCALE
    if FAST:
        r = _approx(-1.3862943611198906 * _approx(u1, 0), 3)  # -2 ln u1 = -2 ln(2) log2(u1)
        return r * _approx(th, 2), r * _approx(th, 1)
    else:
        r = tl.sqrt(-2.0 * tl.log(u1))
        return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _normals8(key, c, FAST: tl.constexpr):
    """z(key, 8 c + l) for l < 8 as a [Q, 8] block, from one Philox call per counter c [Q] (int64)."""
    w0, w1, w2, w3 = tl.randint4x(key, c)
    c0, s0 = _box_muller(w0, FAST)
    c1, s1 = _box_muller(w1, FAST)
    c2, s2 = _box_muller(w2, FAST)
    c3, s3 = _box_muller(w3, FAST)
    # tl.join stacks on a new last axis: element [q, d, e, f] of the joins is (cos, sin)[f] of word 2 d + e,
    # and the row-major reshape puts it at lane 4 d + 2 e + f = 2 p + f: c0 s0 c1 s1 c2 s2 c3 s3 (the
    # kernel cases check the order against philox.normals8).
    z = tl.join(tl.join(tl.join(c0, c2), tl.join(c1, c3)), tl.join(tl.join(s0, s2), tl.join(s1, s3)))
    return tl.reshape(z, (c.shape[0], 8))


@triton.jit
def _normals(key, g0, q, ALIGNED: tl.constexpr, FAST: tl.constexpr):
    """z(key, g0 + 8 q + l) for l < 8 as a [Q, 8] block (g0: global offset of the tile, int64). ALIGNED
    (g0 a multiple of 8): one Philox call per row of the block; else one per element, word and half picked
    by the lane."""
    if ALIGNED:
        return _normals8(key, g0 // 8 + q, FAST)
    else:
        g = g0 + q[:, None] * 8 + tl.arange(0, 8)[None, :]
        w0, w1, w2, w3 = tl.randint4x(key, g >> 3)
        lane = (g & 7).to(tl.int32)
        p = lane >> 1
        w = tl.where(p == 0, w0, tl.where(p == 1, w1, tl.where(p == 2, w2, w3)))
        zc, zs = _box_muller(w, FAST)
        return tl.where((lane & 1) == 0, zc, zs)


@triton.jit
def _checksum(bits, q):
    """Position-weighted sum of a tile's [Q, 8] bits (int32, wrapping): each value xor-ed with a constant of its
    lane, summed per octet, the octet sums weighted by 2 q + 1 (odd, so invertible mod 2^32: any one changed
    value changes the sum) and summed. It changes when an entry changes or moves, at ~3 instructions an element
    (the weight's xor and multiply per element before: ~7, 12 of restore's 62 an element; sass_stats.py)."""
    lane = tl.arange(0, 8)[None, :]
    octet = tl.sum(bits.to(tl.int32) ^ (lane * 40503 + 12345), axis=1)
    return tl.sum(octet * (q * 2 + 1), axis=0)


@triton.jit
def _tile(start, numel, N32, BLOCK_: tl.constexpr, ALIGNED: tl.constexpr):
    """A tile of BLOCK consecutive elements from `start` of a layer's (m, n) view with numel elements and n = N32
    columns, as a [BLOCK/8, 8] block: (octet index q, in-tile offsets, element indices o, mask o < numel, each
    element's row, and the rows and mask the per-row std is read with: per octet [BLOCK/8] when ALIGNED,
    n % 8 == 0, else per element).
    The caller marks start and numel as multiples of 8 (tl.multiple_of) before the call: marked in here, the hint
    did not reach the caller's accesses (sass_stats.py: perturb 72.0 -> 83.5 instructions an element, 92 -> 128
    registers). No pointer comes in: inductor's analysis of which arguments a traced kernel writes takes a
    helper's results as derived from every argument it is given (a std pointer passed in was taken as written)."""
    q = tl.arange(0, BLOCK_ // 8)  # octet index: the 8 elements of one Philox call when ALIGNED
    offs = q[:, None] * 8 + tl.arange(0, 8)[None, :]  # in-tile offset
    o = start + offs  # element index in the (m, n) view
    mask = o < numel
    if ALIGNED:
        rq = (start + q * 8) // N32
        return q, offs, o, mask, rq[:, None], rq, start + q * 8 < numel
    else:
        r = o // N32
        return q, offs, o, mask, r, r, mask


@triton.jit
def _row_std(std_ptr, rs, ms, ALIGNED: tl.constexpr):
    """The std of each element's row, from `_tile`'s rows and mask (ALIGNED: once an octet, broadcast over it).
    Its own helper: its result is a value the kernels store, never an address (see `_tile`)."""
    std = tl.load(std_ptr + rs, mask=ms, other=0.0)
    if ALIGNED:
        std = std[:, None]
    return std


@triton.jit(do_not_specialize=["key_hi", "key_lo"])
def _noise_kernel(
    tab_ptr, map_ptr,  # layer table and tile -> layer map
    cnt_ptr, hdr_ptr, rent_ptr, CAP, bad_ptr,  # record (PERTURB / RESTORE)
    # COPY with LAYER_ARGS (one layer): its weight, output, std and key as arguments instead of the table's C_W,
    # C_OUT, C_STD and C_KEY, so the table holds only the layer's shape, strides and first row, which never change
    # between windows, nor between the fresh tensors a quantized base dequantizes into or a sharded one is
    # gathered into at every forward (one table serves them all). The key travels as two signed 32-bit halves: Triton types an integer argument by its value
    # (i32 below 2^31, i64 above), and two i32s keep one compiled kernel for every key.
    warg_ptr, oarg_ptr, sarg_ptr, key_hi, key_lo,
    MODE: tl.constexpr, KIND: tl.constexpr, ALIGNED: tl.constexpr, CONTIG: tl.constexpr, RETRY: tl.constexpr,
    FAST: tl.constexpr, BLOCK_: tl.constexpr, PB: tl.constexpr, LAYER_ARGS: tl.constexpr,
):
    """One tile = BLOCK consecutive elements o of a layer's logical (m, n) view (row o // n, column o % n).
    CONTIG: every view in the launch is row-major contiguous with 16-byte aligned storage, so o is also the
    storage offset; the alignment hint matters: a pointer loaded from the table carries no alignment the
    compiler can see, and without it every access is a scalar 2-byte one (most of the old kernels' time).
    ALIGNED: every n is a multiple of 8, so an octet of elements shares a row and a Philox call."""
    t = tl.program_id(0)
    BITS: tl.constexpr = tl.int16 if KIND < 2 else tl.int32
    layer = tl.load(map_ptr + t)
    row = tab_ptr + layer.to(tl.int64) * N_COLS
    if LAYER_ARGS:
        w_ptr = warg_ptr
        std_ptr = sarg_ptr
        key = (key_hi.to(tl.int64) << 32) | (key_lo.to(tl.int64) & 0xFFFFFFFF)
    else:
        w_ptr = tl.load(row + C_W).to(tl.pointer_type(BITS))
        std_ptr = tl.load(row + C_STD).to(tl.pointer_type(tl.float32))
        key = tl.load(row + C_KEY)
    M = tl.load(row + C_M)
    N = tl.load(row + C_N)
    # int32 element indices (the host keeps every layer under 2^31 elements): one cheap division per octet
    start = ((t - tl.load(row + C_TILE0)) * BLOCK_).to(tl.int32)
    numel = (M * N).to(tl.int32)
    N32 = N.to(tl.int32)
    if ALIGNED:
        # n % 8 == 0, so numel and start are octet multiples: said to the compiler, the mask `o < numel` is
        # constant over an octet and a CONTIG access becomes one 16-byte vector (without it: 8 scalar ones)
        start = tl.multiple_of(start, 8)
        numel = tl.multiple_of(numel, 8)
    q, offs, o, mask, r, rs, ms = _tile(start, numel, N32, BLOCK_, ALIGNED)
    std = _row_std(std_ptr, rs, ms, ALIGNED)
    if CONTIG:
        w_ptr = tl.multiple_of(w_ptr, 16)
        ptrs = w_ptr + o
    else:
        ptrs = w_ptr + r.to(tl.int64) * tl.load(row + C_SR) + (o - r * N32).to(tl.int64) * tl.load(row + C_SC)
    bits = tl.load(ptrs, mask=mask, other=0)
    eps = std * _normals(key, tl.load(row + C_ROW0) * N + start.to(tl.int64), q, ALIGNED, FAST)
    x = _to_f32(bits, KIND)
    if MODE == 2:  # COPY
        if LAYER_ARGS:
            out_ptr = oarg_ptr
        else:
            out_ptr = tl.load(row + C_OUT).to(tl.pointer_type(BITS))
        if CONTIG:
            optrs = tl.multiple_of(out_ptr, 16) + o
        else:
            optrs = out_ptr + r.to(tl.int64) * tl.load(row + C_OSR) + (o - r * N32).to(tl.int64) * tl.load(row + C_OSC)
        tl.store(optrs, _round_bits(x + eps, KIND, FAST), mask=mask)
    elif MODE == 0:  # PERTURB
        noisy = _round_bits(x + eps, KIND, FAST)
        replay = _round_bits(_to_f32(noisy, KIND) - eps, KIND, FAST)
        # The record by a two-level scan: entries before an octet (a scan over the BLOCK/8 octet counts), then
        # before the entry in its octet (8 lanes a thread holds). A scan over the flat tile instead cost twice
        # the whole perturb (perturb_sweep.py, with the 4-lane quads of the randn4x stream: 12.2 against 6.6 ms
        # on a quarter of the 7B group).
        offi = ((replay != bits) & mask).to(tl.int32)
        qc = tl.sum(offi, axis=1)
        count = tl.sum(qc, axis=0)
        if RETRY:
            active = tl.load(hdr_ptr + t * 3) == -1
        else:
            active = count >= 0
        slot = tl.atomic_add(cnt_ptr, count * active.to(tl.int32))
        ok = active & (slot + count <= CAP)
        ok_i = ok.to(tl.int32)  # broadcast as int: the interpreter rejects scalar-bool & tensor-bool masks
        tl.store(ptrs, noisy, mask=mask & ((offs * 0 + ok_i) != 0))
        pos = slot + (tl.cumsum(qc, axis=0) - qc)[:, None] + (tl.cumsum(offi, axis=1) - offi)
        sel = (offi * ok_i) != 0
        if KIND < 2:
            ent = (offs << 16) | (bits.to(tl.int32) & 0xFFFF)
        else:
            ent = (offs.to(tl.int64) << 32) | (bits.to(tl.int64) & 0xFFFFFFFF)
        tl.store(rent_ptr + pos, ent, mask=sel)
        chk = _checksum(tl.where(mask, noisy, 0), q)
        tl.store(hdr_ptr + t * 3, tl.where(ok, slot, -1), mask=active)
        tl.store(hdr_ptr + t * 3 + 1, count, mask=active)
        tl.store(hdr_ptr + t * 3 + 2, chk, mask=active)
    else:  # RESTORE
        # A tile left clean by a perturb whose record overflowed (slot -1: a deferred perturb has no retry,
        # see perturb_group) holds no noise: nothing to undo, and its weight is not "modified".
        slot = tl.load(hdr_ptr + t * 3)
        live = slot >= 0
        good = _checksum(bits, q) == tl.load(hdr_ptr + t * 3 + 2)
        good_i = (good & live).to(tl.int32)
        bad_i = (live & (good == 0)).to(tl.int32)
        tl.store(ptrs, _round_bits(x - eps, KIND, FAST), mask=mask & ((offs * 0 + good_i) != 0))
        tl.atomic_add(bad_ptr + layer, bad_i, mask=bad_i != 0)
        tl.atomic_add(cnt_ptr + 1, 1, mask=slot < 0)  # a tile the perturb left clean (stats[1])
        tl.debug_barrier()  # the patches below overwrite some of the values just stored
        count = tl.load(hdr_ptr + t * 3 + 1) * good_i
        for s in range(0, count, PB):
            idx = s + tl.arange(0, PB)
            pm = idx < count
            ent = tl.load(rent_ptr + slot + idx, mask=pm, other=0)
            if KIND < 2:
                po = start + (ent >> 16)
            else:
                po = start + (ent >> 32).to(tl.int32)
            v = ent.to(BITS)  # the low bits: the original value
            if CONTIG:
                pp = w_ptr + po
            else:
                pr = po // N32
                pp = w_ptr + pr.to(tl.int64) * tl.load(row + C_SR) + (po - pr * N32).to(tl.int64) * tl.load(row + C_SC)
            tl.store(pp, v, mask=pm)


@triton.jit
def _copy_kernel(w_ptr, out_ptr, std_ptr, key_ptr, after_ptr, M, N, ROW0, SR, SC, OSR, OSC,
                 KIND: tl.constexpr, ALIGNED: tl.constexpr, CONTIG: tl.constexpr, FAST: tl.constexpr,
                 BLOCK_: tl.constexpr):
    """The noisy copy of one layer as `_noise_kernel`'s COPY computes it (the same tiles, stream and rounding:
    the same bits), with the key read from device memory and the shape and strides as arguments: no table and
    no host-side value, so a traced op can launch it (`noisy_copy_traced`). The weight and output come in their
    own dtype (no bits view for a traced graph to functionalize) and are reinterpreted here. `after_ptr` is
    never read: it makes the launch depend on a tensor, the backward's on its incoming gradient, so that a
    compiled graph cannot move the backward's regeneration into the forward (it depends only on the forward's
    inputs; inductor's partitioner did, and kept the m x n copy alive in between). Pointer alignment is
    Triton's own specialization of pointer arguments."""
    # tl.cast, not .to(): a compiled graph may hand the sizes in as constants (plain ints)
    BITS: tl.constexpr = tl.int16 if KIND < 2 else tl.int32
    t = tl.program_id(0)
    key = tl.load(key_ptr)
    start = tl.cast(t * BLOCK_, tl.int32)
    numel = tl.cast(M, tl.int32) * tl.cast(N, tl.int32)
    N32 = tl.cast(N, tl.int32)
    if ALIGNED:
        start = tl.multiple_of(start, 8)
        numel = tl.multiple_of(numel, 8)
    q, offs, o, mask, r, rs, ms = _tile(start, numel, N32, BLOCK_, ALIGNED)
    std = _row_std(std_ptr, rs, ms, ALIGNED)
    if CONTIG:
        ptrs = w_ptr + o
        optrs = out_ptr + o
    else:
        c = (o - r * N32).to(tl.int64)
        ptrs = w_ptr + r.to(tl.int64) * SR + c * SC
        optrs = out_ptr + r.to(tl.int64) * OSR + c * OSC
    bits = tl.load(ptrs, mask=mask, other=0).to(BITS, bitcast=True)
    eps = std * _normals(key, tl.cast(ROW0, tl.int64) * N32 + start.to(tl.int64), q, ALIGNED, FAST)
    noisy = _round_bits(_add_rn(_to_f32(bits, KIND), eps, FAST), KIND, FAST)
    tl.store(optrs, noisy.to(out_ptr.dtype.element_ty, bitcast=True), mask=mask)


def noisy_copy_traced(w: torch.Tensor, std: torch.Tensor, key: torch.Tensor, row0: int, out: torch.Tensor,
                      transposed: bool = False, after: torch.Tensor | None = None, launch=None) -> None:
    """out <- round(W + eps), as `noisy_copy_` writes it, for a 2-D weight `w` and output `out` in storage
    layout (`transposed`: stored (n, m), as HF Conv1D keeps it), the key a 0-d int64 tensor on w's device.
    Only shapes, strides and dtypes are read on the host (no address, no value, no view made), so a compiled
    graph traces it: `launch` is torch.library.wrap_triton there, and the launch is then inductor's.
    `after`: a tensor the launch must wait for (never read; see the kernel), the weight itself by default."""
    # what _check asks of a grouped launch, read from shapes, dtypes and devices only (a traced call has no values)
    if w.dim() != 2 or out.shape != w.shape or out.dtype != w.dtype or not supported(w):
        raise ValueError(f"the traced noisy copy needs a 2-D float16/bfloat16/float32 weight and an output of its "
                         f"shape and dtype, got {tuple(w.shape)} {w.dtype} and {tuple(out.shape)} {out.dtype}")
    if w.numel() >= 2**31 - BLOCK:
        raise ValueError(f"a {tuple(w.shape)} weight has too many elements for the noise kernels (< 2^31 - {BLOCK})")
    if std.dtype != torch.float32 or not std.is_contiguous() or key.dtype != torch.int64 or key.numel() != 1:
        raise ValueError("the traced noisy copy needs a contiguous float32 std and a one-element int64 key")
    if not std.device == key.device == w.device:
        raise ValueError(f"weight, std and key must share a device, got {w.device}, {std.device}, {key.device}")
    (n, m), (sc, sr), (osc, osr) = (w.shape, w.stride(), out.stride()) if transposed else (w.shape[::-1], w.stride()[::-1], out.stride()[::-1])
    contig = all(s1 == 1 and (s0 == n or m == 1) for s0, s1 in ((sr, sc), (osr, osc)))
    kernel = _copy_kernel if launch is None else launch(_copy_kernel)
    kernel[(_tiles(m, n),)](w, out, std, key, w if after is None else after, m, n, row0, sr, sc, osr, osc,
                            KIND=_KIND[w.dtype], ALIGNED=n % 8 == 0, CONTIG=contig, FAST=_fast(), BLOCK_=BLOCK,
                            num_warps=NUM_WARPS[COPY])


@triton.jit
def _rowstd_kernel(tab_ptr, map_ptr, out_ptr, SCALE,
                   KIND: tl.constexpr, VEC: tl.constexpr, BM_: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                   ONE: tl.constexpr, PREC: tl.constexpr):
    """out[OUT0 + i] = SCALE * ||W_i + B_i A|| / sqrt(N) for the BM rows of one layer of the table.

    The merged row is built tile by tile over N (W tile + B[rows] @ A[:, cols] on the tensor cores, the rank
    in chunks of RP, zero-padded; ONE: every R fits one chunk, loaded once; float32 accumulation, PREC
    "tf32x3" keeps float32 accuracy) and its squares summed: no
    ||W||^2 + 2<WA^T, B> + ... expansion, so no cancellation. VEC: row-major contiguous 16-byte aligned
    views with n % 8 == 0 (hints for vector loads)."""
    t = tl.program_id(0)
    layer = tl.load(map_ptr + t)
    row = tab_ptr + layer.to(tl.int64) * S_COLS
    BITS: tl.constexpr = tl.int16 if KIND < 2 else tl.int32
    w_ptr = tl.load(row + S_W).to(tl.pointer_type(BITS))
    a_ptr = tl.load(row + S_A).to(tl.pointer_type(tl.float32))
    b_ptr = tl.load(row + S_B).to(tl.pointer_type(tl.float32))
    M = tl.load(row + S_M)
    N = tl.load(row + S_N)
    R = tl.load(row + S_R)
    if VEC:
        w_ptr = tl.multiple_of(w_ptr, 16)
        a_ptr = tl.multiple_of(a_ptr, 16)
        N = tl.multiple_of(N, 8)
        SR = N
        SC = 1
    else:
        SR = tl.load(row + S_SR)
        SC = tl.load(row + S_SC)
    rows = (t - tl.load(row + S_BLK0)) * BM_ + tl.arange(0, BM_)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    rk = tl.arange(0, RP)
    bscale = tl.load(row + S_BS).to(tl.float64, bitcast=True).to(tl.float32)
    if ONE:
        b = tl.load(b_ptr + rows64[:, None] * R + rk[None, :], mask=rmask[:, None] & (rk[None, :] < R), other=0.0) * bscale
    acc = tl.zeros((BM_, BK), dtype=tl.float32)
    for k in range(0, N, BK):
        cols = k + tl.arange(0, BK)
        cm = cols < N
        cols64 = cols.to(tl.int64)
        bits = tl.load(w_ptr + rows64[:, None] * SR + cols64[None, :] * SC, mask=rmask[:, None] & cm[None, :], other=0)
        merged = _to_f32(bits, KIND)
        if ONE:
            a = tl.load(a_ptr + rk[:, None] * N + cols64[None, :], mask=(rk[:, None] < R) & cm[None, :], other=0.0)
            merged += tl.dot(b, a, input_precision=PREC)
        else:
            for r0 in range(0, R, RP):
                r = r0 + rk
                bc = tl.load(b_ptr + rows64[:, None] * R + r[None, :], mask=rmask[:, None] & (r[None, :] < R),
                             other=0.0) * bscale
                a = tl.load(a_ptr + r[:, None] * N + cols64[None, :], mask=(r[:, None] < R) & cm[None, :], other=0.0)
                merged += tl.dot(bc, a, input_precision=PREC)
        acc += merged * merged
    std = tl.sqrt(tl.sum(acc, axis=1)) * (SCALE / tl.sqrt(N.to(tl.float32)))
    tl.store(out_ptr + tl.load(row + S_OUT0) + rows64, std, mask=rmask)


# ---------------------------------------------------------------------------------------------- host side

def supported(w: torch.Tensor) -> bool:
    """True when the kernels handle this weight (dense float16/bfloat16/float32)."""
    return w.dtype in _BITS and w.layout == torch.strided


def _cdiv(a: int, b: int) -> int:
    # (triton.cdiv is a constexpr function: ~1.6 us a host call, ~2 calls a layer every step)
    return -(-a // b)


def _tiles(m: int, n: int) -> int:
    return _cdiv(m * n, BLOCK)


def _fast() -> bool:
    # Triton decides interpreted vs compiled per process from this variable; inline PTX needs compiled.
    return os.environ.get("TRITON_INTERPRET") != "1"


def compiled() -> bool:
    """True when the kernels run compiled on a GPU, False under Triton's interpreter."""
    return _fast()


@dataclass
class Layer:
    """One weight in a launch: its logical (m, n) view, per-row std, key and first global row."""

    w: torch.Tensor
    std: torch.Tensor
    key: int
    row0: int = 0


@dataclass
class Record:
    """What an in-place perturb of one launch needs to be undone exactly (see the module docstring)."""

    # int32 [STATS + layers], zeroed by the perturb: [0] the counter (entries used, holes of failed tiles included),
    # [1] tiles the perturb left without noise and [STATS + l] tiles of layer l found modified, both counted by the
    # restore: one buffer, one copy to the host
    stats: torch.Tensor
    header: torch.Tensor  # int32 [tiles, 3]: slot (-1: not perturbed yet), count, checksum of the noisy bits
    ent: torch.Tensor  # int32 [cap] (16-bit weights) / int64 (float32): offset << 16 (32) | original bits
    used: int | None = 0  # entries of ent in use; None until the restore's Outcome is read (deferred)
    skipped: int = 0  # tiles a deferred perturb left without noise (its record overflowed); known likewise
    table: torch.Tensor | None = None  # the launch's layer table (restore reuses it)
    tile_map: torch.Tensor | None = None
    dtype: torch.dtype | None = None  # the weights' dtype and the launch's (ALIGNED, CONTIG), checked at perturb
    flags: tuple[bool, bool] | None = None
    group_key: tuple | None = None  # the group's (device, dtype, weights): whose record-size estimate it feeds
    sigma: float | None = None  # sigma_t of the perturb, scaling that estimate

    def __post_init__(self):
        self.counter = self.stats[:1]  # the perturb's atomic counter (a view: the kernels take its address)

    def release(self) -> None:
        """Drop the entry buffers once the restore is queued (the caching allocator reuses their memory only
        for work queued after it), so a restore whose outcome is read later holds no weight-sized memory."""
        self.ent = self.ent.new_empty(0)  # (a [:0] view would keep the whole storage alive)

    @property
    def hslot(self) -> torch.Tensor:
        return self.header[:, 0]

    @property
    def hcnt(self) -> torch.Tensor:
        return self.header[:, 1]

    @property
    def entries(self) -> int:
        return int(self.hcnt.sum())

    @property
    def nbytes(self) -> int:
        """Bytes held for the restore: the counter, the headers and the used entries (allocated ones while a
        deferred record's size is unread)."""
        per = self.ent.element_size()
        entries = self.ent.numel() if self.used is None else self.used  # unsettled: what is allocated
        return self.counter.numel() * 4 + self.header.numel() * 4 + entries * per


def _remember(cache: dict, key, value, limit: int = 64):
    """cache[key] = value, starting over once `limit` entries are held (models and weights come and go: a cache
    keyed by addresses would otherwise grow); returns value."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value
    return value


_MAPS: dict[tuple, torch.Tensor] = {}  # tile -> layer maps by (device, per-layer tile counts)


def _tile_map(device: torch.device, counts: tuple[int, ...]) -> torch.Tensor:
    key = (str(device), counts)
    m = _MAPS.get(key)
    if m is None:
        m = _remember(_MAPS, key, torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32),
                                                          torch.tensor(counts, dtype=torch.int64)).to(device))
    return m


def _check(layers: list[Layer]) -> torch.dtype:
    dtype = layers[0].w.dtype
    for ly in layers:
        if ly.w.dtype != dtype:
            raise ValueError("a grouped launch needs one dtype; group layers by dtype")
        if not supported(ly.w) or ly.w.dim() != 2:
            raise ValueError(f"the noise kernels need logical (m, n) float16/bfloat16/float32 views, got {ly.w.dtype}")
        if ly.std.dtype != torch.float32 or not ly.std.is_contiguous():
            raise ValueError("std must be a contiguous float32 vector")
        if not 0 <= ly.key < 1 << 64:
            raise ValueError(f"a noise key must be an unsigned 64-bit integer, got {ly.key}")
        if ly.w.numel() >= 2**31 - BLOCK:
            raise ValueError(f"a {tuple(ly.w.shape)} weight has too many elements for the kernels' int32 indexing")
    return dtype


def _signed(key: int) -> int:
    """A 64-bit key as the int64 the tables hold (>= 2^63 as its two's complement: the kernel's Philox reads the bits)."""
    return key - (1 << 64) if key >= 1 << 63 else key


def _rows(layers: list[Layer], outs: list[torch.Tensor] | None = None) -> tuple[list[list[int]], tuple[int, ...]]:
    """The layer table's rows (columns C_*) and each layer's tile count."""
    rows, counts, tile0 = [], [], 0
    for i, ly in enumerate(layers):
        m, n = ly.w.shape
        o = ly.w if outs is None else outs[i]
        tiles = _tiles(m, n)
        rows.append([ly.w.data_ptr(), o.data_ptr(), ly.std.data_ptr(), m, n, ly.row0, _signed(ly.key),
                     ly.w.stride(0), ly.w.stride(1), o.stride(0), o.stride(1), tile0])
        counts.append(tiles)
        tile0 += tiles
    return rows, tuple(counts)


def _upload(rows: list[list[int]], counts: tuple[int, ...], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(table, tile map, tiles) of a launch from its rows and per-layer tile counts."""
    tab = torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)
    return tab, _tile_map(dev, counts), rows[-1][C_TILE0] + counts[-1]


def _table(layers: list[Layer], outs: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    return _upload(*_rows(layers, outs), layers[0].w.device)


def _contiguous(w: torch.Tensor) -> bool:
    """Row-major contiguous (m, n) storage at a 16-byte aligned address (what the vector path assumes)."""
    return w.stride(1) == 1 and (w.stride(0) == w.shape[1] or w.shape[0] == 1) and w.data_ptr() % 16 == 0


def _flags(layers: list[Layer], outs: list[torch.Tensor] | None = None) -> tuple[bool, bool]:
    """(ALIGNED, CONTIG) of a launch."""
    views = [ly.w for ly in layers] + (outs or [])
    return all(ly.w.shape[1] % 8 == 0 for ly in layers), all(_contiguous(v) for v in views)


def _key_halves(key: int) -> tuple[int, int]:
    """A 64-bit key as the kernel's (key_hi, key_lo): its upper and lower 32 bits, each as a signed int32."""
    hi, lo = key >> 32, key & 0xFFFFFFFF
    return hi - (1 << 32) if hi >> 31 else hi, lo - (1 << 32) if lo >> 31 else lo


def _launch(tab, tile_map, tiles, dtype, flags, mode, rec: Record | None, bad=None, retry=False, layer=None):
    """Triton's own launch of `_noise_kernel`; returns what it returns (compiled: the CompiledKernel).
    layer: (weight, output, std, key) of a one-layer COPY whose table holds none of them (LAYER_ARGS)."""
    dummy = tab
    if rec is None:
        cnt = hdr = ent = dummy
        cap = 0
    else:
        cnt, hdr, ent, cap = rec.counter, rec.header, rec.ent, rec.ent.numel()
    w, out, std, (hi, lo) = ((dummy, dummy, dummy, (0, 0)) if layer is None
                             else (layer[0], layer[1], layer[2], _key_halves(layer[3])))
    return _noise_kernel[(tiles,)](
        tab, tile_map, cnt, hdr, ent, cap, bad if bad is not None else dummy, w, out, std, hi, lo,
        MODE=mode, KIND=_KIND[dtype], ALIGNED=flags[0], CONTIG=flags[1], RETRY=retry, FAST=_fast(), BLOCK_=BLOCK,
        PB=256, LAYER_ARGS=layer is not None, num_warps=NUM_WARPS[mode],
        # No fused multiply-add: x + std * z must round the product and then the sum in every specialization
        # (each MODE, LAYER_ARGS, alignment compiles its own code), so restore's W - eps is the very value
        # perturb's replay predicted and the pre-bound copy writes the grouped copy's bits; with contraction
        # on, one H200 run found a float32 copy 1 ulp apart between two specializations.
        enable_fp_fusion=False)


def noisy_copy_group(layers: list[Layer], outs: list[torch.Tensor]) -> None:
    """outs[i] <- round(layers[i].w + eps_i) for every layer, in one launch (forward mode)."""
    dtype = _check(layers)
    outs = [o.view(_BITS[dtype]) for o in outs]
    tab, tile_map, tiles = _table(layers, outs)
    _launch(tab, tile_map, tiles, dtype, _flags(layers, outs), COPY, None)


# ------------------------------------------------------------------ pre-bound noisy copies (forward mode)
#
# Forward mode copies every targeted layer in forward and again in backward (~890 launches a step for a 7B
# model, ~0.07 ms of GPU time each), and Triton's generic launch (JITFunction.run: argument binding, the
# specialization key, the cache lookup, launch metadata; ~0.17 ms of host time a call on the H200's host,
# issue 10) made the step host-bound. A one-layer copy varies in few ways, so noisy_copy_ keeps Triton's own
# CompiledKernel per specialization (`_copy_key`; compiled by the first ordinary launch of that key) and calls
# its launcher as JITFunction.run does: the same kernel, the same arguments (pointers as integers: the launcher
# takes them as they are, where for a tensor it asks torch and the driver), so the same bits. Whenever that
# would not be what an ordinary launch does (`_runtime` and `_plain_launch` say when), the ordinary launch runs.

_UNPROBED = object()
_RUNTIME = _UNPROBED  # (triton.knobs.runtime, .compilation, current device, raw stream) or None: see _runtime
_PREBOUND: dict[tuple, tuple] = {}  # by _copy_key: (launcher, CUfunction, packed metadata, the CompiledKernel)


def _runtime():
    """What a pre-bound launch needs of the installed Triton and torch, probed once; None where it must not be
    used: the interpreter (no CompiledKernel; TRITON_INTERPRET, which Triton reads when the kernel is defined),
    or a Triton whose launch path lacks a piece the fast path mirrors (written against 3.6 and 3.9)."""
    if not _fast():
        return None
    try:
        from triton import knobs
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    rt, comp = getattr(knobs, "runtime", None), getattr(knobs, "compilation", None)
    if (not isinstance(_noise_kernel, JITFunction) or not hasattr(_noise_kernel, "pre_run_hooks")
            or not all(hasattr(rt, a) for a in ("launch_enter_hook", "launch_exit_hook", "debug"))
            or not hasattr(comp, "instrumentation_mode")):
        return None
    # Triton's own stream query (triton/backends/driver.py), with torch's public one where torch lacks it.
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    stream = raw if raw is not None else (lambda d: torch.cuda.current_stream(d).cuda_stream)
    return rt, comp, torch.cuda.current_device, stream


def _plain_launch(rt, comp, kernel) -> bool:
    """True when `kernel[grid](...)` would only look its kernel up and launch it: no launch hook (a profiler
    such as proton reads every launch's metadata through them; Triton >= 3.6 keeps them as hook chains, empty
    unless one is added), no pre-run hook, and none of the settings that enter Triton's cache key beside the
    arguments (debug, an instrumentation mode, a stages-inspection hook)."""
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    return (not getattr(enter, "calls", enter) and not getattr(leave, "calls", leave) and not rt.debug
            and not comp.instrumentation_mode and getattr(rt, "add_stages_inspection_hook", None) is None
            and not kernel.pre_run_hooks)


def _copy_key(device: int, kind: int, aligned: bool, contig: bool, tab_ptr: int, map_ptr: int, w_ptr: int,
              out_ptr: int, std_ptr: int) -> tuple:
    """Everything Triton specializes a one-layer COPY launch (`noisy_copy_`'s `_launch`) on, besides what that
    launch fixes (MODE, RETRY, FAST, BLOCK_, PB, LAYER_ARGS, num_warps; CAP = 0, the record pointers = the
    table; the key's halves are i32s it does not specialize on): the constexprs KIND (which also sets the
    weight's and output's pointee type), ALIGNED and CONTIG, and the 16-byte alignment of each distinct pointer (Triton marks
    a pointer argument whose address is a multiple of 16 and compiles accesses through it accordingly); and the
    device whose context holds the loaded kernel."""
    return (device, kind, aligned, contig, tab_ptr % 16 == 0, map_ptr % 16 == 0, w_ptr % 16 == 0,
            out_ptr % 16 == 0, std_ptr % 16 == 0)


def _prebind(kernel) -> tuple | None:
    """(launcher, CUfunction, packed metadata, kernel) of what an ordinary launch returned, or None where it is
    not a loaded CompiledKernel (JITFunction.run returns one after launching it, handles initialized)."""
    if hasattr(kernel, "result"):  # Triton 3.6 under an async-compile mode: a future, resolved by the launch
        kernel = kernel.result()
    try:
        entry = (kernel.run, kernel.function, kernel.packed_metadata, kernel)  # the kernel: its __del__ unloads
    except AttributeError:
        return None
    return entry if entry[1] is not None and callable(entry[0]) else None


def _prebound_device(w: torch.Tensor) -> int | None:
    """The CUDA device index of `w` when its noisy copies may take the pre-bound launch, else None."""
    global _RUNTIME
    if not w.is_cuda:
        return None
    if _RUNTIME is _UNPROBED:
        _RUNTIME = _runtime()
    return w.get_device() if _RUNTIME is not None else None


_ONE: dict[tuple, tuple] = {}  # one-layer launch tables by everything they hold (see noisy_copy_)


def _one_layer(k: tuple, w: torch.Tensor, std: torch.Tensor, key: int, row0: int, out: torch.Tensor) -> tuple:
    """noisy_copy_'s cache entry for key `k`: the table and the launch's fixed flags. The table's weight, output,
    std and key columns hold this first call's (checked here); the launch reads each call's own from its
    arguments."""
    ly = Layer(w, std, key, row0)
    dtype = _check([ly])
    tab, tile_map, tiles = _table([ly], [out])
    # CONTIG but for the weight's and output's addresses (their strides are in `k`, their addresses are not)
    contig = all(v.stride(1) == 1 and (v.stride(0) == w.shape[1] or w.shape[0] == 1) for v in (w, out))
    dev = _prebound_device(w)
    hit = (tab, tile_map, tiles, dtype, _KIND[dtype], w.shape[1] % 8 == 0, contig, dev, tab.data_ptr(),
           tile_map.data_ptr())
    return _remember(_ONE, k, hit, limit=4096)


def noisy_copy_(w: torch.Tensor, std: torch.Tensor, key: int, row0: int, out: torch.Tensor) -> None:
    """out <- round(w + std[:, None] * z(key, (row0 + i) * n + j)) for logical (m, n) views w and out.

    Forward mode calls this for every layer in forward and again in backward, with a new (std, key) every
    window and a fresh output each time, so the host time of a call is what it is about. The layer table holds
    only what is fixed for the weight's life (its address, shape, strides, first row and the output's strides)
    and is cached under those; weight, output, std and key travel as kernel arguments (LAYER_ARGS), so a step
    builds no table at all (building and uploading one per layer and window took ~0.1 ms, ~20 ms of a 7B step),
    not even for a weight that is a new tensor at every call (a quantized base's dequantized W, a gathered
    shard: with the weight's address in the table, each of those calls built, uploaded and launched its own
    table through Triton's generic launch); the launch is pre-bound (see above)."""
    k = (tuple(w.shape), w.stride(), w.dtype, w.device, row0, out.stride())
    hit = _ONE.get(k)
    if hit is None:
        hit = _one_layer(k, w, std, key, row0, out)
    elif std.dtype is not torch.float32 or not std.is_contiguous() or not 0 <= key < 1 << 64:
        _check([Layer(w, std, key, row0)])  # raises the one-line error a first call gives
    tab, tile_map, tiles, dtype, kind, aligned, contig, dev, tab_ptr, map_ptr = hit
    if out.dtype != dtype or out.shape != w.shape:
        raise ValueError(f"the output must be a {tuple(w.shape)} {dtype} view, got {tuple(out.shape)} {out.dtype}")
    wptr, optr, sptr = w.data_ptr(), out.data_ptr(), std.data_ptr()
    contig = contig and wptr % 16 == 0 and optr % 16 == 0
    key_ = None
    if dev is not None:
        rt, comp, device, stream = _RUNTIME
        if out.get_device() == dev == device() and std.get_device() == dev and _plain_launch(rt, comp, _noise_kernel):
            key_ = _copy_key(dev, kind, aligned, contig, tab_ptr, map_ptr, wptr, optr, sptr)
            pre = _PREBOUND.get(key_)
            if pre is not None:
                # JITFunction.run's launch, argument for argument (constexprs included, FAST = _fast() as
                # _RUNTIME exists; the launcher skips them); no launch metadata and no hooks, as
                # _plain_launch found none to call.
                hi, lo = _key_halves(key)
                pre[0](tiles, 1, 1, stream(dev), pre[1], pre[2], None, None, None,
                       tab_ptr, map_ptr, tab_ptr, tab_ptr, tab_ptr, 0, tab_ptr, wptr, optr, sptr, hi, lo,
                       COPY, kind, aligned, contig, False, True, BLOCK, 256, True)
                return
    compiled = _launch(tab, tile_map, tiles, dtype, (aligned, contig), COPY, None,
                       layer=(w.view(_BITS[dtype]), out.view(_BITS[dtype]), std, key))
    if key_ is not None:
        entry = _prebind(compiled)
        if entry is not None:
            _PREBOUND[key_] = entry


def noisy_copy(w: torch.Tensor, std: torch.Tensor, key: int, row0: int = 0) -> torch.Tensor:
    """A new (m, n) contiguous tensor round(w + eps), in w's dtype."""
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    noisy_copy_(w, std.float().contiguous(), key, row0, out)
    return out


STATS = 4  # Record.stats: the per-layer counts start 16 bytes in (an aligned pointer for the restore kernel)
# A perturb sizes its record from the last one of the same weights: (entries it needed, its sigma_t).
_CAPACITY: dict[tuple, tuple[int, float | None]] = {}
DEFERRED = True  # False: every perturb checks its record at once (one more host sync a step; benchmarks compare)


# A perturb group's launch table by its static part (device, dtype, per layer: address, shape, strides, first row;
# the group's key): the same weights every step, so a step only writes its std pointers and keys into the host
# rows and uploads them into the same device table (one copy; pageable memory, so the host rows may change as soon
# as the copy is queued). Restore reads the table of its own perturb: the next step's upload is queued after it.
_PERTURB_TABLES: dict[tuple, tuple[list[list[int]], torch.Tensor, torch.Tensor, int, tuple[bool, bool]]] = {}


def _perturb_table(layers: list[Layer], group_key: tuple) -> tuple[torch.Tensor, torch.Tensor, int, tuple[bool, bool]]:
    """(table, tile map, tiles, flags) of a perturb of `layers`, holding this step's std pointers and keys."""
    hit = _PERTURB_TABLES.get(group_key)
    if hit is None:
        rows, counts = _rows(layers)
        return _remember(_PERTURB_TABLES, group_key, (rows, *_upload(rows, counts, layers[0].w.device), _flags(layers)))[1:]
    rows, tab, tile_map, tiles, flags = hit
    for row, ly in zip(rows, layers):
        row[C_STD] = ly.std.data_ptr()
        row[C_KEY] = _signed(ly.key)
    tab.copy_(torch.tensor(rows, dtype=torch.int64), non_blocking=True)
    return tab, tile_map, tiles, flags


def perturb_group(layers: list[Layer], capacity: float | None = None, sigma: float | None = None) -> Record:
    """W <- round(W + eps) for every layer in one launch, with the record that makes `restore_group` exact.

    The record is sized from the last perturb of the same weights: its entries x sigma / its sigma (off
    entries grow about linearly with the noise) x 9/8, at least 1/512 of the elements. Then the perturb is
    *deferred*: nothing waits for the GPU, so the host goes on queueing the forward while the kernel runs
    (a host sync here exposed the row std and the perturb, ~40 ms of a 7B step); the restore's `Outcome`
    reads the record's size. If the estimate was short after all, the tiles that found the record full are
    left clean (no noise this step; restore skips them), the Outcome counts them, and the next perturb of
    those weights is checked at once. A first perturb, an explicit `capacity`, and DEFERRED = False check at
    once: one sync, and the tiles that did not fit are rerun into a larger record (RETRY)."""
    dtype = _check(layers)
    dev = layers[0].w.device
    # the group's weights, not just its shapes: another model of the same shapes has its own off fraction; with
    # the strides and first rows, everything the launch table holds but the step's std pointers and keys
    group_key = (str(dev), dtype, tuple((ly.w.data_ptr(), *ly.w.shape, *ly.w.stride(), ly.row0) for ly in layers))
    tab, tile_map, tiles, flags = _perturb_table(layers, group_key)
    numel = sum(ly.w.numel() for ly in layers)
    last = _CAPACITY.get(group_key)
    deferred = DEFERRED and capacity is None and last is not None
    if capacity is not None:
        cap = int(numel * capacity)
    elif last is not None:  # deferred or not (DEFERRED = False): sized from the last perturb
        used, was = last
        grow = sigma / was if sigma is not None and was else 1.0
        cap = max(int(used * max(grow, 1.0) * 9 / 8), numel // 512)
    else:
        cap = numel // 8
    cap = max(1024, cap)
    rec = Record(torch.zeros(STATS + len(layers), dtype=torch.int32, device=dev),
                 torch.empty((tiles, 3), dtype=torch.int32, device=dev), torch.empty(cap, dtype=_ENT[dtype], device=dev),
                 table=tab, tile_map=tile_map, dtype=dtype, flags=flags, group_key=group_key, sigma=sigma)
    _launch(tab, tile_map, tiles, dtype, flags, PERTURB, rec)
    if deferred:
        rec.used = None
        return rec
    used = int(rec.counter.item())  # one sync: the record's size decides whether a retry is needed
    if used > cap:
        need = int(rec.hcnt[rec.hslot == -1].sum())
        ent = torch.empty(used + need, dtype=rec.ent.dtype, device=dev)
        ent[:cap] = rec.ent
        rec.ent = ent
        _launch(tab, tile_map, tiles, dtype, flags, PERTURB, rec, retry=True)
        used = int(rec.counter.item())
    rec.used = used
    _CAPACITY[group_key] = (used, sigma)
    return rec


class Outcome:
    """What a restore found, on its way to the host: per layer the tiles found modified, and (the same copy)
    the record's size and the tiles its perturb left without noise. On CUDA the copy goes to pinned memory
    behind an event, so a restore never waits for the GPU; `counts()` waits for it (by the next window it has
    long arrived) and then sets `rec.used`, `rec.skipped` and the next perturb's size estimate."""

    def __init__(self, rec: Record):
        self.rec, self._cap = rec, rec.ent.numel()
        vals = rec.stats  # [counter, skipped tiles, -, -, modified tiles per layer]: filled by perturb and restore
        self._event = None
        if vals.is_cuda:
            self._host = torch.empty(vals.shape, dtype=vals.dtype, pin_memory=True)
            self._host.copy_(vals, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = vals
        self._counts: list[int] | None = None

    @property
    def skipped(self) -> int:
        """Tiles the perturb left without noise (read by `counts()`)."""
        return self.rec.skipped

    def ready(self) -> bool:
        """True when `counts()` would not wait."""
        return self._event is None or self._event.query()

    def counts(self) -> list[int]:
        if self._counts is None:
            if self._event is not None:
                self._event.synchronize()
            vals = self._host.tolist()
            needed, skipped, counts = vals[0], vals[1], vals[STATS:]
            rec = self.rec
            # `needed` counts every tile's entries, the failed tiles' too: what the record should have held
            rec.used, rec.skipped = min(needed, self._cap), skipped
            if skipped:
                _CAPACITY.pop(rec.group_key, None)  # the estimate failed: check the next perturb at once
            else:
                _CAPACITY[rec.group_key] = (needed, rec.sigma)
            self._counts = counts
        return self._counts


def restore_group(rec: Record) -> torch.Tensor:
    """Undo the `perturb_group` that made `rec` exactly (its layers, std and keys are in the record's table).
    Returns, per layer, the number of tiles whose weight changed since the perturb (int32, on the device);
    those tiles are left as found."""
    bad = rec.stats[STATS:]  # zeroed by the perturb, which only wrote the counter
    _launch(rec.table, rec.tile_map, rec.header.shape[0], rec.dtype, rec.flags, RESTORE, rec, bad)
    return bad


@dataclass
class StdItem:
    """One layer for `row_std_group`: its logical (m, n) weight view (any strides) and its low-rank term
    scale * B [m, R] @ A [R, n] (None, or R = 0, for none; float32 in the kernel: other dtypes are copied)."""

    w: torch.Tensor
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scale: float = 1.0


# 32 x 64 tiles, 4 stages (ablate.py): 8.9 against 10.8 ms for 32 x 128 with Triton's default stages on the H100,
# 8.2 against 8.6 ms on the H200 (kernel_bench.py); "tf32" was faster still but is not float32-exact
_STD_BM, _STD_BK, _STD_PREC = 32, 64, "tf32x3"


def _f32(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """`x` as a contiguous float32 tensor on `dev`: itself when it is one already (checked without a dispatch)."""
    if x.dtype == torch.float32 and x.device == dev and x.is_contiguous():
        return x
    return x.to(dev, torch.float32).contiguous()


# Row-std launches by what their table holds (device, dtype, per layer: weight address, factor addresses, shape,
# strides, rank, scale): a training step asks for the same weights and factors every time (an optimizer updates
# A and B in place), so the table is built and uploaded once.
_STD_PLANS: dict[tuple, tuple] = {}


def _std_plan(layers: tuple[tuple, ...], dev: torch.device, contiguous: bool) -> tuple:
    """(table, row-block map, row blocks, rows per layer, VEC, RP, ONE) of a row-std launch over `layers`."""
    rows, counts, sizes, blk, row0 = [], [], [], 0, 0
    for w_ptr, pa, pb, m, n, s0, s1, r, scale in layers:
        rows.append([w_ptr, pa, pb, m, n, s0, s1, r, blk, row0, struct.unpack("<q", struct.pack("<d", scale))[0]])
        sizes.append(m)
        blocks = _cdiv(m, _STD_BM)
        counts.append(blocks)
        blk += blocks
        row0 += m
    # (only compiled: the interpreter's tl.multiple_of turns the scalar N into an array that range() refuses,
    # and hints are all VEC adds)
    vec = _fast() and contiguous and all(ly[4] % 8 == 0 for ly in layers)
    r_max = max(ly[7] for ly in layers)
    rp = min(64, max(16, triton.next_power_of_2(r_max)))  # tl.dot needs K >= 16; chunks keep tiles small
    tab = torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)
    return tab, _tile_map(dev, tuple(counts)), blk, sizes, vec, rp, r_max <= rp


def row_std_group(items: list[StdItem], sigma_scale: float) -> list[torch.Tensor]:
    """Filter-noise std of every layer, sigma_scale * ||(W + s B A)_i|| / sqrt(n) as float32 [m] vectors,
    in one launch per (device, weight dtype) (one in practice): the rows of all layers form one grid, and
    each program finds its layer through a row-block -> layer map."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, it in enumerate(items):
        if not supported(it.w) or it.w.dim() != 2:
            raise ValueError(f"row_std_group needs logical (m, n) float16/bfloat16/float32 views, got {it.w.dtype}")
        groups.setdefault((it.w.device, it.w.dtype), []).append(i)
    result: list[torch.Tensor | None] = [None] * len(items)
    for (dev, dtype), idx in groups.items():
        out = torch.empty(sum(items[i].w.shape[0] for i in idx), dtype=torch.float32, device=dev)
        keep = []  # the float32 factors the table points to must outlive the launch
        key = [str(dev), dtype]  # everything the launch table holds: the table of an earlier step is reused
        for i in idx:
            it = items[i]
            w = it.w  # the kernel reads its bits: same address and strides as the bits' view
            m, n = w.shape
            r = 0 if it.a is None else it.a.shape[0]
            if r:
                a, b = _f32(it.a, dev), _f32(it.b, dev)  # themselves for float32 A, B on the device (no copy)
                if a.shape != (r, n) or b.shape != (m, r):
                    raise ValueError(f"A must be [R, n] and B [m, R]; got {tuple(a.shape)}, {tuple(b.shape)} for W {m}x{n}")
                keep += [a, b]
                pa, pb = a.data_ptr(), b.data_ptr()
            else:
                pa = pb = w.data_ptr()  # never read (R = 0)
            key.append((w.data_ptr(), pa, pb, m, n, w.stride(0), w.stride(1), r, float(it.scale)))
        key = tuple(key)
        plan = _STD_PLANS.get(key)
        if plan is None:  # (copied factors move every step: such tables are rebuilt and the cache starts over)
            plan = _remember(_STD_PLANS, key, _std_plan(key[2:], dev, all(_contiguous(items[i].w) for i in idx)))
        tab, tile_map, blk, sizes, vec, rp, one = plan
        for i, part in zip(idx, out.split(sizes)):  # one call for every layer's view of `out`
            result[i] = part
        _rowstd_kernel[(blk,)](tab, tile_map, out, float(sigma_scale),
                               KIND=_KIND[dtype], VEC=vec, BM_=_STD_BM, BK=_STD_BK, RP=rp,
                               ONE=one, PREC=_STD_PREC, num_warps=4, num_stages=4)
    return result
