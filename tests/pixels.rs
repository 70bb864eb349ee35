//! The pixel classifier: the shipped models (both stages) fit this build, its features do not
//! move with gain or dynamic range, the second stage reads its context where it should, the
//! GPU shader agrees with the CPU twin (on lavapipe in CI), and training is deterministic and
//! learns.

mod common;

use sonoguide::label::Label;
use sonoguide::segment::context;
use sonoguide::segment::pixels::{self, CLASSES, FEATURES};
use sonoguide::segment::{features_cpu, Features, SegmentParams};
use sonoguide::sim::phantom::{frame_of, generate, write_case, PhantomParams};
use sonoguide::sim::train::{self, TrainOptions};
use sonoguide::{Backend, Pipeline, PipelineConfig};

/// Features of phantom `seed` (the raw frame as the despeckled input, so that a grey-level
/// map applied to it reaches the features unchanged by filtering).
fn features_of(seed: u64, map: impl Fn(f32) -> f32) -> Features {
    features_with(seed, None, map)
}

/// Features of phantom `seed` at `size` (width, height; the phantom's default without).
fn features_sized(seed: u64, size: Option<(usize, usize)>) -> Features {
    features_with(seed, size, |v| v)
}

fn features_with(seed: u64, size: Option<(usize, usize)>, map: impl Fn(f32) -> f32) -> Features {
    let mut params = PhantomParams::default();
    params.seed = seed;
    if let Some((w, h)) = size {
        params.width = w;
        params.height = h;
    }
    let ph = generate("pixels", &params).expect("phantom");
    let mut frame = frame_of(&ph, 0).expect("frame");
    frame.intensity.mapv_inplace(&map);
    let despeckled = frame.intensity.clone();
    let mut p = SegmentParams::default();
    p.learned = false;
    features_cpu(&frame, &despeckled, &p).expect("features")
}

#[test]
fn builtin_model_loads_and_fits_the_features() {
    let m = pixels::builtin_model().expect("shipped model");
    assert_eq!(m.features.len(), FEATURES);
    assert_eq!(m.inputs(), FEATURES);
    assert_eq!(m.layers.last().map(|l| l.outputs), Some(CLASSES));
    let f = features_of(3, |v| v);
    let x = pixels::pixel_features(&f);
    assert_eq!(x.len(), FEATURES * f.intensity.len());
    assert!(x.iter().all(|v| v.is_finite()));
    let p = pixels::pixel_mlp::cpu(m, &x, &f.valid);
    let n = f.intensity.len();
    for i in (0..n).step_by(97) {
        let sum: f32 = (0..CLASSES).map(|k| p[k * n + i]).sum();
        assert!(
            (sum - 1.0).abs() < 1e-4,
            "probabilities of pixel {i} sum to {sum}"
        );
    }
}

#[test]
fn builtin_second_stage_loads_and_gives_probabilities() {
    let m = context::builtin_model().expect("shipped second stage");
    assert_eq!(m.inputs(), context::INPUTS);
    assert_eq!(m.features, context::input_names());
    let f = features_of(4, |v| v);
    let (p, first) = context::classify(&f, |m, x| Ok(pixels::pixel_mlp::cpu(m, x, &f.valid)))
        .expect("both stages");
    assert_eq!(first.len(), p.len());
    let n = f.intensity.len();
    assert_eq!(p.len(), CLASSES * n);
    for i in (0..n).step_by(89) {
        let sum: f32 = (0..CLASSES).map(|k| p[k * n + i]).sum();
        assert!(
            (sum - 1.0).abs() < 1e-4,
            "probabilities of pixel {i} sum to {sum}"
        );
    }
}

/// Index of a context input by name.
fn input(name: &str) -> usize {
    context::input_names()
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("no input {name}"))
}

