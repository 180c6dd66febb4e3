#!/usr/bin/env bash
# One GPU call for the hot path: the kernels' GPU tests, then the per-kernel microbenchmark, the ablation of
# perturb/restore and the step-level overhead table, each only if time is left (a call runs at most 10 minutes;
# every stage writes as it goes, so a cut call still returns what finished). Output: $OUT/hot/, tarred into
# $OUT/hot.tgz at the end (the device returns at most 8 files).
#
#     bash benchmarks/overhead/kernels_gpu.sh [STAGES]     STAGES: comma list of tests,kernels,ablate,overhead,control,
#                                                          compile,compile7b (compile-tests, op-host: parts of compile)
#                                                          (default: the first four, ~7-8 min on the H200)
# The overhead stage needs the reference code carried: run(..., carry=[".carry"]) with .carry/anchor_overhead.py
# (benchmarks/overhead/README.md). Stages: tests ~1.5 min (JIT), kernels ~1 min, ablate ~2 min, overhead
# (acc1, minilm) ~3 min; control (MiniLM over 25 rounds, eager and under torch.compile, and the 7B GA-1 step over
# 10, each with the A/A control `lora-again` and per-round bootstrap intervals of every ratio) ~4 min.
set -uo pipefail
: "${OUT:?OUT must name the output folder (the device machine sets it)}"
STAGES=${1:-tests,kernels,ablate,overhead}
DIR="$OUT/hot"
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=src
rc=0
has() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
run() {  # name, command...: its output to $DIR/<name>.log, its status into rc
    local name=$1; shift
    echo "== $name: $*" | tee -a "$DIR/stages.log"
    "$@" 2>&1 | tee "$DIR/$name.log" | tail -n 15
    local s=${PIPESTATUS[0]}
    echo "== $name exit $s" | tee -a "$DIR/stages.log"
    [ "$s" -eq 0 ] || rc=$s
    tar -czf "$OUT/hot.tgz" -C "$OUT" hot  # after every stage: a cut call still returns the finished ones
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$DIR/device.txt" 2>&1
git rev-parse HEAD >> "$DIR/device.txt" 2>/dev/null
has tests && run gpu-tests python3 -m pytest -q -p no:cacheprovider tests/kernels/kernel_cases.py \
    tests/core/triton_backend_cases.py tests/core/test_compile.py
# With .carry/old_triton_noise.py (an earlier commit's kernels) carried, they are timed side by side, e.g. the
# build the README's kernel table measured: git show efe0968:src/flatlora/kernels/triton_noise.py > .carry/old_triton_noise.py
OLD=()
[ -f .carry/old_triton_noise.py ] && OLD=(--old .carry/old_triton_noise.py)
has kernels && run kernels python3 benchmarks/overhead/kernel_bench.py --out "$DIR" --only group --reps 5 ${OLD[@]+"${OLD[@]}"}
has ablate && run ablate python3 benchmarks/overhead/ablate.py --out "$DIR" --only group
has overhead && run overhead python3 benchmarks/overhead/run.py --out "$DIR" --only acc1,minilm \
    --anchor .carry/anchor_overhead.py --profile --trace
has control && run control-minilm python3 benchmarks/overhead/run.py --out "$DIR/control-minilm" --only minilm \
    --control --compile inductor --rounds 25 --steps 100 --anchor .carry/anchor_overhead.py
has control && run control-acc1 python3 benchmarks/overhead/run.py --out "$DIR/control-acc1" --only acc1 \
    --control --rounds 10 --steps 20 --anchor .carry/anchor_overhead.py
# compile: torch.compile's GPU cases (the traced Triton op of compiled forward mode among them), the noisy layer
# call's host cost, then MiniLM eager and compiled with the control (~5 min); compile7b: the 7B GA-1 step the same
# way, lora plus the three compiled variants only (inductor compiles the 32-layer model for each: on 2026-12-03
# a call that ran it after the tests and op-host had not finished its first round ~430 s in; give it a call of its own)
# (compile-tests and op-host also run alone: STAGES compile-tests,op-host)
{ has compile || has compile-tests; } && run compile-tests python3 -m pytest -q -p no:cacheprovider -m gpu tests/core/test_compile.py
{ has compile || has op-host; } && run op-host python3 benchmarks/overhead/op_host.py --out "$DIR" --profile
has compile && run compile-minilm python3 benchmarks/overhead/run.py --out "$DIR/compile-minilm" --only minilm \
    --control --compile inductor --rounds 10 --steps 40 --anchor .carry/anchor_overhead.py
has compile7b && run compile-acc1 python3 benchmarks/overhead/run.py --out "$DIR/compile-acc1" --only acc1 \
    --compile inductor --variants lora-compiled,flatlora-inplace-compiled,flatlora-forward-compiled --rounds 3 --steps 12
exit $rc
