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


@pytest.mark.slow  # two spawned workers import torch + transformers: ~30-60 s on a busy 2-core machine
def test_jobs_2_trains_the_same_runs_as_jobs_1_without_cuda_in_the_parent(byo_csv, tmp_path, monkeypatch):
    import torch

    over = {"methods": "[lora,flat-lora]", "seeds": "[0]", "flat.sigma": 0.5, "train.threads": 1, "plot": "false"}
    one = load_spec(None, tiny_text_overrides(byo_csv, tmp_path / "j1", **over))
    two = one.replace(out_dir=str(tmp_path / "j2"), jobs=2)

    def no_cuda(*a, **k):
        raise AssertionError("the parent initialised CUDA: spawned workers would each pay for a context it holds")

    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    r1 = compare(one, progress=False, log=lambda s: None)
    lines = []
    r2 = compare(two, progress=False, log=lines.append)
    assert (r2.ran, r2.errors) == (2, []) and sum("[job " in line for line in lines) == 2
    for name in ["lora_r8_s0", "flat-lora_r8_s0"]:
        a, b = (json.loads((tmp_path / d / "runs" / name / "metrics.json").read_text()) for d in ("j1", "j2"))
        assert a["metrics"] == b["metrics"] and a["inputs"] == b["inputs"], name
        assert [(r["loss"], r["lr"], r["sigma"]) for r in _curve(tmp_path / "j1" / "runs" / name)] == \
               [(r["loss"], r["lr"], r["sigma"]) for r in _curve(tmp_path / "j2" / "runs" / name)]
    assert r1.markdown == r2.markdown
    again = compare(two, progress=False, log=lambda s: None)  # resume under --jobs: nothing to redo
    assert (again.ran, again.skipped) == (0, 2)


@pytest.mark.parametrize("jobs", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_run_that_raises_is_reported_and_the_grid_goes_on(byo_csv, tmp_path, jobs):
    # lora.targets names no module: every LoRA run raises in PEFT; full fine-tuning ignores targets and trains.
    spec = load_spec(None, tiny_text_overrides(byo_csv, tmp_path / "c", **{
        "methods": "[lora,full]", "seeds": "[0]", "lora.targets": "[no_such_module]", "jobs": jobs, "plot": "false"}))
    res = compare(spec, progress=False, log=lambda s: None)
    assert res.ran == 1 and [e["run"] for e in res.errors] == ["lora_r8_s0"]
    assert "NoMatchingPeftModuleError" in res.errors[0]["error"]
    assert "Traceback" in (tmp_path / "c" / "runs" / "lora_r8_s0.partial" / "error.txt").read_text()
    assert (tmp_path / "c" / "runs" / "full_r8_s0" / "metrics.json").exists()
    assert "Runs that raised an error" in res.markdown and "- lora_r8_s0: " in res.markdown
    retry = compare(spec, progress=False, log=lambda s: None)  # the next call retries it, keeps the finished one
    assert (retry.ran, retry.skipped, len(retry.errors)) == (0, 1, 1)


def test_diverged_runs_are_failed_rows_of_the_table_and_the_grid_goes_on(byo_csv, tmp_path):
    spec = load_spec(None, tiny_text_overrides(byo_csv, tmp_path / "c", **{
        "methods": "[lora,full]", "seeds": "[0,1]", "train.lr": 1e30, "train.warmup_ratio": 0, "train.max_steps": 1}))
    res = compare(spec, progress=False, log=lambda s: None)
    assert res.ran == 4 and not res.errors
    assert [(f["method"], f["seed"]) for f in res.failed] == [("lora", 0), ("lora", 1)]
    assert "| lora | 8 | 0 | – | – | seed 0, seed 1 |" in res.markdown
    assert "| full | 8 | 2 |" in res.markdown and "- lora r=8 seed 0: diverged: " in res.markdown
    with open(tmp_path / "c" / "runs.csv") as f:
        rows = {(r["method"], r["seed"]): r for r in csv.DictReader(f)}
    assert rows[("lora", "0")]["status"] == "failed" and rows[("lora", "0")]["failure"].startswith("diverged")
    assert rows[("full", "0")]["status"] == "done"
    again = compare(spec, progress=False, log=lambda s: None)  # a failed run is a result: kept, not redone
    assert (again.ran, again.skipped) == (0, 4)
