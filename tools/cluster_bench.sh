#!/usr/bin/env bash
# Files per second of `python -m sonoguide.cluster` with 1 and 2 workers, measured in the same
# run on a local Ray cluster (head without CPUs, two worker nodes of one CPU each, 127.0.0.1,
# token authentication off for this loopback cluster only).
#
# usage: tools/cluster_bench.sh [COPIES]   (needs the wheel and ray installed; see README)
# Inputs: COPIES copies (default 12) of sample-data/cine_0005.dcm (8 frames, 480x360 each).
# To point the runner at a real cluster instead: `ray start --head` on one machine and
# `ray start --address=HEAD:6379` on the others, a shared output folder, the wheel installed
# on every node, then `python -m sonoguide.cluster INPUT --out SHARED/DIR --address HEAD:6379`.
set -euo pipefail
cd "$(dirname "$0")/.."
COPIES="${1:-12}"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
WORK="$(mktemp -d /tmp/sg-bench-XXXX)"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RAY="python3 -m ray.scripts.scripts"
cleanup() { $RAY stop --force >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
$RAY start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=0 --num-gpus=0 \
    --include-dashboard=false --disable-usage-stats --temp-dir="$WORK/ray" >/dev/null
for _ in 1 2; do
    $RAY start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 --num-gpus=0 >/dev/null
done
mkdir -p "$WORK/in"
for i in $(seq 1 "$COPIES"); do cp sample-data/cine_0005.dcm "$WORK/in/cine_$i.dcm"; done
for n in 1 2; do
    (cd "$WORK" && python3 -m sonoguide.cluster in --out "out$n" --address "127.0.0.1:$PORT" \
        --workers "$n" --backend cpu 2>/dev/null) || true
    python3 - "$WORK/out$n/summary.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))["cluster"]
print(f"workers {c['workers']}: {c['files_per_s']} files/s ({c['seconds']} s)")
PY
done
