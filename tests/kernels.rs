//! Kernel twins: every shader has a CPU twin and the other way round, params structs agree in
//! size with their WGSL structs, the fast CPU OBNLM agrees with its twin, and the GPU agrees
//! with the CPU (on lavapipe in CI).

mod common;

use ndarray::Array2;
use sonoguide::despeckle::{Despeckler, Filter, FILTER_NAMES};
use sonoguide::kernels::{self, frost, lee, median, obnlm, srad};
use sonoguide::sim::phantom::{generate, PhantomParams};
use sonoguide::Backend;

/// The largest absolute difference between two images of the same size.
fn max_abs_diff(a: &ndarray::Array2<f32>, b: &ndarray::Array2<f32>) -> f32 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// A speckle frame scaled to 0..1 (row-major) and a validity mask (1 or 0) with holes: pixel
/// (x, y) is invalid where `(x + a·y) % m == 0` or in the top `h / top` rows.
fn unit_values_and_holes(
    w: usize,
    h: usize,
    seed: u64,
    (a, m, top): (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let img = speckle(w, h, seed);
    let peak = img.iter().cloned().fold(1.0f32, f32::max);
    let values = img.iter().map(|v| v / peak).collect();
    let holes = (0..w * h)
        .map(|i| f32::from(u8::from((i % w + a * (i / w)) % m != 0 && i / w > h / top)))
        .collect();
    (values, holes)
}

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

#[test]
fn every_shader_has_a_twin_and_every_twin_a_shader() {
    let mut shaders: Vec<String> = std::fs::read_dir(root().join("shaders"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .to_string()
        })
        .filter(|s| s != "common")
        .collect();
    shaders.sort();
    let mut twins: Vec<String> = std::fs::read_dir(root().join("src/kernels"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .to_string()
        })
        .filter(|s| s != "mod")
        .collect();
    twins.sort();
    assert_eq!(shaders, twins);
    let mut listed: Vec<String> = kernels::KERNELS.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(shaders, listed);
}

/// The fields of `struct Params` in `source` (WGSL or Rust), in order, as (name, type):
/// `name: u32,` lines, with Rust's `pub` dropped.
fn params_fields(source: &str, opening: &str) -> Vec<(String, String)> {
    let start = source
        .find(opening)
        .unwrap_or_else(|| panic!("no `{opening}`"));
    let body = &source[start + opening.len()..];
    let body = &body[..body.find('}').unwrap()];
    body.lines()
        .map(|l| l.split("//").next().unwrap().trim().trim_end_matches(','))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, ty) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("field line {l:?}"));
            (
                name.trim().trim_start_matches("pub ").trim().to_string(),
                ty.trim().to_string(),
            )
        })
        .collect()
}

/// The fields with padding made comparable: a padding field (name `pad…`) is named `pad`
/// and an array `[T; N]` becomes N scalars, so that Rust's `pad1: [f32; 3]` equals WGSL's
/// `pad1: f32, pad2: f32, pad3: f32`. Real fields keep their names, order and types.
fn normalised(fields: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, ty) in fields {
        let name = if name.starts_with("pad") {
            "pad".to_string()
        } else {
            name
        };
        let array = ty
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.split_once(';'));
        match array {
            Some((t, n)) => {
                for _ in 0..n.trim().parse::<usize>().unwrap() {
                    out.push((name.clone(), t.trim().to_string()));
                }
            }
            None => out.push((name, ty)),
        }
    }
    out
}

/// The WGSL `struct Params` of a shader.
fn wgsl_params(stem: &str) -> Vec<(String, String)> {
    let src = std::fs::read_to_string(root().join(format!("shaders/{stem}.wgsl"))).unwrap();
    normalised(params_fields(&src, "struct Params {"))
}

/// The Rust `struct Params` of a kernel (its twin's module).
fn rust_params(stem: &str) -> Vec<(String, String)> {
    let src = std::fs::read_to_string(root().join(format!("src/kernels/{stem}.rs"))).unwrap();
    normalised(params_fields(&src, "pub struct Params {"))
}

/// Bytes of a list of fields (every field is a 4-byte u32 or f32).
fn fields_size(fields: &[(String, String)]) -> usize {
    for (name, ty) in fields {
        assert!(
            ty == "u32" || ty == "f32",
            "{name}: {ty} is not a 4-byte scalar"
        );
    }
    fields.len() * 4
}

#[test]
fn the_params_reader_sees_an_order_change() {
    // A swap of two fields must show, or the check below could not fail.
    let a = params_fields("struct Params {\n a: u32,\n b: f32,\n}", "struct Params {");
    let b = params_fields(
        "pub struct Params {\n pub b: f32,\n pub a: u32,\n}",
        "pub struct Params {",
    );
    assert_eq!(a.len(), 2);
    assert_ne!(a, b);
}

/// The Rust `Params` of kernel `stem` (of `size` bytes) matches its shader's field for field,
/// and is 16-byte padded.
fn check_params(stem: &str, size: usize) {
    let wgsl = wgsl_params(stem);
    assert_eq!(
        rust_params(stem),
        wgsl,
        "{stem}: fields, their order and types must agree"
    );
    assert_eq!(size, fields_size(&wgsl), "{stem}");
    assert_eq!(size % 16, 0, "{stem} params must be 16-byte padded");
}

#[test]
fn params_structs_match_their_shaders() {
    for (stem, size) in [
        ("median", std::mem::size_of::<median::Params>()),
        ("lee", std::mem::size_of::<lee::Params>()),
        ("frost", std::mem::size_of::<frost::Params>()),
        ("srad", std::mem::size_of::<srad::Params>()),
        ("obnlm", std::mem::size_of::<obnlm::Params>()),
    ] {
        check_params(stem, size);
    }
}

