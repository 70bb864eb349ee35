//! Commands that run file by file through the library's batch runner: `process` (the main
//! job), `despeckle` and `segment`. Progress shows as a bar on a terminal and as plain lines
//! otherwise; failures are listed at the end.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::ValueEnum;
use sonoguide::batch::{self, BatchOptions, Event, FileStatus, FileTask};
use sonoguide::Filter;

use crate::args::{
    open_despeckler, parse_frames, BackendOpt, FilterArgs, SegmenterOpt, FILTER_CHOICES,
};
use crate::exit::{Failure, Outcome};

/// `despeckle`'s arguments.
#[derive(clap::Args)]
pub struct DespeckleArgs {
    /// DICOM files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    filter: FilterArgs,
    #[command(flatten)]
    backend: BackendOpt,
}

/// `segment`'s arguments.
#[derive(clap::Args)]
pub struct SegmentArgs {
    /// DICOM files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Despeckling filter applied first (defaults as in `despeckle`).
    #[arg(long, default_value = "srad", value_parser = FILTER_CHOICES)]
    despeckle: String,
    #[command(flatten)]
    backend: BackendOpt,
    #[command(flatten)]
    segmenter: SegmenterOpt,
}

/// What the overlay is drawn on.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OverlayOn {
    /// The despeckled frame.
    Despeckled,
    /// The frame as read.
    Original,
}

/// How `process` and `watch` build their pipeline and outputs.
#[derive(clap::Args)]
pub struct PipelineArgs {
    #[command(flatten)]
    backend: BackendOpt,
    /// Draw the overlay on the despeckled or the original frame.
    #[arg(long, value_enum, default_value_t = OverlayOn::Despeckled)]
    overlay_on: OverlayOn,
    /// Write a DICOM SEG (`<stem>.seg.dcm`) per input: on by default.
    #[arg(long, overrides_with = "no_seg")]
    seg: bool,
    /// Write no DICOM SEG.
    #[arg(long)]
    no_seg: bool,
    #[command(flatten)]
    plan: crate::plan_args::PlanArgs,
    #[command(flatten)]
    filter: FilterArgs,
    #[command(flatten)]
    segmenter: SegmenterOpt,
}

impl PipelineArgs {
    /// The `process` task these arguments ask for.
    pub fn task(&self) -> Result<batch::ProcessTask, Failure> {
        let filter = self.filter.filter()?;
        let mut config = sonoguide::PipelineConfig::default();
        config.backend = self.backend.get();
        config.filters = vec![filter];
        config.segment = self.segmenter.params();
        self.plan.apply(&mut config)?;
        let pipeline = sonoguide::Pipeline::new(config)?;
        if let Some(note) = pipeline.despeckler().note() {
            eprintln!("note: {note}");
        }
        Ok(
            batch::ProcessTask::new(pipeline, self.overlay_on == OverlayOn::Original)
                .with_seg(self.seg || !self.no_seg),
        )
    }
}

/// `process`' arguments.
#[derive(clap::Args)]
pub struct ProcessArgs {
    /// DICOM files or folders, or one DICOMweb server: dicomweb+http://HOST/ROOT (with
    /// --study, --since, --modality; --store sends the overlay and SEG back).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Look into sub-folders of folder inputs.
    #[arg(long)]
    recursive: bool,
    /// Files processed at once.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Frames to process: N, A..B (B excluded) or A-B (B included); zero-based.
    #[arg(long, value_parser = parse_frames)]
    frames: Option<(usize, usize)>,
    /// Skip inputs whose overlay DICOM already exists in OUT (resume a batch).
    #[arg(long)]
    skip_existing: bool,
    #[command(flatten)]
    pipeline: PipelineArgs,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
}

/// `sonoguide despeckle`.
pub fn despeckle(args: DespeckleArgs) -> Outcome {
    let filter = args.filter.filter()?;
    let task = batch::DespeckleTask::new(open_despeckler(args.backend.get())?, filter);
    run(&args.files, &args.out, &task, &BatchOptions::default())
}

/// `sonoguide segment`.
pub fn segment(args: SegmentArgs) -> Outcome {
    let filter = Filter::default_for(&args.despeckle)?;
    let d = open_despeckler(args.backend.get())?;
    let task = batch::SegmentTask::new(d, filter, args.segmenter.params());
    run(&args.files, &args.out, &task, &BatchOptions::default())
}

/// `sonoguide process`.
pub fn process(args: ProcessArgs) -> Outcome {
    let url = crate::remote::url_input(&args.inputs)?;
    let task = args.pipeline.task()?;
    let mut opts = BatchOptions::default();
    opts.recursive = args.recursive;
    opts.jobs = args.jobs.max(1);
    opts.frames = args.frames;
    opts.skip_existing = args.skip_existing;
    match url {
        Some(url) => crate::remote::process(&url, &args.remote, &args.out, |inputs| {
            run_batch(inputs, &args.out, &task, &opts)
        }),
        None => run(&args.inputs, &args.out, &task, &opts),
    }
}

/// Runs the batch and ends with exit 1 if any input failed.
fn run(inputs: &[PathBuf], out: &Path, task: &dyn FileTask, opts: &BatchOptions) -> Outcome {
    let report = run_batch(inputs, out, task, opts)?;
    if report.failures().next().is_some() {
        return Err(Failure::Reported);
    }
    Ok(())
}

/// Runs the batch with progress on stderr and reports its end (every failure listed).
pub fn run_batch(
    inputs: &[PathBuf],
    out: &Path,
    task: &dyn FileTask,
    opts: &BatchOptions,
) -> Result<batch::BatchReport, Failure> {
    let bar: std::sync::OnceLock<indicatif::ProgressBar> = std::sync::OnceLock::new();
    let terminal = std::io::stderr().is_terminal();
    let on_event = |event: Event<'_>| match event {
        Event::Started { total } if terminal => {
            let b = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            {
                b.set_style(style);
            }
            let _ = bar.set(b);
        }
        Event::Finished {
            done,
            total,
            summary,
        } => {
            let line = match (&summary.error, &summary.detail) {
                (Some(e), _) => format!("[{done}/{total}] failed: {e}"),
                (None, Some(detail)) => {
                    format!("[{done}/{total}] {}: {detail}", summary.path.display())
                }
                (None, None) => format!(
                    "[{done}/{total}] {}: {} ({} frame(s))",
                    summary.path.display(),
                    status_name(summary.status),
                    summary.frames
                ),
            };
            match bar.get() {
                Some(b) => {
                    b.inc(1);
                    b.set_message(
                        summary
                            .path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    );
                    if summary.error.is_some() {
                        b.println(line);
                    }
                }
                None => eprintln!("{line}"),
            }
        }
        _ => {}
    };
    let report = batch::run(inputs, out, task, opts, &on_event);
    if let Some(b) = bar.get() {
        b.finish_and_clear();
    }
    let report = report?;
    let failures: Vec<_> = report.failures().collect();
    eprintln!(
        "{} processed, {} skipped, {} failed; summary in {}",
        report.count(FileStatus::Ok),
        report.count(FileStatus::Skipped),
        failures.len(),
        report.summary_path.display()
    );
    if !failures.is_empty() {
        eprintln!("failures:");
        for f in &failures {
            eprintln!("  {}", f.error.as_deref().unwrap_or("unknown error"));
        }
    }
    Ok(report)
}

fn status_name(status: FileStatus) -> &'static str {
    match status {
        FileStatus::Ok => "ok",
        FileStatus::Skipped => "skipped",
        FileStatus::Failed => "failed",
    }
}
