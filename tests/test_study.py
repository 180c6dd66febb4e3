"""benchmarks/evidence/study.py and report.py: choices on dev only, the plan, resumable stages, a report whose
conclusions follow the numbers."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flatlora.experiments import fetch

ROOT = Path(__file__).resolve().parents[1]
needs_math_data = pytest.mark.skipif(not fetch.status()["math-data"],
                                     reason="needs `python -m flatlora.experiments.fetch math-data` (make test fetches it)")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"evidence_{name}", ROOT / "benchmarks" / "evidence" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


study = _load("study")
report = _load("report")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------------- choices and grids
def test_grid_points_and_names():
    pts = study.grid_points({"train.lr": [1e-3, 5e-4], "train.epochs": [3, 5]})
    assert pts == [{"train.lr": 1e-3, "train.epochs": 3}, {"train.lr": 1e-3, "train.epochs": 5},
                   {"train.lr": 5e-4, "train.epochs": 3}, {"train.lr": 5e-4, "train.epochs": 5}]
    assert study.point_name(pts[2]) == "lr0.0005_ep3"
    assert study.seed_list({"start": 100, "count": 3}) == [100, 101, 102] and study.seed_list([4, 2]) == [4, 2]


def test_choices_read_dev_only_and_need_complete_points():
    pts = [{"point": "a", "complete": True, "mean": 0.80}, {"point": "b", "complete": True, "mean": 0.83},
           {"point": "c", "complete": False, "mean": 0.99}]
    assert study.choose_best(pts, "dev/accuracy")["point"] == "b"          # the incomplete c is never chosen
    with pytest.raises(ValueError, match="dev split only"):
        study.choose_best(pts, "test/accuracy")
    tie = [{"point": "x", "complete": True, "mean": 0.5}, {"point": "y", "complete": True, "mean": 0.5}]
    assert study.choose_best(tie, "dev/accuracy")["point"] == "x"         # first in grid order
    lv = [{"point": "l1", "complete": True, "mean": 0.93}, {"point": "l2", "complete": True, "mean": 0.61},
          {"point": "l3", "complete": True, "mean": 0.24}]
    assert study.choose_headroom(lv, "dev/exact_match", 0.2, 0.8) == (lv[1], True)
    low = [{"point": "l3", "complete": True, "mean": 0.05}, {"point": "l4", "complete": True, "mean": 0.01}]
    assert study.choose_headroom(low, "dev/exact_match", 0.2, 0.8) == (low[0], False)
    with pytest.raises(ValueError, match="dev split only"):
        study.choose_headroom(lv, "test/exact_match", 0.2, 0.8)


def test_a_study_that_chooses_on_test_is_refused(tmp_path):
    cfg = (ROOT / "benchmarks" / "evidence" / "study_text.yaml").read_text().replace("dev_metric: dev/accuracy", "dev_metric: test/accuracy")
    p = tmp_path / "study_bad.yaml"
    p.write_text(cfg)
    with pytest.raises(SystemExit, match="nothing is chosen on test"):
        study.load_study(str(p))


@pytest.mark.parametrize("name", ["text", "image", "llm"])
def test_shipped_studies_validate_and_have_a_tiny_mode(name):
    cfg = study.load_study(name)
    s = study.Study(cfg, Path("/nonexistent"))
    for stage in cfg["stages"]:
        if stage != "sharpness":
            calls, _ = s.calls(stage)
            assert calls and all(c.run_names() for c in calls)  # every spec validates
    main = cfg["stages"]["main"]
    assert len(study.seed_list(main["seeds"])) >= (5 if name == "llm" else 10)
    assert set(main["ranks"]) == {8, 16}
    assert min(study.seed_list(main["seeds"])) > max(study.seed_list(cfg["stages"]["recipe"]["seeds"]))  # fresh seeds
    tiny = study.load_study(name, tiny=True)
    assert tiny["spec"]["model"].startswith("tiny-")


def _borrowed_choices(root: Path, level: int, lr: float, sigma: float) -> None:
    """What the llm study's headroom, recipe and sigma stages leave behind (choice.json), written by hand."""
    for stage, chosen in (("headroom", {"task_args.level": level}), ("recipe", {"train.lr": lr, "train.epochs": 1}),
                          ("sigma", {"flat.sigma": sigma})):
        (root / "llm" / stage).mkdir(parents=True)
        (root / "llm" / stage / "choice.json").write_text(json.dumps({"chosen": chosen, "point": "p", "metric": "dev/exact_match"}))


