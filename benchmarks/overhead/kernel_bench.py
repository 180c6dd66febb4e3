"""Per-kernel microbenchmark of the Flat-LoRA noise kernels against the GPU's own copy bandwidth.

    python benchmarks/overhead/kernel_bench.py --out $OUT [--old .carry/old_triton_noise.py] [--only layer,group]

On one real Llama-2-7B layer (gate_proj, 11008 x 4096 bf16) and on the whole 7B group (32 x 7 LoRA-wrapped
linears, 6.48 G parameters, 12.95 GB in bf16), times every kernel the engine calls per step (row std,
perturb with its exact-restore record, restore, noisy copy) with CUDA events (median of repeats after
warm-up) and prints bytes moved, ms, GB/s and the fraction of `torch.Tensor.copy_`'s bandwidth measured in
the same run on a buffer of the same size. `--old FILE` also times another version of the kernels module
(e.g. the previous commit's, copied into .carry/) side by side. Writes kernels-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

SHAPES_7B = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]  # q k v o gate up down (out, in)


def cuda_ms(fn, reps: int = 10, warm: int = 2) -> float:
    """Median ms of `fn` over `reps` calls after `warm` (CUDA events; wall clock off the GPU, where the
    number only checks that a script runs)."""
    import time

    for _ in range(warm):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t0))
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def provenance(**extra) -> dict:
    """Device, date, command and versions (the runner's, git commit included) of a benchmark's JSON."""
    from flatlora.experiments.runner import versions

    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python"] + sys.argv), **versions(), **extra}


def write_results(out: str, prefix: str, info: dict, rows: list[dict]) -> Path:
    """<out>/<prefix>-<device>.json with the provenance and the rows."""
    path = Path(out) / f"{prefix}-{info['device'].lower().replace(' ', '-')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": info, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return path


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def copy_gbps(nbytes: int) -> float:
    """Read + write bandwidth of torch's own copy on a buffer of `nbytes` (capped at 4 GiB)."""
    n = min(nbytes, 4 << 30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), 20)
    return 2 * n * 2 / ms / 1e6


def build(shapes, rank, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ws, items = [], []
    for m, n in shapes:
        w = (torch.randn(m, n, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        a = torch.randn(rank, n, device="cuda", generator=g) * 0.01
        b = torch.randn(m, rank, device="cuda", generator=g) * 1e-3
        ws.append(w)
        items.append((w, a, b))
    return ws, items


def bench_module(K, label, shapes, rank, sigma, reps, copy_bw, rows, setting):
    ws, items = build(shapes, rank)
    numel = sum(w.numel() for w in ws)
    wbytes = numel * 2
    std_items = [K.StdItem(w, a, b) for w, a, b in items]

    def rowstd():
        return K.row_std_group(std_items, sigma)

    stds = rowstd()
    layers = [K.Layer(w, s, 1000 + i) for i, (w, s) in enumerate(zip(ws, stds))]
    t_std = cuda_ms(rowstd, reps)

    # perturb and restore alternate (a restore needs its perturb's record); timed separately with events
    tp, tr, recs = [], [], []
    for i in range(reps + 2):
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        torch.cuda.synchronize()
        e0.record()
        rec = K.perturb_group(layers)
        e1.record()
        # (an older triton_noise.py, timed with --old, took the layers too)
        K.restore_group(rec) if "layers" not in inspect.signature(K.restore_group).parameters else K.restore_group(layers, rec)
        e2.record()
        e2.synchronize()
        if i >= 2:
            tp.append(e0.elapsed_time(e1))
            tr.append(e1.elapsed_time(e2))
            recs.append(rec.nbytes)
        del rec
    outs = [torch.empty_like(w) for w in ws]
    if hasattr(K, "noisy_copy_group"):
        def copy():
            K.noisy_copy_group(layers, outs)
    else:
        def copy():
            for ly, o in zip(layers, outs):
                K.noisy_copy_(ly.w, ly.std, ly.key, ly.row0, o)
    t_copy = cuda_ms(copy, reps)
    del outs
    for name, ms, nbytes in (("row_std", t_std, wbytes), ("perturb", statistics.median(tp), 2 * wbytes),
                             ("restore", statistics.median(tr), 2 * wbytes), ("noisy_copy", t_copy, 2 * wbytes)):
        gbps = nbytes / ms / 1e6
        row = {"setting": setting, "kernels": label, "kernel": name, "layers": len(shapes), "numel": numel,
               "bytes": nbytes, "ms": ms, "gbps": gbps, "frac_of_copy": gbps / copy_bw, "floor_ms": nbytes / copy_bw / 1e6}
        if name == "perturb":
            row["record_bytes"] = statistics.median(recs)
        rows.append(row)
        print(f"  {setting:<8} {label:<5} {name:<11} {ms:9.3f} ms  {gbps:8.0f} GB/s  {gbps / copy_bw:6.1%} of copy"
              f"  (floor {row['floor_ms']:.3f} ms)" + (f"  record {row['record_bytes'] / 2**20:.0f} MiB" if name == "perturb" else ""),
              flush=True)
    del ws, items, layers, stds
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--old", default=None, help="another triton_noise.py to time side by side")
    ap.add_argument("--only", default="layer,group")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    from flatlora.kernels import triton_noise as new

    if args.old and not Path(args.old).exists():
        raise SystemExit(f"--old {args.old}: no such file; copy the previous triton_noise.py there (see the README)")
    mods = [("new", new)] + ([("old", load_module(args.old, "old_triton_noise"))] if args.old else [])
    info = provenance(rank=args.rank, sigma=args.sigma)
    rows: list[dict] = []
    only = args.only.split(",")
    settings = {"layer": [(11008, 4096)], "group": SHAPES_7B * 32}
    for setting in only:
        shapes = settings[setting]
        bw = copy_gbps(sum(m * n for m, n in shapes) * 2)
        info[f"copy_gbps_{setting}"] = bw
        print(f"{setting}: {len(shapes)} layers, torch copy {bw:.0f} GB/s", flush=True)
        for label, K in mods:
            bench_module(K, label, shapes, args.rank, args.sigma, args.reps if setting == "layer" else max(3, args.reps // 2),
                         bw, rows, setting)
    write_results(args.out, "kernels", info, rows)


if __name__ == "__main__":
    main()
