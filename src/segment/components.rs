//! Connected components (4-connected) of a binary mask, with their pixel lists.

use ndarray::Array2;

/// One connected component.
#[derive(Debug, Clone)]
pub struct Component {
    /// Pixels as (row, column).
    pub pixels: Vec<(usize, usize)>,
    /// Bounding box: first row, first column, last row, last column (inclusive).
    pub bbox: (usize, usize, usize, usize),
}

impl Component {
    /// Pixel count.
    pub fn area(&self) -> usize {
        self.pixels.len()
    }
    /// Bounding-box height and width.
    pub fn extent(&self) -> (usize, usize) {
        (self.bbox.2 - self.bbox.0 + 1, self.bbox.3 - self.bbox.1 + 1)
    }
    /// Share of the bounding box the component fills.
    pub fn fill(&self) -> f64 {
        let (h, w) = self.extent();
        self.area() as f64 / (h * w) as f64
    }
}

/// The 4-connected components of `mask`.
pub fn components(mask: &Array2<bool>) -> Vec<Component> {
    let (h, w) = mask.dim();
    let mut seen = Array2::from_elem((h, w), false);
    let mut out = Vec::new();
    let mut stack = Vec::new();
    for y in 0..h {
        for x in 0..w {
            if !mask[[y, x]] || seen[[y, x]] {
                continue;
            }
            let mut pixels = Vec::new();
            let mut bbox = (y, x, y, x);
            seen[[y, x]] = true;
            stack.push((y, x));
            while let Some((cy, cx)) = stack.pop() {
                pixels.push((cy, cx));
                bbox = (
                    bbox.0.min(cy),
                    bbox.1.min(cx),
                    bbox.2.max(cy),
                    bbox.3.max(cx),
                );
                let mut push = |ny: usize, nx: usize| {
                    if mask[[ny, nx]] && !seen[[ny, nx]] {
                        seen[[ny, nx]] = true;
                        stack.push((ny, nx));
                    }
                };
                if cy > 0 {
                    push(cy - 1, cx);
                }
                if cy + 1 < h {
                    push(cy + 1, cx);
                }
                if cx > 0 {
                    push(cy, cx - 1);
                }
                if cx + 1 < w {
                    push(cy, cx + 1);
                }
            }
            out.push(Component { pixels, bbox });
        }
    }
    out
}

/// Binary opening then closing with a square of radius `r` (removes specks, fills pinholes).
pub fn open_close(mask: &Array2<bool>, r: usize) -> Array2<bool> {
    let erode = |m: &Array2<bool>| morph(m, r, true);
    let dilate = |m: &Array2<bool>| morph(m, r, false);
    let opened = dilate(&erode(mask));
    erode(&dilate(&opened))
}

/// Erosion (`all`) or dilation (any) with a square of radius `r` (the window clipped at the
/// image's edges), separable, by running counts: O(1) per pixel whatever `r`, and both passes
/// walk memory row by row.
pub fn morph(m: &Array2<bool>, r: usize, all: bool) -> Array2<bool> {
    let (h, w) = m.dim();
    let src: Vec<bool> = m.iter().copied().collect();
    // Horizontal pass.
    let mut tmp = vec![false; w * h];
    let mut prefix = vec![0u32; w + 1];
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for x in 0..w {
            prefix[x + 1] = prefix[x] + row[x] as u32;
        }
        let out = &mut tmp[y * w..(y + 1) * w];
        let judge = |n: u32, span: usize| if all { n as usize == span } else { n > 0 };
        // Interior columns (the whole window inside the row): shifted slices of the prefix
        // sums, so that the loop vectorises; the clipped edges one by one.
        let (a, b) = (r.min(w), w.saturating_sub(r).max(r.min(w)));
        if b > a {
            let (hi, lo) = (&prefix[a + r + 1..b + r + 1], &prefix[a - r..b - r]);
            for ((o, h), l) in out[a..b].iter_mut().zip(hi).zip(lo) {
                *o = judge(h - l, 2 * r + 1);
            }
        }
        for x in (0..a).chain(b.max(a)..w) {
            let (lo, hi) = (x.saturating_sub(r), (x + r + 1).min(w));
            out[x] = judge(prefix[hi] - prefix[lo], hi - lo);
        }
    }
    // Vertical pass: per-column counts over the window, updated one row at a time.
    let mut count = vec![0u32; w];
    for y in 0..r.min(h) {
        for x in 0..w {
            count[x] += tmp[y * w + x] as u32;
        }
    }
    let mut out = vec![false; w * h];
    for y in 0..h {
        if y + r < h {
            for x in 0..w {
                count[x] += tmp[(y + r) * w + x] as u32;
            }
        }
        if y > r {
            for x in 0..w {
                count[x] -= tmp[(y - r - 1) * w + x] as u32;
            }
        }
        let span = (y + r + 1).min(h) - y.saturating_sub(r);
        let o = &mut out[y * w..(y + 1) * w];
        for x in 0..w {
            o[x] = if all {
                count[x] as usize == span
            } else {
                count[x] > 0
            };
        }
    }
    Array2::from_shape_vec((h, w), out).unwrap_or_else(|_| Array2::from_elem((h, w), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn morph_matches_the_definition() {
        let m = Array2::from_shape_fn((13, 17), |(y, x)| {
            (x * 7 + y * 3) % 5 == 0 || (x > 5 && x < 11 && y > 3 && y < 9)
        });
        // Also a taller mask, with radii that reach past many rows.
        let tall = Array2::from_shape_fn((150, 23), |(y, x)| {
            (x * 5 + y * 11) % 7 == 0 || (y > 60 && y < 70)
        });
        for (m, radii) in [(&m, &[1usize, 2][..]), (&tall, &[1, 3, 8][..])] {
            let (h, w) = m.dim();
            for &r in radii {
                for all in [false, true] {
                    let fast = morph(m, r, all);
                    let slow = Array2::from_shape_fn(m.dim(), |(y, x)| {
                        let ys = y.saturating_sub(r)..(y + r + 1).min(h);
                        let mut it = ys.flat_map(|yy| {
                            (x.saturating_sub(r)..(x + r + 1).min(w)).map(move |xx| (yy, xx))
                        });
                        if all {
                            it.all(|p| m[p])
                        } else {
                            it.any(|p| m[p])
                        }
                    });
                    assert_eq!(fast, slow, "{h}x{w} r {r} all {all}");
                }
            }
        }
        let c = components(&m);
        assert_eq!(
            c.iter().map(|c| c.area()).sum::<usize>(),
            m.iter().filter(|v| **v).count()
        );
    }
}
