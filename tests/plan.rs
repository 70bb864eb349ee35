//! Needle planning and the `process` batch: safety against the truth, the documented JSON,
//! refusals that say why, and the outputs other tools read (dcmtk, dicom3tools).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use sonoguide::label::Label;
use sonoguide::plan::{plan, PlanParams};
use sonoguide::sim::phantom::{frame_of, generate, PhantomParams};
use sonoguide::{Backend, Pipeline, PipelineConfig};

fn cpu_pipeline() -> Pipeline {
    let mut c = PipelineConfig::default();
    c.backend = Backend::Cpu;
    Pipeline::new(c).unwrap()
}

/// The planner keeps `margin_mm` from its own labels; the truth may differ from them by the
/// segmentation's boundary error (under a pixel), so a path may come this close to the truth's
/// forbidden structures.
const TRUTH_CLEARANCE_SLACK_MM: f64 = 0.25;

/// Mean target error on the realistic phantom's seeds 8000–8011 was 2.5 mm when it landed (the
/// issue's aim is 1.5 mm): a regression guard, not the aim.
const TARGET_ERROR_GUARD_MM: f64 = 3.0;

#[test]
fn planned_paths_never_cross_bone_shadow_or_vessel_in_the_truth() {
    let p = cpu_pipeline();
    let s = sonoguide::sim::eval::plan_scores(&p, 8000..8012, 0..0, 0, &PhantomParams::default())
        .unwrap();
    eprintln!("{s:?}");
    assert_eq!(s.unsafe_paths, 0);
    assert!(
        s.with_path >= 3,
        "only {} of {} phantoms got a path",
        s.with_path,
        s.cases
    );
    assert!(
        s.min_truth_clearance_mm >= 2.0 - TRUTH_CLEARANCE_SLACK_MM,
        "truth clearance {}",
        s.min_truth_clearance_mm
    );
    assert_eq!(s.kind_matches, s.cases, "target kinds");
    assert!(
        s.target_error_mean_mm < TARGET_ERROR_GUARD_MM,
        "target error {} mm",
        s.target_error_mean_mm
    );
}

#[test]
fn plan_json_has_the_documented_shape() {
    let p = cpu_pipeline();
    let mut pp = PhantomParams::default();
    pp.seed = 2; // soft tissue: a peritendinous target
    let ph = generate("j", &pp).unwrap();
    let r = p.process(&frame_of(&ph, 0).unwrap()).unwrap();
    let v = serde_json::to_value(&r.plan).unwrap();
    for key in [
        "status",
        "reason",
        "entry",
        "target",
        "angle_deg",
        "depth_mm",
        "length_mm",
        "clearance_mm",
        "target_kind",
        "side",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["status"], "ok", "{v}");
    assert!(v["reason"].is_null());
    assert_eq!(v["target_kind"], "peritendinous");
    let angle = v["angle_deg"].as_f64().unwrap();
    assert!((15.0..=45.0).contains(&angle));
    assert!(
        v["entry"]["px"].as_array().unwrap().len() == 2
            && v["entry"]["mm"].as_array().unwrap().len() == 2
    );
    // The entry is on the skin line (the top row of this linear phantom).
    assert_eq!(v["entry"]["px"][1].as_f64(), Some(0.0));
    let side = v["side"].as_str().unwrap();
    let (ex, tx) = (
        v["entry"]["px"][0].as_f64().unwrap(),
        v["target"]["px"][0].as_f64().unwrap(),
    );
    assert_eq!(side, if ex < tx { "left" } else { "right" });
    // Depth and length agree with the points.
    let (e, t) = (&v["entry"]["mm"], &v["target"]["mm"]);
    let len = ((e[0].as_f64().unwrap() - t[0].as_f64().unwrap()).powi(2)
        + (e[1].as_f64().unwrap() - t[1].as_f64().unwrap()).powi(2))
    .sqrt();
    assert!((len - v["length_mm"].as_f64().unwrap()).abs() < 1e-9);
    assert!((v["depth_mm"].as_f64().unwrap() - t[1].as_f64().unwrap()).abs() < 1e-9);
}

