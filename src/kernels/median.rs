//! Median filter, 3x3 or 5x5 (radius 1 or 2): the middle value of the window, edges clamped.
//! Shader: `shaders/median.wgsl`.

use ndarray::Array2;

use rayon::prelude::*;

use super::{at, check_image, par_image};
use crate::simd::multiversion;

/// Parameters; keep in sync with `Params` in shaders/median.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns (set by the dispatcher).
    pub width: u32,
    /// Rows (set by the dispatcher).
    pub height: u32,
    /// Window radius: 1 (3x3) or 2 (5x5).
    pub radius: u32,
    /// Padding to 16 bytes.
    pub pad0: u32,
}

impl Params {
    /// A `size` × `size` median (3 or 5).
    pub fn new(size: u32) -> crate::Result<Params> {
        if size != 3 && size != 5 {
            return Err(crate::Error::InvalidParameter {
                name: "size",
                reason: format!("{size} (median sizes: 3, 5)"),
            });
        }
        Ok(Params {
            width: 0,
            height: 0,
            radius: size / 2,
            pad0: 0,
        })
    }
}

super::frame_params!(Params);

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/median.wgsl");

/// CPU twin.
pub fn cpu(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("median", img)?;
    let r = params.radius.min(2) as isize;
    let (h, w) = img.dim();
    Ok(par_image(h, w, |x, y| {
        let mut v = [0f32; 25];
        let mut n = 0;
        for dy in -r..=r {
            for dx in -r..=r {
                v[n] = at(img, x as isize + dx, y as isize + dy);
                n += 1;
            }
        }
        for i in 1..n {
            let key = v[i];
            let mut j = i as isize - 1;
            while j >= 0 && v[j as usize] > key {
                v[j as usize + 1] = v[j as usize];
                j -= 1;
            }
            v[(j + 1) as usize] = key;
        }
        v[n / 2]
    }))
}

/// Lanes processed together by the fast path.
const LANES: usize = 8;

#[inline(always)]
fn compare_exchange<const N: usize>(v: &mut [[f32; LANES]; N], i: usize, j: usize) {
    // Copy both lanes out first: with whole-array loads and stores the compiler sees no
    // aliasing between v[i] and v[j] and emits one vector min and one max.
    let (a, b) = (v[i], v[j]);
    let mut lo = [0f32; LANES];
    let mut hi = [0f32; LANES];
    for l in 0..LANES {
        let lt = a[l] < b[l];
        lo[l] = if lt { a[l] } else { b[l] };
        hi[l] = if lt { b[l] } else { a[l] };
    }
    v[i] = lo;
    v[j] = hi;
}

/// Median-of-9 selection network (Paeth; Devillard's `opt_med9`): 19 compare-exchanges leave
/// the median at index 4. Unrolled: constant indices let the compiler keep lanes in registers.
#[inline(always)]
fn med9_unrolled(v: &mut [[f32; LANES]; 9]) {
    compare_exchange(v, 1, 2);
    compare_exchange(v, 4, 5);
    compare_exchange(v, 7, 8);
    compare_exchange(v, 0, 1);
    compare_exchange(v, 3, 4);
    compare_exchange(v, 6, 7);
    compare_exchange(v, 1, 2);
    compare_exchange(v, 4, 5);
    compare_exchange(v, 7, 8);
    compare_exchange(v, 0, 3);
    compare_exchange(v, 5, 8);
    compare_exchange(v, 4, 7);
    compare_exchange(v, 3, 6);
    compare_exchange(v, 1, 4);
    compare_exchange(v, 2, 5);
    compare_exchange(v, 4, 7);
    compare_exchange(v, 4, 2);
    compare_exchange(v, 6, 4);
    compare_exchange(v, 4, 2);
}

