"""Procedural arithmetic and sorting with a causal LM, built for headroom on a 135M model (`reasoning-arith`).

GSM-style word problems are beyond SmolLM2-135M (0-2 % exact match after LoRA, issue 11), so a
comparison there measures nothing. This task uses reasoning-gym's simpler procedural generators, whose
difficulty is a knob, and mirrors the paper's protocol (train on one distribution, test in domain and
out of domain):

    train / dev / test   chain_sum ("State the final answer to the following arithmetic problem: 15 - 43 =")
                         and number_sorting ("Sort these numbers in ascending order: 75.0, 4.0, ...") at the
                         training difficulty; dev and test are fresh problems never seen in training
    ood_longer           the same two generators one step harder (one more term, one more number to sort):
                         a held-out difficulty
    ood_template         basic_arithmetic ("Calculate 4 - 1.") with the training numbers and operators: a
                         held-out question template, never trained on

`level` picks the difficulty (LEVELS below); explicit `terms` / `digits` / `sort_count` override it.
Every split is generated from seeded generators (`split_seed`), identical for every method and run, and
de-duplicated: no question appears twice or in two splits. The model learns the answer tokens only
(prompt masked), answers greedily, and is scored by exact match of the final answer: the first line of
the completion must hold the right integer (sums) or exactly the right numbers in the right order
(sorting), compared as numbers ("-103", "-103.0" and " -103" all match; "-103 or -104" does not).

reasoning-gym's package `__init__` imports eleven unrelated dependencies; its dataset modules need only
the standard library, numpy and pyyaml, so they are imported under stub parent packages.
"""

from __future__ import annotations

import importlib
import re
import sys
import types
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import register_task
from .base import Task
from .causal_lm import CausalLMTask
from .gsm import gsm_prompt

# level -> (chain_sum terms, operand digits, numbers to sort): what a 135M model can plausibly learn in a
# few hundred LoRA steps is 2-3 terms of small numbers and 3-4 numbers to sort (level 2, the default).
LEVELS: dict[int, dict[str, tuple[int, int]]] = {
    1: {"terms": (2, 2), "digits": (1, 2), "sort_count": (3, 3)},
    2: {"terms": (2, 3), "digits": (1, 2), "sort_count": (3, 4)},
    3: {"terms": (3, 3), "digits": (2, 2), "sort_count": (4, 5)},
    4: {"terms": (3, 4), "digits": (2, 3), "sort_count": (5, 6)},
}
FAMILIES = ("chain_sum", "number_sorting")
_MODULES = {"chain_sum": "arithmetic.chain_sum", "number_sorting": "algorithmic.number_sorting",
            "basic_arithmetic": "arithmetic.basic_arithmetic"}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# ---------------------------------------------------------------------- scoring
def parse_answer(completion: str) -> list[float]:
    """The numbers of the completion's first non-empty line, in order (the model answers first, then stops).

    Example:
        >>> parse_answer(" -103\\nQuestion: 4 + 4"), parse_answer("['4.0', '40.0', '75.0']")
        ([-103.0], [4.0, 40.0, 75.0])
    """
    lines = [ln for ln in completion.strip().splitlines() if ln.strip()]
    return [float(x) for x in _NUMBER.findall(lines[0])] if lines else []


def exact_match(completion: str, answer: tuple[float, ...]) -> bool:
    """True when the first line of `completion` holds exactly the numbers of `answer`, in order.

    Example:
        >>> exact_match("-37", (-37.0,)), exact_match("-37 or -38", (-37.0,)), exact_match("['9', '25']", (9.0, 25.0))
        (True, False, True)
    """
    got = parse_answer(completion)
    return len(got) == len(answer) and all(abs(g - a) <= 1e-9 * max(1.0, abs(a)) for g, a in zip(got, answer))


# ---------------------------------------------------------------------- reasoning-gym generators
def reasoning_gym_root() -> Path | None:
    """The fetched `reasoning_gym` package folder (`fetch math-data`), or None."""
    from ..fetch import gsm_dir

    d = gsm_dir()  # .../reasoning_gym/arithmetic/gsm_symbolic
    return d.parent.parent if d is not None else None


def _module(family: str, root: Path):
    """A reasoning-gym dataset module, imported without running the package's `__init__` files."""
    name = f"reasoning_gym.{_MODULES[family]}"
    if name in sys.modules:
        return sys.modules[name]
    pkg = sys.modules.get("reasoning_gym")
    if pkg is None or getattr(pkg, "__file__", None) is None:  # absent, or a stub (gsm.py makes one)
        if pkg is None:
            pkg = types.ModuleType("reasoning_gym")
            sys.modules["reasoning_gym"] = pkg
        pkg.__path__ = [str(root)]
        for sub in ("arithmetic", "algorithmic"):
            full = f"reasoning_gym.{sub}"
            if full not in sys.modules:
                m = types.ModuleType(full)
                m.__path__ = [str(root / sub)]
                sys.modules[full] = m
    return importlib.import_module(name)


