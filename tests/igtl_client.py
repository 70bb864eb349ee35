"""A real OpenIGTLink client (pyigtl) against `sonoguide serve`.

Usage: igtl_client.py PORT FRAME_RAW WIDTH HEIGHT MM_PER_PX [ras|lps]
Sends the 8-bit frame as an IMAGE from device "probe" with a fixed timestamp in the given world
frame (default lps), waits for the overlay IMAGE, the POINT and the STRING replies, checks
their device names, timestamps and coordinate system, and prints the plan JSON on the last
line.
"""
import json
import sys

import numpy as np
import pyigtl

port, raw, w, h, mm = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
frame = sys.argv[6] if len(sys.argv) > 6 else "lps"
# A timestamp a binary fraction away from a whole second: it survives the fixed-point format
# exactly, so the echo can be compared for equality.
STAMP = 1_700_000_000.5
pixels = np.fromfile(raw, dtype=np.uint8).reshape(1, h, w)
matrix = np.diag([mm, mm, 1.0, 1.0])
client = pyigtl.OpenIGTLinkClient("127.0.0.1", port)
client.send_message(
    pyigtl.ImageMessage(pixels, ijk_to_world_matrix=matrix, world_coordinate_system=frame,
                        timestamp=STAMP, device_name="probe"),
    wait=True)
# Reply names: the IMAGE's device name with a suffix per reply (see the README).
plan = client.wait_for_message("probe_plan", timeout=60)
overlay = client.wait_for_message("probe_overlay", timeout=60)
points = client.wait_for_message("probe_points", timeout=60)
assert plan is not None, "no plan STRING"
assert overlay is not None, "no overlay IMAGE"
assert overlay.image.shape == (1, h, w, 3), overlay.image.shape
assert overlay.image.dtype == np.uint8
assert overlay.world_coordinate_system == frame, overlay.world_coordinate_system
for reply in (plan, overlay):
    assert abs(reply.timestamp - STAMP) < 1e-6, (reply.device_name, reply.timestamp)
doc = json.loads(plan.string)
assert doc["status"] in ("ok", "no_safe_path"), doc
if doc["status"] == "ok":
    assert points is not None, "no POINT message"
    assert abs(points.timestamp - STAMP) < 1e-6, points.timestamp
    assert set(points.names) == {"entry", "target"}, points.names
    # The target's world position is its pixel mapped by the IMAGE matrix: here diagonal with
    # no translation, so pixel × spacing.
    t = points.positions[points.names.index("target")]
    tx, ty = doc["target"]["px"]
    assert abs(t[0] - tx * mm) < 1e-3 and abs(t[1] - ty * mm) < 1e-3, (t, tx, ty)
client.stop()
print(json.dumps(doc))
