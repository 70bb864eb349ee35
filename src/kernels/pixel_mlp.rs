//! The pixel classifier's inference: a small multilayer perceptron (dense layers, ReLU
//! between them, softmax at the end) over a feature vector per pixel. The features and what
//! is decided from the probabilities belong to the segmenter (`crate::segment::pixels`); the
//! weights are a [`PixelModel`] (JSON). Shader: `shaders/pixel_mlp.wgsl`; the CPU twin runs
//! blocks of pixels with the pixel as the innermost, vectorised loop.

use ndarray::Array2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// A trained pixel classifier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PixelModel {
    /// Format version.
    pub version: u32,
    /// Feature names, in input order.
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
    /// Parses a model's JSON and checks it against the features and classes the caller
    /// computes.
    pub fn from_json(
        text: &str,
        features: &[&str],
        classes: &[&str],
    ) -> Result<PixelModel, ModelError> {
        let m: PixelModel =
            serde_json::from_str(text).map_err(|e| ModelError(format!("not a model: {e}")))?;
        m.check(features, classes)?;
        Ok(m)
    }

    /// Checks the shapes against the feature and class names the caller computes.
    pub fn check(&self, features: &[&str], names: &[&str]) -> Result<(), ModelError> {
        if self.features != features {
            return Err(ModelError(format!(
                "features {:?} differ from this build's {:?}",
                self.features, features
            )));
        }
        if self.classes != names {
            return Err(ModelError(format!(
                "classes {:?} differ from {:?}",
                self.classes, names
            )));
        }
        let n_features = features.len();
        if self.mean.len() != n_features || self.scale.len() != n_features {
            return Err(ModelError("mean/scale length".into()));
        }
        if n_features > MAX_WIDTH || names.len() > MAX_CLASSES {
            return Err(ModelError(format!(
                "{n_features} features, {} classes: at most {MAX_WIDTH} and {MAX_CLASSES}",
                names.len()
            )));
        }
        let mut width = n_features;
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
        if width != names.len() || self.layers.is_empty() || self.layers.len() > MAX_LAYERS {
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

    /// Widest layer, inputs included.
    pub fn max_width(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.outputs.max(l.inputs))
            .max()
            .unwrap_or(0)
    }

    /// Inputs per pixel.
    pub fn inputs(&self) -> usize {
        self.mean.len()
    }

    /// Classes.
    pub fn classes(&self) -> usize {
        self.layers.last().map_or(0, |l| l.outputs)
    }
}

/// Widest layer a model may have, inputs included (the GPU shader's scratch size).
pub const MAX_WIDTH: usize = 64;
/// Most classes a model may have.
pub const MAX_CLASSES: usize = 16;
/// Most dense layers (the shader's parameters hold eight widths).
pub const MAX_LAYERS: usize = 7;

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/pixel_mlp.wgsl");

/// The shader's parameters; keep in sync with `Params` in shaders/pixel_mlp.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Pixels.
    pub n: u32,
    /// Dense layers.
    pub layers: u32,
    /// Inputs of the first layer.
    pub features: u32,
    /// Outputs of the last layer.
    pub classes: u32,
    /// Layer widths, inputs first: width0 = features, width[layers] = classes.
    pub width0: u32,
    /// Outputs of layer 0.
    pub width1: u32,
    /// Outputs of layer 1.
    pub width2: u32,
    /// Outputs of layer 2.
    pub width3: u32,
    /// Outputs of layer 3.
    pub width4: u32,
    /// Outputs of layer 4.
    pub width5: u32,
    /// Outputs of layer 5.
    pub width6: u32,
    /// Outputs of layer 6.
    pub width7: u32,
    /// Where the model starts in `aux`.
    pub model: u32,
    /// The first input read from `dst` instead of `src` (the inputs' count: none).
    pub split: u32,
    /// The `dst` plane of input `split`.
    pub ctx_plane: u32,
    /// The `dst` plane of the first output.
    pub out_plane: u32,
}

