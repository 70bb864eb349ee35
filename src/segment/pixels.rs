//! The pixel classifier: per analysis-grid pixel, a small multilayer perceptron over
//! hand-made, gain-invariant features gives the probability of each label.
//!
//! Features (see [`FEATURE_NAMES`]) are computed on the frame's rank transform (each
//! despeckled value replaced by its share of the frame's valid pixels that are darker), so a
//! gain change or another dynamic range, which move grey levels monotonically, leave them
//! almost unchanged. Window sizes are in millimetres, so probes and depths of any pixel size
//! give the same features. Around each pixel they describe brightness at three scales,
//! texture, elongation along and across the beam, what lies above (the brightest reflector
//! higher in the column: shadows) and beneath (a reflector a few millimetres down: fluid
//! over bone), the depth, and the feature kernels' outputs (phase symmetry, coherence, the
//! mean beneath).
//!
//! The weights are trained by `sonoguide train-pixels` (`crate::sim::train`) on simulated
//! frames of the tuning sets, read through the DICOM reader; the shipped model is
//! `models/pixel_mlp.json`, described in `models/README.md`. Inference runs here on the CPU
//! ([`probabilities_cpu`]) and as the `pixel_mlp.wgsl` compute shader on the GPU.

use ndarray::Array2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::Features;
use crate::label::Label;

/// Number of features per pixel.
pub const FEATURES: usize = 20;
/// Number of classes (every label, background included, in code order).
pub const CLASSES: usize = Label::ALL.len();

/// The features, in the order of the model's inputs.
pub const FEATURE_NAMES: [&str; FEATURES] = [
    "rank",
    "rank_mean_0.5mm",
    "rank_mean_1.5mm",
    "rank_mean_4mm",
    "rank_std_1mm",
    "rank_mean_wide_3x0.4mm",
    "rank_mean_tall_0.4x3mm",
    "above_mean_0.5-3mm",
    "below_mean_0.5-3mm",
    "above_max_from_1mm",
    "below_max_0.5-8mm",
    "below_mean_from_1mm",
    "depth_30mm",
    "phase_symmetry",
    "coherence",
    "coherence_horizontal",
    "shadow_kernel_rank",
    "above_mean_all",
    "ridge_1mm",
    "valid_share_1.5mm",
];

/// Bins of the rank transform's histogram (enough that neighbouring grey levels of an 8-bit
/// image fall in different bins).
const RANK_BINS: usize = 1024;
/// Depth scale of the depth feature, mm (the middle of MSK imaging depths).
const DEPTH_SCALE_MM: f64 = 30.0;

/// A trained pixel classifier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PixelModel {
    /// Format version.
    pub version: u32,
    /// Feature names, which must equal [`FEATURE_NAMES`].
    pub features: Vec<String>,
    /// Class names, in label code order.
    pub classes: Vec<String>,
    /// Per-feature mean subtracted before the first layer.
    pub mean: Vec<f32>,
    /// Per-feature scale the centred feature is multiplied by.
    pub scale: Vec<f32>,
    /// Dense layers; every layer but the last is followed by a ReLU, the last by a softmax.
    pub layers: Vec<Dense>,
    /// How the weights were made (command, seed, data), for the model card.
    #[serde(default)]
    pub provenance: serde_json::Value,
}

/// One dense layer: `out = w · in + b`, `w` row-major (`outputs × inputs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dense {
    /// Inputs.
    pub inputs: usize,
    /// Outputs.
    pub outputs: usize,
    /// Weights, row-major, `outputs × inputs`.
    pub w: Vec<f32>,
    /// Biases.
    pub b: Vec<f32>,
}

/// Why a model file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("pixel model: {0}")]
pub struct ModelError(pub String);

impl PixelModel {
    /// Parses and checks a model's JSON.
    pub fn from_json(text: &str) -> Result<PixelModel, ModelError> {
        let m: PixelModel =
            serde_json::from_str(text).map_err(|e| ModelError(format!("not a model: {e}")))?;
        m.check()?;
        Ok(m)
    }

