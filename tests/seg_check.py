"""Reads sonoguide's DICOM SEG files back with highdicom and checks them against labels.png.

usage: seg_check.py SEG SOURCE LABELS_PNG [LABELS_PNG ...]
   or: seg_check.py --raw SEG SOURCE LABELS.bin FRAMES ROWS COLUMNS

Each LABELS_PNG is one processed source frame, in order (frame_0000.labels.png, ...); with
--raw, the labels are FRAMES x ROWS x COLUMNS bytes, row-major. Prints one JSON line with what
was checked; exits 1 with the reason on any difference.
"""

import json
import sys

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image

# Label codes and names as sonoguide writes them (src/label.rs).
NAMES = {
    1: "tendon",
    2: "bone surface",
    3: "acoustic shadow",
    4: "joint space / effusion",
    5: "vessel",
    6: "nerve",
}
COLOURS = {
    1: (230, 159, 0),
    2: (240, 228, 66),
    3: (0, 114, 178),
    4: (0, 158, 115),
    5: (213, 94, 0),
    6: (136, 34, 85),
}
# highdicom and sonoguide both convert sRGB to CIELab through XYZ (D65); rounding to 16 bits
# may differ by a unit or two.
CIELAB_TOLERANCE = 3


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def main(argv):
    raw = argv[0] == "--raw"
    if raw:
        argv = argv[1:]
    seg_path, source_path = argv[0], argv[1]
    if raw:
        shape = tuple(int(v) for v in argv[3:6])
        labels = np.fromfile(argv[2], dtype=np.uint8).reshape(shape)
    else:
        labels = np.stack([np.asarray(Image.open(p)) for p in argv[2:]])
    seg = hd.seg.segread(seg_path)
    src = pydicom.dcmread(source_path, stop_before_pixels=True)
    if seg.SegmentationType != "BINARY":
        fail(f"{seg_path}: SegmentationType {seg.SegmentationType}")
    if seg.StudyInstanceUID != src.StudyInstanceUID:
        fail(f"{seg_path}: not in the source's study")
    if seg.SeriesInstanceUID == src.SeriesInstanceUID:
        fail(f"{seg_path}: not a new series")
    if "PatientOrientation" not in seg:
        fail(f"{seg_path}: no Patient Orientation")
    # Segments: exactly the labels present, numbered 1.. in label order, coded and coloured.
    present = [c for c in sorted(NAMES) if (labels == c).any()]
    by_number = {}
    for item in seg.SegmentSequence:
        n = int(item.SegmentNumber)
        code = [c for c, name in NAMES.items() if name == item.SegmentLabel]
        if not code:
            fail(f"{seg_path}: unknown segment label {item.SegmentLabel!r}")
        by_number[n] = code[0]
        for attr in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence"):
            c = getattr(item, attr)[0]
            if c.CodingSchemeDesignator not in ("SCT", "DCM") or not c.CodeValue:
                fail(f"{seg_path}: segment {n} {attr} is not coded")
        if item.SegmentAlgorithmType != "AUTOMATIC":
            fail(f"{seg_path}: segment {n} algorithm type {item.SegmentAlgorithmType}")
        alg = item.SegmentationAlgorithmIdentificationSequence[0]
        if alg.AlgorithmName != "sonoguide" or not alg.AlgorithmVersion:
            fail(f"{seg_path}: segment {n} algorithm identification")
        want = hd.color.CIELabColor.from_rgb(*COLOURS[code[0]]).value
        got = tuple(int(v) for v in item.RecommendedDisplayCIELabValue)
        if max(abs(a - b) for a, b in zip(want, got)) > CIELAB_TOLERANCE:
            fail(f"{seg_path}: segment {n} colour {got}, highdicom says {want}")
    if [by_number[n] for n in sorted(by_number)] != present:
        fail(f"{seg_path}: segments {by_number} but labels present {present}")
    if sorted(by_number) != list(range(1, len(present) + 1)):
        fail(f"{seg_path}: segment numbers {sorted(by_number)}")
    # Every frame references the source (and its frame for a cine) with spatial locations
    # preserved.
    multi = int(getattr(src, "NumberOfFrames", 1)) > 1
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0]
        if ref.ReferencedSOPInstanceUID != src.SOPInstanceUID:
            fail(f"{seg_path}: frame {i + 1} references another image")
        if ref.SpatialLocationsPreserved != "YES":
            fail(f"{seg_path}: frame {i + 1} Spatial Locations Preserved is not YES")
        if multi and "ReferencedFrameNumber" not in ref:
            fail(f"{seg_path}: frame {i + 1} names no source frame")
    # Masks, read by highdicom, equal the label maps pixel for pixel.
    if multi:
        frames = [int(f) for f in sorted({
            int(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
            for fg in seg.PerFrameFunctionalGroupsSequence
        })]
        got = seg.get_pixels_by_source_frame(
            src.SOPInstanceUID, frames, combine_segments=True, relabel=False
        )
    else:
        got = seg.get_pixels_by_source_instance(
            [src.SOPInstanceUID], combine_segments=True, relabel=False
        )
    mapping = np.zeros(len(by_number) + 1, dtype=np.uint8)
    for n, code in by_number.items():
        mapping[n] = code
    got = mapping[np.asarray(got)]
    if got.shape != labels.shape:
        fail(f"{seg_path}: masks of shape {got.shape}, labels {labels.shape}")
    diff = int((got != labels).sum())
    if diff:
        fail(f"{seg_path}: {diff} pixels differ from the labels")
    print(json.dumps({"seg": seg_path, "frames": int(got.shape[0]),
                      "segments": [NAMES[c] for c in present], "pixels_equal": True}))


if __name__ == "__main__":
    main(sys.argv[1:])