def _dataset(family: str, root: Path, seed: int, size: int, terms: tuple[int, int], digits: tuple[int, int],
             sort_count: tuple[int, int]):
    mod = _module(family, root)
    if family == "chain_sum":
        cfg = mod.ChainSumConfig(min_terms=terms[0], max_terms=terms[1], min_digits=digits[0], max_digits=digits[1],
                                 allow_negation=False, seed=seed, size=size)
        return mod.ChainSumDataset(cfg)
    if family == "basic_arithmetic":
        cfg = mod.BasicArithmeticDatasetConfig(min_terms=terms[0], max_terms=terms[1], min_digits=digits[0],
                                               max_digits=digits[1], operators=("+", "-"), allow_parentheses=False,
                                               allow_negation=False, seed=seed, size=size)
        return mod.BasicArithmeticDataset(cfg)
    # Integers 0..99 (printed "75.0" by the generator): the skill is ordering, not reading decimals.
    cfg = mod.NumberSortingConfig(min_numbers=sort_count[0], max_numbers=sort_count[1], min_decimals=0, max_decimals=0,
                                  min_value=0.0, max_value=99.0, seed=seed, size=size)
    return mod.NumberSortingDataset(cfg)


def _answer_numbers(family: str, entry: dict) -> tuple[float, ...]:
    if family == "number_sorting":
        return tuple(float(x) for x in entry["metadata"]["sorted_numbers"])
    return (float(entry["answer"]),)


def _seed(split_seed: int, split: str, family: str) -> int:
    # Far-apart base seeds (reasoning-gym draws item i from Random(seed + i)), so splits never share a stream.
    return zlib.crc32(f"{split_seed}:{split}:{family}".encode()) * 1000


def generate(family: str, split: str, n: int, *, split_seed: int, seen: set[str], root: Path,
             terms: tuple[int, int], digits: tuple[int, int], sort_count: tuple[int, int]) -> list[tuple]:
    """`n` rows (id, prompt, target, answer numbers, family) of distinct questions not in `seen` (updated)."""
    seed = _seed(split_seed, split, family)
    ds = _dataset(family, root, seed, max(1, 50 * n), terms, digits, sort_count)
    rows = []
    for i in range(50 * n):
        if len(rows) == n:
            break
        entry = ds[i]
        q = entry["question"]
        if q in seen:
            continue
        seen.add(q)
        rows.append((f"{family}:{split}:{i}", gsm_prompt(q.rstrip()), " " + entry["answer"],
                     _answer_numbers(family, entry), family))
    if len(rows) < n:
        raise ValueError(f"task 'reasoning-arith': only {len(rows)} distinct {family} problems for the {split} split "
                         f"(asked {n}); lower the split sizes or raise the difficulty (task_args.level)")
    return rows


