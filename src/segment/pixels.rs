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
pub const FEATURES: usize = 22;
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
    "rank_mean_2.5mm",
    "rank_mean_8mm",
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

/// Sums of `v` (row-major, `h × w`) over the window of half-sizes `(ry, rx)` around every
/// pixel, clipped to the grid: a horizontal then a vertical running sum, so the cost does not
/// depend on the window.
fn box_sums(v: &[f32], h: usize, w: usize, ry: usize, rx: usize) -> Vec<f32> {
    let mut hs = vec![0f32; h * w];
    for (row, out) in v.chunks_exact(w).zip(hs.chunks_exact_mut(w)) {
        // Prefix sums in f64 so that long rows keep their precision.
        let mut prefix = Vec::with_capacity(w + 1);
        prefix.push(0f64);
        let mut acc = 0f64;
        for &x in row {
            acc += x as f64;
            prefix.push(acc);
        }
        for (x, o) in out.iter_mut().enumerate() {
            let (x0, x1) = (x.saturating_sub(rx), (x + rx + 1).min(w));
            *o = (prefix[x1] - prefix[x0]) as f32;
        }
    }
    let mut out = vec![0f32; h * w];
    vertical_sums(&hs, &mut out, h, w, ry);
    out
}

crate::simd::multiversion! {
    /// Vertical running sums of the rows of `hs` over `±ry` rows (clipped) into `out`.
    fn vertical_sums(hs: &[f32], out: &mut [f32], h: usize, w: usize, ry: usize) {
        // acc holds the sum of rows lo..hi (half-open); the window sums are small (a few
        // hundred values of at most 1), so f32 running sums stay exact to about 1e-5.
        let mut acc = vec![0f32; w];
        let (mut lo, mut hi) = (0usize, 0usize);
        for y in 0..h {
            let (y0, y1) = (y.saturating_sub(ry), (y + ry + 1).min(h));
            while hi < y1 {
                for (a, v) in acc.iter_mut().zip(&hs[hi * w..(hi + 1) * w]) {
                    *a += *v;
                }
                hi += 1;
            }
            while lo < y0 {
                for (a, v) in acc.iter_mut().zip(&hs[lo * w..(lo + 1) * w]) {
                    *a -= *v;
                }
                lo += 1;
            }
            out[y * w..(y + 1) * w].copy_from_slice(&acc);
        }
    }
}

