//! The harness: synthetic phantoms with ground truth, quality measures, evaluations and
//! benchmarks. It uses the library like any caller would; nothing in the pipeline uses it.
//! Built with the `sim` feature (on by default; the command line's `phantom`, `eval-*` and
//! `bench` commands need it).

pub mod bench;
pub mod eval;
pub mod evalset;
pub mod phantom;
pub mod quality;
pub mod train;

/// Result alias of the harness.
pub type Result<T, E = SimError> = std::result::Result<T, E>;

macro_rules! from_library_error {
    ($($t:ty),+) => {
        $(impl From<$t> for SimError {
            fn from(e: $t) -> SimError {
                SimError::Library(e.into())
            }
        })+
    };
}
// Module errors of the library reach the harness through the crate error.
from_library_error!(
    crate::dicom::DicomError,
    crate::kernels::KernelError,
    crate::gpu::GpuError,
    crate::imageio::ImageError,
    crate::frame::FrameError,
    crate::igtl::IgtlError
);

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A phantom, evaluation or bench setting is outside its valid range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// The setting's name.
        name: &'static str,
        /// Why the value was refused.
        reason: String,
    },
    /// The library failed.
    #[error(transparent)]
    Library(#[from] crate::Error),
    /// A bench's loopback connection to the OpenIGTLink server failed.
    #[error("bench connection to {peer}: {source}")]
    Connection {
        /// The server's address.
        peer: String,
        /// What the operating system said.
        source: std::io::Error,
    },
}