fn speckle(w: usize, h: usize, seed: u64) -> Array2<f32> {
    let mut p = PhantomParams::default();
    p.width = w.max(32);
    p.height = h.max(32);
    p.seed = seed;
    let ph = generate("k", &p).unwrap();
    ph.frames[0].slice(ndarray::s![..h, ..w]).mapv(|v| v as f32)
}

/// The fast OBNLM sums its Pearson terms in another order (rows then columns, offsets in
/// parallel); f32 rounding of ~25-term sums and of exp() leaves well under 0.01 grey levels.
const OBNLM_FAST_TOLERANCE: f32 = 0.01;

#[test]
fn fast_obnlm_agrees_with_its_twin() {
    for (w, h) in [(61, 47), (1, 30), (30, 1), (16, 16)] {
        let img = speckle(w, h, 3);
        let p = obnlm::Params::new(7, 3, 4.0).unwrap();
        let a = obnlm::cpu(&img, &p).unwrap();
        let b = obnlm::cpu_fast(&img, &p).unwrap();
        let worst = max_abs_diff(&a, &b);
        assert!(
            worst < OBNLM_FAST_TOLERANCE,
            "{w}x{h}: max abs diff {worst}"
        );
    }
}

/// Fully developed speckle, log-compressed onto the phantom's 60 dB scale: uncorrelated
/// exponential power around grey 128.
fn pure_speckle(w: usize, h: usize, seed: u64) -> Array2<f32> {
    let mut rng = sonoguide::sim::phantom::Rng::new(seed);
    Array2::from_shape_fn((h, w), |_| {
        let e = -(1.0 - rng.unit()).max(1e-12).ln();
        (128.0 + 10.0 * e.log10() * 255.0 / 60.0).clamp(0.0, 255.0) as f32
    })
}

#[test]
fn filters_reduce_speckle_on_the_cpu() {
    let img = pure_speckle(96, 80, 9);
    let sd = |a: &Array2<f32>| {
        let m = a.mean().unwrap();
        (a.iter().map(|v| (v - m).powi(2)).sum::<f32>() / a.len() as f32).sqrt()
    };
    let before = sd(&img.slice(ndarray::s![20..60, 20..80]).to_owned());
    for name in FILTER_NAMES {
        let f = Filter::default_for(name).unwrap();
        let out = f.cpu(&img).unwrap();
        assert_eq!(out.dim(), img.dim());
        assert!(out.iter().all(|v| v.is_finite()), "{name}");
        let after = sd(&out.slice(ndarray::s![20..60, 20..80]).to_owned());
        assert!(
            after < before * 0.9,
            "{name}: std {before:.1} -> {after:.1}"
        );
    }
}

#[test]
fn median_of_a_constant_is_the_constant_and_an_impulse_vanishes() {
    let mut img = Array2::<f32>::from_elem((9, 9), 50.0);
    img[[4, 4]] = 255.0;
    let out = median::cpu(&img, &median::Params::new(3).unwrap()).unwrap();
    assert!(out.iter().all(|v| *v == 50.0));
}

#[test]
fn bad_parameters_are_refused() {
    assert!(median::Params::new(4).is_err());
    assert!(lee::Params::new(8, 0.25).is_err());
    assert!(obnlm::Params::new(31, 7, 4.0).is_err());
    assert!(srad::Srad::new(2.0, 10).is_err());
    assert!(srad::Srad::new(0.5, 0).is_err());
    assert!(Filter::default_for("gaussian").is_err());
}

// ---- GPU parity -------------------------------------------------------------------------

fn gpu() -> Option<Despeckler> {
    match Despeckler::new(Backend::Gpu) {
        Ok(d) => Some(d),
        Err(e) => {
            common::missing_tool("GPU parity", &format!("a GPU adapter (lavapipe): {e}"));
            None
        }
    }
}

/// Tolerances (grey levels, 0–255 scale) between the GPU and the CPU twin.
/// Median only moves values: it must agree exactly.
const MEDIAN_TOLERANCE: f32 = 0.0;
/// Lee/Frost: window sums in the same order; exp() and division may differ by an ulp or two.
const LOCAL_STATS_TOLERANCE: f32 = 1e-3;
/// SRAD: the q0 reduction and 30 iterations of diffusion compound ulp-level differences.
const SRAD_TOLERANCE: f32 = 0.05;
/// OBNLM: exp() of 120 patch distances per pixel; GPU exp() is within a few ulp.
const OBNLM_TOLERANCE: f32 = 0.01;

