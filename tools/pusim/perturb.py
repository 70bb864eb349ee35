#!/usr/bin/env python3
"""Gain and dynamic-range variants of finished pulse-echo cases, made from their DICOM files.

simulate.py writes its test cases' variants (NAME_g+6, _g-6, _dr40, _dr70) from the beamformed
envelope, which it does not keep. For cases already simulated (the training run, whose
validation split must be screened under the same perturbations without re-simulating), this
script re-compresses the stored grey levels instead. simulate.py's law is

    grey = anchor + 255 / dr * dB        (clipped to 0..255, then rounded)

with the case's `grey_anchor` and `dynamic_range_db` in its truth file, so a grey level gives
its dB back exactly wherever it was not clipped. Two variants follow from that exactly:

- NAME_g-6: 6 dB less gain (grey - 255 * 6 / dr); what was black stays black, and only pixels
  that were saturated (well under 1 % of the region in the training run) lose their excess;
- NAME_dr40: the same dB over 40 dB (anchor + (grey - anchor) * dr / 40, for dr > 40); black
  stays black and white stays white, the steps between grey levels widen by dr / 40.

More gain or a wider range would lift the clipped black pixels (a few per cent of the region,
mostly in shadows) to one flat grey that no scanner makes, so those two are not written.
Truth labels and polylines are copied unchanged; the truth file records the perturbation.

Usage: perturb.py IN_DIR OUT_DIR   (every IN_DIR/*.dcm with a .truth.json beside it)
"""
import copy
import glob
import json
import os
import shutil
import sys

import numpy as np
import pydicom
from pydicom.uid import generate_uid


def variants(dr):
    out = [("_g-6", lambda g, a: g - 255.0 * 6.0 / dr,
            dict(kind="gain", delta_db=-6.0), dr)]
    if dr > 40.0:
        out.append(("_dr40", lambda g, a: a + (g - a) * dr / 40.0,
                    dict(kind="dynamic_range", dynamic_range_db=40.0), 40.0))
    return out


def main(src, dst):
    os.makedirs(dst, exist_ok=True)
    cases = sorted(glob.glob(os.path.join(src, "*.dcm")))
    if not cases:
        sys.exit(f"perturb.py: no .dcm files in {src}")
    written = 0
    for path in cases:
        stem = path[:-4]
        truth_path = stem + ".truth.json"
        if not os.path.exists(truth_path):
            print(f"perturb.py: {path}: no truth file beside it, skipped", file=sys.stderr)
            continue
        with open(truth_path) as f:
            truth = json.load(f)
        dr = float(truth["dynamic_range_db"])
        anchor = float(truth["simulation"]["grey_anchor"])
        ds = pydicom.dcmread(path)
        grey = ds.pixel_array.astype(np.float64)
        if ds.BitsAllocated != 8 or grey.ndim != 2:
            print(f"perturb.py: {path}: not an 8-bit single-frame grey image, skipped",
                  file=sys.stderr)
            continue
        for suffix, law, pert, new_dr in variants(dr):
            name = truth["name"] + suffix
            out = np.clip(np.round(law(grey, anchor)), 0, 255).astype(np.uint8)
            v = copy.deepcopy(ds)
            v.PixelData = out.tobytes()
            uid = generate_uid(entropy_srcs=[f"pusim/{name}/{truth['seed']}", "instance"])
            v.SOPInstanceUID = uid
            v.file_meta.MediaStorageSOPInstanceUID = uid
            v.SeriesDescription = f"{truth['name']} {suffix[1:]} (re-compressed grey levels)"
            t = copy.deepcopy(truth)
            t["name"] = name
            t["dynamic_range_db"] = new_dr
            t["gain_db"] = round(float(truth["gain_db"]) + pert.get("delta_db", 0.0), 1)
            pert.update(of=truth["name"], original_gain_db=truth["gain_db"],
                        original_dynamic_range_db=dr,
                        note="grey levels re-compressed by tools/pusim/perturb.py; not re-simulated")
            t["perturbation"] = pert
            base = os.path.join(dst, name)
            v.save_as(base + ".dcm", enforce_file_format=True)
            shutil.copyfile(stem + ".truth.png", base + ".truth.png")
            with open(base + ".truth.json", "w") as f:
                json.dump(t, f, separators=(",", ":"))
                f.write("\n")
            written += 1
    print(f"perturb.py: {written} variants of {len(cases)} cases written to {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
