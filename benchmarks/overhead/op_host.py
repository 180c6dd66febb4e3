"""Host time of one noisy linear layer call, eager and compiled: where forward mode's per-layer cost goes.

    python benchmarks/overhead/op_host.py [--out DIR] [--calls 300]

On a MiniLM-sized layer (384 x 384, 32 x 64 tokens; the device work is a few us, so the wall time of many calls
queued back to back is the host's), in the weight dtype of the GPU benchmarks (bf16 on CUDA, float32 on CPU):

    linear                 F.linear(x, W): the LoRA step's base layer
    eager-path             forward mode's eager computation: the noisy copy + F.linear (no autograd function)
    layer                  what a forward-mode layer's patched forward runs eagerly (`forward.Armed`: the
                           autograd function around the noisy copy and F.linear)
    layer-fwd-bwd          the same, forward + backward (the backward's noisy copy and matmul included)
    hooks-layer-fwd-bwd    a probe, not the product: F.linear on the noisy copy under saved-tensor hooks that
                           save a marker for W + eps and regenerate it in backward, so backward is autograd's own
                           mm node plus one Python unpack call instead of a Python autograd function
    hooks-cached-fwd-bwd   the same probe with an unpack hook that returns the forward's copy (kept): one Python
                           call in backward and no copy there, which isolates what the backward's copy costs
    kept-copy-fwd-bwd      F.linear on the noisy copy, which autograd keeps for backward (no Python in backward;
                           an m x n copy held per layer): forward mode's per-layer cost without regeneration
    op                     torch.ops.flatlora.noisy_linear: the custom op through the dispatcher
    linear-fwd-bwd         F.linear forward + backward (x requires grad)
    op-fwd-bwd             the custom op forward + backward (its backward regenerates W + eps)
    compiled-linear        torch.compile(backend) of F.linear (+ 1, so the graph is not empty)
    compiled-linear-fwd-bwd  the same, forward + backward: what the compiled fwd-bwd rows compare with
    compiled-op            torch.compile(backend) of the custom op (+ 1): what a compiled forward-mode layer costs
    compiled-op-fwd-bwd    the same, forward + backward
    traced-op              torch.ops.flatlora.noisy_linear_triton (compiled Triton only), called eagerly
    compiled-traced-op     the same under torch.compile, which traces into it: what a compiled forward-mode layer
                           on the Triton backend runs now
    compiled-traced-op-fwd-bwd  the same, forward + backward

Microseconds per call (median of 5 repeats; the fwd-bwd rows pass a fixed contiguous upstream gradient, as a
model's is, not `.sum()`'s expanded one), on CUDA with the device's kernel time a call beside it (torch.profiler over
20 calls: a row whose wall time is near its device time is device-bound, not host-bound), and the JSON `op-host-<device>.json` with the provenance.
`--profile`: also cProfile's table of `layer-fwd-bwd` (flatlora's and torch's Python per call, by own time),
printed and written to `op-host-profile-<device>.txt`: which Python the eager layer's host time goes to.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
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
    ap.add_argument("--profile", action="store_true", help="cProfile the eager layer's forward + backward")
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

    layer = _armed_layer(w, std, 12345, gen, noise)

    gy = torch.randn(x.shape[0], m, device=dev, generator=g).to(dtype)  # contiguous, as a model's upstream grad is

    def fwd_bwd(f):
        def run():
            f(xg).backward(gy)
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
        "layer": lambda: layer(x, None),
        "op": lambda: op(x),
        "linear-fwd-bwd": fwd_bwd(lambda xx: F.linear(xx, w)),
        "layer-fwd-bwd": fwd_bwd(lambda xx: layer(xx, None)),
        "hooks-layer-fwd-bwd": fwd_bwd(hooks_layer(w, std, 12345, m, gen, noise)),
        "hooks-cached-fwd-bwd": fwd_bwd(hooks_layer(w, std, 12345, m, gen, noise, cached=True)),
        "kept-copy-fwd-bwd": fwd_bwd(lambda xx: F.linear(xx, ops.compute_noisy_weight(w, std, 12345, m, 0, False, gen,
                                                                                      noise))),
        "op-fwd-bwd": fwd_bwd(op),
        "compiled-linear": lambda: c_lin(x),
        "compiled-linear-fwd-bwd": fwd_bwd(c_lin),
        "compiled-op": lambda: c_op(x),
        "compiled-op-fwd-bwd": fwd_bwd(c_op),
    }
    if traced:
        c_top = torch.compile(lambda xx: top(xx) + 1, backend=args.backend, fullgraph=True)
        cases.update({"traced-op": lambda: top(x), "compiled-traced-op": lambda: c_top(x),
                      "compiled-traced-op-fwd-bwd": fwd_bwd(c_top)})
    ga, *probes = (torch.autograd.grad(f(xg), xg, gy)[0] for f in (
        lambda xx: layer(xx, None), hooks_layer(w, std, 12345, m, gen, noise),
        hooks_layer(w, std, 12345, m, gen, noise, cached=True)))
    assert all(torch.equal(ga, gb) for gb in probes), "a hooks probe's grad_x differs from the armed layer's"
    rows = []
    for name, fn in cases.items():
        us = per_call_us(fn, args.calls, dev)
        dev_us = device_us(fn) if dev == "cuda" else None
        rows.append({"case": name, "us_per_call": us, "device_us_per_call": dev_us})
        busy = "" if dev_us is None else f"   device {dev_us:7.1f} us"
        print(f"  {name:<26} {us:9.1f} us a call{busy}", flush=True)
    info = provenance(layer=f"{m}x{n} {dtype}", tokens=x.shape[0], noise_backend=noise, compile_backend=args.backend)
    write_results(args.out, "op-host", info, rows)
    if args.profile:
        table = profile_calls(fwd_bwd(lambda xx: layer(xx, None)), args.calls, dev)
        if dev == "cuda":  # and what the device runs for it, beside the plain linear layer's
            table += "\n".join(kernel_table(fwd_bwd(f), name) for name, f in
                               (("layer-fwd-bwd", lambda xx: layer(xx, None)), ("linear-fwd-bwd", lambda xx: F.linear(xx, w))))
        print(table)
        path = Path(args.out) / f"op-host-profile-{info['device'].replace(' ', '-').lower()}.txt"
        path.write_text(f"# {info['command']}\n# layer-fwd-bwd, {args.calls} calls\n{table}")
    return rows


def _armed_layer(w: torch.Tensor, std: torch.Tensor, key: int, generator: str, backend: str):
    """A forward-mode `Armed` holding one window's draw for a linear layer with weight `w`: called as
    `armed(x, bias)`, it is what the patched forward of a layer in an open window runs."""
    from flatlora.core.forward import Armed
    from flatlora.core.noise_draw import Draw
    from flatlora.core.targets import Target

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype).requires_grad_(False)
    lin.weight.data = w
    armed = Armed(Target("layer", lin, None, "linear", False, *w.shape), backend)
    armed.set_draw(Draw(key, std, None, generator))
    return armed


def hooks_layer(w: torch.Tensor, std: torch.Tensor, key: int, m: int, generator: str, backend: str,
                cached: bool = False):
    """The probe `hooks-layer-fwd-bwd` measures: y = F.linear(x, W + eps) with W + eps saved as a marker (its view
    geometry) and regenerated by the unpack hook in backward (`cached`: the unpack hook returns the forward's copy
    instead). Checked against the armed layer's gradient below."""
    def noisy():
        return ops.compute_noisy_weight(w, std, key, m, 0, False, generator, backend)

    def run(xx):
        w_eps = noisy()
        ptr = w_eps.data_ptr()

        def pack(t):
            return (tuple(t.shape), t.stride(), t.storage_offset()) if t.data_ptr() == ptr else t

        def unpack(p):
            if not isinstance(p, tuple):
                return p
            return (w_eps if cached else noisy()).as_strided(*p)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return F.linear(xx, w_eps)
    return run


def device_us(fn, calls: int = 20) -> float:
    """Kernel time on the device a call (the sum of every kernel's own device time over `calls` calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / calls


def kernel_table(fn, name: str, calls: int = 20) -> str:
    """torch.profiler's table of `calls` calls of `fn` on CUDA, by device time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return f"\n## {name}, {calls} calls, by device time\n" + prof.key_averages().table(sort_by="self_device_time_total",
                                                                                       row_limit=15)


def profile_calls(fn, calls: int, dev: str, top: int = 30) -> str:
    """cProfile's table (own time, the `top` first) of `calls` calls of `fn` after a warm-up."""
    for _ in range(10):
        fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


if __name__ == "__main__":
    main()
