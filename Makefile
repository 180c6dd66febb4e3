# flatlora — the two commands of the README contract, each doing its own set-up on a fresh machine.
#   make demo   the main job: LoRA vs Flat-LoRA on real data (MiniLM-L6, Rotten-Tomatoes), offline
#   make test   the test suite (what CI runs through .ci/run)
#   make bench  the CPU step cost of LoRA vs Flat-LoRA on this machine
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-gpu bench clean

setup: $(STAMP)

# torch==2.13.0 first: on our machines pip takes the CPU build lying on disk; asked for indirectly it
# would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

# OMP_WAIT_POLICY=PASSIVE: with 2 threads on 2 cores, spinning OpenMP threads made every step ~10x
# slower whenever another process was busy (measured 6.3 s vs 0.76 s per step).
demo: setup
	PY=$(BIN)/python OMP_WAIT_POLICY=PASSIVE bash scripts/demo.sh

# The data tests need the registry-fetched data (~150 MB, cached in .data/); if the fetch fails they
# skip, and the line below says so.
test: setup
	$(BIN)/python -m flatlora.experiments.fetch text image math-data code || echo "WARNING: data fetch failed: data tests will skip"
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -m "not gpu"

# On a machine with CUDA (see benchmarks/overhead/README.md for the device commands).
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

# LoRA vs Flat-LoRA (inplace, forward) step time on a MiniLM-shaped model, CPU, ~1 min: rewrites
# benchmarks/results/overhead-cpu.json, so `git diff` shows this host next to the committed one (hosts
# differ by 4x: state both when quoting a number). GPU benchmarks: benchmarks/overhead/README.md.
bench: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/overhead/cpu_step.py

clean:
	rm -rf $(VENV) .pytest_cache