def test_qlora_study_applies_the_llm_studys_choices(tmp_path):
    cfg = study.load_study("llm_qlora")
    s = study.Study(cfg, tmp_path)
    assert cfg["spec"]["quant"]["type"] == "nf4" and set(cfg["stages"]) == {"main"}
    main = cfg["stages"]["main"]
    assert main["ranks"] == [8] and len(study.seed_list(main["seeds"])) >= 5
    calls, pending = s.calls("main")
    assert pending == ["llm's headroom", "llm's recipe", "llm's sigma"]
    _borrowed_choices(tmp_path, level=3, lr=2e-3, sigma=0.1)
    calls, pending = s.calls("main")
    assert not pending
    spec = calls[0].spec
    assert spec["task_args"]["level"] == 3 and spec["train"]["lr"] == 2e-3 and spec["flat"]["sigma"] == 0.1
    assert spec["quant"]["type"] == "nf4" and spec["methods"] == ["lora", "flat-lora"]
    # everything but the quantization is the llm study's spec, so its choices mean the same thing
    llm = study.load_study("llm")["spec"]
    assert {k: v for k, v in cfg["spec"].items() if k != "quant"} == llm


def test_borrowing_a_stage_that_also_runs_is_refused(tmp_path):
    text = (ROOT / "benchmarks" / "evidence" / "study_llm_qlora.yaml").read_text()
    p = tmp_path / "study_bad.yaml"
    p.write_text(text.replace("  main: {ranks: [8]", "  sigma: {seeds: [0], sigmas: [0.1]}\n  main: {ranks: [8]"))
    with pytest.raises(SystemExit, match=r"stage\(s\) \['sigma'\] both run here and borrowed from llm: drop one"):
        study.load_study(str(p))
    p.write_text(text.replace("stages: [headroom, recipe, sigma]}", "stages: [main]}"))
    with pytest.raises(SystemExit, match="choices_from must be {study: NAME, stages:"):
        study.load_study(str(p))


@needs_math_data
def test_tiny_qlora_study_runs_main_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "evidence" / "study.py"), "llm_qlora", "--tiny", "--out", str(tmp_path)]
    env = {**_env(), "FLATLORA_DATA": str(fetch.data_root())}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0 and "waits for the choice of llm's headroom" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert not (tmp_path / "llm_qlora" / "main" / "runs").exists()
    _borrowed_choices(tmp_path, level=1, lr=1e-2, sigma=0.2)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = tmp_path / "llm_qlora" / "main"
    rec = json.loads((d / "runs" / "flat-lora_r2_s100" / "metrics.json").read_text())
    assert rec["status"] == "done" and rec["flatlora_mode"] == "forward"
    assert rec["run_key"]["quant"]["type"] == "nf4" and rec["run_key"]["flat"]["sigma"] == 0.2
    assert rec["run_key"]["train"]["lr"] == 1e-2
    pair = next(p for p in json.loads((d / "summary.json").read_text())["pairs"] if p["metric"] == "test/exact_match")
    assert pair["n"] == 2 and pair["seeds"] == [100, 101]


