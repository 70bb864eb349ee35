//! Median filter, 3x3 or 5x5 (radius 1 or 2): the middle value of the window, edges clamped.
//! Shader: `shaders/median.wgsl`.

use ndarray::Array2;

use rayon::prelude::*;

use super::{at, check_image, par_image};

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
            return Err(crate::kernels::KernelError::InvalidParameter {
                name: "size",
                reason: format!("{size} (median sizes: 3, 5)"),
            }
            .into());
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

/// Eight pixels' worth of one window position: what the selection networks compare.
trait Lanes: Copy {
    /// Loads eight consecutive values (the slice holds at least eight).
    fn load(src: &[f32]) -> Self;
    /// Stores eight values (the slice holds at least eight).
    fn store(self, dst: &mut [f32]);
    /// Lane-wise minimum.
    fn min(self, other: Self) -> Self;
    /// Lane-wise maximum.
    fn max(self, other: Self) -> Self;
}

/// Plain arrays: LLVM vectorises these where it can (the fallback for CPUs without AVX).
impl Lanes for [f32; LANES] {
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        let mut v = [0f32; LANES];
        v.copy_from_slice(&src[..LANES]);
        v
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        dst[..LANES].copy_from_slice(&self);
    }
    #[inline(always)]
    fn min(self, other: Self) -> Self {
        std::array::from_fn(|l| {
            if self[l] < other[l] {
                self[l]
            } else {
                other[l]
            }
        })
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        std::array::from_fn(|l| {
            if self[l] < other[l] {
                other[l]
            } else {
                self[l]
            }
        })
    }
}

/// 256-bit AVX registers. Only used inside functions compiled with AVX enabled, after a
/// run-time check that the CPU has it. The array form above compiles to blends and spills
/// (measured 4-6x slower per row); named registers let LLVM keep the network in `vminps` and
/// `vmaxps`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx(std::arch::x86_64::__m256);

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx {
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        let src = &src[..LANES];
        // SAFETY: the slice holds eight f32s (checked just above); the load is unaligned, and
        // this is only reached from `median_row_avx`, which runs after AVX was detected.
        Avx(unsafe { std::arch::x86_64::_mm256_loadu_ps(src.as_ptr()) })
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        let dst = &mut dst[..LANES];
        // SAFETY: as for `load`.
        unsafe { std::arch::x86_64::_mm256_storeu_ps(dst.as_mut_ptr(), self.0) }
    }
    #[inline(always)]
    fn min(self, other: Self) -> Self {
        // SAFETY: AVX is present (see `load`).
        Avx(unsafe { std::arch::x86_64::_mm256_min_ps(self.0, other.0) })
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        // SAFETY: AVX is present (see `load`).
        Avx(unsafe { std::arch::x86_64::_mm256_max_ps(self.0, other.0) })
    }
}

/// Puts the smaller of `v[i]`, `v[j]` at `i` and the larger at `j`, lane by lane. Where the
/// network never reads one of the two results again, LLVM drops its instruction.
#[inline(always)]
fn compare_exchange<L: Lanes, const N: usize>(v: &mut [L; N], i: usize, j: usize) {
    let (a, b) = (v[i], v[j]);
    v[i] = a.min(b);
    v[j] = a.max(b);
}

/// Median-of-9 selection network (Paeth; Devillard's `opt_med9`): 19 compare-exchanges leave
/// the median at index 4. Unrolled: constant indices let the compiler keep lanes in registers.
#[inline(always)]
fn med9_unrolled<L: Lanes>(v: &mut [L; 9]) {
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

/// Applies a comparator network written as pairs `i j`: after each, `v[i] <= v[j]`.
macro_rules! network {
    ($v:ident; $($i:literal $j:literal),* $(,)?) => { $( compare_exchange(&mut $v, $i, $j); )* };
}

/// Sorts five values (9 compare-exchanges).
#[inline(always)]
fn sort5<L: Lanes>(mut v: [L; 5]) -> [L; 5] {
    network!(v; 0 1, 2 3, 0 2, 1 3, 1 2, 0 4, 2 4, 1 2, 3 4);
    v
}

/// Merges two sorted fives into a sorted ten (Batcher's odd-even merge with the padding
/// comparators dropped: 13 compare-exchanges).
#[inline(always)]
fn merge5_5<L: Lanes>(a: [L; 5], b: [L; 5]) -> [L; 10] {
    let mut v = [a[0], a[1], a[2], a[3], a[4], b[0], b[1], b[2], b[3], b[4]];
    network!(v; 0 5, 4 9, 4 5, 2 7, 2 4, 7 5, 1 6, 3 8, 3 6, 1 2, 3 4, 6 7, 8 5);
    [v[0], v[1], v[2], v[3], v[4], v[6], v[7], v[8], v[5], v[9]]
}

/// Ranks 7 to 12 (0-based, ascending) of the union of two sorted tens: a 10 + 10 odd-even
/// merge cut down to the comparators those outputs depend on (25).
#[inline(always)]
fn ranks_7_to_12<L: Lanes>(a: &[L; 10], b: &[L; 10]) -> [L; 6] {
    let mut v: [L; 20] = [
        a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], //
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9],
    ];
    network!(v; 0 10, 8 18, 8 10, 4 14, 4 8, 14 10, 2 12, 6 16, 6 12, 6 8, 12 14, 1 11, 9 19,
        9 11, 5 15, 5 9, 15 11, 3 13, 7 17, 7 13, 7 9, 13 15, 7 8, 9 12, 13 14);
    [v[7], v[8], v[9], v[12], v[13], v[14]]
}

