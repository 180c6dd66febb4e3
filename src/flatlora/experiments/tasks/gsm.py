"""Math word problems with a causal LM: GSM-style templates (offline) and MetaMathQA -> GSM8K (hub).

`gsm-templates`: the 100 GSM8K-derived generators of GSM-Symbolic as packaged in reasoning-gym
(`generate_N(rng, difficulty)` -> question, metadata.answer_cot ending `#### N`, metadata.answer_value), minus
the 15 the package marks as needing a fix. Problems are generated, so the split is **by template**:
a seeded shuffle puts whole templates in train or test, otherwise test questions share their exact
structure with training ones. Metric: exact match of the final number (after `####`, else the last
number in the completion), greedy decoding. The model learns the answer tokens only (prompt masked).
"""

from __future__ import annotations

import importlib.util
import random
import re
import sys
import types
from pathlib import Path
from typing import Any

from . import hub, register_task
from .base import Task
from .causal_lm import CausalLMTask, Row, extract_number, load_tokenizer_and_model  # noqa: F401  (re-exported)

NEEDS_FIX = (32, 35, 37, 61, 63, 65, 74, 76, 77, 79, 86, 87, 90, 97, 98)  # reasoning-gym's tasks_need_fix


# ---------------------------------------------------------------------- GSM templates (reasoning-gym)
def load_generators(folder: Path) -> dict[int, Any]:
    """generate_N functions of the two generator files, loaded by path (the package's __init__ pulls 11
    unrelated dependencies; the generators need only its standard-library `utils.py`)."""
    pkg_root = folder.parent.parent
    if "reasoning_gym.utils" not in sys.modules:
        pkg = types.ModuleType("reasoning_gym")
        pkg.__path__ = []  # a namespace stub: only `utils` is ever imported from it
        sys.modules.setdefault("reasoning_gym", pkg)
        spec = importlib.util.spec_from_file_location("reasoning_gym.utils", pkg_root / "utils.py")
        utils = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(utils)
        sys.modules["reasoning_gym.utils"] = utils
    gens: dict[int, Any] = {}
    for f in ("generators_00_49.py", "generators_50_99.py"):
        spec = importlib.util.spec_from_file_location(f"flatlora_gsm_{f[:-3]}", folder / f)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        gens.update({int(k.split("_")[1]): getattr(mod, k) for k in dir(mod) if re.fullmatch(r"generate_\d+", k)})
    return gens


def gsm_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@register_task("gsm-templates", "GSM-style math word problems from 85 GSM-Symbolic templates, train/test split BY "
               "TEMPLATE, exact match of the final number (causal LM, greedy)", default_model="smollm2-135m", requires="math")
def gsm_templates(*, model: str, train_per_template: int = 20, test_per_template: int = 5, test_fraction: float = 0.2,
                  split_seed: int = 0, difficulty: float = 1.0, max_length: int = 320, max_new_tokens: int = 192,
                  humaneval: int = 0) -> Task:
    from ..fetch import gsm_dir
    from ..paths import fetch_hint

    d = gsm_dir()
    if d is None:
        raise ValueError(f"task 'gsm-templates' needs the GSM-Symbolic generators: {fetch_hint('math-data')}")
    gens = load_generators(d)
    templates = sorted(t for t in gens if t not in NEEDS_FIX)
    random.Random(split_seed).shuffle(templates)
    n_test = max(1, round(test_fraction * len(templates)))
    test_t, train_t = sorted(templates[:n_test]), sorted(templates[n_test:])

    def rows(ts: list[int], per: int, split: str) -> list[Row]:
        out = []
        for t in ts:
            for i in range(per):
                rng = random.Random(f"{split_seed}:{split}:{t}:{i}")
                try:
                    ex = gens[t](rng, difficulty)
                except Exception:  # noqa: BLE001  (a generator can fail for some draws; skip the draw)
                    continue
                meta = ex.get("metadata", {})
                cot = meta.get("answer_cot")
                if not cot:
                    continue
                value = meta.get("answer_value")
                out.append((f"t{t}:{split}{i}", gsm_prompt(ex["question"]), " " + cot,
                            float(value) if isinstance(value, (int, float)) else extract_number(cot), t))
        return out

    info = {"source": "reasoning-gym 0.1.25 gsm_symbolic generators (GSM-Symbolic, from GSM8K)", "split_seed": split_seed,
            "train_templates": train_t, "test_templates": test_t, "difficulty": difficulty}
    return CausalLMTask("gsm-templates", rows(train_t, train_per_template, "train"),
                        {"test": rows(test_t, test_per_template, "test")}, model, max_length, max_new_tokens, info,
                        humaneval=humaneval)


# ---------------------------------------------------------------------- MetaMathQA -> GSM8K (hub), the paper's protocol
@register_task("metamathqa-gsm8k", "MetaMathQA (train, first train_size) -> GSM8K test, exact match (hub; the paper's "
               "Llama-2-7B math protocol)", default_model="meta-llama/Llama-2-7b-hf", requires="hub")
def metamathqa_gsm8k(*, model: str, train_size: int | None = 100000, test_size: int | None = None, max_length: int = 1024,
                     max_new_tokens: int = 512) -> Task:
    train = hub.load_hub_dataset("meta-math/MetaMathQA", None, "train")[:train_size]
    test = hub.load_hub_dataset("openai/gsm8k", "main", "test")[:test_size]
    tr = [(f"mm:{i}", gsm_prompt(r["query"]), " " + r["response"], None, None) for i, r in enumerate(train)]
    te = [(f"gsm8k:{i}", gsm_prompt(r["question"]), "", extract_number(r["answer"]), None) for i, r in enumerate(test)]
    return CausalLMTask("metamathqa-gsm8k", tr, {"test": te}, model, max_length, max_new_tokens,
                        {"source": "meta-math/MetaMathQA -> openai/gsm8k test"})
