"""Triton kernels for Flat-LoRA noise: fused row norms, in-place perturb with an exact-restore record,
restore, and the forward-mode noisy copy. Noise is `philox.py`'s stream: z(key, i * n + j) from one
`randn4x` call per 4 consecutive elements, so a tile of rows needs nothing but (key, global row, column).

One elementwise kernel serves three modes over [BM, BN] tiles of a logical (m, n) weight (any strides):

    PERTURB  W <- round(W + eps); entries where round(round(W + eps) - eps) != W are appended to a record
    RESTORE  W <- round(W - eps), then the recorded entries get their original bits back (exact)
    COPY     out <- round(W + eps)                       (forward mode; W is only read)

with eps = std[row] * z in float32 and round = round-to-nearest-even into W's dtype, done on the bits
(bf16 by integer arithmetic, so the result is the same on a GPU and in TRITON_INTERPRET=1).

The record is per tile: a header (slot, count) and, for each off entry, its in-tile offset (int16) and
its original bits (int16 for bf16/fp16, int32 for fp32): 4 bytes per entry for 16-bit weights. Tiles
append with one atomic add on a shared counter; a tile whose entries would not fit leaves W untouched
and marks its header slot -1, and the host reruns just those tiles into a larger buffer (RETRY).

A launch covers one layer, or many (same dtype) through a table of pointers and sizes: one launch per
dtype group instead of one per layer (`perturb_group` / `restore_group`), for launch-bound small models.
`row_std_group` likewise computes the filter-noise std of many layers in one launch, from the merged
rows W_i + B_i A built tile by tile (no cancellation-prone expansion of ||W + BA||^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

PERTURB, RESTORE, COPY = 0, 1, 2
BM, BN = 8, 1024  # tile: 8192 elements, in-tile offsets fit int16
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
# Table columns for grouped launches (int64 each).
_W, _OUT, _STD, _M, _N, _ROW0, _KEY, _SR, _SC, _TILE0, _TILES_N, _OSR, _OSC = range(13)
_COLS = 13


@triton.jit
def _to_f32(bits, KIND: tl.constexpr):
    if KIND == 0:  # bfloat16
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 1:  # float16
        return bits.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_bits(x, KIND: tl.constexpr):
    """float32 -> bits of the nearest (ties to even) value in the storage dtype."""
    if KIND == 0:
        b = x.to(tl.int32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, (b >> 16) | 0x40, r)  # keep NaN a NaN
        return r.to(tl.int16)
    elif KIND == 1:
        return x.to(tl.float16).to(tl.int16, bitcast=True)
    else:
        return x.to(tl.int32, bitcast=True)


@triton.jit
def _normals(key, grow, col0, n, BM_: tl.constexpr, BN_: tl.constexpr, ALIGNED: tl.constexpr):
    """z(key, grow * n + col0 + c), c < BN, for a [BM, BN] tile; ALIGNED (n, col0 multiples of 4): one
    Philox call per 4 elements, else one per element (lanes picked from its group's 4)."""
    if ALIGNED:
        c = (grow.to(tl.int64)[:, None] * n + col0) // 4 + tl.arange(0, BN_ // 4)[None, :]
        n1, n2, n3, n4 = tl.randn4x(key, c)
        z = tl.join(tl.join(n1, n3), tl.join(n2, n4))
        return tl.reshape(z, (BM_, BN_))
    else:
        o = grow.to(tl.int64)[:, None] * n + (col0 + tl.arange(0, BN_).to(tl.int64))[None, :]
        n1, n2, n3, n4 = tl.randn4x(key, o >> 2)
        lane = o & 3
        return tl.where(lane == 0, n1, tl.where(lane == 1, n2, tl.where(lane == 2, n3, n4)))


@triton.jit
def _noise_kernel(
    w_ptr, out_ptr, std_ptr, M, N, ROW0, KEY, SR, SC, OSR, OSC,  # one layer (unused when GROUPED)
    tab_ptr, L,  # table of layers (GROUPED)
    cnt_ptr, hslot_ptr, hcnt_ptr, roff_ptr, rval_ptr, CAP,  # record (PERTURB / RESTORE)
    MODE: tl.constexpr, KIND: tl.constexpr, GROUPED: tl.constexpr, ALIGNED: tl.constexpr, RETRY: tl.constexpr,
    BM_: tl.constexpr, BN_: tl.constexpr, PB: tl.constexpr,
):
    t = tl.program_id(0)
    BITS: tl.constexpr = tl.int16 if KIND < 2 else tl.int32
    if GROUPED:
        layer = t * 0
        for q in range(1, L):
            layer += (t >= tl.load(tab_ptr + q * 13 + 9)).to(layer.dtype)
        row = tab_ptr + layer * 13
        w_ptr = tl.load(row + 0).to(tl.pointer_type(BITS))
        out_ptr = tl.load(row + 1).to(tl.pointer_type(BITS))
        std_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        M = tl.load(row + 3)
        N = tl.load(row + 4)
        ROW0 = tl.load(row + 5)
        KEY = tl.load(row + 6)
        SR = tl.load(row + 7)
        SC = tl.load(row + 8)
        tile0 = tl.load(row + 9)
        tiles_n = tl.load(row + 10)
        OSR = tl.load(row + 11)
        OSC = tl.load(row + 12)
    else:
        tile0 = 0
        tiles_n = tl.cdiv(N, BN_)
    tloc = t - tile0
    tr = tloc // tiles_n
    tc = tloc % tiles_n
    rows = tr * BM_ + tl.arange(0, BM_)
    cols = tc * BN_ + tl.arange(0, BN_)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    ptrs = w_ptr + rows64[:, None] * SR + cols64[None, :] * SC
    bits = tl.load(ptrs, mask=mask, other=0)
    std = tl.load(std_ptr + rows, mask=rows < M, other=0.0)
    eps = std[:, None] * _normals(KEY, ROW0 + rows64, tc.to(tl.int64) * BN_, N, BM_, BN_, ALIGNED)
    x = _to_f32(bits, KIND)
    if MODE == 2:  # COPY
        optrs = out_ptr + rows64[:, None] * OSR + cols64[None, :] * OSC
        tl.store(optrs, _round_bits(x + eps, KIND), mask=mask)
    elif MODE == 0:  # PERTURB
        noisy = _round_bits(x + eps, KIND)
        replay = _round_bits(_to_f32(noisy, KIND) - eps, KIND)
        off = (replay != bits) & mask
        off_f = tl.reshape(off, (BM_ * BN_,)).to(tl.int32)
        count = tl.sum(off_f, axis=0)
        if RETRY:
            active = tl.load(hslot_ptr + t) == -1
        else:
            active = count >= 0
        slot = tl.atomic_add(cnt_ptr, count * active.to(tl.int32))
        ok = active & (slot + count <= CAP)
        ok_i = ok.to(tl.int32)  # broadcast as int: the interpreter rejects scalar-bool & tensor-bool masks
        tl.store(ptrs, noisy, mask=mask & ((off.to(tl.int32) * 0 + ok_i) != 0))
        pos = slot + tl.cumsum(off_f, axis=0) - 1
        sel = (off_f * ok_i) != 0
        tl.store(roff_ptr + pos, tl.arange(0, BM_ * BN_).to(tl.int16), mask=sel)
        tl.store(rval_ptr + pos, tl.reshape(bits, (BM_ * BN_,)), mask=sel)
        tl.store(hcnt_ptr + t, count, mask=active)
        tl.store(hslot_ptr + t, tl.where(ok, slot, -1), mask=active)
    else:  # RESTORE
        tl.store(ptrs, _round_bits(x - eps, KIND), mask=mask)
        tl.debug_barrier()  # the patches below overwrite some of the values just stored
        slot = tl.load(hslot_ptr + t)
        count = tl.load(hcnt_ptr + t)
        for s in range(0, count, PB):
            idx = s + tl.arange(0, PB)
            pm = idx < count
            o = tl.load(roff_ptr + slot + idx, mask=pm, other=0).to(tl.int32)
            v = tl.load(rval_ptr + slot + idx, mask=pm, other=0)
            pr = (tr * BM_ + o // BN_).to(tl.int64)
            pc = (tc * BN_ + o % BN_).to(tl.int64)
            tl.store(w_ptr + pr * SR + pc * SC, v, mask=pm)


@triton.jit
def _rownorm_kernel(w_ptr, a_ptr, sq_ptr, wa_ptr, M, N, SR, SC, R,
                    KIND: tl.constexpr, HAS_A: tl.constexpr, RP: tl.constexpr, BM_: tl.constexpr, BK: tl.constexpr):
    """sq[i] = ||W_i||^2 and wa[i, :] = W_i A^T in one pass over W (float32 accumulation)."""
    pid = tl.program_id(0)
    rows = pid * BM_ + tl.arange(0, BM_)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BM_,), dtype=tl.float32)
    accw = tl.zeros((BM_, RP), dtype=tl.float32)
    ranks = tl.arange(0, RP)
    for k in range(0, N, BK):
        cols = k + tl.arange(0, BK)
        cm = cols < N
        bits = tl.load(w_ptr + rows64[:, None] * SR + cols.to(tl.int64)[None, :] * SC, mask=rmask[:, None] & cm[None, :], other=0)
        w = _to_f32(bits, KIND)
        acc += tl.sum(w * w, axis=1)
        if HAS_A:
            a = tl.load(a_ptr + ranks[None, :] * N + cols[:, None], mask=cm[:, None] & (ranks < R)[None, :], other=0.0)
            accw += tl.dot(w, a, input_precision="ieee")
    tl.store(sq_ptr + rows, acc, mask=rmask)
    if HAS_A:
        tl.store(wa_ptr + rows64[:, None] * R + ranks[None, :], accw, mask=rmask[:, None] & (ranks < R)[None, :])