    /// Checks the shapes against the features and classes this build computes.
    pub fn check(&self) -> Result<(), ModelError> {
        if self.features != FEATURE_NAMES {
            return Err(ModelError(format!(
                "features {:?} differ from this build's {:?}",
                self.features, FEATURE_NAMES
            )));
        }
        let names: Vec<&str> = Label::ALL.iter().map(|l| l.name()).collect();
        if self.classes != names {
            return Err(ModelError(format!(
                "classes {:?} differ from {:?}",
                self.classes, names
            )));
        }
        if self.mean.len() != FEATURES || self.scale.len() != FEATURES {
            return Err(ModelError("mean/scale length".into()));
        }
        let mut width = FEATURES;
        for (i, l) in self.layers.iter().enumerate() {
            if l.inputs != width
                || l.w.len() != l.inputs * l.outputs
                || l.b.len() != l.outputs
                || l.outputs == 0
                || l.outputs > MAX_WIDTH
            {
                return Err(ModelError(format!("layer {i} has inconsistent shapes")));
            }
            width = l.outputs;
        }
        if width != CLASSES || self.layers.is_empty() {
            return Err(ModelError(format!("last layer has {width} outputs")));
        }
        let all = self
            .mean
            .iter()
            .chain(&self.scale)
            .chain(self.layers.iter().flat_map(|l| l.w.iter().chain(&l.b)));
        if all.clone().any(|v| !v.is_finite()) {
            return Err(ModelError("non-finite weight".into()));
        }
        Ok(())
    }

    /// The model shipped with this build (`models/pixel_mlp.json`).
    pub fn builtin() -> &'static PixelModel {
        static MODEL: std::sync::OnceLock<PixelModel> = std::sync::OnceLock::new();
        MODEL.get_or_init(|| {
            // Checked by the test suite (`builtin_model_loads`): a build whose model does not
            // fit its features must not pass.
            PixelModel::from_json(include_str!("../../models/pixel_mlp.json"))
                .expect("models/pixel_mlp.json fits this build")
        })
    }

    /// Widest layer.
    pub fn max_width(&self) -> usize {
        self.layers.iter().map(|l| l.outputs).max().unwrap_or(0)
    }

    /// Class probabilities of one feature vector (`x` is overwritten with the standardised
    /// inputs; `a`, `b` are scratch of at least [`MAX_WIDTH`]).
    pub fn forward(&self, x: &mut [f32], a: &mut [f32], b: &mut [f32]) -> [f32; CLASSES] {
        for ((v, m), s) in x.iter_mut().zip(&self.mean).zip(&self.scale) {
            *v = (*v - m) * s;
        }
        a[..FEATURES].copy_from_slice(&x[..FEATURES]);
        let (mut a, mut b) = (a, b);
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            for o in 0..l.outputs {
                let row = &l.w[o * l.inputs..(o + 1) * l.inputs];
                let mut s = l.b[o];
                for (w, v) in row.iter().zip(&a[..l.inputs]) {
                    s += w * v;
                }
                b[o] = if i < last { s.max(0.0) } else { s };
            }
            std::mem::swap(&mut a, &mut b);
        }
        softmax(&a[..CLASSES])
    }
}

/// Widest layer a model may have (the GPU shader's scratch size).
pub const MAX_WIDTH: usize = 64;

fn softmax(z: &[f32]) -> [f32; CLASSES] {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p = [0f32; CLASSES];
    let mut sum = 0.0;
    for (p, z) in p.iter_mut().zip(z) {
        *p = (z - m).exp();
        sum += *p;
    }
    for p in &mut p {
        *p /= sum;
    }
    p
}

/// Integral image of a grid (f64 sums, `(h+1) × (w+1)`).
struct Integral {
    s: Vec<f64>,
    w1: usize,
}

impl Integral {
    fn new(h: usize, w: usize, v: impl Fn(usize, usize) -> f64) -> Integral {
        let w1 = w + 1;
        let mut s = vec![0.0; (h + 1) * w1];
        for y in 0..h {
            let mut row = 0.0;
            for x in 0..w {
                row += v(y, x);
                s[(y + 1) * w1 + x + 1] = s[y * w1 + x + 1] + row;
            }
        }
        Integral { s, w1 }
    }

    /// Sum over rows `y0..y1`, columns `x0..x1` (half-open, already clamped).
    fn sum(&self, y0: usize, y1: usize, x0: usize, x1: usize) -> f64 {
        let w1 = self.w1;
        self.s[y1 * w1 + x1] - self.s[y0 * w1 + x1] - self.s[y1 * w1 + x0] + self.s[y0 * w1 + x0]
    }
}

/// Masked box means over the valid pixels of a grid.
struct Boxes {
    u: Integral,
    uu: Integral,
    m: Integral,
    h: usize,
    w: usize,
}