#[test]
fn second_stage_reads_the_surroundings_at_their_offsets() {
    // A vessel disc of 1 mm radius in background: at its centre nothing is vessel 4 mm to
    // either side; 4 mm beneath it, the vessel is "above"; 4 mm to its right, it is on one
    // side only.
    let f = features_of(6, |v| v);
    let (h, w) = f.intensity.dim();
    let n = h * w;
    let (mmx, mmy) = f.mm_per_px;
    let (oy, ox) = ((4.0 / mmy).round() as usize, (4.0 / mmx).round() as usize);
    // A centre whose reads (4 mm beneath, 4 mm to either side) all fall on valid pixels.
    let (cy, cx) = (h / 4..h.saturating_sub(oy + 1))
        .flat_map(|y| (ox..w.saturating_sub(ox + 1)).map(move |x| (y, x)))
        .find(|&(y, x)| {
            f.valid[[y, x]] && f.valid[[y + oy, x]] && f.valid[[y, x + ox]] && f.valid[[y, x - ox]]
        })
        .expect("a valid centre");
    let mut probs = vec![0f32; CLASSES * n];
    let vessel = Label::Vessel.code() as usize;
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = ((x as f64 - cx as f64) * mmx, (y as f64 - cy as f64) * mmy);
            let k = if dx.hypot(dy) <= 1.0 { vessel } else { 0 };
            probs[k * n + y * w + x] = 1.0;
        }
    }
    let base = pixels::pixel_features(&f);
    let ctx = context::context_features(&f, base.clone(), &probs);
    assert_eq!(ctx.len(), context::INPUTS * n);
    let at = |name: &str, y: usize, x: usize| ctx[input(name) * n + y * w + x];
    // A 1 mm disc fills π/9 ≈ 0.35 of a 3 mm square window; the window's half-width in
    // pixels is rounded, hence the looser bound.
    const DISC_SHARE: f32 = 0.2;
    assert_eq!(at("p_vessel", cy, cx), 1.0);
    assert!(at("p_mean_1.5mm_vessel", cy, cx) > DISC_SHARE);
    assert!(at("p_side_max_4mm_vessel", cy, cx) < 0.05);
    assert!(at("p_above_4mm_vessel", cy + oy, cx) > DISC_SHARE);
    assert!(at("p_below_4mm_vessel", cy + oy, cx) < 0.05);
    assert!(at("p_side_max_4mm_vessel", cy, cx + ox) > DISC_SHARE);
    assert!(at("p_side_min_4mm_vessel", cy, cx + ox) < 0.05);
    // The first stage's own features come first, unchanged.
    assert_eq!(&ctx[..FEATURES * n], &base[..]);
}

/// Largest change of a rank feature under an affine grey-level map: the rank transform's bins
/// follow the map exactly, so only float rounding remains.
const RANK_FEATURE_TOLERANCE: f32 = 1e-3;

#[test]
fn rank_features_ignore_gain_and_dynamic_range() {
    // Gain (an offset in the log-compressed image) and dynamic range (a scale about white).
    let a = features_of(5, |v| v);
    let b = features_of(5, |v| 0.7 * v + 40.0);
    let (xa, xb) = (pixels::pixel_features(&a), pixels::pixel_features(&b));
    let n = a.intensity.len();
    // Rank-based features: the rank, its box means, spread, column statistics, the shadow
    // kernel's rank and the valid share.
    for k in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19, 20, 21] {
        let worst = (0..n)
            .map(|i| (xa[k * n + i] - xb[k * n + i]).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= RANK_FEATURE_TOLERANCE,
            "feature {} moved by {worst} under a grey-level map",
            pixels::FEATURE_NAMES[k]
        );
    }
}

/// GPU against CPU: the same operations in the same order but exp() and fused multiply-adds,
/// a few ulp per layer.
const GPU_PROBABILITY_TOLERANCE: f32 = 1e-4;

/// The largest absolute difference between two probability vectors of the same length.
fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn gpu_classifier_matches_cpu_twin() {
    let ctx = match sonoguide::gpu::GpuContext::new(Backend::Gpu) {
        Ok(c) => c,
        Err(e) => {
            common::missing_tool(
                "pixel classifier GPU parity",
                &format!("a GPU adapter: {e}"),
            );
            return;
        }
    };
    let f = features_of(11, |v| v);
    let x = pixels::pixel_features(&f);
    let m = pixels::builtin_model().expect("shipped model");
    let cpu = pixels::pixel_mlp::cpu(m, &x, &f.valid);
    let gpu = pixels::pixel_mlp::gpu(&ctx, m, &x, &f.valid).expect("GPU classifier");
    let worst = largest_difference(&cpu, &gpu);
    eprintln!("adapter {}: largest difference {worst}", ctx.adapter_name());
    assert!(worst <= GPU_PROBABILITY_TOLERANCE, "GPU differs by {worst}");
    // A model of another shape: the shader takes every width from its parameters.
    let mut other = m.clone();
    let mut seed = 7u64;
    let mut weight = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.8
    };
    other.layers = [(FEATURES, 12), (12, 9), (9, CLASSES)]
        .into_iter()
        .map(|(inputs, outputs)| pixels::pixel_mlp::Dense {
            inputs,
            outputs,
            w: (0..inputs * outputs).map(|_| weight()).collect(),
            b: (0..outputs).map(|_| weight()).collect(),
        })
        .collect();
    let cpu = pixels::pixel_mlp::cpu(&other, &x, &f.valid);
    let gpu = pixels::pixel_mlp::gpu(&ctx, &other, &x, &f.valid).expect("generic GPU entry");
    let worst = largest_difference(&cpu, &gpu);
    eprintln!("another shape: largest difference {worst}");
    assert!(
        worst <= GPU_PROBABILITY_TOLERANCE,
        "generic entry differs by {worst}"
    );
    // Both stages: the first stage's differences reach the second through its context.
    let (cpu, _) = context::classify(&f, |m, x| Ok(pixels::pixel_mlp::cpu(m, x, &f.valid)))
        .expect("both stages on the CPU");
    let (gpu, _) = context::classify(&f, |m, x| pixels::pixel_mlp::gpu(&ctx, m, x, &f.valid))
        .expect("both stages on the GPU");
    let worst = largest_difference(&cpu, &gpu);
    eprintln!("two stages: largest difference {worst}");
    assert!(
        worst <= SECOND_STAGE_TOLERANCE,
        "GPU differs by {worst} after two stages"
    );
}

