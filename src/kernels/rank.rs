//! The rank transform: each valid pixel's share of the valid pixels darker than it, from a
//! histogram of [`BINS`] bins between the valid minimum and maximum, linear within a bin
//! (invalid, non-finite or absurdly large pixels get 0). The pixel classifier's features are built on it, so
//! that gain and dynamic range, which change grey levels but not their order, do not move
//! them. Shader: `shaders/rank.wgsl` (the valid mask in the chain's `aux` buffer, 1 or 0);
//! this module's [`RankMap`] is the CPU twin and what `segment::pixels` uses.

use ndarray::Array2;

/// Bins of the histogram (enough that neighbouring grey levels of an 8-bit image fall in
/// different bins). Keep in sync with `BINS` in shaders/rank.wgsl.
pub const BINS: usize = 1024;
/// Workgroups of the shader's reduction and histogram passes (each takes a strided share of
/// the pixels; their partial histograms must fit the stats buffer: 4 + 2·G + G·BINS + BINS + 1
/// values).
pub const GROUPS: u32 = 128;
/// Where the shader's per-workgroup partials start in the stats buffer. Keep in sync with
/// `PART` in shaders/rank.wgsl.
pub const PART: usize = 4;

/// Values beyond ± this are not counted, like infinities and NaN (the shader cannot hold an
/// infinity in a constant). Keep in sync with `BIG` in shaders/rank.wgsl.
pub const BIG: f32 = 3.0e38;

/// Whether `x` is ranked (finite and within ±[`BIG`]).
#[inline]
fn counted(x: f32) -> bool {
    x.abs() <= BIG
}

/// Parameters; keep in sync with `Params` in shaders/rank.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns of the image.
    pub width: u32,
    /// Rows of the image.
    pub height: u32,
    /// Workgroups of the partial passes ([`GROUPS`]).
    pub groups: u32,
    /// Offset of the values in `src`.
    pub values_at: u32,
    /// Offset of the validity in `src`.
    pub valid_at: u32,
    /// Offset of the ranks in `dst`.
    pub out_at: u32,
    /// Unused (alignment).
    pub pad: [u32; 2],
}

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/rank.wgsl");

/// A frame's rank map: its valid range and the histogram's cumulative shares.
#[derive(Debug, Clone)]
pub struct RankMap {
    lo: f32,
    width: f32,
    cdf: Vec<f32>,
}

impl RankMap {
    /// The map of `v` over the pixels where `valid` holds and the value is finite.
    pub fn of(v: &Array2<f32>, valid: &Array2<bool>) -> RankMap {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for (x, ok) in v.iter().zip(valid) {
            if *ok && counted(*x) {
                lo = lo.min(*x);
                hi = hi.max(*x);
            }
        }
        if lo >= hi {
            (lo, hi) = (0.0, 1.0);
        }
        let width = (hi - lo) / BINS as f32;
        let mut cdf = vec![0f64; BINS + 1];
        let mut total = 0.0;
        for (x, ok) in v.iter().zip(valid) {
            if *ok && counted(*x) {
                let b = (((x - lo) / width) as usize).min(BINS - 1);
                cdf[b + 1] += 1.0;
                total += 1.0;
            }
        }
        for i in 1..=BINS {
            cdf[i] += cdf[i - 1];
        }
        let total = if total > 0.0 { total } else { 1.0 };
        RankMap {
            lo,
            width,
            cdf: cdf.iter().map(|c| (c / total) as f32).collect(),
        }
    }

    /// The share of valid pixels darker than `x` (0 for a value that is not counted).
    #[inline]
    pub fn map(&self, x: f32) -> f32 {
        if !counted(x) {
            return 0.0;
        }
        let t = ((x - self.lo) / self.width).clamp(0.0, BINS as f32);
        let b = (t as usize).min(BINS - 1);
        let f = t - b as f32;
        self.cdf[b] + f * (self.cdf[b + 1] - self.cdf[b])
    }
}

/// CPU twin of the shader: the rank of every valid pixel, 0 elsewhere.
pub fn cpu(v: &Array2<f32>, valid: &Array2<bool>) -> Array2<f32> {
    let map = RankMap::of(v, valid);
    let mut out = Array2::<f32>::zeros(v.dim());
    for ((o, x), ok) in out.iter_mut().zip(v).zip(valid) {
        if *ok {
            *o = map.map(*x);
        }
    }
    out
}

/// Queues the rank transform of a `w × h` plane of the chain's current image (`w` the
/// chain's width): the histogram of `at.values` over the pixels where `at.valid` is 1, then
/// every pixel's rank into `at.out` of the next image (`at.scratch` unused; the histogram is
/// kept in the chain's `stats`). The chain stays on its current image.
#[cfg(feature = "gpu")]
pub fn encode(
    chain: &mut crate::gpu::GpuChain<'_>,
    h: usize,
    at: crate::kernels::Planes,
) -> crate::Result<()> {
    let p = params(chain, h, at)?;
    chain.dispatch("rank", SHADER, "rank_minmax", &p, (GROUPS, 1), false)?;
    chain.dispatch("rank", SHADER, "rank_hist", &p, (GROUPS, 1), false)?;
    chain.dispatch("rank", SHADER, "rank_cdf", &p, (1, 1), false)?;
    map_again(chain, h, at)
}

/// Queues the mapping of another plane (`at.values`, with the same validity) through the
/// histogram of the last [`encode`] of this chain, into `at.out`.
#[cfg(feature = "gpu")]
pub fn map_again(
    chain: &mut crate::gpu::GpuChain<'_>,
    h: usize,
    at: crate::kernels::Planes,
) -> crate::Result<()> {
    let p = params(chain, h, at)?;
    let w = chain.width() as u32;
    let groups = (w.div_ceil(16), (h as u32).div_ceil(16));
    chain.dispatch("rank", SHADER, "rank_map", &p, groups, false)?;
    Ok(())
}

#[cfg(feature = "gpu")]
fn params(
    chain: &crate::gpu::GpuChain<'_>,
    h: usize,
    at: crate::kernels::Planes,
) -> crate::Result<Params> {
    let w = chain.width();
    let [values_at, valid_at, _, out_at] = at.checked("rank", w * chain.height(), w * h, 0, 1)?;
    Ok(Params {
        width: w as u32,
        height: h as u32,
        groups: GROUPS,
        values_at,
        valid_at,
        out_at,
        pad: [0; 2],
    })
}
