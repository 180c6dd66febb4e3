"""benchmarks/overhead/run.py --smoke: tiny shapes on CPU, every setting and variant, JSON rows written."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# The reference script is carried next to the checkout (benchmarks/overhead/README.md); another place via env.
ANCHOR = Path(os.environ.get("FLATLORA_BENCH_ANCHOR", ROOT / ".carry" / "anchor_overhead.py"))


def test_overhead_benchmark_smoke(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("overhead_run", ROOT / "benchmarks/overhead/run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    rows = run.main(["--smoke", "--out", str(tmp_path), "--anchor", str(ANCHOR)])
    data = json.loads(next(tmp_path.glob("overhead-*.json")).read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    for key in ("device", "date", "torch", "triton", "peft", "command"):
        assert key in data["provenance"]
    timed = [r for r in rows if r["setting"] != "exactness"]
    assert {r["variant"] for r in timed} >= {"lora", "flatlora-inplace", "flatlora-forward", "sam"}
    for r in timed:
        assert r["median_ms"] > 0 and r["ratio_vs_lora"] > 0 and "peak_mem_gib" in r
    assert all("restore_record_bytes" in r for r in timed if r["variant"] == "flatlora-inplace")
    exact = [r for r in rows if r["setting"] == "exactness"]
    assert len(exact) == 4 and all(r["bit_identical"] for r in exact)
    # With the anchor the reference variant is timed; without it, it is absent (never a stale row).
    assert any(r["variant"] == "reference" for r in timed) == ANCHOR.exists()


def test_overhead_benchmark_qlora_smoke(tmp_path):
    """--only qlora: plain QLoRA and Flat-QLoRA rows for both micro-batch shapes plus the recorded in-place
    refusal where bitsandbytes works; a single 'skipped' row saying why where it does not."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("overhead_run", ROOT / "benchmarks/overhead/run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    rows = run.main(["--smoke", "--only", "qlora", "--out", str(tmp_path)])
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # run.py names the smoke file after the device
    data = json.loads((tmp_path / f"overhead-smoke-{dev}-qlora.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows)) and "bitsandbytes" in data["provenance"]
    if importlib.util.find_spec("bitsandbytes") is None:
        assert len(rows) == 1 and "bitsandbytes is not importable" in rows[0]["skipped"]
        return
    for setting in ("qlora micro 4x512", "qlora micro 2x1024"):
        got = {r["variant"]: r for r in rows if r["setting"] == setting}
        assert set(got) == {"flatlora-inplace", "lora", "flatlora-forward"}
        assert "re-quantize" in got["flatlora-inplace"]["refused"] and "mode='forward'" in got["flatlora-inplace"]["refused"]
        assert got["lora"]["ratio_vs_lora"] == 1.0 and got["flatlora-forward"]["ratio_vs_lora"] > 0
        assert got["lora"]["base"].startswith("bitsandbytes nf4, double quant")


def test_host_step_benchmark_smoke(tmp_path):
    """benchmarks/overhead/host_step.py in a fresh process (it stubs the kernels for the whole process): both
    layer counts measured on the Triton backend's host path, the JSON written with its provenance."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    pytest.importorskip("peft")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/overhead/host_step.py"), "--steps", "2", "--out",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "host-step-cpu.json").read_text())
    *layered, scaffold = data["rows"]
    assert [(r["setting"], r["mode"], r["layers"]) for r in layered] == [
        ("7b-layers-224", "inplace", 224), ("7b-layers-224", "forward", 224),
        ("minilm-layers-37", "inplace", 37), ("minilm-layers-37", "forward", 37)]
    assert scaffold["mode"] == "forward-scaffold" and scaffold["plain_linear_us"] > 0 and scaffold["noisy_layer_us"] > 0
    for r in layered:
        if r["mode"] == "inplace":
            assert r["begin_step_ms"] > 0 and r["end_step_ms"] > 0
            assert r["total_ms"] == pytest.approx(r["begin_step_ms"] + r["end_step_ms"])
        else:
            assert r["lora_fwd_bwd_ms"] > 0 and r["total_ms"] == pytest.approx(r["flat_fwd_bwd_ms"] - r["lora_fwd_bwd_ms"])
    assert data["provenance"]["kernels"] == "stubbed (host path only)"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"benchmarks/overhead/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_control_variant_is_the_lora_step_timed_again(tmp_path):
    """run.py --control: a `lora-again` row in every setting, interleaved like the others, its ratio taken
    against `lora` of the same run."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    rows = _load("run").main(["--smoke", "--only", "minilm", "--control", "--out", str(tmp_path)])
    got = {r["variant"]: r for r in rows}
    assert {"lora", "lora-again", "flatlora-inplace"} <= set(got)
    again = got["lora-again"]
    assert again["ratio_vs_lora"] == pytest.approx(again["median_ms"] / got["lora"]["median_ms"])
    assert again["n_steps"] == got["lora"]["n_steps"] and "restore_record_bytes" not in again


def test_overlap_probe_smoke(tmp_path):
    """overlap_probe.py --cpu-smoke: the chunked in-place mode (on the main stream: no side streams on CPU) keeps
    the frozen weights bit-identical across interleaved variants, and the JSON names what it timed."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    _load("overlap_probe").main(["--cpu-smoke", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "overlap-probe.json").read_text())
    assert data["exact"] is True
    assert [r["variant"] for r in data["rows"]] == ["lora", "inplace", "chunked-serial"]
    assert all(r["median_ms"] > 0 and r["n_steps"] == 4 for r in data["rows"])
    for key in ("device", "date", "torch", "command"):
        assert key in data["provenance"]


def test_round_ratio_interval():
    """Per-round ratios to LoRA: their median, and a bootstrap interval that holds it and narrows with agreement."""
    run = _load("run")
    lora = [100.0, 120.0, 90.0, 110.0, 105.0, 95.0]
    flat = [110.0, 132.0, 99.0, 121.0, 115.5, 104.5]  # 1.10x in every round, however busy the round
    got = run.round_ratio_ci(flat, lora)
    assert got["round_ratio_median"] == pytest.approx(1.1) and got["round_ratio_ci95"] == pytest.approx([1.1, 1.1])
    noisy = [f * k for f, k in zip(flat, (1.0, 1.08, 0.95, 1.02, 0.97, 1.05))]
    lo, hi = run.round_ratio_ci(noisy, lora)["round_ratio_ci95"]
    assert lo < run.round_ratio_ci(noisy, lora)["round_ratio_median"] < hi and hi - lo > 0.03
    assert run.round_ratio_ci(flat[:4], lora[:4])["round_ratio_ci95"] is None  # too few rounds to mean anything


def test_compiled_variants(tmp_path):
    """run.py --compile BACKEND: lora, in-place and forward mode also through torch.compile of the same model, timed
    interleaved with the eager variants (whose rows stay as they are)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    rows = _load("run").main(["--smoke", "--only", "minilm", "--compile", "aot_eager", "--profile", "--out", str(tmp_path)])
    got = {r["variant"]: r for r in rows}
    assert {"lora", "flatlora-forward", "lora-compiled", "flatlora-inplace-compiled", "flatlora-forward-compiled"} <= set(got)
    for v in ("lora-compiled", "flatlora-inplace-compiled", "flatlora-forward-compiled"):
        assert got[v]["median_ms"] > 0 and got[v]["n_steps"] == got["lora"]["n_steps"]
    assert "restore_record_bytes" in got["flatlora-inplace-compiled"]
    # a compiled Flat-LoRA row is also taken against the compiled LoRA step, and profiled against its ops
    for v in ("flatlora-inplace-compiled", "flatlora-forward-compiled"):
        assert got[v]["ratio_vs_lora_compiled"] == pytest.approx(got[v]["median_ms"] / got["lora-compiled"]["median_ms"])
        assert got[v]["round_ratio_median_vs_lora_compiled"] > 0
        table = (tmp_path / f"profile-minilm-l6_32x64-{v}.txt").read_text()
        assert "## against LoRA" in table
    assert "ratio_vs_lora_compiled" not in got["lora-compiled"] and "ratio_vs_lora_compiled" not in got["flatlora-forward"]
    assert "## against LoRA" not in (tmp_path / "profile-minilm-l6_32x64-lora-compiled.txt").read_text()


def test_op_host_benchmark_smoke(tmp_path):
    """op_host.py: the host cost of one noisy layer call, eager and compiled, written with its provenance (on CPU
    the torch stream and aot_eager; the traced Triton op's rows only where the kernels run compiled)."""
    rows = _load("op_host").main(["--calls", "1", "--backend", "aot_eager", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "op-host-cpu.json").read_text())
    assert data["rows"] == rows and [r["case"] for r in rows] == [
        "linear", "eager-path", "layer", "op", "linear-fwd-bwd", "layer-fwd-bwd", "hooks-layer-fwd-bwd",
        "hooks-cached-fwd-bwd", "kept-copy-fwd-bwd", "op-fwd-bwd", "compiled-linear", "compiled-linear-fwd-bwd",
        "compiled-op", "compiled-op-fwd-bwd"]
    assert all(r["us_per_call"] > 0 for r in rows)
    for key in ("device", "date", "torch", "command", "noise_backend"):
        assert key in data["provenance"]