/// The two stages and the context in one GPU chain: both stages' probabilities agree with the
/// CPU's, at the test phantom's size and at the analysis grid of a 640x480 and a 1024x768
/// frame, and the chain reads back once.
#[test]
fn gpu_classifier_chain_matches_cpu_and_reads_back_once() {
    let ctx = match sonoguide::gpu::GpuContext::new(Backend::Gpu) {
        Ok(c) => c,
        Err(e) => {
            common::missing_tool(
                "chained pixel classifier GPU parity",
                &format!("a GPU adapter: {e}"),
            );
            return;
        }
    };
    for (seed, size) in [(11, None), (12, Some((640, 480))), (13, Some((1024, 768)))] {
        let f = features_sized(seed, size);
        let (cpu2, cpu1) = context::classify(&f, |m, x| Ok(pixels::pixel_mlp::cpu(m, x, &f.valid)))
            .expect("both stages on the CPU");
        let before = ctx.readbacks();
        let (gpu2, gpu1) = context::classify_gpu(&ctx, &f).expect("chained GPU classifier");
        assert_eq!(ctx.readbacks() - before, 1, "one read-back for both stages");
        let (first, second) = (
            largest_difference(&cpu1, &gpu1),
            largest_difference(&cpu2, &gpu2),
        );
        eprintln!(
            "{:?} grid {:?}: first stage {first}, second stage {second}",
            size,
            f.intensity.dim()
        );
        assert!(
            first <= GPU_PROBABILITY_TOLERANCE,
            "first stage differs by {first}"
        );
        assert!(
            second <= SECOND_STAGE_TOLERANCE,
            "second stage differs by {second}"
        );
    }
}

/// GPU against CPU after both stages: the first stage's differences (at most
/// [`GPU_PROBABILITY_TOLERANCE`]) are averaged into the context and pass through a second
/// network whose standardisation scales them up by at most a few tens.
const SECOND_STAGE_TOLERANCE: f32 = 2e-3;

/// Cross-entropy a trained model must reach on its training samples (two thirds of chance).
const TRAINED_LOSS: f64 = 1.3;

