//! Speckle-reducing anisotropic diffusion (Yu & Acton, IEEE TIP 2002), in the discretisation
//! of the Rodinia benchmark. Per iteration:
//!
//! - q0² = var/mean² of a homogeneous region of interest (default: the whole image), taken
//!   afresh from the current image;
//! - for each pixel, with four-neighbour differences dN, dS, dW, dE of J:
//!   q² = (½ G² − (1/16) L²) / (1 + ¼ L)², G² = Σd²/J², L = Σd/J,
//!   c = clamp(1 / (1 + (q² − q0²) / (q0² (1 + q0²))), 0, 1);
//! - J' = J + λ/4 (c·dN + c_S·dS + c·dW + c_E·dE), c_S and c_E the south and east
//!   neighbours' coefficients.
//!
//! Edges clamped; intensities floored at 1 grey level so that black shadows stay finite.
//! Shader: `shaders/srad.wgsl` (three entry points per iteration).

use ndarray::Array2;
use rayon::prelude::*;

use super::{at, check_image, par_image};

/// Floor on intensities in the ratios (grey levels); same constant as the shader.
pub const INTENSITY_FLOOR: f32 = 1.0;
/// Floor on q0² (a perfectly flat ROI); same constant as the shader.
pub const Q0_FLOOR: f32 = 1e-6;
/// Most iterations accepted (three dispatches each must fit one submit).
pub const MAX_ITERATIONS: u32 = 300;

/// Parameters; keep in sync with `Params` in shaders/srad.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns (set by the dispatcher).
    pub width: u32,
    /// Rows (set by the dispatcher).
    pub height: u32,
    /// ROI first column.
    pub roi_x0: u32,
    /// ROI first row.
    pub roi_y0: u32,
    /// ROI width (0 = the whole image).
    pub roi_w: u32,
    /// ROI height (0 = the whole image).
    pub roi_h: u32,
    /// Padding.
    pub pad0: [u32; 2],
    /// Time step λ (stable for λ ≤ 1 with this four-neighbour scheme; ¼ is folded in).
    pub lambda: f32,
    /// Padding.
    pub pad1: [f32; 3],
}

/// Iterations and parameters of a SRAD run.
#[derive(Debug, Clone, Copy)]
pub struct Srad {
    /// Per-iteration parameters.
    pub params: Params,
    /// Number of iterations.
    pub iterations: u32,
}

impl Srad {
    /// SRAD with time step `lambda` (0 < λ ≤ 1) for `iterations` (1..=300), q0 from the
    /// whole image.
    pub fn new(lambda: f32, iterations: u32) -> crate::Result<Srad> {
        if !(lambda > 0.0 && lambda <= 1.0) {
            return Err(crate::Error::InvalidParameter { name: "lambda", reason: format!("{lambda} (0..1]") });
        }
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(crate::Error::InvalidParameter { name: "iterations", reason: format!("{iterations} (1..{MAX_ITERATIONS})") });
        }
        let params = Params { width: 0, height: 0, roi_x0: 0, roi_y0: 0, roi_w: 0, roi_h: 0, pad0: [0; 2], lambda, pad1: [0.0; 3] };
        Ok(Srad { params, iterations })
    }

    /// Takes q0 from the ROI (x0, y0, w, h) instead of the whole image.
    pub fn with_roi(mut self, x0: u32, y0: u32, w: u32, h: u32) -> Srad {
        self.params.roi_x0 = x0;
        self.params.roi_y0 = y0;
        self.params.roi_w = w;
        self.params.roi_h = h;
        self
    }

    /// The parameters for a frame of `width` × `height`, ROI clipped to it.
    fn resolved(&self, width: usize, height: usize) -> Params {
        let mut p = self.params;
        p.width = width as u32;
        p.height = height as u32;
        if p.roi_w == 0 || p.roi_h == 0 || p.roi_x0 >= p.width || p.roi_y0 >= p.height {
            p.roi_x0 = 0;
            p.roi_y0 = 0;
            p.roi_w = p.width;
            p.roi_h = p.height;
        }
        p.roi_w = p.roi_w.min(p.width - p.roi_x0);
        p.roi_h = p.roi_h.min(p.height - p.roi_y0);
        p
    }
}

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/srad.wgsl");