def test_plan_counts_runs_and_time(capsys):
    assert study.main(["text", "llm", "--plan", "--jobs", "4", "--out", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith("  ") and ln.split()[0] in study.STAGES}
    assert rows["recipe"][1] == "8" and rows["main"][1] == "20"      # llm printed last: 2x2 grid x 2 seeds; 2x2x5
    assert rows["headroom"][1] == "4"
    assert "waits for headroom, recipe, sigma" in out
    assert "all studies: ~" in out


def test_budget_skips_calls_that_do_not_fit(tmp_path):
    cfg = study.load_study("text", tiny=True)
    s = study.Study(cfg, tmp_path, device="cpu")
    calls, _ = s.calls("recipe")
    logs = []
    status = study.run_calls(calls, study.Budget(jobs=2, deadline=time.time() + 1), can_jobs=False, log=logs.append)
    assert status["skipped"] == [study.label(c) for c in calls] and not status["done"]
    assert not any((c.out_dir / "runs").exists() for c in calls)
    assert all("do not fit the budget" in ln for ln in logs)


def test_budget_wall_estimate():
    b = study.Budget(jobs=4, efficiency=0.5, call_overhead_s=10)
    assert b.wall(8, 20, 4) == pytest.approx(10 + 8 * 20 / 2)
    assert b.wall(3, 20, 1) == pytest.approx(10 + 60)
    assert b.wall(0, 20, 4) == 0


# ---------------------------------------------------------------------- end to end (CPU, tiny models)
@needs_math_data
def test_tiny_llm_study_runs_every_stage_and_resumes(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "evidence" / "study.py"), "llm", "--tiny", "--out", str(tmp_path),
           "--jobs", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "FLATLORA_DATA": str(fetch.data_root())},
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = tmp_path / "llm"
    for stage in ("headroom", "recipe", "sigma"):
        summ = json.loads((d / stage / "summary.json").read_text())
        assert summ["complete"] and summ["metric"] == "dev/exact_match"
        choice = json.loads((d / stage / "choice.json").read_text())
        assert choice["metric"] == "dev/exact_match" and choice["point"] in [p["point"] for p in summ["points"]]
        assert (d / stage / "runs.csv").read_text().startswith("point,")
    lvl = json.loads((d / "headroom" / "choice.json").read_text())["chosen"]["task_args.level"]
    sig = json.loads((d / "sigma" / "choice.json").read_text())["chosen"]["flat.sigma"]
    # later stages ran with the choices of the earlier ones
    main_cfg = json.loads((d / "main" / "runs" / "flat-lora_r2_s100" / "metrics.json").read_text())["run_key"]
    assert main_cfg["task_args"]["level"] == lvl and main_cfg["flat"]["sigma"] == sig
    main = json.loads((d / "main" / "summary.json").read_text())
    assert {c["method"] for c in main["cells"]} == {"lora", "flat-lora"}
    pair = next(p for p in main["pairs"] if p["metric"] == "test/exact_match")
    assert pair["n"] == 2 and pair["seeds"] == [100, 101]
    assert (d / "main" / "runs.csv").exists() and (d / "main" / "pairs.csv").exists()
    sharp = json.loads((d / "sharpness" / "summary.json").read_text())
    assert sharp["seeds"] == [100, 101] and "lambda_max" in sharp["pairs"] and "esharp_0.05" in sharp["pairs"]
    assert len(json.loads((d / "commands.jsonl").read_text().splitlines()[0])["argv"]) > 2
    # resume: nothing is re-trained, the summaries are re-written from the finished runs
    stamp = (d / "main" / "runs" / "lora_r2_s100" / "metrics.json").stat().st_mtime
    r2 = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "FLATLORA_DATA": str(fetch.data_root())},
                        timeout=300, cwd=ROOT)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "start " not in r2.stdout and "sharpness: 0 models" in r2.stdout
    assert (d / "main" / "runs" / "lora_r2_s100" / "metrics.json").stat().st_mtime == stamp
    # the pack leaves the weights behind
    tar = tmp_path / "pack.tgz"
    study.pack(tmp_path, ["llm"], tar)
    import tarfile

    names = tarfile.open(tar).getnames()
    assert any(n.endswith("main/summary.json") for n in names)
    assert not any(n.endswith(".safetensors") for n in names)
    curves = [n for n in names if "curve.csv" in n]
    assert curves and all(n.endswith("curve.csv.gz") for n in curves)  # gzipped: the tree travels every call
    import gzip as _gzip

    run_curve = d / "main" / "runs" / "lora_r2_s100" / "curve.csv"
    member = next(n for n in curves if n.endswith("main/runs/lora_r2_s100/curve.csv.gz"))
    assert _gzip.decompress(tarfile.open(tar).extractfile(member).read()) == run_curve.read_bytes()
    assert sum(n.endswith("split.json") for n in names) == 4  # one per stage that trained
    # on another machine (the pack left the weights behind), sharpness trains a model again from its config
    for m in ("lora", "flat-lora"):
        (d / "main" / "runs" / f"{m}_r2_s101" / "weights.safetensors").unlink()
        (d / "sharpness" / "per_run" / f"{m}_r2_s101.json").unlink()
    before = json.loads((d / "sharpness" / "summary.json").read_text())
    r3 = subprocess.run(cmd + ["--stages", "sharpness"], capture_output=True, text=True,
                        env={**_env(), "FLATLORA_DATA": str(fetch.data_root())}, timeout=300, cwd=ROOT)
    assert r3.returncode == 0, r3.stdout[-3000:] + r3.stderr[-3000:]
    assert "no weights on this machine for lora_r2_s101, flat-lora_r2_s101; training them again" in r3.stdout
    rec = json.loads((d / "sharpness" / "per_run" / "flat-lora_r2_s101.json").read_text())
    assert rec["retrained"] and rec["run_dir"] == "sharpness/retrained/runs/flat-lora_r2_s101"
    again = json.loads((d / "sharpness" / "retrained" / "runs" / "flat-lora_r2_s101" / "metrics.json").read_text())
    main101 = json.loads((d / "main" / "runs" / "flat-lora_r2_s101" / "metrics.json").read_text())
    assert again["run_key"] == main101["run_key"] and again["seed"] == 101
    # on CPU the same seed trains the same model: its metrics and sharpness are main's
    assert again["metrics"] == main101["metrics"] and rec["test_metric"] == rec["main_test_metric"]
    after = json.loads((d / "sharpness" / "summary.json").read_text())
    assert after["seeds"] == [100, 101] and after["pairs"]["lambda_max"] == pytest.approx(before["pairs"]["lambda_max"])
    assert [row[:2] for row in after["retrained"]] == [["flat-lora", 101], ["lora", 101]]
    # packed again (the retrained weights left behind too) and not measured yet: trained once more, alone
    (d / "sharpness" / "retrained" / "runs" / "flat-lora_r2_s101" / "weights.safetensors").unlink()
    (d / "sharpness" / "per_run" / "flat-lora_r2_s101.json").unlink()
    r4 = subprocess.run(cmd + ["--stages", "sharpness"], capture_output=True, text=True,
                        env={**_env(), "FLATLORA_DATA": str(fetch.data_root())}, timeout=300, cwd=ROOT)
    assert r4.returncode == 0, r4.stdout[-3000:] + r4.stderr[-3000:]
    assert "no weights on this machine for flat-lora_r2_s101; training them again" in r4.stdout
    assert (d / "sharpness" / "per_run" / "flat-lora_r2_s101.json").exists()