#[test]
fn gpu_matches_cpu_twins() {
    let Some(d) = gpu() else { return };
    eprintln!("adapter: {}", d.device_name());
    let filters: Vec<(Filter, f32)> = vec![
        (
            Filter::Median(median::Params::new(3).unwrap()),
            MEDIAN_TOLERANCE,
        ),
        (
            Filter::Median(median::Params::new(5).unwrap()),
            MEDIAN_TOLERANCE,
        ),
        (
            Filter::Lee(lee::Params::new(7, 0.25).unwrap()),
            LOCAL_STATS_TOLERANCE,
        ),
        (
            Filter::Frost(frost::Params::new(5, 2.0).unwrap()),
            LOCAL_STATS_TOLERANCE,
        ),
        (
            Filter::Srad(srad::Srad::new(0.5, 30).unwrap()),
            SRAD_TOLERANCE,
        ),
        (
            Filter::Srad(srad::Srad::new(0.5, 5).unwrap().with_roi(4, 4, 20, 10)),
            SRAD_TOLERANCE,
        ),
        (
            Filter::Obnlm(obnlm::Params::new(11, 5, 4.0).unwrap()),
            OBNLM_TOLERANCE,
        ),
    ];
    for (w, h) in [(67, 53), (1, 37), (37, 1), (1, 1), (16, 16), (130, 17)] {
        let img = speckle(w, h, 5);
        for (f, tol) in &filters {
            // The twin is the specification: OBNLM's is the pixelwise one.
            let want = match f {
                Filter::Obnlm(p) => obnlm::cpu(&img, p).unwrap(),
                other => other.cpu(&img).unwrap(),
            };
            let got = d.run(&img, std::slice::from_ref(f)).unwrap();
            let diffs: Vec<f32> = want
                .iter()
                .zip(got.iter())
                .map(|(a, b)| (a - b).abs())
                .collect();
            let max = diffs.iter().cloned().fold(0.0f32, f32::max);
            let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
            eprintln!(
                "{:>6} {:?} {w}x{h}: max abs {max:.2e}, mean abs {mean:.2e}",
                f.name(),
                f.parameters()
            );
            assert!(
                max <= *tol,
                "{} {w}x{h}: max abs error {max} > {tol}",
                f.name()
            );
        }
    }
}

/// The production paths on both sides at the frame sizes scanners write (640x480, 1024x768):
/// the GPU's multi-tile SRAD reduction (1024x768 is 3,072 tiles of 16 x 16, far past the
/// 256 partial sums of one workgroup), the tiled OBNLM over many workgroups, and the CPU's
/// banded fast paths (tested against their twins at small sizes above) at full width.
#[test]
fn gpu_matches_cpu_at_production_sizes() {
    let Some(d) = gpu() else { return };
    eprintln!("adapter: {}", d.device_name());
    for (w, h) in [(640, 480), (1024, 768)] {
        let img = speckle(w, h, 31);
        let mut filters: Vec<(Filter, f32)> = vec![
            (
                Filter::Median(median::Params::new(5).unwrap()),
                MEDIAN_TOLERANCE,
            ),
            (
                Filter::Lee(lee::Params::new(7, 0.25).unwrap()),
                LOCAL_STATS_FAST_TOLERANCE,
            ),
            (
                Filter::Srad(srad::Srad::new(0.5, 15).unwrap()),
                SRAD_TOLERANCE,
            ),
        ];
        // OBNLM on lavapipe takes seconds per frame: once, at the smaller size.
        if w == 640 {
            filters.push((
                Filter::Obnlm(obnlm::Params::new(11, 5, 4.0).unwrap()),
                OBNLM_FAST_TOLERANCE,
            ));
        }
        for (f, tol) in &filters {
            let want = f.cpu(&img).unwrap();
            let got = d.run(&img, std::slice::from_ref(f)).unwrap();
            assert_eq!(got.dim(), want.dim());
            let max = max_abs_diff(&want, &got);
            eprintln!("{:>6} {w}x{h}: max abs {max:.2e}", f.name());
            assert!(
                max <= *tol,
                "{} {w}x{h}: max abs error {max} > {tol}",
                f.name()
            );
        }
    }
}

#[test]
fn gpu_chain_keeps_the_frame_on_the_gpu_and_reuses_buffers() {
    let Some(d) = gpu() else { return };
    let img = speckle(64, 48, 6);
    let chain = [
        Filter::Median(median::Params::new(3).unwrap()),
        Filter::Lee(lee::Params::new(5, 0.25).unwrap()),
    ];
    let want = chain
        .iter()
        .try_fold(img.clone(), |cur, f| f.cpu(&cur))
        .unwrap();
    let ctx = d.gpu_context().unwrap();
    let before = ctx.readbacks();
    let first = d.run(&img, &chain).unwrap();
    assert_eq!(
        ctx.readbacks() - before,
        1,
        "a chain of two filters reads the frame back once, at its end"
    );
    let (sizes, kernels) = (ctx.cached_sizes(), ctx.compiled_kernels());
    for _ in 0..3 {
        let before = ctx.readbacks();
        let again = d.run(&img, &chain).unwrap();
        assert_eq!(ctx.readbacks() - before, 1, "one read-back per frame");
        assert_eq!(again, first, "same input, same output");
    }
    assert_eq!(
        ctx.cached_sizes(),
        sizes,
        "no new buffers for a size already seen"
    );
    assert_eq!(
        ctx.compiled_kernels(),
        kernels,
        "no new pipelines after the first frame"
    );
    let worst = max_abs_diff(&want, &first);
    assert!(worst <= LOCAL_STATS_TOLERANCE, "chained result {worst}");
}

#[test]
fn gpu_grid_is_cut_on_the_gpu_and_handed_to_a_set_of_its_size() {
    let Some(d) = gpu() else { return };
    let ctx = d.gpu_context().unwrap();
    // Even and odd sizes: the last row and column of an odd image are left out.
    for (w, h) in [(64, 48), (131, 97), (640, 480)] {
        let img = speckle(w, h, 9);
        let want = kernels::grid::cpu(img.view());
        let mut chain = ctx.begin(&img).unwrap();
        chain.stage().unwrap();
        let (gw, gh) = kernels::grid::encode(&mut chain).unwrap();
        assert_eq!((gw, gh), (w / 2, h / 2));
        let mut grid = chain.hand_over(gw, gh).unwrap();
        // The grid's chain goes on, and both images come back after one wait.
        grid.keep_input().unwrap();
        grid.set_aside(0, false).unwrap();
        let before = ctx.readbacks();
        let (maps, staged) = grid.finish_outputs_staged(1).unwrap();
        assert_eq!(ctx.readbacks() - before, 1, "{w}x{h}: one read-back");
        // Same sums in the same order: exactly the CPU twin's values.
        assert_eq!(maps[0], want, "{w}x{h}: grid");
        assert_eq!(staged, img, "{w}x{h}: the staged full-size image");
    }
    // A hand-over to the chain's own size would wait on its own pool: refused.
    let mut chain = ctx.begin(&speckle(32, 32, 1)).unwrap();
    kernels::grid::encode(&mut chain).unwrap();
    assert!(chain.hand_over(32, 32).is_err());
}

