#!/usr/bin/env bash
# The hardware-GPU figures of issue 16 in one command, on a machine with a GPU and Vulkan.
#
# usage: tools/gpu-bench.sh [OUT_DIR]        (from the repository root)
#
# Uses target/release/sonoguide (built here when cargo is present, else it must have been
# built elsewhere and carried) and, when cargo is present, runs the GPU parity tests first.
# Writes OUT_DIR/gpu-bench.md (the table, with the adapter's name and the date) and the raw
# JSON of every bench beside it. The CPU path's figures from the same run stand beside the GPU
# ones. A GPU figure that this build cannot measure is printed as "open", never guessed.
set -euo pipefail
OUT="${1:-gpu-bench-out}"
mkdir -p "$OUT"
BIN=target/release/sonoguide
if command -v cargo >/dev/null; then
    cargo build --release --locked --bin sonoguide
    # Parity at toy and production sizes on the hardware adapter (fails the script if off).
    cargo test --release --locked --test kernels gpu_ 2>&1 | tee "$OUT/parity.log" | tail -5
    cargo test --release --locked --test pixels gpu_ 2>&1 | tee -a "$OUT/parity.log" | tail -5
fi
[ -x "$BIN" ] || { echo "no $BIN: build it (cargo build --release) or carry it" >&2; exit 2; }

"$BIN" adapters --json > "$OUT/adapters.json"
run() { # name, args...: JSON to OUT/name.json
    local name=$1; shift
    "$BIN" bench --json "$@" > "$OUT/$name.json"
}
run kernels-gpu --backend gpu --size 1024x768 --repeats 30
run kernels-cpu --backend cpu --size 1024x768 --repeats 15
run pipeline-gpu --backend gpu --pipeline --repeats 30
run pipeline-cpu --backend cpu --pipeline --repeats 15
run streams-gpu --backend gpu --pipeline --size 640x480 --streams 4 --repeats 30
run streams-cpu --backend cpu --pipeline --size 640x480 --streams 4 --repeats 8
run serve-gpu --backend gpu --serve --size 640x480 --repeats 60
run serve-cpu --backend cpu --serve --size 640x480 --repeats 30

python3 - "$OUT" <<'PY'
import json, sys, datetime, pathlib
out = pathlib.Path(sys.argv[1])
load = lambda n: json.loads((out / f"{n}.json").read_text())
kg, kc = load("kernels-gpu"), load("kernels-cpu")
pg, pc = load("pipeline-gpu"), load("pipeline-cpu")
sg, sc = load("serve-gpu"), load("serve-cpu")
tg, tc = load("streams-gpu"), load("streams-cpu")
def streams(rows):
    return rows[0]["throughput_frames_per_s"] if rows else None
fps = lambda v: "open" if v is None else f"{v:.1f} frames/s"
adapter = kg[0]["adapter"] if kg else "?"
def kernel(rows, name, **p):
    for r in rows:
        if r["kernel"] == name and all(abs(r["parameters"].get(k, -1) - v) < 1e-9 for k, v in p.items()):
            return r["ms_median"]
    return None
def pipe(rows, w):
    for r in rows:
        if r["width"] == w:
            return r["ms_median"]
    return None
def readbacks(rows, w):
    for r in rows:
        if r["width"] == w and r.get("readbacks_per_frame") is not None:
            return f"{r['readbacks_per_frame']:.1f}"
    return "open"
def gpu_time(rows, w):
    for r in rows:
        if r["width"] == w and r.get("gpu_ms_per_frame") is not None:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["gpu_kernel_ms"].items()))
            return f"{r['gpu_ms_per_frame']:.3f} ms ({parts})"
    return "open (no timestamps)"
def serve(rows):
    r = rows[0] if isinstance(rows, list) and rows else rows
    for k in ("latency_median_ms", "ms_median"):
        if isinstance(r, dict) and k in r:
            return r[k]
    return None
fmt = lambda v: "open" if v is None else f"{v:.3f} ms"
lines = [
    f"GPU figures, {datetime.date.today()}, adapter: {adapter}",
    "",
    "| measure | aim | GPU | CPU, same run |",
    "|---|---|---|---|",
    f"| whole frame, upload to plan, 640x480 | <= 2 ms | {fmt(pipe(pg, 640))} | {fmt(pipe(pc, 640))} |",
    f"| whole frame, upload to plan, 1024x768 | <= 3 ms | {fmt(pipe(pg, 1024))} | {fmt(pipe(pc, 1024))} |",
    f"| read-backs per frame, 640x480 | 1 | {readbacks(pg, 640)} | - |",
    f"| GPU busy time per frame (timestamps), 640x480 | - | {gpu_time(pg, 640)} | - |",
    f"| GPU busy time per frame (timestamps), 1024x768 | - | {gpu_time(pg, 1024)} | - |",
    f"| SRAD, 100 iterations, 1024x768 | <= 1 ms | {fmt(kernel(kg, 'srad', iterations=100))} | {fmt(kernel(kc, 'srad', iterations=100))} |",
    f"| OBNLM, 1024x768 | <= 2 ms | {fmt(kernel(kg, 'obnlm'))} | {fmt(kernel(kc, 'obnlm'))} |",
    f"| four concurrent streams at 640x480 | >= 1,500 frames/s | {fps(streams(tg))} | {fps(streams(tc))} |",
    f"| OpenIGTLink, IMAGE in to results out, median | <= 5 ms | {fmt(serve(sg))} | {fmt(serve(sc))} |",
]
(out / "gpu-bench.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