# ---------------------------------------------------------------------- report
def _fixture(root: Path, name: str, lora: list[float], flat: list[float], test_metric="test/accuracy"):
    """A study folder as study.py leaves it: study.yaml, main runs + summary, a sigma stage and sharpness."""
    import yaml

    cfg = study.load_study(name)
    d = root / name
    d.mkdir(parents=True)
    (d / "study.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "tiny"}))
    recs = []
    for i, (a, b) in enumerate(zip(lora, flat)):
        for method, v in (("lora", a), ("flat-lora", b)):
            rec = {"method": method, "rank": 8, "seed": 100 + i, "metrics": {test_metric: v, "dev/accuracy": v},
                   "primary_metric": test_metric, "train_seconds": 30.0 if method == "lora" else 35.0,
                   "eval_seconds": 2.0, "steps": 10, "point": ""}
            run = d / "main" / "runs" / f"{method}_r8_s{100 + i}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps(rec))
            (run / "env.json").write_text(json.dumps({"device": "cuda", "torch": "2.x", "task": {"sizes": {"train": 7}}}))
            recs.append(rec)
    study.summarize_comparison(d / "main", recs, {**cfg, "study": name}, "main")
    sp = d / "sharpness" / "per_run"
    sp.mkdir(parents=True)
    for i in range(len(lora)):
        for method, inc in (("lora", 0.02 + 0.001 * i), ("flat-lora", 0.01 + 0.001 * i)):
            (sp / f"{method}_r8_s{100 + i}.json").write_text(json.dumps({
                "method": method, "rank": 8, "seed": 100 + i, "base_loss": 0.3, "test_metric": 0.8, "seconds": 1,
                "expected": [{"sigma": 0.05, "increase": inc}], "hessian": {"eigenvalue": 5.0 + i}, "settings": {}}))
    study.summarize_sharpness(d / "sharpness", {})
    return d


def test_report_conclusions_follow_the_numbers(tmp_path):
    lora = [0.800, 0.810, 0.805, 0.795, 0.802, 0.808]
    better = [x + 0.010 + 0.001 * (i % 2) for i, x in enumerate(lora)]
    same = [x + (0.002 if i % 2 else -0.002) for i, x in enumerate(lora)]
    _fixture(tmp_path / "a", "text", lora, better)
    _fixture(tmp_path / "b", "text", lora, same)
    ra = report.render(tmp_path / "a", tmp_path / "a.md", figures=False)
    rb = report.render(tmp_path / "b", tmp_path / "b.md", figures=False)
    assert "- text, r = 8, test/accuracy: Flat-LoRA is higher (Δ +1.05 points" in ra
    assert "- text, r = 8, test/accuracy: no detectable effect (Δ +0.00 points" in rb
    assert "Flat-LoRA is higher" not in rb
    # sharpness: flat-lora's expected sharpness is lower in every pair; λ_max equal -> no difference
    assert "esharp_0.05: lower (flatter)" in ra and "lambda_max: no detectable difference" in ra
    assert "| text | test/accuracy | 8 | 6 | 80.33 ± 0.55 |" in ra  # mean ± std of the fixture, in %
    assert "30 → 35" in ra
    assert "| flat-lora | 8 | 6 | 81.38 ± 0.56 | 81.38 ± 0.56 | 35.0 | 2 | not recorded |" in ra  # eval s from the cells


def test_report_flags_a_task_without_headroom(tmp_path):
    _fixture(tmp_path, "llm", [0.01, 0.02, 0.0], [0.02, 0.01, 0.0], test_metric="test/exact_match")
    text = report.render(tmp_path, tmp_path / "R.md", figures=False)
    assert "outside the 20.00–80.00 % headroom range" in text and "not counted (no headroom)" in text


def test_report_shows_the_humaneval_check_and_whether_it_applies(tmp_path):
    d = _fixture(tmp_path, "llm", [0.5, 0.55, 0.6], [0.52, 0.56, 0.6], test_metric="test/exact_match")
    prov = {"device": "cpu", "date": "2026-12-03", "command": "python benchmarks/evidence/humaneval_check.py",
            "decoding": "greedy, 384 new tokens, batch 8"}
    base = {"model": "smollm2-135m", "adapter": None, "pass@1": 0.0, "passed": 0, "problems": 164, "seconds": 1}
    (d / "humaneval_base.json").write_text(json.dumps({"provenance": prov, "rows": [base]}))
    text = report.render(tmp_path, tmp_path / "R.md", figures=False)
    assert "### HumanEval (out-of-domain code check)" in text and "| smollm2-135m | (base) | 0.00 % | 0 / 164 |" in text
    assert "- llm, HumanEval pass@1: the base model passes none of 164 problems" in text
    (d / "humaneval_base.json").write_text(json.dumps({"provenance": prov, "rows": [{**base, "pass@1": 3 / 164,
                                                                                      "passed": 3}]}))
    text = report.render(tmp_path, tmp_path / "R.md", figures=False)
    assert "- llm, HumanEval pass@1: the base model passes 3 of 164, so the check applies" in text


def test_verdict_rules():
    assert report.verdict({"mean_diff": -0.01, "ci_low": -0.02, "ci_high": -0.001, "n": 5, "t_pvalue": 0.03}).startswith("Flat-LoRA is lower")
    assert report.verdict({"mean_diff": 0.0, "ci_low": float("nan"), "ci_high": float("nan"), "n": 1}).startswith("not enough")
    assert report.headroom_verdict(0.2)[0] and not report.headroom_verdict(0.81)[0]
    # "no detectable effect" says what it rules out, also for a summary written before detectable_diff existed
    old = {"mean_diff": 0.001, "ci_low": -0.002, "ci_high": 0.004, "n": 10, "t_pvalue": 0.5, "std_diff": 0.01}
    assert report.verdict(old).endswith("; a true Δ of ±1.00 points would have been found with 80 % power)")
    assert report.det(old) == "±1.00" and report.det({"n": 1, "std_diff": float("nan")}) == "–"


def test_report_with_figures_and_no_results(tmp_path):
    pytest.importorskip("matplotlib")
    empty = report.render(tmp_path / "none", tmp_path / "empty.md")
    assert "No study results found yet" in empty
    _fixture(tmp_path / "r", "text", [0.8, 0.81, 0.79], [0.81, 0.8, 0.8])
    text = report.render(tmp_path / "r", tmp_path / "r" / "RESULTS.md")
    assert "(rank_curves.png)" in text and (tmp_path / "r" / "rank_curves.png").stat().st_size > 1000


@pytest.mark.skipif(not fetch.status()["image"], reason="needs `python -m flatlora.experiments.fetch image`")
def test_image_study_dev_split_is_carved_outside_train():
    """fashion-mnist's dev_size (used by the image study): training images not in the train subset, stratified."""
    from collections import Counter

    from flatlora.experiments.tasks import create_task

    t = create_task("fashion-mnist", model="tiny-effnet", train_size=1000, dev_size=200, test_size=100)
    ids = t.split_record()
    assert len(ids["dev"]) == 200 and not set(ids["dev"]) & set(ids["train"])
    assert set(Counter(t.evals["dev"][1].tolist()).values()) == {20}   # 10 balanced classes
    assert t.primary_metric == "test/accuracy"
    again = create_task("fashion-mnist", model="tiny-effnet", train_size=1000, dev_size=200, test_size=100)
    assert again.split_record() == ids
    with pytest.raises(ValueError, match="dev_size"):
        create_task("fashion-mnist", model="tiny-effnet", train_size=None, dev_size=10)


def test_report_status_flags_studies_with_fewer_paired_seeds_than_planned(tmp_path):
    _fixture(tmp_path / "few", "text", [0.8, 0.81, 0.79], [0.81, 0.8, 0.8])  # 3 of the 10 planned seeds
    text = report.render(tmp_path / "few", tmp_path / "few.md", figures=False)
    # sharpness is measured per main seed with its weights: 3 of 10 is flagged too
    assert ("| text | main, sharpness | r8: 3 (10) | INCOMPLETE: 3 of 10 paired seeds, sharpness 3 of 10; resume with "
            "the same command |") in text
    assert "| image | – | – | not run yet" in text
    lora = [0.80 + 0.001 * i for i in range(10)]
    _fixture(tmp_path / "all", "text", lora, [x + 0.002 for x in lora])
    text = report.render(tmp_path / "all", tmp_path / "all.md", figures=False)
    assert "| text | main, sharpness | r8: 10 (10) | complete |" in text


# ---------------------------------------------------------------------- optional stages: variants and sam
def test_equal_time_budget_from_given_seconds():
    t = study.equal_time_budget([97.0, 99.0], [180.0, 184.0], [1160, 1160], 5)
    assert t["flat_seconds"] == 98.0 and t["sam_seconds"] == 182.0 and t["sam_seconds_per_step"] == pytest.approx(182 / 1160)
    assert t["scale"] == pytest.approx(98 / 182) and t["max_steps"] == round(1160 * 98 / 182) == 625
    assert t["epochs"] == 5  # fewer steps: the epochs stay, max_steps cuts (and the lr schedule follows it)
    up = study.equal_time_budget([30.0], [20.0], [100], 2)  # SAM cheaper than Flat-LoRA: more steps, more epochs
    assert up["max_steps"] == 150 and up["epochs"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="positive training seconds"):
        study.equal_time_budget([10.0], [0.0], [5], 1)


def _run_record(d: Path, method: str, rank: int, seed: int, train_seconds: float, steps: int = 100):
    run = d / "runs" / f"{method}_r{rank}_s{seed}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"method": method, "rank": rank, "seed": seed, "train_seconds": train_seconds,
                                                  "steps": steps, "metrics": {"test/accuracy": 0.8, "dev/accuracy": 0.8}}))


