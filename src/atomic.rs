//! Write-then-rename: every output file is written under a temporary name beside its target and
//! renamed into place, so that an interrupted run never leaves a half-written file under the
//! final name.

use std::path::{Path, PathBuf};

/// A temporary name beside `path`: hidden, and unique to this process.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// How writing a file atomically failed.
#[derive(Debug)]
pub enum AtomicWriteError<E> {
    /// The writer failed on the temporary file.
    Write(E),
    /// The rename into place failed.
    Rename(std::io::Error),
}

/// Runs `write` on a temporary path beside `path`, then renames it into place; on any failure
/// the temporary file is removed.
pub fn write_atomic<E>(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), AtomicWriteError<E>> {
    let tmp = temp_path(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(AtomicWriteError::Write(e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        AtomicWriteError::Rename(e)
    })
}
