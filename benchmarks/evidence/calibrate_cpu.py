"""CPU calibration of `reasoning-arith` on SmolLM2-135M: dev exact match before and after a short LoRA run.

A lower bound for the GPU study (which trains several times longer): if a few dozen CPU steps already
move dev exact match off the floor and not to the ceiling, the level has headroom. Appends one JSON line
per level to --out and prints a few completions.

    PYTHONPATH=src FLATLORA_DATA=.data python benchmarks/evidence/calibrate_cpu.py --levels 1 2 3 --steps 60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    import torch

    from flatlora.experiments.methods import get_method
    from flatlora.experiments.runner import _setup
    from flatlora.experiments.spec import ExperimentSpec
    from flatlora.experiments.tasks import create_task

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[2])
    ap.add_argument("--steps", type=int, default=60, help="LoRA optimizer steps (0: base model only)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dev-size", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show", type=int, default=4, help="completions printed per family")
    ap.add_argument("--families", nargs="+", default=["chain_sum", "number_sorting"])
    ap.add_argument("--out", default="benchmarks/results/evidence/calibration_cpu.jsonl")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for level in args.levels:
        nf = len(args.families)
        ta = {"level": level, "train_size": max(nf, args.steps * args.batch_size), "dev_size": max(nf, args.dev_size),
              "test_size": nf, "ood": False, "families": args.families}
        spec = ExperimentSpec.from_dict({
            "task": "reasoning-arith", "task_args": ta, "model": "smollm2-135m", "method": "lora",
            "lora": {"r": 8, "alpha": 16}, "train": {"epochs": 1, "max_steps": args.steps, "batch_size": args.batch_size,
                                                    "lr": args.lr, "weight_decay": 0.0, "device": "cpu"}})
        task = create_task("reasoning-arith", model="smollm2-135m", **ta)
        t0 = time.time()
        run = _setup(spec, get_method("lora"), 8, 0, task, torch.device("cpu"))  # the runner's model, optimizer, schedule
        model, opt, sched = run.model, run.opt, run.sched
        rec = {"level": level, "load_s": round(time.time() - t0, 1), "steps": args.steps, "lr": args.lr,
               "batch_size": args.batch_size, "dev_size": args.dev_size}
        t0, losses = time.time(), []
        for step, batch in zip(range(args.steps), task.batches(args.batch_size, 0, 0)):
            loss = task.loss(model, batch)
            loss.backward()
            opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            if step % 5 == 0:
                print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        rec["train_s"] = round(time.time() - t0, 1)
        rec["losses"] = losses[:: max(1, len(losses) // 10)] + losses[-1:]
        model.eval()
        t0 = time.time()
        rows = task.eval_rows["dev"]
        comps = task.predictions(model, rows, 64)
        from flatlora.experiments.tasks.reasoning import exact_match

        hits = [exact_match(c, r[3]) for c, r in zip(comps, rows)]
        rec["dev_exact_match"] = sum(hits) / len(hits)
        for fam in sorted({r[4] for r in rows}):
            h = [x for x, r in zip(hits, rows) if r[4] == fam]
            rec[f"dev/{fam}"] = sum(h) / len(h)
            shown = [(r[1].split("\n")[0][-70:], r[2], c[:60]) for c, r in zip(comps, rows) if r[4] == fam][: args.show]
            rec[f"examples/{fam}"] = shown
        rec["eval_s"] = round(time.time() - t0, 1)
        print(json.dumps(rec), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
