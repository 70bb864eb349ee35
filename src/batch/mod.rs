//! The batch runner: every command that works file by file (the CLI's `process`, `despeckle`
//! and `segment`, and any front end built on the library) goes through it.
//!
//! It collects the inputs (files as given; the DICOM files of folders, recursively if asked),
//! gives each input an output folder of its own (two `x.dcm` from different folders become
//! `x/` and `x_2/`), runs a [`FileTask`] on each with `jobs` files at once, skips inputs whose
//! outputs are complete when asked, reports progress through a callback, and writes
//! `summary.json`: every input with its status and error, the configuration the batch ran with,
//! and the backend that actually ran each stage. A file that fails is reported and the others go
//! on. The runner never prints.

mod process;
#[cfg(feature = "dicomweb")]
pub mod remote;
mod tasks;

pub use process::{PlanSummary, ProcessTask};
pub use tasks::{DespeckleTask, SegmentTask};

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::json;

use crate::gpu::{Compute, Ran};
use crate::pipeline::StageTimings;

/// Errors that stop a whole batch (a failing input never does: it is reported in the summary).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The output folder cannot be created.
    #[error("cannot create output folder {path}: {source}")]
    OutputFolder {
        /// The folder.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// `summary.json` cannot be written.
    #[error("cannot write the batch summary: {0}")]
    Summary(String),
}

/// How a batch runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BatchOptions {
    /// Look into sub-folders of folder inputs.
    pub recursive: bool,
    /// Files processed at once (at least 1).
    pub jobs: usize,
    /// Frames to process, `[start, end)`, zero-based; all when `None`.
    pub frames: Option<(usize, usize)>,
    /// Skip inputs whose outputs are complete (see [`FileTask::done_marker`]).
    pub skip_existing: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            recursive: false,
            jobs: 1,
            frames: None,
            skip_existing: false,
        }
    }
}

/// What became of one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    /// Processed.
    Ok,
    /// Its outputs were already complete (`skip_existing`).
    Skipped,
    /// It failed; `error` says why.
    Failed,
}

/// Frames per backend, per stage: what actually ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackendCounts {
    /// Stage name → backend name → frames.
    #[serde(flatten)]
    pub stages: BTreeMap<&'static str, BTreeMap<&'static str, usize>>,
}

impl BackendCounts {
    /// Counts one frame of `stage` run on `ran`.
    pub fn add(&mut self, stage: &'static str, ran: Ran) {
        *self
            .stages
            .entry(stage)
            .or_default()
            .entry(ran.as_str())
            .or_default() += 1;
    }

    fn merge(&mut self, other: &BackendCounts) {
        for (stage, by) in &other.stages {
            for (backend, n) in by {
                *self
                    .stages
                    .entry(stage)
                    .or_default()
                    .entry(backend)
                    .or_default() += n;
            }
        }
    }

    /// `"gpu"` or `"cpu"` when every counted frame of every stage ran there, `"mixed"` when
    /// both ran, `None` when nothing was counted.
    pub fn overall(&self) -> Option<&'static str> {
        let used: HashSet<&'static str> = self
            .stages
            .values()
            .flat_map(|by| by.iter().filter(|(_, n)| **n > 0).map(|(b, _)| *b))
            .collect();
        match used.len() {
            0 => None,
            1 => used.into_iter().next(),
            _ => Some("mixed"),
        }
    }
}

/// What a task reports for one input it processed.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct FileReport {
    /// Frames processed.
    pub frames: usize,
    /// Plan summary (the `process` task).
    pub plan: Option<PlanSummary>,
    /// Median milliseconds per frame for each stage (the `process` task).
    pub timings: Option<StageTimings>,
    /// Frames per backend, per stage.
    pub backends: BackendCounts,
    /// A line for people (e.g. "bone found in 3"), not written to the summary.
    pub detail: Option<String>,
    /// The DICOM SEG written (`process`): its file name and segment labels in order.
    pub seg: Option<SegSummary>,
}

