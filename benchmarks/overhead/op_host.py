"""Host time of one noisy linear layer call, eager and compiled: where forward mode's per-layer cost goes.

    python benchmarks/overhead/op_host.py [--out DIR] [--calls 300]

On a MiniLM-sized layer (384 x 384, 32 x 64 tokens; the device work is a few us, so the wall time of many calls
queued back to back is the host's), in the weight dtype of the GPU benchmarks (bf16 on CUDA, float32 on CPU):

    linear                 F.linear(x, W): the LoRA step's base layer
    eager-path             forward mode's eager computation: the noisy copy + F.linear (no autograd function)
    op                     torch.ops.flatlora.noisy_linear: the custom op through the dispatcher
    linear-fwd-bwd         F.linear forward + backward (x requires grad)
    op-fwd-bwd             the custom op forward + backward (its backward regenerates W + eps)
    compiled-linear        torch.compile(backend) of F.linear (+ 1, so the graph is not empty)
    compiled-op            torch.compile(backend) of the custom op (+ 1): what a compiled forward-mode layer costs
    compiled-op-fwd-bwd    the same, forward + backward
    traced-op              torch.ops.flatlora.noisy_linear_triton (compiled Triton only), called eagerly
    compiled-traced-op     the same under torch.compile, which traces into it: what a compiled forward-mode layer
                           on the Triton backend runs now
    compiled-traced-op-fwd-bwd  the same, forward + backward

Microseconds per call (median of 5 repeats), and the JSON `op-host-<device>.json` with the provenance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bench import provenance, write_results  # noqa: E402

from flatlora.core import ops  # noqa: E402


def per_call_us(fn, calls: int, dev: str) -> float:
    """Median over 5 repeats of the wall time of `calls` calls queued back to back, per call."""
    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    for _ in range(10):
        fn()
    sync()
    reps = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        reps.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(reps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    gen = "philox"
    noise = "triton" if dev == "cuda" else "torch"
    m = n = 384
    g = torch.Generator(device=dev).manual_seed(0)
    w = (torch.randn(m, n, device=dev, generator=g) * 0.05).to(dtype)
    x = torch.randn(32 * 64, n, device=dev, generator=g).to(dtype)
    xg = x.clone().requires_grad_(True)
    std = torch.full((m,), 1e-3, device=dev)
    key = ops.key_tensor(12345)

    def op(xx):
        return torch.ops.flatlora.noisy_linear(xx, w, None, std, key, m, 0, False, gen, noise, None)

    def eager_path():
        return F.linear(x, ops.compute_noisy_weight(w, std, 12345, m, 0, False, gen, noise))

    def fwd_bwd(f):
        def run():
            f(xg).sum().backward()
        return run

    c_lin = torch.compile(lambda xx: F.linear(xx, w) + 1, backend=args.backend, fullgraph=True)
    c_op = torch.compile(lambda xx: op(xx) + 1, backend=args.backend, fullgraph=True)
    traced = ops.register_triton_ops() and noise == "triton"  # flatlora::noisy_linear_triton: compiled Triton only
    kdev = ops.device_keys([12345], dev)[0]

    def top(xx):
        return torch.ops.flatlora.noisy_linear_triton(xx, w, None, std, kdev, 0, False, None)

    cases = {
        "linear": lambda: F.linear(x, w),
        "eager-path": eager_path,
        "op": lambda: op(x),
        "linear-fwd-bwd": fwd_bwd(lambda xx: F.linear(xx, w)),
        "op-fwd-bwd": fwd_bwd(op),
        "compiled-linear": lambda: c_lin(x),
        "compiled-op": lambda: c_op(x),
        "compiled-op-fwd-bwd": fwd_bwd(c_op),
    }
    if traced:
        c_top = torch.compile(lambda xx: top(xx) + 1, backend=args.backend, fullgraph=True)
        cases.update({"traced-op": lambda: top(x), "compiled-traced-op": lambda: c_top(x),
                      "compiled-traced-op-fwd-bwd": fwd_bwd(c_top)})
    rows = []
    for name, fn in cases.items():
        us = per_call_us(fn, args.calls, dev)
        rows.append({"case": name, "us_per_call": us})
        print(f"  {name:<22} {us:9.1f} us a call", flush=True)
    info = provenance(layer=f"{m}x{n} {dtype}", tokens=x.shape[0], noise_backend=noise, compile_backend=args.backend)
    write_results(args.out, "op-host", info, rows)
    return rows


if __name__ == "__main__":
    main()
