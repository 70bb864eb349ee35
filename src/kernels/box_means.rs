//! Window means over the valid pixels (the pixel features' box means, and the valid counts
//! beneath them): running sums down the columns, then along the rows, so that the cost does
//! not depend on the window. Shader: `shaders/box_means.wgsl`, one thread per column and
//! plane, then per row, in this module's order. The CPU functions are what `segment::pixels`
//! and `segment::context` use.

/// Sums of `v` (row-major, `h × w`) over the window of half-sizes `(ry, rx)` around every
/// pixel, clipped to the grid: a vertical running sum (vectorised across the row) then a
/// horizontal one along each row, so the cost does not depend on the window.
pub fn box_sums(v: &[f32], h: usize, w: usize, ry: usize, rx: usize) -> Vec<f32> {
    // One vector, written once by the vertical pass (pushed: no zeroing first), then the
    // horizontal pass in place.
    let mut out = Vec::with_capacity(h * w);
    vertical_sums(v, &mut out, h, w, ry);
    if w == 0 {
        return out;
    }
    // Rows in groups of ROWS: every row of a group has the same window at each column, so the
    // group's running sums advance together (independent chains: the additions overlap instead
    // of waiting on each other). Per row, the additions and subtractions come in the same
    // order as a row-by-row running sum. Each group's vertical sums are copied aside first.
    const ROWS: usize = 8;
    let mut rows = vec![0f32; ROWS * w];
    let full = h / ROWS * ROWS;
    let (head, tail) = out.split_at_mut(full * w);
    for group in head.chunks_exact_mut(ROWS * w) {
        rows.copy_from_slice(group);
        horizontal_sums::<ROWS>(&rows, group, w, rx);
    }
    for row in tail.chunks_exact_mut(w) {
        rows[..w].copy_from_slice(row);
        horizontal_sums::<1>(&rows[..w], row, w, rx);
    }
    out
}

/// The window sums of a 0/1 validity plane `m` ([`box_sums`]). Where every pixel is valid (a
/// linear probe's region) they are the clipped window's area, written directly: the same
/// values (small integers, exact in f32) without the two passes.
pub fn valid_counts(m: &[f32], h: usize, w: usize, ry: usize, rx: usize) -> Vec<f32> {
    if m.iter().any(|v| *v != 1.0) {
        return box_sums(m, h, w, ry, rx);
    }
    let span = |i: usize, r: usize, len: usize| ((i + r + 1).min(len) - i.saturating_sub(r)) as f32;
    let across: Vec<f32> = (0..w).map(|x| span(x, rx, w)).collect();
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        let down = span(y, ry, h);
        out.extend(across.iter().map(|a| a * down));
    }
    out
}

/// Running sums over `±rx` columns (clipped) of the `R` rows of `rows` into `outs`, the rows
/// advancing together.
#[inline(always)]
fn horizontal_sums<const R: usize>(rows: &[f32], outs: &mut [f32], w: usize, rx: usize) {
    let src: [&[f32]; R] = std::array::from_fn(|r| &rows[r * w..(r + 1) * w]);
    let mut dst: Vec<&mut [f32]> = outs.chunks_exact_mut(w).collect();
    let mut acc = [0f32; R];
    let (mut lo, mut hi) = (0usize, 0usize);
    for x in 0..w {
        let (x0, x1) = (x.saturating_sub(rx), (x + rx + 1).min(w));
        while hi < x1 {
            for (a, row) in acc.iter_mut().zip(&src) {
                *a += row[hi];
            }
            hi += 1;
        }
        while lo < x0 {
            for (a, row) in acc.iter_mut().zip(&src) {
                *a -= row[lo];
            }
            lo += 1;
        }
        for (a, o) in acc.iter().zip(dst.iter_mut()) {
            o[x] = *a;
        }
    }
}

crate::simd::multiversion! {
    /// Vertical running sums of the rows of `hs` over `±ry` rows (clipped), appended to
    /// `out` row by row.
    fn vertical_sums(hs: &[f32], out: &mut Vec<f32>, h: usize, w: usize, ry: usize) {
        // acc holds the sum of rows lo..hi (half-open); the window sums are small (a few
        // hundred values of at most 1), so f32 running sums stay exact to about 1e-5.
        let mut acc = vec![0f32; w];
        let (mut lo, mut hi) = (0usize, 0usize);
        for y in 0..h {
            let (y0, y1) = (y.saturating_sub(ry), (y + ry + 1).min(h));
            while hi < y1 {
                for (a, v) in acc.iter_mut().zip(&hs[hi * w..(hi + 1) * w]) {
                    *a += *v;
                }
                hi += 1;
            }
            while lo < y0 {
                for (a, v) in acc.iter_mut().zip(&hs[lo * w..(lo + 1) * w]) {
                    *a -= *v;
                }
                lo += 1;
            }
            out.extend_from_slice(&acc);
        }
    }
}