@triton.jit
def _rowstd_kernel(tab_ptr, L, out_ptr, SCALE,
                   KIND: tl.constexpr, BM_: tl.constexpr, BK: tl.constexpr, RK: tl.constexpr):
    """out[OUT0 + i] = SCALE * ||W_i + B_i A|| / sqrt(N) for the BM rows of one layer of the table.

    The merged row is built tile by tile over N (W tile + B[rows, k-chunk] @ A[k-chunk, cols], float32)
    and its squares summed: no ||W||^2 + 2<WA^T, B> + ... expansion, so no cancellation."""
    t = tl.program_id(0)
    layer = t * 0
    for q in range(1, L):
        layer += (t >= tl.load(tab_ptr + q * 10 + 8)).to(layer.dtype)
    row = tab_ptr + layer * 10
    BITS: tl.constexpr = tl.int16 if KIND < 2 else tl.int32
    w_ptr = tl.load(row + 0).to(tl.pointer_type(BITS))
    a_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    b_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    M = tl.load(row + 3)
    N = tl.load(row + 4)
    SR = tl.load(row + 5)
    SC = tl.load(row + 6)
    R = tl.load(row + 7)
    blk0 = tl.load(row + 8)
    out0 = tl.load(row + 9)
    rows = (t - blk0) * BM_ + tl.arange(0, BM_)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    ranks = tl.arange(0, RK)
    acc = tl.zeros((BM_,), dtype=tl.float32)
    for k in range(0, N, BK):
        cols = k + tl.arange(0, BK)
        cm = cols < N
        cols64 = cols.to(tl.int64)
        bits = tl.load(w_ptr + rows64[:, None] * SR + cols64[None, :] * SC, mask=rmask[:, None] & cm[None, :], other=0)
        merged = _to_f32(bits, KIND)
        for r0 in range(0, R, RK):  # R = 0: no low-rank term, the loop does not run
            rk = r0 + ranks
            km = rk < R
            b = tl.load(b_ptr + rows64[:, None] * R + rk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
            a = tl.load(a_ptr + rk.to(tl.int64)[:, None] * N + cols64[None, :], mask=km[:, None] & cm[None, :], other=0.0)
            merged += tl.dot(b, a, input_precision="ieee")
        acc += tl.sum(merged * merged, axis=1)
    std = tl.sqrt(acc) * (SCALE / tl.sqrt(N.to(tl.float32)))
    tl.store(out_ptr + out0 + rows64, std, mask=rmask)


# ---------------------------------------------------------------------------------------------- host side

def supported(w: torch.Tensor) -> bool:
    """True when the kernels handle this weight (dense float16/bfloat16/float32)."""
    return w.dtype in _BITS and w.layout == torch.strided


def _aligned(n: int) -> bool:
    return n % 4 == 0


def row_norm_parts(w: torch.Tensor, a: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(||W_i||^2 [m], W A^T [m, r]) for a logical (m, n) view `w` (any strides) and A [r, n] float32."""
    m, n = w.shape
    sq = torch.empty(m, dtype=torch.float32, device=w.device)
    r = 0 if a is None else a.shape[0]
    wa = torch.empty((m, max(r, 1)), dtype=torch.float32, device=w.device)
    a_ = a.float().contiguous() if a is not None else sq
    rp = max(16, triton.next_power_of_2(max(r, 1)))
    wb = w.view(_BITS[w.dtype])
    bm = 16
    _rownorm_kernel[(triton.cdiv(m, bm),)](wb, a_, sq, wa, m, n, wb.stride(0), wb.stride(1), r,
                                          KIND=_KIND[w.dtype], HAS_A=a is not None, RP=rp, BM_=bm, BK=128)
    return sq, (wa if a is not None else None)


def _tiles(m: int, n: int) -> int:
    return triton.cdiv(m, BM) * triton.cdiv(n, BN)


def noisy_copy_(w: torch.Tensor, std: torch.Tensor, key: int, row0: int, out: torch.Tensor) -> None:
    """out <- round(w + std[:, None] * z(key, (row0 + i) * n + j)) for logical (m, n) views w and out."""
    m, n = w.shape
    wb, ob = w.view(_BITS[w.dtype]), out.view(_BITS[w.dtype])
    dummy = std
    _noise_kernel[(_tiles(m, n),)](
        wb, ob, std, m, n, row0, key, wb.stride(0), wb.stride(1), ob.stride(0), ob.stride(1),
        dummy, 1, dummy, dummy, dummy, dummy, dummy, 0,
        MODE=COPY, KIND=_KIND[w.dtype], GROUPED=False, ALIGNED=_aligned(n), RETRY=False, BM_=BM, BN_=BN, PB=256)


def noisy_copy(w: torch.Tensor, std: torch.Tensor, key: int, row0: int = 0) -> torch.Tensor:
    """A new (m, n) contiguous tensor round(w + eps), in w's dtype."""
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    noisy_copy_(w, std.float().contiguous(), key, row0, out)
    return out


@dataclass
class Record:
    """What an in-place perturb of one launch needs to be undone exactly (see the module docstring)."""

    counter: torch.Tensor  # int32 [1]: entries used (holes of failed tiles included)
    hslot: torch.Tensor  # int32 [tiles]
    hcnt: torch.Tensor  # int32 [tiles]
    off: torch.Tensor  # int16 [cap]
    val: torch.Tensor  # int16 / int32 [cap]

    @property
    def entries(self) -> int:
        return int(self.hcnt.sum())

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.counter, self.hslot, self.hcnt, self.off, self.val))


