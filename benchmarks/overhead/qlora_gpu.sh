#!/usr/bin/env bash
# QLoRA on the GPU: install the carried bitsandbytes wheel, check that its CUDA library loads, then run the
# QLoRA GPU tests (stage "tests") and/or the QLoRA overhead benchmark (stage "bench"). Everything it prints
# and writes goes under $OUT/qlora-<stage>/, tarred into $OUT/qlora-<stage>.tar.gz at the end.
#
#     bash benchmarks/overhead/qlora_gpu.sh [tests|bench|all]        (default: all)
#
# The wheel is carried in the ignored .wheels/ (benchmarks/overhead/README.md, "QLoRA on the GPU"); the GPU
# machine has no network, so it is installed with --no-index --no-deps (torch, numpy, packaging are there).
set -uo pipefail

STAGE=${1:-all}
case "$STAGE" in tests|bench|all) ;; *) echo "usage: $0 [tests|bench|all]" >&2; exit 2 ;; esac
: "${OUT:?OUT must name the output folder (the device machine sets it)}"
DIR="$OUT/qlora-$STAGE"
mkdir -p "$DIR"
WHEEL=$(ls .wheels/bitsandbytes-*-manylinux*_x86_64.whl 2>/dev/null | head -n 1)
if [ -z "$WHEEL" ]; then
    echo "no bitsandbytes wheel under .wheels/: carry it (run(..., carry=[\".wheels\"]))" | tee "$DIR/install.log" >&2
    exit 3
fi
DEPS=/tmp/flatlora-bnb
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="src:$DEPS"

{
    echo "wheel: $WHEEL ($(sha256sum "$WHEEL" | cut -d' ' -f1))"
    # pip when the image has it; a wheel is a zip archive, so unpacking it is the same install without pip.
    python3 -m pip install --no-index --no-deps --target "$DEPS" --upgrade "$WHEEL" \
        || { rm -rf "$DEPS" && python3 -m zipfile -e "$WHEEL" "$DEPS"; }
} > "$DIR/install.log" 2>&1

preflight() {
    python3 - <<'EOF'
import bitsandbytes as bnb, torch
assert torch.cuda.is_available(), "no CUDA device"
w = torch.randn(128, 64, device="cuda", dtype=torch.bfloat16)
q, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
err = (bnb.functional.dequantize_4bit(q, state) - w).float().norm() / w.float().norm()
assert err < 0.2, f"NF4 round trip error {err:.3f}"
print(f"bitsandbytes {bnb.__version__} from {bnb.__file__}: NF4 round trip on {torch.cuda.get_device_name(0)}, "
      f"relative error {err:.4f}; torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
}
PRE=0
{   # (a brace group runs in this shell: an LD_LIBRARY_PATH set here holds for the stages below)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    python3 -c "import sys, torch, triton, peft, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, peft.__version__, transformers.__version__)"
    if ! preflight; then
        # The library links libcudart/libcublas(Lt).so.13 by name: point the loader at torch's own CUDA wheels.
        LIBS=$(python3 - <<'EOF2'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
names = ("libcudart.so.13*", "libcublas.so.13*", "libcublasLt.so.13*")
print(":".join(sorted({os.path.dirname(p) for r in roots for n in names
                       for p in glob.glob(os.path.join(r, "nvidia", "**", n), recursive=True)})))
EOF2
)
        export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "retrying with LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        preflight || { python3 -m bitsandbytes; PRE=4; }
    fi
} > "$DIR/preflight.log" 2>&1
cat "$DIR/preflight.log"
if [ $PRE -ne 0 ]; then
    tar -czf "$OUT/qlora-$STAGE.tar.gz" -C "$OUT" "qlora-$STAGE"
    echo "bitsandbytes does not work on this machine (see $DIR/preflight.log)" >&2
    exit $PRE
fi

STATUS=0
if [ "$STAGE" != bench ]; then
    # The CUDA cases of the QLoRA tests, the Triton backend cases (quantized bases included) on CUDA, and the
    # benchmark's QLoRA setting at smoke size (the script runs before the 7B one is timed).
    python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/core/test_quantized.py 2>&1 | tee "$DIR/gpu-tests.log"
    STATUS=$((STATUS | $?))
    python3 -m pytest -q -p no:cacheprovider -rs tests/core/test_triton_backend.py \
        "tests/kernels/test_overhead_smoke.py::test_overhead_benchmark_qlora_smoke" 2>&1 | tee -a "$DIR/gpu-tests.log"
    STATUS=$((STATUS | $?))
fi
if [ "$STAGE" != tests ]; then
    python3 benchmarks/overhead/run.py --out "$DIR" --only qlora 2>&1 | tee "$DIR/bench.log"
    STATUS=$((STATUS | $?))
fi
tar -czf "$OUT/qlora-$STAGE.tar.gz" -C "$OUT" "qlora-$STAGE"
echo "stage $STAGE: exit status $STATUS; results in $DIR and $OUT/qlora-$STAGE.tar.gz"
exit $STATUS
