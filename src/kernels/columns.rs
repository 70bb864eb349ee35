//! The pixel features that look along the beam (up and down each column): window means above
//! and below, the mean of everything above, the brightest reflector above, the brightest a
//! few millimetres below, and the ridge across the column (`segment::pixels`' "above" and
//! "below" features). Shader: `shaders/columns.wgsl`, one thread per column; this CPU twin
//! computes the same values row by row (vectorised across the row), with the prefix sums
//! added in the same order, so that only the divisions may round differently.

/// Features per pixel.
pub const FEATURES: usize = 7;

/// The reaches of the column features, in rows (the caller converts millimetres).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// Nearest row of the windows above and below (0.5 mm).
    pub d05: usize,
    /// Offset of the ridge's neighbours, of the "from below" mean and of the maximum above (1 mm).
    pub d1: usize,
    /// Farthest row of the windows above and below (3 mm).
    pub d3: usize,
    /// Farthest row of the maximum below (8 mm).
    pub d8: usize,
}

/// Parameters; keep in sync with `Params` in shaders/columns.wgsl.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    /// Columns.
    pub w: u32,
    /// Rows.
    pub h: u32,
    /// [`Reach::d05`].
    pub d05: u32,
    /// [`Reach::d1`].
    pub d1: u32,
    /// [`Reach::d3`].
    pub d3: u32,
    /// [`Reach::d8`].
    pub d8: u32,
    /// Offset of the values in `src`.
    pub values_at: u32,
    /// Offset of the validity in `src`.
    pub valid_at: u32,
    /// Offset of the prefix sums in `aux`.
    pub scratch_at: u32,
    /// Offset of the first feature plane in `dst`.
    pub out_at: u32,
    /// Padding.
    pub pad: [u32; 2],
}

/// The shader's source.
pub const SHADER: &str = include_str!("../../shaders/columns.wgsl");

/// A grid's values times validity and their prefix sums down the columns, from which each
/// column feature is computed ([`Columns::plane`]).
pub struct Columns {
    h: usize,
    w: usize,
    reach: Reach,
    /// Value × validity, row-major.
    v: Vec<f32>,
    /// Prefix sums of `v` down each column: row `y` holds the sum of rows `0..y` (h + 1 rows).
    sums: Vec<f32>,
    /// The same of the validity.
    counts: Vec<f32>,
}

impl Columns {
    /// Prepares the column features of `values` (row-major `h × w`) over the pixels where
    /// `valid` is 1 (0 elsewhere).
    pub fn new(values: &[f32], valid: &[f32], h: usize, w: usize, reach: Reach) -> Columns {
        let n = h * w;
        let v: Vec<f32> = values[..n]
            .iter()
            .zip(&valid[..n])
            .map(|(a, m)| a * m)
            .collect();
        let mut sums = vec![0f32; (h + 1) * w];
        let mut counts = vec![0f32; (h + 1) * w];
        for y in 0..h {
            let (done, next) = sums.split_at_mut((y + 1) * w);
            for ((s, p), a) in next[..w]
                .iter_mut()
                .zip(&done[y * w..])
                .zip(&v[y * w..(y + 1) * w])
            {
                *s = p + a;
            }
            let (done, next) = counts.split_at_mut((y + 1) * w);
            for ((s, p), m) in next[..w]
                .iter_mut()
                .zip(&done[y * w..])
                .zip(&valid[y * w..(y + 1) * w])
            {
                *s = p + m;
            }
        }
        Columns {
            h,
            w,
            reach,
            v,
            sums,
            counts,
        }
    }

