//! Frost filter (Frost et al. 1982): an exponential kernel whose width adapts to the local
//! speckle: w = exp(−K · Ci² · |offset|), Ci² = var/m² of the window, out = Σ w I / Σ w.
//! K is the damping. Edges clamped. Shader: `shaders/frost.wgsl`.

use ndarray::Array2;

use super::{at, check_image, par_image, window_stats};
use crate::simd::{exp_neg, multiversion};

/// Floor of m² in Ci²; same constant as the shader.
pub const MEAN_FLOOR: f32 = 1e-3;

/// Parameters; keep in sync with `Params` in shaders/frost.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns (set by the dispatcher).
    pub width: u32,
    /// Rows (set by the dispatcher).
    pub height: u32,
    /// Window radius.
    pub radius: u32,
    /// Padding.
    pub pad0: u32,
    /// Damping factor K.
    pub damping: f32,
    /// Padding.
    pub pad1: [f32; 3],
}

impl Params {
    /// A `window` × `window` Frost filter (odd, 3..=15) with damping `damping` (> 0).
    pub fn new(window: u32, damping: f32) -> crate::Result<Params> {
        if window % 2 == 0 || !(3..=15).contains(&window) {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "window",
                reason: format!("{window} (odd, 3..15)"),
            }
            .into());
        }
        if !(damping > 0.0 && damping < 100.0) {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "damping",
                reason: format!("{damping} (0..100)"),
            }
            .into());
        }
        Ok(Params {
            width: 0,
            height: 0,
            radius: window / 2,
            pad0: 0,
            damping,
            pad1: [0.0; 3],
        })
    }
}

super::frame_params!(Params);

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/frost.wgsl");

/// CPU twin.
pub fn cpu(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("frost", img)?;
    let r = params.radius as isize;
    let (h, w) = img.dim();
    Ok(par_image(h, w, |x, y| {
        let (m, v) = window_stats(img, x, y, r);
        let ci2 = v / (m * m).max(MEAN_FLOOR);
        let k = params.damping * ci2;
        let (mut ws, mut vs) = (0.0f32, 0.0f32);
        for dy in -r..=r {
            for dx in -r..=r {
                let wgt = (-k * ((dx * dx + dy * dy) as f32).sqrt()).exp();
                ws += wgt;
                vs += wgt * at(img, x as isize + dx, y as isize + dy);
            }
        }
        vs / ws
    }))
}

multiversion! {
    /// One output row of the fast Frost filter.
    fn frost_row(pad: &[f32], pw: usize, y: usize, r: usize, k: &[f32], out: &mut [f32], wsum: &mut [f32]) {
        let w = out.len();
        out.iter_mut().for_each(|v| *v = 0.0);
        wsum.iter_mut().for_each(|v| *v = 0.0);
        for dy in 0..2 * r + 1 {
            let row = &pad[(y + dy) * pw..(y + dy + 1) * pw];
            for dx in 0..2 * r + 1 {
                let (ox, oy) = (dx as f32 - r as f32, dy as f32 - r as f32);
                let dist = (ox * ox + oy * oy).sqrt();
                let src = &row[dx..dx + w];
                for x in 0..w {
                    let wt = exp_neg(-k[x] * dist);
                    wsum[x] += wt;
                    out[x] += wt * src[x];
                }
            }
        }
        for x in 0..w {
            out[x] /= wsum[x];
        }
    }
}

/// The CPU production path: window statistics by separable running sums, the exponential
/// weights with a vectorised `exp`, AVX2 where the CPU has it, rows in parallel.
pub fn cpu_fast(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("frost", img)?;
    let (h, w) = img.dim();
    let r = params.radius as usize;
    let pad = super::padded(img, r);
    let pw = w + 2 * r;
    let data = super::flat(img);
    let mut out = vec![0f32; w * h];
    super::for_each_window_row(&data, w, r, &mut out, |y, mean, var, row| {
        let k: Vec<f32> = mean
            .iter()
            .zip(var)
            .map(|(m, v)| params.damping * v / (m * m).max(MEAN_FLOOR))
            .collect();
        let mut wsum = vec![0f32; w];
        frost_row(&pad, pw, y, r, &k, row, &mut wsum);
    });
    Array2::from_shape_vec((h, w), out).map_err(|e| {
        crate::kernels::KernelError::InvalidParameter {
            name: "frost",
            reason: e.to_string(),
        }
        .into()
    })
}

/// Queues the kernel on a GPU chain.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, params: &Params) -> crate::Result<()> {
    super::encode_2d(chain, "frost", SHADER, "frost", params)
}