/// A value within an ULP of a histogram bin's edge may land in the neighbouring bin on a GPU
/// whose division is not correctly rounded, moving the cumulative shares, and so the ranks, by
/// that pixel's share of the valid pixels; this many such pixels are allowed.
const RANK_EDGE_PIXELS: f32 = 2.0;

/// The GPU rank transform against its twin over a valid mask with holes (a corner left out,
/// a sparse lattice of invalid pixels, a NaN and an infinity among the valid ones), at a toy
/// size and the analysis grids of 640x480 and 1024x768 frames; a frame with nothing valid
/// maps to zeros.
#[test]
fn gpu_rank_transform_matches_its_twin() {
    let Some(d) = gpu() else { return };
    let ctx = d.gpu_context().unwrap();
    for (w, h) in [(64, 48), (320, 240), (512, 384)] {
        // Continuous values, as despeckled frames have (no two pixels share a grey level).
        let mut img = speckle(w, h, 31);
        for (i, v) in img.iter_mut().enumerate() {
            *v += (i as f32 * 0.618_034).fract() * 1e-3;
        }
        img[[h / 2, w / 2]] = f32::NAN;
        img[[h / 3, w / 3]] = f32::INFINITY;
        let valid = Array2::from_shape_fn((h, w), |(y, x)| {
            (x + 3 * y) % 11 != 0 && !(y < h / 4 && x < w / 5)
        });
        let want = kernels::rank::cpu(&img, &valid);
        let mask: Vec<f32> = valid.iter().map(|&v| f32::from(u8::from(v))).collect();
        let n = w * h;
        let planes: Vec<f32> = img.iter().chain(&mask).copied().collect();
        let mut chain = ctx.begin_planes(&planes, w, 2 * h).unwrap();
        kernels::rank::encode(&mut chain, h, planes_at(0, n, 0, 0)).unwrap();
        chain.copy_to_current(0, 0, n).unwrap();
        let got = first_plane(chain.finish().unwrap(), h);
        let counted = valid
            .iter()
            .zip(img.iter())
            .filter(|(ok, v)| **ok && v.is_finite())
            .count();
        let tolerance = RANK_EDGE_PIXELS / counted as f32 + 1e-6;
        let worst = max_abs_diff(&want, &got);
        assert!(worst <= tolerance, "{w}x{h}: {worst} > {tolerance}");
        assert!(
            got.iter().all(|v| (0.0..=1.0).contains(v)),
            "{w}x{h}: ranks in 0..1"
        );
        assert_eq!(got[[0, 0]], 0.0, "{w}x{h}: an invalid pixel");
        assert_eq!(got[[h / 2, w / 2]], 0.0, "{w}x{h}: NaN");
        // The brightest valid pixel has all but the pixels of its own bin below it.
        let top = got.iter().cloned().fold(0.0f32, f32::max);
        assert!(top > 0.99, "{w}x{h}: top rank {top}");
    }
    // Nothing valid: every rank 0.
    let (w, h) = (64, 48);
    let planes: Vec<f32> = speckle(w, h, 3)
        .iter()
        .copied()
        .chain(std::iter::repeat_n(0.0, w * h))
        .collect();
    let mut chain = ctx.begin_planes(&planes, w, 2 * h).unwrap();
    kernels::rank::encode(&mut chain, h, planes_at(0, w * h, 0, 0)).unwrap();
    chain.copy_to_current(0, 0, w * h).unwrap();
    assert!(first_plane(chain.finish().unwrap(), h)
        .iter()
        .all(|v| *v == 0.0));
    // Planes that do not fit the chain are refused.
    let mut chain = ctx.begin_planes(&planes, w, 2 * h).unwrap();
    assert!(kernels::rank::encode(&mut chain, h, planes_at(0, 2 * w * h, 0, 0)).is_err());
}

/// Where the pixel features' kernels read and write (value offsets).
fn planes_at(values: usize, valid: usize, scratch: usize, out: usize) -> kernels::Planes {
    kernels::Planes {
        values,
        valid,
        scratch,
        out,
    }
}

/// The first `h` rows of a chain's image of several planes.
fn first_plane(img: Array2<f32>, h: usize) -> Array2<f32> {
    img.slice(ndarray::s![..h, ..]).to_owned()
}

/// Box means: the GPU's running sums add and subtract in the twin's order, so only the last
/// division may differ, by an ULP or two of a mean in 0..1.
const BOX_MEAN_TOLERANCE: f32 = 1e-6;

