"""2-process DDP / FSDP2 on CPU (gloo, torch.multiprocessing) against the 1-process run of the same global
batch: benchmarks/distributed/ddp_fsdp2.py --spawn 2, the script the GPU run (nvidia-h200-x2) uses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "report.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/distributed/ddp_fsdp2.py"), "--device", "cpu", "--tiny",
           "--spawn", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_ddp_matches_single_process_and_ends_at_sigma(report):
    ddp = report["ddp"]
    assert ddp["match"], ddp  # all-reduce averaging changes bits, so within 1e-5 (measured ~4e-8)
    assert ddp["sigma_last_is_sigma"] and ddp["sigma_last"] == report["sigma"]
    assert ddp["noise_same_on_ranks"] and ddp["base_bit_identical"] and ddp["mode"] == "inplace"


def test_per_rank_noise_gives_each_rank_its_own_draw(report):
    assert report["per_rank_noise_differs"]


def test_fsdp2_forward_mode_matches_single_process(report):
    r = report["fsdp2_forward"]
    if "error" in r:
        pytest.skip(f"FSDP2 unavailable here: {r['error']}")
    assert r["match"] and r["sigma_last_is_sigma"] and r["base_bit_identical"], r


def test_fsdp2_inplace_on_local_row_shards_matches_single_process(report):
    r = report["fsdp2"]
    if "error" in r and "is invalid for input of size" in r["error"]:
        # Engine bug, reported: Target.as_matrix reshapes the local shard to the global (m, n).
        pytest.xfail(f"core/targets.py as_matrix on FSDP2 shards: {r['error']}")
    assert "error" not in r, r
    assert r["match"] and r["sigma_last_is_sigma"] and r["base_bit_identical"], r
