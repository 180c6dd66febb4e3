"""A 2-method x 2-seed compare on a tiny task: table with the paired test, real pairing, resume, no overwrite."""

import csv
import json
import shutil

import pytest

from flatlora.experiments.compare import compare
from flatlora.experiments.spec import load_spec

from .conftest import tiny_text_overrides


@pytest.fixture
def spec(byo_csv, tmp_path):
    return load_spec(None, tiny_text_overrides(byo_csv, tmp_path / "cmp", **{"methods": "[lora,flat-lora]",
                                                                             "seeds": "[0,1]", "flat.sigma": 0.5}))


def _curve(run_dir):
    with open(run_dir / "curve.csv") as f:
        return list(csv.DictReader(f))


def test_compare_table_pairing_and_resume(spec, tmp_path):
    res = compare(spec, progress=False, log=lambda s: None)
    out = tmp_path / "cmp"
    assert (res.ran, res.skipped) == (4, 0)
    assert {p.name for p in (out / "runs").iterdir()} == {"lora_r8_s0", "flat-lora_r8_s0", "lora_r8_s1", "flat-lora_r8_s1"}
    for f in ["summary.md", "summary.json", "runs.csv", "pairs.csv", "plot.png", "spec.yaml"]:
        assert (out / f).stat().st_size > 0, f
    run = out / "runs" / "flat-lora_r8_s0"
    for f in ["config.yaml", "metrics.json", "curve.csv", "env.json", "split.json"]:
        assert (run / f).exists(), f
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 0 and "torch" in env and "peft" in env
    assert "| flat-lora | lora | 8 | test/accuracy | 2 |" in res.markdown and "t-test p" in res.markdown

    # Pairing: one seed = same init and data order, so step 0 (sigma_0 = 0, the noise is off) matches
    # across methods; step 1 differs (noise on); seeds differ from each other.
    lora0, flat0, lora1 = (_curve(out / "runs" / n) for n in ["lora_r8_s0", "flat-lora_r8_s0", "lora_r8_s1"])
    assert float(flat0[0]["sigma"]) == 0 and float(flat0[1]["sigma"]) == pytest.approx(0.5)
    assert flat0[0]["loss"] == lora0[0]["loss"]
    assert flat0[1]["loss"] != lora0[1]["loss"]  # noise on at step 1
    assert lora1[0]["loss"] != lora0[0]["loss"]

    # Resume: finished runs are kept, an interrupted one (only .partial) is redone.
    before = (run / "metrics.json").read_bytes()
    shutil.rmtree(out / "runs" / "lora_r8_s1")
    (out / "runs" / "lora_r8_s1.partial").mkdir()
    res2 = compare(spec, progress=False, log=lambda s: None)
    assert (res2.ran, res2.skipped) == (1, 3)
    assert (run / "metrics.json").read_bytes() == before
    assert not (out / "runs" / "lora_r8_s1.partial").exists()
    assert res2.summary["pairs"] and res2.markdown.splitlines()[4:6] == res.markdown.splitlines()[4:6]

    # A changed config never mixes with (or overwrites) finished results.
    with pytest.raises(ValueError, match="different config .*train.lr"):
        compare(spec.replace(train={**spec.to_dict()["train"], "lr": 0.5}), progress=False, log=lambda s: None)
    assert (run / "metrics.json").read_bytes() == before


def test_run_learns_the_tiny_task(byo_csv, tmp_path):
    from flatlora.experiments.runner import run_one

    spec = load_spec(None, tiny_text_overrides(byo_csv, tmp_path, **{"train.max_steps": "null", "train.epochs": 25,
                                                                      "train.lr": 1e-2, "method": "flat-lora",
                                                                      "lora.targets": "all-linear"}))
    rec = run_one(spec, tmp_path / "r", progress=False)
    assert rec["metrics"]["test/accuracy"] >= 0.8, rec["metrics"]
    with pytest.raises(FileExistsError, match="never overwritten"):
        run_one(spec, tmp_path / "r", progress=False)


def test_bad_data_fails_before_any_run_starts(byo_csv, tmp_path):
    spec = load_spec(None, tiny_text_overrides(byo_csv, tmp_path / "bad", **{"task_args.label_column": "stars"}))
    with pytest.raises(ValueError, match="no column 'stars'"):
        compare(spec, progress=False, log=lambda s: None)
    assert not (tmp_path / "bad" / "runs").exists()