def test_a_comparison_stage_whose_runs_all_failed_is_still_summarised(tmp_path):
    s = study.Study(study.load_study("image"), tmp_path)
    d = s.dir / "variants"
    for seed in (300, 301):
        for method in ("dora", "flat-dora"):
            run = d / "runs" / f"{method}_r8_s{seed}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({
                "method": method, "rank": 8, "seed": seed, "train_seconds": 1.5, "steps": 474, "metrics": {},
                "status": "failed", "failure": "diverged: the loss became nan at step 0 (lr 0)",
                "primary_metric": "test/accuracy"}))
    summary = s.summarize("variants")
    assert summary["stage"] == "variants" and [c["n"] for c in summary["cells"]] == [0, 0]
    md = (d / "summary.md").read_text()
    assert "- flat-dora r=8 seed 301: diverged: the loss became nan at step 0 (lr 0)" in md
    assert json.loads((d / "summary.json").read_text())["cells"][0]["failed_seeds"] == [300, 301]
    if importlib.util.find_spec("matplotlib"):
        assert (d / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_sam_timing_reads_main_and_is_frozen_once_measured(tmp_path):
    cfg = study.load_study("text")
    cfg["stages"]["sam"].update(seeds=[200, 201], time_reference="main")
    s = study.Study(cfg, tmp_path)
    d = tmp_path / "text"
    _run_record(d / "sam" / "equal_steps", "lora-sam", 8, 200, 190.0)
    for seed, sec in ((100, 96.0), (101, 100.0)):
        _run_record(d / "main", "flat-lora", 8, seed, sec)
    _run_record(d / "main", "flat-lora", 16, 100, 500.0)   # another rank: not the reference
    assert s.sam_timing("lora-sam") is None                # seed 201 of lora-sam not finished yet
    calls, _ = s.calls("sam")
    assert [c.point for c in calls] == ["equal_steps"]     # the equal-time calls wait for the measurement
    _run_record(d / "sam" / "equal_steps", "lora-sam", 8, 201, 210.0)
    _run_record(d / "sam" / "equal_steps", "flat-lora", 8, 200, 120.0)
    t = s.sam_timing("lora-sam")
    assert t["flat_seconds"] == 98.0 and t["sam_seconds"] == 200.0 and t["max_steps"] == 49 and t["scale"] == 0.49
    assert t["flat_source"] == "main: flat-lora r8, seeds [100, 101]" and t["flat_seconds_this_stage"] == 120.0
    assert json.loads((d / "sam" / "timing.json").read_text())["lora-sam"]["max_steps"] == 49
    _run_record(d / "main", "flat-lora", 8, 102, 400.0)    # later runs do not move a frozen budget
    assert s.sam_timing("lora-sam")["max_steps"] == 49
    calls, _ = s.calls("sam")
    (et,) = [c for c in calls if c.point == "equal_time_lora-sam"]
    assert et.spec["methods"] == ["lora-sam"] and et.spec["train"]["max_steps"] == 49 and et.spec["seeds"] == [200, 201]
    assert et.out_dir == d / "sam" / "equal_time_lora-sam" and et.est_run_s == pytest.approx(98.0 + 5)
    assert s.sam_timing("sam-w") is None
    # time_reference: stage takes Flat-LoRA's equal-steps runs of the stage itself
    cfg2 = study.load_study("text")
    cfg2["stages"]["sam"].update(seeds=[200, 201], time_reference="stage")
    (d / "sam" / "timing.json").unlink()
    _run_record(d / "sam" / "equal_steps", "flat-lora", 8, 201, 140.0)
    assert study.Study(cfg2, tmp_path).sam_timing("lora-sam")["flat_seconds"] == 130.0
    # main's seconds from other GPU load than the stage's are refused, not divided by: main's mean is now
    # (96 + 100 + 400) / 3 = 199 s (seed 102 above), the stage's Flat-LoRA (120 + 140) / 2 = 130 s
    (d / "sam" / "timing.json").unlink()
    with pytest.raises(SystemExit, match=r"study_text.yaml: stages.sam: Flat-LoRA trained 199 s/run in main but 130 "
                                         r"s/run beside the SAM runs of this stage \(more than 25% apart: different "
                                         r"GPU load\), so main's seconds cannot set SAM's budget; set time_reference: stage"):
        s.sam_timing("lora-sam")
    assert not (d / "sam" / "timing.json").exists()


@pytest.mark.parametrize("change, message", [
    ("variants: {rank: 8, pairs: [[dora, flat-pissa]], seeds: [300]}", "each pair is \\[X, flat-X\\]"),
    ("variants: {rank: 8, pairs: [[dora, flat-dora]], seeds: [105, 300]}", "reuses main's seeds \\[105\\]"),
    ("sam: {rank: 8, methods: [lora-sam, dora], seeds: [200]}", "SAM baselines"),
    ("sam: {rank: 8, methods: [lora-sam], seeds: [200], time_reference: test}", "time_reference"),
    ("sam: {rank: 8, methods: [lora-samm], seeds: [200]}", "unknown method 'lora-samm'"),
])
def test_variants_and_sam_configs_are_checked(tmp_path, change, message):
    import re

    text = (ROOT / "benchmarks" / "evidence" / "study_text.yaml").read_text()
    stage = change.split(":")[0]
    text = re.sub(rf"^  {stage}: .*$", "  " + change, text, count=1, flags=re.M)
    p = tmp_path / "study_x.yaml"
    p.write_text(text)
    with pytest.raises(SystemExit, match=message):
        study.load_study(str(p))


def test_a_pissa_pair_on_the_image_models_convs_is_refused_before_the_device_is_used(tmp_path, capsys):
    cfg = study.load_study("image", tiny=True)
    assert cfg["stages"]["variants"]["pairs"] == [["dora", "flat-dora"]]  # the shipped study runs what can run
    study.check_variant_layers(study.Study(cfg, tmp_path))  # tiny-effnet's random convs have no zero filter
    cfg["stages"]["variants"]["pairs"].append(["pissa", "flat-pissa"])
    with pytest.raises(SystemExit, match=r"study_image.yaml: stages.variants: method 'pissa': PiSSA's SVD initialisation "
                                         r"exists in PEFT for Linear layers only, but lora.targets selects 32 Conv2d "
                                         r"layers \(_blocks.0._project_conv, .*drop that pair"):
        study.check_variant_layers(study.Study(cfg, tmp_path))
    study.check_variant_layers(study.Study(study.load_study("text", tiny=True), tmp_path))  # Linear targets: fine
    assert not list(tmp_path.rglob("runs"))


def test_a_choice_made_on_test_is_refused_by_every_later_stage(tmp_path):
    s = study.Study(study.load_study("text"), tmp_path)
    (tmp_path / "text" / "recipe").mkdir(parents=True)
    (tmp_path / "text" / "recipe" / "choice.json").write_text(json.dumps(
        {"point": "lr0.001_ep3", "chosen": {"train.lr": 1e-3}, "mean": 0.9, "metric": "test/accuracy"}))
    for stage in ("sigma", "main", "variants", "sam"):
        with pytest.raises(SystemExit, match="only a dev metric may choose"):
            s.calls(stage)


def test_tiny_variants_and_sam_stages_run_reuse_the_choices_and_resume(tmp_path):
    d = tmp_path / "text"
    for stage, chosen in (("recipe", {"train.lr": 2e-3, "train.epochs": 1}), ("sigma", {"flat.sigma": 0.3})):
        (d / stage).mkdir(parents=True)
        (d / stage / "choice.json").write_text(json.dumps({"point": "x", "chosen": chosen, "mean": 0.5, "metric": "dev/accuracy"}))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "evidence" / "study.py"), "text", "--tiny", "--out", str(tmp_path),
           "--stages", "variants,sam", "--set", "stages/sam/time_reference=stage",
           "--set", "stages/variants/seeds=[300]"]
    env = {**_env(), "FLATLORA_DATA": str(fetch.data_root())}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    var = json.loads((d / "variants" / "summary.json").read_text())
    assert {(p["method"], p["baseline"]) for p in var["pairs"]} == {("flat-dora", "dora"), ("flat-pissa", "pissa")}
    rec = json.loads((d / "variants" / "runs" / "flat-dora_r2_s300" / "metrics.json").read_text())
    assert rec["run_key"]["train"]["lr"] == 2e-3 and rec["run_key"]["flat"]["sigma"] == 0.3 and rec["rank"] == 2
    timing = json.loads((d / "sam" / "timing.json").read_text())
    runs = {m: [json.loads(f.read_text()) for f in sorted((d / "sam" / "equal_steps" / "runs").glob(f"{m}_r2_s*/metrics.json"))]
            for m in ("flat-lora", "lora-sam", "sam-w")}
    for m in ("lora-sam", "sam-w"):
        t = timing[m]
        flat = sum(x["train_seconds"] for x in runs["flat-lora"]) / 2
        mine = sum(x["train_seconds"] for x in runs[m]) / 2
        assert t["flat_seconds"] == pytest.approx(flat) and t["sam_seconds"] == pytest.approx(mine)
        assert t["max_steps"] == max(1, round(runs[m][0]["steps"] * flat / mine))
        done = [json.loads(f.read_text()) for f in (d / "sam" / f"equal_time_{m}" / "runs").glob("*/metrics.json")]
        assert sorted(x["seed"] for x in done) == [200, 201] and {x["steps"] for x in done} == {t["max_steps"]}
        assert done[0]["run_key"]["flat"]["sigma"] == 0.3 and done[0]["run_key"]["train"]["lr"] == 2e-3
    sam = json.loads((d / "sam" / "summary.json").read_text())
    assert {(c["method"], c["budget"]) for c in sam["cells"]} == {
        ("lora", "equal_steps"), ("flat-lora", "equal_steps"), ("lora-sam", "equal_steps"), ("lora-sam", "equal_time"),
        ("sam-w", "equal_steps"), ("sam-w", "equal_time")}
    p = next(p for p in sam["pairs"] if (p["method"], p["budget"], p["baseline"], p["metric"])
             == ("sam-w", "equal_time", "flat-lora", "test/accuracy"))
    assert p["n"] == 2 and p["seeds"] == [200, 201]
    assert "equal wall-clock: " in r.stdout
    # resume: nothing is re-trained
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r2.returncode == 0 and "start " not in r2.stdout, r2.stdout[-2000:] + r2.stderr[-2000:]
    # the report gains both sections, with the timing
    import yaml

    (d / "study.yaml").write_text(yaml.safe_dump({k: v for k, v in study.load_study("text").items() if k != "tiny"}))
    text = report.render(tmp_path, tmp_path / "R.md", figures=False)
    assert "### Flat- variants against their methods" in text and "| Flat-DoRA vs DoRA | test/accuracy | 2 | 1 |" in text
    assert "### SAM baselines at equal steps and at equal wall-clock" in text
    assert f"| {timing['sam-w']['max_steps']} |" in text and "Equal wall-clock** means equal TRAINING seconds" in text
    assert "- text, SAM-on-W at equal time vs Flat-LoRA, r = 2, test/accuracy:" in text
    assert "variants: 1 of 5 paired seeds per pair; sam: 2 of 5 paired seeds at equal wall-clock" in text


