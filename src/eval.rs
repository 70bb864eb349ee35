//! Scoring against phantom truth.

use ndarray::Array2;
use serde::Serialize;

use crate::despeckle::{Despeckler, Filter};
use crate::phantom::{generate, label, PhantomParams};
use crate::quality;
use crate::Result;

/// Depth of the structure-free band above and below the tendon used as its surround, px.
const SURROUND_PX: usize = 12;
/// Gap between the tendon and its surround band, px (PSF blur).
const SURROUND_GAP_PX: usize = 3;
/// Local standard deviation (grey levels, σ = 2 px window) of the clean map under which
/// tissue counts as homogeneous for the ENL.
const HOMOGENEOUS_STD: f64 = 2.0;
/// Clean level below which tissue is too dark (shadow, fluid) for the ENL.
const HOMOGENEOUS_MIN_LEVEL: f64 = 60.0;

/// Averages of the quality measures of one filter over a set of phantoms.
#[derive(Debug, Clone, Serialize)]
pub struct DespeckleScore {
    /// Filter name (`raw` for the unfiltered image).
    pub filter: String,
    /// Named parameters.
    pub parameters: Vec<(String, f64)>,
    /// Mean SSIM against the clean map.
    pub ssim: f64,
    /// Mean PSNR (dB) against the clean map.
    pub psnr_db: f64,
    /// Mean equivalent number of looks in homogeneous tissue.
    pub enl: f64,
    /// Mean contrast-to-noise between tendon and surrounding tissue.
    pub cnr_tendon: f64,
    /// Mean bone-edge gradient ratio (filtered / clean).
    pub bone_edge_ratio: f64,
    /// Phantoms scored.
    pub cases: usize,
}

struct Masks {
    image: Array2<bool>,
    homogeneous: Array2<bool>,
    tendon: Array2<bool>,
    surround: Array2<bool>,
    bone_band: Array2<bool>,
}

fn masks(clean: &Array2<f32>, labels: &Array2<u8>) -> Masks {
    let (h, w) = clean.dim();
    let c = clean.mapv(|v| v as f64);
    let m = quality::blur(&c, 2.0, 4);
    let m2 = quality::blur(&(&c * &c), 2.0, 4);
    let homogeneous = Array2::from_shape_fn((h, w), |(y, x)| {
        let sd = (m2[[y, x]] - m[[y, x]].powi(2)).max(0.0).sqrt();
        labels[[y, x]] == label::BACKGROUND && sd < HOMOGENEOUS_STD && m[[y, x]] > HOMOGENEOUS_MIN_LEVEL
    });
    let tendon = labels.mapv(|l| l == label::TENDON);
    let mut surround = Array2::from_elem((h, w), false);
    for x in 0..w {
        let rows: Vec<usize> = (0..h).filter(|y| tendon[[*y, x]]).collect();
        if let (Some(&t0), Some(&t1)) = (rows.first(), rows.last()) {
            let above = t0.saturating_sub(SURROUND_GAP_PX + SURROUND_PX)..t0.saturating_sub(SURROUND_GAP_PX);
            let below = (t1 + SURROUND_GAP_PX).min(h)..(t1 + SURROUND_GAP_PX + SURROUND_PX).min(h);
            for y in above.chain(below) {
                if labels[[y, x]] == label::BACKGROUND {
                    surround[[y, x]] = true;
                }
            }
        }
    }
    let bone_band = Array2::from_shape_fn((h, w), |(y, x)| {
        (y.saturating_sub(2)..(y + 3).min(h)).any(|yy| labels[[yy, x]] == label::BONE)
    });
    let image = clean.mapv(|v| v > 0.0);
    Masks { image, homogeneous, tendon, surround, bone_band }
}

fn values(a: &Array2<f32>, m: &Array2<bool>) -> Vec<f64> {
    a.indexed_iter().filter(|(i, _)| m[*i]).map(|(_, v)| *v as f64).collect()
}

/// Scores the unfiltered image and each filter on phantoms with `seeds`.
pub fn despeckle_scores(
    despeckler: &Despeckler,
    filters: &[Filter],
    seeds: std::ops::Range<u64>,
    params: &PhantomParams,
) -> Result<Vec<DespeckleScore>> {
    let mut sums: Vec<[f64; 5]> = vec![[0.0; 5]; filters.len() + 1];
    let mut counts: Vec<[usize; 5]> = vec![[0; 5]; filters.len() + 1];
    let mut cases = 0;
    for seed in seeds {
        let mut p = params.clone();
        p.seed = seed;
        let ph = generate("eval", &p)?;
        let img = ph.frames[0].mapv(|v| v as f32);
        let clean = ph.clean[0].mapv(|v| v as f32);
        let mk = masks(&clean, &ph.labels[0]);
        cases += 1;
        for k in 0..=filters.len() {
            let out = if k == 0 { img.clone() } else { despeckler.run(&img, std::slice::from_ref(&filters[k - 1]))? };
            let measures = [
                Some(quality::ssim(&out, &clean, Some(&mk.image))),
                Some(quality::psnr(&out, &clean, Some(&mk.image))),
                Some(quality::enl(&values(&out, &mk.homogeneous))).filter(|v| v.is_finite()),
                (mk.tendon.iter().any(|v| *v) && mk.surround.iter().any(|v| *v))
                    .then(|| quality::cnr(&values(&out, &mk.tendon), &values(&out, &mk.surround))),
                quality::edge_ratio(&out, &clean, &mk.bone_band),
            ];
            for (i, m) in measures.iter().enumerate() {
                if let Some(v) = m {
                    sums[k][i] += v;
                    counts[k][i] += 1;
                }
            }
        }
    }
    let avg = |k: usize, i: usize| if counts[k][i] == 0 { f64::NAN } else { sums[k][i] / counts[k][i] as f64 };
    Ok((0..=filters.len())
        .map(|k| DespeckleScore {
            filter: if k == 0 { "raw".into() } else { filters[k - 1].name().into() },
            parameters: if k == 0 {
                Vec::new()
            } else {
                filters[k - 1].parameters().into_iter().map(|(n, v)| (n.to_string(), v)).collect()
            },
            ssim: avg(k, 0),
            psnr_db: avg(k, 1),
            enl: avg(k, 2),
            cnr_tendon: avg(k, 3),
            bone_edge_ratio: avg(k, 4),
            cases,
        })
        .collect())
}
