"""Runs record the data and split they saw; compare never resumes or pairs across a difference, and its
summary covers every finished run of the folder."""

import csv
import json
import re

import pytest

from flatlora.experiments.compare import compare
from flatlora.experiments.provenance import diff_inputs, hash_path
from flatlora.experiments.spec import load_spec

from .conftest import sentiment_rows, tiny_text_overrides

QUIET = {"progress": False, "log": lambda s: None}


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sentence", "sentiment", "y"])
        w.writeheader()
        w.writerows(rows)


def _spec(path, out, **extra):
    return load_spec(None, tiny_text_overrides(path, out, **{"methods": "[lora]", "seeds": "[0]", "train.max_steps": 1,
                                                             "plot": "false", **extra}))


def test_every_run_records_the_fingerprint_of_its_data_and_split(byo_csv, tmp_path):
    res = compare(_spec(byo_csv, tmp_path / "c"), **QUIET)
    inputs = res.records[0]["inputs"]
    assert inputs["data"]["task_args.path"] == hash_path(byo_csv)
    assert inputs["data"]["task_args.path"]["bytes"] == byo_csv.stat().st_size
    split = json.loads((tmp_path / "c" / "runs" / "lora_r8_s0" / "split.json").read_text())
    assert {k: v["n"] for k, v in inputs["split"].items()} == {k: len(v) for k, v in split.items()} == {"train": 64, "test": 16}


def test_a_changed_data_file_is_refused_naming_data_and_split(tmp_path):
    data = tmp_path / "d.csv"
    _write(data, sentiment_rows(60))  # a 48/12 split
    spec = _spec(data, tmp_path / "c")
    compare(spec, **QUIET)
    before = (tmp_path / "c" / "runs" / "lora_r8_s0" / "metrics.json").read_bytes()
    _write(data, sentiment_rows(100))  # same path, now an 80/20 split
    with pytest.raises(ValueError, match=r"lora_r8_s0 was made on different data \(data task_args.path: .* bytes .* "
                                         r"\(finished run\) vs .* \(now\); split test: 12 ids .* vs 20 ids .*; split train: 48 ids"):
        compare(spec.replace(seeds=[0, 1]), **QUIET)
    assert (tmp_path / "c" / "runs" / "lora_r8_s0" / "metrics.json").read_bytes() == before
    assert not (tmp_path / "c" / "runs" / "lora_r8_s1").exists()  # refused before anything trained


def test_same_size_same_split_but_other_content_is_refused_too(tmp_path):
    data = tmp_path / "d.csv"
    rows = sentiment_rows(60)
    _write(data, rows)
    spec = _spec(data, tmp_path / "c")
    compare(spec, **QUIET)
    rows[3] = {**rows[3], "sentence": rows[3]["sentence"].replace("movie", "flick")}
    _write(data, rows)
    with pytest.raises(ValueError, match=r"different data \(data task_args.path: [\d,]+ bytes in 1 file\(s\) \(sha256 \w+\) "
                                         r"\(finished run\) vs [\d,]+ bytes"):
        compare(spec, **QUIET)


def test_a_finished_run_of_another_config_anywhere_in_the_folder_is_refused(byo_csv, tmp_path):
    compare(_spec(byo_csv, tmp_path / "c"), **QUIET)
    with pytest.raises(ValueError, match=r"lora_r8_s0 was made with a different config \(train.lr: 0.01 \(finished run\) vs 0.5"):
        compare(_spec(byo_csv, tmp_path / "c", seeds="[1]", **{"train.lr": 0.5}), **QUIET)  # seed 1 is not in the folder


def test_a_rerun_with_fewer_seeds_still_summarises_every_finished_run(byo_csv, tmp_path):
    out = tmp_path / "c"
    full = compare(_spec(byo_csv, out, methods="[lora,flat-lora]", seeds="[0,1,2]"), **QUIET)
    table = [line for line in full.markdown.splitlines() if line.startswith("| flat-lora | lora |")]
    res = compare(_spec(byo_csv, out, methods="[lora,flat-lora]", seeds="[0]"), **QUIET)
    assert (res.ran, res.skipped) == (0, 2) and len(res.records) == 6
    md = (out / "summary.md").read_text()
    assert "· 3 seeds" in md and [line for line in md.splitlines() if line.startswith("| flat-lora | lora |")] == table
    assert re.search(r"covers all 6 finished runs in .* 4 of them are outside this call's grid .* seeds \[0\]", md)
    with open(out / "runs.csv") as f:
        assert sorted(int(r["seed"]) for r in csv.DictReader(f)) == [0, 0, 1, 1, 2, 2]


def test_runs_without_a_fingerprint_are_kept_with_a_warning(byo_csv, tmp_path):
    spec = _spec(byo_csv, tmp_path / "c")
    compare(spec, **QUIET)
    f = tmp_path / "c" / "runs" / "lora_r8_s0" / "metrics.json"
    rec = json.loads(f.read_text())
    del rec["inputs"]  # as written by an older flatlora
    f.write_text(json.dumps(rec))
    lines = []
    res = compare(spec, progress=False, log=lines.append)
    assert res.skipped == 1 and any("record no data fingerprint" in line and "lora_r8_s0" in line for line in lines)


def test_folder_hash_skips_caches_and_sees_content(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.txt").write_text("one")
    h = hash_path(d)
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (d / ".DS_Store").write_text("x")
    assert hash_path(d) == h and h["files"] == 1 and h["bytes"] == 3
    (d / "sub" / "a.txt").write_text("two")
    assert hash_path(d)["sha256"] != h["sha256"]
    assert diff_inputs({"data": {"x": h}, "split": {}}, {"data": {"x": hash_path(d)}, "split": {}})[0].startswith(
        "data x: 3 bytes in 1 file(s)")
