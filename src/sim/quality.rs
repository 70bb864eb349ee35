//! Image quality measures for despeckling, scored against a phantom's clean map.
//!
//! - SSIM (Wang et al. 2004): 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, L = 255.
//! - PSNR in dB for 8-bit range.
//! - ENL, the equivalent number of looks mean²/variance, over homogeneous tissue.
//! - CNR |m1 − m2| / √(v1 + v2) between two pixel sets (tendon and the tissue around it).
//! - Edge ratio: mean gradient magnitude over a band (the bone surface) of the filtered image
//!   over that of the clean map; 1 keeps the edge as sharp as the truth, below 1 blurs it.

use ndarray::Array2;

fn gaussian_kernel(sigma: f64, radius: usize) -> Vec<f64> {
    let k: Vec<f64> = (0..=2 * radius)
        .map(|i| (-((i as f64 - radius as f64).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = k.iter().sum();
    k.into_iter().map(|v| v / s).collect()
}

/// Separable Gaussian blur, edges clamped.
pub fn blur(a: &Array2<f64>, sigma: f64, radius: usize) -> Array2<f64> {
    let k = gaussian_kernel(sigma, radius);
    let (h, w) = a.dim();
    let r = radius as isize;
    let tmp = Array2::from_shape_fn((h, w), |(y, x)| {
        (-r..=r)
            .map(|d| {
                a[[y, (x as isize + d).clamp(0, w as isize - 1) as usize]] * k[(d + r) as usize]
            })
            .sum::<f64>()
    });
    Array2::from_shape_fn((h, w), |(y, x)| {
        (-r..=r)
            .map(|d| {
                tmp[[(y as isize + d).clamp(0, h as isize - 1) as usize, x]] * k[(d + r) as usize]
            })
            .sum::<f64>()
    })
}

/// Mean SSIM of `a` against reference `b` over the pixels where `mask` is set (all if none).
pub fn ssim(a: &Array2<f32>, b: &Array2<f32>, mask: Option<&Array2<bool>>) -> f64 {
    const C1: f64 = (0.01 * 255.0) * (0.01 * 255.0);
    const C2: f64 = (0.03 * 255.0) * (0.03 * 255.0);
    let a = a.mapv(|v| v as f64);
    let b = b.mapv(|v| v as f64);
    let ma = blur(&a, 1.5, 5);
    let mb = blur(&b, 1.5, 5);
    let aa = blur(&(&a * &a), 1.5, 5);
    let bb = blur(&(&b * &b), 1.5, 5);
    let ab = blur(&(&a * &b), 1.5, 5);
    let (mut sum, mut n) = (0.0, 0usize);
    for ((y, x), _) in a.indexed_iter() {
        if mask.is_some_and(|m| !m[[y, x]]) {
            continue;
        }
        let (mx, my) = (ma[[y, x]], mb[[y, x]]);
        let vx = aa[[y, x]] - mx * mx;
        let vy = bb[[y, x]] - my * my;
        let cxy = ab[[y, x]] - mx * my;
        sum +=
            ((2.0 * mx * my + C1) * (2.0 * cxy + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2));
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// PSNR in dB (peak 255) over the masked pixels.
pub fn psnr(a: &Array2<f32>, b: &Array2<f32>, mask: Option<&Array2<bool>>) -> f64 {
    let (mut se, mut n) = (0.0, 0usize);
    for ((y, x), v) in a.indexed_iter() {
        if mask.is_some_and(|m| !m[[y, x]]) {
            continue;
        }
        se += (*v as f64 - b[[y, x]] as f64).powi(2);
        n += 1;
    }
    if n == 0 || se == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64 * 255.0 / (se / n as f64)).log10()
}

/// Mean and variance of the values.
pub fn mean_var(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    (
        m,
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64,
    )
}

/// Equivalent number of looks of the values (mean² / variance).
pub fn enl(v: &[f64]) -> f64 {
    let (m, var) = mean_var(v);
    if var <= 0.0 {
        f64::INFINITY
    } else {
        m * m / var
    }
}

/// Contrast-to-noise ratio between two sets.
pub fn cnr(a: &[f64], b: &[f64]) -> f64 {
    let (ma, va) = mean_var(a);
    let (mb, vb) = mean_var(b);
    if va + vb <= 0.0 {
        f64::INFINITY
    } else {
        (ma - mb).abs() / (va + vb).sqrt()
    }
}

/// Central-difference gradient magnitude at (x, y), edges clamped.
pub fn gradient(a: &Array2<f32>, x: usize, y: usize) -> f64 {
    let (h, w) = a.dim();
    let g = |xx: usize, yy: usize| a[[yy.min(h - 1), xx.min(w - 1)]] as f64;
    let gx = (g(x + 1, y) - g(x.saturating_sub(1), y)) / 2.0;
    let gy = (g(x, y + 1) - g(x, y.saturating_sub(1))) / 2.0;
    (gx * gx + gy * gy).sqrt()
}

/// Mean gradient magnitude of `a` over the band, divided by that of `reference`.
pub fn edge_ratio(a: &Array2<f32>, reference: &Array2<f32>, band: &Array2<bool>) -> Option<f64> {
    let (mut ga, mut gr, mut n) = (0.0, 0.0, 0usize);
    for ((y, x), on) in band.indexed_iter() {
        if *on {
            ga += gradient(a, x, y);
            gr += gradient(reference, x, y);
            n += 1;
        }
    }
    (n > 0 && gr > 0.0).then(|| ga / gr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssim_is_one_for_identical_and_lower_for_noisy() {
        let a = Array2::from_shape_fn((40, 40), |(y, x)| ((x * 7 + y * 3) % 50) as f32 + 100.0);
        assert!((ssim(&a, &a, None) - 1.0).abs() < 1e-9);
        let noisy = Array2::from_shape_fn((40, 40), |(y, x)| {
            a[[y, x]] + if (x + y) % 2 == 0 { 20.0 } else { -20.0 }
        });
        assert!(ssim(&noisy, &a, None) < 0.8);
        assert!(psnr(&noisy, &a, None) < 25.0);
        assert!(psnr(&a, &a, None).is_infinite());
    }

    #[test]
    fn enl_and_cnr() {
        assert!((enl(&[1.0, 3.0]) - 4.0).abs() < 1e-12);
        assert!((cnr(&[1.0, 3.0], &[5.0, 7.0]) - 4.0 / 2f64.sqrt()).abs() < 1e-12);
    }
}
