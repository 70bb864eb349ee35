//! PNG and JSON outputs, written atomically (temporary file beside the target, then rename),
//! so that an interrupted run never leaves a half-written file.

use std::path::Path;

use ndarray::Array2;

use crate::{Error, Result};

fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), String>,
) -> Result<()> {
    let tmp = crate::dicom::write::temp_path(path);
    if let Err(message) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Image {
            path: path.to_path_buf(),
            message,
        });
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::Write {
            path: path.to_path_buf(),
            source,
        }
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
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: format!("{} bytes for {width}x{height} RGB", rgb.len()),
        });
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
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomic(path, |tmp| {
        std::fs::write(tmp, text.as_bytes()).map_err(|e| e.to_string())
    })
}

/// Reads an 8-bit greyscale PNG (other colour types are converted to luma).
pub fn read_gray_png(path: &Path) -> Result<Array2<u8>> {
    let img = image::open(path)
        .map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .to_luma8();
    let (w, h) = img.dimensions();
    Array2::from_shape_vec((h as usize, w as usize), img.into_raw()).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