/// Median-of-25 selection network (Devillard's `opt_med25`): 99 compare-exchanges leave the
/// median at index 12. Unrolled like [`med9_unrolled`].
#[inline(always)]
fn med25_unrolled(v: &mut [[f32; LANES]; 25]) {
    compare_exchange(v, 0, 1);
    compare_exchange(v, 3, 4);
    compare_exchange(v, 2, 4);
    compare_exchange(v, 2, 3);
    compare_exchange(v, 6, 7);
    compare_exchange(v, 5, 7);
    compare_exchange(v, 5, 6);
    compare_exchange(v, 9, 10);
    compare_exchange(v, 8, 10);
    compare_exchange(v, 8, 9);
    compare_exchange(v, 12, 13);
    compare_exchange(v, 11, 13);
    compare_exchange(v, 11, 12);
    compare_exchange(v, 15, 16);
    compare_exchange(v, 14, 16);
    compare_exchange(v, 14, 15);
    compare_exchange(v, 18, 19);
    compare_exchange(v, 17, 19);
    compare_exchange(v, 17, 18);
    compare_exchange(v, 21, 22);
    compare_exchange(v, 20, 22);
    compare_exchange(v, 20, 21);
    compare_exchange(v, 23, 24);
    compare_exchange(v, 2, 5);
    compare_exchange(v, 3, 6);
    compare_exchange(v, 0, 6);
    compare_exchange(v, 0, 3);
    compare_exchange(v, 4, 7);
    compare_exchange(v, 1, 7);
    compare_exchange(v, 1, 4);
    compare_exchange(v, 11, 14);
    compare_exchange(v, 8, 14);
    compare_exchange(v, 8, 11);
    compare_exchange(v, 12, 15);
    compare_exchange(v, 9, 15);
    compare_exchange(v, 9, 12);
    compare_exchange(v, 13, 16);
    compare_exchange(v, 10, 16);
    compare_exchange(v, 10, 13);
    compare_exchange(v, 20, 23);
    compare_exchange(v, 17, 23);
    compare_exchange(v, 17, 20);
    compare_exchange(v, 21, 24);
    compare_exchange(v, 18, 24);
    compare_exchange(v, 18, 21);
    compare_exchange(v, 19, 22);
    compare_exchange(v, 8, 17);
    compare_exchange(v, 9, 18);
    compare_exchange(v, 0, 18);
    compare_exchange(v, 0, 9);
    compare_exchange(v, 10, 19);
    compare_exchange(v, 1, 19);
    compare_exchange(v, 1, 10);
    compare_exchange(v, 11, 20);
    compare_exchange(v, 2, 20);
    compare_exchange(v, 2, 11);
    compare_exchange(v, 12, 21);
    compare_exchange(v, 3, 21);
    compare_exchange(v, 3, 12);
    compare_exchange(v, 13, 22);
    compare_exchange(v, 4, 22);
    compare_exchange(v, 4, 13);
    compare_exchange(v, 14, 23);
    compare_exchange(v, 5, 23);
    compare_exchange(v, 5, 14);
    compare_exchange(v, 15, 24);
    compare_exchange(v, 6, 24);
    compare_exchange(v, 6, 15);
    compare_exchange(v, 7, 16);
    compare_exchange(v, 7, 19);
    compare_exchange(v, 13, 21);
    compare_exchange(v, 15, 23);
    compare_exchange(v, 7, 13);
    compare_exchange(v, 7, 15);
    compare_exchange(v, 1, 9);
    compare_exchange(v, 3, 11);
    compare_exchange(v, 5, 17);
    compare_exchange(v, 11, 17);
    compare_exchange(v, 9, 17);
    compare_exchange(v, 4, 10);
    compare_exchange(v, 6, 12);
    compare_exchange(v, 7, 14);
    compare_exchange(v, 4, 6);
    compare_exchange(v, 4, 7);
    compare_exchange(v, 12, 14);
    compare_exchange(v, 10, 14);
    compare_exchange(v, 6, 7);
    compare_exchange(v, 10, 12);
    compare_exchange(v, 6, 10);
    compare_exchange(v, 6, 17);
    compare_exchange(v, 12, 17);
    compare_exchange(v, 7, 17);
    compare_exchange(v, 7, 10);
    compare_exchange(v, 12, 18);
    compare_exchange(v, 7, 12);
    compare_exchange(v, 10, 18);
    compare_exchange(v, 12, 20);
    compare_exchange(v, 10, 20);
    compare_exchange(v, 10, 12);
}

#[inline(always)]
fn scalar_median(img: &[f32], w: usize, h: usize, x: usize, y: usize, r: isize) -> f32 {
    let mut v = [0f32; 25];
    let mut n = 0;
    for dy in -r..=r {
        let yy = (y as isize + dy).clamp(0, h as isize - 1) as usize;
        for dx in -r..=r {
            let xx = (x as isize + dx).clamp(0, w as isize - 1) as usize;
            v[n] = img[yy * w + xx];
            n += 1;
        }
    }
    v[..n].sort_unstable_by(|a, b| a.total_cmp(b));
    v[n / 2]
}

multiversion! {
    /// One output row of the fast median: 8 pixels at a time through the selection network,
    /// the pixels near the left and right edges one by one.
    fn median_row(img: &[f32], w: usize, h: usize, y: usize, r: usize, out: &mut [f32]) {
        let rows: Vec<&[f32]> = (0..2 * r + 1)
            .map(|k| {
                let yy = (y as isize + k as isize - r as isize).clamp(0, h as isize - 1) as usize;
                &img[yy * w..(yy + 1) * w]
            })
            .collect();
        let mut x = 0;
        while x < w {
            if x >= r && x + LANES + r <= w {
                if r == 1 {
                    let mut v = [[0f32; LANES]; 9];
                    for (k, lane) in v.iter_mut().enumerate() {
                        let (dy, dx) = (k / 3, k % 3);
                        lane.copy_from_slice(&rows[dy][x + dx - 1..x + dx - 1 + LANES]);
                    }
                    med9_unrolled(&mut v);
                    out[x..x + LANES].copy_from_slice(&v[4]);
                } else {
                    let mut v = [[0f32; LANES]; 25];
                    for (k, lane) in v.iter_mut().enumerate() {
                        let (dy, dx) = (k / 5, k % 5);
                        lane.copy_from_slice(&rows[dy][x + dx - 2..x + dx - 2 + LANES]);
                    }
                    med25_unrolled(&mut v);
                    out[x..x + LANES].copy_from_slice(&v[12]);
                }
                x += LANES;
            } else {
                out[x] = scalar_median(img, w, h, x, y, r as isize);
                x += 1;
            }
        }
    }
}

/// The CPU production path: selection networks over 8 pixels at a time (AVX2 where the CPU
/// has it), rows in parallel. Gives exactly the twin's values.
pub fn cpu_fast(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("median", img)?;
    let (h, w) = img.dim();
    let r = params.radius.clamp(1, 2) as usize;
    let flat: Vec<f32>;
    let src = match img.as_slice() {
        Some(s) => s,
        None => {
            flat = img.iter().copied().collect();
            &flat
        }
    };
    let mut out = vec![0f32; w * h];
    out.par_chunks_mut(w)
        .enumerate()
        .for_each(|(y, row)| median_row(src, w, h, y, r, row));
    Array2::from_shape_vec((h, w), out).map_err(|e| crate::Error::InvalidParameter {
        name: "median",
        reason: e.to_string(),
    })
}

/// Queues the kernel on a GPU chain.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, params: &Params) -> crate::Result<()> {
    super::encode_2d(chain, "median", SHADER, "median", params)
}
