"""Where a profiled step leaves the GPU idle: reads the timelines `run.py --profile --trace` writes
(trace-*.json.gz) and prints, per trace, the device's busy and idle time over the profiled window, the largest
idle gaps with the host op running when each began, the host calls that blocked (launches held by a full
queue, synchronizations, copies), and the host time inside the engine's own ranges (`flatlora.begin_step`,
`flatlora.end_step`: the engine marks its windows in traces recorded since 2026-12-03).

    python benchmarks/overhead/trace_gaps.py TRACE.json.gz [...] [--gaps 12] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from pathlib import Path

_DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
# host calls that can wait on the device: their time beyond a launch's few microseconds is waiting
_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
          "cudaMemcpy", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
          "cudaMalloc", "cudaFree", "cudaHostAlloc", "cudaFreeHost", "cudaStreamWaitEvent", "cudaMemsetAsync")


def _load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data.get("traceEvents", []) if isinstance(data, dict) else data  # object or array form
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def analyse(path: str, n_gaps: int = 12) -> dict:
    events = _load(path)
    dev = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in _DEVICE_CATS]
    if not dev:
        return {"trace": path, "error": "no device events (a CPU trace?)"}
    busy = _merge(dev)
    t0, t1 = busy[0][0], busy[-1][1]
    busy_us = sum(e - s for s, e in busy)
    gaps = sorted(((busy[i + 1][0] - busy[i][1], busy[i][1]) for i in range(len(busy) - 1)), reverse=True)
    # the host's ops (the innermost one covering a gap's start names what the host was doing then)
    host = sorted((e for e in events if e.get("cat") in ("cpu_op", "python_function", "user_annotation",
                                                         "cuda_runtime", "cuda_driver")),
                  key=lambda e: e["ts"])
    starts = [e["ts"] for e in host]

    def doing(ts: float) -> str:
        best = None
        for e in host[max(0, bisect.bisect_right(starts, ts) - 4000):bisect.bisect_right(starts, ts)]:
            if e["ts"] <= ts <= e["ts"] + e["dur"] and (best is None or e["dur"] <= best["dur"]):
                best = e
        return best["name"] if best else "(host idle or outside an op)"

    waits: dict[str, list[float]] = {}
    for e in host:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["name"].startswith(_WAITS):
            waits.setdefault(e["name"], []).append(e["dur"])
    blocked = {name: {"calls": len(d), "total_ms": sum(d) / 1e3, "over_100us": sum(x > 100 for x in d),
                      "over_100us_ms": sum(x for x in d if x > 100) / 1e3, "max_ms": max(d) / 1e3}
               for name, d in waits.items()}
    engine: dict[str, list[float]] = {}
    for e in host:
        if e.get("cat") == "user_annotation" and e["name"].startswith("flatlora."):
            engine.setdefault(e["name"], []).append(e["dur"])
    ranges = {name: {"calls": len(d), "total_ms": sum(d) / 1e3, "mean_ms": sum(d) / len(d) / 1e3}
              for name, d in sorted(engine.items())}
    return {"trace": Path(path).name, "window_ms": (t1 - t0) / 1e3, "device_busy_ms": busy_us / 1e3,
            "engine_ranges": ranges,
            "device_idle_ms": (t1 - t0 - busy_us) / 1e3,
            "idle_in_gaps_over_50us_ms": sum(g for g, _ in gaps if g > 50) / 1e3,
            "gaps": [{"ms": g / 1e3, "at_ms": (s - t0) / 1e3, "host": doing(s)} for g, s in gaps[:n_gaps]],
            "blocking_calls": dict(sorted(blocked.items(), key=lambda kv: -kv[1]["over_100us_ms"]))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--gaps", type=int, default=12, help="largest idle gaps to list per trace")
    ap.add_argument("--json", help="also write the analyses here")
    args = ap.parse_args(argv)
    out = []
    for path in args.traces:
        r = analyse(path, args.gaps)
        out.append(r)
        if "error" in r:
            print(f"{r['trace']}: {r['error']}")
            continue
        print(f"{r['trace']}: window {r['window_ms']:.1f} ms, device busy {r['device_busy_ms']:.1f}, idle "
              f"{r['device_idle_ms']:.1f} ({r['idle_in_gaps_over_50us_ms']:.1f} in gaps > 50 us)")
        for g in r["gaps"]:
            print(f"    gap {g['ms']:8.3f} ms at {g['at_ms']:9.2f} ms   host in {g['host'][:70]}")
        for name, g in r["engine_ranges"].items():
            print(f"    host in {name:<22} {g['calls']:4d} ranges {g['total_ms']:9.2f} ms ({g['mean_ms']:.3f} ms each)")
        for name, b in r["blocking_calls"].items():
            if b["over_100us"]:
                print(f"    {name:<24} {b['calls']:6d} calls {b['total_ms']:9.2f} ms; {b['over_100us']:5d} over 100 us "
                      f"= {b['over_100us_ms']:8.2f} ms (max {b['max_ms']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
