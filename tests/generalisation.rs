//! Segmentation and planning on images the segmenter was not tuned on, read through the DICOM
//! reader as a user's files would be: the pulse-echo test set (`tests/data/pusim/test`, made by
//! `tools/pusim`, never used for tuning) and own phantoms from the test seed range written to
//! disk first. The safety properties are absolute; the Dice figures are regression guards at
//! the level measured when they were set (the README's table has the figures and the issue's
//! targets, which are not all met yet).

use std::path::Path;

use sonoguide::sim::evalset::{score_dir, SetScore};
use sonoguide::sim::phantom::{write_case, Geometry, PhantomParams};
use sonoguide::{Backend, Pipeline, PipelineConfig};

/// Index of each label in `SetScore::dice`.
const TENDON: usize = 0;
const BONE: usize = 1;
const SHADOW: usize = 2;

/// Regression guards: the mean Dice measured on the pulse-echo test set (pixel classifier:
/// tendon 0.84, bone 0.82, shadow 0.92 since the reader stopped taking black shadows for the
/// image's edge, twelfth session), less 0.05 for the spread between CPU builds
/// (floating-point order in the kernels' parallel sums can move a decision by a pixel). The
/// issue's floors (0.80 / 0.80 / 0.85) are in the README's table.
const PUSIM_TENDON_FLOOR: f64 = 0.79;
const PUSIM_BONE_FLOOR: f64 = 0.77;
const PUSIM_SHADOW_FLOOR: f64 = 0.87;
/// Own phantoms from the test seeds (the realistic phantom: layered tissue, filled shadows,
/// random gain and dynamic range): guards 0.05 under the measured means (tendon 0.94, bone
/// 0.96, shadow 1.00 since the twelfth session; 0.91, 0.74 and 0.85 before it, when joint
/// scenes with black shadows were read as unfitted fans and the phantom's bone echo peaked a
/// pixel under its labelled surface).
const PHANTOM_TENDON_FLOOR: f64 = 0.89;
const PHANTOM_BONE_FLOOR: f64 = 0.91;
const PHANTOM_SHADOW_FLOOR: f64 = 0.95;
/// Paths crossing a truth structure on the pulse-echo test set: none (the set was never used
/// to tune; the first version had one, pusim_test_011).
const PUSIM_MAX_UNSAFE_PATHS: usize = 0;
/// Convex entries must lie on the skin arc within the 0.5 mm: the near arc is the
/// declared transducer face (the region's reference pixel) when it agrees with the image,
/// and entries are pixels (0.2 mm on the convex sets), so half a pixel's rounding remains.
const ARC_TOLERANCE_MM: f64 = 0.5;

fn pipeline() -> Pipeline {
    let mut config = PipelineConfig::default();
    config.backend = Backend::Cpu;
    Pipeline::new(config).expect("pipeline")
}

/// The safety properties every set must have (`max_unsafe`: see `PUSIM_MAX_UNSAFE_PATHS`).
fn assert_safe(s: &SetScore, max_unsafe: usize) {
    assert!(
        s.unsafe_paths <= max_unsafe,
        "{}: paths crossing a truth structure: {:?}",
        s.set,
        s.cases
            .iter()
            .filter(|c| !c.crossed.is_empty())
            .map(|c| (&c.name, &c.crossed))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        s.false_bone_frames, 0,
        "{}: bone labelled in a bone-free frame",
        s.set
    );
    assert!(
        s.entry_arc_error_max_mm.is_nan() || s.entry_arc_error_max_mm <= ARC_TOLERANCE_MM,
        "{}: a convex entry lies {} mm off the skin arc",
        s.set,
        s.entry_arc_error_max_mm
    );
    // A frame with no path says why.
    for c in &s.cases {
        if c.status != "ok" {
            assert!(
                c.reason.as_deref().is_some_and(|r| !r.is_empty()),
                "{} {}: no path and no reason",
                s.set,
                c.name
            );
        }
    }
}

#[test]
fn pulse_echo_test_set_holds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pusim/test");
    let sets = score_dir(&pipeline(), &dir).expect("scored");
    assert_eq!(sets.len(), 1);
    let s = &sets[0];
    assert!(s.frames >= 30, "the test set has {} frames", s.frames);
    eprintln!("pulse-echo test Dice {:?}", s.dice);
    assert_safe(s, PUSIM_MAX_UNSAFE_PATHS);
    assert!(s.dice[TENDON] >= PUSIM_TENDON_FLOOR, "tendon {:?}", s.dice);
    assert!(s.dice[BONE] >= PUSIM_BONE_FLOOR, "bone {:?}", s.dice);
    assert!(s.dice[SHADOW] >= PUSIM_SHADOW_FLOOR, "shadow {:?}", s.dice);
}

#[test]
fn own_phantom_test_seeds_hold_through_the_reader() {
    let tmp = std::env::temp_dir().join(format!("sonoguide-gen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let mut params = PhantomParams::default();
    for seed in 50_000..50_008u64 {
        params.seed = seed;
        params.geometry = if seed % 4 == 3 {
            Geometry::Curved
        } else {
            Geometry::Linear
        };
        write_case(&tmp, &format!("phantom_{seed}"), &params).expect("phantom written");
    }
    let sets = score_dir(&pipeline(), &tmp).expect("scored");
    let _ = std::fs::remove_dir_all(&tmp);
    let s = &sets[0];
    assert_eq!(s.frames, 8);
    eprintln!("own phantom test Dice {:?}", s.dice);
    assert_safe(s, 0);
    assert!(
        s.dice[TENDON] >= PHANTOM_TENDON_FLOOR,
        "tendon {:?}",
        s.dice
    );
    assert!(s.dice[BONE] >= PHANTOM_BONE_FLOOR, "bone {:?}", s.dice);
    assert!(
        s.dice[SHADOW] >= PHANTOM_SHADOW_FLOOR,
        "shadow {:?}",
        s.dice
    );
}
