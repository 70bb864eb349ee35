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

/// Output rows of a tile of the fast path.
const TILE_ROWS: usize = 32;
/// Output columns of a tile of the fast path: a tile's working set (its row sums for one
/// offset and three accumulators, about 35 kB at 32 × 64) stays in the nearest caches while
/// every search offset passes over it. Measured on 1024x768 (2-core AMD EPYC): 16 rows
/// 95 ms, 32 rows 72–84 ms, 64 rows 71–76 ms.
const TILE_COLS: usize = 64;

/// The fast path's working buffers of one tile.
struct Tile {
    /// Pearson terms of one q-domain row (`cols + 2P`).
    terms: Vec<f32>,
    /// Patch-row sums of the tile's q-domain rows (`(rows + 2P) × cols`).
    rowsum: Vec<f32>,
    /// Patch distances of one output row.
    d: Vec<f32>,
    /// Σ weights, Σ weight × value, largest weight (`rows × cols` each).
    acc_w: Vec<f32>,
    acc_v: Vec<f32>,
    acc_max: Vec<f32>,
}

/// Where a tile lies in the padded image, and the kernel's geometry.
#[derive(Clone, Copy)]
struct TileGeometry {
    /// Padded image width.
    pw: usize,
    /// Padding (S + P).
    pad: usize,
    /// First output row and column.
    y0: usize,
    x0: usize,
    /// Output rows and columns.
    rows: usize,
    cols: usize,
    /// Patch radius P.
    pr: usize,
    /// 1 / (h² |patch|).
    inv_h: f32,
}

/// `out[x] = Σ_{j<K} v[x + j]`: with `K` a constant the sum unrolls and the loop over `x`
/// vectorises.
#[inline(always)]
fn window_sum<const K: usize>(v: &[f32], out: &mut [f32]) {
    for (x, o) in out.iter_mut().enumerate() {
        let mut a = 0.0;
        for j in 0..K {
            a += v[x + j];
        }
        *o = a;
    }
}

/// [`window_sum`] for any `k`, unrolled for the patch sizes in use (1 to 15).
#[inline(always)]
fn window_sum_k(k: usize, v: &[f32], out: &mut [f32]) {
    match k {
        1 => window_sum::<1>(v, out),
        3 => window_sum::<3>(v, out),
        5 => window_sum::<5>(v, out),
        7 => window_sum::<7>(v, out),
        9 => window_sum::<9>(v, out),
        _ => {
            for (x, o) in out.iter_mut().enumerate() {
                *o = v[x..x + k].iter().sum();
            }
        }
    }
}

multiversion! {
    /// Adds one search offset's weights to a tile's accumulators.
    fn tile_offset(padded: &[f32], inv: &[f32], g: TileGeometry, off: (isize, isize), t: &mut Tile) {
        let TileGeometry { pw, pad, y0, x0, rows, cols, pr, inv_h } = g;
        let (sx, sy) = off;
        let k = 2 * pr + 1;
        let dw = cols + 2 * pr;
        let shift = sy * pw as isize + sx;
        for qy in 0..rows + 2 * pr {
            // q-domain row qy is output row y0 + qy − P: padded row y0 + qy − P + pad.
            let pa = (y0 + qy + pad - pr) * pw + x0 + pad - pr;
            let pb = (pa as isize + shift) as usize;
            let (ra, rb, ib) = (&padded[pa..pa + dw], &padded[pb..pb + dw], &inv[pb..pb + dw]);
            let tr = &mut t.terms[..dw];
            for q in 0..dw {
                let d = ra[q] - rb[q];
                tr[q] = d * d * ib[q];
            }
            window_sum_k(k, tr, &mut t.rowsum[qy * cols..(qy + 1) * cols]);
        }
        let d = &mut t.d[..cols];
        for r in 0..rows {
            if r == 0 {
                // The first row's patch sums in full; later rows slide: one row in, one out.
                d.copy_from_slice(&t.rowsum[..cols]);
                for ky in 1..k {
                    let rk = &t.rowsum[ky * cols..(ky + 1) * cols];
                    for x in 0..cols {
                        d[x] += rk[x];
                    }
                }
            } else {
                let (gone, new) = (&t.rowsum[(r - 1) * cols..r * cols], &t.rowsum[(r + k - 1) * cols..(r + k) * cols]);
                for x in 0..cols {
                    d[x] += new[x] - gone[x];
                }
            }
            let base = (y0 + r + pad) * pw + x0 + pad;
            let vrow = &padded[(base as isize + shift) as usize..][..cols];
            let o = r * cols;
            let (aw, av, am) = (&mut t.acc_w[o..o + cols], &mut t.acc_v[o..o + cols], &mut t.acc_max[o..o + cols]);
            for x in 0..cols {
                // Sliding sums can leave a rounding error below zero; a distance is ≥ 0.
                let wgt = exp_neg(-d[x].max(0.0) * inv_h);
                aw[x] += wgt;
                av[x] += wgt * vrow[x];
                am[x] = if wgt > am[x] { wgt } else { am[x] };
            }
        }
    }
}

/// The CPU production path: for each tile of output pixels and each search offset, the
/// Pearson terms of the tile, then separable (2P+1) sums along rows and columns give every
/// patch distance of the tile at once (cost independent of the patch size); tiles small enough
/// to stay in the L1 cache, in parallel; AVX2 where the CPU has it, a vectorised `exp`.
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
    let (bands, strips) = (h.div_ceil(TILE_ROWS), w.div_ceil(TILE_COLS));
    let tiles: Vec<(usize, usize, Vec<f32>)> = (0..bands * strips)
        .into_par_iter()
        .map(|i| {
            let (y0, x0) = ((i / strips) * TILE_ROWS, (i % strips) * TILE_COLS);
            let (rows, cols) = (TILE_ROWS.min(h - y0), TILE_COLS.min(w - x0));
            let g = TileGeometry {
                pw,
                pad,
                y0,
                x0,
                rows,
                cols,
                pr,
                inv_h,
            };
            let mut t = Tile {
                terms: vec![0f32; cols + 2 * pr],
                rowsum: vec![0f32; (rows + 2 * pr) * cols],
                d: vec![0f32; cols],
                acc_w: vec![0f32; rows * cols],
                acc_v: vec![0f32; rows * cols],
                acc_max: vec![0f32; rows * cols],
            };
            for &off in &offsets {
                tile_offset(&padded, &inv, g, off, &mut t);
            }
            let mut out = vec![0f32; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    let i = r * cols + c;
                    let wmax = if t.acc_max[i] <= 0.0 {
                        1.0
                    } else {
                        t.acc_max[i]
                    };
                    let centre = padded[(y0 + r + pad) * pw + pad + x0 + c];
                    out[i] = (t.acc_v[i] + wmax * centre) / (t.acc_w[i] + wmax);
                }
            }
            (y0, x0, out)
        })
        .collect();
    let mut out = vec![0f32; w * h];
    for (y0, x0, tile) in tiles {
        let cols = TILE_COLS.min(w - x0);
        for (r, row) in tile.chunks_exact(cols).enumerate() {
            out[(y0 + r) * w + x0..][..cols].copy_from_slice(row);
        }
    }
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
