//! Scoring on sets of files on disk, read through the DICOM reader as a user's file would be:
//! each case is `NAME.dcm` with `NAME.truth.png` (labels; `NAME.truth_NNNN.png` for frame NNNN
//! of a cine) and `NAME.truth.json` (spacing, bone polylines, ideal target, tolerances). Any
//! source that writes these files can be scored: the own phantom (`sonoguide phantom`) and the
//! pulse-echo simulator (`tools/pusim`). Nothing from the generator (masks, calibration) is
//! given to the pipeline: only the DICOM file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use super::eval::dice;
use super::{Result, SimError};
use crate::label::Label;
use crate::Pipeline;

/// How far a planned target may lie from the ideal one when the truth gives no tolerance, mm
/// (the half-width of the smallest targets the presets aim at: a 4 mm recess or bursa).
pub const DEFAULT_TARGET_TOLERANCE_MM: f64 = 2.0;
/// Labels scored: every label but background (tendon, bone, shadow, joint, vessel, nerve),
/// in code order; `SetScore::dice` follows it.
fn scored() -> impl Iterator<Item = Label> {
    Label::ALL.into_iter().skip(1)
}

/// The parts of `NAME.truth.json` the scoring reads.
#[derive(Debug, Clone, Deserialize)]
pub struct TruthFile {
    /// Case name.
    pub name: String,
    /// Millimetres per pixel (x, y).
    pub spacing_mm: [f64; 2],
    /// Target kind of the truth.
    pub target_kind: Option<String>,
    /// Per-frame truth.
    pub frames: Vec<TruthFrame>,
    /// How far a planned target may be from the ideal one, mm.
    pub target_tolerance_mm: Option<f64>,
    /// Convex probes: the fan's geometry.
    pub curved: Option<CurvedTruth>,
    /// Gain or dynamic-range change applied to an otherwise identical case.
    pub perturbation: Option<serde_json::Value>,
}

/// Per-frame truth.
#[derive(Debug, Clone, Deserialize)]
pub struct TruthFrame {
    /// Bone surface polylines, px.
    #[serde(default)]
    pub bone_polylines_px: Vec<Vec<[f64; 2]>>,
    /// Ideal target, px.
    pub target_px: Option<[f64; 2]>,
}

/// A convex probe's fan.
#[derive(Debug, Clone, Deserialize)]
pub struct CurvedTruth {
    /// Centre of the arcs, px.
    pub apex_px: [f64; 2],
    /// Radius of the near arc (the probe face), mm.
    pub radius_mm: f64,
}

/// Scores of one frame.
#[derive(Debug, Clone, Serialize)]
pub struct CaseScore {
    /// Case name and frame.
    pub name: String,
    /// Frame index.
    pub frame: usize,
    /// Dice per scored label (`None` when neither truth nor result has it).
    pub dice: [Option<f64>; 6],
    /// Mean distance from truth bone points to the found surface, mm (`None` when the truth
    /// has no bone, or when no surface was found: see `missed_bone`).
    pub bone_mean_mm: Option<f64>,
    /// Whether bone was labelled although the truth has none.
    pub false_bone: bool,
    /// Whether the truth has a bone surface and none was found (no distance to measure).
    pub missed_bone: bool,
    /// Whether the truth has bone.
    pub truth_has_bone: bool,
    /// Plan status.
    pub status: String,
    /// Why there is no path.
    pub reason: Option<String>,
    /// Planned target to ideal target, mm.
    pub target_error_mm: Option<f64>,
    /// Tolerance used, mm.
    pub target_tolerance_mm: f64,
    /// Whether an ideal target exists.
    pub has_ideal_target: bool,
    /// Truth structures (bone, shadow, vessel, nerve) the path crosses, by name.
    pub crossed: Vec<&'static str>,
    /// Convex probes: the entry's distance from the skin arc, mm.
    pub entry_arc_error_mm: Option<f64>,
    /// Planned and truth target kinds.
    pub target_kind: Option<String>,
    /// The truth's target kind.
    pub truth_target_kind: Option<String>,
}