/// The GPU window means against their twin, over a valid mask with holes, for windows from a
/// pixel to wider than the image, at a toy size and the analysis grids of 640x480 and
/// 1024x768 frames; an all-valid mask too (the twin's counts take a shortcut there).
#[test]
fn gpu_box_means_match_their_twin() {
    let Some(d) = gpu() else { return };
    let ctx = d.gpu_context().unwrap();
    for (w, h) in [(64, 48), (320, 240), (512, 384)] {
        let (values, holes) = unit_values_and_holes(w, h, 41, (3, 13, 6));
        for valid in [holes, vec![1.0; w * h]] {
            for (ry, rx) in [(0, 0), (2, 3), (12, 12), (40, 4), (h, w)] {
                let want = kernels::box_means::cpu(&values, &valid, h, w, ry, rx);
                let planes: Vec<f32> = values
                    .iter()
                    .zip(&valid)
                    .map(|(v, m)| v * m)
                    .chain(valid.iter().copied())
                    .collect();
                let mut chain = ctx.begin_planes(&planes, w, 2 * h).unwrap();
                let at = planes_at(0, w * h, 0, 0);
                kernels::box_means::encode(&mut chain, h, (ry, rx), at).unwrap();
                chain.copy_to_current(0, 0, w * h).unwrap();
                let got = chain.finish().unwrap();
                let worst = want
                    .iter()
                    .zip(got.iter())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    worst <= BOX_MEAN_TOLERANCE,
                    "{w}x{h} r=({ry},{rx}): {worst}"
                );
            }
        }
    }
    // A chain that does not hold two planes is refused.
    let mut chain = ctx.begin(&speckle(32, 31, 1)).unwrap();
    let at = planes_at(0, 16 * 32, 0, 0);
    assert!(kernels::box_means::encode(&mut chain, 16, (1, 1), at).is_err());
}

/// Column features: the prefix sums run in the twin's order and maxima are exact, so only a
/// division (an ULP or two of a mean in 0..1) or a fused multiply-add in the ridge may differ.
const COLUMN_TOLERANCE: f32 = 1e-6;

/// The GPU column features against their twin at the analysis grids of production frames
/// and at a tall grid of fine pixels (a 0.04 mm linear region analysed as it is, whose 8 mm
/// reach is 200 rows: a loop over every window there would exceed the 65 535 iterations
/// lavapipe allows a loop), over a valid mask with holes and with every pixel valid, for
/// reaches from one row to more than the image.
#[test]
fn gpu_column_features_match_their_twin() {
    use kernels::columns::{Reach, FEATURES};
    let Some(d) = gpu() else { return };
    let ctx = d.gpu_context().unwrap();
    for (w, h) in [(64, 48), (320, 240), (512, 384), (318, 470)] {
        let (values, holes) = unit_values_and_holes(w, h, 43, (5, 11, 5));
        for valid in [holes, vec![1.0; w * h]] {
            for reach in [
                Reach {
                    d05: 1,
                    d1: 1,
                    d3: 2,
                    d8: 2,
                },
                Reach {
                    d05: 3,
                    d1: 7,
                    d3: 20,
                    d8: 53,
                },
                Reach {
                    d05: 13,
                    d1: 25,
                    d3: 75,
                    d8: 200,
                },
                Reach {
                    d05: h,
                    d1: h + 1,
                    d3: 2 * h,
                    d8: 3 * h,
                },
            ] {
                let want = kernels::columns::cpu(&values, &valid, h, w, reach);
                let planes: Vec<f32> = values.iter().chain(valid.iter()).copied().collect();
                let mut chain = ctx.begin_planes(&planes, w, FEATURES * h).unwrap();
                let at = planes_at(0, w * h, 0, 0);
                kernels::columns::encode(&mut chain, h, reach, at).unwrap();
                chain.copy_to_current(0, 0, FEATURES * w * h).unwrap();
                let got = chain.finish().unwrap();
                let worst = want
                    .iter()
                    .zip(got.iter())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(worst <= COLUMN_TOLERANCE, "{w}x{h} {reach:?}: {worst}");
            }
        }
    }
    // A chain that does not hold the seven planes is refused.
    let mut chain = ctx.begin(&speckle(32, 31, 1)).unwrap();
    let reach = Reach {
        d05: 1,
        d1: 1,
        d3: 2,
        d8: 2,
    };
    assert!(kernels::columns::encode(&mut chain, 16, reach, planes_at(0, 512, 0, 0)).is_err());
}

/// Streams sharing one device: chains in flight at once each get a buffer set of their own
/// (two chains open together on one thread do not wait for each other), threads running the
/// same chain concurrently get the serial result, and the sets made stay within the bound.
#[test]
fn gpu_streams_overlap_with_their_own_buffers() {
    let Some(d) = gpu() else { return };
    let ctx = d.gpu_context().unwrap();
    let (w, h) = (72, 40);
    let chain = [Filter::Lee(lee::Params::new(5, 0.25).unwrap())];
    let frames: Vec<Array2<f32>> = (0..6).map(|s| speckle(w, h, 20 + s)).collect();
    let want: Vec<Array2<f32>> = frames.iter().map(|f| d.run(f, &chain).unwrap()).collect();
    // Two chains open at once on this thread: with one lock held from upload to read-back,
    // the second would wait forever.
    let a = ctx.begin(&frames[0]).unwrap();
    let b = ctx.begin(&frames[1]).unwrap();
    assert_eq!(ctx.buffer_sets(w, h), 2, "a set per chain in flight");
    assert_eq!(
        a.finish().unwrap(),
        frames[0],
        "an empty chain returns its upload"
    );
    assert_eq!(b.finish().unwrap(), frames[1]);
    // Streams: every thread runs every frame; each result equals the serial one.
    let streams = sonoguide::gpu::MAX_STREAMS + 2;
    std::thread::scope(|scope| {
        for t in 0..streams {
            let (d, frames, want, chain) = (&d, &frames, &want, &chain);
            scope.spawn(move || {
                for i in 0..frames.len() {
                    let k = (i + t) % frames.len();
                    let got = d.run(&frames[k], chain).unwrap();
                    assert_eq!(got, want[k], "stream {t}, frame {k}");
                }
            });
        }
    });
    let sets = ctx.buffer_sets(w, h);
    assert!(
        (2..=sonoguide::gpu::MAX_STREAMS).contains(&sets),
        "{sets} buffer sets for {streams} streams"
    );
}

