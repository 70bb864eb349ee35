//! Bone surface and acoustic shadow.
//!
//! Bone score per pixel = phase symmetry × brightness × shadowness, where brightness rises
//! from the tissue level to twice it and shadowness is how dark the tissue beneath is relative
//! to the tissue level. The surface is the best path across the columns (Viterbi dynamic
//! programming, after Foroughi et al. 2007): per column either a row (gaining score − the
//! threshold) or "no bone" (gaining 0), with a penalty per row of step between columns, steps
//! limited to the steepest surface expected, and a penalty for starting or ending a segment.
//! So gaps are allowed where there is no bone, and isolated bright specks do not become bone.

use ndarray::Array2;

use super::{Features, SegmentParams};
use crate::label::Label;

/// Penalty per row of step between neighbouring columns (score units).
const STEP_PENALTY: f32 = 0.02;
/// Penalty for entering or leaving bone (score units): about four columns of a clear surface.
const SEGMENT_PENALTY: f32 = 0.3;
/// Tissue level: this quantile of the valid intensities that are above the noise floor.
const TISSUE_QUANTILE: f64 = 0.5;
/// The noise floor (shadow, fluid) when estimating the tissue level: this share of the 90th
/// percentile of the valid intensities. A share rather than a grey level, so that it follows
/// gain and dynamic range (the 90th percentile is bright tissue in any frame).
const NOISE_FLOOR_SHARE: f32 = 0.3;
/// Depth beneath a bone candidate that must be image for its shadow to be judged, mm: the
/// shadow kernel skips 1 mm and averages what follows (up to 4 mm); at least 0.5 mm of it
/// must exist (bone near the bottom of the image is still bone).
const SHADOW_SPAN_MM: f64 = 1.5;
/// Shadowness of what lies beneath a pixel falls linearly from 1 (black) to 0 at this share
/// of the tissue level: shadows are partly filled by clutter and reverberation (side lobes of
/// the bright bone echo), often to half the tissue level, so only tissue-bright ground counts
/// as no shadow at all.
const SHADOW_NONE: f32 = 0.9;
/// Weight of a bright ridge with no shadow beneath, against one with a black shadow: shadows
/// filled by clutter must not hide bone from the surface search; runs without a shadow deeper
/// down are dropped afterwards (`DEEP_SHADOW_MAX`).
const SHADOW_FLOOR: f32 = 0.3;
/// Largest jump between neighbouring columns inside one polyline, mm.
const POLYLINE_BREAK_MM: f64 = 1.0;
/// Bone band above and below the surface, mm: 0.5 mm thick, the label convention of
/// truth files (`tests/data/pusim/README.md`, "Labels"): from 0.2 mm above the interface to 0.3 mm below
/// it: the cortex's specular echo and the first fraction of a millimetre of cortex).
const BAND_ABOVE_MM: f64 = 0.2;
const BAND_BELOW_MM: f64 = 0.3;

/// The tissue level of an analysis grid (computed once per frame into
/// [`Features::tissue_level`]).
pub fn tissue_level(intensity: &Array2<f32>, valid: &Array2<bool>) -> f32 {
    let mut v: Vec<f32> = intensity
        .indexed_iter()
        .filter(|(i, _)| valid[*i])
        .map(|(_, val)| *val)
        .collect();
    if v.is_empty() {
        return 100.0;
    }
    let k90 = ((v.len() - 1) as f64 * 0.9) as usize;
    let (_, p90, _) = v.select_nth_unstable_by(k90, |a, b| a.total_cmp(b));
    let floor = NOISE_FLOOR_SHARE * *p90;
    v.retain(|x| *x > floor);
    if v.is_empty() {
        return 100.0;
    }
    let k = ((v.len() - 1) as f64 * TISSUE_QUANTILE) as usize;
    let (_, m, _) = v.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
    *m
}

