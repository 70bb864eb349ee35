//! Exact Euclidean distance transform in millimetres (Felzenszwalb & Huttenlocher, "Distance
//! transforms of sampled functions", Theory of Computing 8, 2012), anisotropic spacing allowed.

use ndarray::Array2;
use rayon::prelude::*;

/// Exact squared Euclidean distance transform along one line (Felzenszwalb & Huttenlocher):
/// `out[q] = min over p of (q − p)² + f[p]`. Only the sites with `f[p] < BIG` enter the lower
/// envelope (a site at BIG can never be the minimum where a finite one exists, and the caller
/// skips lines with none), so a line crossing few structures costs few envelope steps.
/// `height` and `v` are scratch (`height[p] = f[p] + p²` of the sites, `v` their positions);
/// `z` the envelope's boundaries; `half_inverse[d] = 1 / (2d)` (a product instead of a
/// division in the inner loop).
fn edt_1d(
    f: &[f64],
    out: &mut [f64],
    v: &mut [usize],
    z: &mut [f64],
    height: &mut [f64],
    half_inverse: &[f64],
) {
    let mut k = 0usize;
    let mut first = true;
    for (q, &fq) in f.iter().enumerate() {
        if fq >= BIG {
            continue;
        }
        let hq = fq + (q * q) as f64;
        if first {
            first = false;
            v[0] = q;
            height[0] = hq;
            z[0] = f64::NEG_INFINITY;
            z[1] = f64::INFINITY;
            continue;
        }
        loop {
            // Where the parabola of site q overtakes that of the envelope's site k.
            let s = (hq - height[k]) * half_inverse[q - v[k]];
            if s <= z[k] && k > 0 {
                k -= 1;
                continue;
            }
            if s <= z[k] {
                // k == 0 and the new parabola wins everywhere.
                v[0] = q;
                height[0] = hq;
                z[0] = f64::NEG_INFINITY;
                z[1] = f64::INFINITY;
                break;
            }
            k += 1;
            v[k] = q;
            height[k] = hq;
            z[k] = s;
            z[k + 1] = f64::INFINITY;
            break;
        }
    }
    k = 0;
    for (q, o) in out.iter_mut().enumerate() {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        *o = (q as f64 - p as f64).powi(2) + f[p];
    }
}

/// The value standing for "no site" in the 1-D transform's input.
const BIG: f64 = 1e20;

/// Distance in mm from each pixel to the nearest `true` pixel of `mask` (infinite if none):
/// the square root of [`squared_distance_mm2`].
pub fn distance_mm(mask: &Array2<bool>, mm: (f64, f64)) -> Array2<f64> {
    squared_distance_mm2(mask, mm).mapv_into(f64::sqrt)
}