/// The median of 25 values given as ranks 7 to 12 of twenty of them (`mid`) and the other
/// five, sorted (`t`): rank 5 of those eleven, since ranks 0 to 6 of the twenty lie below the
/// median and ranks 13 to 19 above it whatever `t` holds.
#[inline(always)]
fn median_of_25<L: Lanes>(mid: &[L; 6], t: &[L; 5]) -> L {
    let mut v = [
        mid[0], mid[1], mid[2], mid[3], mid[4], mid[5], t[0], t[1], t[2], t[3], t[4],
    ];
    network!(v; 0 6, 4 10, 4 6, 2 8, 8 6, 1 7, 5 7, 3 9, 3 5, 5 8);
    v[5]
}

/// Output rows per parallel task of the 5x5 path; even, so that row pairs do not straddle
/// tasks. Each task re-sorts four rows above its first: at 48 rows that is 4% more work.
const BAND_ROWS: usize = 48;

/// The five horizontally shifted loads of image row `row` that feed lanes `x0..x0 + 8` of a
/// 5-wide window, clamped at the row's ends, sorted lane by lane.
#[inline(always)]
fn sorted_row_window<L: Lanes>(row: &[f32], x0: usize) -> [L; 5] {
    let w = row.len();
    if x0 >= 2 && x0 + LANES + 2 <= w {
        let s = &row[x0 - 2..x0 + LANES + 2];
        sort5([
            L::load(s),
            L::load(&s[1..]),
            L::load(&s[2..]),
            L::load(&s[3..]),
            L::load(&s[4..]),
        ])
    } else {
        let pad: [f32; LANES + 4] =
            std::array::from_fn(|i| row[(x0 + i).saturating_sub(2).min(w - 1)]);
        sort5([
            L::load(&pad),
            L::load(&pad[1..]),
            L::load(&pad[2..]),
            L::load(&pad[3..]),
            L::load(&pad[4..]),
        ])
    }
}

/// 5x5 medians of rows `y0..y0 + out.len() / w` into `out`, for images at least 8 wide.
///
/// Lanes run along x; each block of 8 columns walks down the band two output rows at a time.
/// Every image row is sorted once per block (`sorted_row_window`); the two windows of a row
/// pair share four sorted rows, whose middle ranks are merged once (`merge5_5`,
/// `ranks_7_to_12`) and then combined with each window's own fifth row. About 38
/// compare-exchanges per pixel against the full median-of-25 network's 99.
#[inline(always)]
fn median5_band_with<L: Lanes>(img: &[f32], w: usize, h: usize, y0: usize, out: &mut [f32]) {
    let rows_out = out.len() / w;
    let row = |y: isize| {
        let y = y.clamp(0, h as isize - 1) as usize;
        &img[y * w..(y + 1) * w]
    };
    let mut x0 = 0;
    loop {
        let sorted = |y: isize| sorted_row_window::<L>(row(y), x0);
        let y0 = y0 as isize;
        // r[k] holds image row y - 2 + k for the pair (y, y + 1).
        let mut r: [[L; 5]; 6] = std::array::from_fn(|k| sorted(y0 - 2 + k as isize));
        let mut upper = merge5_5(r[1], r[2]);
        let mut dy = 0;
        loop {
            let lower = merge5_5(r[3], r[4]);
            let mid = ranks_7_to_12(&upper, &lower);
            median_of_25(&mid, &r[0]).store(&mut out[dy * w + x0..]);
            if dy + 1 < rows_out {
                median_of_25(&mid, &r[5]).store(&mut out[(dy + 1) * w + x0..]);
            }
            dy += 2;
            if dy >= rows_out {
                break;
            }
            let y = y0 + dy as isize;
            r = [r[2], r[3], r[4], r[5], sorted(y + 2), sorted(y + 3)];
            upper = lower;
        }
        if x0 + LANES == w {
            break;
        }
        x0 = (x0 + LANES).min(w - LANES);
    }
}

/// [`median5_band_with`] on AVX registers.
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn median5_band_avx(img: &[f32], w: usize, h: usize, y0: usize, out: &mut [f32]) {
    median5_band_with::<Avx>(img, w, h, y0, out)
}

