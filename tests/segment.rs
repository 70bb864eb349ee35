//! Segmentation against phantom truth, on the real corpus, on the GPU, and through the CLI.

mod common;

use std::path::{Path, PathBuf};

use sonoguide::dicom::{DicomFile, ReadOptions};
use sonoguide::label::Label;
use sonoguide::segment::{segment, segment_with, SegmentParams};
use sonoguide::sim::eval::{dice, segment_scores};
use sonoguide::sim::phantom::{frame_of, generate, PhantomParams};
use sonoguide::{Backend, Despeckler, Filter};

/// Regression guards on the realistic phantom (filled shadows, layered tissue, random gain and
/// dynamic range), a little under what seeds 7000–7007 gave when it landed (bone 0.78, shadow
/// 0.85, tendon 0.58, joint 0.33). The aims (tendon and bone band 0.8, shadow 0.85,
/// joint and vessel 0.7, bone distance 0.3 mm) are not met yet; the README reports the full
/// evaluation.
const FLOOR_DICE_BONE: f64 = 0.72;
const FLOOR_DICE_SHADOW: f64 = 0.8;
const FLOOR_DICE_TENDON: f64 = 0.5;
const FLOOR_DICE_JOINT: f64 = 0.25;
const CEILING_BONE_MEAN_MM: f64 = 0.3;

#[test]
fn phantoms_from_fresh_seeds_are_segmented_accurately() {
    let d = Despeckler::new(Backend::Cpu).unwrap();
    let f = Filter::default_for("srad").unwrap();
    let s = segment_scores(
        &d,
        &f,
        &SegmentParams::default(),
        7000..7008,
        &PhantomParams::default(),
    )
    .unwrap();
    eprintln!("{s:?}");
    assert!(s.dice[1] > FLOOR_DICE_BONE, "bone band {}", s.dice[1]);
    assert!(s.dice[2] > FLOOR_DICE_SHADOW, "shadow {}", s.dice[2]);
    assert!(s.dice[0] > FLOOR_DICE_TENDON, "tendon {}", s.dice[0]);
    assert!(
        s.dice[3].is_nan() || s.dice[3] > FLOOR_DICE_JOINT,
        "joint {}",
        s.dice[3]
    );
    assert!(
        s.bone_mean_mm < CEILING_BONE_MEAN_MM,
        "bone distance {} mm",
        s.bone_mean_mm
    );
    assert_eq!(s.false_bone_frames, 0);
}

#[test]
fn no_bone_is_labelled_where_there_is_none() {
    let d = Despeckler::new(Backend::Cpu).unwrap();
    let f = Filter::default_for("srad").unwrap();
    let mut checked = 0;
    for seed in 100..200 {
        let mut p = PhantomParams::default();
        p.seed = seed;
        p.width = 320;
        p.height = 256;
        let ph = generate("n", &p).unwrap();
        if ph.truth.scene != "soft_tissue" {
            continue;
        }
        let frame = frame_of(&ph, 0).unwrap();
        let des = d.run(&frame.intensity, std::slice::from_ref(&f)).unwrap();
        let s = segment(&frame, &des, &SegmentParams::default()).unwrap();
        assert!(
            s.labels
                .iter()
                .all(|l| *l != Label::Bone.code() && *l != Label::Shadow.code()),
            "seed {seed}: bone found in soft tissue"
        );
        assert!(s.bone_polylines_px.is_empty());
        checked += 1;
        if checked == 4 {
            break;
        }
    }
    assert!(
        checked >= 3,
        "only {checked} soft-tissue phantoms in seeds 100..200"
    );
}

#[test]
fn curved_phantoms_segment_inside_the_fan() {
    let d = Despeckler::new(Backend::Cpu).unwrap();
    let mut p = PhantomParams::default();
    p.geometry = sonoguide::sim::phantom::Geometry::Curved;
    p.seed = 3;
    let ph = generate("c", &p).unwrap();
    let frame = frame_of(&ph, 0).unwrap();
    let des = d
        .run(&frame.intensity, &[Filter::default_for("srad").unwrap()])
        .unwrap();
    let s = segment(&frame, &des, &SegmentParams::default()).unwrap();
    for ((y, x), l) in s.labels.indexed_iter() {
        if *l != 0 {
            assert!(
                frame.region.contains(x, y),
                "label {l} outside the fan at ({x}, {y})"
            );
        }
    }
    if ph.truth.frames[0].bone_polylines_px.is_empty() {
        return;
    }
    assert!(dice(&ph.labels[0], &s.labels, Label::Shadow.code()).unwrap_or(0.0) > 0.7);
}

