"""Where the in-place perturb's and restore's time goes: the shipped kernels with one piece taken out at a time.

    python benchmarks/overhead/ablate.py --out $OUT [--only layer|group] [--variants shipped,no-atomic,...]

The noisy copy (forward mode) moves the same bytes as perturb and restore and draws the same noise, yet on the
H200 the perturb took 3.2x and the restore 1.25x its time (kernels-nvidia-h200-group.json, 2026-12-02). This
script reads src/flatlora/kernels/triton_noise.py, applies each variant's text substitutions to it (every one must
match exactly once, so a variant that no longer fits the kernel fails loudly instead of timing the shipped code),
loads the result as its own module and times perturb_group / restore_group / noisy_copy_group on the same
weights, side by side in one process. The variants compute wrong records (that is the point): only their times
mean anything. Every perturb runs with an explicit record capacity of 13 % of the elements (no retry at σ 0.05,
where ~5 % of the entries are off; "no-atomic" gives each 2 048-element tile a fixed 256-entry region instead).
`rowstd` (in --variants) also times the row-std kernel over tile shapes, warps, pipelining stages and the dot's
precision (ROWSTD_CONFIGS; the shipped one first, the others' largest relative difference from it reported).
Writes ablate-<device>.json with the provenance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import SHAPES_7B, build, copy_gbps, cuda_ms, load_module, provenance, write_results  # noqa: E402

KERNELS = Path(__file__).resolve().parents[2] / "src" / "flatlora" / "kernels" / "triton_noise.py"

# name -> [(text in triton_noise.py, replacement)]
PERTURB_ATOMIC = ("slot = tl.atomic_add(cnt_ptr, count * active.to(tl.int32))", "slot = t * (BLOCK_ // 8)")
PERTURB_SCAN = ("pos = slot + (tl.cumsum(qc, axis=0) - qc)[:, None] + (tl.cumsum(offi, axis=1) - offi)",
                "pos = slot + (tl.cumsum(offi, axis=1) - offi)")  # in-register part only: entries collide
PERTURB_STORES = ("        tl.store(rent_ptr + pos, ent, mask=sel)\n", "")
PERTURB_CHECKSUM = ("chk = _checksum(tl.where(mask, noisy, 0), q)", "chk = count")
PERTURB_WAIT = ("tl.store(ptrs, noisy, mask=mask & ((offs * 0 + ok_i) != 0))", "tl.store(ptrs, noisy, mask=mask)")
# The same record with 64 counters instead of one (tile t appends to region t % 64 of the record, each 1/64 of its
# capacity): what is left of the atomic's cost when its same-address contention is gone. A real design, not an
# ablation (the record stays exact while no region overflows), timed here before it is adopted.
REGIONS = [("slot = tl.atomic_add(cnt_ptr, count * active.to(tl.int32))",
            "slot = tl.atomic_add(cnt_ptr + t % 64, count * active.to(tl.int32)) + (t % 64) * (CAP // 64)"),
           ("ok = active & (slot + count <= CAP)", "ok = active & (slot + count <= (t % 64 + 1) * (CAP // 64))"),
           ("STATS = 4  #", "STATS = 64  #"), ("self.counter = self.stats[:1]", "self.counter = self.stats[:64]"),
           ("used = int(rec.counter.item())", "used = int(rec.counter.sum())", 2)]
RESTORE_CHECKSUM = ("good = _checksum(bits, q) == tl.load(hdr_ptr + t * 3 + 2)", "good = slot > -2")
RESTORE_PATCHES = ("for s in range(0, count, PB):", "for s in range(0, count * 0, PB):")
RESTORE_BARRIER = ("        tl.debug_barrier()  # the patches below overwrite some of the values just stored\n", "")

EIGHT_WARPS = ("NUM_WARPS = {PERTURB: 4, RESTORE: 4, COPY: 4}", "NUM_WARPS = {PERTURB: 8, RESTORE: 8, COPY: 4}")

# The record's scattered store as one predicated st.global per element, in the layout the entries already have:
# with Triton 3.9, tl.store of pointers with unknown contiguity makes the coalescing pass re-lay the [Q, 8] tile out
# one element a thread, moving pointers, entries and mask through shared memory (sass_stats.py on sm_90: perturb
# 72.0 -> 60.5 instructions an element, 16 KB -> 32 B of shared memory, 15 -> 7 barriers; Triton 3.6 compiles the
# shipped store without that, and this variant to the same SASS). Exact by construction (the same stores); the
# interpreter has no PTX, so only compiled kernels take the asm (FAST).
SCATTER_FN = '''@triton.jit
def _scatter(ptrs, vals, sel, FAST: tl.constexpr):
    if FAST:
        addr = ptrs.to(tl.int64)
        on = sel.to(tl.int32)
        if vals.dtype == tl.int64:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.global.b64 [$1], $3; mov.b32 $0, 0; }",
                "=r,l,r,l", [addr, on, vals], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.global.b32 [$1], $3; mov.b32 $0, 0; }",
                "=r,l,r,r", [addr, on, vals], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(ptrs, vals, mask=sel)


'''
KERNEL_DEF = '''@triton.jit(do_not_specialize=["key_hi", "key_lo"])
def _noise_kernel('''
RECORD_STORES_ASM = [(KERNEL_DEF, SCATTER_FN + KERNEL_DEF),
                     ("        tl.store(rent_ptr + pos, ent, mask=sel)\n", "        _scatter(rent_ptr + pos, ent, sel, FAST)\n")]

# A perturb variant whose record entries are not all written leaves garbage in-tile offsets behind, and the
# restore's patches would write through them out of bounds: those variants drop the patches too (their restore
# time is then "no-patches"' one).
NO_PATCHES = [RESTORE_PATCHES, RESTORE_BARRIER]
VARIANTS = {
    "shipped": [],
    "no-atomic": [PERTURB_ATOMIC],
    "counter-regions": REGIONS,
    "no-cross-warp-scan": [PERTURB_SCAN] + NO_PATCHES,
    "no-record-stores": [PERTURB_STORES] + NO_PATCHES,
    "no-checksum": [PERTURB_CHECKSUM, RESTORE_CHECKSUM],
    "w-store-not-waiting": [PERTURB_WAIT],
    "no-patches": NO_PATCHES,
    # Launch geometry (real designs, exact): 16 elements a thread hold the perturb at 124-128 registers (4 blocks of
    # 4 warps an SM); 8 a thread, 64-80 (ptxas for sm_90, compiled on CPU).
    "perturb-restore-8-warps": [EIGHT_WARPS],
    "tiles-1024": [("BLOCK = 2048  #", "BLOCK = 1024  #")],
    "tiles-4096-8-warps": [("BLOCK = 2048  #", "BLOCK = 4096  #"), EIGHT_WARPS],
    "regions-8-warps": REGIONS + [EIGHT_WARPS],
    "record-stores-asm": RECORD_STORES_ASM,
    "perturb-bare": [PERTURB_ATOMIC, PERTURB_SCAN, PERTURB_STORES, PERTURB_CHECKSUM, PERTURB_WAIT] + NO_PATCHES,
}


# Row std (both modes, once a window; 27 % of copy on the 7B group): tile shape, warps, pipelining stages and
# the dot's precision of the shipped kernel, as (BM, BK, num_warps, num_stages or None for Triton's default, PREC).
STD_CONSTANTS = '_STD_BM, _STD_BK, _STD_PREC = 32, 64, "tf32x3"'
STD_LAUNCH = "PREC=_STD_PREC, num_warps=4, num_stages=4)"
ROWSTD_CONFIGS = [(32, 64, 4, 4, "tf32x3"), (32, 128, 4, None, "tf32x3"), (16, 128, 4, None, "tf32x3"), (16, 256, 4, None, "tf32x3"),
                  (32, 128, 4, 4, "tf32x3"), (32, 128, 4, 2, "tf32x3"), (32, 256, 8, 3, "tf32x3"),
                  (64, 128, 8, 3, "tf32x3"), (32, 64, 4, 3, "tf32x3"), (32, 128, 4, None, "tf32"),
                  (16, 256, 4, 4, "tf32"), (64, 128, 8, 3, "tf32"), (64, 64, 4, 4, "tf32"),
                  (128, 64, 8, 3, "tf32x3"), (64, 256, 8, 3, "tf32x3"), (32, 256, 4, 3, "tf32x3")]


# The row std's pieces, on the shipped configuration: what the merged row's B @ A costs (no-adapter: ||W_i|| alone,
# the floor of this kernel's loop), the dot accumulating into the W tile (one layout conversion fewer, if Triton
# finds it), and B @ A as float32 FMAs over the rank instead of tl.dot (no tensor cores, no layout conversion).
STD_DOT = "            merged += tl.dot(b, a, input_precision=PREC)\n"
STD_A_LOAD = "            a = tl.load(a_ptr + rk[:, None] * N + cols64[None, :], mask=(rk[:, None] < R) & cm[None, :], other=0.0)\n"
STD_FMA = """            for kk in tl.static_range(RP):
                bk_ = tl.load(b_ptr + rows64 * R + kk, mask=rmask & (kk < R), other=0.0) * bscale
                ak_ = tl.load(a_ptr + kk * N + cols64, mask=cm & (kk < R), other=0.0)
                merged += bk_[:, None] * ak_[None, :]