# ---------------------------------------------------------------------- the task
class ReasoningTask(CausalLMTask):
    """CausalLMTask scored by `exact_match`, per split, with each family's answers generated to their own length."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.primary_metric = "test/exact_match"
        # Generation budget per family: the longest target of that family (tokens) plus a margin; a trained
        # model stops at EOS well before it.
        longest: dict[str, int] = defaultdict(int)
        for rows in [self.train_rows, *self.eval_rows.values()]:
            for r in rows:
                longest[r[4]] = max(longest[r[4]], len(self._ids(r[2])))
        self.new_tokens = {f: min(self.max_new_tokens, n + 4) for f, n in longest.items()}

    def predictions(self, model: nn.Module, rows: list[tuple], batch_size: int) -> list[str]:
        """Greedy completions of `rows`, in order (one generation call per family, each with its own length)."""
        out: list[str | None] = [None] * len(rows)
        by_family: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            by_family[r[4]].append(i)
        for fam, idx in by_family.items():
            # Similar prompt lengths batch together: less left-padding.
            idx = sorted(idx, key=lambda i: len(rows[i][1]))
            gen = self.generate(model, [rows[i][1] for i in idx], batch_size, self.new_tokens[fam])
            for i, g in zip(idx, gen):
                out[i] = g
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for split, rows in self.eval_rows.items():
            hits = [exact_match(c, r[3]) for c, r in zip(self.predictions(model, rows, batch_size), rows)]
            metrics[f"{split}/exact_match"] = sum(hits) / len(hits)
            fams = sorted({r[4] for r in rows})
            if len(fams) > 1:
                for fam in fams:
                    h = [x for x, r in zip(hits, rows) if r[4] == fam]
                    metrics[f"{split}/{fam}"] = sum(h) / len(h)
        return {**metrics, **self.humaneval_metrics(model, batch_size)}


def _range(name: str, v: Any) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            or not 1 <= v[0] <= v[1]):
        raise ValueError(f"task_args.{name} must be an integer or [min, max] with 1 <= min <= max, got {v!r}")
    return int(v[0]), int(v[1])


@register_task("reasoning-arith", "reasoning-gym chain sums + number sorting at a chosen difficulty (task_args.level); "
               "dev/test fresh problems, ood_longer one step harder, ood_template basic_arithmetic; exact match "
               "(causal LM, greedy)", default_model="smollm2-135m", requires="math")
def reasoning_arith(*, model: str, level: int = 2, terms: Any = None, digits: Any = None, sort_count: Any = None,
                    families: Any = FAMILIES, train_size: int = 3000, dev_size: int = 300, test_size: int = 600,
                    ood_size: int = 300, split_seed: int = 0, dev: bool = True, ood: bool = True,
                    max_length: int = 256, max_new_tokens: int = 64, humaneval: int = 0) -> Task:
    from ..paths import fetch_hint

    if level not in LEVELS:
        raise ValueError(f"task_args.level must be one of {sorted(LEVELS)}, got {level!r}")
    if isinstance(humaneval, bool) or not isinstance(humaneval, int) or humaneval < 0:
        raise ValueError(f"task_args.humaneval must be how many HumanEval problems to score (0 = none, 164 = all), "
                         f"got {humaneval!r}")
    if humaneval:
        from ..fetch import humaneval_file

        if humaneval_file() is None:  # found before training, not after it
            raise ValueError(f"task_args.humaneval needs the HumanEval problems: {fetch_hint('code')}")
    fams = [families] if isinstance(families, str) else list(families)
    bad = [f for f in fams if f not in FAMILIES]
    if not fams or bad:
        raise ValueError(f"task_args.families must name some of {list(FAMILIES)}, got {families!r}")
    for name, v in [("train_size", train_size), ("dev_size", dev_size), ("test_size", test_size), ("ood_size", ood_size)]:
        if isinstance(v, bool) or not isinstance(v, int) or v < len(fams):
            raise ValueError(f"task_args.{name} must be an integer >= {len(fams)} (one problem per family), got {v!r}")
    root = reasoning_gym_root()
    if root is None:
        raise ValueError(f"task 'reasoning-arith' needs the reasoning-gym generators: {fetch_hint('math-data')}")
    preset = LEVELS[level]
    t = _range("terms", terms if terms is not None else preset["terms"])
    d = _range("digits", digits if digits is not None else preset["digits"])
    s = _range("sort_count", sort_count if sort_count is not None else preset["sort_count"])
    harder = dict(terms=(t[1] + 1, t[1] + 1), digits=d, sort_count=(s[1] + 1, s[1] + 1))
    seen: set[str] = set()

    def split(name: str, total: int, fam_list: list[str], **knobs) -> list[tuple]:
        knobs = {"terms": t, "digits": d, "sort_count": s, **knobs}
        per = [total // len(fam_list) + (1 if k < total % len(fam_list) else 0) for k in range(len(fam_list))]
        return [r for f, n in zip(fam_list, per)
                for r in generate(f, name, n, split_seed=split_seed, seen=seen, root=root, **knobs)]

    # Train first: every later split skips its questions (and each other's).
    train = split("train", train_size, fams)
    evals: dict[str, list[tuple]] = {"test": split("test", test_size, fams)}
    if dev:  # dev picks recipes and sigma; test is never used to pick anything
        evals["dev"] = split("dev", dev_size, fams)
    if ood:
        evals["ood_longer"] = split("ood_longer", ood_size, fams, **harder)
        if "chain_sum" in fams:
            evals["ood_template"] = split("ood_template", ood_size, ["basic_arithmetic"])
    info = {"source": "reasoning-gym 0.1.25 chain_sum / number_sorting / basic_arithmetic generators",
            "split_seed": split_seed, "level": level, "families": fams,
            "difficulty": {"terms": t, "digits": d, "sort_count": s, "numbers": "integers 0..99 to sort"},
            "ood_longer": {"terms": harder["terms"], "sort_count": harder["sort_count"]},
            "ood_template": "basic_arithmetic (+, -; 'Calculate a - b.'), training terms and digits",
            "scoring": "exact match of the numbers on the first line of the greedy completion"}
    return ReasoningTask("reasoning-arith", train, evals, model, max_length, max_new_tokens, info, humaneval=humaneval)