/// GPU timing: with timing on, every pass of a chain is timed by the device's timestamps and
/// summed per shader file; with it off, nothing is recorded; neither changes the result or
/// adds a read-back of frame data.
#[test]
fn gpu_timestamps_time_every_pass_when_asked() {
    let Some(d) = gpu() else { return };
    let ctx = d.gpu_context().unwrap();
    if !ctx.timestamps_supported() {
        common::missing_tool("GPU timestamps", "an adapter with TIMESTAMP_QUERY");
        return;
    }
    let img = speckle(96, 64, 31);
    let chain = [
        Filter::Median(median::Params::new(3).unwrap()),
        Filter::Lee(lee::Params::new(5, 0.25).unwrap()),
    ];
    let want = d.run(&img, &chain).unwrap();
    ctx.take_gpu_times();
    assert!(
        ctx.set_timing(true),
        "timing turns on where timestamps exist"
    );
    let before = ctx.readbacks();
    let got = d.run(&img, &chain).unwrap();
    let after = ctx.readbacks();
    ctx.set_timing(false);
    assert_eq!(got, want, "timing does not change the result");
    assert_eq!(after - before, 1, "timestamps are not a frame read-back");
    let times = ctx.take_gpu_times();
    for kernel in ["median", "lee"] {
        let (ms, passes) = times.get(kernel).copied().unwrap_or_default();
        assert!(
            passes >= 1 && ms > 0.0,
            "{kernel}: {passes} passes, {ms} ms"
        );
    }
    d.run(&img, &chain).unwrap();
    assert!(
        ctx.take_gpu_times().is_empty(),
        "nothing timed with timing off"
    );
}

#[test]
fn fast_median_gives_exactly_the_twins_values() {
    // Widths around the vector path's limits: blocks of 8 plus margins of 1 or 2, an overlapping
    // last block, edge blocks that overlap each other.
    for (w, h) in [
        (67, 53),
        (1, 9),
        (9, 1),
        (12, 12),
        (300, 7),
        (5, 5),
        (8, 6),
        (10, 4),
        (11, 5),
        (13, 3),
        (16, 9),
        (17, 4),
        (1024, 3),
        (20, 97),
    ] {
        let img = pure_speckle(w, h, 17);
        for size in [3, 5] {
            let p = median::Params::new(size).unwrap();
            assert_eq!(
                median::cpu_fast(&img, &p).unwrap(),
                median::cpu(&img, &p).unwrap(),
                "{size}x{size} on {w}x{h}"
            );
        }
    }
}

/// The fast SRAD fuses the coefficient and update passes and sums q0 in f64 per band; over 30
/// iterations the f32 differences stay far below a grey level.
const SRAD_FAST_TOLERANCE: f32 = 0.05;

#[test]
fn fast_srad_agrees_with_its_twin() {
    for (w, h) in [(67, 53), (1, 40), (40, 1), (100, 70)] {
        let img = speckle(w, h, 8);
        for s in [
            srad::Srad::new(0.5, 30).unwrap(),
            srad::Srad::new(1.0, 10).unwrap().with_roi(2, 2, 20, 20),
        ] {
            let a = srad::cpu(&img, &s).unwrap();
            let b = srad::cpu_fast(&img, &s).unwrap();
            let worst = max_abs_diff(&a, &b);
            assert!(worst < SRAD_FAST_TOLERANCE, "{w}x{h}: max abs diff {worst}");
        }
    }
}

/// Lee and Frost fast paths compute the window variance as E[x²] − m² in f32 (the twin sums
/// squared deviations), and Frost's weights use a polynomial exp (relative error 2e-7).
const LOCAL_STATS_FAST_TOLERANCE: f32 = 0.05;

#[test]
fn fast_lee_and_frost_agree_with_their_twins() {
    for (w, h) in [(67, 53), (1, 30), (30, 1), (128, 96)] {
        let img = speckle(w, h, 12);
        let lp = lee::Params::new(7, 0.25).unwrap();
        let fp = frost::Params::new(7, 2.0).unwrap();
        for (name, a, b) in [
            (
                "lee",
                lee::cpu(&img, &lp).unwrap(),
                lee::cpu_fast(&img, &lp).unwrap(),
            ),
            (
                "frost",
                frost::cpu(&img, &fp).unwrap(),
                frost::cpu_fast(&img, &fp).unwrap(),
            ),
        ] {
            let worst = max_abs_diff(&a, &b);
            assert!(
                worst < LOCAL_STATS_FAST_TOLERANCE,
                "{name} {w}x{h}: max abs diff {worst}"
            );
        }
    }
}

// ---- feature kernels -------------------------------------------------------------------

use sonoguide::kernels::{coherence, context, phase_symmetry, pixel_mlp, shadow};

#[test]
fn feature_params_match_their_shaders() {
    for (stem, size) in [
        ("shadow", std::mem::size_of::<shadow::Params>()),
        ("coherence", std::mem::size_of::<coherence::Params>()),
        (
            "phase_symmetry",
            std::mem::size_of::<phase_symmetry::Params>(),
        ),
        ("pixel_mlp", std::mem::size_of::<pixel_mlp::Params>()),
        ("context", std::mem::size_of::<context::Params>()),
    ] {
        check_params(stem, size);
    }
}