/// Squared distance in mm² from each pixel to the nearest `true` pixel of `mask` (infinite if
/// none). Callers that compare against a margin compare squares, and take the root only
/// where they need the distance itself.
/// First the distance along each column to the nearest `true` pixel (two scans, row by row so
/// that they vectorise across the columns), then the exact 1-D transform of its square along
/// each row, rows in parallel (each row is the same transform whatever the order, so the
/// result does not depend on the thread count).
pub fn squared_distance_mm2(mask: &Array2<bool>, mm: (f64, f64)) -> Array2<f64> {
    let (h, w) = mask.dim();
    if h == 0 || w == 0 {
        return Array2::from_elem((h, w), f64::INFINITY);
    }
    let mask = mask.as_standard_layout();
    let mask = mask.as_slice().unwrap_or(&[]);
    // Rows to the nearest `true` pixel in the same column; NONE where the column has none.
    // Branch-free per element, so that the passes vectorise across the row.
    const NONE: u32 = u32::MAX / 2;
    let mut g = vec![NONE; h * w];
    let mut any = false;
    for (o, &m) in g[..w].iter_mut().zip(&mask[..w]) {
        *o = if m { 0 } else { NONE };
        any |= m;
    }
    for y in 1..h {
        let (done, rest) = g.split_at_mut(y * w);
        let above = &done[(y - 1) * w..];
        let row = &mask[y * w..(y + 1) * w];
        for ((o, &a), &m) in rest[..w].iter_mut().zip(above).zip(row) {
            *o = if m { 0 } else { (a + 1).min(NONE) };
            any |= m;
        }
    }
    if !any {
        return Array2::from_elem((h, w), f64::INFINITY);
    }
    for y in (0..h - 1).rev() {
        let (cur, below) = g.split_at_mut((y + 1) * w);
        for (o, b) in cur[y * w..].iter_mut().zip(&below[..w]) {
            *o = (*o).min((b + 1).min(NONE));
        }
    }
    // Along the rows, in column units: f = (rows · mm_y / mm_x)².
    let sx2 = mm.0 * mm.0;
    let ratio2 = mm.1 * mm.1 / sx2;
    let half_inverse: Vec<f64> = (0..w.max(1))
        .map(|d| if d == 0 { 0.0 } else { 0.5 / d as f64 })
        .collect();
    let mut d = vec![f64::INFINITY; h * w];
    d.par_chunks_mut(w).enumerate().for_each_init(
        || {
            (
                vec![0usize; w],
                vec![0f64; w + 1],
                vec![0f64; w],
                vec![0f64; w],
                vec![0f64; w],
            )
        },
        |(v, z, f, out, height), (y, row)| {
            let gy = &g[y * w..(y + 1) * w];
            if gy.iter().all(|&r| r >= NONE) {
                return;
            }
            for (f, &r) in f.iter_mut().zip(gy) {
                *f = if r >= NONE {
                    BIG
                } else {
                    (r as f64) * (r as f64) * ratio2
                };
            }
            edt_1d(f, out, v, z, height, &half_inverse);
            // Every value is finite here: the line has a site, and the envelope holds only
            // finite ones.
            for (d, &o) in row.iter_mut().zip(out.iter()) {
                *d = o * sx2;
            }
        },
    );
    Array2::from_shape_vec((h, w), d).unwrap_or_else(|_| Array2::from_elem((h, w), f64::INFINITY))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_transform_is_euclidean_in_mm() {
        let mut m = Array2::from_elem((21, 31), false);
        m[[10, 15]] = true;
        let d = distance_mm(&m, (0.1, 0.2));
        assert!((d[[10, 15]]).abs() < 1e-12);
        assert!((d[[10, 25]] - 1.0).abs() < 1e-9, "{}", d[[10, 25]]);
        assert!((d[[15, 15]] - 1.0).abs() < 1e-9);
        assert!((d[[13, 19]] - (0.4f64.powi(2) + 0.6f64.powi(2)).sqrt()).abs() < 1e-9);
        let empty = distance_mm(&Array2::from_elem((4, 4), false), (0.1, 0.1));
        assert!(empty.iter().all(|v| v.is_infinite()));
    }

    /// Against brute force on a scattered mask, non-square pixels, more lines than threads.
    #[test]
    fn distance_transform_matches_brute_force() {
        let (h, w, mm) = (37, 53, (0.15, 0.1));
        let m = Array2::from_shape_fn((h, w), |(y, x)| (x * 13 + y * 7) % 97 == 0);
        let d = distance_mm(&m, mm);
        let points: Vec<(usize, usize)> = m
            .indexed_iter()
            .filter(|(_, v)| **v)
            .map(|(p, _)| p)
            .collect();
        for ((y, x), got) in d.indexed_iter() {
            let want = points
                .iter()
                .map(|&(py, px)| {
                    ((px as f64 - x as f64) * mm.0).hypot((py as f64 - y as f64) * mm.1)
                })
                .fold(f64::INFINITY, f64::min);
            assert!((got - want).abs() < 1e-9, "({x}, {y}): {got} vs {want}");
        }
    }
}
