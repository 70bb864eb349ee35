//! Scoring against phantom truth.

use ndarray::Array2;
use serde::Serialize;

use super::Result;
use crate::despeckle::{Despeckler, Filter};
use crate::label::Label;
use crate::sim::phantom::{generate, PhantomParams};
use crate::sim::quality;

/// Depth of the structure-free band above and below the tendon used as its surround, px.
const SURROUND_PX: usize = 12;
/// Gap between the tendon and its surround band, px (PSF blur).
const SURROUND_GAP_PX: usize = 3;
/// Local standard deviation (grey levels, σ = 2 px window) of the clean map under which
/// tissue counts as homogeneous for the ENL.
const HOMOGENEOUS_STD: f64 = 2.0;
/// Clean level below which tissue is too dark (shadow, fluid) for the ENL.
const HOMOGENEOUS_MIN_LEVEL: f64 = 60.0;

/// Averages of the quality measures of one filter over a set of phantoms.
#[derive(Debug, Clone, Serialize)]
pub struct DespeckleScore {
    /// Filter name (`raw` for the unfiltered image).
    pub filter: String,
    /// Named parameters.
    pub parameters: Vec<(String, f64)>,
    /// Mean SSIM against the clean map.
    pub ssim: f64,
    /// Mean PSNR (dB) against the clean map.
    pub psnr_db: f64,
    /// Mean equivalent number of looks in homogeneous tissue.
    pub enl: f64,
    /// Mean contrast-to-noise between tendon and surrounding tissue.
    pub cnr_tendon: f64,
    /// Mean bone-edge gradient ratio (filtered / clean).
    pub bone_edge_ratio: f64,
    /// Phantoms scored.
    pub cases: usize,
}

struct Masks {
    image: Array2<bool>,
    homogeneous: Array2<bool>,
    tendon: Array2<bool>,
    surround: Array2<bool>,
    bone_band: Array2<bool>,
}

fn masks(clean: &Array2<f32>, labels: &Array2<u8>) -> Masks {
    let (h, w) = clean.dim();
    let c = clean.mapv(|v| v as f64);
    let m = quality::blur(&c, 2.0, 4);
    let m2 = quality::blur(&(&c * &c), 2.0, 4);
    let homogeneous = Array2::from_shape_fn((h, w), |(y, x)| {
        let sd = (m2[[y, x]] - m[[y, x]].powi(2)).max(0.0).sqrt();
        labels[[y, x]] == Label::Background.code()
            && sd < HOMOGENEOUS_STD
            && m[[y, x]] > HOMOGENEOUS_MIN_LEVEL
    });
    let tendon = labels.mapv(|l| l == Label::Tendon.code());
    let mut surround = Array2::from_elem((h, w), false);
    for x in 0..w {
        let rows: Vec<usize> = (0..h).filter(|y| tendon[[*y, x]]).collect();
        if let (Some(&t0), Some(&t1)) = (rows.first(), rows.last()) {
            let above = t0.saturating_sub(SURROUND_GAP_PX + SURROUND_PX)
                ..t0.saturating_sub(SURROUND_GAP_PX);
            let below = (t1 + SURROUND_GAP_PX).min(h)..(t1 + SURROUND_GAP_PX + SURROUND_PX).min(h);
            for y in above.chain(below) {
                if labels[[y, x]] == Label::Background.code() {
                    surround[[y, x]] = true;
                }
            }
        }
    }
    let bone_band = Array2::from_shape_fn((h, w), |(y, x)| {
        (y.saturating_sub(2)..(y + 3).min(h)).any(|yy| labels[[yy, x]] == Label::Bone.code())
    });
    let image = clean.mapv(|v| v > 0.0);
    Masks {
        image,
        homogeneous,
        tendon,
        surround,
        bone_band,
    }
}

fn values(a: &Array2<f32>, m: &Array2<bool>) -> Vec<f64> {
    a.indexed_iter()
        .filter(|(i, _)| m[*i])
        .map(|(_, v)| *v as f64)
        .collect()
}