/// The coherence fast path sums gradient products in another order (rows, then columns).
const COHERENCE_FAST_TOLERANCE: f32 = 1e-3;

#[test]
fn fast_coherence_and_phase_symmetry_plan_agree_with_their_twins() {
    for (w, h) in [(67, 53), (1, 30), (30, 1), (64, 64)] {
        let img = speckle(w, h, 21);
        let p = coherence::Params::new(3).unwrap();
        let (c1, o1) = coherence::cpu(&img, &p).unwrap();
        let (c2, o2) = coherence::cpu_fast(&img, &p).unwrap();
        let wc = max_abs_diff(&c1, &c2);
        assert!(wc < COHERENCE_FAST_TOLERANCE, "coherence {w}x{h}: {wc}");
        // Orientation is compared where the structure is clear (it is undefined in flat areas).
        for ((a, b), c) in o1.iter().zip(o2.iter()).zip(c1.iter()) {
            if *c > 0.2 {
                let d = (a - b).abs().min(std::f32::consts::PI - (a - b).abs());
                assert!(d < 1e-2, "orientation {w}x{h}: {a} vs {b}");
            }
        }
        let pp = phase_symmetry::Params::new(3, 4, 4.0).unwrap();
        let plan = phase_symmetry::Plan::new(&pp, w, h);
        assert_eq!(
            plan.run(&img).unwrap(),
            phase_symmetry::cpu(&img, &pp).unwrap(),
            "{w}x{h}"
        );
    }
}

