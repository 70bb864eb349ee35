//! The main job as a batch task: despeckle, segment and plan every frame; write overlays,
//! labels, bone and plan JSON per frame and a derived overlay DICOM per file.

use std::path::Path;

use serde::Serialize;
use serde_json::json;

use super::{BackendCounts, FileReport, FileTask, SegSummary};
use crate::dicom::seg::{SegOutcome, SegSource, SegWriter};
use crate::dicom::write::{
    derived_identity, source_history, Colour, UsImage, UsImageWriter, OVERLAY_SERIES, SEG_SERIES,
};
use crate::pipeline::StageTimings;
use crate::{Pipeline, Session};

/// Plan figures of one input, for `summary.json`.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PlanSummary {
    /// Frames with a safe path.
    pub frames_with_path: usize,
    /// The first frame's plan.
    pub first: Option<crate::NeedlePlan>,
    /// Median needle angle over the frames with a path, degrees.
    pub median_angle_deg: Option<f64>,
    /// Median target depth, mm.
    pub median_depth_mm: Option<f64>,
    /// Median path length, mm.
    pub median_length_mm: Option<f64>,
    /// Mean frame-to-frame target step, mm.
    pub target_jitter_mm: Option<f64>,
    /// Mean frame-to-frame entry step, mm.
    pub entry_jitter_mm: Option<f64>,
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
    frames: Option<(usize, usize)>,
    overlay_on_original: bool,
    write_seg: bool,
) -> Result<FileReport, String> {
    let dicom_out = dir.join(format!("{stem}.overlay.dcm"));
    let seg_name = format!("{stem}.seg.dcm");
    let (file, start, end) = super::open_frames(path, frames)?;
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
    // The derived DICOM is written frame by frame as the frames are processed; its header
    // needs the first frame's region and calibration, so it starts with that frame.
    let mut writer: Option<UsImageWriter> = None;
    let mut seg_writer: Option<SegWriter> = None;
    let (mut t_despeckle, mut t_features, mut t_segment, mut t_plan, mut t_total) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut angles, mut depths, mut lengths) = (vec![], vec![], vec![]);
    let (mut targets, mut entries) = (vec![], vec![]);
    let mut first = None;
    let mut backends = BackendCounts::default();
    let mut with_path = 0;
    let (w, h) = (file.info().columns as usize, file.info().rows as usize);
    let wrap = |e: crate::Error| e.to_string();
    for k in start..end {
        let frame = file.read_frame(k).map_err(|e| e.to_string())?;
        if k == start {
            let region = frame.region.bounds;
            // Only a calibration the source has is written (never the assumed spacing).
            let mut mm = None;
            let reference;
            if let crate::Calibration::Ok {
                mm_per_px_x,
                mm_per_px_y,
                reference_px,
                ..
            } = &frame.calibration
            {
                mm = Some((*mm_per_px_x, *mm_per_px_y));
                reference = reference_px
                    .map(|r| (r.0.round() as i64, r.1.round() as i64))
                    .unwrap_or((region.x0 as i64, region.y0 as i64));
            } else {
                reference = (region.x0 as i64, region.y0 as i64);
            }
            let (identity, derived) = derived_identity(file.object(), OVERLAY_SERIES);
            let mut image = UsImage::new(
                w,
                h,
                Colour::Rgb,
                Vec::new(),
                mm,
                region,
                reference,
                identity,
            );
            let (frame_time, lossy) =
                source_history(file.object(), &file.info().transfer_syntax_uid);
            if let Some(t) = frame_time {
                image.frame_time_ms = t;
            }
            image.lossy = lossy;
            image.derived_from = derived.map(|(c, i, _)| {
                (
                    c,
                    i,
                    "Despeckled, segmented, needle path suggested and burned in by sonoguide"
                        .to_string(),
                )
            });
            writer = Some(
                UsImageWriter::create(&dicom_out, &image, end - start)
                    .map_err(|e| e.to_string())?,
            );
            if write_seg {
                let (identity, _) = derived_identity(file.object(), SEG_SERIES);
                let source = SegSource::of(file.object(), file.frame_count() > 1);
                seg_writer = Some(
                    SegWriter::create(&dir.join(&seg_name), w, h, identity, source)
                        .map_err(|e| e.to_string())?,
                );
            }
        }
        let r = pipeline.process_in(&mut session, &frame).map_err(wrap)?;
        let name = format!("frame_{k:04}");
        let base = if overlay_on_original {
            &frame.intensity
        } else {
            &r.despeckled
        };
        let overlay = crate::overlay::draw_plan(
            base,
            &r.segmentation.labels,
            &r.plan,
            r.segmentation.mm_per_px,
        )
        .map_err(wrap)?;
        crate::imageio::write_rgb_png(
            &dir.join(format!("{name}.overlay.png")),
            w,
            h,
            overlay.as_raw(),
        )
        .map_err(wrap)?;
        crate::imageio::write_gray_png(
            &dir.join(format!("{name}.labels.png")),
            &r.segmentation.labels,
        )
        .map_err(wrap)?;
        crate::imageio::write_json(
            &dir.join(format!("{name}.bone.json")),
            &r.segmentation.bone_json(),
        )
        .map_err(wrap)?;
        crate::imageio::write_json(&dir.join(format!("{name}.plan.json")), &r.plan)
            .map_err(wrap)?;
        if let Some(wr) = writer.as_mut() {
            wr.push(overlay.as_raw()).map_err(|e| e.to_string())?;
        }
        if let Some(sw) = seg_writer.as_mut() {
            sw.push(k as u32 + 1, &r.segmentation.labels)
                .map_err(|e| e.to_string())?;
        }
        backends.add("despeckle", r.backends.despeckle);
        backends.add("features", r.backends.features);
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
    writer
        .ok_or_else(|| format!("{}: no frame was processed", path.display()))?
        .finish()
        .map_err(|e| e.to_string())?;
    let seg = match seg_writer {
        Some(sw) => Some(match sw.finish().map_err(|e| e.to_string())? {
            SegOutcome::Written(segments) => SegSummary {
                file: Some(seg_name),
                segments,
            },
            _ => SegSummary {
                file: None,
                segments: Vec::new(),
            },
        }),
        None => None,
    };
    let m = |v: &mut Vec<f64>| median(v).unwrap_or(0.0);
    Ok(FileReport {
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
        backends,
        detail: None,
        seg,
    })
}

