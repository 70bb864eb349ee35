#!/usr/bin/env python3
"""Compares two `sonoguide process` output folders made from the same inputs, for refactors
that must not change behaviour.

- PNG and JSON files (frame_*.png, *.json but summary.json): byte for byte.
- summary.json: byte for byte after dropping what varies run to run (each file's `timings`) and
  the keys named with --new-key (fields a change adds on purpose); the text is re-serialised
  with the same key order, so key order still counts.
- *.dcm: `dcmdump` output (dcmtk) line for line, ignoring UIDs, dates and times, which are
  new in every run by design; pixel data is compared through its dump.

Exit 0 when identical, 1 otherwise (differences listed). Run both binaries from the same
relative paths (e.g. `cd A && sonoguide process sample-data --out out`) so that paths match.
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

VARYING_DICOM = re.compile(r"\((0002,0003|0002,0012|0008,0012|0008,0013|0008,0018|0008,0021|"
                           r"0008,0023|0008,0031|0008,0033|0020,000e|0008,1155|0020,000d)\)", re.I)


def summary_text(path, new_keys):
    doc = json.loads(path.read_text())
    for key in new_keys:
        doc.pop(key, None)
    for f in doc.get("files", []):
        f.pop("timings", None)
    return json.dumps(doc, indent=2)


def dicom_dump(path):
    out = subprocess.run(["dcmdump", "+L", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [l for l in out.splitlines() if not VARYING_DICOM.search(l)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--new-key", action="append", default=[],
                    help="a top-level summary.json key the change adds on purpose")
    a = ap.parse_args()
    diffs, checked = [], 0
    names_a = {p.relative_to(a.before) for p in a.before.rglob("*") if p.is_file()}
    names_b = {p.relative_to(a.after) for p in a.after.rglob("*") if p.is_file()}
    for missing in sorted(names_a ^ names_b):
        diffs.append(f"only in one folder: {missing}")
    for rel in sorted(names_a & names_b):
        pa, pb = a.before / rel, a.after / rel
        checked += 1
        if rel.name == "summary.json":
            same = summary_text(pa, a.new_key) == summary_text(pb, a.new_key)
        elif rel.suffix == ".dcm":
            same = dicom_dump(pa) == dicom_dump(pb)
        else:
            same = pa.read_bytes() == pb.read_bytes()
        if not same:
            diffs.append(f"differs: {rel}")
    for d in diffs:
        print(d)
    print(f"{checked} files compared, {len(diffs)} differences")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
