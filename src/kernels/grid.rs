//! The analysis grid at half resolution: the mean of every 2x2 block (odd last rows and
//! columns left out). The segmenter analyses wide imaging regions on this grid
//! (`segment::analysis_grid`). Shader: `shaders/grid.wgsl`, which writes the grid packed at
//! the start of the next image so that a chain can hand it over to a buffer set of the
//! grid's size (`GpuChain::hand_over`).

use ndarray::{Array2, ArrayView2};

/// Parameters; keep in sync with `Params` in shaders/grid.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns of the full-resolution image.
    pub width: u32,
    /// Rows of the full-resolution image.
    pub height: u32,
    /// Columns of the grid (`width / 2`).
    pub out_width: u32,
    /// Rows of the grid (`height / 2`).
    pub out_height: u32,
}

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/grid.wgsl");

/// The grid's size for a `width` × `height` image: (columns, rows).
pub fn grid_size(width: usize, height: usize) -> (usize, usize) {
    (width / 2, height / 2)
}

/// CPU twin: the mean of every 2x2 block, summed in the shader's order.
pub fn cpu(img: ArrayView2<'_, f32>) -> Array2<f32> {
    let (w, h) = grid_size(img.ncols(), img.nrows());
    Array2::from_shape_fn((h, w), |(y, x)| {
        0.25 * (img[[2 * y, 2 * x]]
            + img[[2 * y + 1, 2 * x]]
            + img[[2 * y, 2 * x + 1]]
            + img[[2 * y + 1, 2 * x + 1]])
    })
}

/// Queues the grid of the chain's current image, written packed at the start of the next
/// image (the chain moves on to it); follow with `GpuChain::hand_over` to the grid's size.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>) -> crate::Result<(usize, usize)> {
    let (w, h) = grid_size(chain.width(), chain.height());
    if w == 0 || h == 0 {
        return Err(crate::kernels::KernelError::InvalidParameter {
            name: "grid",
            reason: format!(
                "a {}x{} image has no half-resolution grid",
                chain.width(),
                chain.height()
            ),
        }
        .into());
    }
    let p = Params {
        width: chain.width() as u32,
        height: chain.height() as u32,
        out_width: w as u32,
        out_height: h as u32,
    };
    let groups = ((w as u32).div_ceil(16), (h as u32).div_ceil(16));
    chain.dispatch("grid", SHADER, "half_sample", &p, groups, true)?;
    Ok((w, h))
}
