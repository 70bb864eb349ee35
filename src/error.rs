//! The crate-wide error type.
//!
//! Each module has its own error enum carrying the context a user needs (which file, which
//! frame, which kernel); [`Error`] wraps them so that callers can match on one type.

use std::path::PathBuf;

/// Every error sonoguide returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or decoding a DICOM file failed.
    #[error(transparent)]
    Dicom(#[from] crate::dicom::DicomError),
    /// Writing an output file failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file that could not be written.
        path: PathBuf,
        /// What the operating system or encoder said.
        source: std::io::Error,
    },
    /// A phantom could not be generated with the given settings.
    #[error("phantom: {0}")]
    Phantom(String),
    /// A parameter given by the caller is outside its valid range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// The parameter's name, as the CLI and the params structs spell it.
        name: &'static str,
        /// Why the value was refused.
        reason: String,
    },
    /// A GPU operation failed (no adapter, device lost, out of memory, shader error).
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    /// Encoding or decoding an image file (PNG) failed.
    #[error("image {path}: {message}")]
    Image {
        /// The image file concerned.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync_static<T: Send + Sync + 'static>() {}

    #[test]
    fn error_is_send_sync_static() {
        assert_send_sync_static::<Error>();
    }
}
