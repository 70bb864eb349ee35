"""sonoguide's CPU kernels against their peers (numpy, OpenCV), in one run on one frame.

usage: python3 tools/peer_bench.py [--sonoguide PATH] [--repeats N] [--rounds R] [--json FILE]

The frame: a 1024x768 phantom written by `sonoguide phantom` and read back with pydicom (the
same kind of speckle the kernels bench on). The script runs `sonoguide bench --backend cpu
--json` and the peers one after the other in the same process run, and prints each ratio
(peer time / sonoguide time) beside the aim of issue 16. Then it runs `sonoguide bench
--pipeline --backend cpu --size 640x480` and prints the whole-frame rate beside the same run's
numpy SRAD time per iteration, the measure of the machine's state that day.

Peers:
- SRAD: the Rodinia benchmark's discretisation (q0 from the whole image every iteration,
  clamped edges), vectorised in numpy with slices in float32; per iteration.
- Lee 7x7: window mean and variance from integral images (cumsum), numpy.
- OBNLM 11/5: OpenCV `fastNlMeansDenoising` on the frame as 8 bits, template 5, search 11,
  h 10 (OpenCV's own threads on every core; the time does not depend on h).
- median 5x5: OpenCV `medianBlur` on the float32 frame (its 5x5 float path).

Needs numpy, pydicom and opencv-python-headless (`pip install -r tools/requirements-peers.txt`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def timed(f, repeats, warmup=2):
    """Median milliseconds of f() over `repeats` runs after `warmup`."""
    for _ in range(warmup):
        f()
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)


def srad_rodinia(J, iterations, lam=0.5):
    """Rodinia's SRAD (srad_v1) in numpy, written for speed: float32, neighbour differences
    by slicing (edges clamped as Rodinia's index arrays do), no fancy indexing."""
    # Rodinia works on exp(I/255) >= 1; floor at one grey level as sonoguide does, so that
    # black pixels do not turn into NaN (which numpy handles far more slowly).
    J = np.maximum(J.astype(np.float32), np.float32(1.0))
    dN, dS, dW, dE = (np.empty_like(J) for _ in range(4))
    for _ in range(iterations):
        mean = J.mean(dtype=np.float64)
        var = np.square(J, dtype=np.float64).mean() - mean * mean
        q0sqr = np.float32(var / (mean * mean))
        dN[0] = 0.0
        np.subtract(J[:-1], J[1:], out=dN[1:])
        dS[-1] = 0.0
        np.subtract(J[1:], J[:-1], out=dS[:-1])
        dW[:, 0] = 0.0
        np.subtract(J[:, :-1], J[:, 1:], out=dW[:, 1:])
        dE[:, -1] = 0.0
        np.subtract(J[:, 1:], J[:, :-1], out=dE[:, :-1])
        G2 = (dN * dN + dS * dS + dW * dW + dE * dE) / (J * J)
        L = (dN + dS + dW + dE) / J
        num = 0.5 * G2 - np.float32(1.0 / 16.0) * (L * L)
        den = 1.0 + 0.25 * L
        qsqr = num / (den * den)
        den = (qsqr - q0sqr) / (q0sqr * (1.0 + q0sqr))
        c = np.clip(1.0 / (1.0 + den), 0.0, 1.0)
        cS = np.empty_like(c)
        cS[:-1] = c[1:]
        cS[-1] = c[-1]
        cE = np.empty_like(c)
        cE[:, :-1] = c[:, 1:]
        cE[:, -1] = c[:, -1]
        J += np.float32(0.25 * lam) * (c * dN + cS * dS + c * dW + cE * dE)
    return J


def lee_numpy(img, window=7, cu=0.25):
    """Lee filter from integral images (clamped edges)."""
    r = window // 2
    p = np.pad(img.astype(np.float64), r, mode="edge")

    def box(a):
        s = np.zeros((a.shape[0] + 1, a.shape[1] + 1))
        s[1:, 1:] = a.cumsum(0).cumsum(1)
        k = window
        return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]) / (k * k)

    m = box(p)
    v = np.maximum(box(p * p) - m * m, 0.0)
    ci2 = v / np.maximum(m * m, 1e-3)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(ci2 > 0, np.clip(1.0 - cu * cu / ci2, 0.0, 1.0), 0.0)
    return (m + w * (img - m)).astype(np.float32)


