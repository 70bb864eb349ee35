//! Lee filter (Lee 1980) for multiplicative speckle: with the window mean m and variance v,
//! Ci² = v/m², W = clamp(1 − Cu²/Ci², 0, 1), out = m + W (I − m). Cu is the speckle's
//! coefficient of variation (`noise_cv`). Edges clamped. Shader: `shaders/lee.wgsl`.

use ndarray::Array2;

use super::{at, check_image, par_image, window_stats};

/// Floor of m² in Ci² (keeps black pixels finite); same constant as the shader.
pub const MEAN_FLOOR: f32 = 1e-3;

/// Parameters; keep in sync with `Params` in shaders/lee.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns (set by the dispatcher).
    pub width: u32,
    /// Rows (set by the dispatcher).
    pub height: u32,
    /// Window radius (window = 2r+1).
    pub radius: u32,
    /// Padding.
    pub pad0: u32,
    /// Speckle coefficient of variation Cu.
    pub noise_cv: f32,
    /// Padding.
    pub pad1: [f32; 3],
}

impl Params {
    /// A `window` × `window` Lee filter (odd, 3..=15) for speckle of coefficient of variation
    /// `noise_cv`.
    pub fn new(window: u32, noise_cv: f32) -> crate::Result<Params> {
        if window % 2 == 0 || !(3..=15).contains(&window) {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "window",
                reason: format!("{window} (odd, 3..15)"),
            }
            .into());
        }
        if !(noise_cv > 0.0 && noise_cv < 2.0) {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "noise_cv",
                reason: format!("{noise_cv} (0..2)"),
            }
            .into());
        }
        Ok(Params {
            width: 0,
            height: 0,
            radius: window / 2,
            pad0: 0,
            noise_cv,
            pad1: [0.0; 3],
        })
    }
}

super::frame_params!(Params);

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/lee.wgsl");

/// CPU twin.
pub fn cpu(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("lee", img)?;
    let r = params.radius as isize;
    let cu2 = params.noise_cv * params.noise_cv;
    let (h, w) = img.dim();
    Ok(par_image(h, w, |x, y| {
        let (m, v) = window_stats(img, x, y, r);
        let ci2 = v / (m * m).max(MEAN_FLOOR);
        let wgt = if ci2 > 0.0 {
            (1.0 - cu2 / ci2).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let i = at(img, x as isize, y as isize);
        m + wgt * (i - m)
    }))
}

crate::simd::multiversion! {
    /// One output row from the window means and variances and the row's own values.
    fn lee_row(img: &[f32], mean: &[f32], var: &[f32], cu2: f32, out: &mut [f32]) {
        for x in 0..out.len() {
            let (m, v) = (mean[x], var[x]);
            let ci2 = v / (m * m).max(MEAN_FLOOR);
            let wgt = if ci2 > 0.0 { (1.0 - cu2 / ci2).clamp(0.0, 1.0) } else { 0.0 };
            out[x] = m + wgt * (img[x] - m);
        }
    }
}

/// The CPU production path: window means and variances by separable running sums
/// ([`super::for_each_window_row`], E[x²] − m² instead of the twin's two passes), each output
/// row written as soon as its statistics are known, AVX2 where the CPU has it, bands of rows
/// in parallel.
pub fn cpu_fast(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("lee", img)?;
    let (h, w) = img.dim();
    let data = super::flat(img);
    let data: &[f32] = &data;
    let cu2 = params.noise_cv * params.noise_cv;
    let mut out = vec![0f32; w * h];
    super::for_each_window_row(data, w, params.radius as usize, &mut out, |y, m, v, o| {
        lee_row(&data[y * w..(y + 1) * w], m, v, cu2, o)
    });
    Array2::from_shape_vec((h, w), out).map_err(|e| {
        crate::kernels::KernelError::InvalidParameter {
            name: "lee",
            reason: e.to_string(),
        }
        .into()
    })
}

/// Queues the kernel on a GPU chain.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, params: &Params) -> crate::Result<()> {
    super::encode_2d(chain, "lee", SHADER, "lee", params)
}