/// Scores of one group of cases (a folder, or one perturbation of it).
#[derive(Debug, Clone, Serialize)]
pub struct SetScore {
    /// Folder name, with the perturbation when there is one.
    pub set: String,
    /// Frames scored.
    pub frames: usize,
    /// Mean Dice per label over the frames where truth or result has it (NaN if none).
    pub dice: [f64; 6],
    /// Frames counted in each Dice mean.
    pub dice_frames: [usize; 6],
    /// Mean truth → found bone distance over frames with a bone surface in the truth and
    /// one found, mm.
    pub bone_mean_mm: f64,
    /// Frames with a bone surface in the truth where none was found (left out of
    /// `bone_mean_mm`, whose distance would be infinite).
    pub missed_bone_frames: usize,
    /// Frames without bone in the truth, and those where bone was labelled anyway.
    pub no_bone_frames: usize,
    /// See `no_bone_frames`.
    pub false_bone_frames: usize,
    /// Frames with an ideal target.
    pub target_frames: usize,
    /// Of those, frames whose planned target lies within the tolerance.
    pub target_within: usize,
    /// Mean target error over frames with both targets, mm.
    pub target_error_mean_mm: f64,
    /// Frames with a path.
    pub with_path: usize,
    /// Paths that cross a truth bone, shadow, vessel or nerve.
    pub unsafe_paths: usize,
    /// Frames reported as having no safe path.
    pub no_safe_path: usize,
    /// Convex frames with a path, and the largest entry distance from the skin arc, mm.
    pub convex_paths: usize,
    /// See `convex_paths`.
    pub entry_arc_error_max_mm: f64,
    /// Every frame's scores.
    pub cases: Vec<CaseScore>,
}

/// The cases of a folder: every `*.truth.json` with its `.dcm` beside it, sorted by name.
pub fn cases_in(dir: &Path) -> Result<Vec<(PathBuf, TruthFile)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| invalid("set", dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| invalid("set", dir, e))?.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = file.strip_suffix(".truth.json") else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|e| invalid("truth", &path, e))?;
        let truth: TruthFile =
            serde_json::from_str(&text).map_err(|e| invalid("truth", &path, e))?;
        let dcm = dir.join(format!("{stem}.dcm"));
        if !dcm.is_file() {
            return Err(invalid("set", &dcm, "missing (its truth.json is there)"));
        }
        out.push((dcm, truth));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn invalid(name: &'static str, path: &Path, e: impl std::fmt::Display) -> SimError {
    SimError::InvalidParameter {
        name,
        reason: format!("{}: {e}", path.display()),
    }
}

