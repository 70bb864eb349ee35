//! The pixel classifier: the shipped model fits this build, its features do not move with gain
//! or dynamic range, the GPU shader agrees with the CPU twin (on lavapipe in CI), and training
//! is deterministic and learns.

mod common;

use sonoguide::segment::pixels::{self, CLASSES, FEATURES};
use sonoguide::segment::{features_cpu, Features, SegmentParams};
use sonoguide::sim::phantom::{frame_of, generate, write_case, PhantomParams};
use sonoguide::sim::train::{self, TrainOptions};
use sonoguide::{Backend, Pipeline, PipelineConfig};

/// Features of phantom `seed` (the raw frame as the despeckled input, so that a grey-level
/// map applied to it reaches the features unchanged by filtering).
fn features_of(seed: u64, map: impl Fn(f32) -> f32) -> Features {
    let mut params = PhantomParams::default();
    params.seed = seed;
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
    assert_eq!(cpu.len(), gpu.len());
    let worst = cpu
        .iter()
        .zip(&gpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("adapter {}: largest difference {worst}", ctx.adapter_name());
    assert!(worst <= GPU_PROBABILITY_TOLERANCE, "GPU differs by {worst}");
}

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
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(samples.frames, 4);
    let (m1, r1) = train::train(&samples, &opt);
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
