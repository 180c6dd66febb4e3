"""Where does the in-place perturb's time go, and what would a cheaper noise stream or a tensor-core row std
buy? A development experiment for one GPU call, side by side with torch's copy on a quarter of the 7B group
(1.62 G bf16 elements; rates are per byte, so the whole group scales by 4):

    perturb anatomy (one flat kernel, W <- round(W + eps) in place, the pieces switched on one by one)
      copy        out <- round(W + eps) only                                  (the forward-mode noisy copy)
      count       + replay round(round(W + eps) - eps), off count, one atomic per tile
      count+chk   + the per-tile checksum of the noisy bits
      flatscan    + record by a cumsum over the flat 4096-element tile       (no checksum)
      current     flat cumsum + record + checksum                            (the shipped design)
      twolevel    record by a cumsum over quads, then within the quad        (+ checksum)
      bitmask     a dense 1-bit-per-element off mask instead of a record     (+ checksum)
    noise streams: Philox4x32-10 on 32-bit uniforms (shipped until the 16-bit stream), Philox4x32-7, and
    Philox-10 split into 16-bit uniforms (8 normals per call; the shipped stream since, up to the sign and
    float details of its Box-Muller), each through MUFU Box-Muller; the grouped kernels below are the shipped ones
    row std of W + B A: the shipped kernel (tl.dot) at several tiles, and a per-layer tl.dot variant in
    tf32, tf32x3, ieee and bf16, on 56 real 7B-shaped layers

    python benchmarks/overhead/perturb_sweep.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flatlora.kernels import triton_noise as K  # noqa: E402
from kernel_bench import SHAPES_7B, cuda_ms, provenance, write_results  # noqa: E402
from noise_sweep import _bm32  # noqa: E402  (the 32-bit-word Box-Muller of the stream before 16-bit halves)

VARIANTS = {"copy": 0, "count": 1, "count+chk": 2, "flatscan": 3, "current": 4, "twolevel": 5, "bitmask": 6}
STREAMS = {"philox10": (0, 4), "philox7": (1, 4), "philox10-16bit": (2, 8)}  # (RNG, elements per Philox call)


@triton.jit
def _bm16(a, b, FAST: tl.constexpr):
    """Box-Muller on two 16-bit uniforms (u in (0, 1), never 0)."""
    u1 = (a.to(tl.float32) + 0.5) * (1.0 / 65536.0)
    u2 = (b.to(tl.float32) + 0.5) * (1.0 / 65536.0)
    if FAST:
        r = K._approx(-1.3862943611198906 * K._approx(u1, 0), 3)
        th = 6.283185307179586 * u2 - 3.141592653589793
        return -r * K._approx(th, 2), -r * K._approx(th, 1)
    else:
        r = tl.sqrt(-2.0 * tl.log(u1))
        th = 6.283185307179586 * u2
        return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _z(key, c, RNG: tl.constexpr, L: tl.constexpr, FAST: tl.constexpr):
    """[Q, L] normals for Philox counters c [Q]."""
    if RNG == 2:
        i1, i2, i3, i4 = tl.randint4x(key, c, 10)
        n1, n2 = _bm16(i1 & 0xFFFF, i1 >> 16, FAST)
        n3, n4 = _bm16(i2 & 0xFFFF, i2 >> 16, FAST)
        n5, n6 = _bm16(i3 & 0xFFFF, i3 >> 16, FAST)
        n7, n8 = _bm16(i4 & 0xFFFF, i4 >> 16, FAST)
        z = tl.join(tl.join(tl.join(n1, n5), tl.join(n3, n7)), tl.join(tl.join(n2, n6), tl.join(n4, n8)))
        return tl.reshape(z, (c.shape[0], L))
    else:
        i1, i2, i3, i4 = tl.randint4x(key, c, 10 if RNG == 0 else 7)
        n1, n2 = _bm32(i1, i2, FAST)
        n3, n4 = _bm32(i3, i4, FAST)
        return tl.reshape(tl.join(tl.join(n1, n3), tl.join(n2, n4)), (c.shape[0], L))


@triton.jit
def _perturb_kernel(w_ptr, out_ptr, std_ptr, cnt_ptr, hdr_ptr, roff_ptr, rval_ptr, mask_ptr, NUMEL, N, KEY,
                    VAR: tl.constexpr, RNG: tl.constexpr, L: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    start = t.to(tl.int64) * BLOCK
    q = tl.arange(0, BLOCK // L)
    offs = q[:, None] * L + tl.arange(0, L)[None, :]
    o = start + offs
    msk = o < NUMEL
    bits = tl.load(w_ptr + o, mask=msk, other=0)
    std = tl.load(std_ptr + (start + q * L) // N, mask=start + q * L < NUMEL, other=0.0)[:, None]
    eps = std * _z(KEY, start // L + q, RNG, L, FAST)
    noisy = K._round_bits(K._to_f32(bits, 0) + eps, 0, False)
    if VAR == 0:
        tl.store(out_ptr + o, noisy, mask=msk)
    else:
        replay = K._round_bits(K._to_f32(noisy, 0) - eps, 0, False)  # integer rounding, as when its JSON was measured
        offi = ((replay != bits) & msk).to(tl.int32)
        if VAR == 3 or VAR == 4:
            off_f = tl.reshape(offi, (BLOCK,))
            count = tl.sum(off_f, axis=0)
            slot = tl.atomic_add(cnt_ptr, count)
            pos = slot + tl.cumsum(off_f, axis=0) - 1
            sel = off_f != 0
            tl.store(roff_ptr + pos, tl.arange(0, BLOCK).to(tl.int16), mask=sel)
            tl.store(rval_ptr + pos, tl.reshape(bits, (BLOCK,)), mask=sel)
        elif VAR == 5:
            qc = tl.sum(offi, axis=1)
            count = tl.sum(qc, axis=0)
            slot = tl.atomic_add(cnt_ptr, count)
            pos = slot + (tl.cumsum(qc, axis=0) - qc)[:, None] + (tl.cumsum(offi, axis=1) - offi)
            sel = offi != 0
            tl.store(roff_ptr + pos, offs.to(tl.int16), mask=sel)
            tl.store(rval_ptr + pos, bits, mask=sel)
        elif VAR == 6:
            words = tl.sum(tl.reshape(offi, (BLOCK // 32, 32)) << tl.arange(0, 32)[None, :], axis=1)
            tl.store(mask_ptr + t.to(tl.int64) * (BLOCK // 32) + tl.arange(0, BLOCK // 32), words)
            count = tl.sum(tl.sum(offi, axis=1), axis=0)
            slot = tl.atomic_add(cnt_ptr, count)
        else:
            count = tl.sum(tl.sum(offi, axis=1), axis=0)
            slot = tl.atomic_add(cnt_ptr, count)
        tl.store(w_ptr + o, noisy, mask=msk)
        tl.store(hdr_ptr + t * 3, slot)
        tl.store(hdr_ptr + t * 3 + 1, count)
        if VAR == 2 or VAR >= 4:
            # the position-weighted checksum the shipped kernel had when this sweep's JSON was measured
            v = (tl.where(msk, noisy, 0).to(tl.int32) ^ (offs * 40503)) * (offs * 2 + 1)
            tl.store(hdr_ptr + t * 3 + 2, tl.sum(tl.sum(v, axis=1), axis=0))


@triton.jit
def _rowstd_dot(w_ptr, a_ptr, b_ptr, out_ptr, M, N, R, SCALE,
                BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr):
    t = tl.program_id(0)
    rows = t * BM + tl.arange(0, BM)
    rmask = rows < M
    rr = tl.arange(0, RP)
    b = tl.load(b_ptr + rows[:, None] * R + rr[None, :], mask=rmask[:, None] & (rr[None, :] < R), other=0.0)
    if PREC == "bf16":
        b = b.to(tl.bfloat16)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for k in range(0, N, BK):
        cols = k + tl.arange(0, BK)
        cm = cols < N
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=rmask[:, None] & cm[None, :], other=0)
        a = tl.load(a_ptr + rr[:, None] * N + cols[None, :], mask=(rr[:, None] < R) & cm[None, :], other=0.0)
        if PREC == "bf16":
            ba = tl.dot(b, a.to(tl.bfloat16), out_dtype=tl.float32)
        else:
            ba = tl.dot(b, a, input_precision=PREC)
        merged = K._to_f32(w, 0) + ba
        acc += merged * merged
    std = tl.sqrt(tl.sum(acc, axis=1)) * (SCALE / tl.sqrt(N.to(tl.float32)))
    tl.store(out_ptr + rows, std, mask=rmask)


def perturb_rows(numel, n, reps, quick, fast, dev):
    w = torch.empty(numel, dtype=torch.bfloat16, device=dev).normal_(0, 0.02)
    out = torch.empty_like(w)
    std = torch.full((numel // n,), 0.02 * 0.05, device=dev)
    wb, ob = w.view(torch.int16), out.view(torch.int16)
    ms_copy = cuda_ms(lambda: out.copy_(w), reps)
    rows = [{"what": "torch copy", "ms": ms_copy, "frac_of_copy": 1.0}]
    print(f"torch copy: {ms_copy:.3f} ms  {4 * numel / ms_copy / 1e6:.0f} GB/s  ({numel / 1e9:.2f} G bf16)", flush=True)
    cap = numel // 8
    cnt = torch.zeros(1, dtype=torch.int32, device=dev)
    roff = torch.empty(cap, dtype=torch.int16, device=dev)
    rval = torch.empty(cap, dtype=torch.int16, device=dev)
    bitmask = torch.empty(triton.cdiv(numel, 2048) * 256, dtype=torch.int32, device=dev)  # room for the smallest block
    configs = [(v, s) for v in VARIANTS for s in ("philox10",)] + [(v, s) for v in ("copy", "twolevel")
                                                                  for s in ("philox7", "philox10-16bit")]
    shapes = ((4096, 4), (4096, 8), (2048, 4)) if not quick else ((4096, 4),)
    for var, stream in configs:
        rng, lanes = STREAMS[stream]
        for block, warps in shapes:
            tiles = triton.cdiv(numel, block)
            hdr = torch.empty((tiles, 3), dtype=torch.int32, device=dev)

            def go():
                cnt.zero_()
                _perturb_kernel[(tiles,)](wb, ob, std, cnt, hdr, roff, rval, bitmask, numel, n, 1234,
                                          VAR=VARIANTS[var], RNG=rng, L=lanes, FAST=fast, BLOCK=block, num_warps=warps)
            try:
                ms = cuda_ms(go, reps)
            except Exception as e:  # an experiment: report and go on
                print(f"  {var:<10} {stream:<15} block {block} warps {warps}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            used = int(cnt.item())
            rows.append({"what": "perturb", "variant": var, "stream": stream, "block": block, "warps": warps, "ms": ms,
                         "frac_of_copy": ms_copy / ms, "off_fraction": used / numel})
            print(f"  {var:<10} {stream:<15} block {block:5d} warps {warps}: {ms:8.3f} ms  {ms_copy / ms:6.1%} of copy"
                  f"  off {used / numel:.2%}", flush=True)
    return rows


def grouped_rows(shapes, reps, dev):
    """The shipped grouped kernels on real layers, for the flat variants' scale."""
    ws = [(torch.randn(s, device=dev) * 0.02).to(torch.bfloat16) for s in shapes]
    numel = sum(x.numel() for x in ws)
    src = torch.empty(numel, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    ms_copy = cuda_ms(lambda: dst.copy_(src), reps)
    del src, dst
    items = [K.StdItem(x, torch.randn(8, x.shape[1], device=dev) * 0.01, torch.randn(x.shape[0], 8, device=dev) * 1e-3)
             for x in ws]
    stds = K.row_std_group(items, 0.05)
    layers = [K.Layer(x, s, 1000 + i) for i, (x, s) in enumerate(zip(ws, stds))]
    outs = [torch.empty_like(x) for x in ws]
    rows = []

    def pr():
        K.restore_group(K.perturb_group(layers))

    for name, fn, nbytes in (("grouped noisy_copy", lambda: K.noisy_copy_group(layers, outs), 4 * numel),
                             ("grouped perturb+restore", pr, 8 * numel),
                             ("grouped row_std (shipped)", lambda: K.row_std_group(items, 0.05), 2 * numel)):
        ms = cuda_ms(fn, reps)
        frac = nbytes / ms / (4 * numel / ms_copy)
        rows.append({"what": name, "ms": ms, "frac_of_copy": frac})
        print(f"  {name:<28} {ms:8.3f} ms  {frac:6.1%} of copy bandwidth", flush=True)
    del outs
    for bm, bk in ((16, 128), (32, 64), (32, 128), (64, 64)):
        K._STD_BM, K._STD_BK = bm, bk
        ms = cuda_ms(lambda: K.row_std_group(items, 0.05), reps)
        frac = 2 * numel / ms / (4 * numel / ms_copy)
        rows.append({"what": "row_std shipped", "bm": bm, "bk": bk, "ms": ms, "frac_of_copy": frac})
        print(f"  row_std shipped BM {bm:3d} BK {bk:4d}: {ms:8.3f} ms  {frac:6.1%} of copy bandwidth", flush=True)
    K._STD_BM, K._STD_BK = 32, 128
    ref = [s.clone() for s in stds]
    outs = [torch.empty(x.shape[0], device=dev) for x in ws]
    for prec, bm, bk, warps in (("tf32", 32, 128, 4), ("tf32x3", 32, 128, 4), ("ieee", 32, 128, 4), ("bf16", 32, 128, 4),
                                ("tf32x3", 32, 128, 8), ("tf32x3", 32, 256, 8)):
        def dot():
            for it, o in zip(items, outs):
                m, nn = it.w.shape
                _rowstd_dot[(triton.cdiv(m, bm),)](it.w.view(torch.int16), it.a, it.b, o, m, nn, 8, 0.05,
                                                   BM=bm, BK=bk, RP=16, PREC=prec, num_warps=warps)
        try:
            ms = cuda_ms(dot, reps)
        except Exception as e:
            print(f"  row_std dot {prec} BM {bm} BK {bk}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        err = max(float(((o - r).abs() / r).max()) for o, r in zip(outs, ref))
        frac = 2 * numel / ms / (4 * numel / ms_copy)
        rows.append({"what": "row_std dot", "prec": prec, "bm": bm, "bk": bk, "warps": warps, "ms": ms,
                     "frac_of_copy": frac, "max_rel_err_vs_shipped": err})
        print(f"  row_std dot {prec:<6} BM {bm:3d} BK {bk:4d} w{warps}: {ms:8.3f} ms  {frac:6.1%} of copy"
              f"  max rel err {err:.1e}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--quick", action="store_true", help="fewer tile shapes; small sizes off the GPU")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--part", choices=("all", "perturb", "grouped"), default="all")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fast = dev == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
    numel, n = (6_476_005_376 // 4, 4096) if dev == "cuda" else (3 * 8192 + 256, 256)
    shapes = SHAPES_7B * 8 if dev == "cuda" else [(64, 256), (32, 512)]
    info = provenance()
    rows = perturb_rows(numel, n, args.reps, args.quick, fast, dev) if args.part in ("all", "perturb") else []
    rows += grouped_rows(shapes, args.reps, dev) if args.part in ("all", "grouped") else []
    write_results(args.out, "perturb-sweep", info, rows)


if __name__ == "__main__":
    main()