#[test]
fn impossible_requests_say_no_safe_path_and_why() {
    let p = cpu_pipeline();
    let mut pp = PhantomParams::default();
    pp.seed = 1;
    let ph = generate("n", &pp).unwrap();
    let frame = frame_of(&ph, 0).unwrap();
    let r = p.process(&frame).unwrap();
    // A user target inside the bone shadow.
    let shadow = r
        .segmentation
        .labels
        .indexed_iter()
        .find(|(_, l)| **l == Label::Shadow.code())
        .map(|(p, _)| p);
    if let Some((y, x)) = shadow {
        let (xm, ym) = frame.calibration.px_to_mm(x as f64, y as f64, 0.0).unwrap();
        let mut params = PlanParams::default();
        params.target_mm = Some((xm, ym));
        let pl = plan(&frame, &r.segmentation, &params);
        assert_eq!(pl.status, "no_safe_path");
        assert!(
            pl.reason.as_deref().unwrap().contains("shadow"),
            "{:?}",
            pl.reason
        );
    }
    // A target outside the image.
    let mut params = PlanParams::default();
    params.target_mm = Some((0.0, 500.0));
    let pl = plan(&frame, &r.segmentation, &params);
    assert_eq!(pl.status, "no_safe_path");
    assert!(pl.reason.as_deref().unwrap().contains("outside"));
    // A clearance no path can keep next to bone.
    let mut params = PlanParams::default();
    params.margin_mm = 30.0;
    let pl = plan(&frame, &r.segmentation, &params);
    assert_eq!(pl.status, "no_safe_path");
    assert!(pl.entry.is_none() && pl.angle_deg.is_none());
    // Nothing to target: an empty segmentation.
    let mut empty = r.segmentation.clone();
    empty.labels.fill(0);
    empty.possible_nerve = None;
    let pl = plan(&frame, &empty, &PlanParams::default());
    assert_eq!(pl.status, "no_safe_path");
    assert!(pl.reason.as_deref().unwrap().contains("no target"));
    // Nothing to avoid: a user target in an empty frame gets a path and a clearance of null
    // (no sentinel number).
    let mut params = PlanParams::default();
    params.target_mm = Some((0.0, 10.0));
    let pl = plan(&frame, &empty, &params);
    assert_eq!(pl.status, "ok", "{:?}", pl.reason);
    assert_eq!(pl.clearance_mm, None);
    let json = serde_json::to_value(&pl).unwrap();
    assert!(json["clearance_mm"].is_null());
}