/// Scores the unfiltered image and each filter on phantoms with `seeds`.
pub fn despeckle_scores(
    despeckler: &Despeckler,
    filters: &[Filter],
    seeds: std::ops::Range<u64>,
    params: &PhantomParams,
) -> Result<Vec<DespeckleScore>> {
    let mut sums: Vec<[f64; 5]> = vec![[0.0; 5]; filters.len() + 1];
    let mut counts: Vec<[usize; 5]> = vec![[0; 5]; filters.len() + 1];
    let mut cases = 0;
    for seed in seeds {
        let mut p = params.clone();
        p.seed = seed;
        let ph = generate("eval", &p)?;
        let img = ph.frames[0].mapv(|v| v as f32);
        let clean = ph.clean[0].mapv(|v| v as f32);
        let mk = masks(&clean, &ph.labels[0]);
        cases += 1;
        for k in 0..=filters.len() {
            let out = if k == 0 {
                img.clone()
            } else {
                despeckler.run(&img, std::slice::from_ref(&filters[k - 1]))?
            };
            let measures = [
                Some(quality::ssim(&out, &clean, Some(&mk.image))),
                Some(quality::psnr(&out, &clean, Some(&mk.image))),
                Some(quality::enl(&values(&out, &mk.homogeneous))).filter(|v| v.is_finite()),
                (mk.tendon.iter().any(|v| *v) && mk.surround.iter().any(|v| *v))
                    .then(|| quality::cnr(&values(&out, &mk.tendon), &values(&out, &mk.surround))),
                quality::edge_ratio(&out, &clean, &mk.bone_band),
            ];
            for (i, m) in measures.iter().enumerate() {
                if let Some(v) = m {
                    sums[k][i] += v;
                    counts[k][i] += 1;
                }
            }
        }
    }
    let avg = |k: usize, i: usize| {
        if counts[k][i] == 0 {
            f64::NAN
        } else {
            sums[k][i] / counts[k][i] as f64
        }
    };
    Ok((0..=filters.len())
        .map(|k| DespeckleScore {
            filter: if k == 0 {
                "raw".into()
            } else {
                filters[k - 1].name().into()
            },
            parameters: if k == 0 {
                Vec::new()
            } else {
                filters[k - 1]
                    .parameters()
                    .into_iter()
                    .map(|(n, v)| (n.to_string(), v))
                    .collect()
            },
            ssim: avg(k, 0),
            psnr_db: avg(k, 1),
            enl: avg(k, 2),
            cnr_tendon: avg(k, 3),
            bone_edge_ratio: avg(k, 4),
            cases,
        })
        .collect())
}

/// Segmentation scores over a set of phantoms.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentScore {
    /// Phantoms scored.
    pub cases: usize,
    /// Mean Dice per label 1..=5 (tendon, bone band, shadow, joint/effusion, vessel), over the
    /// cases where the label is in the truth or the result; NaN if never.
    pub dice: [f64; 5],
    /// Cases that counted for each label's Dice.
    pub dice_cases: [usize; 5],
    /// Mean distance from truth bone-surface points to the detected surface, mm.
    pub bone_mean_mm: f64,
    /// 95th percentile of that distance, mm.
    pub bone_p95_mm: f64,
    /// Mean distance from detected surface points to the truth surface, mm.
    pub bone_false_mean_mm: f64,
    /// Share of truth bone points farther than 2 mm from any detection (missed).
    pub bone_missed_share: f64,
    /// Frames without bone in the truth in which bone was labelled.
    pub false_bone_frames: usize,
    /// Frames without bone in the truth.
    pub no_bone_frames: usize,
    /// Median milliseconds per frame for despeckling + segmentation on this machine.
    pub ms_median: f64,
}

fn nearest_mm(p: [f64; 2], set: &[[f64; 2]], mm: f64) -> f64 {
    set.iter()
        .map(|q| ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt())
        .fold(f64::INFINITY, f64::min)
        * mm
}

/// Dice of label `l` between `a` and `b`; `None` when neither has it.
pub fn dice(a: &Array2<u8>, b: &Array2<u8>, l: u8) -> Option<f64> {
    let (mut inter, mut na, mut nb) = (0usize, 0usize, 0usize);
    for (x, y) in a.iter().zip(b.iter()) {
        let (ia, ib) = (*x == l, *y == l);
        na += ia as usize;
        nb += ib as usize;
        inter += (ia && ib) as usize;
    }
    (na + nb > 0).then(|| 2.0 * inter as f64 / (na + nb) as f64)
}

