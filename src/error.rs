//! The crate-wide error type.
//!
//! Each module has its own error enum carrying the context a user needs (which file, which
//! frame, which kernel, which peer); [`Error`] wraps them so that callers can match on one type.

/// Every error sonoguide returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading, decoding or writing a DICOM file failed.
    #[error(transparent)]
    Dicom(#[from] crate::dicom::DicomError),
    /// A frame given by the caller is not a valid frame.
    #[error(transparent)]
    Frame(#[from] crate::frame::FrameError),
    /// A kernel refused its parameters or its image.
    #[error(transparent)]
    Kernel(#[from] crate::kernels::KernelError),
    /// The planner's settings are invalid.
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    /// A GPU operation failed (no adapter, device lost, out of memory, shader error).
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
    /// Writing or reading a PNG or JSON file failed.
    #[error(transparent)]
    Image(#[from] crate::imageio::ImageError),
    /// Drawing an overlay failed.
    #[error(transparent)]
    Overlay(#[from] crate::overlay::OverlayError),
    /// The OpenIGTLink server could not start.
    #[error(transparent)]
    Igtl(#[from] crate::igtl::IgtlError),
    /// A batch could not run (output folder).
    #[error(transparent)]
    Batch(#[from] crate::batch::BatchError),
    /// A DICOMweb server could not be used.
    #[cfg(feature = "dicomweb")]
    #[error(transparent)]
    DicomWeb(#[from] crate::dicomweb::DicomWebError),
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
