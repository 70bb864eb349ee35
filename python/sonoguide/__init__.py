"""sonoguide: ultrasound-guidance image pipeline (research tool, not a medical device).

Every suggested needle path must be checked by a trained person.
"""

from ._sonoguide import DicomFrames, Pipeline, SonoguideError, __version__, read_dicom

__all__ = ["Pipeline", "DicomFrames", "SonoguideError", "read_dicom", "__version__"]