/// Means over the valid pixels of windows of half-sizes `(ry, rx)`: `um` is the value times
/// validity, `ms` the window sums of validity.
fn box_means(um: &[f32], ms: &[f32], h: usize, w: usize, ry: usize, rx: usize) -> Vec<f32> {
    box_sums(um, h, w, ry, rx)
        .into_iter()
        .zip(ms)
        .map(|(s, m)| if *m > 0.5 { s / m } else { 0.0 })
        .collect()
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

/// |cos θ| for an orientation θ in [−π/2, π/2] (the coherence kernel's range), to about 1e-3
/// (Taylor series to the 8th power; angles outside are folded in first).
fn abs_cos(theta: f32) -> f32 {
    use std::f32::consts::{FRAC_PI_2, PI};
    let mut t = theta.abs() % PI;
    if t > FRAC_PI_2 {
        t = PI - t;
    }
    let t2 = t * t;
    let c = 1.0 - t2 / 2.0 * (1.0 - t2 / 12.0 * (1.0 - t2 / 30.0 * (1.0 - t2 / 56.0)));
    c.clamp(0.0, 1.0)
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
    let valid: Vec<bool> = f.valid.iter().copied().collect();
    let m: Vec<f32> = valid.iter().map(|v| if *v { 1.0 } else { 0.0 }).collect();
    let rank = rank_map(&f.intensity, &f.valid);
    let u: Vec<f32> = f
        .intensity
        .iter()
        .zip(&valid)
        .map(|(v, ok)| if *ok { rank(*v) } else { 0.0 })
        .collect();
    let uu: Vec<f32> = u.iter().map(|v| v * v).collect();
    let r = |mm: f64| (px(mm, mmy, 1), px(mm, mmx, 1));
    let windows = [
        r(0.5),
        r(1.0),
        r(1.5),
        r(4.0),
        (px(0.4, mmy, 1), px(3.0, mmx, 1)),
        (px(3.0, mmy, 1), px(0.4, mmx, 1)),
        r(2.5),
        r(8.0),
    ];
    // Per window: the mean rank, and for 1 mm the mean square and for 1.5 mm the valid share.
    let maps: Vec<(Vec<f32>, Option<Vec<f32>>, Vec<f32>)> = windows
        .par_iter()
        .enumerate()
        .map(|(i, &(ry, rx))| {
            let ms = box_sums(&m, h, w, ry, rx);
            let mean = box_means(&u, &ms, h, w, ry, rx);
            let square = (i == 1).then(|| box_means(&uu, &ms, h, w, ry, rx));
            (mean, square, ms)
        })
        .collect();
    let u1 = &maps[0].0;
    {
        let mut put = |k: usize, v: &[f32]| out[k * n..(k + 1) * n].copy_from_slice(v);
        put(0, &u);
        put(1, u1);
        put(2, &maps[2].0);
        put(3, &maps[3].0);
        let sd: Vec<f32> = maps[1]
            .0
            .iter()
            .zip(maps[1].1.as_deref().unwrap_or(&[]))
            .map(|(a, q)| (q - a * a).max(0.0).sqrt())
            .collect();
        put(4, &sd);
        put(5, &maps[4].0);
        put(6, &maps[5].0);
        put(20, &maps[6].0);
        put(21, &maps[7].0);
    }
    // Columns: prefix sums of the smoothed rank and of validity, the running maximum from the
    // top, and the maximum in a window beneath.
    let (d05, d1, d3, d8) = (
        px(0.5, mmy, 1),
        px(1.0, mmy, 1),
        px(3.0, mmy, 2),
        px(8.0, mmy, 2),
    );
    let columns: Vec<[Vec<f32>; 7]> = (0..w)
        .into_par_iter()
        .map(|x| {
            let col: Vec<f32> = (0..h).map(|y| u1[y * w + x] * m[y * w + x]).collect();
            let mut ps = vec![0f64; h + 1];
            let mut pm = vec![0f64; h + 1];
            for y in 0..h {
                ps[y + 1] = ps[y] + col[y] as f64;
                pm[y + 1] = pm[y] + m[y * w + x] as f64;
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
            let mut c: [Vec<f32>; 7] = std::array::from_fn(|_| vec![0f32; h]);
            let mut running = vec![0f32; h + 1];
            for y in 0..h {
                let yi = y as isize;
                c[0][y] = mean(yi - d3 as isize, yi - d05 as isize + 1);
                c[1][y] = mean(yi + d05 as isize, yi + d3 as isize + 1);
                c[2][y] = mean(yi + d1 as isize, h as isize);
                c[3][y] = mean(0, yi);
                running[y + 1] = running[y].max(col[y]);
                let at = |dy: isize| col[(yi + dy).clamp(0, h as isize - 1) as usize];
                c[6][y] = col[y] - 0.5 * (at(-(d1 as isize)) + at(d1 as isize));
            }
            // Max above from 1 mm up: the running maximum d1 rows higher.
            for y in d1..h {
                c[4][y] = running[y + 1 - d1];
            }
            c[5] = window_max(&col, d05, d8);
            c
        })
        .collect();
    for (k, j) in [(7, 0), (8, 1), (9, 4), (10, 5), (11, 2), (17, 3), (18, 6)] {
        let dst = &mut out[k * n..(k + 1) * n];
        for (x, c) in columns.iter().enumerate() {
            for (y, v) in c[j].iter().enumerate() {
                dst[y * w + x] = *v;
            }
        }
    }
    // The mean beneath is a mean of grey levels: the intensity's rank map keeps it invariant
    // to a gain or dynamic-range change (and "nothing beneath", 0, stays lowest).
    let below_rank = &rank;
    let per_pixel = |k: usize, v: &dyn Fn(usize, usize) -> f32, out: &mut [f32]| {
        for (i, o) in out[k * n..(k + 1) * n].iter_mut().enumerate() {
            *o = v(i / w, i % w);
        }
    };
    per_pixel(12, &|y, _| (y as f64 * mmy / DEPTH_SCALE_MM) as f32, &mut out);
    per_pixel(13, &|y, x| f.phase_symmetry[[y, x]], &mut out);
    per_pixel(14, &|y, x| f.coherence[[y, x]], &mut out);
    per_pixel(
        15,
        &|y, x| f.coherence[[y, x]] * abs_cos(f.orientation[[y, x]]),
        &mut out,
    );
    per_pixel(16, &|y, x| below_rank(f.below[[y, x]]), &mut out);
    let share = &maps[2].2;
    let (ry, rx) = windows[2];
    per_pixel(
        19,
        &|y, x| {
            let area = ((y + ry + 1).min(h) - y.saturating_sub(ry))
                * ((x + rx + 1).min(w) - x.saturating_sub(rx));
            share[y * w + x] / area as f32
        },
        &mut out,
    );
    for v in &mut out {
        if !v.is_finite() {
            *v = 0.0;
        }
    }
    out
}

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/pixel_mlp.wgsl");

/// The shader's parameters; keep in sync with `Params` in shaders/pixel_mlp.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GpuParams {
    /// Pixels.
    pub n: u32,
    /// Dense layers.
    pub layers: u32,
    /// Inputs of the first layer.
    pub features: u32,
    /// Outputs of the last layer.
    pub classes: u32,
    /// Layer widths, inputs first (at most 7 layers).
    pub widths: [u32; 8],
}

impl PixelModel {
    /// The model as the shader reads it from `aux`: mean, scale, then per layer its weights
    /// and biases.
    pub fn flat(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(
            2 * FEATURES + self.layers.iter().map(|l| l.w.len() + l.b.len()).sum::<usize>(),
        );
        v.extend(&self.mean);
        v.extend(&self.scale);
        for l in &self.layers {
            v.extend(&l.w);
            v.extend(&l.b);
        }
        v
    }
}

/// Runs the classifier on the GPU: the features go up as one image (`FEATURES` stacked
/// grids), the weights into the scratch buffer, and the probabilities come back in the
/// layout of [`probabilities_cpu`] (invalid pixels set to background afterwards, as there).
#[cfg(feature = "gpu")]
pub fn probabilities_gpu(
    ctx: &crate::gpu::GpuContext,
    model: &PixelModel,
    features: &[f32],
    valid: &Array2<bool>,
) -> crate::Result<Vec<f32>> {
    let (h, w) = valid.dim();
    let n = h * w;
    if model.layers.len() > 7 || features.len() != FEATURES * n || n == 0 {
        return Err(crate::gpu::GpuError::Kernel {
            kernel: "pixel_mlp".into(),
            reason: format!("{} layers, {} feature values", model.layers.len(), features.len()),
        }
        .into());
    }
    let stacked = ndarray::ArrayView2::from_shape((FEATURES * h, w), features)
        .map_err(|e| crate::gpu::GpuError::Kernel {
            kernel: "pixel_mlp".into(),
            reason: e.to_string(),
        })?
        .to_owned();
    let mut chain = ctx.begin(&stacked)?;
    chain.write_aux(&model.flat())?;
    let mut widths = [0u32; 8];
    widths[0] = FEATURES as u32;
    for (i, l) in model.layers.iter().enumerate() {
        widths[i + 1] = l.outputs as u32;
    }
    let params = GpuParams {
        n: n as u32,
        layers: model.layers.len() as u32,
        features: FEATURES as u32,
        classes: CLASSES as u32,
        widths,
    };
    let groups = (n as u32).div_ceil(64);
    let max = chain.max_workgroups();
    let grid = (groups.min(max), groups.div_ceil(max));
    chain.dispatch("pixel_mlp", SHADER, "pixel_mlp", &params, grid, true)?;
    let out = chain.finish()?;
    let mut probs: Vec<f32> = out.iter().take(CLASSES * n).copied().collect();
    mask_invalid(&mut probs, valid);
    Ok(probs)
}

/// Invalid pixels: background with probability 1.
fn mask_invalid(probs: &mut [f32], valid: &Array2<bool>) {
    let n = valid.len();
    for (i, v) in valid.iter().enumerate() {
        if !v {
            for k in 0..CLASSES {
                probs[k * n + i] = if k == 0 { 1.0 } else { 0.0 };
            }
        }
    }
}

/// Pixels per block of the CPU inference: the layers run over a block at a time, with the
/// pixel as the innermost (vectorised) loop.
const BLOCK: usize = 64;
/// Blocks per parallel task.
const BLOCKS_PER_TASK: usize = 16;

crate::simd::multiversion! {
    /// One dense layer over a block: `x` is `inputs × BLOCK`, `y` becomes `outputs × BLOCK`.
    fn dense_block(l: &Dense, x: &[f32], y: &mut [f32], relu: bool) {
        for o in 0..l.outputs {
            let yo = &mut y[o * BLOCK..(o + 1) * BLOCK];
            yo.fill(l.b[o]);
            for i in 0..l.inputs {
                let wi = l.w[o * l.inputs + i];
                let xi = &x[i * BLOCK..(i + 1) * BLOCK];
                for (a, v) in yo.iter_mut().zip(xi) {
                    *a += wi * v;
                }
            }
            if relu {
                for a in yo.iter_mut() {
                    *a = a.max(0.0);
                }
            }
        }
    }
}

crate::simd::multiversion! {
    /// Softmax over the classes of a block of logits (`CLASSES × BLOCK`), in place.
    fn softmax_block(z: &mut [f32]) {
        let mut m = [f32::NEG_INFINITY; BLOCK];
        for k in 0..CLASSES {
            for (m, v) in m.iter_mut().zip(&z[k * BLOCK..(k + 1) * BLOCK]) {
                *m = m.max(*v);
            }
        }
        let mut sum = [0f32; BLOCK];
        for k in 0..CLASSES {
            for ((v, m), s) in z[k * BLOCK..(k + 1) * BLOCK].iter_mut().zip(&m).zip(&mut sum) {
                *v = crate::simd::exp_neg(*v - m);
                *s += *v;
            }
        }
        for k in 0..CLASSES {
            for (v, s) in z[k * BLOCK..(k + 1) * BLOCK].iter_mut().zip(&sum) {
                *v /= s;
            }
        }
    }
}

/// Class probabilities of every valid grid pixel (`CLASSES × h·w`, class-major; invalid
/// pixels get background 1).
pub fn probabilities_cpu(model: &PixelModel, features: &[f32], valid: &Array2<bool>) -> Vec<f32> {
    let n = valid.len();
    let valid: Vec<bool> = valid.iter().copied().collect();
    let width = model.max_width().max(FEATURES);
    let tasks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(BLOCK * BLOCKS_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let t0 = t * BLOCK * BLOCKS_PER_TASK;
            let t1 = (t0 + BLOCK * BLOCKS_PER_TASK).min(n);
            let mut out = vec![0f32; CLASSES * (t1 - t0)];
            let mut a = vec![0f32; width * BLOCK];
            let mut b = vec![0f32; width * BLOCK];
            for a0 in (t0..t1).step_by(BLOCK) {
                let len = BLOCK.min(t1 - a0);
                let o0 = a0 - t0;
                if !valid[a0..a0 + len].iter().any(|v| *v) {
                    out[o0..o0 + len].fill(1.0);
                    continue;
                }
                for k in 0..FEATURES {
                    let (m, sc) = (model.mean[k], model.scale[k]);
                    let dst = &mut a[k * BLOCK..(k + 1) * BLOCK];
                    for (d, v) in dst.iter_mut().zip(&features[k * n + a0..k * n + a0 + len]) {
                        *d = (v - m) * sc;
                    }
                    dst[len..].fill(0.0);
                }
                let last = model.layers.len() - 1;
                for (i, l) in model.layers.iter().enumerate() {
                    dense_block(l, &a, &mut b, i < last);
                    std::mem::swap(&mut a, &mut b);
                }
                softmax_block(&mut a);
                for k in 0..CLASSES {
                    let dst = &mut out[k * (t1 - t0) + o0..k * (t1 - t0) + o0 + len];
                    dst.copy_from_slice(&a[k * BLOCK..k * BLOCK + len]);
                    for (d, v) in dst.iter_mut().zip(&valid[a0..a0 + len]) {
                        if !v {
                            *d = if k == 0 { 1.0 } else { 0.0 };
                        }
                    }
                }
            }
            (t0, out)
        })
        .collect();
    let mut out = vec![0f32; CLASSES * n];
    for (t0, part) in tasks {
        let len = part.len() / CLASSES;
        for k in 0..CLASSES {
            out[k * n + t0..k * n + t0 + len].copy_from_slice(&part[k * len..(k + 1) * len]);
        }
    }
    out
}

