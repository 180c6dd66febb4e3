"""Train LoRA and Flat-LoRA with the runner, keep their weights, and draw their landscapes (paper Fig. 3).

    python examples/landscape_runs.py configs/demo_text.yaml --ranks 1 16 --out runs/landscape_text
    python examples/landscape_runs.py task=byo-text task_args.path=my.csv --ranks 8   # any spec + overrides

Each run folder gets `weights.safetensors` from the runner (trainable parameters + floating buffers), the
file `flatlora landscape RUN_DIR` loads. Then it runs `flatlora landscape` once per rank, LoRA next to
Flat-LoRA on one colour scale. Finished runs are reused, not retrained.
"""

import argparse
import sys
from pathlib import Path

from flatlora.cli.main import main as flatlora_main
from flatlora.experiments import runner
from flatlora.experiments.compare import run_name
from flatlora.experiments.spec import load_spec
from flatlora.experiments.tasks import create_task

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("spec", nargs="*", help="YAML config and/or key=value overrides, as for `flatlora run`")
ap.add_argument("--ranks", type=int, nargs="+", default=[1, 16])
ap.add_argument("--methods", nargs="+", default=["lora", "flat-lora"])
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", default="runs/landscape")
ap.add_argument("--landscape-args", default="", help="extra options for `flatlora landscape`, one string")
args = ap.parse_args()

config = next((s for s in args.spec if s.endswith((".yaml", ".yml"))), None)
spec = load_spec(config, [s for s in args.spec if s != config])
task = create_task(spec.task, model=spec.model, **spec.task_args)
root = Path(args.out)

for rank in args.ranks:
    dirs = []
    for method in args.methods:
        run_dir = root / run_name(method, rank, args.seed)
        if not (run_dir / "weights.safetensors").exists():
            if (run_dir / "metrics.json").exists():
                sys.exit(f"{run_dir} is finished but has no weights: delete it to retrain")
            rec = runner.run_one(spec, run_dir, method=method, seed=args.seed, rank=rank, task=task)
            print(f"{method} r={rank}: {rec['metrics']}", flush=True)
        dirs.append(str(run_dir))
    flatlora_main(["landscape", *dirs, "--out", str(root / f"landscape_r{rank}"),
                   "--title", f"{spec.task}, rank {rank}: LoRA vs Flat-LoRA (merged weights, seed {args.seed})",
                   *args.landscape_args.split()])