impl Boxes {
    /// Window of half-sizes `(ry, rx)` around `(y, x)`: the mean of `u`, the mean of `u²`,
    /// and the number of valid pixels.
    fn at(&self, y: usize, x: usize, ry: usize, rx: usize) -> (f64, f64, f64) {
        let (y0, y1) = (y.saturating_sub(ry), (y + ry + 1).min(self.h));
        let (x0, x1) = (x.saturating_sub(rx), (x + rx + 1).min(self.w));
        let n = self.m.sum(y0, y1, x0, x1);
        if n <= 0.0 {
            return (0.0, 0.0, 0.0);
        }
        (
            self.u.sum(y0, y1, x0, x1) / n,
            self.uu.sum(y0, y1, x0, x1) / n,
            n / ((y1 - y0) * (x1 - x0)) as f64,
        )
    }
}

/// The rank transform of `v` over the valid pixels: a monotone map to 0..1.
fn rank_map(v: &Array2<f32>, valid: &Array2<bool>) -> impl Fn(f32) -> f32 {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for (x, ok) in v.iter().zip(valid) {
        if *ok && x.is_finite() {
            lo = lo.min(*x);
            hi = hi.max(*x);
        }
    }
    if lo >= hi {
        (lo, hi) = (0.0, 1.0);
    }
    let width = (hi - lo) / RANK_BINS as f32;
    let mut cdf = vec![0f64; RANK_BINS + 1];
    let mut total = 0.0;
    for (x, ok) in v.iter().zip(valid) {
        if *ok && x.is_finite() {
            let b = (((x - lo) / width) as usize).min(RANK_BINS - 1);
            cdf[b + 1] += 1.0;
            total += 1.0;
        }
    }
    for i in 1..=RANK_BINS {
        cdf[i] += cdf[i - 1];
    }
    let total = if total > 0.0 { total } else { 1.0 };
    let cdf: Vec<f32> = cdf.iter().map(|c| (c / total) as f32).collect();
    move |x: f32| {
        if !x.is_finite() {
            return 0.0;
        }
        // Linear within the bin: the share darker than x.
        let t = ((x - lo) / width).clamp(0.0, RANK_BINS as f32);
        let b = (t as usize).min(RANK_BINS - 1);
        let f = t - b as f32;
        cdf[b] + f * (cdf[b + 1] - cdf[b])
    }
}

/// Pixels of `mm` millimetres at `mm_per_px`, at least `min`.
fn px(mm: f64, mm_per_px: f64, min: usize) -> usize {
    ((mm / mm_per_px).round() as usize).max(min)
}

/// Sliding maximum over a column window `[y + a, y + b]` (clamped), for every `y`.
fn window_max(col: &[f32], a: usize, b: usize) -> Vec<f32> {
    let h = col.len();
    let mut out = vec![0f32; h];
    let mut dq: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    let mut next = 0usize;
    for (y, o) in out.iter_mut().enumerate() {
        let (lo, hi) = (y + a, (y + b).min(h.saturating_sub(1)));
        while next <= hi && next < h {
            while dq.back().is_some_and(|&j| col[j] <= col[next]) {
                dq.pop_back();
            }
            dq.push_back(next);
            next += 1;
        }
        while dq.front().is_some_and(|&j| j < lo) {
            dq.pop_front();
        }
        *o = if lo > hi {
            0.0
        } else {
            dq.front().map_or(0.0, |&j| col[j])
        };
    }
    out
}

