"""Code-Feedback -> HumanEval pass@1 (hub): the paper's Llama-2-7B code protocol."""

from __future__ import annotations

from . import hub, register_task
from .base import Task
from .causal_lm import CausalLMTask


@register_task("code-feedback-humaneval", "Code-Feedback (hub, first train_size dialogues) -> HumanEval pass@1 "
               "(the paper's Llama-2-7B code protocol)", default_model="meta-llama/Llama-2-7b-hf", requires="hub")
def code_feedback(*, model: str, train_size: int | None = 100000, max_length: int = 1024, humaneval: int = 164,
                  max_new_tokens: int = 384) -> Task:
    rows = []
    for i, r in enumerate(hub.load_hub_dataset("m-a-p/Code-Feedback", None, "train")[:train_size]):
        msgs = r.get("messages") or []
        user = next((m["content"] for m in msgs if m.get("role") == "user"), None)
        reply = next((m["content"] for m in msgs if m.get("role") == "assistant"), None)
        if user and reply:
            rows.append((f"cf:{i}", f"{user}\n", reply, None, None))
    return CausalLMTask("code-feedback-humaneval", rows, {}, model, max_length, max_new_tokens,
                        {"source": "m-a-p/Code-Feedback -> HumanEval"}, humaneval=humaneval)
