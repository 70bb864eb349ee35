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

use std::mem::MaybeUninit;

use ndarray::Array2;
use rayon::prelude::*;

use super::{at, check_image, par_image};
use crate::simd::multiversion;

/// Floor on intensities in the ratios (grey levels); same constant as the shader.
pub const INTENSITY_FLOOR: f32 = 1.0;
/// Floor on q0² (a perfectly flat ROI); same constant as the shader.
pub const Q0_FLOOR: f32 = 1e-6;
/// Where the per-workgroup partial sums start in the `stats` buffer; same as the shader's
/// `PARTIALS`.
pub const PARTIALS_OFFSET: u64 = 4;
/// Most iterations accepted (three dispatches each, and one more for the first, must fit one
/// submit: see `gpu::MAX_DISPATCHES`).
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
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "lambda",
                reason: format!("{lambda} (0..1]"),
            }
            .into());
        }
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "iterations",
                reason: format!("{iterations} (1..{MAX_ITERATIONS})"),
            }
            .into());
        }
        let params = Params {
            width: 0,
            height: 0,
            roi_x0: 0,
            roi_y0: 0,
            roi_w: 0,
            roi_h: 0,
            pad0: [0; 2],
            lambda,
            pad1: [0.0; 3],
        };
        Ok(Srad { params, iterations })
    }

    /// Takes q0 from the ROI (x0, y0, w, h) instead of the whole image. In the pipeline the
    /// image is the frame's imaging region (its bounding rectangle), so the ROI counts from
    /// the region's corner.
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

/// q0² of the ROI: 256 strided partial sums, then a tree reduction (the shader sums per
/// 16 × 16 tile first, then the tiles' sums in the same way: the same value up to rounding).
pub fn q0_squared(img: &Array2<f32>, p: &Params) -> f32 {
    match img.as_slice() {
        Some(d) => q0_squared_flat(d, img.ncols(), p),
        None => q0_squared_flat(&img.iter().copied().collect::<Vec<f32>>(), img.ncols(), p),
    }
}