"""
STD_RP = ("rp = min(64, max(16, triton.next_power_of_2(r_max)))", "rp = min(64, triton.next_power_of_2(max(r_max, 1)))")
ROWSTD_VARIANTS = {
    "rowstd-no-adapter": [(STD_A_LOAD + STD_DOT, "            pass\n")],
    "rowstd-dot-acc": [(STD_DOT, "            merged = tl.dot(b, a, acc=merged, input_precision=PREC)\n")],
    "rowstd-fma": [(STD_A_LOAD + STD_DOT, STD_FMA), STD_RP],
    "rowstd-fma-32x128": [(STD_A_LOAD + STD_DOT, STD_FMA), STD_RP,
                          (STD_CONSTANTS, '_STD_BM, _STD_BK, _STD_PREC = 32, 128, "tf32x3"')],
    "rowstd-fma-16x256": [(STD_A_LOAD + STD_DOT, STD_FMA), STD_RP,
                          (STD_CONSTANTS, '_STD_BM, _STD_BK, _STD_PREC = 16, 256, "tf32x3"')],
}


def rowstd_name(cfg) -> str:
    bm, bk, warps, stages, prec = cfg
    return f"rowstd-{bm}x{bk}-w{warps}-s{stages or 'default'}-{prec}"


def rowstd_subs(cfg) -> list[tuple[str, str]]:
    bm, bk, warps, stages, prec = cfg
    launch = f"PREC=_STD_PREC, num_warps={warps}" + (f", num_stages={stages})" if stages else ")")
    return [(STD_CONSTANTS, f'_STD_BM, _STD_BK, _STD_PREC = {bm}, {bk}, "{prec}"'), (STD_LAUNCH, launch)]


def variant_source(name: str, text: str) -> str:
    named = {**VARIANTS, **ROWSTD_VARIANTS}
    subs = named[name] if name in named else rowstd_subs(next(c for c in ROWSTD_CONFIGS if rowstd_name(c) == name))
    for old, new, *times in subs:
        n, want = text.count(old), (times or [1])[0]
        if n != want:
            raise SystemExit(f"variant {name!r}: {old[:60]!r}... occurs {n} times in {KERNELS} (expected {want}); "
                             f"update ablate.py to the kernel")
        text = text.replace(old, new)
    return text


def time_variant(K, name: str, shapes, rank: float, sigma: float, reps: int, copy_bw: float, setting: str) -> dict:
    ws, items = build(shapes, rank)
    wbytes = sum(w.numel() for w in ws) * 2
    stds = K.row_std_group([K.StdItem(w, a, b) for w, a, b in items], sigma)
    layers = [K.Layer(w, s, 1000 + i) for i, (w, s) in enumerate(zip(ws, stds))]
    tp, tr = [], []
    for i in range(reps + 2):
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        torch.cuda.synchronize()
        e0.record()
        rec = K.perturb_group(layers, capacity=0.13)
        e1.record()
        K.restore_group(rec)
        e2.record()
        e2.synchronize()
        if i >= 2:
            tp.append(e0.elapsed_time(e1))
            tr.append(e1.elapsed_time(e2))
        del rec
    outs = [torch.empty_like(w) for w in ws]
    t_copy = cuda_ms(lambda: K.noisy_copy_group(layers, outs), reps)
    row = {"setting": setting, "variant": name, "layers": len(shapes), "bytes_rw": 2 * wbytes,
           "perturb_ms": statistics.median(tp), "restore_ms": statistics.median(tr), "noisy_copy_ms": t_copy,
           "floor_ms": 2 * wbytes / copy_bw / 1e6}
    print(f"  {setting:<6} {name:<20} perturb {row['perturb_ms']:8.3f} ms  restore {row['restore_ms']:8.3f} ms  "
          f"noisy copy {t_copy:8.3f} ms  (floor {row['floor_ms']:.3f} ms)", flush=True)
    del ws, items, layers, stds, outs
    torch.cuda.empty_cache()
    return row


def time_rowstd(K, name: str, shapes, rank: int, sigma: float, reps: int, copy_bw: float, setting: str,
                ref: list | None) -> tuple[dict, list]:
    ws, items = build(shapes, rank)
    std_items = [K.StdItem(w, a, b) for w, a, b in items]
    stds = K.row_std_group(std_items, sigma)
    ms = cuda_ms(lambda: K.row_std_group(std_items, sigma), reps)
    wbytes = sum(w.numel() for w in ws) * 2
    err = None if ref is None else max(float(((s.cpu() - r).abs() / r.abs().clamp_min(1e-30)).max()) for s, r in zip(stds, ref))
    row = {"setting": setting, "variant": name, "layers": len(shapes), "bytes_read": wbytes, "row_std_ms": ms,
           "frac_of_copy": wbytes / ms / 1e6 / copy_bw, "floor_ms": wbytes / copy_bw / 1e6, "max_rel_diff_vs_shipped": err}
    print(f"  {setting:<6} {name:<36} row std {ms:8.3f} ms  {row['frac_of_copy']:6.1%} of copy  "
          f"(floor {row['floor_ms']:.3f} ms)" + ("" if err is None else f"  max rel diff {err:.1e}"), flush=True)
    del ws, items, std_items
    torch.cuda.empty_cache()
    return row, [s.cpu() for s in stds] if ref is None else ref


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--only", default="group", choices=["layer", "group"])
    ap.add_argument("--variants", default=",".join(VARIANTS) + ",rowstd",
                    help="comma list of perturb/restore variants, 'rowstd' for the row-std configurations, and row-std "
                         f"variants ({', '.join(ROWSTD_VARIANTS)})")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    std_names = [rowstd_name(c) for c in ROWSTD_CONFIGS] if "rowstd" in names else []
    if any(n in ROWSTD_VARIANTS for n in names):  # compared against the shipped configuration, timed first
        std_names = (std_names or [rowstd_name(ROWSTD_CONFIGS[0])]) + [n for n in names if n in ROWSTD_VARIANTS]
    names = [n for n in names if n != "rowstd" and n not in ROWSTD_VARIANTS]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}, 'rowstd' (every row-std "
                         f"configuration) or {list(ROWSTD_VARIANTS)}")
    text = KERNELS.read_text()
    sources = {name: variant_source(name, text) for name in names + std_names}  # all checked before any GPU work
    if not torch.cuda.is_available():
        with tempfile.TemporaryDirectory() as tmp:  # they still import (Triton parses a kernel when it is called)
            for name, src in sources.items():
                path = Path(tmp) / f"ablate_{name.replace('-', '_')}.py"
                path.write_text(src)
                load_module(str(path), path.stem)
        raise SystemExit("ablate.py times CUDA kernels: run it on the GPU machine (every variant matched and imports)")
    shapes = {"layer": [(11008, 4096)], "group": SHAPES_7B * 32}[args.only]
    bw = copy_gbps(sum(m * n for m, n in shapes) * 2)
    info = provenance(rank=args.rank, sigma=args.sigma, copy_gbps=bw, setting=args.only)
    print(f"{args.only}: {len(shapes)} layers, torch copy {bw:.0f} GB/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = Path(tmp) / f"ablate_{name.replace('-', '_')}.py"
            path.write_text(sources[name])
            K = load_module(str(path), path.stem)
            rows.append(time_variant(K, name, shapes, args.rank, args.sigma, args.reps, bw, args.only))
        ref = None
        for name in std_names:  # the shipped configuration first: the others are compared with its stds
            path = Path(tmp) / f"ablate_{name.replace('-', '_')}.py"
            path.write_text(sources[name])
            K = load_module(str(path), path.stem)
            row, ref = time_rowstd(K, name, shapes, args.rank, args.sigma, args.reps, bw, args.only, ref)
            rows.append(row)
    write_results(args.out, "ablate", info, rows)


if __name__ == "__main__":
    main()
