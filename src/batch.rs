//! `sonoguide process`: the batch over files and folders, with jobs, resume, progress and a
//! summary. Each file is processed on its own; a bad file is reported and the batch goes on.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::json;

use sonoguide::dicom::write::{derived_identity, write_us_image, Colour, UsImage};
use sonoguide::dicom::{DicomFile, ReadOptions};
use sonoguide::pipeline::StageTimings;
use sonoguide::{Pipeline, PipelineConfig, Session};

use crate::{EXIT_INPUT_FAILED, EXIT_USAGE};

/// Batch options.
pub struct Options {
    pub recursive: bool,
    pub jobs: usize,
    pub frames: Option<(usize, usize)>,
    pub skip_existing: bool,
    pub overlay_on_original: bool,
}

#[derive(Debug, Clone, Serialize)]
struct PlanSummary {
    frames_with_path: usize,
    first: Option<sonoguide::NeedlePlan>,
    median_angle_deg: Option<f64>,
    median_depth_mm: Option<f64>,
    median_length_mm: Option<f64>,
    target_jitter_mm: Option<f64>,
    entry_jitter_mm: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct FileSummary {
    path: PathBuf,
    status: &'static str,
    output: Option<PathBuf>,
    frames: usize,
    plan: Option<PlanSummary>,
    /// Median milliseconds per frame for each stage.
    timings: Option<StageTimings>,
    error: Option<String>,
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
                    missing.push(failed(
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
            // Files named on the command line are always tried; inside folders only what looks
            // like DICOM (a .dcm/.dicom name, or the DICM magic at byte 128).
            if !top && (hidden || !looks_like_dicom(&p)) {
                continue;
            }
            files.push(p);
        } else {
            missing.push(failed(
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

fn failed(p: &Path, error: String) -> FileSummary {
    FileSummary {
        path: p.to_path_buf(),
        status: "failed",
        output: None,
        frames: 0,
        plan: None,
        timings: None,
        error: Some(error),
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn mean_step(points: &[Option<[f64; 2]>]) -> Option<f64> {
    let steps: Vec<f64> = points
        .windows(2)
        .filter_map(|w| match (w[0], w[1]) {
            (Some(a), Some(b)) => Some(((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()),
            _ => None,
        })
        .collect();
    (!steps.is_empty()).then(|| steps.iter().sum::<f64>() / steps.len() as f64)
}

fn process_file(
    path: &Path,
    dir: &Path,
    stem: &str,
    pipeline: &Pipeline,
    opts: &Options,
) -> Result<FileSummary, String> {
    let dicom_out = dir.join(format!("{stem}.overlay.dcm"));
    if opts.skip_existing && dicom_out.is_file() {
        return Ok(FileSummary {
            path: path.to_path_buf(),
            status: "skipped",
            output: Some(dir.to_path_buf()),
            frames: 0,
            plan: None,
            timings: None,
            error: None,
        });
    }
    let file = DicomFile::open(path, &ReadOptions::default()).map_err(|e| e.to_string())?;
    let n = file.frame_count();
    let (start, end) = opts.frames.unwrap_or((0, n));
    let end = end.min(n);
    if start >= end {
        return Err(format!(
            "{}: frames {start}..{end} are outside its {n} frame(s)",
            path.display()
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("{}: cannot create {}: {e}", path.display(), dir.display()))?;
    // Never overwrite an input.
    let input_abs = std::fs::canonicalize(path).ok();
    if input_abs.is_some()
        && std::fs::canonicalize(dir)
            .ok()
            .map(|d| d.join(format!("{stem}.overlay.dcm")))
            == input_abs
    {
        return Err(format!(
            "{}: the output would overwrite the input",
            path.display()
        ));
    }
    let mut session = Session::new();
    let mut overlays: Vec<Vec<u8>> = Vec::new();
    let (mut t_despeckle, mut t_features, mut t_segment, mut t_plan, mut t_total) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut angles, mut depths, mut lengths) = (vec![], vec![], vec![]);
    let (mut targets, mut entries) = (vec![], vec![]);
    let mut first = None;
    let mut with_path = 0;
    let (w, h) = (file.info().columns as usize, file.info().rows as usize);
    let mut mm = (
        sonoguide::segment::ASSUMED_MM_PER_PX,
        sonoguide::segment::ASSUMED_MM_PER_PX,
    );
    let mut region = sonoguide::Rect::full(w, h);
    let mut reference = (0i64, 0i64);
    let wrap = |e: sonoguide::Error| e.to_string();
    for k in start..end {
        let frame = file.read_frame(k).map_err(|e| e.to_string())?;
        if k == start {
            region = frame.region.bounds;
            if let sonoguide::Calibration::Ok {
                mm_per_px_x,
                mm_per_px_y,
                reference_px,
                ..
            } = &frame.calibration
            {
                mm = (*mm_per_px_x, *mm_per_px_y);
                reference = reference_px
                    .map(|r| (r.0.round() as i64, r.1.round() as i64))
                    .unwrap_or((region.x0 as i64, region.y0 as i64));
            } else {
                reference = (region.x0 as i64, region.y0 as i64);
            }
        }
        let r = pipeline.process_in(&mut session, &frame).map_err(wrap)?;
        let name = format!("frame_{k:04}");
        let base = if opts.overlay_on_original {
            &frame.intensity
        } else {
            &r.despeckled
        };
        let overlay = sonoguide::overlay::draw_plan(
            base,
            &r.segmentation.labels,
            &r.plan,
            r.segmentation.mm_per_px,
        )
        .map_err(wrap)?;
        sonoguide::imageio::write_rgb_png(
            &dir.join(format!("{name}.overlay.png")),
            w,
            h,
            overlay.as_raw(),
        )
        .map_err(wrap)?;
        sonoguide::imageio::write_gray_png(
            &dir.join(format!("{name}.labels.png")),
            &r.segmentation.labels,
        )
        .map_err(wrap)?;
        sonoguide::imageio::write_json(
            &dir.join(format!("{name}.bone.json")),
            &r.segmentation.bone_json(),
        )
        .map_err(wrap)?;
        sonoguide::imageio::write_json(&dir.join(format!("{name}.plan.json")), &r.plan)
            .map_err(wrap)?;
        overlays.push(overlay.into_raw());
        let t = r.timings;
        t_despeckle.push(t.despeckle_ms);
        t_features.push(t.features_ms);
        t_segment.push(t.segment_ms);
        t_plan.push(t.plan_ms);
        t_total.push(t.total_ms);
        if first.is_none() {
            first = Some(r.plan.clone());
        }
        targets.push(r.plan.target.map(|p| p.mm));
        entries.push(r.plan.entry.map(|p| p.mm));
        if r.plan.is_ok() {
            with_path += 1;
            angles.extend(r.plan.angle_deg);
            depths.extend(r.plan.depth_mm);
            lengths.extend(r.plan.length_mm);
        }
    }
    let (identity, derived) = derived_identity(file.object(), "sonoguide overlay (research tool)");
    let source_desc = derived.map(|(c, i, _)| {
        (
            c,
            i,
            "Despeckled, segmented, needle path suggested and burned in by sonoguide".to_string(),
        )
    });
    let mut image = UsImage::new(w, h, Colour::Rgb, overlays, mm, region, reference, identity);
    image.derived_from = source_desc;
    write_us_image(&dicom_out, &image).map_err(|e| e.to_string())?;
    let m = |v: &mut Vec<f64>| median(v).unwrap_or(0.0);
    Ok(FileSummary {
        path: path.to_path_buf(),
        status: "ok",
        output: Some(dir.to_path_buf()),
        frames: end - start,
        plan: Some(PlanSummary {
            frames_with_path: with_path,
            first,
            median_angle_deg: median(&mut angles),
            median_depth_mm: median(&mut depths),
            median_length_mm: median(&mut lengths),
            target_jitter_mm: mean_step(&targets),
            entry_jitter_mm: mean_step(&entries),
        }),
        timings: Some(StageTimings {
            despeckle_ms: m(&mut t_despeckle),
            features_ms: m(&mut t_features),
            segment_ms: m(&mut t_segment),
            plan_ms: m(&mut t_plan),
            total_ms: m(&mut t_total),
        }),
        error: None,
    })
}

/// Runs the batch; returns the exit code.
pub fn run(inputs: &[PathBuf], out: &Path, config: PipelineConfig, opts: &Options) -> ExitCode {
    if let Err(e) = std::fs::create_dir_all(out) {
        eprintln!("error: cannot create output folder {}: {e}", out.display());
        return ExitCode::from(EXIT_USAGE);
    }
    let mut summaries: Vec<FileSummary> = Vec::new();
    let files = collect(inputs, out, opts.recursive, &mut summaries);
    let pipeline = match Pipeline::new(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INPUT_FAILED);
        }
    };
    if let Some(note) = pipeline.despeckler().note() {
        eprintln!("note: {note}");
    }
    // Unique output folder per input (two inputs may share a stem).
    let mut used = HashSet::new();
    let jobs: Vec<(PathBuf, String)> = files
        .into_iter()
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
            (f, stem)
        })
        .collect();
    let total = jobs.len();
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}") {
            b.set_style(style);
        }
        b
    });
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, FileSummary)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..opts.jobs.min(total.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((path, stem)) = jobs.get(i) else {
                    break;
                };
                let summary = match process_file(path, &out.join(stem), stem, &pipeline, opts) {
                    Ok(s) => s,
                    Err(e) => failed(path, e),
                };
                let k = done.fetch_add(1, Ordering::Relaxed) + 1;
                let line = match &summary.error {
                    Some(e) => format!("[{k}/{total}] failed: {e}"),
                    None => format!(
                        "[{k}/{total}] {}: {} ({} frame(s))",
                        path.display(),
                        summary.status,
                        summary.frames
                    ),
                };
                match &bar {
                    Some(b) => {
                        b.inc(1);
                        b.set_message(
                            path.file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default(),
                        );
                        if summary.error.is_some() {
                            b.println(line);
                        }
                    }
                    None => eprintln!("{line}"),
                }
                if let Ok(mut r) = results.lock() {
                    r.push((i, summary));
                }
            });
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut done_list = results.into_inner().unwrap_or_default();
    done_list.sort_by_key(|(i, _)| *i);
    summaries.extend(done_list.into_iter().map(|(_, s)| s));
    let failures: Vec<&FileSummary> = summaries.iter().filter(|s| s.status == "failed").collect();
    let doc = json!({
        "sonoguide_version": env!("CARGO_PKG_VERSION"),
        "backend": pipeline.despeckler().backend_name(),
        "device": pipeline.despeckler().device_name(),
        "files": summaries,
        "failed": failures.len(),
        "note": "research tool, not a medical device: every suggested path must be checked by a trained person",
    });
    if let Err(e) = sonoguide::imageio::write_json(&out.join("summary.json"), &doc) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_INPUT_FAILED);
    }
    let ok = summaries.iter().filter(|s| s.status == "ok").count();
    let skipped = summaries.iter().filter(|s| s.status == "skipped").count();
    eprintln!(
        "{ok} processed, {skipped} skipped, {} failed; summary in {}",
        failures.len(),
        out.join("summary.json").display()
    );
    if failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    eprintln!("failures:");
    for f in &failures {
        eprintln!("  {}", f.error.as_deref().unwrap_or("unknown error"));
    }
    ExitCode::from(EXIT_INPUT_FAILED)
}