/// [`q0_squared`] of a row-major buffer `w` columns wide.
pub fn q0_squared_flat(data: &[f32], w: usize, p: &Params) -> f32 {
    let n = (p.roi_w * p.roi_h) as usize;
    let value = |i: usize| {
        let x = p.roi_x0 as usize + i % p.roi_w as usize;
        let y = p.roi_y0 as usize + i / p.roi_w as usize;
        data[y * w + x]
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

multiversion! {
    /// Diffusion coefficients of row `y`; intensities are floored as they are read (the
    /// first iteration reads the caller's image directly).
    fn coeff_row(img: &[f32], w: usize, h: usize, y: usize, q02: f32, c: &mut [f32]) {
        let up = &img[y.saturating_sub(1) * w..][..w];
        let mid = &img[y * w..][..w];
        let down = &img[(y + 1).min(h - 1) * w..][..w];
        let k = 1.0 / (q02 * (1.0 + q02));
        let f = INTENSITY_FLOOR;
        let one = |j: f32, n: f32, s: f32, wv: f32, e: f32| {
            let j = j.max(f);
            let (dn, ds, dw, de) = (n.max(f) - j, s.max(f) - j, wv.max(f) - j, e.max(f) - j);
            let inv = 1.0 / j;
            let g2 = (dn * dn + ds * ds + dw * dw + de * de) * inv * inv;
            let l = (dn + ds + dw + de) * inv;
            let num = 0.5 * g2 - 0.0625 * l * l;
            let den = (1.0 + 0.25 * l) * (1.0 + 0.25 * l);
            // c = 1 / (1 + (num/den − q0²) k), with one division.
            let cc = den / (den + (num - q02 * den) * k);
            cc.clamp(0.0, 1.0)
        };
        if w == 1 {
            c[0] = one(mid[0], up[0], down[0], mid[0], mid[0]);
            return;
        }
        c[0] = one(mid[0], up[0], down[0], mid[0], mid[1]);
        for x in 1..w - 1 {
            c[x] = one(mid[x], up[x], down[x], mid[x - 1], mid[x + 1]);
        }
        c[w - 1] = one(mid[w - 1], up[w - 1], down[w - 1], mid[w - 2], mid[w - 1]);
    }
}

multiversion! {
    /// Updates row `y` from its coefficients `c` and the next row's `c_south` (intensities
    /// floored as they are read) into `out`, copies it into `slots` (the destination row) and
    /// returns the sum and sum of squares of the new row (for the next iteration's q0).
    fn update_row(img: &[f32], w: usize, h: usize, y: usize, c: &[f32], c_south: &[f32], lambda: f32, out: &mut [f32], slots: &mut [MaybeUninit<f32>]) -> (f64, f64) {
        let f = INTENSITY_FLOOR;
        let up = &img[y.saturating_sub(1) * w..][..w];
        let mid = &img[y * w..][..w];
        let down = &img[(y + 1).min(h - 1) * w..][..w];
        let step = 0.25 * lambda;
        let one = |x: usize, xl: usize, xr: usize| {
            let j = mid[x].max(f);
            let d = c[x] * (up[x].max(f) - j) + c_south[x] * (down[x].max(f) - j) + c[x] * (mid[xl].max(f) - j) + c[xr] * (mid[xr].max(f) - j);
            // Every value stays ≥ the floor (λ ≤ 1); the max only guards f32 rounding.
            (j + step * d).max(f)
        };
        out[0] = one(0, 0, 1.min(w - 1));
        if w > 1 {
            out[w - 1] = one(w - 1, w - 2, w - 1);
        }
        if w > 2 {
            // Interior: plain shifted slices, so the loop vectorises.
            let (ml, mr, cr) = (&mid[..w - 2], &mid[2..], &c[2..]);
            let (m, u, dn, cc, cs) = (&mid[1..w - 1], &up[1..w - 1], &down[1..w - 1], &c[1..w - 1], &c_south[1..w - 1]);
            let o = &mut out[1..w - 1];
            for i in 0..w - 2 {
                let j = m[i].max(f);
                let d = cc[i] * (u[i].max(f) - j) + cs[i] * (dn[i].max(f) - j) + cc[i] * (ml[i].max(f) - j) + cr[i] * (mr[i].max(f) - j);
                o[i] = (j + step * d).max(f);
            }
        }
        for (slot, v) in slots.iter_mut().zip(out.iter()) {
            slot.write(*v);
        }
        row_sums(out)
    }
}

/// Sum and sum of squares of a row: eight f32 lanes (so that the loop vectorises), summed in
/// f64 at the end (a row is short: the f32 lanes keep about 1e-6 of relative precision).
#[inline(always)]
fn row_sums(v: &[f32]) -> (f64, f64) {
    let (mut s, mut q) = ([0f32; 8], [0f32; 8]);
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            s[l] += c[l];
            q[l] += c[l] * c[l];
        }
    }
    let (mut s64, mut q64) = (0f64, 0f64);
    for l in 0..8 {
        s64 += s[l] as f64;
        q64 += q[l] as f64;
    }
    for x in chunks.remainder() {
        s64 += *x as f64;
        q64 += (*x as f64) * (*x as f64);
    }
    (s64, q64)
}

multiversion! {
    /// [`row_sums`] over a band of rows, AVX2 where the CPU has it.
    fn band_sums(v: &[f32]) -> (f64, f64) {
        row_sums(v)
    }
}

/// q0² from the sums of the whole image (the fast path's form).
fn q0_from_sums(sum: f64, sumsq: f64, n: usize) -> f32 {
    let mean = sum / n as f64;
    let variance = (sumsq / n as f64 - mean * mean).max(0.0);
    ((variance / (mean * mean).max(Q0_FLOOR as f64)) as f32).max(Q0_FLOOR)
}

/// Rows per parallel band of the fast path (each band recomputes one row of coefficients at
/// its lower edge).
const BAND_ROWS: usize = 32;