/// The truth label map of frame `k` of the case whose DICOM is `dcm`.
pub(crate) fn truth_labels(dcm: &Path, k: usize) -> Result<Array2<u8>> {
    let stem = dcm.with_extension("");
    let png = if k == 0 {
        PathBuf::from(format!("{}.truth.png", stem.display()))
    } else {
        PathBuf::from(format!("{}.truth_{k:04}.png", stem.display()))
    };
    let img = image::open(&png)
        .map_err(|e| invalid("truth", &png, e))?
        .to_luma8();
    let (w, h) = img.dimensions();
    Array2::from_shape_vec((h as usize, w as usize), img.into_raw())
        .map_err(|e| invalid("truth", &png, e))
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Scores one frame's result against its truth.
fn score_frame(
    name: &str,
    k: usize,
    truth: &TruthFile,
    labels: &Array2<u8>,
    r: &crate::FrameResult,
    nerve_margin_mm: f64,
) -> Result<CaseScore> {
    let [sx, sy] = truth.spacing_mm;
    let got = &r.segmentation.labels;
    if got.dim() != labels.dim() {
        return Err(invalid(
            "truth",
            Path::new(name),
            format!("labels {:?} for a {:?} frame", labels.dim(), got.dim()),
        ));
    }
    let mut d = [None; 6];
    for (i, l) in scored().enumerate() {
        d[i] = dice(labels, got, l.code());
    }
    let tf = truth.frames.get(k);
    let truth_pts: Vec<[f64; 2]> = tf
        .map(|f| f.bone_polylines_px.iter().flatten().copied().collect())
        .unwrap_or_default();
    let found: Vec<[f64; 2]> = r
        .segmentation
        .bone_polylines_px
        .iter()
        .flatten()
        .copied()
        .collect();
    let mm_dist = |a: [f64; 2], b: [f64; 2]| ((a[0] - b[0]) * sx).hypot((a[1] - b[1]) * sy);
    let missed_bone = !truth_pts.is_empty() && found.is_empty();
    let bone_mean_mm = (!truth_pts.is_empty() && !found.is_empty()).then(|| {
        mean(
            &truth_pts
                .iter()
                .map(|q| {
                    found
                        .iter()
                        .map(|p| mm_dist(*p, *q))
                        .fold(f64::INFINITY, f64::min)
                })
                .collect::<Vec<_>>(),
        )
    });
    let plan = &r.plan;
    let ideal = tf.and_then(|f| f.target_px);
    let target_error_mm = match (plan.target, ideal) {
        (Some(t), Some(i)) => Some(mm_dist(t.px, i)),
        _ => None,
    };
    let mut crossed = Vec::new();
    let mut entry_arc_error_mm = None;
    if let (true, Some(e), Some(t)) = (plan.is_ok(), plan.entry, plan.target) {
        // The planner's own exact path check, on the truth: crossing bone, shadow or a
        // vessel, or coming within the nerve margin of a nerve, is unsafe.
        let rules = crate::plan::path::truth_rules(nerve_margin_mm);
        let check =
            crate::plan::path::Obstacles::new(labels, (sx, sy), &rules).check(e.px, t.px, 0.0);
        for (label, d) in check.clearances {
            let margin = rules
                .iter()
                .find(|r| r.label == label)
                .map_or(0.0, |r| r.margin_mm);
            if d <= 0.0 || d < margin {
                crossed.push(label.name());
            }
        }
        if let Some(c) = &truth.curved {
            entry_arc_error_mm = Some((mm_dist(e.px, c.apex_px) - c.radius_mm).abs());
        }
    }
    let truth_has_bone = labels.iter().any(|&l| l == Label::Bone.code());
    Ok(CaseScore {
        name: name.to_string(),
        frame: k,
        dice: d,
        bone_mean_mm,
        false_bone: !truth_has_bone && got.iter().any(|&l| l == Label::Bone.code()),
        missed_bone,
        truth_has_bone,
        status: plan.status.to_string(),
        reason: plan.reason.clone(),
        target_error_mm,
        target_tolerance_mm: truth
            .target_tolerance_mm
            .filter(|t| t.is_finite() && *t > 0.0)
            .unwrap_or(DEFAULT_TARGET_TOLERANCE_MM),
        has_ideal_target: ideal.is_some(),
        crossed,
        entry_arc_error_mm,
        target_kind: plan.target_kind.map(|k| k.to_string()),
        truth_target_kind: truth.target_kind.clone(),
    })
}

/// Sums up a group of frames.
pub fn summarise(set: String, cases: Vec<CaseScore>) -> SetScore {
    let mut dice = [f64::NAN; 6];
    let mut dice_frames = [0; 6];
    for i in 0..6 {
        let v: Vec<f64> = cases.iter().filter_map(|c| c.dice[i]).collect();
        dice[i] = mean(&v);
        dice_frames[i] = v.len();
    }
    let bone: Vec<f64> = cases.iter().filter_map(|c| c.bone_mean_mm).collect();
    let errors: Vec<f64> = cases.iter().filter_map(|c| c.target_error_mm).collect();
    let arc: Vec<f64> = cases.iter().filter_map(|c| c.entry_arc_error_mm).collect();
    SetScore {
        frames: cases.len(),
        dice,
        dice_frames,
        bone_mean_mm: mean(&bone),
        missed_bone_frames: cases.iter().filter(|c| c.missed_bone).count(),
        no_bone_frames: cases.iter().filter(|c| !c.truth_has_bone).count(),
        false_bone_frames: cases.iter().filter(|c| c.false_bone).count(),
        target_frames: cases.iter().filter(|c| c.has_ideal_target).count(),
        target_within: cases
            .iter()
            .filter(|c| {
                c.has_ideal_target
                    && c.target_error_mm
                        .is_some_and(|e| e <= c.target_tolerance_mm)
            })
            .count(),
        target_error_mean_mm: mean(&errors),
        with_path: cases.iter().filter(|c| c.status == "ok").count(),
        unsafe_paths: cases.iter().filter(|c| !c.crossed.is_empty()).count(),
        no_safe_path: cases.iter().filter(|c| c.status == "no_safe_path").count(),
        convex_paths: arc.len(),
        entry_arc_error_max_mm: arc.iter().copied().fold(f64::NAN, f64::max),
        set,
        cases,
    }
}

/// Scores every case of `dir`, grouped by perturbation (one group per perturbation found in
/// the truth files; unperturbed cases form the group named after the folder).
pub fn score_dir(pipeline: &Pipeline, dir: &Path) -> Result<Vec<SetScore>> {
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    let mut groups: BTreeMap<String, Vec<CaseScore>> = BTreeMap::new();
    let options = crate::dicom::ReadOptions::default();
    for (dcm, truth) in cases_in(dir)? {
        let file = crate::dicom::DicomFile::open(&dcm, &options)?;
        let group = match &truth.perturbation {
            None | Some(serde_json::Value::Null) => base.clone(),
            Some(p) => format!("{base} {}", perturbation_name(p)),
        };
        let mut session = crate::Session::new();
        for k in 0..file.frame_count() {
            let frame = file.read_frame(k)?;
            let r = pipeline.process_in(&mut session, &frame)?;
            let labels = truth_labels(&dcm, k)?;
            let c = score_frame(
                &truth.name,
                k,
                &truth,
                &labels,
                &r,
                pipeline.config().plan.nerve_margin_mm,
            )?;
            groups.entry(group.clone()).or_default().push(c);
        }
    }
    Ok(groups
        .into_iter()
        .map(|(set, cases)| summarise(set, cases))
        .collect())
}

/// The keys of a perturbation object that name its group (kind and amount).
const GROUP_KEYS: [&str; 3] = ["kind", "delta_db", "dynamic_range_db"];

/// A short name for a perturbation given as a string or an object.
fn perturbation_name(p: &serde_json::Value) -> String {
    match p {
        serde_json::Value::String(s) => s.clone(),
        // Group by what was changed and by how much, not by case.
        serde_json::Value::Object(m) => m
            .iter()
            .filter(|(k, _)| GROUP_KEYS.contains(&k.as_str()))
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str().map(String::from).unwrap_or(v.to_string())
                )
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(bone_mean_mm: Option<f64>, missed_bone: bool) -> CaseScore {
        CaseScore {
            name: "c".into(),
            frame: 0,
            dice: [None; 6],
            bone_mean_mm,
            false_bone: false,
            missed_bone,
            truth_has_bone: true,
            status: "no_safe_path".into(),
            reason: None,
            target_error_mm: None,
            target_tolerance_mm: DEFAULT_TARGET_TOLERANCE_MM,
            has_ideal_target: false,
            crossed: Vec::new(),
            entry_arc_error_mm: None,
            target_kind: None,
            truth_target_kind: None,
        }
    }

    #[test]
    fn a_frame_whose_bone_was_missed_is_counted_not_averaged() {
        // One frame 0.5 mm off, one 1.5 mm off, one whose surface was not found at all: the
        // mean is over the two measured frames and the third is counted as missed (before,
        // its infinite distance made the set's mean infinite, written as null).
        let s = summarise(
            "s".into(),
            vec![
                case(Some(0.5), false),
                case(Some(1.5), false),
                case(None, true),
            ],
        );
        assert_eq!(s.missed_bone_frames, 1);
        assert!((s.bone_mean_mm - 1.0).abs() < 1e-12, "{}", s.bone_mean_mm);
    }
}
