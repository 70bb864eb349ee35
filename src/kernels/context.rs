//! The pixel classifier's second-stage context inputs on the GPU (`shaders/context.wgsl`):
//! from the first stage's probabilities, their values on the valid pixels, their means over a
//! near and a far window, and for five labels the near mean read above, below and to either
//! side. The CPU twin is `segment::context::context_features` (the windows and labels are the
//! segmenter's; `tests/pixels.rs` holds the two together); the chain that runs both stages and
//! this kernel is `segment::context::classify_gpu`.

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/context.wgsl");

/// The shader's parameters (window half-sizes and offsets in grid pixels, planes of `n`
/// values); keep in sync with `Params` in shaders/context.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Grid width.
    pub w: u32,
    /// Grid height.
    pub h: u32,
    /// Pixels per plane (`w·h`).
    pub n: u32,
    /// Classes (probability planes).
    pub classes: u32,
    /// Near window half-height.
    pub near_ry: u32,
    /// Near window half-width.
    pub near_rx: u32,
    /// Far window half-height.
    pub far_ry: u32,
    /// Far window half-width.
    pub far_rx: u32,
    /// Rows between a pixel and its above / below reads.
    pub dy: u32,
    /// Columns between a pixel and its side reads.
    pub dx: u32,
    /// The `src` plane holding the validity (1 or 0).
    pub valid_plane: u32,
    /// The `dst` plane of the first stage's first probability.
    pub probs_plane: u32,
    /// The `dst` plane the context starts at.
    pub ctx_plane: u32,
    /// Where the scratch planes start in `aux` (a value offset).
    pub scratch: u32,
    /// The label codes read at an offset, in the context's order.
    pub label0: u32,
    /// Second offset label.
    pub label1: u32,
    /// Third offset label.
    pub label2: u32,
    /// Fourth offset label.
    pub label3: u32,
    /// Fifth offset label.
    pub label4: u32,
    /// Padding to 16 bytes.
    pub pad: u32,
}

/// Scratch planes the kernel needs in `aux` from `scratch`: row sums near and far per class,
/// and the valid counts near and far.
pub fn scratch_planes(classes: usize) -> usize {
    2 * classes + 2
}

/// Queues the three passes (row sums, window means, offset reads) on `chain`, which stays on
/// its current image.
#[cfg(feature = "gpu")]
pub fn encode(
    chain: &mut crate::gpu::GpuChain<'_>,
    p: &Params,
) -> Result<(), crate::gpu::GpuError> {
    let max = chain.max_workgroups();
    let grid = |threads: usize| {
        let groups = (threads as u32).div_ceil(64);
        (groups.min(max), groups.div_ceil(max))
    };
    let (w, h, c) = (p.w as usize, p.h as usize, p.classes as usize);
    for (entry, threads) in [
        ("context_rows", scratch_planes(c) * h),
        ("context_columns", 2 * c * w),
        ("context_offsets", w * h),
    ] {
        chain.dispatch("context", SHADER, entry, p, grid(threads), false)?;
    }
    Ok(())
}
