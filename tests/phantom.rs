//! The phantom generator: reproducible, physically plausible, and its truth agrees with its
//! pixels.

use ndarray::Array2;
use sonoguide::dicom::{DicomFile, ReadOptions};
use sonoguide::label::Label;
use sonoguide::sim::phantom::{generate, write_case, Geometry, PhantomParams};

fn params(seed: u64) -> PhantomParams {
    let mut p = PhantomParams::default();
    p.width = 320;
    p.height = 256;
    p.seed = seed;
    p
}

fn mean_where(
    img: &Array2<u8>,
    labels: &Array2<u8>,
    want: impl Fn(u8, usize) -> bool,
) -> Option<f64> {
    let (mut s, mut n) = (0.0, 0usize);
    for ((y, x), v) in img.indexed_iter() {
        if want(labels[[y, x]], y) {
            s += *v as f64;
            n += 1;
        }
    }
    (n > 50).then(|| s / n as f64)
}

#[test]
fn same_seed_same_phantom_other_seed_other_phantom() {
    let a = generate("a", &params(11)).unwrap();
    let b = generate("a", &params(11)).unwrap();
    let c = generate("a", &params(12)).unwrap();
    assert_eq!(a.frames, b.frames);
    assert_eq!(a.labels, b.labels);
    assert_ne!(a.frames, c.frames);
}

/// Grey-level margins between structures, in 8-bit levels (the log scale maps 60 dB to 255
/// levels, 4.25 levels per dB). Each margin is a few dB: far above what speckle leaves on the
/// mean of thousands of pixels (under one level), well below the designed contrast.
const SHADOW_MARGIN: f64 = 30.0;
const BONE_MARGIN: f64 = 60.0;
const TENDON_MARGIN: f64 = 10.0;
const FLUID_MARGIN: f64 = 20.0;

#[test]
fn labels_agree_with_the_image_over_many_seeds() {
    let mut scenes = std::collections::HashSet::new();
    for seed in 100..112 {
        let ph = generate("t", &params(seed)).unwrap();
        let (img, lab) = (&ph.frames[0], &ph.labels[0]);
        scenes.insert(ph.truth.scene);
        // Tissue: background below the skin and fat (the muscle layer).
        let skin_px = 80;
        let tissue = mean_where(img, lab, |l, y| {
            l == Label::Background.code() && y > skin_px
        })
        .unwrap();
        if let Some(shadow) = mean_where(img, lab, |l, _| l == Label::Shadow.code()) {
            assert!(
                shadow + SHADOW_MARGIN < tissue,
                "seed {seed}: shadow {shadow:.0} vs tissue {tissue:.0}"
            );
        }
        if let Some(bone) = mean_where(img, lab, |l, _| l == Label::Bone.code()) {
            assert!(
                bone > tissue + BONE_MARGIN,
                "seed {seed}: bone {bone:.0} vs tissue {tissue:.0}"
            );
        }
        let tendon = mean_where(img, lab, |l, _| l == Label::Tendon.code()).unwrap();
        assert!(
            tendon > tissue + TENDON_MARGIN,
            "seed {seed}: tendon {tendon:.0} vs tissue {tissue:.0}"
        );
        for fluid_label in [Label::Vessel.code(), Label::Joint.code()] {
            if let Some(f) = mean_where(img, lab, |l, _| l == fluid_label) {
                assert!(
                    f + FLUID_MARGIN < tissue,
                    "seed {seed}: label {fluid_label} {f:.0} vs tissue {tissue:.0}"
                );
            }
        }
        // Bone truth is present exactly when bone is labelled.
        let has_bone_label = lab.iter().any(|l| *l == Label::Bone.code());
        assert_eq!(
            has_bone_label,
            !ph.truth.frames[0].bone_polylines_px.is_empty(),
            "seed {seed}"
        );
        assert!(
            ph.truth.frames[0].target_px.is_some(),
            "seed {seed}: a target"
        );
    }
    assert!(
        scenes.len() >= 2,
        "seeds 100..112 should cover several scenes: {scenes:?}"
    );
}

/// Fully developed speckle, log-compressed, has a standard deviation of 5.57 dB (Burckhardt
/// 1978): 23.7 grey levels on this 60 dB scale. Muscle striations and the PSF sampling move
/// it a little; outside 16..32 the image is not speckle.
const SPECKLE_STD_RANGE: (f64, f64) = (16.0, 32.0);

#[test]
fn muscle_has_fully_developed_speckle() {
    let ph = generate("s", &params(5)).unwrap();
    let (img, lab, clean) = (&ph.frames[0], &ph.labels[0], &ph.clean[0]);
    // Homogeneous muscle: background label with a 15-row clear neighbourhood above and below,
    // and a clean level within 4 grey levels of the muscle level (the median of such pixels).
    let (h, _) = lab.dim();
    let clear = |y: usize, x: usize| {
        (y.saturating_sub(15)..(y + 16).min(h)).all(|yy| lab[[yy, x]] == Label::Background.code())
    };
    let mut cand: Vec<(usize, usize)> = lab
        .indexed_iter()
        .filter(|((y, x), l)| **l == 0 && *y > 40 && clear(*y, *x))
        .map(|(p, _)| p)
        .collect();
    let mut levels: Vec<u8> = cand.iter().map(|p| clean[*p]).collect();
    levels.sort_unstable();
    let level = levels[levels.len() / 2] as i32;
    cand.retain(|p| (clean[*p] as i32 - level).abs() <= 4);
    let vals: Vec<f64> = cand.iter().map(|p| img[*p] as f64).collect();
    assert!(vals.len() > 1000, "{} muscle pixels", vals.len());
    let m = vals.iter().sum::<f64>() / vals.len() as f64;
    let sd = (vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / vals.len() as f64).sqrt();
    assert!(
        sd > SPECKLE_STD_RANGE.0 && sd < SPECKLE_STD_RANGE.1,
        "speckle std {sd:.1}"
    );
    // The clean map is the speckled image's expected level (the log bias is included).
    let cm = cand.iter().map(|p| clean[*p] as f64).sum::<f64>() / cand.len() as f64;
    assert!(
        (cm - m).abs() < 6.0,
        "clean mean {cm:.1} vs image mean {m:.1}"
    );
}