def load_frame(sonoguide, tmp):
    import pydicom

    subprocess.run([sonoguide, "phantom", "--out", tmp, "--count", "1", "--seed", "4242",
                    "--size", "1024x768", "--prefix", "peer"], check=True,
                   stdout=subprocess.DEVNULL)
    path = next(os.path.join(tmp, f) for f in sorted(os.listdir(tmp)) if f.endswith(".dcm"))
    a = pydicom.dcmread(path).pixel_array
    if a.ndim == 3:
        a = a[0] if a.shape[-1] not in (3, 4) else a[..., 0]
    return a.astype(np.float32)


def sonoguide_bench(sonoguide, args):
    out = subprocess.run([sonoguide, "bench", "--backend", "cpu", "--json", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sonoguide", default="target/release/sonoguide")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the table as JSON here")
    a = ap.parse_args()
    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        img = load_frame(a.sonoguide, tmp)
    print(f"frame {img.shape[1]}x{img.shape[0]}, numpy {np.__version__}, OpenCV "
          f"{cv2.__version__} ({cv2.getNumThreads()} threads), {os.cpu_count()} cores")

    def ours_once():
        rows = sonoguide_bench(a.sonoguide, ["--size", "1024x768", "--repeats", str(a.repeats)])
        ours = {}
        for r in rows:
            p = r["parameters"]
            if r["kernel"] == "srad":
                ours[f"srad{int(p['iterations'])}"] = r["ms_median"]
            elif r["kernel"] == "median":
                ours[f"median{int(p['size'])}"] = r["ms_median"]
            else:
                ours[r["kernel"]] = r["ms_median"]
        return ours

    u8 = np.clip(img, 0, 255).astype(np.uint8)

    def peers_once():
        return {
            "srad": timed(lambda: srad_rodinia(img, 10), max(3, a.repeats // 3), 1) / 10,
            "lee": timed(lambda: lee_numpy(img), a.repeats),
            "nlm": timed(lambda: cv2.fastNlMeansDenoising(u8, None, 10, 5, 11), a.repeats),
            "median": timed(lambda: cv2.medianBlur(img, 5), a.repeats),
        }

    # Rounds alternate sonoguide and the peers, so that a change in the machine's load hits
    # both; each figure is the median over the rounds.
    runs = [(ours_once(), peers_once()) for _ in range(a.rounds)]
    med = statistics.median
    ours = {k: med(r[0][k] for r in runs) for k in runs[0][0]}
    srad_iter, lee_ms, nlm_ms, med_ms = (med(r[1][k] for r in runs)
                                         for k in ("srad", "lee", "nlm", "median"))
    print(f"{a.rounds} rounds alternating sonoguide and the peers; medians over the rounds")

    our_iter = ours["srad100"] / 100
    setup = ours["srad1"] - our_iter
    table = [
        ("SRAD, per iteration (100 iterations)", our_iter, "numpy (Rodinia)", srad_iter, 12.0),
        ("OBNLM, search 11, patch 5", ours["obnlm"], "OpenCV fastNlMeansDenoising", nlm_ms, 1.5),
        ("median 5x5, f32", ours["median5"], "OpenCV medianBlur", med_ms, 3.0),
        ("Lee 7x7", ours["lee"], "numpy (integral images)", lee_ms, 10.0),
    ]
    print(f"\n| kernel (1024x768) | sonoguide ms | peer | peer ms | ratio | aim |")
    print("|---|---|---|---|---|---|")
    out = []
    for name, ms, peer, pms, aim in table:
        ratio = pms / ms
        print(f"| {name} | {ms:.3f} | {peer} | {pms:.2f} | {ratio:.1f}x "
              f"{'met' if ratio >= aim else 'NOT met'} | >= {aim}x |")
        out.append({"kernel": name, "ms": ms, "peer": peer, "peer_ms": pms, "ratio": ratio,
                    "aim": aim})
    share = setup / our_iter
    print(f"| SRAD set-up per call (1 iteration {ours['srad1']:.3f} ms minus one amortised) "
          f"| {setup:.3f} | | | {100 * share:.0f} % of an iteration "
          f"{'met' if share <= 0.10 else 'NOT met'} | <= 10 % |")

    pipe = sonoguide_bench(a.sonoguide, ["--pipeline", "--size", "640x480", "--repeats",
                                         str(a.repeats)])
    whole = pipe[0]["ms_median"] if pipe else float("nan")
    fps = 1e3 / whole
    print(f"\nwhole frame 640x480, CPU: {whole:.2f} ms = {fps:.1f} frames/s "
          f"({'met' if fps >= 30 else 'NOT met'}: aim >= 30); same run's numpy SRAD "
          f"{srad_iter:.2f} ms per iteration at 1024x768 (the machine's state)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"kernels": out, "srad_setup_ms": setup, "pipeline": pipe,
                       "numpy_srad_iter_ms": srad_iter}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