/// Means over the valid pixels of windows of half-sizes `(ry, rx)`: `um` is the value times
/// validity, `ms` the window sums of validity.
pub fn box_means(um: &[f32], ms: &[f32], h: usize, w: usize, ry: usize, rx: usize) -> Vec<f32> {
    let mut sums = box_sums(um, h, w, ry, rx);
    for (s, m) in sums.iter_mut().zip(ms) {
        *s = share_mean(*s, *m);
    }
    sums
}

/// [`box_means`] written into `out`.
pub fn box_means_into(
    um: &[f32],
    ms: &[f32],
    h: usize,
    w: usize,
    (ry, rx): (usize, usize),
    out: &mut [f32],
) {
    let sums = box_sums(um, h, w, ry, rx);
    for ((o, s), m) in out.iter_mut().zip(&sums).zip(ms) {
        *o = share_mean(*s, *m);
    }
}

/// A window's mean over its valid pixels from its sum and its count of them (none: 0).
pub fn share_mean(sum: f32, count: f32) -> f32 {
    if count > 0.5 {
        sum / count
    } else {
        0.0
    }
}

/// Parameters; keep in sync with `Params` in shaders/box_means.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns of a plane.
    pub w: u32,
    /// Rows of a plane.
    pub h: u32,
    /// Half-height of the window, rows.
    pub ry: u32,
    /// Half-width of the window, columns.
    pub rx: u32,
    /// Offset of the values times validity in `src`.
    pub values_at: u32,
    /// Offset of the validity in `src`.
    pub valid_at: u32,
    /// Offset of the two scratch planes in `aux`.
    pub scratch_at: u32,
    /// Offset of the means in `dst`.
    pub out_at: u32,
}

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/box_means.wgsl");

/// CPU twin of the shader: the means over the valid pixels of `values` (`valid` 1 or 0) in
/// windows of half-sizes `(ry, rx)`, row-major `h × w`.
pub fn cpu(values: &[f32], valid: &[f32], h: usize, w: usize, ry: usize, rx: usize) -> Vec<f32> {
    let um: Vec<f32> = values.iter().zip(valid).map(|(v, m)| v * m).collect();
    let ms = valid_counts(valid, h, w, ry, rx);
    box_means(&um, &ms, h, w, ry, rx)
}

/// Queues the window means of `at.values` (the values times the validity, a `w × h` plane of
/// the current image, `w` the chain's width) over the pixels where `at.valid` is 1, into
/// `at.out` of the next image; two planes of `aux` from `at.scratch` are used. The chain
/// stays on its current image.
#[cfg(feature = "gpu")]
pub fn encode(
    chain: &mut crate::gpu::GpuChain<'_>,
    h: usize,
    (ry, rx): (usize, usize),
    at: crate::kernels::Planes,
) -> crate::Result<()> {
    let w = chain.width();
    let [values_at, valid_at, scratch_at, out_at] =
        at.checked("box_means", w * chain.height(), w * h, 2 * w * h, 1)?;
    let p = Params {
        w: w as u32,
        h: h as u32,
        ry: ry.min(h) as u32,
        rx: rx.min(w) as u32,
        values_at,
        valid_at,
        scratch_at,
        out_at,
    };
    let columns = (2 * w as u32).div_ceil(64);
    let rows = (h as u32).div_ceil(64);
    chain.dispatch("box_means", SHADER, "box_columns", &p, (columns, 1), false)?;
    chain.dispatch("box_means", SHADER, "box_rows", &p, (rows, 1), false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Running f32 sums against a direct sum of a window of at most a few hundred values
    /// below 1: rounding only.
    const SUM_TOLERANCE: f32 = 1e-4;

    #[test]
    fn box_sums_match_the_direct_window_sums() {
        // Heights that leave a remainder below the row groups, windows wider than the grid.
        for (h, w, ry, rx) in [(1, 1, 0, 0), (17, 9, 2, 3), (8, 40, 1, 50), (29, 23, 40, 4)] {
            let v: Vec<f32> = (0..h * w).map(|i| ((i * 53 % 97) as f32) / 97.0).collect();
            let got = box_sums(&v, h, w, ry, rx);
            for y in 0..h {
                for x in 0..w {
                    let mut want = 0f32;
                    for yy in y.saturating_sub(ry)..(y + ry + 1).min(h) {
                        for xx in x.saturating_sub(rx)..(x + rx + 1).min(w) {
                            want += v[yy * w + xx];
                        }
                    }
                    let d = (got[y * w + x] - want).abs();
                    assert!(d < SUM_TOLERANCE, "{h}x{w} r=({ry},{rx}) at ({y},{x}): {d}");
                }
            }
        }
    }
}
