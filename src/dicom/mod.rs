//! DICOM input and output: ultrasound frames with their calibration in, derived files out.
//!
//! Reading goes through dicom-rs (`dicom-object`, `dicom-pixeldata` with the JPEG, JPEG 2000
//! (`openjp2`), RLE and deflate codecs); colour models (palette, YBR) are converted here so
//! that every frame comes out as the RGB a viewer would display.

mod prescan;
pub mod read;
pub mod region;
pub mod seg;
pub mod write;

pub use prescan::long_length_vr;
pub use read::{DicomFile, DicomInfo, ReadOptions, UltrasoundRegion};

use std::path::PathBuf;

/// What went wrong with a DICOM file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DicomError {
    /// The file could not be read from disk.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The bytes are not a DICOM file, or its structure is broken.
    #[error("{path}: not a readable DICOM file: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A required attribute is missing or has an impossible value.
    #[error("{path}: {attribute}: {reason}")]
    BadAttribute {
        /// The file.
        path: PathBuf,
        /// The attribute's keyword.
        attribute: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The image is larger than the configured limits allow.
    #[error("{path}: {reason} (limit: {limit})")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// What is too large.
        reason: String,
        /// The limit that was exceeded, in words.
        limit: String,
    },
    /// The file has no pixel data.
    #[error("{path}: no pixel data (7FE0,0010)")]
    NoPixelData {
        /// The file.
        path: PathBuf,
    },
    /// A frame could not be decoded.
    #[error("{path}: frame {frame}: {reason}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Zero-based frame number.
        frame: usize,
        /// What the decoder said.
        reason: String,
    },
    /// The transfer syntax or pixel format is not one sonoguide can decode.
    #[error("{path}: unsupported: {what}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        what: String,
    },
    /// Writing a derived DICOM file failed.
    #[error("{path}: cannot write DICOM: {reason}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl crate::frame::Frame {
    /// Frame `index` of a DICOM file held in memory. (Defined here, beside the reader, so that
    /// the frame module knows nothing of DICOM.)
    pub fn from_dicom_bytes(bytes: Vec<u8>, index: usize) -> crate::Result<crate::frame::Frame> {
        let file = DicomFile::from_bytes("<memory>", bytes, &ReadOptions::default())?;
        Ok(file.read_frame(index)?)
    }
}

/// What `sonoguide info` reports of one file: the header, every ultrasound region, the chosen
/// imaging region and the calibration status.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct InfoReport {
    /// The header.
    #[serde(flatten)]
    pub info: DicomInfo,
    /// The chosen imaging region.
    pub imaging_region: read::ImagingRegionInfo,
    /// `ok`, `missing` or `unusable`.
    #[serde(rename = "calibration")]
    pub calibration_status: &'static str,
    /// Why the calibration is unusable.
    pub calibration_reason: Option<String>,
}

/// Opens `path` and reports what it holds (no pixel data is decoded).
pub fn info_report(path: &std::path::Path) -> Result<InfoReport, DicomError> {
    let file = DicomFile::open(path, &ReadOptions::default())?;
    let imaging_region = file.imaging_region_info()?;
    let info = file.info().clone();
    let calibration_reason = match &info.calibration {
        crate::frame::Calibration::Unusable { reason } => Some(reason.clone()),
        _ => None,
    };
    Ok(InfoReport {
        calibration_status: info.calibration.status(),
        calibration_reason,
        imaging_region,
        info,
    })
}