    fn row<'a>(&self, plane: &'a [f32], y: usize) -> &'a [f32] {
        &plane[y * self.w..(y + 1) * self.w]
    }

    /// The means over the valid pixels of rows `a..b` (clamped) of every column into `out`.
    fn means(&self, a: isize, b: isize, out: &mut [f32]) {
        let h = self.h as isize;
        let (lo, hi) = (a.clamp(0, h) as usize, b.clamp(0, h) as usize);
        let (s0, s1) = (self.row(&self.sums, lo), self.row(&self.sums, hi));
        let (c0, c1) = (self.row(&self.counts, lo), self.row(&self.counts, hi));
        for x in 0..self.w {
            let count = c1[x] - c0[x];
            out[x] = if hi <= lo || count <= 0.0 {
                0.0
            } else {
                (s1[x] - s0[x]) / count
            };
        }
    }

    /// Column feature `j` (0..[`FEATURES`], in the shader's order) of every pixel into `out`
    /// (row-major `h × w`).
    pub fn plane(&self, j: usize, out: &mut [f32]) {
        let (h, w, r) = (self.h, self.w, self.reach);
        let rows = out[..h * w].chunks_exact_mut(w).enumerate();
        match j {
            0..=3 => {
                for (y, o) in rows {
                    let y = y as isize;
                    let (a, b) = match j {
                        0 => (y - r.d3 as isize, y - r.d05 as isize + 1),
                        1 => (y + r.d05 as isize, y + r.d3 as isize + 1),
                        2 => (y + r.d1 as isize, h as isize),
                        _ => (0, y),
                    };
                    self.means(a, b, o);
                }
            }
            4 => {
                let mut running = vec![0f32; w];
                for (y, o) in rows {
                    if y >= r.d1 {
                        for (m, v) in running.iter_mut().zip(self.row(&self.v, y - r.d1)) {
                            *m = m.max(*v);
                        }
                        o.copy_from_slice(&running);
                    } else {
                        o.fill(0.0);
                    }
                }
            }
            5 => {
                for (y, o) in rows {
                    let (lo, hi) = (y + r.d05, (y + r.d8).min(h - 1));
                    if lo > hi {
                        o.fill(0.0);
                        continue;
                    }
                    o.copy_from_slice(self.row(&self.v, lo));
                    for k in lo + 1..=hi {
                        for (m, v) in o.iter_mut().zip(self.row(&self.v, k)) {
                            *m = m.max(*v);
                        }
                    }
                }
            }
            _ => {
                for (y, o) in rows {
                    let up = self.row(&self.v, y.saturating_sub(r.d1));
                    let down = self.row(&self.v, (y + r.d1).min(h - 1));
                    let mid = self.row(&self.v, y);
                    for x in 0..w {
                        o[x] = mid[x] - 0.5 * (up[x] + down[x]);
                    }
                }
            }
        }
    }
}

/// CPU twin of the shader: the [`FEATURES`] column features of `values` where `valid` is 1,
/// plane after plane (`FEATURES × h·w`).
pub fn cpu(values: &[f32], valid: &[f32], h: usize, w: usize, reach: Reach) -> Vec<f32> {
    let c = Columns::new(values, valid, h, w, reach);
    let mut out = vec![0f32; FEATURES * h * w];
    if h * w > 0 {
        for (j, plane) in out.chunks_exact_mut(h * w).enumerate() {
            c.plane(j, plane);
        }
    }
    out
}

/// Scratch values the shader needs in `aux` for a `w × h` plane: the prefix sums of the
/// values and of the validity (`h + 1` rows each), then the maxima from each block's start,
/// to each block's end and to the bottom (a plane each).
pub fn scratch(w: usize, h: usize) -> usize {
    2 * (h + 1) * w + 3 * h * w
}