#[test]
fn written_case_reads_back_with_calibration_and_pixels() {
    let dir = tempdir("case");
    let mut p = params(21);
    p.frames = 3;
    let truth = write_case(&dir, "cine", &p).unwrap();
    let ph = generate("cine", &p).unwrap();
    let file = DicomFile::open(dir.join("cine.dcm"), &ReadOptions::default()).unwrap();
    assert_eq!(file.frame_count(), 3);
    assert_eq!(file.info().sop_class_uid, "1.2.840.10008.5.1.4.1.1.3.1");
    let (mx, my) = file.info().calibration.mm_per_px().expect("calibrated");
    assert!((mx - 0.08).abs() < 1e-9 && (my - 0.08).abs() < 1e-9);
    for k in 0..3 {
        let f = file.read_frame(k).unwrap();
        let got: Vec<u8> = f.gray8();
        let want: Vec<u8> = ph.frames[k].iter().copied().collect();
        assert_eq!(got, want, "frame {k}");
    }
    // The probe slides: frame 1 is frame 0 moved one pixel.
    let a = ph.labels[0].slice(ndarray::s![.., 1..]).to_owned();
    let b = ph.labels[1].slice(ndarray::s![.., ..-1]).to_owned();
    assert_eq!(a, b, "labels move with the probe");
    for name in [
        "cine.truth.png",
        "cine.clean.png",
        "cine.truth.json",
        "cine.truth_0001.png",
        "cine.clean_0002.png",
    ] {
        assert!(dir.join(name).is_file(), "{name}");
    }
    let labels = sonoguide::imageio::read_gray_png(&dir.join("cine.truth.png")).unwrap();
    assert_eq!(labels, ph.labels[0]);
    assert!(labels.iter().all(|v| *v <= 5));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cine.truth.json")).unwrap())
            .unwrap();
    assert_eq!(json["spacing_mm"][0].as_f64(), Some(0.08));
    assert_eq!(json["frames"].as_array().unwrap().len(), 3);
    assert_eq!(json["target_kind"], truth.target_kind.as_str());
    // Target in mm is consistent with target in px.
    let t = &json["frames"][0];
    if let (Some(px), Some(mm)) = (t["target_px"].as_array(), t["target_mm"].as_array()) {
        let (x, y) = (px[0].as_f64().unwrap(), px[1].as_f64().unwrap());
        assert!(((x - 160.0) * 0.08 - mm[0].as_f64().unwrap()).abs() < 1e-9);
        assert!((y * 0.08 - mm[1].as_f64().unwrap()).abs() < 1e-9);
    }
}

#[test]
fn curved_phantom_is_a_fan_and_reads_as_one() {
    let mut p = params(8);
    p.geometry = Geometry::Curved;
    let ph = generate("c", &p).unwrap();
    let img = &ph.frames[0];
    let (h, w) = img.dim();
    // Corners outside the fan are black; the centre is not.
    assert_eq!(img[[h - 1, 0]], 0);
    assert_eq!(img[[h - 1, w - 1]], 0);
    assert!(img
        .slice(ndarray::s![h / 2 - 5..h / 2 + 5, w / 2 - 5..w / 2 + 5])
        .iter()
        .any(|v| *v > 20));
    // Read back through the DICOM reader as a user's file: the region is a fan, its mask
    // excludes the black corners and includes the centre.
    let dir = tempdir("curved");
    write_case(&dir, "c", &p).unwrap();
    let file = sonoguide::dicom::DicomFile::open(dir.join("c.dcm"), &Default::default()).unwrap();
    let frame = file.read_frame(0).unwrap();
    assert_eq!(frame.intensity.dim(), (h, w));
    assert_eq!(frame.region.shape, sonoguide::frame::RegionShape::Sector);
    assert!(!frame.region.contains(0, h - 1) && !frame.region.contains(w - 1, h - 1));
    assert!(frame.region.contains(w / 2, h / 2));
}

#[test]
fn absurd_settings_are_refused() {
    let mut p = params(1);
    p.width = 100_000;
    assert!(generate("x", &p).is_err());
    let mut p = params(1);
    p.frames = 0;
    assert!(generate("x", &p).is_err());
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sonoguide-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn sample_data_matches_its_recipe() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sample-data");
    let dir = tempdir("recipe");
    let mut p = PhantomParams::default();
    p.seed = 1;
    write_case(&dir, "linear_0001", &p).unwrap();
    for ext in ["dcm", "truth.png", "clean.png", "truth.json"] {
        let a = std::fs::read(root.join(format!("linear_0001.{ext}"))).unwrap();
        let b = std::fs::read(dir.join(format!("linear_0001.{ext}"))).unwrap();
        assert!(
            a == b,
            "sample-data/linear_0001.{ext} differs from its recipe"
        );
    }
}