/// Scores segmentation (after `filter`) on phantoms with `seeds`.
pub fn segment_scores(
    despeckler: &Despeckler,
    filter: &Filter,
    seg: &crate::segment::SegmentParams,
    seeds: std::ops::Range<u64>,
    params: &PhantomParams,
) -> Result<SegmentScore> {
    let mut dice_sum = [0.0f64; 5];
    let mut dice_n = [0usize; 5];
    let (mut truth_d, mut false_d) = (Vec::new(), Vec::new());
    let (mut false_bone, mut no_bone, mut cases) = (0, 0, 0);
    let mut times = Vec::new();
    for seed in seeds {
        let mut p = params.clone();
        p.seed = seed;
        let ph = generate("eval", &p)?;
        let frame = crate::sim::phantom::frame_of(&ph, 0)?;
        let t0 = std::time::Instant::now();
        let despeckled = despeckler.run(&frame.intensity, std::slice::from_ref(filter))?;
        let s = crate::segment::segment_with(despeckler, &frame, &despeckled, seg)?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        cases += 1;
        let truth = &ph.labels[0];
        for l in 1..=5u8 {
            if let Some(d) = dice(truth, &s.labels, l) {
                dice_sum[l as usize - 1] += d;
                dice_n[l as usize - 1] += 1;
            }
        }
        let truth_pts: Vec<[f64; 2]> = ph.truth.frames[0]
            .bone_polylines_px
            .iter()
            .flatten()
            .copied()
            .collect();
        let found_pts: Vec<[f64; 2]> = s.bone_polylines_px.iter().flatten().copied().collect();
        let mm = ph.truth.spacing_mm[0];
        if truth_pts.is_empty() {
            no_bone += 1;
            if s.labels.iter().any(|l| *l == Label::Bone.code()) {
                false_bone += 1;
            }
        } else {
            for q in &truth_pts {
                truth_d.push(nearest_mm(*q, &found_pts, mm));
            }
        }
        if !truth_pts.is_empty() {
            for q in &found_pts {
                false_d.push(nearest_mm(*q, &truth_pts, mm));
            }
        }
    }
    let finite: Vec<f64> = truth_d.iter().copied().filter(|d| d.is_finite()).collect();
    let missed = truth_d.iter().filter(|d| **d > 2.0).count();
    let mut sorted = finite.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let p95 = if sorted.is_empty() {
        f64::NAN
    } else {
        sorted[((sorted.len() - 1) as f64 * 0.95) as usize]
    };
    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let mut dice = [f64::NAN; 5];
    for i in 0..5 {
        if dice_n[i] > 0 {
            dice[i] = dice_sum[i] / dice_n[i] as f64;
        }
    }
    Ok(SegmentScore {
        cases,
        dice,
        dice_cases: dice_n,
        bone_mean_mm: mean(&finite),
        bone_p95_mm: p95,
        bone_false_mean_mm: mean(&false_d),
        bone_missed_share: if truth_d.is_empty() {
            0.0
        } else {
            missed as f64 / truth_d.len() as f64
        },
        false_bone_frames: false_bone,
        no_bone_frames: no_bone,
        ms_median: crate::sim::bench::median_of(&times),
    })
}

/// Planning scores over a set of phantoms.
#[derive(Debug, Clone, Serialize)]
pub struct PlanScore {
    /// Phantoms scored.
    pub cases: usize,
    /// Frames with a path.
    pub with_path: usize,
    /// Paths that cross bone, shadow or vessel by the truth labels (must be 0).
    pub unsafe_paths: usize,
    /// Smallest truth clearance of any path (outside the final margin), mm.
    pub min_truth_clearance_mm: f64,
    /// Mean distance between planned and ideal target (when both exist), mm.
    pub target_error_mean_mm: f64,
    /// 95th percentile of that distance, mm.
    pub target_error_p95_mm: f64,
    /// Cases whose target kind matches the truth's.
    pub kind_matches: usize,
    /// Cine jitter: mean frame-to-frame movement of the target beyond the tissue's own motion,
    /// raw and smoothed, mm.
    pub target_jitter_raw_mm: f64,
    /// The same, smoothed.
    pub target_jitter_smoothed_mm: f64,
    /// Entry jitter (frame-to-frame movement of the entry point), raw, mm.
    pub entry_jitter_raw_mm: f64,
    /// The same, smoothed.
    pub entry_jitter_smoothed_mm: f64,
    /// Frame pairs whose target kind changed (not counted in the jitter).
    pub kind_switches: usize,
    /// Frame pairs counted in the jitter.
    pub jitter_pairs: usize,
}

/// Raw and smoothed target offsets from the ideal, and raw and smoothed entries, mm.
type JitterPoints = ([f64; 2], [f64; 2], [f64; 2], [f64; 2]);