fn corpus(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/dicom-corpus")
        .join(rel)
}

#[test]
fn real_corpus_frames_segment_inside_region_and_colour_only_as_flow() {
    let d = Despeckler::new(Backend::Cpu).unwrap();
    let f = Filter::default_for("srad").unwrap();
    for name in [
        "OBXXXX1A.dcm",
        "US1_UNCR.dcm",
        "examples_ybr_color.dcm",
        "examples_palette.dcm",
        "examples_rgb_color.dcm",
    ] {
        let file =
            DicomFile::open(corpus(&format!("files/{name}")), &ReadOptions::default()).unwrap();
        let frame = file.read_frame(0).unwrap();
        let des = d.run(&frame.intensity, std::slice::from_ref(&f)).unwrap();
        let s = segment(&frame, &des, &SegmentParams::default()).unwrap();
        assert_eq!(s.labels.dim(), frame.intensity.dim());
        for ((y, x), l) in s.labels.indexed_iter() {
            if *l == 0 {
                continue;
            }
            assert!(
                frame.region.contains(x, y),
                "{name}: label outside the imaging region"
            );
            // Colour inside the image is flow (or an annotation, avoided all the same): only
            // ever labelled vessel, never tissue.
            if let Some(m) = &frame.colour_mask {
                assert!(
                    m[[y, x]] == 0 || *l == Label::Vessel.code(),
                    "{name}: colour pixel labelled {l}"
                );
            }
        }
        // These are cardiac and obstetric scans: a bone surface would be a false one.
        assert!(
            s.bone_polylines_px.is_empty(),
            "{name}: bone found in a non-MSK scan"
        );
    }
}

/// GPU and CPU features differ by ~1e-6; the decisions (thresholds) may flip a handful of
/// boundary pixels.
const GPU_LABEL_AGREEMENT: f64 = 0.995;

#[test]
fn gpu_features_give_the_same_segmentation() {
    let gpu = match Despeckler::new(Backend::Gpu) {
        Ok(g) => g,
        Err(e) => {
            common::missing_tool(
                "GPU segmentation",
                &format!("a GPU adapter (lavapipe): {e}"),
            );
            return;
        }
    };
    let cpu = Despeckler::new(Backend::Cpu).unwrap();
    let mut p = PhantomParams::default();
    p.seed = 611;
    let ph = generate("g", &p).unwrap();
    let frame = frame_of(&ph, 0).unwrap();
    let f = Filter::default_for("srad").unwrap();
    let des = cpu.run(&frame.intensity, std::slice::from_ref(&f)).unwrap();
    let a = segment_with(&cpu, &frame, &des, &SegmentParams::default()).unwrap();
    let b = segment_with(&gpu, &frame, &des, &SegmentParams::default()).unwrap();
    let same = a
        .labels
        .iter()
        .zip(b.labels.iter())
        .filter(|(x, y)| x == y)
        .count() as f64
        / a.labels.len() as f64;
    assert!(same >= GPU_LABEL_AGREEMENT, "labels agree on {:.4}", same);
}

#[test]
fn segment_command_writes_labels_previews_and_bone_json() {
    let out = std::env::temp_dir().join(format!("sonoguide-seg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample-data/linear_0001.dcm");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sonoguide"))
        .arg("segment")
        .arg(&sample)
        .arg(corpus("bad/empty.dcm"))
        .args(["--backend", "cpu", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "the bad file fails, the good one is still processed"
    );
    let dir = out.join("linear_0001");
    let labels = image::open(dir.join("frame_0000.labels.png")).unwrap();
    assert!(labels.as_luma8().is_some());
    assert_eq!((labels.width(), labels.height()), (480, 360));
    assert!(labels.as_luma8().unwrap().pixels().all(|p| p.0[0] <= 5));
    assert!(
        labels.as_luma8().unwrap().pixels().any(|p| p.0[0] == 2),
        "the sample joint has bone"
    );
    let preview = image::open(dir.join("frame_0000.labels_preview.png")).unwrap();
    assert!(preview.as_rgb8().is_some());
    let bone: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("frame_0000.bone.json")).unwrap())
            .unwrap();
    let px = bone["polylines_px"].as_array().unwrap();
    let mm = bone["polylines_mm"].as_array().unwrap();
    assert!(!px.is_empty() && px.len() == mm.len());
    // mm = (px − reference) × spacing: reference (240, 0), the spacing the file declares.
    let spacing = &bone["mm_per_px"];
    let (sx, sy) = (spacing[0].as_f64().unwrap(), spacing[1].as_f64().unwrap());
    let (p0, m0) = (&px[0][0], &mm[0][0]);
    let xm = (p0[0].as_f64().unwrap() - 240.0) * sx;
    let ym = p0[1].as_f64().unwrap() * sy;
    assert!(
        (xm - m0[0].as_f64().unwrap()).abs() < 1e-6 && (ym - m0[1].as_f64().unwrap()).abs() < 1e-6
    );
}