/// q0² of the ROI, as the shader's `srad_stats` computes it: 256 strided partial sums, then
/// a tree reduction.
pub fn q0_squared(img: &Array2<f32>, p: &Params) -> f32 {
    let n = (p.roi_w * p.roi_h) as usize;
    let w = img.ncols();
    let data = img.as_slice();
    let value = |i: usize| {
        let x = p.roi_x0 as usize + i % p.roi_w as usize;
        let y = p.roi_y0 as usize + i / p.roi_w as usize;
        match data {
            Some(d) => d[y * w + x],
            None => img[[y, x]],
        }
    };
    let mut parts: Vec<(f32, f32)> = (0..256usize)
        .into_par_iter()
        .map(|t| {
            let (mut s, mut q) = (0.0f32, 0.0f32);
            let mut i = t;
            while i < n {
                let v = value(i);
                s += v;
                q += v * v;
                i += 256;
            }
            (s, q)
        })
        .collect();
    let mut stride = 128;
    while stride > 0 {
        for t in 0..stride {
            parts[t].0 += parts[t + stride].0;
            parts[t].1 += parts[t + stride].1;
        }
        stride /= 2;
    }
    let mean = parts[0].0 / n as f32;
    let variance = (parts[0].1 / n as f32 - mean * mean).max(0.0);
    (variance / (mean * mean).max(Q0_FLOOR)).max(Q0_FLOOR)
}

#[inline]
fn floored(img: &Array2<f32>, x: isize, y: isize) -> f32 {
    at(img, x, y).max(INTENSITY_FLOOR)
}

/// One iteration's diffusion coefficients.
pub fn coefficients(img: &Array2<f32>, q02: f32) -> Array2<f32> {
    let (h, w) = img.dim();
    par_image(h, w, |x, y| {
        let (x, y) = (x as isize, y as isize);
        let j = floored(img, x, y);
        let dn = floored(img, x, y - 1) - j;
        let ds = floored(img, x, y + 1) - j;
        let dw = floored(img, x - 1, y) - j;
        let de = floored(img, x + 1, y) - j;
        let g2 = (dn * dn + ds * ds + dw * dw + de * de) / (j * j);
        let l = (dn + ds + dw + de) / j;
        let num = 0.5 * g2 - 0.0625 * l * l;
        let den = (1.0 + 0.25 * l) * (1.0 + 0.25 * l);
        let q2 = num / den;
        let c = 1.0 / (1.0 + (q2 - q02) / (q02 * (1.0 + q02)));
        c.clamp(0.0, 1.0)
    })
}

/// One iteration's update.
pub fn update(img: &Array2<f32>, c: &Array2<f32>, lambda: f32) -> Array2<f32> {
    let (h, w) = img.dim();
    par_image(h, w, |x, y| {
        let (xi, yi) = (x as isize, y as isize);
        let j = floored(img, xi, yi);
        let dn = floored(img, xi, yi - 1) - j;
        let ds = floored(img, xi, yi + 1) - j;
        let dw = floored(img, xi - 1, yi) - j;
        let de = floored(img, xi + 1, yi) - j;
        let cc = at(c, xi, yi);
        let cs = at(c, xi, yi + 1);
        let ce = at(c, xi + 1, yi);
        let d = cc * dn + cs * ds + cc * dw + ce * de;
        j + 0.25 * lambda * d
    })
}

/// CPU twin: all iterations.
pub fn cpu(img: &Array2<f32>, srad: &Srad) -> crate::Result<Array2<f32>> {
    check_image("srad", img)?;
    let (h, w) = img.dim();
    let p = srad.resolved(w, h);
    let mut cur = img.clone();
    for _ in 0..srad.iterations {
        let q02 = q0_squared(&cur, &p);
        let c = coefficients(&cur, q02);
        cur = update(&cur, &c, p.lambda);
    }
    Ok(cur)
}

/// Queues all iterations on a GPU chain.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, srad: &Srad) -> crate::Result<()> {
    let p = srad.resolved(chain.width(), chain.height());
    let g = chain.groups_2d();
    for _ in 0..srad.iterations {
        chain.dispatch("srad", SHADER, "srad_stats", &p, (1, 1), false)?;
        chain.dispatch("srad", SHADER, "srad_coeff", &p, g, false)?;
        chain.dispatch("srad", SHADER, "srad_update", &p, g, true)?;
    }
    Ok(())
}