/// Radius over which class probabilities are averaged before the decision, mm (about the
/// lateral resolution of a 10 MHz linear probe, 0.3 mm).
const SMOOTH_MM: f64 = 0.3;
/// Joint fluid, vessels and nerves thinner than this are not kept, mm (smaller than any
/// effusion, vessel or nerve an injection must see; see `MIN_AREA_MM2`).
const OPEN_MM: f64 = 0.8;

/// How far joint fluid may lie from the bone surface, mm: effusions and recesses rest on the
/// cartilage over bone (hyaline cartilage at most about 3 mm thick at the knee, thinner
/// elsewhere) or on the fat pads beside it (Bianchi & Martinoli, "Ultrasound of the
/// Musculoskeletal System", Springer 2007).
pub const JOINT_REACH_MM: f64 = 4.0;

/// Whether grid pixel `(y, x)` lies within `reach` mm of the bone surface (in any column).
fn near_bone(surface: &[Option<f32>], y: usize, x: usize, mm: (f64, f64), reach: f64) -> bool {
    let cols = (reach / mm.0).ceil() as usize;
    let (x0, x1) = (x.saturating_sub(cols), (x + cols + 1).min(surface.len()));
    (x0..x1).any(|c| {
        surface[c].is_some_and(|s| {
            let dx = (c as f64 - x as f64) * mm.0;
            let dy = (s as f64 - y as f64) * mm.1;
            dx.hypot(dy) <= reach
        })
    })
}

