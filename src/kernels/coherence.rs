//! Structure-tensor coherence and orientation: the central-difference gradient's tensor
//! summed over a (2r+1)² window; coherence ((Jxx−Jyy)² + 4Jxy²) / ((Jxx+Jyy)² + ε) in [0, 1]
//! (1 for a single dominant orientation: the fibrillar pattern of tendons), and the
//! orientation of the structure in (−π/2, π/2], 0 horizontal. Edges clamped.
//! Shader: `shaders/coherence.wgsl` (coherence in `dst`, orientation in `aux`).

use std::f32::consts::FRAC_PI_2;

use ndarray::Array2;
use rayon::prelude::*;

use super::{at, check_image, par_image};

/// ε in the coherence's denominator; same constant as the shader.
pub const TENSOR_EPSILON: f32 = 1e-3;

/// Parameters; keep in sync with `Params` in shaders/coherence.wgsl.
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
}

impl Params {
    /// A tensor summed over a (2r+1)² window, r in 1..=8.
    pub fn new(radius: u32) -> crate::Result<Params> {
        if !(1..=8).contains(&radius) {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "radius",
                reason: format!("{radius} (1..8)"),
            }
            .into());
        }
        Ok(Params {
            width: 0,
            height: 0,
            radius,
            pad0: 0,
        })
    }
}

super::frame_params!(Params);

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/coherence.wgsl");

fn tensor(img: &Array2<f32>, x: usize, y: usize, r: isize) -> (f32, f32, f32) {
    let (mut jxx, mut jxy, mut jyy) = (0f32, 0f32, 0f32);
    for dy in -r..=r {
        for dx in -r..=r {
            let (xx, yy) = (x as isize + dx, y as isize + dy);
            let gx = 0.5 * (at(img, xx + 1, yy) - at(img, xx - 1, yy));
            let gy = 0.5 * (at(img, xx, yy + 1) - at(img, xx, yy - 1));
            jxx += gx * gx;
            jxy += gx * gy;
            jyy += gy * gy;
        }
    }
    (jxx, jxy, jyy)
}

/// CPU twin: (coherence, orientation).
pub fn cpu(img: &Array2<f32>, params: &Params) -> crate::Result<(Array2<f32>, Array2<f32>)> {
    check_image("coherence", img)?;
    let (h, w) = img.dim();
    let r = params.radius as isize;
    let coherence = par_image(h, w, |x, y| {
        let (jxx, jxy, jyy) = tensor(img, x, y, r);
        let (d, t) = (jxx - jyy, jxx + jyy);
        (d * d + 4.0 * jxy * jxy) / (t * t + TENSOR_EPSILON)
    });
    let orientation = par_image(h, w, |x, y| {
        let (jxx, jxy, jyy) = tensor(img, x, y, r);
        let mut a = 0.5 * (2.0 * jxy).atan2(jxx - jyy) + FRAC_PI_2;
        if a > FRAC_PI_2 {
            a -= 2.0 * FRAC_PI_2;
        }
        a
    });
    Ok((coherence, orientation))
}

/// The CPU production path: gradient products once, then window sums over a padded copy
/// (the twin recomputes the gradients for every window), rows in parallel.
pub fn cpu_fast(img: &Array2<f32>, params: &Params) -> crate::Result<(Array2<f32>, Array2<f32>)> {
    check_image("coherence", img)?;
    let (h, w) = img.dim();
    let r = params.radius as usize;
    // Gradient products on the window domain (output ± r), edges clamped like the twin.
    let (pw, ph) = (w + 2 * r, h + 2 * r);
    // Rows in parallel; every sum is taken in the same order as a plain loop would.
    let mut products = [
        vec![0f32; pw * ph],
        vec![0f32; pw * ph],
        vec![0f32; pw * ph],
    ];
    let [pxx, pxy, pyy] = &mut products;
    pxx.par_chunks_mut(pw)
        .zip(pxy.par_chunks_mut(pw))
        .zip(pyy.par_chunks_mut(pw))
        .enumerate()
        .for_each(|(py, ((rxx, rxy), ryy))| {
            let y = py as isize - r as isize;
            for px in 0..pw {
                let x = px as isize - r as isize;
                let gx = 0.5 * (at(img, x + 1, y) - at(img, x - 1, y));
                let gy = 0.5 * (at(img, x, y + 1) - at(img, x, y - 1));
                rxx[px] = gx * gx;
                rxy[px] = gx * gy;
                ryy[px] = gy * gy;
            }
        });
    let k = 2 * r + 1;
    let sums: Vec<Vec<f32>> = products
        .par_iter()
        .map(|p| {
            // Rows: k-wide sums; then columns.
            let mut rows = vec![0f32; ph * w];
            rows.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
                for (x, o) in row.iter_mut().enumerate() {
                    *o = p[y * pw + x..y * pw + x + k].iter().sum();
                }
            });
            let mut out = vec![0f32; h * w];
            out.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
                for (x, o) in row.iter_mut().enumerate() {
                    *o = (0..k).map(|d| rows[(y + d) * w + x]).sum();
                }
            });
            out
        })
        .collect();
    let coherence = par_image(h, w, |x, y| {
        let i = y * w + x;
        let (jxx, jxy, jyy) = (sums[0][i], sums[1][i], sums[2][i]);
        let (d, t) = (jxx - jyy, jxx + jyy);
        (d * d + 4.0 * jxy * jxy) / (t * t + TENSOR_EPSILON)
    });
    let orientation = par_image(h, w, |x, y| {
        let i = y * w + x;
        let (jxx, jxy, jyy) = (sums[0][i], sums[1][i], sums[2][i]);
        let mut a = 0.5 * (2.0 * jxy).atan2(jxx - jyy) + FRAC_PI_2;
        if a > FRAC_PI_2 {
            a -= 2.0 * FRAC_PI_2;
        }
        a
    });
    Ok((coherence, orientation))
}

/// Queues the kernel on a GPU chain (coherence becomes the current image; the orientation
/// is left in `aux`).
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, params: &Params) -> crate::Result<()> {
    super::encode_2d(chain, "coherence", SHADER, "coherence", params)
}
