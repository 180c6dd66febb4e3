"""Train LoRA and Flat-LoRA with the runner, keep their weights, and draw their landscapes (paper Fig. 3).

    python examples/landscape_runs.py configs/demo_text.yaml --ranks 1 16 --out runs/landscape_text
    python examples/landscape_runs.py task=byo-text task_args.path=my.csv --ranks 8   # any spec + overrides

`flatlora run` does not save weights yet, so this script keeps each trained model as the runner builds
it and writes `weights.safetensors` (trainable parameters + floating buffers) into the run folder — the
file `flatlora landscape RUN_DIR` loads. Then it runs `flatlora landscape` once per rank, LoRA next to
Flat-LoRA on one colour scale. Runs that already have weights are reused, not retrained.
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

built = {}
_build = runner._build


def keep_model(*a, **k):  # the runner's own builder; we only hold on to what it returns
    built["model"] = _build(*a, **k)
    return built["model"]


runner._build = keep_model


def save_weights(model, run_dir: Path) -> None:
    from safetensors.torch import save_file

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if k in names or (v.is_floating_point() and k not in dict(model.named_parameters()))}
    save_file(state, str(run_dir / "weights.safetensors"))


for rank in args.ranks:
    dirs = []
    for method in args.methods:
        run_dir = root / run_name(method, rank, args.seed)
        if not (run_dir / "weights.safetensors").exists():
            if (run_dir / "metrics.json").exists():
                sys.exit(f"{run_dir} is finished but has no weights: delete it to retrain")
            rec = runner.run_one(spec, run_dir, method=method, seed=args.seed, rank=rank, task=task)
            save_weights(built.pop("model"), run_dir)
            print(f"{method} r={rank}: {rec['metrics']}", flush=True)
        dirs.append(str(run_dir))
    flatlora_main(["landscape", *dirs, "--out", str(root / f"landscape_r{rank}"),
                   "--title", f"{spec.task}, rank {rank}: LoRA vs Flat-LoRA (merged weights, seed {args.seed})",
                   *args.landscape_args.split()])
