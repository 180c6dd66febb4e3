"""Prompt -> target fine-tuning of a causal LM, evaluated by greedy generation (the math and code tasks).

`CausalLMTask` learns the target tokens only (the prompt is masked with -100), pads each batch to its own
longest row, and scores each eval split by exact match of the final number of the completion
(`extract_number`); with `humaneval=N` it also reports HumanEval pass@1 on the first N problems, each
completion run in the sandbox (flatlora.experiments.sandbox).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..models import HashTokenizer, ModelRef, hub_error, resolve_model, tiny_config
from .base import Task, fingerprint, require_nonempty
from .humaneval import evaluate_humaneval

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

Row = tuple  # (id, prompt, target, answer as float or None, extra)


def extract_number(text: str) -> float | None:
    """The final answer of a completion: the number after '####', else the last number.

    Example:
        >>> extract_number("so 3 + 4 = 7\\n#### 7"), extract_number("it is 1,250 apples")
        (7.0, 1250.0)
    """
    tail = text.split("####", 1)[1] if "####" in text else text
    nums = _NUMBER.findall(tail)
    if not nums:
        return None
    try:
        return float((nums[0] if "####" in text else nums[-1]).replace(",", ""))
    except ValueError:
        return None


def load_tokenizer_and_model(ref: ModelRef, with_model: bool = True):
    """(tokenizer, causal LM) for a model reference (a gguf file is dequantised to fp32 on load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if ref.kind == "tiny":
        tok = HashTokenizer(vocab_size=tiny_config(ref.name).vocab_size)
        return tok, (AutoModelForCausalLM.from_config(tiny_config(ref.name)) if with_model else None)
    path, kw = ref.path, {}
    if ref.path.endswith(".gguf"):
        # transformers dequantises the gguf into a plain fp32 LlamaForCausalLM (a few seconds; it refuses
        # to save_pretrained such a model, so it is read from the gguf every time).
        gguf = Path(ref.path)
        path, kw = str(gguf.parent), {"gguf_file": gguf.name}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw) if with_model else None
    except OSError as e:
        raise hub_error(ref, e) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (a real tokenizer, or the tiny models' HashTokenizer)."""
    if isinstance(tokenizer, HashTokenizer):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_greedy(tokenizer, model: nn.Module, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches), decoded without the prompt."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id or 0
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = [encode_text(tokenizer, p) for p in prompts[i:i + batch_size]]
        n = max(len(e) for e in enc)
        ids = torch.full((len(enc), n), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), n), dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, n - len(e):], mask[j, n - len(e):] = torch.tensor(e), 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out += [tokenizer.decode(g[n:].tolist(), skip_special_tokens=True) for g in gen.cpu()]
    return out


class CausalLMTask(Task):
    """Prompt -> target fine-tuning of a causal LM; evaluated by greedy generation (exact match of the number)."""

    peft_task_type = "CAUSAL_LM"
    quantizable = True  # a transformers causal LM: `quant.type` loads it through BitsAndBytesConfig

    def __init__(self, name: str, train: list[Row], evals: dict[str, list[Row]], model: str, max_length: int,
                 max_new_tokens: int, info: dict[str, Any] | None = None, humaneval: int = 0):
        require_nonempty(name, {"train": train, **evals})
        self.name, self.max_length, self.max_new_tokens = name, max_length, max_new_tokens
        self.ref = resolve_model(model)
        self.tokenizer, _ = load_tokenizer_and_model(self.ref, with_model=False)
        self.train_rows, self.eval_rows = train, evals
        self.primary_metric = f"{next(iter(evals))}/exact_match" if evals else "humaneval/pass@1"
        self.info, self.humaneval = info or {}, humaneval
        self.default_targets = LLAMA_TARGETS
        self._train = [self._encode(r[1], r[2]) for r in train]

    def _ids(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def _encode(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        p, t = self._ids(prompt), self._ids(target) + [self.tokenizer.eos_token_id]
        ids = (p + t)[: self.max_length]
        labels = ([-100] * len(p) + t)[: self.max_length]
        return ids, labels

    def build_model(self) -> nn.Module:
        _, model = load_tokenizer_and_model(self.ref)
        return model.train()

    def num_train(self) -> int:
        return len(self._train)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self._train[i] for i in indices]
        n = max(len(r[0]) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    def generate(self, model: nn.Module, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
        """Greedy completions (left-padded batches)."""
        return generate_greedy(self.tokenizer, model, prompts, batch_size, max_new_tokens)

    def evaluate(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        metrics = {}
        for split, rows in self.eval_rows.items():
            completions = self.generate(model, [r[1] for r in rows], batch_size, self.max_new_tokens)
            hits = [_same(extract_number(c), r[3]) for c, r in zip(completions, rows)]
            metrics[f"{split}/exact_match"] = sum(hits) / len(hits)
        return {**metrics, **self.humaneval_metrics(model, batch_size)}

    def humaneval_metrics(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        """HumanEval pass@1 on the first `humaneval` problems (none when 0): an out-of-domain check of a task
        trained on something else, given code-sized completions (384 new tokens at least)."""
        if not self.humaneval:
            return {}
        new_tokens = max(self.max_new_tokens, 384) if self.eval_rows else self.max_new_tokens
        return {"humaneval/pass@1": evaluate_humaneval(self, model, limit=self.humaneval, batch_size=batch_size,
                                                       max_new_tokens=new_tokens)}

    def describe(self) -> dict[str, Any]:
        return {"model": self.ref.name, "max_length": self.max_length, "max_new_tokens": self.max_new_tokens,
                "sizes": {"train": len(self.train_rows), **{k: len(v) for k, v in self.eval_rows.items()}},
                "fingerprints": {"train": fingerprint([r[0] for r in self.train_rows])}, **self.info}

    def split_record(self) -> dict[str, list]:
        return {"train": [r[0] for r in self.train_rows], **{k: [r[0] for r in v] for k, v in self.eval_rows.items()}}


def _same(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))
