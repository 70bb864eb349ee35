"""What Pipeline.process adds to the Rust pipeline's own time on a 640x480 frame.

usage: python3 tools/python_overhead.py [REPEATS]

Per call: the Python wall time of Pipeline.process, and the time Rust spent on the same work
(timings.total_ms: despeckle, features, segment, plan; plus timings.overlay_ms when the overlay
is drawn). Prints the medians and the overhead in percent, with and without the overlay.
"""

import statistics
import sys
import time

import numpy as np

import sonoguide


def main(repeats):
    rng = np.random.default_rng(7)
    # A speckled 640x480 frame with a bright band (bone) and its shadow: the work is realistic.
    img = rng.rayleigh(40.0, size=(480, 640)).astype(np.float32)
    img[300:306, 100:540] = 230.0
    img[306:, 100:540] *= 0.2
    img = np.clip(img, 0, 255).astype(np.float32)
    p = sonoguide.Pipeline(backend="cpu")
    print("device:", p.device)
    for _ in range(3):
        p.process(img, spacing_mm=(0.08, 0.08))
    for overlay in (False, True):
        wall, rust = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = p.process(img, spacing_mm=(0.08, 0.08), overlay=overlay)
            wall.append((time.perf_counter() - t0) * 1000.0)
            # The same work in Rust: the pipeline, plus drawing the overlay when asked for.
            rust.append(r["timings"]["total_ms"] + r["timings"]["overlay_ms"])
        w, t = statistics.median(wall), statistics.median(rust)
        what = "with the overlay drawn" if overlay else "overlay=False"
        print(f"640x480, {repeats} calls, {what}: Python wall median {w:.2f} ms, Rust "
              f"median {t:.2f} ms, overhead {100.0 * (w - t) / t:.1f} %")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
