"""trace_gaps.py on a hand-made timeline: device busy/idle, the largest gap and what the host did then, and the
host time in the engine's own ranges."""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "overhead"))

import trace_gaps  # noqa: E402


def _ev(name, cat, ts, dur):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur}


def test_gaps_blocking_calls_and_engine_ranges(tmp_path):
    events = [
        _ev("flatlora.begin_step", "user_annotation", 0, 300),
        _ev("flatlora.end_step", "user_annotation", 2000, 100),
        _ev("flatlora.begin_step", "user_annotation", 5000, 500),
        _ev("aten::mm", "cpu_op", 1000, 900),
        _ev("cudaStreamSynchronize", "cuda_runtime", 2200, 400),
        _ev("k0", "kernel", 100, 200),     # busy 100-300
        _ev("k1", "kernel", 250, 150),     # overlaps: busy until 400
        _ev("k2", "kernel", 1500, 500),    # idle 400-1500: no host op covers 400
        _ev("k3", "kernel", 2100, 100),    # idle 2000-2100
    ]
    path = tmp_path / "trace-x.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = trace_gaps.analyse(str(path), n_gaps=2)
    assert r["window_ms"] == 2.1 and r["device_busy_ms"] == 0.9 and r["device_idle_ms"] == 1.2
    assert r["gaps"][0] == {"ms": 1.1, "at_ms": 0.3, "host": "(host idle or outside an op)"}
    assert r["gaps"][1]["ms"] == 0.1 and r["gaps"][1]["host"] == "flatlora.end_step"
    assert r["engine_ranges"] == {"flatlora.begin_step": {"calls": 2, "total_ms": 0.8, "mean_ms": 0.4},
                                  "flatlora.end_step": {"calls": 1, "total_ms": 0.1, "mean_ms": 0.1}}
    assert r["blocking_calls"]["cudaStreamSynchronize"]["over_100us_ms"] == 0.4