/// One class's probabilities as a grid.
pub fn class_map(probs: &[f32], dim: (usize, usize), label: Label) -> Array2<f32> {
    let n = dim.0 * dim.1;
    let k = label.code() as usize;
    Array2::from_shape_vec(dim, probs[k * n..(k + 1) * n].to_vec())
        .expect("probabilities of the grid's size")
}

/// Smallest areas kept of the soft-tissue labels, mm², from the smallest of each structure
/// that an MSK injection must see (sizes from Bianchi & Martinoli, "Ultrasound of the
/// Musculoskeletal System", Springer 2007): tendons about 1 mm thick (finger extensors) seen
/// over 3 mm or more; effusions and recesses from about 1 mm deep over 1 mm; vessels from
/// about 1.5 mm across (the arteries near injection sites: radial 2–3 mm, genicular and
/// circumflex branches 1.5–2 mm); nerves from about 1.5 mm across (digital nerves).
const MIN_AREA_MM2: [(Label, f64); 4] = [
    (Label::Tendon, 3.0),
    (Label::Joint, 1.0),
    (Label::Vessel, 1.75),
    (Label::Nerve, 1.5),
];

/// The soft-tissue labels of the grid (tendon, joint / effusion, vessel, nerve) where each is
/// the most probable class, without components smaller than the structure can be.
///
/// Joint space and effusion lie on bone: a component none of whose pixels comes within
/// [`JOINT_REACH_MM`] of the bone `surface` (grid rows per column) is not kept.
pub fn soft_tissue(probs: &[f32], f: &Features, surface: &[Option<f32>]) -> Array2<u8> {
    let dim = f.intensity.dim();
    let n = dim.0 * dim.1;
    // Probabilities averaged over about a resolution cell, so that single speckle-sized
    // pixels do not flip the decision.
    let (ry, rx) = (
        px(SMOOTH_MM, f.mm_per_px.1, 0),
        px(SMOOTH_MM, f.mm_per_px.0, 0),
    );
    let smoothed: Vec<f32>;
    let probs = if ry + rx > 0 {
        let ones = vec![1f32; n];
        let count = box_sums(&ones, dim.0, dim.1, ry, rx);
        smoothed = (0..CLASSES)
            .flat_map(|k| {
                box_means(&probs[k * n..(k + 1) * n], &count, dim.0, dim.1, ry, rx)
            })
            .collect();
        &smoothed[..]
    } else {
        probs
    };
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
        let mut mask = best.mapv(|l| l == label.code());
        if label != Label::Tendon {
            // Fluid and nerves are compact: strands thinner than OPEN_MM are clutter.
            let r = px(OPEN_MM / 2.0, f.mm_per_px.0.max(f.mm_per_px.1), 0);
            if r > 0 {
                mask = super::components::open_close(&mask, r);
            }
        }
        for c in super::components::components(&mask) {
            let on_bone = label != Label::Joint
                || c.pixels.iter().any(|&(y, x)| {
                    near_bone(surface, y, x, f.mm_per_px, JOINT_REACH_MM)
                });
            if on_bone && c.area() as f64 * px_mm2 >= min_mm2 {
                for &(y, x) in &c.pixels {
                    out[[y, x]] = label.code();
                }
            }
        }
    }
    merge_fluid_into_joint(&mut out);
    out
}

/// A vessel component that touches joint fluid is part of the same fluid collection (a
/// vessel's lumen lies inside its own wall, not against an effusion): it becomes joint.
fn merge_fluid_into_joint(labels: &mut Array2<u8>) {
    let (h, w) = labels.dim();
    let vessel = labels.mapv(|l| l == Label::Vessel.code());
    for c in super::components::components(&vessel) {
        let touches = c.pixels.iter().any(|&(y, x)| {
            let (y0, y1) = (y.saturating_sub(1), (y + 1).min(h - 1));
            let (x0, x1) = (x.saturating_sub(1), (x + 1).min(w - 1));
            (y0..=y1).any(|yy| (x0..=x1).any(|xx| labels[[yy, xx]] == Label::Joint.code()))
        });
        if touches {
            for &(y, x) in &c.pixels {
                labels[[y, x]] = Label::Joint.code();
            }
        }
    }
}
