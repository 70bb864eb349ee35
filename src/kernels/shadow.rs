//! Mean intensity beneath each pixel down its column (rows y+gap .. y+gap+length, clipped;
//! 0 where nothing lies beneath): the integrated backscatter below a point, low under bone
//! (acoustic shadow). Column prefix sums, rows in order. Shader: `shaders/shadow.wgsl`.

use ndarray::Array2;
use rayon::prelude::*;

use super::check_image;

/// Parameters; keep in sync with `Params` in shaders/shadow.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns (set by the dispatcher).
    pub width: u32,
    /// Rows (set by the dispatcher).
    pub height: u32,
    /// Rows skipped below the pixel (the echo itself and its PSF tail).
    pub gap: u32,
    /// Rows averaged.
    pub length: u32,
}

impl Params {
    /// Averages `length` rows starting `gap` rows below each pixel.
    pub fn new(gap: u32, length: u32) -> crate::Result<Params> {
        if length == 0 || length > 4096 || gap > 4096 {
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "gap/length",
                reason: format!("{gap}/{length}"),
            }
            .into());
        }
        Ok(Params {
            width: 0,
            height: 0,
            gap,
            length,
        })
    }
}

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/shadow.wgsl");

/// CPU twin (columns in parallel).
pub fn cpu(img: &Array2<f32>, params: &Params) -> crate::Result<Array2<f32>> {
    check_image("shadow", img)?;
    let (h, w) = img.dim();
    let (gap, len) = (params.gap as usize, params.length as usize);
    let columns: Vec<Vec<f32>> = (0..w)
        .into_par_iter()
        .map(|x| {
            let mut prefix = vec![0f32; h];
            let mut total = 0f32;
            for y in 0..h {
                prefix[y] = total;
                total += img[[y, x]];
            }
            (0..h)
                .map(|y| {
                    let start = (y + gap).min(h);
                    let end = (y + gap + len).min(h);
                    if end > start {
                        let hi = if end < h { prefix[end] } else { total };
                        (hi - prefix[start]) / (end - start) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    Ok(Array2::from_shape_fn((h, w), |(y, x)| columns[x][y]))
}

/// Queues the kernel on a GPU chain.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, params: &Params) -> crate::Result<()> {
    let mut p = *params;
    p.width = chain.width() as u32;
    p.height = chain.height() as u32;
    let groups = ((chain.width() as u32).div_ceil(64), 1);
    chain.dispatch("shadow", SHADER, "shadow", &p, groups, true)?;
    Ok(())
}