/// The `process` task: the pipeline over every frame, with its outputs.
#[derive(Debug)]
pub struct ProcessTask {
    pipeline: Pipeline,
    overlay_on_original: bool,
    seg: bool,
}

impl ProcessTask {
    /// The task with this pipeline; the overlay is drawn on the despeckled frame, or on the
    /// original when `overlay_on_original`.
    pub fn new(pipeline: Pipeline, overlay_on_original: bool) -> ProcessTask {
        ProcessTask {
            pipeline,
            overlay_on_original,
            seg: true,
        }
    }

    /// Whether a DICOM SEG (`<stem>.seg.dcm`) is written beside the overlay DICOM (the
    /// default).
    pub fn with_seg(mut self, seg: bool) -> ProcessTask {
        self.seg = seg;
        self
    }

    /// The pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }
}

impl FileTask for ProcessTask {
    fn done_marker(&self, stem: &str) -> Option<String> {
        Some(format!("{stem}.overlay.dcm"))
    }

    fn run(
        &self,
        input: &Path,
        dir: &Path,
        stem: &str,
        frames: Option<(usize, usize)>,
    ) -> Result<FileReport, String> {
        process_file(
            input,
            dir,
            stem,
            &self.pipeline,
            frames,
            self.overlay_on_original,
            self.seg,
        )
    }

    fn config(&self) -> serde_json::Value {
        let c = self.pipeline.config();
        json!({
            "command": "process",
            "backend_requested": super::backend_name(c.backend),
            "filters": super::tasks::filters_json(&c.filters),
            "plan": {
                "min_angle_deg": c.plan.min_angle_deg,
                "max_angle_deg": c.plan.max_angle_deg,
                "preferred_angle_deg": c.plan.preferred_angle_deg,
                "margin_mm": c.plan.margin_mm,
                "target_mm": c.plan.target_mm,
            },
            "overlay_on": if self.overlay_on_original { "original" } else { "despeckled" },
            "seg": self.seg,
        })
    }

    fn compute(&self) -> &crate::Compute {
        self.pipeline.despeckler().compute()
    }
}