/// The DICOM SEG written for one input.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct SegSummary {
    /// The file, inside the input's output folder; `None` when no frame held any label (a
    /// SEG needs at least one segment).
    pub file: Option<String>,
    /// The segments' labels, segment 1 first.
    pub segments: Vec<crate::Label>,
}

/// One input's entry in `summary.json`.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct FileSummary {
    /// The input.
    pub path: PathBuf,
    /// What became of it.
    pub status: FileStatus,
    /// Its output folder.
    pub output: Option<PathBuf>,
    /// Frames processed.
    pub frames: usize,
    /// Plan summary (`process` only).
    pub plan: Option<PlanSummary>,
    /// Median milliseconds per frame for each stage (`process` only).
    pub timings: Option<StageTimings>,
    /// The DICOM SEG written (`process`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seg: Option<SegSummary>,
    /// Why it failed.
    pub error: Option<String>,
    /// A line for people, not written to the summary.
    #[serde(skip)]
    pub detail: Option<String>,
    #[serde(skip)]
    backends: BackendCounts,
}

impl FileSummary {
    /// Frames per backend, per stage (not in `summary.json`'s file entries, but summed into
    /// its top-level `backends`).
    pub fn backends(&self) -> &BackendCounts {
        &self.backends
    }

    fn failed(p: &Path, error: String) -> FileSummary {
        FileSummary {
            path: p.to_path_buf(),
            status: FileStatus::Failed,
            output: None,
            frames: 0,
            plan: None,
            timings: None,
            seg: None,
            error: Some(error),
            detail: None,
            backends: BackendCounts::default(),
        }
    }
}

/// The per-file work of a command.
pub trait FileTask: Sync {
    /// The file, inside an input's output folder, whose presence means that input is complete
    /// (written last, atomically); `None` when the task has none (its inputs are never skipped).
    fn done_marker(&self, stem: &str) -> Option<String>;
    /// Processes `input` into `dir` (which exists); `stem` names the outputs; `frames` limits
    /// the frames. Errors name the input.
    fn run(
        &self,
        input: &Path,
        dir: &Path,
        stem: &str,
        frames: Option<(usize, usize)>,
    ) -> Result<FileReport, String>;
    /// The configuration recorded in `summary.json`.
    fn config(&self) -> serde_json::Value;
    /// Where the task's kernels run (named in `summary.json`).
    fn compute(&self) -> &Compute;
}

/// Progress of a batch.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// The inputs are collected; `total` will be run.
    Started {
        /// Inputs to run.
        total: usize,
    },
    /// One input is finished (in completion order).
    Finished {
        /// Inputs finished so far, this one included.
        done: usize,
        /// Inputs to run.
        total: usize,
        /// Its entry.
        summary: &'a FileSummary,
    },
}

/// The outcome of a batch.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BatchReport {
    /// Every input, in input order (inputs that could not be read as folders first).
    pub files: Vec<FileSummary>,
    /// Where the summary was written.
    pub summary_path: PathBuf,
    /// `"gpu"`, `"cpu"` or `"mixed"`: what actually ran.
    pub backend: String,
}

impl BatchReport {
    /// Inputs with this status.
    pub fn count(&self, status: FileStatus) -> usize {
        self.files.iter().filter(|f| f.status == status).count()
    }
    /// The failed inputs.
    pub fn failures(&self) -> impl Iterator<Item = &FileSummary> {
        self.files.iter().filter(|f| f.status == FileStatus::Failed)
    }
}

