"""benchmarks/evidence/humaneval_check.py: HumanEval pass@1 of a base model and of PEFT adapters on it."""

import json
import sys
from pathlib import Path

import pytest

from flatlora.experiments.tasks import humaneval

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "evidence"))
import humaneval_check  # noqa: E402

PROBLEMS = [{"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"},
            {"prompt": "def neg(a):\n", "test": "def check(f):\n    assert f(2) == -2\n", "entry_point": "neg"}]


def test_scores_the_base_then_each_adapter_on_the_same_problems(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from flatlora.experiments.models import resolve_model
    from flatlora.experiments.tasks.causal_lm import load_tokenizer_and_model

    monkeypatch.setattr(humaneval, "load_problems", lambda limit=None: PROBLEMS[:limit])
    # the random tiny model writes no passing code; the scoring itself is pinned with canned completions
    from peft import PeftModel

    canned = iter([["    return a + b\n", "    return a\n"], ["    return a + b\n", "    return -a\n"]])
    adapted = []  # which model each scoring generated with: the bare base first, then the adapter on it
    monkeypatch.setattr(humaneval_check, "generate_greedy",
                        lambda tok, model, prompts, bs, n: adapted.append(isinstance(model, PeftModel)) or next(canned))
    _, model = load_tokenizer_and_model(resolve_model("tiny-llama"))
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "he.json"
    humaneval_check.main(["--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                          "--max-new-tokens", "4"])
    result = json.loads(out.read_text())
    assert {"torch", "flatlora_source_sha256", "command", "date"} <= set(result["provenance"])
    rows = result["rows"]
    assert [(r["adapter"] is None, r["pass@1"], r["passed"], r["problems"]) for r in rows] == [(True, 0.5, 1, 2),
                                                                                            (False, 1.0, 2, 2)]
    assert adapted == [False, True]


def test_bad_arguments_are_one_line_errors(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit, match="--adapter needs --out"):
        humaneval_check.main(["--model", "tiny-llama", "--adapter", str(tmp_path / "adapter")])
    with pytest.raises(SystemExit, match="--limit must be at least 1"):
        humaneval_check.main(["--model", "tiny-llama", "--limit", "0", "--out", str(tmp_path / "x.json")])


def test_a_folder_without_an_adapter_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no adapter_config.json there"):
        humaneval_check.main(["--model", "tiny-llama", "--adapter", str(tmp_path), "--out", str(tmp_path / "x.json")])


def test_the_real_problems_load_when_fetched():
    from flatlora.experiments import fetch

    if not fetch.status()["code"]:
        pytest.skip("needs `python -m flatlora.experiments.fetch code` (make test fetches it)")
    problems = humaneval.load_problems(3)
    assert len(problems) == 3 and all({"prompt", "test", "entry_point"} <= set(p) for p in problems)