impl PixelModel {
    /// The model as the shader reads it from `aux`: mean, scale, then per layer its weights
    /// and biases.
    pub fn flat(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(
            2 * self.inputs()
                + self
                    .layers
                    .iter()
                    .map(|l| l.w.len() + l.b.len())
                    .sum::<usize>(),
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

/// Where a chained run of the classifier finds its model and inputs and puts its outputs, in
/// planes of `n` values (see `shaders/pixel_mlp.wgsl`).
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// Offset of the model's values in `aux` ([`PixelModel::flat`]).
    pub model: u32,
    /// Inputs `0..split` are `src` planes `0..split`; the rest are `dst` planes from
    /// `ctx_plane`.
    pub split: u32,
    /// The `dst` plane of input `split`.
    pub ctx_plane: u32,
    /// The `dst` plane of the first probability.
    pub out_plane: u32,
}

/// Queues the classifier over the `n` pixels of `chain`'s planes, as `place` says; with
/// `swap`, the chain moves on to `dst`.
#[cfg(feature = "gpu")]
pub fn encode(
    chain: &mut crate::gpu::GpuChain<'_>,
    model: &PixelModel,
    n: usize,
    place: Placement,
    swap: bool,
) -> Result<(), crate::gpu::GpuError> {
    let f = model.inputs();
    if model.layers.len() > MAX_LAYERS || n == 0 || place.split as usize > f {
        return Err(crate::gpu::GpuError::Kernel {
            kernel: "pixel_mlp".into(),
            reason: format!(
                "{} layers, {n} pixels, {} inputs from src of {f}",
                model.layers.len(),
                place.split
            ),
        });
    }
    let mut widths = [0u32; 8];
    widths[0] = f as u32;
    for (i, l) in model.layers.iter().enumerate() {
        widths[i + 1] = l.outputs as u32;
    }
    let params = Params {
        n: n as u32,
        layers: model.layers.len() as u32,
        features: f as u32,
        classes: model.classes() as u32,
        width0: widths[0],
        width1: widths[1],
        width2: widths[2],
        width3: widths[3],
        width4: widths[4],
        width5: widths[5],
        width6: widths[6],
        width7: widths[7],
        model: place.model,
        split: place.split,
        ctx_plane: place.ctx_plane,
        out_plane: place.out_plane,
    };
    let groups = (n as u32).div_ceil(64);
    let max = chain.max_workgroups();
    let grid = (groups.min(max), groups.div_ceil(max));
    chain.dispatch("pixel_mlp", SHADER, "pixel_mlp", &params, grid, swap)
}

/// Runs the classifier on the GPU: the features go up as one image (`inputs` stacked grids),
/// the weights into the scratch buffer, and the probabilities come back in the layout of
/// [`cpu`] (invalid pixels set to background afterwards, as there).
#[cfg(feature = "gpu")]
pub fn gpu(
    ctx: &crate::gpu::GpuContext,
    model: &PixelModel,
    features: &[f32],
    valid: &Array2<bool>,
) -> crate::Result<Vec<f32>> {
    let (h, w) = valid.dim();
    let (n, f, c) = (h * w, model.inputs(), model.classes());
    let invalid = |reason: String| crate::gpu::GpuError::Kernel {
        kernel: "pixel_mlp".into(),
        reason,
    };
    if features.len() != f * n || n == 0 || c > f {
        return Err(invalid(format!("{} feature values for {n} pixels", features.len())).into());
    }
    let mut chain = ctx.begin_planes(features, w, f * h)?;
    chain.write_aux(&model.flat())?;
    let place = Placement {
        model: 0,
        split: f as u32,
        ctx_plane: 0,
        out_plane: 0,
    };
    encode(&mut chain, model, n, place, true)?;
    let mut probs = chain.finish_range(0, c * n)?;
    mask_invalid(&mut probs, c, valid);
    Ok(probs)
}

/// Invalid pixels: background with probability 1.
pub fn mask_invalid(probs: &mut [f32], classes: usize, valid: &Array2<bool>) {
    let n = valid.len();
    for (i, v) in valid.iter().enumerate() {
        if !v {
            for k in 0..classes {
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

/// Pixels per register tile of [`dense_block`]: one 512-bit vector, two 256-bit ones.
const SUB: usize = 16;

/// A dense layer with its weights transposed (`inputs × outputs`), so that the weights one
/// register tile needs for an input are adjacent: one bounds check per input instead of one per
/// output, and no reloads of row pointers inside the inner loop.
struct Tiled<'a> {
    l: &'a Dense,
    wt: Vec<f32>,
}

impl<'a> Tiled<'a> {
    fn new(l: &'a Dense) -> Tiled<'a> {
        let mut wt = vec![0f32; l.inputs * l.outputs];
        for o in 0..l.outputs {
            for i in 0..l.inputs {
                wt[i * l.outputs + o] = l.w.get(o * l.inputs + i).copied().unwrap_or(0.0);
            }
        }
        Tiled { l, wt }
    }
}

/// `N` outputs of one dense layer, starting at output `o`, over the `SUB` pixels at `s` of a
/// block: accumulators held in registers across the whole input loop. `FUSED`: multiply-adds
/// as single fused instructions (only where the CPU has them: elsewhere `mul_add` is a slow
/// library call).
#[inline(always)]
fn dense_tile<const N: usize, const FUSED: bool>(
    t: &Tiled<'_>,
    x: &[f32],
    y: &mut [f32],
    o: usize,
    s: usize,
    relu: bool,
) {
    let l = t.l;
    let mut acc = [[0f32; SUB]; N];
    for (k, a) in acc.iter_mut().enumerate() {
        *a = [l.b[o + k]; SUB];
    }
    for i in 0..l.inputs {
        let Some(xi) = x
            .get(i * BLOCK + s..i * BLOCK + s + SUB)
            .and_then(|v| <&[f32; SUB]>::try_from(v).ok())
        else {
            return;
        };
        let Some(wi) =
            t.wt.get(i * l.outputs + o..i * l.outputs + o + N)
                .and_then(|v| <&[f32; N]>::try_from(v).ok())
        else {
            return;
        };
        for (a, &wk) in acc.iter_mut().zip(wi) {
            for (a, v) in a.iter_mut().zip(xi) {
                *a = if FUSED {
                    wk.mul_add(*v, *a)
                } else {
                    *a + wk * v
                };
            }
        }
    }
    for (k, a) in acc.iter().enumerate() {
        let dst = &mut y[(o + k) * BLOCK + s..(o + k) * BLOCK + s + SUB];
        for (d, v) in dst.iter_mut().zip(a) {
            *d = if relu { v.max(0.0) } else { *v };
        }
    }
}

/// One dense layer over a block: `x` is `inputs × BLOCK`, `y` becomes `outputs × BLOCK`.
/// Register-tiled: `OUTS` outputs × `SUB` pixels per pass over the inputs.
#[inline(always)]
fn dense_block_with<const OUTS: usize, const FUSED: bool>(
    l: &Tiled<'_>,
    x: &[f32],
    y: &mut [f32],
    relu: bool,
) {
    for s in (0..BLOCK).step_by(SUB) {
        let mut o = 0;
        let outputs = l.l.outputs;
        while o + OUTS <= outputs {
            dense_tile::<OUTS, FUSED>(l, x, y, o, s, relu);
            o += OUTS;
        }
        while o + 4 <= outputs {
            dense_tile::<4, FUSED>(l, x, y, o, s, relu);
            o += 4;
        }
        while o + 2 <= outputs {
            dense_tile::<2, FUSED>(l, x, y, o, s, relu);
            o += 2;
        }
        while o < outputs {
            dense_tile::<1, FUSED>(l, x, y, o, s, relu);
            o += 1;
        }
    }
}

/// The instructions the CPU inference can use, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    /// AVX-512 (F, VL, BW, DQ) with FMA: 32 vector registers hold 8 accumulator tiles.
    Avx512,
    /// AVX2 with FMA: 16 registers hold 4 accumulator tiles of two vectors.
    Avx2,
    /// Whatever the build targets; separate multiplies and adds unless the target has FMA.
    Baseline,
}

impl Tier {
    fn detect() -> Tier {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f")
                && has!("avx512vl")
                && has!("avx512bw")
                && has!("avx512dq")
                && has!("fma")
            {
                return Tier::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Tier::Avx2;
            }
        }
        Tier::Baseline
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn dense_block_avx512(l: &Tiled<'_>, x: &[f32], y: &mut [f32], relu: bool) {
    dense_block_with::<8, true>(l, x, y, relu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dense_block_avx2(l: &Tiled<'_>, x: &[f32], y: &mut [f32], relu: bool) {
    dense_block_with::<6, true>(l, x, y, relu)
}

/// One dense layer over a block (see [`dense_block_with`]) with the tier's instructions.
fn dense_block(l: &Tiled<'_>, x: &[f32], y: &mut [f32], relu: bool, tier: Tier) {
    match tier {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Tier::detect` returned Avx512 only after checking that the CPU has these
        // AVX-512 subsets, AVX2 and FMA.
        Tier::Avx512 => unsafe { dense_block_avx512(l, x, y, relu) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Tier::detect` returned Avx2 only after checking for AVX2 and FMA.
        Tier::Avx2 => unsafe { dense_block_avx2(l, x, y, relu) },
        _ => {
            if cfg!(target_feature = "fma") || cfg!(target_arch = "aarch64") {
                dense_block_with::<4, true>(l, x, y, relu)
            } else {
                dense_block_with::<4, false>(l, x, y, relu)
            }
        }
    }
}

crate::simd::multiversion! {
    /// Softmax over the classes of a block of logits (`classes × BLOCK`), in place.
    fn softmax_block(z: &mut [f32], classes: usize) {
        let mut m = [f32::NEG_INFINITY; BLOCK];
        for k in 0..classes {
            for (m, v) in m.iter_mut().zip(&z[k * BLOCK..(k + 1) * BLOCK]) {
                *m = m.max(*v);
            }
        }
        let mut sum = [0f32; BLOCK];
        for k in 0..classes {
            for ((v, m), s) in z[k * BLOCK..(k + 1) * BLOCK].iter_mut().zip(&m).zip(&mut sum) {
                *v = crate::simd::exp_neg(*v - m);
                *s += *v;
            }
        }
        for k in 0..classes {
            for (v, s) in z[k * BLOCK..(k + 1) * BLOCK].iter_mut().zip(&sum) {
                *v /= s;
            }
        }
    }
}

/// CPU twin: class probabilities of every valid grid pixel (`classes × h·w`, class-major;
/// invalid pixels get class 0 with probability 1). `features` is feature-major
/// (`inputs × h·w`).
pub fn cpu(model: &PixelModel, features: &[f32], valid: &Array2<bool>) -> Vec<f32> {
    let n = valid.len();
    let (inputs, classes) = (model.inputs(), model.classes());
    let valid: Vec<bool> = valid.iter().copied().collect();
    let width = model.max_width();
    let tier = Tier::detect();
    let tiled: Vec<Tiled<'_>> = model.layers.iter().map(Tiled::new).collect();
    let tasks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(BLOCK * BLOCKS_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let t0 = t * BLOCK * BLOCKS_PER_TASK;
            let t1 = (t0 + BLOCK * BLOCKS_PER_TASK).min(n);
            let mut out = vec![0f32; classes * (t1 - t0)];
            let mut a = vec![0f32; width * BLOCK];
            let mut b = vec![0f32; width * BLOCK];
            for a0 in (t0..t1).step_by(BLOCK) {
                let len = BLOCK.min(t1 - a0);
                let o0 = a0 - t0;
                if !valid[a0..a0 + len].iter().any(|v| *v) {
                    out[o0..o0 + len].fill(1.0);
                    continue;
                }
                for k in 0..inputs {
                    let (m, sc) = (model.mean[k], model.scale[k]);
                    let dst = &mut a[k * BLOCK..(k + 1) * BLOCK];
                    for (d, v) in dst.iter_mut().zip(&features[k * n + a0..k * n + a0 + len]) {
                        *d = (v - m) * sc;
                    }
                    dst[len..].fill(0.0);
                }
                let last = tiled.len() - 1;
                for (i, l) in tiled.iter().enumerate() {
                    dense_block(l, &a, &mut b, i < last, tier);
                    std::mem::swap(&mut a, &mut b);
                }
                softmax_block(&mut a, classes);
                for k in 0..classes {
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
    let mut out = vec![0f32; classes * n];
    for (t0, part) in tasks {
        let len = part.len() / classes;
        for k in 0..classes {
            out[k * n + t0..k * n + t0 + len].copy_from_slice(&part[k * len..(k + 1) * len]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Largest difference between the register-tiled layers (fused or not) and a plain scalar
    /// forward pass: float rounding over 63 inputs of order 1.
    const TIER_TOLERANCE: f32 = 1e-4;

    fn model(inputs: usize, widths: &[usize]) -> PixelModel {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let mut layers = Vec::new();
        let mut width = inputs;
        for &outputs in widths {
            layers.push(Dense {
                inputs: width,
                outputs,
                w: (0..width * outputs).map(|_| next()).collect(),
                b: (0..outputs).map(|_| next()).collect(),
            });
            width = outputs;
        }
        PixelModel {
            version: 1,
            features: (0..inputs).map(|i| format!("f{i}")).collect(),
            classes: (0..width).map(|i| format!("c{i}")).collect(),
            mean: (0..inputs).map(|_| next()).collect(),
            scale: (0..inputs).map(|_| 1.0 + next()).collect(),
            layers,
            provenance: serde_json::Value::Null,
        }
    }

    fn scalar(m: &PixelModel, x: &[f32]) -> Vec<f32> {
        let mut a: Vec<f32> = x
            .iter()
            .zip(&m.mean)
            .zip(&m.scale)
            .map(|((v, mu), s)| (v - mu) * s)
            .collect();
        for (i, l) in m.layers.iter().enumerate() {
            a = (0..l.outputs)
                .map(|o| {
                    let z = l.b[o]
                        + (0..l.inputs)
                            .map(|k| l.w[o * l.inputs + k] * a[k])
                            .sum::<f32>();
                    if i + 1 < m.layers.len() {
                        z.max(0.0)
                    } else {
                        z
                    }
                })
                .collect();
        }
        let top = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = a.iter().map(|v| (v - top).exp()).collect();
        let sum: f32 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    }

    #[test]
    fn every_tier_matches_a_scalar_forward_pass() {
        // 63 inputs and 32/16/7 widths: the shipped second stage's shape (8-output tiles, the
        // 4-output and single-output remainders all run).
        let m = model(63, &[32, 16, 7]);
        let m_odd = model(5, &[13, 3]);
        for m in [&m, &m_odd] {
            let (h, w) = (3, 50);
            let n = h * w;
            let features: Vec<f32> = (0..m.inputs() * n)
                .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
                .collect();
            let valid = Array2::from_shape_fn((h, w), |(y, x)| (x + y) % 11 != 0);
            let probs = cpu(m, &features, &valid);
            let c = m.classes();
            for (i, ok) in valid.iter().enumerate() {
                let x: Vec<f32> = (0..m.inputs()).map(|k| features[k * n + i]).collect();
                let want = if *ok {
                    scalar(m, &x)
                } else {
                    (0..c).map(|k| if k == 0 { 1.0 } else { 0.0 }).collect()
                };
                for k in 0..c {
                    let got = probs[k * n + i];
                    assert!(
                        (got - want[k]).abs() < TIER_TOLERANCE,
                        "pixel {i} class {k}: {got} vs {}",
                        want[k]
                    );
                }
            }
            // Each tier this CPU has gives the same layer outputs as the baseline.
            let l = &m.layers[0];
            let t = Tiled::new(l);
            let x: Vec<f32> = (0..l.inputs * BLOCK)
                .map(|i| (i % 17) as f32 * 0.1)
                .collect();
            let run = |tier| {
                let mut y = vec![0f32; l.outputs * BLOCK];
                dense_block(&t, &x, &mut y, true, tier);
                y
            };
            let base = run(Tier::Baseline);
            let best = Tier::detect();
            for tier in [Tier::Avx2, Tier::Avx512] {
                if tier == best || (tier == Tier::Avx2 && best == Tier::Avx512) {
                    for (a, b) in run(tier).iter().zip(&base) {
                        assert!((a - b).abs() < TIER_TOLERANCE, "{tier:?}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