/// How far inside the valid image a bone candidate must lie, grid px: the span beneath the
/// surface over which a shadow is judged (`SHADOW_SPAN_MM`), in pixels of the finer axis.
pub fn edge_margin_px(f: &Features) -> usize {
    (SHADOW_SPAN_MM / f.mm_per_px.0.min(f.mm_per_px.1)).round() as usize
}

/// Bone score on the analysis grid.
pub fn bone_score(f: &Features) -> Array2<f32> {
    let level = f.tissue_level.max(1.0);
    let (h, _) = f.intensity.dim();
    // A shadow is only judged where the image goes on beneath: the whole band the shadow
    // kernel averages (1 mm gap + 4 mm) must lie inside the imaging region.
    let beneath = (SHADOW_SPAN_MM / f.mm_per_px.1).round() as usize;
    Array2::from_shape_fn(f.intensity.dim(), |(y, x)| {
        if !f.valid[[y, x]] || y + beneath >= h || !f.valid[[y + beneath, x]] {
            return 0.0;
        }
        let bright = ((f.intensity[[y, x]] - level) / level).clamp(0.0, 1.0);
        let shadow = (1.0 - f.below[[y, x]] / (SHADOW_NONE * level)).clamp(0.0, 1.0);
        f.phase_symmetry[[y, x]] * bright * (SHADOW_FLOOR + (1.0 - SHADOW_FLOOR) * shadow)
    })
}

/// The bone surface on the analysis grid: per column, the row or `None`.
pub fn surface(f: &Features, params: &SegmentParams) -> Vec<Option<f32>> {
    let mut s = surface_from(&bone_score(f), params.bone_threshold, f, params);
    drop_unshadowed_runs(&mut s, f);
    s
}

