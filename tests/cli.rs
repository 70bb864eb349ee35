//! The command line end to end: real files on disk, the real binary, exit codes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sonoguide"))
}

fn corpus(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/dicom-corpus")
        .join(rel)
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sonoguide-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn info_json_reports_every_file_and_the_failures() {
    let out = bin()
        .args(["info", "--json"])
        .arg(corpus("files/OBXXXX1A.dcm"))
        .arg(corpus("bad/truncated_in_pixels.dcm"))
        .arg(corpus("files/US1_J2KR.dcm"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed input gives exit code 1"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 3);
    for key in [
        "path",
        "sop_class_uid",
        "transfer_syntax_uid",
        "photometric_interpretation",
        "rows",
        "columns",
        "frames",
        "bits_allocated",
        "samples_per_pixel",
        "ultrasound_regions",
        "imaging_region",
        "calibration",
    ] {
        assert!(a[0].get(key).is_some(), "missing {key}");
    }
    assert_eq!(a[0]["calibration"], "ok");
    let r = &a[0]["imaging_region"];
    assert!((r["mm_per_px_x"].as_f64().unwrap() - 0.26228787661969977).abs() < 1e-9);
    assert_eq!(r["reference_pixel_x0"].as_f64(), Some(460.0));
    assert_eq!(a[0]["ultrasound_regions"].as_array().unwrap().len(), 2);
    assert!(a[1]["error"]
        .as_str()
        .unwrap()
        .contains("truncated_in_pixels.dcm"));
    assert_eq!(a[2]["calibration"], "missing");
    assert_eq!(a[2]["transfer_syntax_uid"], "1.2.840.10008.1.2.4.90");
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated_in_pixels.dcm"));
}

#[test]
fn info_text_succeeds_on_good_files() {
    let out = bin()
        .arg("info")
        .arg(corpus("files/examples_palette.dcm"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PALETTE COLOR") && text.contains("calibration"),
        "{text}"
    );
}

#[test]
fn frames_writes_every_frame_as_png() {
    let dir = tempdir("frames");
    let status = bin()
        .arg("frames")
        .arg(corpus("files/examples_ybr_color.dcm"))
        .arg("--out")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    let n = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png")
        })
        .count();
    assert_eq!(n, 30);
    let img = image::open(dir.join("frame_0029.png")).unwrap();
    assert_eq!((img.width(), img.height()), (320, 240));
    assert!(img.as_rgb8().is_some(), "RGB as displayed");

    let gray_dir = tempdir("frames-gray");
    let status = bin()
        .arg("frames")
        .arg(corpus("files/OBXXXX1A.dcm"))
        .arg("--out")
        .arg(&gray_dir)
        .arg("--gray")
        .status()
        .unwrap();
    assert!(status.success());
    assert!(image::open(gray_dir.join("frame_0000.png"))
        .unwrap()
        .as_luma8()
        .is_some());
}

#[test]
fn frames_of_a_broken_file_is_exit_1_and_names_it() {
    let dir = tempdir("frames-bad");
    let out = bin()
        .arg("frames")
        .arg(corpus("bad/truncated_in_pixels.dcm"))
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated_in_pixels.dcm"));
}

#[test]
fn phantom_writes_cases_that_read_back() {
    let dir = tempdir("phantom");
    let status = bin()
        .args([
            "phantom", "--count", "2", "--seed", "40", "--size", "200x160", "--frames", "2",
            "--out",
        ])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    for name in ["phantom_0040", "phantom_0041"] {
        for ext in ["dcm", "truth.png", "clean.png", "truth.json"] {
            assert!(dir.join(format!("{name}.{ext}")).is_file(), "{name}.{ext}");
        }
    }
    let out = bin()
        .args(["info", "--json"])
        .arg(dir.join("phantom_0040.dcm"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["frames"], 2);
    assert_eq!(v[0]["calibration"], "ok");
}

#[test]
fn usage_errors_are_exit_2() {
    assert_eq!(bin().arg("frobnicate").status().unwrap().code(), Some(2));
    assert_eq!(
        bin()
            .args(["phantom", "--size", "banana", "--out", "/tmp/x"])
            .status()
            .unwrap()
            .code(),
        Some(2)
    );
    // An output folder that cannot be created.
    let out = bin()
        .arg("frames")
        .arg(corpus("files/OBXXXX1A.dcm"))
        .args(["--out", "/proc/sonoguide/nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/proc/sonoguide/nope"));
}

#[test]
fn despeckle_and_segment_give_inputs_that_share_a_name_their_own_folders() {
    let dir = tempdir("same-stem");
    for sub in ["a", "b"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        std::fs::copy(corpus("files/OBXXXX1A.dcm"), dir.join(sub).join("x.dcm")).unwrap();
    }
    for (command, marker) in [
        ("despeckle", "frame_0000.png"),
        ("segment", "frame_0000.labels.png"),
    ] {
        let out = dir.join(format!("out-{command}"));
        let status = bin()
            .arg(command)
            .arg(dir.join("a/x.dcm"))
            .arg(dir.join("b/x.dcm"))
            .args(["--backend", "cpu", "--out"])
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "{command}");
        assert!(
            out.join("x").join(marker).is_file(),
            "{command}: x/{marker}"
        );
        assert!(
            out.join("x_2").join(marker).is_file(),
            "{command}: x_2/{marker}"
        );
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["config"]["command"], command);
        assert_eq!(summary["files"].as_array().unwrap().len(), 2);
    }
}

/// `sonoguide bench --pipeline` on the CPU at 160x120 with `extra` arguments.
fn cpu_pipeline_bench(extra: &[&str]) -> std::process::Output {
    bin()
        .args([
            "bench",
            "--pipeline",
            "--backend",
            "cpu",
            "--size",
            "160x120",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn pipeline_bench_runs_streams_and_refuses_bad_counts() {
    let out = cpu_pipeline_bench(&["--repeats", "2", "--streams", "2", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &rows[0];
    assert_eq!(row["streams"], 2);
    assert!(row["throughput_frames_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        row["gpu_ms_per_frame"].is_null(),
        "no GPU time on the CPU path"
    );
    for bad in ["0", "65"] {
        let out = cpu_pipeline_bench(&["--repeats", "1", "--streams", bad]);
        assert!(!out.status.success(), "--streams {bad} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("streams"),
            "--streams {bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // --streams means threads through the pipeline: refused without --pipeline.
    let out = bin().args(["bench", "--streams", "2"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn conflicting_bench_flags_are_refused() {
    let out = bin()
        .args(["bench", "--pipeline", "--serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}
