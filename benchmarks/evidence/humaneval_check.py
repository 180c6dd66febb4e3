"""HumanEval pass@1 of a causal LM, alone or with PEFT adapters: the LLM study's out-of-domain code check.

    python benchmarks/evidence/humaneval_check.py [--model smollm2-135m] [--adapter RUN/adapter ...] \
        [--limit N] [--out benchmarks/results/evidence/llm/humaneval_base.json]

Issue 11 asks for HumanEval pass@1 of the LLM study's trained models "if it is above zero". The study trains
SmolLM2-135M on arithmetic, so the first question is whether the base model writes any passing code at all:
without adapters this scores the base. With `--adapter` (the `adapter/` folder of a run, which
`PeftModel.from_pretrained` loads) it scores each adapted model on the same problems. Greedy decoding, 384 new
tokens, completions cut at the first new top-level statement and run with the problem's tests in the sandbox
(`flatlora.experiments.tasks.humaneval`). Writes rows (model, adapter, pass@1, passed, problems, seconds) with
the provenance; on a CPU the 164 problems take ~25 min for a 135M model. Adapters are applied to the plain base:
right for LoRA / Flat-LoRA adapters (what the LLM study trains), not for a PiSSA adapter saved without its weight
conversion nor for one trained on a 4-bit base (score that on the same quantized base instead).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BASE_OUT = ROOT / "benchmarks/results/evidence/llm/humaneval_base.json"
sys.path.insert(0, str(ROOT / "src"))

from flatlora.experiments.models import resolve_model  # noqa: E402
from flatlora.experiments.runner import versions  # noqa: E402
from flatlora.experiments.tasks import humaneval  # noqa: E402
from flatlora.experiments.tasks.causal_lm import generate_greedy, load_tokenizer_and_model  # noqa: E402
from flatlora.experiments.tasks.humaneval import evaluate_humaneval  # noqa: E402


def score(model, tokenizer, problems: int, args) -> dict:
    """The task runner's own scoring (evaluate_humaneval: problems, truncation, sandbox) with greedy generation by
    this tokenizer in place of a task's."""
    t0 = time.perf_counter()
    generator = types.SimpleNamespace(generate=functools.partial(generate_greedy, tokenizer))
    rate = evaluate_humaneval(generator, model, limit=args.limit, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size)
    return {"pass@1": rate, "passed": round(rate * problems), "problems": problems,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name or local folder (flatlora tasks)")
    ap.add_argument("--adapter", action="append", default=[], help="a PEFT adapter folder (repeatable)")
    ap.add_argument("--limit", type=int, default=None, help="the first N problems (default: all 164)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None,
                    help=f"JSON to write (without --adapter: {BASE_OUT.relative_to(ROOT)}; with --adapter: required)")
    args = ap.parse_args(argv)
    missing = [a for a in args.adapter if not (Path(a) / "adapter_config.json").is_file()]
    if missing:
        raise SystemExit(f"--adapter {missing[0]}: no adapter_config.json there; pass a run's adapter/ folder")
    if args.adapter and args.out is None:
        raise SystemExit("--adapter needs --out: the default file holds the base model's score alone")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be at least 1 (leave it out for all 164 problems), got {args.limit}")
    try:
        problems = len(humaneval.load_problems(args.limit))
    except ValueError as e:  # the problems were not fetched: the error names the fetch command
        raise SystemExit(str(e)) from None
    ref = resolve_model(args.model)
    tokenizer, base = load_tokenizer_and_model(ref)
    base = base.to(args.device).eval()
    rows = [{"model": ref.name, "adapter": None, **score(base, tokenizer, problems, args)}]
    print(f"{ref.name}: pass@1 {rows[-1]['pass@1']:.4f} ({rows[-1]['passed']}/{problems}, {rows[-1]['seconds']} s)")
    for path in args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, path).eval()
        rows.append({"model": ref.name, "adapter": path, **score(model, tokenizer, problems, args)})
        print(f"{path}: pass@1 {rows[-1]['pass@1']:.4f} ({rows[-1]['passed']}/{problems})")
        base = model.unload()  # the bare base again for the next adapter
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": args.device,
            "command": " ".join(["python", "benchmarks/evidence/humaneval_check.py",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "decoding": f"greedy, {args.max_new_tokens} new tokens, batch {args.batch_size}", **versions()}
    out = Path(args.out) if args.out else BASE_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"provenance": info, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