/// The bone surface on the analysis grid from a per-pixel `score` with break-even `tau`:
/// per column, the row or `None`; runs shorter than the shortest bone segment are dropped.
pub fn surface_from(
    score: &Array2<f32>,
    tau: f32,
    f: &Features,
    params: &SegmentParams,
) -> Vec<Option<f32>> {
    let (h, w) = score.dim();
    if h == 0 || w == 0 {
        return Vec::new();
    }
    let (mmx, mmy) = f.mm_per_px;
    // Steepest step: bone_max_step_mm of depth per 0.1 mm of width.
    let max_step = ((params.bone_max_step_mm * mmx / 0.1 / mmy).ceil() as usize).max(1);
    const NONE: i16 = i16::MAX;
    // back[x·h + y]: the row at x−1 that bone at (x, y) came from, or NONE (from "no bone").
    let mut back = vec![NONE; w * h];
    // none_from[x]: the row at x−1 that "no bone" at x came from, or NONE.
    let mut none_from = vec![NONE; w];
    let mut prev: Vec<f32> = (0..h)
        .map(|y| score[[y, 0]] - tau - SEGMENT_PENALTY)
        .collect();
    let mut prev_none = 0.0f32;
    let mut cur = vec![0f32; h];
    for x in 1..w {
        let (mut best_bone, mut best_bone_y) = (f32::NEG_INFINITY, 0usize);
        for y in 0..h {
            let mut best = prev_none - SEGMENT_PENALTY;
            let mut arg = NONE;
            let lo = y.saturating_sub(max_step);
            let hi = (y + max_step).min(h - 1);
            for py in lo..=hi {
                let v = prev[py] - STEP_PENALTY * (py as f32 - y as f32).abs();
                if v > best {
                    best = v;
                    arg = py as i16;
                }
            }
            cur[y] = score[[y, x]] - tau + best;
            back[x * h + y] = arg;
            if prev[y] > best_bone {
                best_bone = prev[y];
                best_bone_y = y;
            }
        }
        let leave = best_bone - SEGMENT_PENALTY;
        if leave > prev_none {
            none_from[x] = best_bone_y as i16;
            prev_none = leave;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    // Backtrack from the best final state.
    let mut out = vec![None; w];
    let (end_bone, end_y) =
        prev.iter().enumerate().fold(
            (f32::NEG_INFINITY, 0),
            |a, (y, v)| if *v > a.0 { (*v, y) } else { a },
        );
    let mut state: Option<usize> = if end_bone > prev_none {
        Some(end_y)
    } else {
        None
    };
    for x in (1..w).rev() {
        out[x] = state.map(|y| y as f32);
        let from = match state {
            Some(y) => back[x * h + y],
            None => none_from[x],
        };
        state = if from == NONE {
            None
        } else {
            Some(from as usize)
        };
    }
    out[0] = state.map(|y| y as f32);
    drop_short_runs(&mut out, f.mm_per_px.0, params.bone_min_length_mm);
    out
}

/// How deep beneath the surface the shadow of a bone run is checked, mm (beyond the kernel's
/// 5 mm: a wall with fluid beneath and tissue again deeper is not bone).
const DEEP_SHADOW_MM: f64 = 15.0;
/// Skipped beneath the surface before the deep shadow is averaged, mm (the echo's tail).
const DEEP_SHADOW_GAP_MM: f64 = 1.0;
/// A run is bone only if the mean intensity of the image beneath it, down to
/// `DEEP_SHADOW_MM`, stays below this share of the tissue level: bone reflects or absorbs
/// nearly all of the beam (cortical bone attenuates on the order of 10–20 dB/cm/MHz against
/// soft tissue's 0.5–1), so what lies beneath is reverberation and clutter, not tissue.
const DEEP_SHADOW_MAX: f32 = 0.75;

/// The runs of consecutive columns that hold a surface row, as `start..end` ranges.
fn runs(s: &[Option<f32>]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut x = 0;
    while x < s.len() {
        if s[x].is_none() {
            x += 1;
            continue;
        }
        let start = x;
        while x < s.len() && s[x].is_some() {
            x += 1;
        }
        out.push(start..x);
    }
    out
}

/// Mean shadow probability beneath a bone run below which it is not bone (see
/// [`drop_runs_without_shadow`]).
const RUN_SHADOW_PROBABILITY: f32 = 0.3;
/// A run whose mean bone probability along it reaches this is kept whatever lies beneath
/// (the classifier's bone class already weighs the shadow; clutter can fill it).
const RUN_BONE_PROBABILITY: f32 = 0.85;
/// ... if it is at least this long, mm (short bright specks over speckle are not trusted
/// without their shadow).
const RUN_SURE_MIN_MM: f64 = 5.0;

/// Drops runs of the surface beneath which `shadow` (a per-pixel shadow probability) does not
/// average at least `RUN_SHADOW_PROBABILITY` over `DEEP_SHADOW_GAP_MM`..`DEEP_SHADOW_MM`: bone leaves a
/// shadow, however filled with clutter; a bright interface over tissue does not.
pub fn drop_runs_without_shadow(
    s: &mut [Option<f32>],
    bone: &Array2<f32>,
    shadow: &Array2<f32>,
    f: &Features,
) {
    for run in runs(s) {
        let beneath = mean_beneath(s, run.clone(), shadow, f);
        let on: Vec<f32> = run
            .clone()
            .filter_map(|x| s[x].map(|y| bone[[y.round() as usize, x]]))
            .collect();
        let long = run.len() as f64 * f.mm_per_px.0 >= RUN_SURE_MIN_MM;
        let sure = long && on.iter().sum::<f32>() / on.len().max(1) as f32 >= RUN_BONE_PROBABILITY;
        if !sure && beneath.is_none_or(|m| m < RUN_SHADOW_PROBABILITY as f64) {
            s[run].iter_mut().for_each(|v| *v = None);
        }
    }
}

/// The band beneath a bone run must be darker than the tissue beside it at the same depths:
/// its mean at most this share of the flanks' mean. A shadow is a loss of signal against the
/// neighbouring beams; depth attenuation darkens both alike.
const SHADOW_CONTRAST: f32 = 0.8;
/// Only runs shorter than this are checked against their flanks, mm: a long surface with its
/// shadow is bone whatever lies beside it (often another bone's shadow or a joint gap).
const FLANK_CHECK_BELOW_MM: f64 = 10.0;
/// Flanks: on each side of the run, this width (mm) or the run's own length if shorter.
const FLANK_MM: f64 = 5.0;

/// Drops runs shorter than `FLANK_CHECK_BELOW_MM` whose band beneath
/// (`DEEP_SHADOW_GAP_MM`..`DEEP_SHADOW_MM`) is not darker than the same depths beside the run
/// (`SHADOW_CONTRAST`); runs with no image beside them are kept.
pub fn drop_runs_not_darker_than_beside(s: &mut [Option<f32>], f: &Features) {
    let (h, w) = f.intensity.dim();
    let gap = (DEEP_SHADOW_GAP_MM / f.mm_per_px.1).round() as usize;
    let depth = (DEEP_SHADOW_MM / f.mm_per_px.1).round() as usize;
    let flank_cols = (FLANK_MM / f.mm_per_px.0).round() as usize;
    for run in runs(s) {
        if run.len() as f64 * f.mm_per_px.0 >= FLANK_CHECK_BELOW_MM {
            continue;
        }
        let ys: Vec<usize> = run
            .clone()
            .filter_map(|x| s[x].map(|y| y.round() as usize))
            .collect();
        let (top, bottom) = (
            ys.iter().copied().min().unwrap_or(0) + gap,
            (ys.iter().copied().max().unwrap_or(0) + gap + depth).min(h),
        );
        let mean = |cols: &mut dyn Iterator<Item = usize>, under: bool| -> Option<f64> {
            let (mut sum, mut n) = (0.0f64, 0usize);
            for x in cols {
                let y0 = if under {
                    s[x].map_or(top, |y| y.round() as usize + gap)
                } else {
                    top
                };
                for y in y0..bottom.min(y0 + depth) {
                    if f.valid[[y, x]] {
                        sum += f.intensity[[y, x]] as f64;
                        n += 1;
                    }
                }
            }
            (n > 0).then(|| sum / n as f64)
        };
        let Some(under) = mean(&mut run.clone(), true) else {
            continue;
        };
        let width = flank_cols.min(run.len());
        let mut beside = (run.start.saturating_sub(width)..run.start)
            .chain(run.end..(run.end + width).min(w))
            .filter(|&x| s[x].is_none());
        let Some(flank) = mean(&mut beside, false) else {
            continue;
        };
        if under > SHADOW_CONTRAST as f64 * flank {
            s[run].iter_mut().for_each(|v| *v = None);
        }
    }
}

/// Bridges gaps of at most `max_mm` (the joint prior's widest gap) between two runs when the
/// image beneath the gap is not brighter than beneath the runs' ends beside it: the flanks'
/// mean from `DEEP_SHADOW_GAP_MM` to `DEEP_SHADOW_MM` beneath the surface (over `FLANK_MM` of
/// each run, or the run if shorter) exceeds `SHADOW_CONTRAST` × the gap's mean beneath the
/// straight line between the runs' ends. A joint gap lets the beam through, so the tissue
/// beneath it is lit against the bone ends' shadows; a gap over a continuing shadow is a
/// stretch of bone the classifier lost (weak or oblique), and a needle aimed into it would
/// meet bone. Gaps with nothing valid beneath them, or beside, are left open.
pub fn bridge_shadowed_gaps(s: &mut [Option<f32>], f: &Features, max_mm: f64) {
    let (h, _) = f.intensity.dim();
    let skip = (DEEP_SHADOW_GAP_MM / f.mm_per_px.1).round() as usize;
    let depth = (DEEP_SHADOW_MM / f.mm_per_px.1).round() as usize;
    let flank_cols = ((FLANK_MM / f.mm_per_px.0).round() as usize).max(1);
    let max_cols = (max_mm / f.mm_per_px.0).floor() as usize;
    // Sum and count of the valid intensities beneath `row` in column x.
    let beneath = |x: usize, row: f32, acc: &mut (f64, usize)| {
        let y0 = row.max(0.0).round() as usize + skip;
        for y in y0..(y0 + depth).min(h) {
            if f.valid[[y, x]] {
                acc.0 += f.intensity[[y, x]] as f64;
                acc.1 += 1;
            }
        }
    };
    let mut bridges = Vec::new();
    for pair in runs(s).windows(2) {
        let (left, right) = (&pair[0], &pair[1]);
        let (a, b) = (left.end - 1, right.start);
        let width = b - a - 1;
        if width == 0 || width > max_cols {
            continue;
        }
        let (ya, yb) = (s[a].unwrap_or(0.0), s[b].unwrap_or(0.0));
        let line = |x: usize| ya + (x - a) as f32 / (b - a) as f32 * (yb - ya);
        let mut under = (0.0, 0);
        for x in a + 1..b {
            beneath(x, line(x), &mut under);
        }
        let mut flanks = (0.0, 0);
        let flank = |r: &std::ops::Range<usize>| flank_cols.min(r.len());
        for x in (left.end - flank(left)..left.end).chain(right.start..right.start + flank(right)) {
            if let Some(y) = s[x] {
                beneath(x, y, &mut flanks);
            }
        }
        if under.1 == 0 || flanks.1 == 0 {
            continue;
        }
        let (under, flanks) = (under.0 / under.1 as f64, flanks.0 / flanks.1 as f64);
        if flanks > SHADOW_CONTRAST as f64 * under {
            bridges.push((a, b, ya, yb));
        }
    }
    for (a, b, ya, yb) in bridges {
        for (x, v) in s.iter_mut().enumerate().take(b).skip(a + 1) {
            *v = Some(ya + (x - a) as f32 / (b - a) as f32 * (yb - ya));
        }
    }
}

/// A bone surface echo is brighter than the soft tissue over it (bone is the strongest
/// reflector in MSK imaging): the mean within `ECHO_HALF_MM` of the surface must reach this
/// multiple of the mean `ABOVE_MM` above it. The lower edge of a thick bright layer over a
/// dark area is not bone.
const ECHO_CONTRAST: f32 = 1.05;
const ECHO_HALF_MM: f64 = 0.3;
const ABOVE_MM: (f64, f64) = (1.0, 3.0);

/// Drops runs whose echo is not brighter than the tissue above it (`ECHO_CONTRAST`), or
/// that have no tissue above them.
pub fn drop_runs_not_brighter_than_above(s: &mut [Option<f32>], f: &Features) {
    let (h, _) = f.intensity.dim();
    let px = |mm: f64| (mm / f.mm_per_px.1).round() as usize;
    let (half, a0, a1) = (px(ECHO_HALF_MM), px(ABOVE_MM.0), px(ABOVE_MM.1).max(1));
    for run in runs(s) {
        let (mut echo, mut ne, mut above, mut na) = (0.0f64, 0usize, 0.0f64, 0usize);
        for x in run.clone() {
            let Some(y) = s[x] else { continue };
            let y = (y.round() as usize).min(h - 1);
            for yy in y.saturating_sub(half)..=(y + half).min(h - 1) {
                if f.valid[[yy, x]] {
                    echo += f.intensity[[yy, x]] as f64;
                    ne += 1;
                }
            }
            for yy in y.saturating_sub(a1)..y.saturating_sub(a0) {
                if f.valid[[yy, x]] {
                    above += f.intensity[[yy, x]] as f64;
                    na += 1;
                }
            }
        }
        // No tissue over it (the run hugs the top of the image): skin and subcutis lie over
        // every bone, so this is the edge of the image or of a graphic, not bone.
        let dull = ne == 0 || na == 0 || {
            let (echo, above) = (echo / ne as f64, above / na as f64);
            echo < ECHO_CONTRAST as f64 * above
        };
        if dull {
            s[run].iter_mut().for_each(|v| *v = None);
        }
    }
}

/// The mean of `map` over the valid pixels from `DEEP_SHADOW_GAP_MM` to `DEEP_SHADOW_MM`
/// beneath the surface of `run` (`None` when none lies there).
fn mean_beneath(
    s: &[Option<f32>],
    run: std::ops::Range<usize>,
    map: &Array2<f32>,
    f: &Features,
) -> Option<f64> {
    let (h, _) = map.dim();
    let gap = (DEEP_SHADOW_GAP_MM / f.mm_per_px.1).round() as usize;
    let depth = (DEEP_SHADOW_MM / f.mm_per_px.1).round() as usize;
    let (mut sum, mut n) = (0.0f64, 0usize);
    for x in run {
        let Some(y) = s[x] else { continue };
        let y0 = y.round() as usize + gap;
        for yy in y0..(y0 + depth).min(h) {
            if f.valid[[yy, x]] {
                sum += map[[yy, x]] as f64;
                n += 1;
            }
        }
    }
    (n > 0).then(|| sum / n as f64)
}

/// Drops runs of the surface beneath which the image does not stay dark.
fn drop_unshadowed_runs(s: &mut [Option<f32>], f: &Features) {
    let level = f.tissue_level.max(1.0);
    for run in runs(s) {
        let beneath = mean_beneath(s, run.clone(), &f.intensity, f);
        if beneath.is_some_and(|m| m as f32 > DEEP_SHADOW_MAX * level) {
            s[run].iter_mut().for_each(|v| *v = None);
        }
    }
}

/// Bridges gaps in the surface narrower than `max_mm` by linear interpolation: a joint gap
/// between bone ends is at least about a millimetre wide (the `fluid` module's joint prior),
/// so a narrower break is a weak echo along one bone.
pub fn fill_narrow_gaps(s: &mut [Option<f32>], mm_per_col: f64, max_mm: f64) {
    let max_cols = (max_mm / mm_per_col).floor() as usize;
    let r = runs(s);
    for pair in r.windows(2) {
        let (a, b) = (pair[0].end - 1, pair[1].start);
        let gap = b - a - 1;
        if gap == 0 || gap > max_cols {
            continue;
        }
        let (ya, yb) = (s[a].unwrap_or(0.0), s[b].unwrap_or(0.0));
        for x in a + 1..b {
            let t = (x - a) as f32 / (b - a) as f32;
            s[x] = Some(ya + t * (yb - ya));
        }
    }
}

fn drop_short_runs(s: &mut [Option<f32>], mm_per_col: f64, min_mm: f64) {
    let min_cols = (min_mm / mm_per_col).ceil() as usize;
    for run in runs(s) {
        if run.len() < min_cols {
            s[run].iter_mut().for_each(|v| *v = None);
        }
    }
}

/// The surface at full resolution: per region column, the peak of the bone echo near the
/// grid's estimate, to sub-pixel precision by a parabola through the peak and its neighbours.
/// (The echo's peak lies about half a pulse length, under 0.1 mm, below the interface.)
pub fn refine(
    surface: &[Option<f32>],
    crop: &Array2<f32>,
    step: usize,
    _mm: (f64, f64),
) -> Vec<Option<f32>> {
    let (h, w) = crop.dim();
    (0..w)
        .map(|x| {
            let gy = (*surface.get(x / step)?)?;
            let centre = gy * step as f32 + (step as f32 - 1.0) / 2.0;
            let reach = step as f32 + 1.0;
            let lo = (centre - reach).floor().max(0.0) as usize;
            let hi = ((centre + reach).ceil() as usize).min(h - 1);
            let y = (lo..=hi).max_by(|a, b| crop[[*a, x]].total_cmp(&crop[[*b, x]]))?;
            if y == 0 || y + 1 >= h {
                return Some(y as f32);
            }
            let (a, b, c) = (crop[[y - 1, x]], crop[[y, x]], crop[[y + 1, x]]);
            let den = a - 2.0 * b + c;
            let offset = if den < 0.0 {
                (0.5 * (a - c) / den).clamp(-0.5, 0.5)
            } else {
                0.0
            };
            Some(y as f32 + offset)
        })
        .collect()
}

/// Labels the bone band and the shadow beneath it.
pub fn label_bone_and_shadow(
    surface: &[Option<f32>],
    valid: &Array2<bool>,
    mm: (f64, f64),
    labels: &mut Array2<u8>,
) {
    let (h, _) = labels.dim();
    // A row belongs to the band when its centre lies within [surface − above, surface +
    // below), measured from the sub-pixel surface (as the truth is rasterised); at least one
    // row is bone.
    let above = BAND_ABOVE_MM / mm.1;
    let below = (BAND_BELOW_MM / mm.1).max(0.5);
    for (x, s) in surface.iter().enumerate() {
        let Some(y) = s else { continue };
        let y = f64::from(*y);
        let first = (y - above).ceil().max(0.0) as usize;
        for yy in first..h {
            if !valid[[yy, x]] {
                continue;
            }
            labels[[yy, x]] = if (yy as f64) < y + below {
                Label::Bone.code()
            } else {
                Label::Shadow.code()
            };
        }
    }
}

/// Splits the surface into polylines (region px), breaking at gaps and jumps over 1 mm and
/// dropping pieces shorter than the minimum length.
pub fn polylines(
    surface: &[Option<f32>],
    mm: (f64, f64),
    params: &SegmentParams,
) -> Vec<Vec<[f64; 2]>> {
    let mut out: Vec<Vec<[f64; 2]>> = Vec::new();
    let mut cur: Vec<[f64; 2]> = Vec::new();
    let break_rows = POLYLINE_BREAK_MM / mm.1;
    for (x, s) in surface.iter().enumerate() {
        match s {
            Some(y) => {
                if let Some(last) = cur.last() {
                    if (last[1] - *y as f64).abs() > break_rows {
                        out.push(std::mem::take(&mut cur));
                    }
                }
                cur.push([x as f64, *y as f64]);
            }
            None => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    let min_cols = params.bone_min_length_mm / mm.0;
    out.into_iter()
        .filter(|l| l.len() as f64 >= min_cols)
        .collect()
}

/// Labels the bone band and the shadow beneath it along the beams of a fan: the shadow of a
/// convex probe runs away from the apex, not straight down. `fan` is in the coordinates of
/// `labels` (the region's crop, or the analysis grid).
pub fn label_bone_and_shadow_fan(
    surface: &[Option<f32>],
    valid: &Array2<bool>,
    mm: (f64, f64),
    fan: &crate::frame::Fan,
    labels: &mut Array2<u8>,
) {
    let pts: Vec<(f64, f64)> = surface
        .iter()
        .enumerate()
        .filter_map(|(x, s)| s.map(|y| fan.polar(x as f64 + 0.5, y as f64 + 0.5)))
        .collect();
    if pts.is_empty() {
        return;
    }
    // Beams binned by angle, half a pixel wide at the bone's mean radius; each bin keeps the
    // nearest bone along it.
    let r_mean = pts.iter().map(|p| p.0).sum::<f64>() / pts.len() as f64;
    let dtheta = 0.5 / r_mean.max(1.0);
    let t0 = fan.theta_left;
    let bins = (((fan.theta_right - t0) / dtheta).ceil() as usize).clamp(1, 1 << 16);
    let mut near: Vec<Option<f64>> = vec![None; bins];
    let bin = |t: f64| ((t - t0) / dtheta).floor().clamp(0.0, (bins - 1) as f64) as usize;
    for w in pts.windows(2).chain(std::iter::once(&pts[pts.len() - 1..])) {
        // Fill the bins between neighbouring columns' points (a beam falls between them).
        let (a, b) = (w[0], *w.last().unwrap_or(&w[0]));
        let (ia, ib) = (bin(a.1), bin(b.1));
        let joined = (a.0 - b.0).abs() * mm.1 <= POLYLINE_BREAK_MM && ia.abs_diff(ib) <= 4;
        let (lo, hi) = if joined {
            (ia.min(ib), ia.max(ib))
        } else {
            (ia, ia)
        };
        for (k, slot) in near.iter_mut().enumerate().take(hi + 1).skip(lo) {
            let f = if hi > lo {
                (k - lo) as f64 / (hi - lo) as f64
            } else {
                0.0
            };
            let r = if ia <= ib {
                a.0 + f * (b.0 - a.0)
            } else {
                b.0 + f * (a.0 - b.0)
            };
            *slot = Some(slot.map_or(r, |s| s.min(r)));
        }
    }
    let above = BAND_ABOVE_MM / mm.1;
    let below = (BAND_BELOW_MM / mm.1).max(1.0);
    for ((y, x), l) in labels.indexed_iter_mut() {
        if *l == Label::Bone.code() || *l == Label::Shadow.code() {
            *l = Label::Background.code();
        }
        if !valid[[y, x]] {
            continue;
        }
        let (r, t) = fan.polar(x as f64 + 0.5, y as f64 + 0.5);
        if t < fan.theta_left || t > fan.theta_right {
            continue;
        }
        let Some(rb) = near[bin(t)] else { continue };
        if r >= rb + below {
            *l = Label::Shadow.code();
        } else if r >= rb - above {
            *l = Label::Bone.code();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 0.1 mm grid 200 rows × 300 columns of tissue at 100, with a bone surface at row 50
    /// over columns 20..280 except `gap`, its shadow (20) beneath every bone column, and
    /// beneath the gap either the shadow going on (`lit` false) or tissue (`lit` true).
    fn scene(gap: std::ops::Range<usize>, lit: bool) -> (Features, Vec<Option<f32>>) {
        let (h, w) = (200, 300);
        let mut intensity = Array2::<f32>::from_elem((h, w), 100.0);
        let mut s = vec![None; w];
        for x in 20..280 {
            let in_gap = gap.contains(&x);
            if !in_gap {
                s[x] = Some(50.0);
            }
            for y in 52..h {
                if !in_gap || !lit {
                    intensity[[y, x]] = 20.0;
                }
            }
        }
        let zeros = Array2::<f32>::zeros((h, w));
        let f = Features {
            intensity,
            phase_symmetry: zeros.clone(),
            below: zeros.clone(),
            coherence: zeros.clone(),
            orientation: zeros,
            valid: Array2::from_elem((h, w), true),
            valid_full: Array2::from_elem((h, w), true),
            step: 1,
            mm_per_px: (0.1, 0.1),
            tissue_level: 100.0,
            probabilities: None,
            first_stage: None,
        };
        (f, s)
    }

    #[test]
    fn a_gap_over_a_continuing_shadow_is_bridged_and_a_lit_gap_is_not() {
        // 4 mm gap with the shadow going on beneath it: bone the classifier lost.
        let (f, mut s) = scene(130..170, false);
        bridge_shadowed_gaps(&mut s, &f, 15.0);
        assert!((130..170).all(|x| s[x] == Some(50.0)), "{:?}", &s[125..175]);
        // The same gap lit beneath (the beam passes between two bone ends): a joint, kept.
        let (f, mut s) = scene(130..170, true);
        bridge_shadowed_gaps(&mut s, &f, 15.0);
        assert!((130..170).all(|x| s[x].is_none()));
        assert_eq!(s[129], Some(50.0));
        // Wider than the widest joint gap allowed: left alone whatever lies beneath.
        let (f, mut s) = scene(100..200, false);
        bridge_shadowed_gaps(&mut s, &f, 5.0);
        assert!((100..200).all(|x| s[x].is_none()));
    }
}