thread_local! {
    /// The fast path's second image buffer, kept between calls on the same thread so that a
    /// call costs no allocation beyond its output (a video's frames reuse it).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One iteration of the fast path: `src` → `dst` (its contents replaced, `n` values) in bands
/// of rows, coefficients computed a row ahead and never stored whole; returns the sums of the
/// new image. `dst` is written without being zeroed first.
fn iterate(
    src: &[f32],
    dst: &mut Vec<f32>,
    w: usize,
    h: usize,
    q02: f32,
    lambda: f32,
) -> (f64, f64) {
    let n = w * h;
    dst.clear();
    dst.reserve(n);
    let sums = dst.spare_capacity_mut()[..n]
        .par_chunks_mut(BAND_ROWS * w)
        .enumerate()
        .map(|(b, band)| {
            let y0 = b * BAND_ROWS;
            let rows = band.len() / w;
            let mut c = vec![0f32; w];
            let mut cs = vec![0f32; w];
            let mut row = vec![0f32; w];
            coeff_row(src, w, h, y0, q02, &mut c);
            let (mut s, mut q) = (0.0, 0.0);
            for r in 0..rows {
                let y = y0 + r;
                coeff_row(src, w, h, (y + 1).min(h - 1), q02, &mut cs);
                let slots = &mut band[r * w..(r + 1) * w];
                let (rs, rq) = update_row(src, w, h, y, &c, &cs, lambda, &mut row, slots);
                s += rs;
                q += rq;
                std::mem::swap(&mut c, &mut cs);
            }
            (s, q)
        })
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    // SAFETY: the bands cover the n slots, and each band wrote every slot of every one of its
    // rows (`update_row` writes a whole row), so all n values are initialised.
    unsafe { dst.set_len(n) };
    sums
}

/// The CPU production path: each iteration is one pass over the image in bands of rows, with
/// q0's sums gathered while writing, AVX2 where the CPU has it. The first iteration reads the
/// caller's image (floored as read), the iterations alternate between the output and a
/// scratch buffer kept per thread so that the last one lands in the output: a call's only
/// set-up is the first q0 (one read of the input). Tested against [`cpu`].
pub fn cpu_fast(img: &Array2<f32>, srad: &Srad) -> crate::Result<Array2<f32>> {
    check_image("srad", img)?;
    let (h, w) = img.dim();
    let p = srad.resolved(w, h);
    let whole = p.roi_x0 == 0 && p.roi_y0 == 0 && p.roi_w as usize == w && p.roi_h as usize == h;
    let input = super::flat(img);
    let input: &[f32] = &input;
    // The twin takes the first q0 from the unfloored input; so does this (for the whole image
    // by band sums in parallel, rather than the shader's 256 strided partial sums).
    let mut q02 = if whole {
        let (s, q) = input
            .par_chunks(BAND_ROWS * w)
            .map(band_sums)
            .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        q0_from_sums(s, q, w * h)
    } else {
        q0_squared_flat(input, w, &p)
    };
    let mut out = Vec::new();
    let n = srad.iterations as usize;
    let mut run = |scratch: &mut Vec<f32>| {
        for it in 0..n {
            // Iteration it writes the output when n − it is odd (so the last one does).
            let into_out = (n - it) % 2 == 1;
            let sums = match (it, into_out) {
                (0, true) => iterate(input, &mut out, w, h, q02, p.lambda),
                (0, false) => iterate(input, scratch, w, h, q02, p.lambda),
                (_, true) => iterate(scratch, &mut out, w, h, q02, p.lambda),
                (_, false) => iterate(&out, scratch, w, h, q02, p.lambda),
            };
            if it + 1 < n {
                q02 = if whole {
                    q0_from_sums(sums.0, sums.1, w * h)
                } else if into_out {
                    q0_squared_flat(&out, w, &p)
                } else {
                    q0_squared_flat(scratch, w, &p)
                };
            }
        }
    };
    // A thread waiting on Rayon may run another frame's SRAD meanwhile: that nested call finds
    // the buffer in use and takes a fresh one.
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => run(&mut scratch),
        Err(_) => run(&mut Vec::new()),
    });
    Array2::from_shape_vec((h, w), out).map_err(|e| {
        crate::kernels::KernelError::InvalidParameter {
            name: "srad",
            reason: e.to_string(),
        }
        .into()
    })
}

/// Queues all iterations on a GPU chain.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, srad: &Srad) -> crate::Result<()> {
    let p = srad.resolved(chain.width(), chain.height());
    let g = chain.groups_2d();
    for it in 0..srad.iterations {
        // q0 from per-tile partial sums: of the input first (every tile in parallel), later
        // those the previous update left behind.
        if it == 0 {
            chain.dispatch("srad", SHADER, "srad_partials", &p, g, false)?;
        }
        chain.dispatch("srad", SHADER, "srad_reduce", &p, (1, 1), false)?;
        chain.dispatch("srad", SHADER, "srad_coeff", &p, g, false)?;
        chain.dispatch("srad", SHADER, "srad_update", &p, g, true)?;
    }
    Ok(())
}