/// Collects the DICOM candidates: files as given; folders' regular files (recursively if
/// asked), leaving out hidden files and anything inside the output folder.
fn collect(
    inputs: &[PathBuf],
    out: &Path,
    recursive: bool,
    missing: &mut Vec<FileSummary>,
) -> Vec<PathBuf> {
    let out_abs = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
    let mut files = Vec::new();
    let mut stack: Vec<(PathBuf, bool)> = inputs.iter().map(|p| (p.clone(), true)).collect();
    stack.reverse();
    while let Some((p, top)) = stack.pop() {
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if p.is_dir() {
            if !top && (!recursive || hidden) {
                continue;
            }
            if std::fs::canonicalize(&p).is_ok_and(|c| c.starts_with(&out_abs)) {
                continue;
            }
            let mut entries: Vec<PathBuf> = match std::fs::read_dir(&p) {
                Ok(r) => r.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                Err(e) => {
                    missing.push(FileSummary::failed(
                        &p,
                        format!("{}: cannot read folder: {e}", p.display()),
                    ));
                    continue;
                }
            };
            entries.sort();
            for e in entries.into_iter().rev() {
                stack.push((e, false));
            }
        } else if p.is_file() {
            // Files named by the caller are always tried; inside folders only what looks like
            // DICOM (a .dcm/.dicom name, or the DICM magic at byte 128).
            if !top && (hidden || !looks_like_dicom(&p)) {
                continue;
            }
            files.push(p);
        } else {
            missing.push(FileSummary::failed(
                &p,
                format!("{}: no such file or folder", p.display()),
            ));
        }
    }
    files
}

fn looks_like_dicom(p: &Path) -> bool {
    let ext = p
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if matches!(ext.as_deref(), Some("dcm") | Some("dicom")) {
        return true;
    }
    let mut head = [0u8; 132];
    std::fs::File::open(p)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && &head[128..132] == b"DICM"
}

/// Opens `input` and resolves `frames` against its frame count: the file, and the first and
/// one-past-last frame to process. Errors name the input.
fn open_frames(
    input: &Path,
    frames: Option<(usize, usize)>,
) -> Result<(crate::dicom::DicomFile, usize, usize), String> {
    let file = crate::dicom::DicomFile::open(input, &crate::dicom::ReadOptions::default())
        .map_err(|e| e.to_string())?;
    let n = file.frame_count();
    let (start, end) = frames.unwrap_or((0, n));
    let end = end.min(n);
    if start >= end {
        return Err(format!(
            "{}: frames {start}..{end} are outside its {n} frame(s)",
            input.display()
        ));
    }
    Ok((file, start, end))
}

/// The backend asked for, as the summary spells it.
fn backend_name(b: crate::Backend) -> &'static str {
    match b {
        crate::Backend::Auto => "auto",
        crate::Backend::Gpu => "gpu",
        crate::Backend::Cpu => "cpu",
    }
}

/// Removes the temporary files an interrupted run (killed, power cut) left in `dir`: every
/// output is written as `.<name>.<pid>.tmp` and renamed, so such files are never complete
/// outputs.
fn remove_stale_temporaries(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_temporary(&name) && name.starts_with(prefix) && e.path().is_file() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether `name` has the form of [`crate::atomic`]'s temporaries: `.<name>.<pid>.tmp`.
fn is_temporary(name: &str) -> bool {
    let Some(stem) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
        return false;
    };
    stem.rsplit_once('.')
        .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// One output folder name per input: the file stem, with `_2`, `_3` … added when two inputs
/// share a stem.
pub fn unique_stems(files: &[PathBuf]) -> Vec<String> {
    let mut used = HashSet::new();
    files
        .iter()
        .map(|f| {
            let base = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "input".into());
            let mut stem = base.clone();
            let mut k = 2;
            while !used.insert(stem.clone()) {
                stem = format!("{base}_{k}");
                k += 1;
            }
            stem
        })
        .collect()
}

/// Runs `task` on one input into `out/<stem>` exactly as [`run`] does for each of its inputs
/// (skip when complete and `opts.skip_existing`, a panic caught as that input's failure), but
/// writes no summary.
pub fn run_file(
    task: &dyn FileTask,
    path: &Path,
    out: &Path,
    stem: &str,
    opts: &BatchOptions,
) -> FileSummary {
    let dir = out.join(stem);
    let complete = task
        .done_marker(stem)
        .is_some_and(|m| dir.join(m).is_file());
    if opts.skip_existing && complete {
        return FileSummary {
            status: FileStatus::Skipped,
            output: Some(dir),
            error: None,
            ..FileSummary::failed(path, String::new())
        };
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return FileSummary::failed(
            path,
            format!("{}: cannot create {}: {e}", path.display(), dir.display()),
        );
    }
    remove_stale_temporaries(&dir, ".");
    // Second line of defence: a panic in one file (a bug) is that file's internal error, and
    // the batch goes on.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        task.run(path, &dir, stem, opts.frames)
    }))
    .unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(format!(
            "{}: internal error (a bug in sonoguide; please report it with this file): {what}",
            path.display()
        ))
    });
    match outcome {
        Ok(r) => FileSummary {
            path: path.to_path_buf(),
            status: FileStatus::Ok,
            output: Some(dir),
            frames: r.frames,
            plan: r.plan,
            timings: r.timings,
            seg: r.seg,
            error: None,
            detail: r.detail,
            backends: r.backends,
        },
        Err(e) => FileSummary::failed(path, e),
    }
}