def test_report_without_the_optional_stages_has_none_of_their_sections(tmp_path):
    _fixture(tmp_path, "text", [0.8, 0.81, 0.79], [0.81, 0.8, 0.8])
    text = report.render(tmp_path, tmp_path / "R.md", figures=False)
    assert "variants" not in text and "SAM" not in text and "equal wall-clock" not in text


def test_each_call_gets_a_share_of_the_cores(tmp_path, monkeypatch):
    """Runs of a study share the machine's cores (cores / --jobs, or --threads) unless the spec sets its own:
    the call file a dry run writes carries it, and the runs' OpenMP threads do not spin."""
    monkeypatch.setattr(study.os, "cpu_count", lambda: 16)
    assert study.Budget(jobs=8).threads_per_run() == 2
    assert study.Budget(jobs=32).threads_per_run() == 1
    assert study.Budget(jobs=8, threads=3).threads_per_run() == 3
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert study.child_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    def threads_written(*extra):
        out = tmp_path / f"ev{len(extra)}"
        assert study.main(["text", "--tiny", "--dry-run", "--stages", "recipe", "--jobs", "4", "--out", str(out),
                           *extra]) == 0
        calls = sorted(out.rglob("study_call.yaml"))
        assert calls
        return {yaml.safe_load(f.read_text())["train"]["threads"] for f in calls}

    assert threads_written() == {1}  # the tiny spec's own threads: 1
    assert threads_written("--set", "spec/train/threads=null") == {4}  # 16 cores / 4 jobs
    assert threads_written("--set", "spec/train/threads=null", "--threads", "3") == {3}


