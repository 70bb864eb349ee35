//! PNG and JSON outputs, written atomically (temporary file beside the target, then rename),
//! so that an interrupted run never leaves a half-written file.

use std::path::{Path, PathBuf};

use ndarray::Array2;

use crate::atomic::AtomicWriteError;
use crate::Result;

/// Errors of the PNG and JSON outputs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// Encoding or decoding the file failed.
    #[error("image {path}: {message}")]
    Encode {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The operating system refused the write or the rename into place.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file that could not be written.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
}

fn encode_error(path: &Path, message: impl ToString) -> ImageError {
    ImageError::Encode {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), String>,
) -> Result<()> {
    crate::atomic::write_atomic(path, write).map_err(|e| {
        match e {
            AtomicWriteError::Write(message) => encode_error(path, message),
            AtomicWriteError::Rename(source) => ImageError::Write {
                path: path.to_path_buf(),
                source,
            },
        }
        .into()
    })
}

/// Writes an 8-bit greyscale PNG.
pub fn write_gray_png(path: &Path, image: &Array2<u8>) -> Result<()> {
    let (h, w) = image.dim();
    let data: Vec<u8> = image.iter().copied().collect();
    write_atomic(path, |tmp| {
        image::save_buffer_with_format(
            tmp,
            &data,
            w as u32,
            h as u32,
            image::ExtendedColorType::L8,
            image::ImageFormat::Png,
        )
        .map_err(|e| e.to_string())
    })
}

/// Writes an 8-bit RGB PNG from a row-major buffer.
pub fn write_rgb_png(path: &Path, width: usize, height: usize, rgb: &[u8]) -> Result<()> {
    if rgb.len() != width * height * 3 {
        let message = format!("{} bytes for {width}x{height} RGB", rgb.len());
        return Err(encode_error(path, message).into());
    }
    write_atomic(path, |tmp| {
        image::save_buffer_with_format(
            tmp,
            rgb,
            width as u32,
            height as u32,
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .map_err(|e| e.to_string())
    })
}

/// Writes a value as pretty JSON.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| encode_error(path, e.to_string()))?;
    write_atomic(path, |tmp| {
        std::fs::write(tmp, text.as_bytes()).map_err(|e| e.to_string())
    })
}

/// Reads an 8-bit greyscale PNG (other colour types are converted to luma).
pub fn read_gray_png(path: &Path) -> Result<Array2<u8>> {
    let img = image::open(path)
        .map_err(|e| encode_error(path, e.to_string()))?
        .to_luma8();
    let (w, h) = img.dimensions();
    Array2::from_shape_vec((h as usize, w as usize), img.into_raw())
        .map_err(|e| encode_error(path, e.to_string()).into())
}
