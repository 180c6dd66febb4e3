"""reasoning-arith: deterministic generation, disjoint splits, the difficulty knobs, exact-match scoring."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flatlora.experiments import fetch
from flatlora.experiments.tasks import create_task
from flatlora.experiments.tasks.reasoning import exact_match, parse_answer

needs_math_data = pytest.mark.skipif(not fetch.status()["math-data"],
                                     reason="needs `python -m flatlora.experiments.fetch math-data` (make test fetches it)")
SMALL = dict(train_size=40, dev_size=10, test_size=20, ood_size=10)


def test_parse_answer_reads_the_first_line_only():
    assert parse_answer(" -103\nQuestion: 4 + 4 = 8") == [-103.0]
    assert parse_answer("\n\n 42 apples") == [42.0]
    assert parse_answer("['4.0', '40.0', '75.0']") == [4.0, 40.0, 75.0]
    assert parse_answer("") == [] and parse_answer("no number") == []


@pytest.mark.parametrize("completion, answer, expected", [
    ("-37", (-37.0,), True), (" -37.0", (-37.0,), True), ("37", (-37.0,), False),   # sign matters
    ("-37 or -38", (-37.0,), False),                                                 # one answer, not a list
    ("-3", (-37.0,), False), ("-370", (-37.0,), False),
    ("['9.0', '25.0', '83.0']", (9.0, 25.0, 83.0), True),
    ("[9, 25, 83]", (9.0, 25.0, 83.0), True),
    ("['25.0', '9.0', '83.0']", (9.0, 25.0, 83.0), False),                           # order matters
    ("['9.0', '25.0']", (9.0, 25.0, 83.0), False),                                   # a number missing
    ("\n['9.0', '25.0', '83.0']\n['1']", (9.0, 25.0, 83.0), True),                   # later lines ignored
])
def test_exact_match(completion, answer, expected):
    assert exact_match(completion, answer) is expected


@needs_math_data
def test_generation_is_deterministic_and_seeded():
    a = create_task("reasoning-arith", model="tiny-llama", **SMALL)
    b = create_task("reasoning-arith", model="tiny-llama", **SMALL)
    c = create_task("reasoning-arith", model="tiny-llama", split_seed=1, **SMALL)
    assert a.train_rows == b.train_rows and a.eval_rows == b.eval_rows
    assert [r[1] for r in a.train_rows] != [r[1] for r in c.train_rows]
    assert a.split_record() == b.split_record()


@needs_math_data
def test_splits_are_disjoint_balanced_and_sized():
    t = create_task("reasoning-arith", model="tiny-llama", **SMALL)
    sizes = t.describe()["sizes"]
    assert sizes == {"train": 40, "test": 20, "dev": 10, "ood_longer": 10, "ood_template": 10}
    questions = [r[1] for rows in [t.train_rows, *t.eval_rows.values()] for r in rows]
    assert len(questions) == len(set(questions)), "a question appears twice (leak between splits)"
    fams = [r[4] for r in t.train_rows]
    assert fams.count("chain_sum") == fams.count("number_sorting") == 20
    assert {r[4] for r in t.eval_rows["ood_template"]} == {"basic_arithmetic"}
    assert t.primary_metric == "test/exact_match"


def _terms(prompt: str) -> list[int]:
    expr = re.search(r"(?:problem:|Calculate) ([-+\d ]+?)\s*[=.]", prompt).group(1)
    return [int(x) for x in re.findall(r"\d+", expr)]


@needs_math_data
@pytest.mark.parametrize("level", [1, 2, 3])
def test_levels_set_the_difficulty_and_answers_are_right(level):
    from flatlora.experiments.tasks.reasoning import LEVELS

    t = create_task("reasoning-arith", model="tiny-llama", level=level, **SMALL)
    lv = LEVELS[level]
    for split, rows in [("train", t.train_rows), *t.eval_rows.items()]:
        for _, prompt, target, answer, fam in rows:
            q = prompt.split("\n")[0]
            if fam in ("chain_sum", "basic_arithmetic"):
                n = len(_terms(q))
                lo, hi = (lv["terms"][1] + 1,) * 2 if split == "ood_longer" else lv["terms"]
                assert lo <= n <= hi, (split, q)
                assert all(len(str(x)) <= lv["digits"][1] for x in _terms(q))
                expr = re.search(r"(?:problem:|Calculate) ([-+\d ]+?)\s*[=.]", q).group(1)
                assert answer == (float(eval(expr)),) and target == f" {int(eval(expr))}"  # noqa: S307 (digits, + and - only)
            else:
                nums = [float(x) for x in re.findall(r"\d+\.\d+", q.split(":", 1)[1])]
                lo, hi = (lv["sort_count"][1] + 1,) * 2 if split == "ood_longer" else lv["sort_count"]
                assert lo <= len(nums) <= hi
                assert answer == tuple(sorted(nums, reverse="descending" in q))
                assert exact_match(target, answer)


@needs_math_data
def test_evaluate_scores_oracle_and_wrong_completions(monkeypatch):
    t = create_task("reasoning-arith", model="tiny-llama", **SMALL)
    targets = {r[1]: r[2] for rows in t.eval_rows.values() for r in rows}
    monkeypatch.setattr(t, "generate", lambda model, prompts, bs, n: [targets[p] + "\nQuestion: 1 + 1 = 2" for p in prompts])
    m = t.evaluate(None, 8)
    assert m["test/exact_match"] == m["dev/exact_match"] == m["ood_template/exact_match"] == 1.0
    assert m["test/chain_sum"] == m["test/number_sorting"] == 1.0
    calls = []
    monkeypatch.setattr(t, "generate", lambda model, prompts, bs, n: calls.append(n) or [" 0"] * len(prompts))
    m = t.evaluate(None, 8)
    assert m["test/number_sorting"] == 0.0 and m["test/exact_match"] < 0.2
    # each family is generated to its own length: a sum needs far fewer tokens than a sorted list
    assert t.new_tokens["chain_sum"] < t.new_tokens["number_sorting"] <= t.max_new_tokens
    assert set(calls) == set(t.new_tokens.values())


@needs_math_data
def test_humaneval_is_an_extra_out_of_domain_metric(monkeypatch):
    from flatlora.experiments.tasks import humaneval

    problems = [{"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"},
                {"prompt": "def neg(a):\n", "test": "def check(f):\n    assert f(2) == -2\n", "entry_point": "neg"}]
    monkeypatch.setattr(humaneval, "load_problems", lambda limit=None: problems[:limit])
    t = create_task("reasoning-arith", model="tiny-llama", humaneval=2, **SMALL)
    code = {problems[0]["prompt"]: "    return a + b\n", problems[1]["prompt"]: "    return a\n"}  # one right
    lengths = []
    monkeypatch.setattr(t, "generate", lambda model, prompts, bs, n: lengths.append(n) or [code.get(p, " 0") for p in prompts])
    m = t.evaluate(None, 8)
    assert m["humaneval/pass@1"] == 0.5 and "test/exact_match" in m
    assert max(lengths) == 384  # code-sized completions, not the arithmetic's few tokens
    assert create_task("reasoning-arith", model="tiny-llama", **SMALL).humaneval_metrics(None, 8) == {}  # 0: none
    with pytest.raises(ValueError, match="humaneval must be how many HumanEval problems"):
        create_task("reasoning-arith", model="tiny-llama", humaneval=-1, **SMALL)
    monkeypatch.setattr(fetch, "humaneval_file", lambda root=None: None)  # not fetched: said before any training
    with pytest.raises(ValueError, match="needs the HumanEval problems: run `python -m flatlora.experiments.fetch code`"):
        create_task("reasoning-arith", model="tiny-llama", humaneval=2, **SMALL)


@needs_math_data
def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="level must be one of"):
        create_task("reasoning-arith", model="tiny-llama", level=9)
    with pytest.raises(ValueError, match="families"):
        create_task("reasoning-arith", model="tiny-llama", families=["gsm"])
    with pytest.raises(ValueError, match=r"terms must be"):
        create_task("reasoning-arith", model="tiny-llama", terms=[3, 2])
    # one-digit two-term sums: about 200 distinct problems, not 5000
    with pytest.raises(ValueError, match="distinct chain_sum problems"):
        create_task("reasoning-arith", model="tiny-llama", terms=2, digits=1, families="chain_sum", train_size=5000)


@needs_math_data
def test_loads_after_the_gsm_generators_stub(tmp_path):
    # gsm-templates installs a `reasoning_gym` stub package first; the dataset modules must still import.
    code = ("from flatlora.experiments.tasks import create_task\n"
            "create_task('gsm-templates', model='tiny-llama', train_per_template=1, test_per_template=1)\n"
            "t = create_task('reasoning-arith', model='tiny-llama', train_size=4, dev_size=2, test_size=2, ood_size=2)\n"
            "print(len(t.train_rows))\n")
    src = Path(__file__).resolve().parents[2] / "src"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(src)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("4")


@needs_math_data
def test_a_tiny_run_reports_every_split(tmp_path):
    from flatlora.experiments.runner import run_one
    from flatlora.experiments.spec import ExperimentSpec

    spec = ExperimentSpec.from_dict({"task": "reasoning-arith", "model": "tiny-llama", "method": "flat-lora",
                                     "task_args": {**SMALL, "max_new_tokens": 8},
                                     "train": {"max_steps": 2, "batch_size": 8, "device": "cpu", "threads": 1}})
    rec = run_one(spec, tmp_path / "run", progress=False)
    assert rec["primary_metric"] == "test/exact_match"
    assert {"test/exact_match", "dev/exact_match", "ood_longer/exact_match", "ood_template/exact_match",
            "test/chain_sum", "test/number_sorting"} <= set(rec["metrics"])
    assert all(0.0 <= v <= 1.0 for v in rec["metrics"].values())
