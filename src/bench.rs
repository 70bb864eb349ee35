//! `sonoguide bench`: times every kernel on a generated speckle frame (warm-up, then the
//! median of repeated runs). Speed is measured here and in `benches/`, never in tests.

use std::time::Instant;

use ndarray::Array2;
use serde::Serialize;

use crate::despeckle::{Despeckler, Filter};
use crate::kernels::{frost, lee, median, obnlm, srad};
use crate::phantom::{generate, PhantomParams};
use crate::Result;

/// One timed case.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// Kernel name (`roundtrip` = upload and read-back alone).
    pub kernel: String,
    /// `gpu` or `cpu`.
    pub backend: String,
    /// Adapter name, or `cpu`.
    pub adapter: String,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Named parameters.
    pub parameters: serde_json::Map<String, serde_json::Value>,
    /// Median milliseconds per frame (upload, filter and read-back on the GPU).
    pub ms_median: f64,
    /// Megapixels per second at the median.
    pub mpix_per_s: f64,
}

/// The cases timed: at least those the peers were timed on.
pub fn bench_filters() -> Result<Vec<Filter>> {
    Ok(vec![
        Filter::Srad(srad::Srad::new(0.5, 1)?),
        Filter::Srad(srad::Srad::new(0.5, 100)?),
        Filter::Obnlm(obnlm::Params::new(11, 5, 4.0)?),
        Filter::Median(median::Params::new(3)?),
        Filter::Median(median::Params::new(5)?),
        Filter::Lee(lee::Params::new(7, 0.25)?),
        Filter::Frost(frost::Params::new(7, 2.0)?),
    ])
}

/// A speckle frame of the given size from a phantom.
pub fn speckle_frame(width: usize, height: usize) -> Result<Array2<f32>> {
    let mut p = PhantomParams::default();
    p.width = width;
    p.height = height;
    p.seed = 4242;
    Ok(generate("bench", &p)?.frames[0].mapv(|v| v as f32))
}

/// Median of the values (sorted copy).
pub fn median_of(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    if s.len() % 2 == 1 { s[s.len() / 2] } else { (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0 }
}

/// Times `f` `repeats` times after `warmup` runs; returns the median in ms.
pub fn time_ms(warmup: usize, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut t = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median_of(&t))
}

/// Times every kernel on the despeckler's backend.
pub fn run(despeckler: &Despeckler, width: usize, height: usize, repeats: usize) -> Result<Vec<BenchRow>> {
    let img = speckle_frame(width, height)?;
    let mut rows = Vec::new();
    let row = |kernel: &str, parameters: Vec<(&'static str, f64)>, ms: f64| BenchRow {
        kernel: kernel.to_string(),
        backend: despeckler.backend_name().to_string(),
        adapter: despeckler.device_name(),
        width,
        height,
        parameters: parameters.into_iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect(),
        ms_median: ms,
        mpix_per_s: (width * height) as f64 / 1e6 / (ms / 1e3),
    };
    if despeckler.backend_name() == "gpu" {
        let ms = time_ms(3, repeats, || despeckler.run(&img, &[]).map(|_| ()))?;
        rows.push(row("roundtrip", Vec::new(), ms));
    }
    for f in bench_filters()? {
        // The heavy CPU cases get fewer repeats: their run time dwarfs the machine's noise.
        let slow = despeckler.backend_name() == "cpu" && matches!(f, Filter::Obnlm(_) | Filter::Srad(srad::Srad { iterations: 100, .. }));
        let reps = if slow { repeats.min(5) } else { repeats };
        let ms = time_ms(1, reps, || despeckler.run(&img, std::slice::from_ref(&f)).map(|_| ()))?;
        rows.push(row(f.name(), f.parameters(), ms));
    }
    Ok(rows)
}