@dataclass
class Layer:
    """One weight in a launch: its logical (m, n) view, per-row std, key and first global row."""

    w: torch.Tensor
    std: torch.Tensor
    key: int
    row0: int = 0


def _table(layers: list[Layer], outs: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
    rows, tile0 = [], 0
    for i, ly in enumerate(layers):
        m, n = ly.w.shape
        o = ly.w if outs is None else outs[i]
        rows.append([ly.w.data_ptr(), o.data_ptr(), ly.std.data_ptr(), m, n, ly.row0, ly.key,
                     ly.w.stride(0), ly.w.stride(1), tile0, triton.cdiv(n, BN), o.stride(0), o.stride(1)])
        tile0 += _tiles(m, n)
    return torch.tensor(rows, dtype=torch.int64).to(layers[0].w.device), tile0


def _launch(layers: list[Layer], mode: int, rec: Record | None, retry: bool = False) -> None:
    w0 = layers[0].w
    kind = _KIND[w0.dtype]
    for ly in layers:
        if ly.w.dtype != w0.dtype:
            raise ValueError("a grouped launch needs one dtype; group layers by dtype")
        if ly.std.dtype != torch.float32 or not ly.std.is_contiguous():
            raise ValueError("std must be a contiguous float32 vector")
    aligned = all(_aligned(ly.w.shape[1]) for ly in layers)
    tab, tiles = _table(layers)
    wb = w0.view(_BITS[w0.dtype])
    _noise_kernel[(tiles,)](
        wb, wb, layers[0].std, 0, 0, 0, 0, 0, 0, 0, 0,
        tab, len(layers),
        rec.counter, rec.hslot, rec.hcnt, rec.off, rec.val, rec.off.numel(),
        MODE=mode, KIND=kind, GROUPED=True, ALIGNED=aligned, RETRY=retry, BM_=BM, BN_=BN, PB=256)


def perturb_group(layers: list[Layer], capacity: float = 0.125) -> Record:
    """W <- round(W + eps) for every layer (one launch; one more if the record overflowed), with the
    record that makes `restore_group` exact. `capacity` is the first guess of the off fraction."""
    w0 = layers[0].w
    dev = w0.device
    tiles = sum(_tiles(*ly.w.shape) for ly in layers)
    numel = sum(ly.w.numel() for ly in layers)
    cap = max(1024, int(numel * capacity))
    rec = Record(torch.zeros(1, dtype=torch.int32, device=dev), torch.empty(tiles, dtype=torch.int32, device=dev),
                 torch.empty(tiles, dtype=torch.int32, device=dev), torch.empty(cap, dtype=torch.int16, device=dev),
                 torch.empty(cap, dtype=_BITS[w0.dtype], device=dev))
    _launch(layers, PERTURB, rec)
    used = int(rec.counter.item())  # one sync: the record's size decides whether a retry is needed
    if used > cap:
        failed = rec.hslot == -1
        need = int(rec.hcnt[failed].sum())
        size = used + need
        off = torch.empty(size, dtype=torch.int16, device=dev)
        val = torch.empty(size, dtype=rec.val.dtype, device=dev)
        off[:cap], val[:cap] = rec.off, rec.val
        rec.off, rec.val = off, val
        _launch(layers, PERTURB, rec, retry=True)
        used = int(rec.counter.item())
    # Keep only what was used: the persistent record is entries x (2 + itemsize) bytes + 8 per tile.
    rec.off, rec.val = rec.off[:used].clone(), rec.val[:used].clone()
    return rec


def restore_group(layers: list[Layer], rec: Record) -> None:
    """Undo `perturb_group(layers)` exactly (same layers, same std and keys)."""
    _launch(layers, RESTORE, rec)


@dataclass
class StdItem:
    """One layer for `row_std_group`: its logical (m, n) weight view (any strides) and its low-rank term
    B_cat [m, R] @ A_cat [R, n] (float32, scalings folded into B; None, or R = 0, for none)."""

    w: torch.Tensor
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None


_STD_BM, _STD_BK, _STD_RK = 16, 128, 16


def row_std_group(items: list[StdItem], sigma_scale: float) -> list[torch.Tensor]:
    """Filter-noise std of every layer, sigma_scale * ||(W + B A)_i|| / sqrt(n) as float32 [m] vectors,
    in one launch per (device, weight dtype) (one in practice): the rows of all layers form one grid,
    and each program finds its layer in a table of pointers and sizes (as in `_table`)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, it in enumerate(items):
        if not supported(it.w) or it.w.dim() != 2:
            raise ValueError(f"row_std_group needs logical (m, n) float16/bfloat16/float32 views, got {it.w.dtype}")
        groups.setdefault((it.w.device, it.w.dtype), []).append(i)
    result: list[torch.Tensor | None] = [None] * len(items)
    for (dev, dtype), idx in groups.items():
        out = torch.empty(sum(items[i].w.shape[0] for i in idx), dtype=torch.float32, device=dev)
        keep = []  # the float32 factors the table points to must outlive the launch
        rows, blk, row0 = [], 0, 0
        for i in idx:
            it = items[i]
            m, n = it.w.shape
            r = 0 if it.a is None else it.a.shape[0]
            if r:
                a = it.a.to(dev, torch.float32).contiguous()
                b = it.b.to(dev, torch.float32).contiguous()
                if a.shape != (r, n) or b.shape != (m, r):
                    raise ValueError(f"A must be [R, n] and B [m, R]; got {tuple(a.shape)}, {tuple(b.shape)} for W {m}x{n}")
                keep += [a, b]
                pa, pb = a.data_ptr(), b.data_ptr()
            else:
                pa = pb = out.data_ptr()  # never read (R = 0)
            wb = it.w.view(_BITS[dtype])
            rows.append([wb.data_ptr(), pa, pb, m, n, wb.stride(0), wb.stride(1), r, blk, row0])
            result[i] = out[row0:row0 + m]
            blk += triton.cdiv(m, _STD_BM)
            row0 += m
        tab = torch.tensor(rows, dtype=torch.int64).to(dev)
        _rowstd_kernel[(blk,)](tab, len(rows), out, float(sigma_scale),
                               KIND=_KIND[dtype], BM_=_STD_BM, BK=_STD_BK, RK=_STD_RK)
    return result