/// The work list of a batch, for runners that spread it themselves (a cluster): the input
/// files, their output stems (unique), and the inputs that could not be listed (as failures).
pub fn plan_inputs(
    inputs: &[PathBuf],
    out: &Path,
    recursive: bool,
) -> (Vec<PathBuf>, Vec<String>, Vec<FileSummary>) {
    let mut missing = Vec::new();
    let files = collect(inputs, out, recursive, &mut missing);
    let stems = unique_stems(&files);
    (files, stems, missing)
}

/// Writes `out/summary.json` for `summaries` as [`run`] does.
pub fn write_summary(
    out: &Path,
    task: &dyn FileTask,
    summaries: &[FileSummary],
) -> crate::Result<(PathBuf, String)> {
    let mut backends = BackendCounts::default();
    for s in summaries {
        backends.merge(&s.backends);
    }
    let backend = backends
        .overall()
        .unwrap_or(task.compute().backend_name())
        .to_string();
    let failed = summaries
        .iter()
        .filter(|s| s.status == FileStatus::Failed)
        .count();
    let doc = json!({
        "sonoguide_version": env!("CARGO_PKG_VERSION"),
        "backend": backend,
        "backends": backends,
        "device": task.compute().device_name(),
        "config": task.config(),
        "files": summaries,
        "failed": failed,
        "note": "research tool, not a medical device: every suggested path must be checked by a trained person",
    });
    let summary_path = out.join("summary.json");
    crate::imageio::write_json(&summary_path, &doc)
        .map_err(|e| BatchError::Summary(e.to_string()))?;
    Ok((summary_path, backend))
}

/// Runs `task` over `inputs`, writing into `out` and `out/summary.json`; `on_event` hears of
/// progress.
pub fn run(
    inputs: &[PathBuf],
    out: &Path,
    task: &dyn FileTask,
    opts: &BatchOptions,
    on_event: &(dyn Fn(Event<'_>) + Sync),
) -> crate::Result<BatchReport> {
    std::fs::create_dir_all(out).map_err(|source| BatchError::OutputFolder {
        path: out.to_path_buf(),
        source,
    })?;
    // In the output folder itself only the summary's (the folder may hold other files).
    remove_stale_temporaries(out, ".summary.json.");
    let mut summaries: Vec<FileSummary> = Vec::new();
    let files = collect(inputs, out, opts.recursive, &mut summaries);
    let stems = unique_stems(&files);
    let total = files.len();
    on_event(Event::Started { total });
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, FileSummary)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.max(1).min(total.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let (Some(path), Some(stem)) = (files.get(i), stems.get(i)) else {
                    break;
                };
                let summary = run_file(task, path, out, stem, opts);
                let k = done.fetch_add(1, Ordering::Relaxed) + 1;
                on_event(Event::Finished {
                    done: k,
                    total,
                    summary: &summary,
                });
                if let Ok(mut r) = results.lock() {
                    r.push((i, summary));
                }
            });
        }
    });
    let mut finished = results.into_inner().unwrap_or_default();
    finished.sort_by_key(|(i, _)| *i);
    summaries.extend(finished.into_iter().map(|(_, s)| s));
    let (summary_path, backend) = write_summary(out, task, &summaries)?;
    Ok(BatchReport {
        files: summaries,
        summary_path,
        backend,
    })
}
