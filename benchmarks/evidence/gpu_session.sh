#!/usr/bin/env bash
# Several studies at once on one warm GPU machine, over back-to-back calls (the machine keeps /root and processes
# started in a session of their own between calls while it stays warm). Results live in /root/ev/evidence, a copy
# of the committed benchmarks/results/evidence (so finished runs are seen and not redone) outside the working
# tree, which every call re-sends.
#
#   bash benchmarks/evidence/gpu_session.sh unpack .carry/text .carry/llm-a     bundles -> /root/fldata (carry.py)
#   bash benchmarks/evidence/gpu_session.sh start NAME 'study.py ARGS && ...'   a chain of study.py commands in the
#                                                                              background (--out is added)
#   bash benchmarks/evidence/gpu_session.sh poll SECONDS                        wait until every chain ended or
#                                                                              SECONDS passed; progress; results
#                                                                              and logs packed into $OUT
#
# Back here: tar xzf <files_at>/evidence.tgz -C benchmarks/results/ && python3 benchmarks/evidence/report.py
set -uo pipefail
: "${OUT:?OUT must name the output folder (the device machine sets it)}"
EV=${EV_ROOT:-/root/ev}
export PYTHONPATH=/tmp/site:/tmp/flatlora-bnb:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 FLATLORA_DATA=${FLATLORA_DATA:-/root/fldata}
mkdir -p "$EV"
[ -d "$EV/evidence" ] || cp -r benchmarks/results/evidence "$EV/evidence"

case "${1:-}" in
unpack)
    shift
    python3 benchmarks/evidence/carry.py unpack "$@" --to "$FLATLORA_DATA"
    ;;
start)
    name=$2 chain=$3
    # Each study.py of the chain writes to the copy; the code is this call's tree, copied too, so a later call's
    # re-sent tree cannot change a running chain.
    rm -rf "$EV/src-$name" && mkdir -p "$EV/src-$name" && cp -r src benchmarks "$EV/src-$name/"
    cmd=$(echo "$chain" | sed "s#study.py\([^&]*\)#python3 benchmarks/evidence/study.py\1 --out $EV/evidence#g")
    echo "$name: $cmd"
    (cd "$EV/src-$name" && PYTHONPATH=/tmp/site:/tmp/flatlora-bnb:$EV/src-$name/src \
        setsid nohup bash -c "$cmd; echo \"chain exit \$?\"" > "$EV/$name.log" 2>&1 < /dev/null &
    )
    ;;
poll)
    limit=${2:-60}
    t0=$(date +%s)
    while :; do
        alive=0
        # A chain's log ends with "chain exit N" (setsid forks, so no pid of ours outlives the call to check).
        for l in "$EV"/*.log; do grep -q '^chain exit' "$l" || alive=$((alive + 1)); done
        [ $alive -eq 0 ] || [ $(( $(date +%s) - t0 )) -ge "$limit" ] && break
        sleep 5
    done
    for l in "$EV"/*.log; do echo "== $(basename "$l") =="; tail -n 4 "$l"; done
    echo "chains still running: $alive"
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    python3 - "$EV/evidence" "$OUT/evidence.tgz" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks/evidence")
from study import pack
root = Path(sys.argv[1])
pack(root, sorted(p.name for p in root.iterdir() if p.is_dir()), Path(sys.argv[2]))
EOF
    tar -czf "$OUT/logs.tgz" -C "$EV" $(cd "$EV" && ls *.log)
    ;;
*)
    echo "usage: $0 unpack BUNDLE... | start NAME CHAIN | poll SECONDS" >&2
    exit 2
    ;;
esac