/// Queues the column features of `at.values` (a `w × h` plane of the current image, `w` the
/// chain's width) over the pixels where `at.valid` is 1, into [`FEATURES`] planes of the next
/// image from `at.out`; [`scratch`] values of `aux` from `at.scratch` are used. The chain
/// stays on its current image.
#[cfg(feature = "gpu")]
pub fn encode(
    chain: &mut crate::gpu::GpuChain<'_>,
    h: usize,
    reach: Reach,
    at: crate::kernels::Planes,
) -> crate::Result<()> {
    let w = chain.width();
    let [values_at, valid_at, scratch_at, out_at] = at.checked(
        "columns",
        w * chain.height(),
        w * h,
        scratch(w, h),
        FEATURES,
    )?;
    let p = Params {
        w: w as u32,
        h: h as u32,
        d05: reach.d05.min(h + 1) as u32,
        d1: reach.d1.min(h + 1) as u32,
        d3: reach.d3.min(h + 1) as u32,
        d8: reach.d8.min(h + 1) as u32,
        values_at,
        valid_at,
        scratch_at,
        out_at,
        pad: [0; 2],
    };
    chain.dispatch(
        "columns",
        SHADER,
        "columns",
        &p,
        ((w as u32).div_ceil(64), 1),
        false,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The twin's f32 prefix sums against an f64 reference: rounding of sums of at most a few
    /// hundred values below 1.
    const MEAN_TOLERANCE: f32 = 1e-5;

    #[test]
    fn the_twin_matches_a_column_by_column_reference() {
        for (h, w) in [(1, 1), (5, 3), (40, 7), (97, 13)] {
            let values: Vec<f32> = (0..h * w)
                .map(|i| ((i * 37 % 101) as f32) / 101.0)
                .collect();
            let valid: Vec<f32> = (0..h * w)
                .map(|i| f32::from(u8::from(i % 7 != 3)))
                .collect();
            for reach in [
                Reach {
                    d05: 1,
                    d1: 1,
                    d3: 2,
                    d8: 2,
                },
                Reach {
                    d05: 2,
                    d1: 3,
                    d3: 9,
                    d8: 25,
                },
                Reach {
                    d05: 50,
                    d1: 60,
                    d3: 80,
                    d8: 200,
                },
            ] {
                let got = cpu(&values, &valid, h, w, reach);
                let n = h * w;
                for x in 0..w {
                    let col: Vec<f32> = (0..h)
                        .map(|y| values[y * w + x] * valid[y * w + x])
                        .collect();
                    let m: Vec<f32> = (0..h).map(|y| valid[y * w + x]).collect();
                    let mean = |a: isize, b: isize| -> f32 {
                        let (a, b) = (
                            a.clamp(0, h as isize) as usize,
                            b.clamp(0, h as isize) as usize,
                        );
                        let s: f64 = (a..b).map(|y| col[y] as f64).sum();
                        let c: f64 = (a..b).map(|y| m[y] as f64).sum();
                        if b <= a || c <= 0.0 {
                            0.0
                        } else {
                            (s / c) as f32
                        }
                    };
                    let at = |y: isize| col[y.clamp(0, h as isize - 1) as usize];
                    for y in 0..h {
                        let yi = y as isize;
                        let (d05, d1, d3) =
                            (reach.d05 as isize, reach.d1 as isize, reach.d3 as isize);
                        let lo = y + reach.d05;
                        let hi = (y + reach.d8).min(h - 1);
                        let want = [
                            mean(yi - d3, yi - d05 + 1),
                            mean(yi + d05, yi + d3 + 1),
                            mean(yi + d1, h as isize),
                            mean(0, yi),
                            if yi >= d1 {
                                col[..=(y - reach.d1)].iter().fold(0f32, |a, b| a.max(*b))
                            } else {
                                0.0
                            },
                            if lo > hi {
                                0.0
                            } else {
                                col[lo..=hi].iter().fold(f32::MIN, |a, b| a.max(*b))
                            },
                            col[y] - 0.5 * (at(yi - d1) + at(yi + d1)),
                        ];
                        for (j, wv) in want.iter().enumerate() {
                            let g = got[j * n + y * w + x];
                            assert!(
                                (g - wv).abs() <= MEAN_TOLERANCE,
                                "{h}x{w} {reach:?} feature {j} at ({y},{x}): {g} vs {wv}"
                            );
                        }
                    }
                }
            }
        }
    }
}
