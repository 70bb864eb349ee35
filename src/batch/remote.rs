//! DICOMweb around the batch runner: instances retrieved into a cache folder (and processed
//! as files), outputs stored back into their study, and the record `watch` keeps of what it
//! has done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::dicomweb::{DicomWebClient, DicomWebError, InstanceRef};

/// Retrieves `instance` into `cache` (kept for a resumed run); its path.
pub fn retrieve(
    client: &DicomWebClient,
    cache: &Path,
    instance: &InstanceRef,
) -> Result<PathBuf, DicomWebError> {
    // UIDs hold digits and dots only when valid; anything else is replaced so that a hostile
    // server cannot choose a path.
    let name: String = instance
        .instance
        .chars()
        .map(|c| {
            if c.is_ascii_digit() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let path = cache.join(format!("{name}.dcm"));
    if !path.is_file() {
        let bytes = client.retrieve_instance(instance)?;
        let tmp = cache.join(format!(".{name}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, &bytes)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| DicomWebError::BadAnswer {
                server: client.base().to_string(),
                what: format!("saving {}", path.display()),
                reason: e.to_string(),
            })?;
    }
    Ok(path)
}

/// Sends the overlay DICOM and SEG written for `stem` in `dir` into `study`.
pub fn store(
    client: &DicomWebClient,
    dir: &Path,
    stem: &str,
    study: &str,
) -> Result<usize, String> {
    let mut files = Vec::new();
    for name in [format!("{stem}.overlay.dcm"), format!("{stem}.seg.dcm")] {
        let p = dir.join(name);
        if p.is_file() {
            files.push(std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?);
        }
    }
    client.store(study, &files).map_err(|e| e.to_string())
}

/// One instance's record in the watch state.
#[derive(Debug, serde::Serialize, serde::Deserialize, Clone, Default)]
#[non_exhaustive]
pub struct Record {
    /// "done" or "failed" (empty: never tried).
    pub status: String,
    /// Attempts so far.
    pub attempts: u32,
    /// The last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the outputs were stored back.
    #[serde(default)]
    pub stored: bool,
}

/// What `watch` has done, by SOP Instance UID.
#[derive(Debug, serde::Serialize, serde::Deserialize, Default)]
#[non_exhaustive]
pub struct WatchState {
    /// Records by SOP Instance UID.
    pub instances: BTreeMap<String, Record>,
}

impl WatchState {
    /// The state saved at `path`; empty when there is none yet.
    pub fn load(path: &Path) -> Result<WatchState, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: not a watch state file: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(WatchState::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Saves the state at `path` (atomically).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        crate::imageio::write_json(path, self).map_err(|e| e.to_string())
    }
}

/// Retrieves, processes (through [`super::run`], into `out`) and, when `store`, stores back
/// one instance; the record updated with the attempt's outcome.
pub fn process_one(
    client: &DicomWebClient,
    cache: &Path,
    out: &Path,
    task: &dyn super::FileTask,
    instance: &InstanceRef,
    store_back: bool,
    mut record: Record,
) -> Record {
    record.attempts += 1;
    let result = (|| -> Result<bool, String> {
        let path = retrieve(client, cache, instance).map_err(|e| e.to_string())?;
        let report = super::run(
            std::slice::from_ref(&path),
            out,
            task,
            &super::BatchOptions::default(),
            &|_| {},
        )
        .map_err(|e| e.to_string())?;
        let f = report.files.first().ok_or("nothing was processed")?;
        if let Some(e) = &f.error {
            return Err(e.clone());
        }
        let dir = f.output.clone().ok_or("no output folder")?;
        if !store_back {
            return Ok(false);
        }
        let stem = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        store(client, &dir, &stem, &instance.study)?;
        Ok(true)
    })();
    match result {
        Ok(stored) => {
            record.status = "done".into();
            record.error = None;
            record.stored = stored;
        }
        Err(e) => {
            record.status = "failed".into();
            record.error = Some(e);
        }
    }
    record
}