# ---------------------------------------------------------------------- carrying the data to the GPU machine
def test_the_fp16_transfer_keeps_a_tensor_fp16_would_change_beyond_rounding():
    import torch

    carry = _load("carry")
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert carry._fp16_for_transfer(w).dtype == torch.float16  # ordinary weights: half the bytes
    tiny = w.clone()
    tiny[1] *= 1e-9  # a filter of norm ~3e-9, as EfficientNet-Lite0 has: fp16 would make it exactly 0
    assert (tiny[1].half() == 0).all()
    kept = carry._fp16_for_transfer(tiny)
    assert kept.dtype == torch.float32 and torch.equal(kept, tiny)
    speck = w.clone()
    speck[2, 3] = 1e-9  # one entry flushed inside an ordinary row (MiniLM's embeddings have 7): rounding, not a change
    assert carry._fp16_for_transfer(speck).dtype == torch.float16
    big = w.clone()
    big[0, 0] = 1e6  # beyond fp16's 65504
    assert carry._fp16_for_transfer(big).dtype == torch.float32
    ids = torch.arange(5)
    assert carry._fp16_for_transfer(ids) is ids


@pytest.mark.skipif(not fetch.status()["image"], reason="needs `python -m flatlora.experiments.fetch image`")
def test_the_carried_efficientnet_keeps_every_filter_nonzero(tmp_path):
    """Packed and unpacked as for the GPU machine, every filter keeps a nonzero norm (in fp16 all the way, 38
    filters of 13 LoRA-targeted convs arrived as zeros and DoRA refused them on the H200)."""
    import torch

    carry = _load("carry")
    carry._pack_image(fetch.data_root(), tmp_path / "bundle", fetch)
    carry.unpack([tmp_path / "bundle" / "image"], tmp_path / "data", tmp_path / "site")
    before = torch.load(fetch.effnet_file(), map_location="cpu", weights_only=True)
    after = torch.load(fetch.effnet_file(tmp_path / "data"), map_location="cpu", weights_only=True)
    assert before.keys() == after.keys()
    for k, v in before.items():
        got = after[k]
        assert got.dtype == v.dtype, k
        if v.is_floating_point() and v.dim() == 4:
            assert ((got.flatten(1).norm(dim=1) > 0) == (v.flatten(1).norm(dim=1) > 0)).all(), k
            torch.testing.assert_close(got, v, rtol=2**-11, atol=2**-25)  # fp16 rounding (subnormals: half a step)