/// The feature vectors of every grid pixel, feature-major (`FEATURES × h·w`, row-major
/// pixels). Invalid pixels get features too (they are not classified).
pub fn pixel_features(f: &Features) -> Vec<f32> {
    let (h, w) = f.intensity.dim();
    let n = h * w;
    let mut out = vec![0f32; FEATURES * n];
    if n == 0 {
        return out;
    }
    let (mmx, mmy) = f.mm_per_px;
    let rank = rank_map(&f.intensity, &f.valid);
    let m = f.valid.mapv(|v| if v { 1.0f32 } else { 0.0 });
    let u = Array2::from_shape_fn((h, w), |(y, x)| {
        if f.valid[[y, x]] {
            rank(f.intensity[[y, x]])
        } else {
            0.0
        }
    });
    let boxes = Boxes {
        u: Integral::new(h, w, |y, x| u[[y, x]] as f64),
        uu: Integral::new(h, w, |y, x| (u[[y, x]] * u[[y, x]]) as f64),
        m: Integral::new(h, w, |y, x| m[[y, x]] as f64),
        h,
        w,
    };
    let r = |mm: f64| (px(mm, mmy, 1), px(mm, mmx, 1));
    let (r05, r1, r15, r4) = (r(0.5), r(1.0), r(1.5), r(4.0));
    let wide = (px(0.4, mmy, 1), px(3.0, mmx, 1));
    let tall = (px(0.4, mmx, 1), px(3.0, mmy, 1));
    let u1 = Array2::from_shape_fn((h, w), |(y, x)| boxes.at(y, x, r05.0, r05.1).0 as f32);
    // Columns: prefix sums of the smoothed rank and of validity, the running maximum from the
    // top, and the maximum in a window beneath.
    let (d05, d1, d3, d8) = (
        px(0.5, mmy, 1),
        px(1.0, mmy, 1),
        px(3.0, mmy, 2),
        px(8.0, mmy, 2),
    );
    let columns: Vec<[Vec<f32>; 6]> = (0..w)
        .into_par_iter()
        .map(|x| {
            let col: Vec<f32> = (0..h)
                .map(|y| if f.valid[[y, x]] { u1[[y, x]] } else { 0.0 })
                .collect();
            let mut ps = vec![0f64; h + 1];
            let mut pm = vec![0f64; h + 1];
            for y in 0..h {
                ps[y + 1] = ps[y] + col[y] as f64;
                pm[y + 1] = pm[y] + m[[y, x]] as f64;
            }
            let mean = |a: isize, b: isize| -> f32 {
                let a = a.clamp(0, h as isize) as usize;
                let b = b.clamp(0, h as isize) as usize;
                if b <= a || pm[b] - pm[a] <= 0.0 {
                    0.0
                } else {
                    ((ps[b] - ps[a]) / (pm[b] - pm[a])) as f32
                }
            };
            let mut above = vec![0f32; h];
            let mut below = vec![0f32; h];
            let mut deep = vec![0f32; h];
            let mut above_all = vec![0f32; h];
            let mut running = vec![0f32; h];
            let mut mx = 0f32;
            for y in 0..h {
                let yi = y as isize;
                above[y] = mean(yi - d3 as isize, yi - d05 as isize + 1);
                below[y] = mean(yi + d05 as isize, yi + d3 as isize + 1);
                deep[y] = mean(yi + d1 as isize, h as isize);
                above_all[y] = mean(0, yi);
                running[y] = mx;
                mx = mx.max(col[y]);
            }
            // Max above from 1 mm up: the running maximum d1 rows higher.
            let max_above: Vec<f32> = (0..h)
                .map(|y| if y >= d1 { running[y + 1 - d1] } else { 0.0 })
                .collect();
            let max_below = window_max(&col, d05, d8);
            [above, below, deep, above_all, max_above, max_below]
        })
        .collect();
    let below_rank = rank_map(&f.below, &f.valid);
    let chunks: Vec<(usize, Vec<[f32; FEATURES]>)> = (0..h)
        .into_par_iter()
        .map(|y| {
            let row: Vec<[f32; FEATURES]> = (0..w)
                .map(|x| {
                    let c = &columns[x];
                    let (b15, _, vshare) = boxes.at(y, x, r15.0, r15.1);
                    let (b1, bb1, _) = boxes.at(y, x, r1.0, r1.1);
                    let ridge_at = |dy: isize| {
                        let yy = (y as isize + dy).clamp(0, h as isize - 1) as usize;
                        u1[[yy, x]]
                    };
                    let ridge =
                        u1[[y, x]] - 0.5 * (ridge_at(-(d1 as isize)) + ridge_at(d1 as isize));
                    let coh = f.coherence[[y, x]];
                    [
                        u[[y, x]],
                        u1[[y, x]],
                        b15 as f32,
                        boxes.at(y, x, r4.0, r4.1).0 as f32,
                        (bb1 - b1 * b1).max(0.0).sqrt() as f32,
                        boxes.at(y, x, wide.0, wide.1).0 as f32,
                        boxes.at(y, x, tall.1, tall.0).0 as f32,
                        c[0][y],
                        c[1][y],
                        c[4][y],
                        c[5][y],
                        c[2][y],
                        (y as f64 * mmy / DEPTH_SCALE_MM) as f32,
                        f.phase_symmetry[[y, x]],
                        coh,
                        coh * f.orientation[[y, x]].cos().abs(),
                        below_rank(f.below[[y, x]]),
                        c[3][y],
                        ridge,
                        vshare as f32,
                    ]
                })
                .collect();
            (y, row)
        })
        .collect();
    for (y, row) in chunks {
        for (x, v) in row.into_iter().enumerate() {
            let i = y * w + x;
            for (k, val) in v.into_iter().enumerate() {
                out[k * n + i] = if val.is_finite() { val } else { 0.0 };
            }
        }
    }
    out
}

