//! Optimized Bayesian non-local means for speckle (Coupé, Hellier, Kervrann, Barillot, IEEE
//! TIP 2009), pixelwise. Speckle in displayed ultrasound is modelled as u = v + √v·η, so
//! patches are compared with the Pearson distance
//! d(i, j) = Σ_k (u(i+k) − u(j+k))² / u(j+k) over the (2P+1)² patch, and
//! w(i, j) = exp(−d / (h² |patch|)); the centre pixel weighs as much as the best other pixel;
//! out(i) = Σ_j w u(j) / Σ_j w over the (2S+1)² search window. Edges clamped.
//!
//! Three implementations: [`cpu`] (the twin: per pixel, in the shader's order),
//! [`cpu_fast`] (for each search offset, the Pearson terms of the whole image then separable
//! patch sums: cost independent of the patch size, offsets in parallel), and the shader
//! `shaders/obnlm.wgsl` (workgroup tiles in shared memory).

use ndarray::Array2;
use rayon::prelude::*;

use super::{at, check_image, par_image};
use crate::simd::{exp_neg, multiversion};

/// Floor of the Pearson denominator (grey levels); same constant as the shader.
pub const PEARSON_FLOOR: f32 = 1.0;
/// Largest S + P the shader's tile holds.
pub const MAX_APRON: u32 = 13;

/// Parameters; keep in sync with `Params` in shaders/obnlm.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns (set by the dispatcher).
    pub width: u32,
    /// Rows (set by the dispatcher).
    pub height: u32,
    /// Search window radius S (window = 2S+1).
    pub search_radius: u32,
    /// Patch radius P (patch = 2P+1).
    pub patch_radius: u32,
    /// Smoothing h.
    pub h: f32,
    /// Padding.
    pub pad0: [f32; 3],
}

impl Params {
    /// OBNLM with a `search` × `search` window, `patch` × `patch` patches (both odd) and
    /// smoothing `h`.
    pub fn new(search: u32, patch: u32, h: f32) -> crate::Result<Params> {
        if search % 2 == 0 || search < 3 || patch % 2 == 0 || patch < 1 {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "search/patch",
                reason: format!("{search}/{patch} (odd)"),
            }
            .into());
        }
        if search / 2 + patch / 2 > MAX_APRON {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "search/patch",
                reason: format!(
                    "search/2 + patch/2 = {} exceeds {MAX_APRON}",
                    search / 2 + patch / 2
                ),
            }
            .into());
        }
        if !(h > 0.0 && h < 1000.0) {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "h",
                reason: format!("{h} (0..1000)"),
            }
            .into());
        }
        Ok(Params {
            width: 0,
            height: 0,
            search_radius: search / 2,
            patch_radius: patch / 2,
            h,
            pad0: [0.0; 3],
        })
    }
}

super::frame_params!(Params);

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/obnlm.wgsl");

/// CPU twin (the specification): per pixel, in the shader's order.
pub fn cpu(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("obnlm", img)?;
    let (h, w) = img.dim();
    let s = params.search_radius as isize;
    let pr = params.patch_radius as isize;
    let npatch = ((2 * pr + 1) * (2 * pr + 1)) as f32;
    let inv = 1.0 / (params.h * params.h * npatch);
    Ok(par_image(h, w, |x, y| {
        let (x, y) = (x as isize, y as isize);
        let (mut wsum, mut vsum, mut wmax) = (0.0f32, 0.0f32, 0.0f32);
        for sy in -s..=s {
            for sx in -s..=s {
                if sx == 0 && sy == 0 {
                    continue;
                }
                let mut d = 0.0f32;
                for ky in -pr..=pr {
                    for kx in -pr..=pr {
                        let a = at(img, x + kx, y + ky);
                        let b = at(img, x + sx + kx, y + sy + ky);
                        let diff = a - b;
                        d += diff * diff / b.max(PEARSON_FLOOR);
                    }
                }
                let wgt = (-d * inv).exp();
                wsum += wgt;
                vsum += wgt * at(img, x + sx, y + sy);
                wmax = wmax.max(wgt);
            }
        }
        let centre = at(img, x, y);
        if wmax <= 0.0 {
            wmax = 1.0;
        }
        wsum += wmax;
        vsum += wmax * centre;
        vsum / wsum
    }))
}

/// Output rows per band of the fast path: a band's working set (Pearson terms, row sums and
/// three accumulators) stays in the L2 cache while all search offsets pass over it.
const BAND_ROWS: usize = 16;

