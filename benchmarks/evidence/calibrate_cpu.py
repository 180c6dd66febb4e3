"""CPU calibration of `reasoning-arith` on SmolLM2-135M: exact match before and after a short LoRA run.

A lower bound for the GPU study (which trains longer): if a few dozen CPU steps already move the dev
exact match off the floor and not to the ceiling, the level has headroom. Writes one JSON line per level.

    PYTHONPATH=src FLATLORA_DATA=.data python benchmarks/evidence/calibrate_cpu.py --levels 1 2 3 --steps 60
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    import torch

    from flatlora.experiments.runner import run_one
    from flatlora.experiments.spec import ExperimentSpec
    from flatlora.experiments.tasks import create_task

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=60, help="LoRA optimizer steps (0: base model only)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dev-size", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/evidence/calibration_cpu.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for level in args.levels:
        ta = {"level": level, "train_size": max(2, args.steps * args.batch_size), "dev_size": args.dev_size,
              "test_size": 2, "ood": False}
        task = create_task("reasoning-arith", model="smollm2-135m", **ta)
        t0 = time.time()
        model = task.build_model().eval()
        load_s = time.time() - t0
        t0 = time.time()
        base = {k: v for k, v in task.evaluate(model, 64).items() if k.startswith("dev")}
        base_s = time.time() - t0
        del model
        rec = {"level": level, "load_s": round(load_s, 1), "base_dev": base, "base_eval_s": round(base_s, 1)}
        if args.steps:
            spec = ExperimentSpec.from_dict({
                "task": "reasoning-arith", "task_args": ta, "model": "smollm2-135m", "method": "lora",
                "lora": {"r": 8, "alpha": 16}, "train": {"epochs": 1, "max_steps": args.steps, "batch_size": args.batch_size,
                                                        "lr": args.lr, "weight_decay": 0.0, "device": "cpu",
                                                        "threads": args.threads, "eval_batch_size": 64}})
            with tempfile.TemporaryDirectory() as tmp:
                r = run_one(spec, Path(tmp) / "run", task=task, progress=False)
            rec.update(lora_steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                       lora_dev={k: v for k, v in r["metrics"].items() if k.startswith("dev")},
                       train_s=r["train_seconds"], eval_s=r["eval_seconds"])
        print(json.dumps(rec), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