#[test]
fn phase_symmetry_finds_a_bright_line_not_an_edge() {
    // A bright horizontal line at row 20 and a dark-to-bright step at row 44.
    let img = Array2::from_shape_fn((64, 64), |(y, _)| {
        let line = if (19..=21).contains(&y) { 150.0 } else { 0.0 };
        let step = if y >= 44 { 60.0 } else { 30.0 };
        30.0 + line + (step - 30.0)
    });
    let ps = phase_symmetry::cpu(&img, &phase_symmetry::Params::new(3, 4, 4.0).unwrap()).unwrap();
    let on_line = ps[[20, 32]];
    let on_step = ps[[44, 32]];
    assert!(on_line > 0.3, "line {on_line}");
    assert!(on_step < on_line / 3.0, "step {on_step} vs line {on_line}");
    assert!(ps.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn shadow_is_the_mean_beneath() {
    let img = Array2::from_shape_fn((10, 3), |(y, x)| (y * 10 + x) as f32);
    let out = shadow::cpu(&img, &shadow::Params::new(2, 3).unwrap()).unwrap();
    // Rows 2..5 below row 0 in column 1: 21, 31, 41.
    assert!((out[[0, 1]] - 31.0).abs() < 1e-4);
    // Near the bottom the window is clipped; past it there is nothing.
    assert!((out[[6, 0]] - 85.0).abs() < 1e-4);
    assert_eq!(out[[9, 2]], 0.0);
}

/// Shadow: the same additions in the same order on both sides.
const SHADOW_TOLERANCE: f32 = 1e-3;
/// Coherence: window sums in the same order; atan2 on the GPU within a few ulp.
const COHERENCE_TOLERANCE: f32 = 1e-3;
/// Phase symmetry: the GPU's radix-2 FFT (twiddles from f32 sin/cos) against rustfft, through
/// twelve inverse transforms and a threshold; differences stay near 1e-4 of a [0, 1] map.
const PHASE_SYMMETRY_TOLERANCE: f32 = 5e-3;

#[test]
fn gpu_feature_kernels_match_cpu_twins() {
    let Some(d) = gpu() else { return };
    let ctx = d.gpu_context().unwrap();
    for (w, h) in [(67, 53), (1, 37), (37, 1), (64, 64), (130, 17)] {
        let img = speckle(w, h, 25);
        let report = |name: &str, a: &Array2<f32>, b: &Array2<f32>, tol: f32| {
            let diffs: Vec<f32> = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).collect();
            let max = diffs.iter().cloned().fold(0.0f32, f32::max);
            let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
            eprintln!("{name:>15} {w}x{h}: max abs {max:.2e}, mean abs {mean:.2e}");
            assert!(max <= tol, "{name} {w}x{h}: {max} > {tol}");
        };
        let sp = shadow::Params::new(3, 9).unwrap();
        let mut chain = ctx.begin(&img).unwrap();
        shadow::encode(&mut chain, &sp).unwrap();
        report(
            "shadow",
            &chain.finish().unwrap(),
            &shadow::cpu(&img, &sp).unwrap(),
            SHADOW_TOLERANCE,
        );

        let cp = coherence::Params::new(2).unwrap();
        let mut chain = ctx.begin(&img).unwrap();
        coherence::encode(&mut chain, &cp).unwrap();
        let (c, o) = chain.finish_with_aux().unwrap();
        let (c_cpu, o_cpu) = coherence::cpu(&img, &cp).unwrap();
        report("coherence", &c, &c_cpu, COHERENCE_TOLERANCE);
        let o_masked = Array2::from_shape_fn(o.dim(), |i| if c_cpu[i] > 0.2 { o[i] } else { 0.0 });
        let o_cpu_masked =
            Array2::from_shape_fn(o.dim(), |i| if c_cpu[i] > 0.2 { o_cpu[i] } else { 0.0 });
        report(
            "orientation",
            &o_masked,
            &o_cpu_masked,
            COHERENCE_TOLERANCE * 10.0,
        );

        let pp = phase_symmetry::Params::new(3, 4, 4.0).unwrap();
        let mut chain = ctx.begin(&img).unwrap();
        phase_symmetry::encode(&mut chain, &pp).unwrap();
        report(
            "phase_symmetry",
            &chain.finish().unwrap(),
            &phase_symmetry::cpu(&img, &pp).unwrap(),
            PHASE_SYMMETRY_TOLERANCE,
        );
    }
}

/// The log-Gabor bank is evaluated on the GPU once per padded size and set of filters, kept
/// with the FFT buffers, and evaluated again only when the filters change; a chain that
/// queued a fill but was never submitted leaves the bank marked empty.
#[test]
fn gpu_phase_symmetry_keeps_its_filter_bank_until_the_filters_change() {
    let Some(d) = gpu() else { return };
    let ctx = d.gpu_context().unwrap();
    let img = speckle(96, 80, 52);
    let a = phase_symmetry::Params::new(3, 3, 3.75).unwrap();
    let b = phase_symmetry::Params::new(2, 4, 5.0).unwrap();
    {
        let mut dropped = ctx.begin(&img).unwrap();
        phase_symmetry::encode(&mut dropped, &a).unwrap();
    }
    let mut queued = Vec::new();
    for (name, p) in [("a", &a), ("a again", &a), ("b", &b), ("a after b", &a)] {
        let mut chain = ctx.begin(&img).unwrap();
        phase_symmetry::encode(&mut chain, p).unwrap();
        queued.push(chain.dispatches());
        let max = max_abs_diff(
            &chain.finish().unwrap(),
            &phase_symmetry::cpu(&img, p).unwrap(),
        );
        assert!(max <= PHASE_SYMMETRY_TOLERANCE, "{name}: {max}");
    }
    // One bank fill per filter: 3 scales x 3 orientations.
    assert_eq!(queued[0], queued[1] + 9, "the second frame reuses the bank");
    assert_eq!(
        queued[3],
        queued[1] + 9,
        "the bank is filled again after b's"
    );
}

/// The feature kernels at a production size: 1024 columns make the GPU's phase-symmetry FFT
/// 1024 points long (the largest it runs on a full-width analysis of a 1024x768 frame).
#[test]
fn gpu_feature_kernels_match_at_production_size() {
    let Some(d) = gpu() else { return };
    let ctx = d.gpu_context().unwrap();
    let img = speckle(1024, 768, 33);
    let pp = phase_symmetry::Params::new(3, 3, 3.75).unwrap();
    let mut chain = ctx.begin(&img).unwrap();
    phase_symmetry::encode(&mut chain, &pp).unwrap();
    let got = chain.finish().unwrap();
    let max = max_abs_diff(&got, &phase_symmetry::cpu(&img, &pp).unwrap());
    eprintln!("phase_symmetry 1024x768: max abs {max:.2e}");
    assert!(max <= PHASE_SYMMETRY_TOLERANCE, "phase symmetry: {max}");

    let cp = coherence::Params::new(4).unwrap();
    let mut chain = ctx.begin(&img).unwrap();
    coherence::encode(&mut chain, &cp).unwrap();
    let (c, _) = chain.finish_with_aux().unwrap();
    let max = max_abs_diff(&c, &coherence::cpu(&img, &cp).unwrap().0);
    eprintln!("coherence 1024x768: max abs {max:.2e}");
    assert!(max <= COHERENCE_TOLERANCE, "coherence: {max}");
}

/// The segmenter's three feature chains in one chain: the frame uploaded once, each chain
/// restarting from it on the GPU, the four maps read back together. The maps must be those of
/// three separate chains (same kernels on the same input: exactly equal), with one read-back.
#[test]
fn gpu_feature_chains_share_one_upload_and_one_read_back() {
    let Some(d) = gpu() else { return };
    let ctx = d.gpu_context().unwrap();
    let img = speckle(320, 240, 41);
    let pp = phase_symmetry::Params::new(3, 3, 3.75).unwrap();
    let sp = shadow::Params::new(8, 20).unwrap();
    let cp = coherence::Params::new(4).unwrap();
    let separate = {
        let mut chain = ctx.begin(&img).unwrap();
        phase_symmetry::encode(&mut chain, &pp).unwrap();
        let ps = chain.finish().unwrap();
        let mut chain = ctx.begin(&img).unwrap();
        shadow::encode(&mut chain, &sp).unwrap();
        let below = chain.finish().unwrap();
        let mut chain = ctx.begin(&img).unwrap();
        coherence::encode(&mut chain, &cp).unwrap();
        let (c, o) = chain.finish_with_aux().unwrap();
        [ps, below, c, o]
    };
    let before = ctx.readbacks();
    let mut chain = ctx.begin(&img).unwrap();
    chain.keep_input().unwrap();
    phase_symmetry::encode(&mut chain, &pp).unwrap();
    chain.set_aside(0, false).unwrap();
    chain.restart().unwrap();
    shadow::encode(&mut chain, &sp).unwrap();
    chain.set_aside(1, false).unwrap();
    chain.restart().unwrap();
    coherence::encode(&mut chain, &cp).unwrap();
    chain.set_aside(2, true).unwrap();
    let together = chain.finish_outputs(4).unwrap();
    assert_eq!(ctx.readbacks() - before, 1, "four maps, one read-back");
    for (name, (a, b)) in ["phase symmetry", "shadow", "coherence", "orientation"]
        .iter()
        .zip(together.iter().zip(&separate))
    {
        assert_eq!(a, b, "{name}: one chain and separate chains differ");
    }
    // Misuse is an error, not a panic.
    let mut chain = ctx.begin(&img).unwrap();
    assert!(chain.restart().is_err(), "restart without keep_input");
    chain.keep_input().unwrap();
    assert!(chain.set_aside(3, true).is_err(), "past the last output");
}
