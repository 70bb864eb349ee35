//! # sonoguide
//!
//! An ultrasound-guidance image pipeline for musculoskeletal injections: it reads the
//! scanner's DICOM frames with their physical calibration, despeckles them, segments bone,
//! acoustic shadow, tendon, joint space and vessels, and suggests an in-plane needle path.
//!
//! This is a research and engineering tool, not a certified medical device.
//!
//! ```no_run
//! use sonoguide::dicom::{DicomFile, ReadOptions};
//! let file = DicomFile::open("scan.dcm", &ReadOptions::default())?;
//! for frame in file.frames() {
//!     let frame = frame?;
//!     println!("frame {}: {}x{}, calibration {}", frame.index, frame.width(), frame.height(),
//!              frame.calibration.status());
//! }
//! # Ok::<(), sonoguide::Error>(())
//! ```
#![warn(missing_docs)]
// Settings structs are #[non_exhaustive]; callers build them from Default and assign fields.
#![allow(clippy::field_reassign_with_default)]
// Image loops index several arrays by the same coordinates; iterators would hide that.
#![allow(clippy::needless_range_loop)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub(crate) mod atomic;
pub mod batch;
pub mod despeckle;
pub mod dicom;
#[cfg(feature = "dicomweb")]
pub mod dicomweb;
pub mod error;
pub mod fft;
pub mod frame;
pub mod gpu;
pub mod igtl;
pub mod imageio;
pub mod kernels;
pub mod label;
pub mod overlay;
pub mod pipeline;
pub mod plan;
pub mod segment;
#[cfg(feature = "sim")]
pub mod sim;
pub(crate) mod simd;

pub use despeckle::{Despeckler, Filter};
pub use error::{Error, Result};
pub use frame::{Calibration, Frame, ImagingRegion, Rect};
pub use gpu::{Backend, Compute, Ran};
pub use label::Label;
pub use pipeline::{
    FrameResult, Pipeline, PipelineBuilder, PipelineConfig, Session, StageBackends, StageTimings,
};
pub use plan::{NeedlePlan, PlanStatus, Side, TargetKind};
pub use segment::Segmentation;
