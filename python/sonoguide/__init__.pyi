"""Type stubs of sonoguide's Python bindings."""

import os
from typing import Any, Iterator, Literal, Optional, Tuple, TypedDict, Union

import numpy as np
import numpy.typing as npt

__version__: str

class SonoguideError(Exception):
    """An error from sonoguide; the message is the Rust error's."""

class Result(TypedDict):
    labels: npt.NDArray[np.uint8]
    """Labels, frame size: 0 background, 1 tendon, 2 bone surface, 3 acoustic shadow,
    4 joint space / effusion, 5 vessel, 6 nerve."""
    despeckled: npt.NDArray[np.float32]
    overlay: Optional[npt.NDArray[np.uint8]]
    """RGB, (rows, columns, 3); None with overlay=False."""
    plan: dict[str, Any]
    """The needle plan, as `plan.json` (status ok / no_safe_path / no_calibration)."""
    timings: dict[str, float]
    """Milliseconds per stage (despeckle_ms, features_ms, segment_ms, plan_ms, total_ms: the
    Rust pipeline's own time) and overlay_ms (drawing the overlay, not part of total_ms)."""

class Pipeline:
    def __init__(
        self,
        preset: Optional[str] = None,
        backend: Literal["auto", "gpu", "cpu"] = "auto",
        filter: Optional[str] = None,
        margin_mm: Optional[float] = None,
    ) -> None: ...
    @property
    def device(self) -> Tuple[str, str]:
        """(backend, device name) the despeckling runs on."""
    def process(
        self,
        image: Union[npt.NDArray[np.uint8], npt.NDArray[np.float32]],
        spacing_mm: Optional[Tuple[float, float]] = None,
        stream: bool = False,
        overlay: bool = True,
    ) -> Result: ...

class Frame(TypedDict):
    index: int
    image: npt.NDArray[np.float32]
    spacing_mm: Optional[Tuple[float, float]]
    calibration: Literal["ok", "missing", "unusable"]
    calibration_source: Optional[str]
    region: Tuple[int, int, int, int]

class DicomFrames:
    def __iter__(self) -> Iterator[Frame]: ...
    def __next__(self) -> Frame: ...
    def __len__(self) -> int: ...

def read_dicom(path: Union[str, os.PathLike[str]]) -> DicomFrames: ...
