#!/usr/bin/env python3
"""Prints (or writes into the README between the TABLE markers) the per-case tables of
tests/data/pusim/: python3 tools/pusim/table.py [DATA_DIR] [--readme]."""
import glob
import json
import os
import sys

SETS = (("tune", "tuning"), ("test", "testing"), ("nerve-tune", "tuning (nerve scenes)"),
        ("nerve-test", "testing (nerve scenes)"))


def table(root):
    out = []
    for sub, use in SETS:
        files = sorted(glob.glob(os.path.join(root, sub, "*.truth.json")))
        if not files:
            continue
        done = os.path.exists(os.path.join(root, sub, "DONE"))
        out.append(f"### `{sub}/` - {use}, {len(files)} cases{'' if done else ' (generation still running)'}\n")
        out.append("| name | probe | site | scene | target | depth mm | px mm | size | DR dB | gain dB | tx |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for f in files:
            t = json.load(open(f))
            out.append(f"| {t['name']} | {t['probe']} | {t.get('site', '')} | {t['scene']} | {t['target_kind']} | "
                       f"{t['depth_mm']} | {t['spacing_mm'][0]} | {t['size_px'][0]}x{t['size_px'][1]} | "
                       f"{t['dynamic_range_db']} | {t['gain_db']} | {t['tx']} |")
        out.append("")
    pert = sorted(glob.glob(os.path.join(root, "test-perturbed", "*.truth.json")))
    if pert:
        out.append(f"`test-perturbed/`: {len(pert)} variants (NAME_g+6, NAME_g-6, NAME_dr40, NAME_dr70 of each "
                   "`test/` case; same envelope re-compressed).\n")
    return "\n".join(out)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    root = args[0] if args else "tests/data/pusim"
    text = table(root)
    if "--readme" in sys.argv:
        path = os.path.join(root, "README.md")
        readme = open(path).read()
        a, b = "<!-- TABLE START -->", "<!-- TABLE END -->"
        i, j = readme.index(a) + len(a), readme.index(b)
        open(path, "w").write(readme[:i] + "\n" + text + "\n" + readme[j:])
    else:
        print(text)


if __name__ == "__main__":
    main()