/// Scores planning on phantoms with `seeds` (single frames), and temporal jitter on `cines`
/// moving phantoms of `cine_frames` frames.
pub fn plan_scores(
    pipeline: &crate::Pipeline,
    seeds: std::ops::Range<u64>,
    cines: std::ops::Range<u64>,
    cine_frames: usize,
    params: &PhantomParams,
) -> Result<PlanScore> {
    let mut score = PlanScore {
        cases: 0,
        with_path: 0,
        unsafe_paths: 0,
        min_truth_clearance_mm: f64::INFINITY,
        target_error_mean_mm: f64::NAN,
        target_error_p95_mm: f64::NAN,
        kind_matches: 0,
        target_jitter_raw_mm: f64::NAN,
        target_jitter_smoothed_mm: f64::NAN,
        entry_jitter_raw_mm: f64::NAN,
        entry_jitter_smoothed_mm: f64::NAN,
        kind_switches: 0,
        jitter_pairs: 0,
    };
    let mut errors = Vec::new();
    for seed in seeds {
        let mut p = params.clone();
        p.seed = seed;
        let ph = generate("plan", &p)?;
        let frame = crate::sim::phantom::frame_of(&ph, 0)?;
        let r = pipeline.process(&frame)?;
        score.cases += 1;
        let truth = &ph.labels[0];
        let mm = ph.truth.spacing_mm[0];
        if r.plan.target_kind == Some(ph.truth.target_kind) {
            score.kind_matches += 1;
        }
        if let (Some(t), Some(tt)) = (r.plan.target, ph.truth.frames[0].target_mm) {
            errors.push(((t.mm[0] - tt[0]).powi(2) + (t.mm[1] - tt[1]).powi(2)).sqrt());
        }
        let (Some(e), Some(t)) = (r.plan.entry, r.plan.target) else {
            continue;
        };
        if !r.plan.is_ok() {
            continue;
        }
        score.with_path += 1;
        // The planner's own exact path check on the truth: crossing is unsafe; the clearance
        // is measured up to the final approach (a joint target lies between bones).
        let rules = crate::plan::path::truth_rules(0.0);
        let obstacles = crate::plan::path::Obstacles::new(truth, (mm, mm), &rules);
        let crossed = !obstacles.check(e.px, t.px, 0.0).is_safe();
        let approach_px = r.plan.final_approach_mm.unwrap_or(0.0) / mm;
        let len_px = (t.px[0] - e.px[0]).hypot(t.px[1] - e.px[1]);
        let keep = 1.0 - (approach_px / len_px.max(1e-9)).min(1.0);
        let until = [
            e.px[0] + keep * (t.px[0] - e.px[0]),
            e.px[1] + keep * (t.px[1] - e.px[1]),
        ];
        for (_, d) in obstacles.check(e.px, until, 0.0).clearances {
            score.min_truth_clearance_mm = score.min_truth_clearance_mm.min(d);
        }
        score.unsafe_paths += crossed as usize;
    }
    if !errors.is_empty() {
        errors.sort_by(|a, b| a.total_cmp(b));
        score.target_error_mean_mm = errors.iter().sum::<f64>() / errors.len() as f64;
        score.target_error_p95_mm = errors[((errors.len() - 1) as f64 * 0.95) as usize];
    }
    // Jitter on moving phantoms: the probe slides 1 px per frame, so the tissue (and the ideal
    // target) moves; jitter is the frame-to-frame change of (planned − ideal) target, and the
    // frame-to-frame change of the entry (which should stay near-constant).
    let (mut tr, mut ts, mut er, mut es) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for seed in cines {
        let mut p = params.clone();
        p.seed = seed;
        p.frames = cine_frames;
        let ph = generate("cine", &p)?;
        let mut session = crate::Session::new();
        let mut prev: Option<JitterPoints> = None;
        let mut prev_kind = None;
        for k in 0..ph.frames.len() {
            let frame = crate::sim::phantom::frame_of(&ph, k)?;
            let r = pipeline.process_in(&mut session, &frame)?;
            let ideal = ph.truth.frames[k].target_mm;
            let cur = match (
                r.raw_plan.target,
                r.plan.target,
                r.raw_plan.entry,
                r.plan.entry,
                ideal,
            ) {
                (Some(a), Some(b), Some(c), Some(d), Some(i))
                    if r.plan.is_ok() && r.raw_plan.is_ok() =>
                {
                    Some((
                        [a.mm[0] - i[0], a.mm[1] - i[1]],
                        [b.mm[0] - i[0], b.mm[1] - i[1]],
                        c.mm,
                        d.mm,
                    ))
                }
                _ => None,
            };
            let kind = r.raw_plan.target_kind;
            if prev.is_some() && cur.is_some() && kind != prev_kind {
                score.kind_switches += 1;
                prev = None;
            }
            prev_kind = kind;
            if let (Some(pv), Some(cv)) = (prev, cur) {
                score.jitter_pairs += 1;
                let d = |a: [f64; 2], b: [f64; 2]| {
                    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
                };
                tr.push(d(pv.0, cv.0));
                ts.push(d(pv.1, cv.1));
                er.push(d(pv.2, cv.2));
                es.push(d(pv.3, cv.3));
            }
            prev = cur;
        }
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    score.target_jitter_raw_mm = mean(&tr);
    score.target_jitter_smoothed_mm = mean(&ts);
    score.entry_jitter_raw_mm = mean(&er);
    score.entry_jitter_smoothed_mm = mean(&es);
    Ok(score)
}
