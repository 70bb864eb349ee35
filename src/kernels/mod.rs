//! Image kernels: each is a WGSL shader in `shaders/<name>.wgsl` and a CPU twin here with the
//! same maths, the same edge rule (clamp to edge) and the same parameters (a `#[repr(C)]`
//! struct that mirrors the shader's `Params`).
//!
//! The CPU twins are the specification; they run rows in parallel (rayon) with the per-pixel
//! code written in the shader's order. A faster CPU formulation has its own name (OBNLM's
//! `cpu_fast`) and is tested against the twin.

pub mod box_means;
pub mod coherence;
pub mod columns;
pub mod context;
pub mod features;
pub mod frost;
pub mod grid;
pub mod lee;
pub mod median;
pub mod obnlm;
pub mod phase_symmetry;
pub mod pixel_mlp;
pub mod rank;
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
pub const KERNELS: [&str; 15] = [
    "box_means",
    "coherence",
    "columns",
    "context",
    "features",
    "frost",
    "grid",
    "lee",
    "median",
    "obnlm",
    "phase_symmetry",
    "pixel_mlp",
    "rank",
    "shadow",
    "srad",
];

/// Where a kernel of the pixel features reads and writes in a chain whose images hold several
/// planes of `w·h` values (value offsets): its values and their validity (1 or 0) in the
/// current image, its scratch in `aux`, its output in the next image. The kernels do not
/// move the chain on: the next kernel that needs an output finds it in the next image, or
/// the chain copies it over (`GpuChain::copy_to_current`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planes {
    /// The values' offset in the current image.
    pub values: usize,
    /// The validity's offset in the current image.
    pub valid: usize,
    /// The scratch's offset in `aux`.
    pub scratch: usize,
    /// The output's offset in the next image.
    pub out: usize,
}

impl Planes {
    /// Checks that the inputs (a plane each), `scratch` values of scratch and `outputs`
    /// planes of output fit a chain of `len` values per image, and gives the offsets as the
    /// shaders take them.
    #[cfg(feature = "gpu")]
    pub(crate) fn checked(
        &self,
        kernel: &'static str,
        len: usize,
        n: usize,
        scratch: usize,
        outputs: usize,
    ) -> crate::Result<[u32; 4]> {
        let fits = self.values + n <= len
            && self.valid + n <= len
            && self.scratch + scratch <= len
            && self.out + outputs * n <= len
            && len <= u32::MAX as usize;
        if n == 0 || !fits {
            return Err(KernelError::InvalidParameter {
                name: kernel,
                reason: format!(
                    "{self:?} with planes of {n} values and {scratch} of scratch do not fit \
                     images of {len} values"
                ),
            }
            .into());
        }
        Ok([self.values, self.valid, self.scratch, self.out].map(|v| v as u32))
    }
}

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

/// The image's values row-major: borrowed when the array is contiguous (the usual case),
/// copied otherwise.
pub(crate) fn flat(img: &Array2<f32>) -> std::borrow::Cow<'_, [f32]> {
    match img.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(img.iter().copied().collect()),
    }
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
    /// Adds `sign` × a row and its squares to the running column sums.
    fn add_row(sum: &mut [f32], sq: &mut [f32], row: &[f32], sign: f32) {
        for ((s, q), v) in sum.iter_mut().zip(sq.iter_mut()).zip(row) {
            *s += sign * *v;
            *q += sign * *v * *v;
        }
    }
}

crate::simd::multiversion! {
    /// Window mean and variance (E[x²] − m², floored at 0) of one row from the column sums
    /// `vs`, `vq`, edge-padded by `k / 2` on both sides: `k` shifted slices added.
    fn window_row(vs: &[f32], vq: &[f32], k: usize, n_inv: f32, mean: &mut [f32], var: &mut [f32]) {
        let w = mean.len();
        mean.copy_from_slice(&vs[..w]);
        var.copy_from_slice(&vq[..w]);
        for dx in 1..k {
            let (a, b) = (&vs[dx..dx + w], &vq[dx..dx + w]);
            for x in 0..w {
                mean[x] += a[x];
                var[x] += b[x];
            }
        }
        for x in 0..w {
            let m = mean[x] * n_inv;
            var[x] = (var[x] * n_inv - m * m).max(0.0);
            mean[x] = m;
        }
    }
}

/// Output rows per band of [`for_each_window_row`]: the running column sums restart at each
/// band, so f32 add-and-subtract error never builds up over more than this many rows.
const WINDOW_BAND_ROWS: usize = 32;

/// Local mean and variance (E[x²] − m², floored at 0) over (2r+1)² windows, edges clamped,
/// handed row by row to `f(y, mean, var, out_row)` with `out` (row-major, `w` wide) cut into
/// its rows; bands of rows in parallel. Separable: running column sums (one row added and one
/// taken away per output row) then `2r + 1` shifted adds along the row, so the cost grows
/// with the radius, not its square. The fast paths' form of [`window_stats`].
pub(crate) fn for_each_window_row(
    img: &[f32],
    w: usize,
    r: usize,
    out: &mut [f32],
    f: impl Fn(usize, &[f32], &[f32], &mut [f32]) + Sync,
) {
    if w == 0 {
        return;
    }
    let h = img.len() / w;
    let k = 2 * r + 1;
    let n_inv = 1.0 / (k * k) as f32;
    let row = |y: isize| {
        let y = y.clamp(0, h as isize - 1) as usize;
        &img[y * w..(y + 1) * w]
    };
    out.par_chunks_mut(WINDOW_BAND_ROWS * w)
        .enumerate()
        .for_each(|(b, band)| {
            let y0 = (b * WINDOW_BAND_ROWS) as isize;
            let (mut vs, mut vq) = (vec![0f32; w + 2 * r], vec![0f32; w + 2 * r]);
            let (mut mean, mut var) = (vec![0f32; w], vec![0f32; w]);
            for dy in -(r as isize)..=r as isize {
                add_row(&mut vs[r..r + w], &mut vq[r..r + w], row(y0 + dy), 1.0);
            }
            for (i, o) in band.chunks_exact_mut(w).enumerate() {
                let y = y0 + i as isize;
                if i > 0 {
                    add_row(
                        &mut vs[r..r + w],
                        &mut vq[r..r + w],
                        row(y + r as isize),
                        1.0,
                    );
                    add_row(
                        &mut vs[r..r + w],
                        &mut vq[r..r + w],
                        row(y - r as isize - 1),
                        -1.0,
                    );
                }
                for j in 0..r {
                    (vs[j], vq[j]) = (vs[r], vq[r]);
                    (vs[r + w + j], vq[r + w + j]) = (vs[r + w - 1], vq[r + w - 1]);
                }
                window_row(&vs, &vq, k, n_inv, &mut mean, &mut var);
                f(y as usize, &mean, &var, o);
            }
        });
}

/// Params structs that start with the frame's width and height (as every 2-D kernel's do).
/// Used by the GPU dispatches only.
#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
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
