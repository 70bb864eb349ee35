//! Image kernels: each is a WGSL shader in `shaders/<name>.wgsl` and a CPU twin here with the
//! same maths, the same edge rule (clamp to edge) and the same parameters (a `#[repr(C)]`
//! struct that mirrors the shader's `Params`).
//!
//! The CPU twins are the specification; they run rows in parallel (rayon) with the per-pixel
//! code written in the shader's order. A faster CPU formulation has its own name (OBNLM's
//! `cpu_fast`) and is tested against the twin.

pub mod coherence;
pub mod frost;
pub mod lee;
pub mod median;
pub mod obnlm;
pub mod phase_symmetry;
pub mod pixel_mlp;
pub mod shadow;
pub mod srad;

use ndarray::Array2;
use rayon::prelude::*;

/// Errors of the kernels: a parameter or an image the kernel cannot take.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A parameter given by the caller is outside its valid range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// The parameter's name, as the CLI and the params structs spell it.
        name: &'static str,
        /// Why the value was refused.
        reason: String,
    },
}

/// Names of every kernel with a shader and a twin (the shader stems).
pub const KERNELS: [&str; 9] = [
    "coherence",
    "frost",
    "lee",
    "median",
    "obnlm",
    "phase_symmetry",
    "pixel_mlp",
    "shadow",
    "srad",
];

/// The pixel at (x, y) with coordinates clamped to the image (the edge rule of every kernel).
#[inline]
pub fn at(img: &Array2<f32>, x: isize, y: isize) -> f32 {
    let (h, w) = img.dim();
    let cx = x.clamp(0, w as isize - 1) as usize;
    let cy = y.clamp(0, h as isize - 1) as usize;
    img[[cy, cx]]
}

/// Builds an image by evaluating `f(x, y)` for every pixel, rows in parallel.
pub fn par_image(
    height: usize,
    width: usize,
    f: impl Fn(usize, usize) -> f32 + Sync,
) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros((height, width));
    out.axis_iter_mut(ndarray::Axis(0))
        .into_par_iter()
        .enumerate()
        .for_each(|(y, mut row)| {
            for (x, v) in row.iter_mut().enumerate() {
                *v = f(x, y);
            }
        });
    out
}

/// Checks the image is non-empty and its size fits u32 params.
pub(crate) fn check_image(kernel: &'static str, img: &Array2<f32>) -> crate::Result<()> {
    let (h, w) = img.dim();
    if h == 0 || w == 0 || h > u32::MAX as usize / 2 || w > u32::MAX as usize / 2 {
        return Err(crate::kernels::KernelError::InvalidParameter {
            name: kernel,
            reason: format!("image of {w}x{h}"),
        }
        .into());
    }
    Ok(())
}

/// Mean and variance of a window of radius `r` around (x, y), in the shader's order
/// (sum, then the sum of squared deviations from the mean).
#[inline]
pub fn window_stats(img: &Array2<f32>, x: usize, y: usize, r: isize) -> (f32, f32) {
    let (xi, yi) = (x as isize, y as isize);
    let mut sum = 0.0f32;
    for dy in -r..=r {
        for dx in -r..=r {
            sum += at(img, xi + dx, yi + dy);
        }
    }
    let n = ((2 * r + 1) * (2 * r + 1)) as f32;
    let m = sum / n;
    let mut ss = 0.0f32;
    for dy in -r..=r {
        for dx in -r..=r {
            let d = at(img, xi + dx, yi + dy) - m;
            ss += d * d;
        }
    }
    (m, ss / n)
}

/// The image padded by `r` on every side, edges clamped (so window reads need no clamping),
/// row-major, `(w + 2r) × (h + 2r)`.
pub(crate) fn padded(img: &Array2<f32>, r: usize) -> Vec<f32> {
    let (h, w) = img.dim();
    let (pw, ph) = (w + 2 * r, h + 2 * r);
    let mut out = vec![0f32; pw * ph];
    out.par_chunks_mut(pw).enumerate().for_each(|(py, row)| {
        let y = (py as isize - r as isize).clamp(0, h as isize - 1) as usize;
        for (px, v) in row.iter_mut().enumerate() {
            let x = (px as isize - r as isize).clamp(0, w as isize - 1) as usize;
            *v = img[[y, x]];
        }
    });
    out
}

crate::simd::multiversion! {
    /// Window sums of one output row: for each x, Σ and Σ² of the (2r+1)² window, from the
    /// padded image.
    fn window_sums_row(pad: &[f32], pw: usize, y: usize, r: usize, w: usize, sum: &mut [f32], sq: &mut [f32]) {
        let k = 2 * r + 1;
        sum[..w].iter_mut().for_each(|v| *v = 0.0);
        sq[..w].iter_mut().for_each(|v| *v = 0.0);
        for dy in 0..k {
            let row = &pad[(y + dy) * pw..(y + dy + 1) * pw];
            for dx in 0..k {
                let src = &row[dx..dx + w];
                for x in 0..w {
                    let v = src[x];
                    sum[x] += v;
                    sq[x] += v * v;
                }
            }
        }
    }
}

/// Local mean and variance (E[x²] − m², floored at 0) over (2r+1)² windows, rows in
/// parallel. The fast paths' form of [`window_stats`].
pub(crate) fn box_stats(pad: &[f32], w: usize, h: usize, r: usize) -> (Vec<f32>, Vec<f32>) {
    let pw = w + 2 * r;
    let n = ((2 * r + 1) * (2 * r + 1)) as f32;
    let mut mean = vec![0f32; w * h];
    let mut var = vec![0f32; w * h];
    mean.par_chunks_mut(w)
        .zip(var.par_chunks_mut(w))
        .enumerate()
        .for_each(|(y, (m, v))| {
            window_sums_row(pad, pw, y, r, w, m, v);
            for x in 0..w {
                let mm = m[x] / n;
                v[x] = (v[x] / n - mm * mm).max(0.0);
                m[x] = mm;
            }
        });
    (mean, var)
}

/// Params structs that start with the frame's width and height (as every 2-D kernel's do).
pub(crate) trait FrameParams: bytemuck::Pod {
    /// A copy with the frame size filled in.
    fn sized(&self, width: u32, height: u32) -> Self;
}

/// Implements [`FrameParams`] for a params struct with `width` and `height` fields.
macro_rules! frame_params {
    ($t:ty) => {
        impl $crate::kernels::FrameParams for $t {
            fn sized(&self, width: u32, height: u32) -> Self {
                let mut p = *self;
                p.width = width;
                p.height = height;
                p
            }
        }
    };
}
pub(crate) use frame_params;

/// Queues a 16 × 16-tiled kernel that writes the next image, with the frame size filled in.
#[cfg(feature = "gpu")]
pub(crate) fn encode_2d<P: FrameParams>(
    chain: &mut crate::gpu::GpuChain<'_>,
    file: &'static str,
    source: &'static str,
    entry: &'static str,
    params: &P,
) -> crate::Result<()> {
    let p = params.sized(chain.width() as u32, chain.height() as u32);
    let groups = chain.groups_2d();
    chain.dispatch(file, source, entry, &p, groups, true)?;
    Ok(())
}
