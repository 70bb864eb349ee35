//! The last step of the pixel classifier's features on the GPU (`shaders/features.wgsl`):
//! the square of the rank (for its window's standard deviation), then the features the other
//! kernels did not write in their place put together (the standard deviation, the column
//! features in the features' order, depth, phase symmetry, coherence and its horizontal
//! part) and every value that is not finite set to 0. The chain is
//! `segment::pixels::encode_features`; the CPU twin of the whole is
//! `segment::pixels::pixel_features`, which `tests/pixels.rs` holds the chain to.

/// Planes (of the grid's `w·h` values) the shader reads and writes, beside the features'
/// own: keep in sync with the constants of shaders/features.wgsl.
/// The current image's first plane of the feature maps (phase symmetry, the mean beneath,
/// coherence, orientation) [`encode_assemble`] reads.
pub const MAPS_AT: usize = 24;
/// The current image's plane whose square [`encode_square`] writes.
pub const SQUARE_IN: usize = 21;
/// The next image's plane [`encode_square`] writes.
pub const SQUARE_OUT: usize = 30;
/// The next image's first plane of the seven column features, read by [`encode_assemble`].
pub const COLUMNS_AT: usize = 23;
/// The next image's plane of the rank's window mean square over 1 mm, read by
/// [`encode_assemble`] (beside the window mean in plane 4).
pub const MEAN_SQUARE_AT: usize = 31;

/// Parameters; keep in sync with `Params` in shaders/features.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Grid width.
    pub w: u32,
    /// Pixels per plane.
    pub n: u32,
    /// The depth feature's step per row.
    pub depth_step: f32,
    /// Threads per row of workgroups (the dispatch's width × 64).
    pub stride: u32,
}

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/features.wgsl");

/// The workgroups covering `n` pixels, 64 each, and the parameters for them.
#[cfg(feature = "gpu")]
fn dispatch(
    chain: &mut crate::gpu::GpuChain<'_>,
    entry: &'static str,
    n: usize,
    depth_step: f32,
) -> crate::Result<()> {
    let max = chain.max_workgroups();
    let groups = (n as u32).div_ceil(64);
    let grid = (groups.min(max), groups.div_ceil(max));
    let p = Params {
        w: chain.width() as u32,
        n: n as u32,
        depth_step,
        stride: grid.0 * 64,
    };
    chain.dispatch("features", SHADER, entry, &p, grid, false)?;
    Ok(())
}

/// Queues the square of the current image's plane [`SQUARE_IN`] into the next image's plane
/// [`SQUARE_OUT`] (planes of `n` values). The chain stays on its current image.
#[cfg(feature = "gpu")]
pub fn encode_square(chain: &mut crate::gpu::GpuChain<'_>, n: usize) -> crate::Result<()> {
    check(chain, n)?;
    dispatch(chain, "square", n, 0.0)
}

/// Queues the assembly of the features in the next image's planes `0..22` (planes of `n`
/// values; `depth_step` the depth feature per row). The chain stays on its current image.
#[cfg(feature = "gpu")]
pub fn encode_assemble(
    chain: &mut crate::gpu::GpuChain<'_>,
    n: usize,
    depth_step: f32,
) -> crate::Result<()> {
    check(chain, n)?;
    dispatch(chain, "assemble", n, depth_step)
}

/// The chain's images must hold the planes the shader touches.
#[cfg(feature = "gpu")]
fn check(chain: &crate::gpu::GpuChain<'_>, n: usize) -> crate::Result<()> {
    let len = chain.width() * chain.height();
    if n == 0 || (MEAN_SQUARE_AT + 1) * n > len || n > u32::MAX as usize {
        return Err(crate::kernels::KernelError::InvalidParameter {
            name: "features",
            reason: format!("planes of {n} values do not fit images of {len}"),
        }
        .into());
    }
    Ok(())
}