/// Class probabilities of every valid grid pixel (`CLASSES × h·w`, class-major; invalid
/// pixels get background 1).
pub fn probabilities_cpu(model: &PixelModel, features: &[f32], valid: &Array2<bool>) -> Vec<f32> {
    let n = valid.len();
    let mut out = vec![0f32; CLASSES * n];
    let valid = valid.as_slice_memory_order().map(|v| v.to_vec()).unwrap_or_else(|| valid.iter().copied().collect());
    const CHUNK: usize = 4096;
    let parts: Vec<(usize, Vec<[f32; CLASSES]>)> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let (a0, a1) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            let mut x = [0f32; FEATURES];
            let mut sa = vec![0f32; MAX_WIDTH.max(FEATURES)];
            let mut sb = vec![0f32; MAX_WIDTH.max(FEATURES)];
            let ps = (a0..a1)
                .map(|i| {
                    if !valid[i] {
                        let mut p = [0f32; CLASSES];
                        p[0] = 1.0;
                        return p;
                    }
                    for (k, v) in x.iter_mut().enumerate() {
                        *v = features[k * n + i];
                    }
                    model.forward(&mut x, &mut sa, &mut sb)
                })
                .collect();
            (a0, ps)
        })
        .collect();
    for (a0, ps) in parts {
        for (j, p) in ps.into_iter().enumerate() {
            for (k, v) in p.into_iter().enumerate() {
                out[k * n + a0 + j] = v;
            }
        }
    }
    out
}

/// One class's probabilities as a grid.
pub fn class_map(probs: &[f32], dim: (usize, usize), label: Label) -> Array2<f32> {
    let n = dim.0 * dim.1;
    let k = label.code() as usize;
    Array2::from_shape_vec(dim, probs[k * n..(k + 1) * n].to_vec())
        .expect("probabilities of the grid's size")
}

/// Smallest areas kept of the soft-tissue labels, mm², from the smallest structures an MSK
/// injection meets: tendons of the fingers and wrist about 1 mm thick over several mm
/// (Kirschenbaum 2009, rough guide to 1–4 mm flexor/extensor tendon thickness), the 1 mm³-scale
/// smallest effusions graded on ultrasound (a recess of 1 mm depth over 1 mm), vessels from
/// 1 mm diameter (digital arteries 1.0–1.5 mm, Leijnse 1997), nerves from about 1.5 mm
/// (digital nerves, 1.5–2 mm across; Bianchi & Martinoli, "Ultrasound of the
/// Musculoskeletal System", 2007).
const MIN_AREA_MM2: [(Label, f64); 4] = [
    (Label::Tendon, 2.0),
    (Label::Joint, 1.0),
    (Label::Vessel, 0.8),
    (Label::Nerve, 1.5),
];

/// The soft-tissue labels of the grid (tendon, joint / effusion, vessel, nerve) where each is
/// the most probable class, without components smaller than the structure can be.
pub fn soft_tissue(probs: &[f32], f: &Features) -> Array2<u8> {
    let dim = f.intensity.dim();
    let n = dim.0 * dim.1;
    let best = Array2::from_shape_fn(dim, |(y, x)| {
        let i = y * dim.1 + x;
        if !f.valid[[y, x]] {
            return Label::Background.code();
        }
        let mut arg = 0usize;
        for k in 1..CLASSES {
            if probs[k * n + i] > probs[arg * n + i] {
                arg = k;
            }
        }
        arg as u8
    });
    let mut out = Array2::<u8>::zeros(dim);
    let px_mm2 = f.mm_per_px.0 * f.mm_per_px.1;
    for (label, min_mm2) in MIN_AREA_MM2 {
        let mask = best.mapv(|l| l == label.code());
        for c in super::components::components(&mask) {
            if c.area() as f64 * px_mm2 >= min_mm2 {
                for &(y, x) in &c.pixels {
                    out[[y, x]] = label.code();
                }
            }
        }
    }
    out
}
