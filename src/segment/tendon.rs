//! Tendons (label 1): hyperechoic fibrillar bands. Pixels whose brightness, smoothed along the
//! fibres, exceeds the tissue level, superficial to bone and below the skin, grouped into bands
//! at least 3 mm long and 0.8 mm thick whose structure is, on average, coherent and oriented
//! near the skin line (horizontal in the image).

use ndarray::Array2;

use super::components::{components, morph, open_close};
use super::Features;
use crate::label::Label;

/// Smoothing along and across the fibres before thresholding, mm.
const SMOOTH_ALONG_MM: f64 = 0.8;
const SMOOTH_ACROSS_MM: f64 = 0.15;
/// Brighter than the tissue level by this factor.
const BRIGHTNESS_RATIO: f32 = 1.2;
/// Coherence at least.
const MIN_COHERENCE: f32 = 0.12;
/// Orientation within this many degrees of horizontal.
const MAX_TILT_DEG: f32 = 25.0;
/// Skin and subcutaneous layer skipped, mm.
const SKIN_MM: f64 = 1.2;
/// Bands shorter than this are not tendons, mm.
const MIN_LENGTH_MM: f64 = 3.0;
/// Bands thinner than this (median per column) are septa or skin, not tendons, mm.
const MIN_THICKNESS_MM: f64 = 0.8;
/// A tendon's top lies at least this deep below the top of the image, mm (skin and
/// subcutaneous tissue above it).
const MIN_DEPTH_MM: f64 = 2.0;
/// Clearance kept above bone, mm.
const ABOVE_BONE_MM: f64 = 0.8;

/// Labels tendon pixels in the region.
/// `step` is the size of a pixel of `img` in pixels of the feature grid `f` (1 when `img` is
/// the grid itself).
#[allow(clippy::too_many_arguments)]
pub fn label_tendon(
    img: &Array2<f32>,
    f: &Features,
    valid: &Array2<bool>,
    surface: &[Option<f32>],
    mm: (f64, f64),
    step: usize,
    labels: &mut Array2<u8>,
) {
    let (h, w) = img.dim();
    let level = f.tissue_level;
    let skin = (SKIN_MM / mm.1) as usize;
    let clearance = (ABOVE_BONE_MM / mm.1) as f32;
    let (gh, gw) = f.coherence.dim();
    let max_tilt = MAX_TILT_DEG.to_radians();
    // Brightness smoothed along the fibres (horizontal) more than across them.
    let smooth = box_blur(
        img,
        ((SMOOTH_ALONG_MM / mm.0) as usize).max(1),
        ((SMOOTH_ACROSS_MM / mm.1) as usize).max(1),
    );
    let candidate = Array2::from_shape_fn((h, w), |(y, x)| {
        if !valid[[y, x]] || labels[[y, x]] != Label::Background.code() || y < skin {
            return false;
        }
        if surface[x].is_some_and(|s| y as f32 > s - clearance) {
            return false;
        }
        smooth[[y, x]] > BRIGHTNESS_RATIO * level
    });
    let r = ((0.15 / mm.1).round() as usize).max(1);
    let cleaned = open_close(&candidate, r);
    // Fill each column between a band's top and bottom, then keep long, thick bands.
    let min_cols = (MIN_LENGTH_MM / mm.0) as usize;
    let min_rows = (MIN_THICKNESS_MM / mm.1) as usize;
    let mut keep = Array2::from_elem((h, w), false);
    let valid_top: Vec<Option<usize>> = (0..w).map(|x| (0..h).find(|y| valid[[*y, x]])).collect();
    for c in components(&cleaned) {
        let (_, ew) = c.extent();
        if ew < min_cols {
            continue;
        }
        // Fibrillar: coherent structure, oriented near the skin line, on average.
        let n = c.area() as f32;
        let (mut coh, mut tilt) = (0.0f32, 0.0f32);
        for &(y, x) in &c.pixels {
            let (gy, gx) = ((y / step).min(gh - 1), (x / step).min(gw - 1));
            coh += f.coherence[[gy, gx]];
            tilt += f.orientation[[gy, gx]].abs();
        }
        if coh / n < MIN_COHERENCE || tilt / n > max_tilt {
            continue;
        }
        // Tendons lie beneath the skin and subcutaneous layer: a band starting at the top of
        // the image (the near field, the skin itself) is not one.
        let mut top_of: Vec<usize> = vec![usize::MAX; w];
        for &(y, x) in &c.pixels {
            top_of[x] = top_of[x].min(y);
        }
        let mut starts: Vec<usize> = Vec::new();
        for (x, t) in top_of.iter().enumerate() {
            if *t != usize::MAX {
                let image_top = valid_top[x].unwrap_or(0);
                starts.push(t.saturating_sub(image_top));
            }
        }
        starts.sort_unstable();
        if starts.is_empty() || (starts[starts.len() / 2] as f64) * mm.1 < MIN_DEPTH_MM {
            continue;
        }
        let mut per_col: Vec<(usize, usize)> = vec![(usize::MAX, 0); w];
        for &(y, x) in &c.pixels {
            per_col[x] = (per_col[x].0.min(y), per_col[x].1.max(y));
        }
        let mut thick: Vec<usize> = per_col
            .iter()
            .filter(|(a, _)| *a != usize::MAX)
            .map(|(a, b)| b - a + 1)
            .collect();
        thick.sort_unstable();
        if thick.is_empty() || thick[thick.len() / 2] < min_rows {
            continue;
        }
        for (x, (a, b)) in per_col.iter().enumerate() {
            if *a == usize::MAX {
                continue;
            }
            for y in *a..=*b {
                if valid[[y, x]] && labels[[y, x]] == Label::Background.code() {
                    keep[[y, x]] = true;
                }
            }
        }
    }
    let keep = morph(&morph(&keep, 1, false), 1, true);
    for ((y, x), k) in keep.indexed_iter() {
        if *k && labels[[y, x]] == Label::Background.code() && valid[[y, x]] {
            labels[[y, x]] = Label::Tendon.code();
        }
    }
}

/// Box blur with half-widths `rx` (along rows) and `ry` (down columns), edges clipped, by
/// running sums; both passes walk memory row by row.
fn box_blur(img: &Array2<f32>, rx: usize, ry: usize) -> Array2<f32> {
    let (h, w) = img.dim();
    let src: Vec<f32> = img.iter().copied().collect();
    let mut tmp = vec![0f32; w * h];
    let mut prefix = vec![0f64; w + 1];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for x in 0..w {
            prefix[x + 1] = prefix[x] + row[x] as f64;
        }
        for x in 0..w {
            let (a, b) = (x.saturating_sub(rx), (x + rx + 1).min(w));
            tmp[y * w + x] = ((prefix[b] - prefix[a]) / (b - a) as f64) as f32;
        }
    }
    let mut sum = vec![0f64; w];
    for y in 0..ry.min(h) {
        for x in 0..w {
            sum[x] += tmp[y * w + x] as f64;
        }
    }
    let mut out = vec![0f32; w * h];
    for y in 0..h {
        if y + ry < h {
            for x in 0..w {
                sum[x] += tmp[(y + ry) * w + x] as f64;
            }
        }
        if y > ry {
            for x in 0..w {
                sum[x] -= tmp[(y - ry - 1) * w + x] as f64;
            }
        }
        let n = ((y + ry + 1).min(h) - y.saturating_sub(ry)) as f64;
        for x in 0..w {
            out[y * w + x] = (sum[x] / n) as f32;
        }
    }
    Array2::from_shape_vec((h, w), out).unwrap_or_else(|_| Array2::zeros((h, w)))
}
