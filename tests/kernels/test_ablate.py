"""benchmarks/overhead/ablate.py edits the shipped noise kernel's source text: every variant must still find
each piece it takes out exactly once (a kernel change that moves one fails here, on CPU, not on the GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "overhead"))
import ablate  # noqa: E402  (reads the kernel as text; imports torch, not triton)


def test_every_variant_fits_the_shipped_kernel():
    text = ablate.KERNELS.read_text()
    assert ablate.variant_source("shipped", text) == text
    sources = {name: ablate.variant_source(name, text) for name in ablate.VARIANTS if name != "shipped"}
    for name, src in sources.items():
        assert src != text, name
        for old, new, *_ in ablate.VARIANTS[name]:
            assert src.count(old) == 0 or old in new, (name, old[:40])
    assert len(set(sources.values())) == len(sources)  # no two variants time the same code


def test_a_stale_substitution_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(ablate.VARIANTS, "stale", [("no such kernel text", "")])
    with pytest.raises(SystemExit, match="occurs 0 times"):
        ablate.variant_source("stale", ablate.KERNELS.read_text())


def test_every_row_std_configuration_fits_the_shipped_kernel():
    text = ablate.KERNELS.read_text()
    names = [ablate.rowstd_name(c) for c in ablate.ROWSTD_CONFIGS]
    assert len(set(names)) == len(names)
    shipped = ablate.variant_source(names[0], text)
    assert shipped == text  # the first configuration is the shipped one: the others are compared with it
    assert len({ablate.variant_source(n, text) for n in names}) == len(names)


def test_every_row_std_variant_fits_the_shipped_kernel():
    text = ablate.KERNELS.read_text()
    sources = {name: ablate.variant_source(name, text) for name in ablate.ROWSTD_VARIANTS}
    assert text not in sources.values() and len(set(sources.values())) == len(sources)
    # the FMA variant sizes the rank chunk to the rank (tl.dot's K >= 16 does not bind it): r = 8 -> 8, not 16
    assert "max(16," not in sources["rowstd-fma"].split("def row_std_group")[1]
    # the accumulating dot changes only the dot line; no-adapter drops A's load with it
    assert "acc=merged" in sources["rowstd-dot-acc"] and "acc=merged" not in text
    assert sources["rowstd-no-adapter"].count("a = tl.load(a_ptr") == text.count("a = tl.load(a_ptr") - 1


def test_sass_stats_compiles_the_shipped_kernel_for_sm90():
    """benchmarks/overhead/sass_stats.py: the kernel compiled for the H200's architecture on this CPU machine,
    registers and SASS counted (ptxas and cuobjdump come with Triton's wheel). In a fresh process: a test
    module that ran first may have imported triton under TRITON_INTERPRET=1, which compiles nothing."""
    code = ("import json, sass_stats; from flatlora.kernels import triton_noise as K; "
            "print(json.dumps([sass_stats.sass_stats(sass_stats.compile_tile(K, m, 90)) for m in (2, 0, 1)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks" / "overhead")])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    copy, perturb, restore = json.loads(res.stdout.splitlines()[-1])
    assert 16 <= copy["registers"] <= 255 and copy["instructions"] > 100 and copy["shared_bytes"] == 0
    assert copy["top_opcodes"].get("MUFU", 0) >= 16  # the special-function unit's lg2/sqrt/sin/cos: FAST compiled
    # aligned contiguous bf16: every weight load and store is a 16-byte vector (8 elements), none element-wise
    # (the kernels before the multiple_of hints on the tile start and numel issued 16 + 16 2-byte accesses)
    for st in (copy, perturb, restore):
        acc = st["global_accesses"]
        assert acc.get("LDG.E.128", 0) >= 1 and acc.get("STG.E.128", 0) >= 1, acc
        assert not any(k.startswith("LDG") and k.endswith((".U16", ".S16")) for k in acc), acc
    assert not any(k.endswith((".U16", ".S16")) for k in copy["global_accesses"])
    assert not any(k.endswith((".U16", ".S16")) for k in perturb["global_accesses"])  # record entries: 32-bit words
    # restore stores 2-byte values only in its patch loop (the record's scattered entries), never for the weight