/// The one-submission path and the stage-by-stage one run the same kernels on the same
/// input; SRAD's statistics are a GPU reduction whose summing order is not fixed, so the
/// despeckled frames may differ by SRAD's GPU-to-CPU tolerance (`tests/kernels.rs`).
const ONE_SUBMISSION_DESPECKLE_TOLERANCE: f32 = 0.05;

#[test]
fn gpu_pipeline_despeckles_and_computes_features_in_one_submission() {
    use sonoguide::segment::{features_gpu, segment_from_features};
    let pipeline = match sonoguide::Pipeline::builder().backend(Backend::Gpu).build() {
        Ok(p) => p,
        Err(e) => {
            common::missing_tool(
                "GPU one-submission pipeline",
                &format!("a GPU adapter (lavapipe): {e}"),
            );
            return;
        }
    };
    let ctx = pipeline.despeckler().gpu_context().unwrap();
    let gpu = Despeckler::with_gpu(pipeline.despeckler().gpu_handle().unwrap());
    let srad = Filter::default_for("srad").unwrap();
    // A linear frame whose region is the whole image and a convex one whose fan lies inside
    // a rectangle with margins (the region is cut out, despeckled, and put back), both
    // analysed at half resolution; and a frame narrow enough to be analysed as it is (no
    // grid cut, no hand-over).
    let mut narrow = PhantomParams::default();
    narrow.seed = 612;
    narrow.width = 320;
    narrow.height = 240;
    let narrow = frame_of(&generate("n", &narrow).unwrap(), 0).unwrap();
    assert!(narrow.region.bounds.width() <= SegmentParams::default().half_resolution_above_px);
    for name in ["linear_0001.dcm", "curved_0003.dcm", "narrow phantom"] {
        let frame = match name {
            "narrow phantom" => narrow.clone(),
            _ => {
                let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("sample-data")
                    .join(name);
                let file = DicomFile::open(&path, &ReadOptions::default()).unwrap();
                file.read_frame(0).unwrap()
            }
        };
        let before = ctx.readbacks();
        let r = pipeline.process(&frame).unwrap();
        assert_eq!(
            ctx.readbacks() - before,
            1,
            "{name}: the despeckled region, the feature maps and the classifier's result together"
        );
        // Stage by stage on the same device: despeckle the region, then the features.
        let b = frame.region.bounds;
        let cut = ndarray::s![b.y0..b.y1, b.x0..b.x1];
        let inside = frame.intensity.slice(cut).to_owned();
        let mut despeckled = frame.intensity.clone();
        despeckled
            .slice_mut(cut)
            .assign(&gpu.run(&inside, std::slice::from_ref(&srad)).unwrap());
        let worst = despeckled
            .iter()
            .zip(r.despeckled.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= ONE_SUBMISSION_DESPECKLE_TOLERANCE,
            "{name}: despeckled frames differ by {worst}"
        );
        let params = SegmentParams::default();
        let before = ctx.readbacks();
        let f = features_gpu(ctx, &frame, &r.despeckled, &params).unwrap();
        assert_eq!(
            ctx.readbacks() - before,
            1,
            "{name}: the features and the classifier on their own, read back once too"
        );
        let s = segment_from_features(&frame, &r.despeckled, &f, &params).unwrap();
        let same = s
            .labels
            .iter()
            .zip(r.segmentation.labels.iter())
            .filter(|(x, y)| x == y)
            .count() as f64
            / s.labels.len() as f64;
        assert!(
            same >= GPU_LABEL_AGREEMENT,
            "{name}: labels agree on {same:.4}"
        );
    }
}
