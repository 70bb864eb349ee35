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
            return Err(crate::Error::InvalidParameter { name: "search/patch", reason: format!("{search}/{patch} (odd)") });
        }
        if search / 2 + patch / 2 > MAX_APRON {
            return Err(crate::Error::InvalidParameter {
                name: "search/patch",
                reason: format!("search/2 + patch/2 = {} exceeds {MAX_APRON}", search / 2 + patch / 2),
            });
        }
        if !(h > 0.0 && h < 1000.0) {
            return Err(crate::Error::InvalidParameter { name: "h", reason: format!("{h} (0..1000)") });
        }
        Ok(Params { width: 0, height: 0, search_radius: search / 2, patch_radius: patch / 2, h, pad0: [0.0; 3] })
    }
}

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

struct Acc {
    wsum: Vec<f32>,
    vsum: Vec<f32>,
    wmax: Vec<f32>,
}

/// The CPU production path: per search offset, the Pearson terms of the whole (padded) image,
/// then separable (2P+1) sums along rows and columns give every patch distance at once.
pub fn cpu_fast(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("obnlm", img)?;
    let (h, w) = img.dim();
    let s = params.search_radius as isize;
    let pr = params.patch_radius as isize;
    let npatch = ((2 * pr + 1) * (2 * pr + 1)) as f32;
    let inv = 1.0 / (params.h * params.h * npatch);
    // Padded copy (clamp to edge) so that every read is a plain index.
    let pad = (s + pr) as usize;
    let (pw, ph) = (w + 2 * pad, h + 2 * pad);
    let padded: Vec<f32> = (0..ph * pw).map(|i| at(img, (i % pw) as isize - pad as isize, (i / pw) as isize - pad as isize)).collect();
    let offsets: Vec<(isize, isize)> = (-s..=s).flat_map(|sy| (-s..=s).map(move |sx| (sx, sy))).filter(|o| *o != (0, 0)).collect();
    let n = w * h;
    // Pearson terms live on the patch domain: output pixels ± P.
    let (dw, dh) = (w + 2 * pr as usize, h + 2 * pr as usize);
    let acc = offsets
        .par_iter()
        .fold(
            || (Acc { wsum: vec![0.0; n], vsum: vec![0.0; n], wmax: vec![0.0; n] }, vec![0f32; dw * dh], vec![0f32; w * dh]),
            |(mut acc, mut terms, mut rows), &(sx, sy)| {
                // terms[q] for q in the patch domain (origin at output (−P, −P)).
                let base = (pad as isize - pr) as usize;
                for qy in 0..dh {
                    let ra = (base + qy) * pw + base;
                    let rb = ((base + qy) as isize + sy) as usize * pw + (base as isize + sx) as usize;
                    for qx in 0..dw {
                        let a = padded[ra + qx];
                        let b = padded[rb + qx];
                        let diff = a - b;
                        terms[qy * dw + qx] = diff * diff / b.max(PEARSON_FLOOR);
                    }
                }
                // Sums along rows: rows[qy][x] = Σ_kx terms[qy][x + kx + P].
                let k = 2 * pr as usize + 1;
                for qy in 0..dh {
                    let t = &terms[qy * dw..(qy + 1) * dw];
                    let r = &mut rows[qy * w..(qy + 1) * w];
                    for (x, out) in r.iter_mut().enumerate() {
                        *out = t[x..x + k].iter().sum();
                    }
                }
                // Sums down columns give the patch distance; accumulate the weights.
                for y in 0..h {
                    for x in 0..w {
                        let mut d = 0.0f32;
                        for ky in 0..k {
                            d += rows[(y + ky) * w + x];
                        }
                        let wgt = (-d * inv).exp();
                        let i = y * w + x;
                        let v = padded[((y + pad) as isize + sy) as usize * pw + ((x + pad) as isize + sx) as usize];
                        acc.wsum[i] += wgt;
                        acc.vsum[i] += wgt * v;
                        acc.wmax[i] = acc.wmax[i].max(wgt);
                    }
                }
                (acc, terms, rows)
            },
        )
        .map(|(acc, _, _)| acc)
        .reduce_with(|mut a, b| {
            for i in 0..a.wsum.len() {
                a.wsum[i] += b.wsum[i];
                a.vsum[i] += b.vsum[i];
                a.wmax[i] = a.wmax[i].max(b.wmax[i]);
            }
            a
        });
    let Some(acc) = acc else {
        return Ok(img.clone());
    };
    Ok(par_image(h, w, |x, y| {
        let i = y * w + x;
        let mut wmax = acc.wmax[i];
        if wmax <= 0.0 {
            wmax = 1.0;
        }
        let centre = img[[y, x]];
        (acc.vsum[i] + wmax * centre) / (acc.wsum[i] + wmax)
    }))
}

/// Queues the kernel on a GPU chain.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, params: &Params) -> crate::Result<()> {
    let mut p = *params;
    p.width = chain.width() as u32;
    p.height = chain.height() as u32;
    let g = chain.groups_2d();
    chain.dispatch("obnlm", SHADER, "obnlm", &p, g, true)?;
    Ok(())
}