/// One band of the 5x5 path: AVX where the CPU has it, plain arrays otherwise.
fn median5_band(img: &[f32], w: usize, h: usize, y0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX was detected just above.
        return unsafe { median5_band_avx(img, w, h, y0, out) };
    }
    median5_band_with::<[f32; LANES]>(img, w, h, y0, out)
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

/// The 3x3 medians of eight consecutive pixels: lane `l` takes the window whose columns are
/// `base + l .. base + l + 2` of the three rows.
#[inline(always)]
fn median3_block<L: Lanes>(rows: &[&[f32]; 3], base: usize, out: &mut [f32]) {
    // The loads are written out: `array::from_fn` over the indices stayed a loop with a stack
    // round trip per value (measured: half the time of the block).
    let s: [&[f32]; 3] = std::array::from_fn(|k| &rows[k][base..base + LANES + 2]);
    let l = |k: usize, d: usize| L::load(&s[k][d..]);
    let mut v = [
        l(0, 0),
        l(0, 1),
        l(0, 2),
        l(1, 0),
        l(1, 1),
        l(1, 2),
        l(2, 0),
        l(2, 1),
        l(2, 2),
    ];
    med9_unrolled(&mut v);
    v[4].store(out);
}

/// One output row of the fast median. 3x3 goes 8 pixels at a time through the selection
/// network: the interior reads the rows in place (the last block overlaps its neighbour rather
/// than falling back to one-by-one sorting) and the two edge blocks read copies padded by
/// clamping. 5x5 rows (only images narrower than a block come here) and 3x3 rows narrower than
/// a block plus its margins go pixel by pixel.
#[inline(always)]
fn median_row_with<L: Lanes>(img: &[f32], w: usize, h: usize, y: usize, r: usize, out: &mut [f32]) {
    if r != 1 || w < LANES + 2 {
        for (x, o) in out.iter_mut().enumerate() {
            *o = scalar_median(img, w, h, x, y, r as isize);
        }
        return;
    }
    let rows: [&[f32]; 3] = std::array::from_fn(|k| {
        let yy = (y + k).saturating_sub(1).min(h - 1);
        &img[yy * w..(yy + 1) * w]
    });
    let mut x = 1;
    while x + LANES < w {
        median3_block::<L>(&rows, x - 1, &mut out[x..]);
        x += LANES;
    }
    if x < w - 1 {
        let x = w - 1 - LANES;
        median3_block::<L>(&rows, x - 1, &mut out[x..]);
    }
    // Edge blocks: columns x0 - 1 .. x0 + LANES + 1, clamped into the row.
    for x0 in [0, w - LANES] {
        let pad: [[f32; LANES + 2]; 3] = std::array::from_fn(|k| {
            std::array::from_fn(|i| rows[k][(x0 + i).saturating_sub(1).min(w - 1)])
        });
        let pad_rows: [&[f32]; 3] = std::array::from_fn(|k| &pad[k][..]);
        median3_block::<L>(&pad_rows, 0, &mut out[x0..]);
    }
}

/// [`median_row_with`] on AVX registers.
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn median_row_avx(img: &[f32], w: usize, h: usize, y: usize, r: usize, out: &mut [f32]) {
    median_row_with::<Avx>(img, w, h, y, r, out)
}

/// One output row: AVX where the CPU has it, plain arrays otherwise.
fn median_row(img: &[f32], w: usize, h: usize, y: usize, r: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX was detected just above.
        return unsafe { median_row_avx(img, w, h, y, r, out) };
    }
    median_row_with::<[f32; LANES]>(img, w, h, y, r, out)
}

/// The CPU production path: comparator networks over 8 pixels at a time (AVX where the CPU
/// has it); 5x5 in bands of rows sharing sorted rows between neighbouring windows
/// (`median5_band_with`), 3x3 row by row; in parallel. Gives exactly the twin's values.
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
    if r == 2 && w >= LANES {
        out.par_chunks_mut(w * BAND_ROWS)
            .enumerate()
            .for_each(|(b, band)| median5_band(src, w, h, b * BAND_ROWS, band));
    } else {
        out.par_chunks_mut(w)
            .enumerate()
            .for_each(|(y, row)| median_row(src, w, h, y, r, row));
    }
    Array2::from_shape_vec((h, w), out).map_err(|e| {
        crate::kernels::KernelError::InvalidParameter {
            name: "median",
            reason: e.to_string(),
        }
        .into()
    })
}

/// Queues the kernel on a GPU chain.
#[cfg(feature = "gpu")]
pub fn encode(chain: &mut crate::gpu::GpuChain<'_>, params: &Params) -> crate::Result<()> {
    super::encode_2d(chain, "median", SHADER, "median", params)
}