#[test]
fn training_is_deterministic_and_learns() {
    let dir = std::env::temp_dir().join(format!("sonoguide-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    for seed in 1..=4u64 {
        let mut params = PhantomParams::default();
        params.seed = seed;
        params.width = 160;
        params.height = 120;
        write_case(&dir, &format!("case_{seed}"), &params).expect("case written");
    }
    let pipeline = Pipeline::new(PipelineConfig::default()).expect("pipeline");
    let mut opt = TrainOptions::default();
    opt.epochs = 6;
    opt.hidden = vec![8];
    opt.holdout_every = 4;
    let samples = train::collect(&pipeline, std::slice::from_ref(&dir), &opt).expect("samples");
    assert_eq!(samples.frames, 4);
    assert_eq!(samples.dim, FEATURES);
    let (m1, r1) = train::train(&samples, &opt);
    // The second stage over the first's probabilities, on the same cases.
    let mut opt2 = opt.clone();
    opt2.first_stage = Some(m1.clone());
    let second = train::collect(&pipeline, std::slice::from_ref(&dir), &opt2);
    let _ = std::fs::remove_dir_all(&dir);
    let second = second.expect("second-stage samples");
    assert_eq!(second.dim, context::INPUTS);
    let (m2nd, r2nd) = train::train(&second, &opt2);
    m2nd.check(&context::input_names(), &pixels::class_names())
        .expect("trained second stage is well-formed");
    let last2 = *r2nd.train_loss.last().expect("losses");
    assert!(last2 < TRAINED_LOSS, "second-stage training loss {last2}");
    let (m2, _) = train::train(&samples, &opt);
    assert_eq!(
        serde_json::to_string(&m1).unwrap(),
        serde_json::to_string(&m2).unwrap(),
        "same samples and seed, different weights"
    );
    m1.check(&pixels::FEATURE_NAMES, &pixels::class_names())
        .expect("trained model is well-formed");

    // Chance for 7 classes is ln 7 = 1.95 and the label frequencies alone give about 1.6; a
    // model that learned from the features must do clearly better.
    let last = *r1.train_loss.last().expect("losses");
    eprintln!("training loss {last}");
    assert!(
        last < TRAINED_LOSS,
        "training loss {last} after {} epochs",
        opt.epochs
    );
}

/// The GPU's pixel features against the CPU's: the rank may put a value at a bin's edge in
/// the next bin (a GPU's division is not always correctly rounded), moving that pixel's rank
/// by a bin's share and the window means around it by a fraction of that; the window sums
/// and prefix sums run in the twins' order, so the rest is rounding.
const GPU_FEATURE_TOLERANCE: f32 = 2e-3;

/// The 22 pixel features put together on the GPU (`segment::pixels::encode_features`) agree
/// with the CPU's at the test phantom's size and at the analysis grids of a 640x480 and a
/// 1024x768 frame, a convex one (invalid pixels outside its fan) among them.
#[test]
fn gpu_pixel_features_match_the_cpu() {
    let ctx = match sonoguide::gpu::GpuContext::new(Backend::Gpu) {
        Ok(c) => c,
        Err(e) => {
            common::missing_tool("GPU pixel features parity", &format!("a GPU adapter: {e}"));
            return;
        }
    };
    let curved = {
        let mut params = PhantomParams::default();
        params.seed = 24;
        params.width = 640;
        params.height = 480;
        params.geometry = sonoguide::sim::phantom::Geometry::Curved;
        let ph = generate("pixels", &params).expect("phantom");
        let frame = frame_of(&ph, 0).expect("frame");
        let mut p = SegmentParams::default();
        p.learned = false;
        features_cpu(&frame, &frame.intensity, &p).expect("features")
    };
    assert!(curved.valid.iter().any(|v| !v), "the fan leaves pixels out");
    // A pulse-echo case read as a user's file: a narrow linear region of 0.04 mm pixels,
    // analysed as it is (reaches of up to 200 rows).
    let pulse_echo = {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/pusim/tune/pusim_tune_008.dcm");
        let file = sonoguide::dicom::DicomFile::open(&path, &Default::default()).unwrap();
        let frame = file.read_frame(0).unwrap();
        let mut p = SegmentParams::default();
        p.learned = false;
        features_cpu(&frame, &frame.intensity, &p).expect("features")
    };
    let cases = [(21, None), (22, Some((640, 480))), (23, Some((1024, 768)))]
        .map(|(seed, size)| (size, features_sized(seed, size)));
    let others = [(Some((640, 480)), curved), (None, pulse_echo)];
    for (size, f) in cases.into_iter().chain(others) {
        let want = pixels::pixel_features(&f);
        let (h, w) = f.intensity.dim();
        let n = h * w;
        let mut up = vec![0f32; pixels::GPU_FEATURE_PLANES * n];
        let maps = [
            &f.intensity,
            &f.phase_symmetry,
            &f.below,
            &f.coherence,
            &f.orientation,
        ];
        for (&plane, map) in pixels::GPU_MAPS.iter().zip(maps) {
            for (o, v) in up[plane * n..(plane + 1) * n].iter_mut().zip(map.iter()) {
                *o = *v;
            }
        }
        for (o, v) in up[pixels::GPU_VALID * n..].iter_mut().zip(f.valid.iter()) {
            *o = f32::from(u8::from(*v));
        }
        up[pixels::GPU_ONES * n..(pixels::GPU_ONES + 1) * n].fill(1.0);
        let mut chain = ctx
            .begin_planes(&up, w, pixels::GPU_FEATURE_PLANES * h)
            .unwrap();
        pixels::encode_features(&mut chain, h, f.mm_per_px, 0).expect("features on the GPU");
        let got = chain.finish_range(0, FEATURES * n).unwrap();
        eprintln!(
            "{size:?} grid {:?}: largest difference {}",
            f.intensity.dim(),
            largest_difference(&want, &got)
        );
        for k in 0..FEATURES {
            let d = largest_difference(&want[k * n..(k + 1) * n], &got[k * n..(k + 1) * n]);
            assert!(
                d <= GPU_FEATURE_TOLERANCE,
                "{size:?}: feature {} differs by {d}",
                pixels::FEATURE_NAMES[k]
            );
        }
    }
}