multiversion! {
    /// Adds one search offset's weights to a band of output rows.
    fn band_offset(
        padded: &[f32],
        inv: &[f32],
        pw: usize,
        pad: usize,
        w: usize,
        y0: usize,
        rows: usize,
        pr: usize,
        off: (isize, isize),
        inv_h: f32,
        terms: &mut [f32],
        rowsum: &mut [f32],
        acc: (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let (sx, sy) = off;
        let (acc_w, acc_v, acc_max) = acc;
        let k = 2 * pr + 1;
        let dw = w + 2 * pr;
        let shift = sy * pw as isize + sx;
        for qy in 0..rows + 2 * pr {
            // q-domain row qy is output row y0 + qy − P: padded row y0 + qy − P + pad.
            let pa = (y0 + qy + pad - pr) * pw + pad - pr;
            let pb = (pa as isize + shift) as usize;
            let (ra, rb, ib) = (&padded[pa..pa + dw], &padded[pb..pb + dw], &inv[pb..pb + dw]);
            let t = &mut terms[qy * dw..(qy + 1) * dw];
            for q in 0..dw {
                let d = ra[q] - rb[q];
                t[q] = d * d * ib[q];
            }
            let rs = &mut rowsum[qy * w..(qy + 1) * w];
            rs.copy_from_slice(&t[..w]);
            for kx in 1..k {
                let tk = &t[kx..kx + w];
                for x in 0..w {
                    rs[x] += tk[x];
                }
            }
        }
        for r in 0..rows {
            let base = (y0 + r + pad) * pw + pad;
            let vrow = &padded[(base as isize + shift) as usize..][..w];
            let o = r * w;
            let (aw, av, am) = (&mut acc_w[o..o + w], &mut acc_v[o..o + w], &mut acc_max[o..o + w]);
            let first = &rowsum[r * w..(r + 1) * w];
            let mut d: Vec<f32> = first.to_vec();
            for ky in 1..k {
                let rk = &rowsum[(r + ky) * w..(r + ky + 1) * w];
                for x in 0..w {
                    d[x] += rk[x];
                }
            }
            for x in 0..w {
                let wgt = exp_neg(-d[x] * inv_h);
                aw[x] += wgt;
                av[x] += wgt * vrow[x];
                am[x] = if wgt > am[x] { wgt } else { am[x] };
            }
        }
    }
}

/// The CPU production path: for each band of rows and each search offset, the Pearson terms
/// of the band, then separable (2P+1) sums along rows and columns give every patch distance
/// of the band at once; bands in parallel, AVX2 where the CPU has it, a vectorised `exp`.
pub fn cpu_fast(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("obnlm", img)?;
    let (h, w) = img.dim();
    let s = params.search_radius as isize;
    let pr = params.patch_radius as usize;
    let npatch = ((2 * pr + 1) * (2 * pr + 1)) as f32;
    let inv_h = 1.0 / (params.h * params.h * npatch);
    let pad = s as usize + pr;
    let pw = w + 2 * pad;
    let padded = super::padded(img, pad);
    let inv: Vec<f32> = padded.iter().map(|v| 1.0 / v.max(PEARSON_FLOOR)).collect();
    let offsets: Vec<(isize, isize)> = (-s..=s)
        .flat_map(|sy| (-s..=s).map(move |sx| (sx, sy)))
        .filter(|o| *o != (0, 0))
        .collect();
    let mut out = vec![0f32; w * h];
    out.par_chunks_mut(BAND_ROWS * w)
        .enumerate()
        .for_each(|(b, band)| {
            let y0 = b * BAND_ROWS;
            let rows = band.len() / w;
            let mut terms = vec![0f32; (rows + 2 * pr) * (w + 2 * pr)];
            let mut rowsum = vec![0f32; (rows + 2 * pr) * w];
            let (mut aw, mut av, mut am) = (
                vec![0f32; rows * w],
                vec![0f32; rows * w],
                vec![0f32; rows * w],
            );
            for &off in &offsets {
                band_offset(
                    &padded,
                    &inv,
                    pw,
                    pad,
                    w,
                    y0,
                    rows,
                    pr,
                    off,
                    inv_h,
                    &mut terms,
                    &mut rowsum,
                    (&mut aw, &mut av, &mut am),
                );
            }
            for r in 0..rows {
                for x in 0..w {
                    let i = r * w + x;
                    let wmax = if am[i] <= 0.0 { 1.0 } else { am[i] };
                    let centre = padded[(y0 + r + pad) * pw + pad + x];
                    band[i] = (av[i] + wmax * centre) / (aw[i] + wmax);
                }
            }
        });
    Array2::from_shape_vec((h, w), out).map_err(|e| {
        crate::kernels::KernelError::InvalidParameter {
            name: "obnlm",
            reason: e.to_string(),
        }
        .into()
    })
}

/// Queues the kernel on a GPU chain.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, params: &Params) -> crate::Result<()> {
    super::encode_2d(chain, "obnlm", SHADER, "obnlm", params)
}
