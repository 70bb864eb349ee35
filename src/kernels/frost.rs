//! Frost filter (Frost et al. 1982): an exponential kernel whose width adapts to the local
//! speckle: w = exp(−K · Ci² · |offset|), Ci² = var/m² of the window, out = Σ w I / Σ w.
//! K is the damping. Edges clamped. Shader: `shaders/frost.wgsl`.

use ndarray::Array2;

use super::{at, check_image, par_image, window_stats};

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
            return Err(crate::Error::InvalidParameter { name: "window", reason: format!("{window} (odd, 3..15)") });
        }
        if !(damping > 0.0 && damping < 100.0) {
            return Err(crate::Error::InvalidParameter { name: "damping", reason: format!("{damping} (0..100)") });
        }
        Ok(Params { width: 0, height: 0, radius: window / 2, pad0: 0, damping, pad1: [0.0; 3] })
    }
}

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

/// Queues the kernel on a GPU chain.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, params: &Params) -> crate::Result<()> {
    let mut p = *params;
    p.width = chain.width() as u32;
    p.height = chain.height() as u32;
    let g = chain.groups_2d();
    chain.dispatch("frost", SHADER, "frost", &p, g, true)?;
    Ok(())
}
