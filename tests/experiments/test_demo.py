"""scripts/demo.py (make demo): two runs at a time through `compare`, the same runs as a sequential compare."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def lengths_csv(tmp_path):
    import random

    r = random.Random(0)
    lines = [" ".join(r.choice(["good", "great", "fine"] if i % 2 else ["bad", "poor", "dull"])
                      for _ in range(r.randint(2, 9))) + f",{i % 2}" for i in range(48)]
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    return path


def test_demo_workers_reproduce_the_sequential_compare(lengths_csv, tmp_path):
    from flatlora.experiments.compare import compare
    from flatlora.experiments.spec import load_spec

    overrides = ["task=byo-text", f"task_args={{path: {lengths_csv}, group_by_length: true}}", "model=tiny-bert",
                 "train.max_steps=3", "train.batch_size=8", "seeds=[0,1]", "lora.r=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "scripts/demo.py", *overrides, f"out_dir={tmp_path / 'demo'}",
                          "train.device=cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "demo: first 2 steps at" in out.stdout and "expected ≈" in out.stdout
    assert "| flat-lora | lora | 2 | test/accuracy | 2 |" in out.stdout
    assert (tmp_path / "demo" / "curves.png").exists() and not (tmp_path / "demo" / ".claims").exists()
    res = compare(load_spec(str(ROOT / "configs/demo_text.yaml"), overrides + [f"out_dir={tmp_path / 'seq'}",
                                                                             "train.threads=1"]),
                  progress=False, log=lambda s: None)
    for rec in res.records:
        name = f"{rec['method']}_r{rec['rank']}_s{rec['seed']}"
        par = json.loads((tmp_path / "demo" / "runs" / name / "metrics.json").read_text())
        assert par["metrics"] == rec["metrics"], name  # same batches, same init, same noise: same numbers
        a = (tmp_path / "demo" / "runs" / name / "curve.csv").read_text().splitlines()
        b = (tmp_path / "seq" / "runs" / name / "curve.csv").read_text().splitlines()
        assert [r.split(",")[:5] for r in a] == [r.split(",")[:5] for r in b], name  # step, epoch, loss, lr, sigma


def test_demo_refuses_a_bad_override_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "scripts/demo.py", "methods=[lora,flat-lorra]", f"out_dir={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown method 'flat-lorra'" in out.stderr and "Traceback" not in out.stderr