/// A setting's name and a change that makes it invalid.
type BadSetting = (&'static str, fn(&mut PlanParams));

#[test]
fn nan_infinite_and_out_of_range_settings_are_refused_by_name() {
    let cases: [BadSetting; 7] = [
        ("margin_mm", |p| p.margin_mm = f64::NAN),
        ("margin_mm", |p| p.margin_mm = -1.0),
        ("min_angle_deg", |p| p.min_angle_deg = f64::INFINITY),
        ("max_angle_deg", |p| p.max_angle_deg = f64::NAN),
        ("max_angle_deg", |p| p.max_angle_deg = 5.0), // below the minimum
        ("target_mm", |p| p.target_mm = Some((f64::NAN, 10.0))),
        ("target_mm", |p| {
            p.target_mm = Some((0.0, f64::NEG_INFINITY))
        }),
    ];
    let (frame, seg) = {
        let p = cpu_pipeline();
        let mut ph = PhantomParams::default();
        ph.seed = 3;
        let frame = frame_of(&generate("nan", &ph).unwrap(), 0).unwrap();
        let seg = p.process(&frame).unwrap().segmentation;
        (frame, seg)
    };
    for (name, set) in cases {
        let mut params = PlanParams::default();
        set(&mut params);
        // The library's entry points: the pipeline refuses to be built ...
        let mut config = PipelineConfig::default();
        config.backend = Backend::Cpu;
        config.plan = params.clone();
        let e = Pipeline::new(config).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
        let e = Pipeline::builder()
            .backend(Backend::Cpu)
            .plan(params.clone())
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains(name), "{name}: {e}");
        // ... and the planner gives no path, naming the setting.
        let pl = plan(&frame, &seg, &params);
        assert_eq!(pl.status, "no_safe_path", "{name}");
        assert!(
            pl.reason.as_deref().unwrap().contains(name),
            "{name}: {:?}",
            pl.reason
        );
    }
    // The command line refuses them with the usage exit code.
    for args in [
        ["--margin-mm", "nan"],
        ["--max-angle", "inf"],
        ["--nerve-margin-mm", "NaN"],
        ["--spacing-mm", "nan,0.1"],
        ["--preset", "no-such-site"],
    ] {
        let o = bin()
            .arg("process")
            .arg(root().join("sample-data/linear_0001.dcm"))
            .args(args)
            .args(["--out", "/tmp/sonoguide-nan-never-written"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        // The OpenIGTLink server's entry point refuses them before it listens.
        let o = bin()
            .args(["serve", "--backend", "cpu", "--port", "0"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "serve {args:?}");
    }
}

#[test]
fn smoothing_keeps_a_cine_suggestion_steady() {
    let p = cpu_pipeline();
    let s = sonoguide::sim::eval::plan_scores(&p, 0..0, 9000..9003, 12, &PhantomParams::default())
        .unwrap();
    eprintln!("{s:?}");
    // 3 cines of 12 frames give 33 consecutive pairs; most must have a path in both frames,
    // or the jitter below is measured on too little to mean anything (32 on 2026-11-23).
    const MIN_JITTER_PAIRS: usize = 24;
    assert!(
        s.jitter_pairs >= MIN_JITTER_PAIRS,
        "only {} frame pairs with a path in both",
        s.jitter_pairs
    );
    // The probe moves 0.08 mm per frame; the suggestion must not wander much more.
    assert!(
        s.entry_jitter_smoothed_mm < 1.0,
        "entry jitter {}",
        s.entry_jitter_smoothed_mm
    );
    assert!(
        s.target_jitter_smoothed_mm < 1.0,
        "target jitter {}",
        s.target_jitter_smoothed_mm
    );
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sonoguide"))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn tool(name: &str) -> Option<PathBuf> {
    common::find_tool(name, name, "Debian packages dcmtk, dicom3tools")
}

#[test]
fn process_writes_every_output_resumes_and_reports_failures() {
    let out = std::env::temp_dir().join(format!("sonoguide-process-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    // A folder with a cine, a non-DICOM file (ignored) and a broken DICOM (reported).
    let input = out.with_extension("in");
    let _ = std::fs::remove_dir_all(&input);
    std::fs::create_dir_all(input.join("sub")).unwrap();
    std::fs::copy(
        root().join("sample-data/cine_0005.dcm"),
        input.join("cine.dcm"),
    )
    .unwrap();
    std::fs::copy(
        root().join("sample-data/linear_0002.dcm"),
        input.join("sub/soft.dcm"),
    )
    .unwrap();
    std::fs::write(input.join("notes.txt"), "not an image").unwrap();
    std::fs::copy(
        root().join("tests/data/dicom-corpus/bad/truncated_in_pixels.dcm"),
        input.join("broken.dcm"),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        bin()
            .arg("process")
            .arg(&input)
            .args([
                "--backend",
                "cpu",
                "--recursive",
                "--frames",
                "0..3",
                "--out",
            ])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&[]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("broken.dcm"), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let files = summary["files"].as_array().unwrap();
    assert_eq!(
        files.len(),
        3,
        "two images and the broken file; notes.txt ignored"
    );
    let cine = files
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("cine.dcm"))
        .unwrap();
    assert_eq!(cine["status"], "ok");
    assert_eq!(cine["frames"], 3);
    for k in [
        "despeckle_ms",
        "features_ms",
        "segment_ms",
        "plan_ms",
        "total_ms",
    ] {
        assert!(cine["timings"][k].as_f64().unwrap() >= 0.0);
    }
    assert!(files
        .iter()
        .any(|f| f["status"] == "failed" && f["error"].as_str().unwrap().contains("broken.dcm")));
    let dir = out.join("cine");
    for k in 0..3 {
        for ext in ["overlay.png", "labels.png", "bone.json", "plan.json"] {
            assert!(
                dir.join(format!("frame_{k:04}.{ext}")).is_file(),
                "frame {k} {ext}"
            );
        }
    }
    assert!(
        !dir.join("frame_0003.overlay.png").exists(),
        "--frames 0..3 stops at frame 2"
    );
    assert!(out.join("soft").join("soft.overlay.dcm").is_file());
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());

    // The derived DICOM reads back: 3 RGB frames, the same study, a new series, a reference.
    let dcm = dir.join("cine.overlay.dcm");
    let derived = sonoguide::dicom::DicomFile::open(&dcm, &Default::default()).unwrap();
    assert_eq!(derived.frame_count(), 3);
    assert_eq!(derived.info().photometric_interpretation, "RGB");
    let src =
        sonoguide::dicom::DicomFile::open(input.join("cine.dcm"), &Default::default()).unwrap();
    let uid = |f: &sonoguide::dicom::DicomFile, t| {
        f.object()
            .element(t)
            .unwrap()
            .value()
            .to_str()
            .unwrap()
            .to_string()
    };
    use dicom_dictionary_std::tags;
    assert_eq!(
        uid(&derived, tags::STUDY_INSTANCE_UID),
        uid(&src, tags::STUDY_INSTANCE_UID)
    );
    assert_ne!(
        uid(&derived, tags::SERIES_INSTANCE_UID),
        uid(&src, tags::SERIES_INSTANCE_UID)
    );
    assert_ne!(
        uid(&derived, tags::SOP_INSTANCE_UID),
        uid(&src, tags::SOP_INSTANCE_UID)
    );
    assert_eq!(uid(&derived, tags::BURNED_IN_ANNOTATION), "YES");
    let item = &derived
        .object()
        .element(tags::SOURCE_IMAGE_SEQUENCE)
        .unwrap()
        .value()
        .items()
        .unwrap()[0];
    assert_eq!(
        item.element(tags::REFERENCED_SOP_INSTANCE_UID)
            .unwrap()
            .value()
            .to_str()
            .unwrap(),
        uid(&src, tags::SOP_INSTANCE_UID)
    );
    if let Some(dcmdump) = tool("dcmdump") {
        let o = Command::new(dcmdump).arg(&dcm).output().unwrap();
        assert!(
            o.status.success(),
            "dcmdump: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    if let Some(dciodvfy) = tool("dciodvfy") {
        let o = Command::new(dciodvfy).arg(&dcm).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !text.lines().any(|l| l.starts_with("Error")),
            "dciodvfy: {text}"
        );
    }

    // Resume: with --skip-existing nothing is redone.
    let before = std::fs::metadata(&dcm).unwrap().modified().unwrap();
    let o = run(&["--skip-existing"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::metadata(&dcm).unwrap().modified().unwrap(), before);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert!(summary["files"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["status"] == "skipped"));
}

#[test]
fn process_refuses_bad_arguments_with_exit_2() {
    let o = bin()
        .args(["process", "x.dcm", "--out", "/tmp/x", "--target", "banana"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = bin()
        .args(["process", "x.dcm", "--out", "/tmp/x", "--frames", "5..2"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = bin()
        .args([
            "process",
            "x.dcm",
            "--out",
            "/tmp/x",
            "--min-angle",
            "50",
            "--max-angle",
            "40",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// The text of `tag` in a DICOM object, trimmed of padding.
fn text_of(obj: &sonoguide::dicom::DicomFile, tag: dicom_core::Tag) -> Option<String> {
    obj.object().element(tag).ok().and_then(|e| {
        e.to_str()
            .ok()
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
    })
}

#[test]
fn derived_dicom_inherits_lossy_history_and_frame_time_and_invents_no_calibration() {
    use dicom_dictionary_std::tags;
    use sonoguide::dicom::{DicomFile, ReadOptions};
    let corpus = root().join("tests/data/dicom-corpus/files");
    let out = std::env::temp_dir().join(format!("sonoguide-derived-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = bin()
        .args(["process", "--backend", "cpu", "--frames", "0..2", "--out"])
        .arg(&out)
        .arg(corpus.join("examples_ybr_color.dcm")) // JPEG baseline cine, calibrated
        .arg(corpus.join("US1_J2KR.dcm")) // JPEG 2000 lossless, no calibration
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let read = |p: PathBuf| DicomFile::open(p, &ReadOptions::default()).unwrap();

    let source = read(corpus.join("examples_ybr_color.dcm"));
    let jpeg = read(out.join("examples_ybr_color/examples_ybr_color.overlay.dcm"));
    assert_eq!(
        text_of(&jpeg, tags::LOSSY_IMAGE_COMPRESSION).as_deref(),
        Some("01")
    );
    assert_eq!(
        text_of(&jpeg, tags::LOSSY_IMAGE_COMPRESSION_METHOD).as_deref(),
        Some("ISO_10918_1")
    );
    let source_time: f64 = text_of(&source, tags::FRAME_TIME)
        .expect("the source has a Frame Time")
        .parse()
        .unwrap();
    let written: f64 = text_of(&jpeg, tags::FRAME_TIME).unwrap().parse().unwrap();
    // DS keeps 16 characters: the copy agrees to far better than a microsecond.
    assert!(
        (written - source_time).abs() < 1e-3,
        "{written} vs {source_time}"
    );
    // An unusable source calibration is not passed on: the output has none.
    let expected = match source.info().calibration.status() {
        "ok" => "ok",
        _ => "missing",
    };
    assert_eq!(jpeg.info().calibration.status(), expected);

    let j2k = read(out.join("US1_J2KR/US1_J2KR.overlay.dcm"));
    assert_eq!(
        text_of(&j2k, tags::LOSSY_IMAGE_COMPRESSION).as_deref(),
        Some("00")
    );
    assert!(
        j2k.object()
            .element(tags::SEQUENCE_OF_ULTRASOUND_REGIONS)
            .is_err(),
        "no calibration is invented for an uncalibrated source"
    );
    assert_eq!(j2k.info().calibration.status(), "missing");
    // Without a calibration there is no plan in mm, and the plan says why.
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("US1_J2KR/frame_0000.plan.json")).unwrap())
            .unwrap();
    assert_eq!(plan["status"], "no_calibration", "{plan}");
    assert!(plan["entry"].is_null() && plan["target"].is_null());
    let _ = std::fs::remove_dir_all(&out);
}

/// A possible nerve (a patch the classifier gives some nerve probability without labelling it
/// nerve) laid across a planned path: the new plan keeps the nerve margin from every pixel of
/// it, judged here by brute force over the pixels' squares, or refuses; and says why.
#[test]
fn possible_nerve_is_kept_clear_of_like_a_nerve() {
    let p = cpu_pipeline();
    let mut pp = PhantomParams::default();
    pp.seed = 2; // soft tissue: a peritendinous target
    let ph = generate("n", &pp).unwrap();
    let frame = frame_of(&ph, 0).unwrap();
    let r = p.process(&frame).unwrap();
    let (Some(e), Some(t)) = (r.plan.entry, r.plan.target) else {
        panic!("no path to start from: {:?}", r.plan);
    };
    let mut seg = r.segmentation.clone();
    let mm = seg.mm_per_px;
    // A disc of 1 mm radius on the path's midpoint, on background and tendon pixels only.
    let mid = [(e.px[0] + t.px[0]) / 2.0, (e.px[1] + t.px[1]) / 2.0];
    let mask = ndarray::Array2::from_shape_fn(seg.labels.dim(), |(y, x)| {
        let d = ((x as f64 - mid[0]) * mm.0).hypot((y as f64 - mid[1]) * mm.1);
        d <= 1.0 && [Label::Background.code(), Label::Tendon.code()].contains(&seg.labels[[y, x]])
    });
    assert!(mask.iter().any(|&m| m), "the disc lies on the path");
    seg.possible_nerve = Some(mask.clone());
    let obstacle = seg.obstacle_labels();
    assert!(mask
        .indexed_iter()
        .all(|((y, x), &m)| !m || obstacle[[y, x]] == Label::Nerve.code()));
    let params = PlanParams::default();
    let again = plan(&frame, &seg, &params);
    eprintln!(
        "before {:?} → {:?}; after {:?} {:?}",
        e.px, t.px, again.entry, again.reason
    );
    assert!(
        again.notes.iter().any(|n| n.contains("possible nerve")),
        "{:?}",
        again.notes
    );
    let (Some(e2), Some(t2)) = (again.entry, again.target) else {
        assert!(again.reason.is_some(), "a refusal says why");
        return;
    };
    // Exact distance from the segment to each pixel's square, sampled finely enough that the
    // sampling error stays far below the margin's tolerance.
    let samples = 2000;
    let mut nearest = f64::INFINITY;
    for ((y, x), &m) in mask.indexed_iter() {
        if !m {
            continue;
        }
        for k in 0..=samples {
            let s = k as f64 / samples as f64;
            let px = e2.px[0] + s * (t2.px[0] - e2.px[0]);
            let py = e2.px[1] + s * (t2.px[1] - e2.px[1]);
            let dx = ((px - x as f64).abs() - 0.5).max(0.0) * mm.0;
            let dy = ((py - y as f64).abs() - 0.5).max(0.0) * mm.1;
            nearest = nearest.min(dx.hypot(dy));
        }
    }
    assert!(
        nearest >= params.nerve_margin_mm - SAMPLING_SLACK_MM,
        "path passes {nearest} mm from a possible nerve: {again:?}"
    );
}

/// The brute-force check samples the path every 1/2000 of its length (under 0.03 mm here).
const SAMPLING_SLACK_MM: f64 = 0.03;
