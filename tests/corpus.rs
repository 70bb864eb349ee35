//! Every corpus file reads with the right pixels and calibration; every bad file is refused
//! cleanly (an error naming the file, no panic).

use std::path::{Path, PathBuf};

use serde_json::Value;
use sonoguide::dicom::{DicomFile, ReadOptions};
use sonoguide::Calibration;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom-corpus")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(corpus().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest json")
}

/// Tolerance for comparing calibration values taken from the header (f64 decimal strings and
/// floats round-trip within this).
const CALIBRATION_TOLERANCE: f64 = 1e-9;

/// The reference decode to compare a case with. `OBXXXX1A_expb.dcm` is `OBXXXX1A.dcm`
/// re-encoded as explicit VR big endian: the same image. pydicom's reference of it reads the
/// 16-bit palette LUT words with their bytes swapped (so its top 8 bits are the true low byte,
/// mostly 0: the picture is nearly black), which no viewer displays; the correct decode is the
/// little-endian file's, and `big_endian_reference_is_the_byte_swapped_palette` checks that
/// this is the whole difference.
fn reference_dir(case: &Value) -> String {
    let r = case["reference"].as_str().unwrap();
    if r.ends_with("OBXXXX1A_expb") {
        "reference/OBXXXX1A".to_string()
    } else {
        r.to_string()
    }
}

#[test]
fn big_endian_reference_is_the_byte_swapped_palette() {
    let le = image::open(corpus().join("reference/OBXXXX1A/frame_0000.png"))
        .unwrap()
        .to_rgb8();
    let be = image::open(corpus().join("reference/OBXXXX1A_expb/frame_0000.png"))
        .unwrap()
        .to_rgb8();
    // Every palette entry of this file is an 8-bit value shifted left by 8 (v << 8); with the
    // bytes swapped its top byte is 0. So the big-endian reference is black wherever the
    // true image is not, and equal where the true image is black.
    for (a, b) in le.as_raw().iter().zip(be.as_raw()) {
        assert_eq!(
            *b, 0,
            "pydicom's big-endian reference has a non-zero sample ({a} in the LE decode)"
        );
    }
    let file = DicomFile::open(
        corpus().join("files/OBXXXX1A_expb.dcm"),
        &ReadOptions::default(),
    )
    .unwrap();
    let (rgb, _) = file.decode_display(0).unwrap();
    assert!(
        rgb.unwrap().iter().any(|v| *v > 0),
        "the big-endian file decodes to a real image"
    );
}

#[test]
fn every_corpus_file_matches_its_reference_decode() {
    let m = manifest();
    let cases = m["cases"].as_array().expect("cases");
    assert!(cases.len() >= 9);
    for case in cases {
        let path = corpus().join(case["file"].as_str().unwrap());
        let file =
            DicomFile::open(&path, &ReadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        let info = file.info();
        assert_eq!(info.rows as u64, case["rows"].as_u64().unwrap(), "{path:?}");
        assert_eq!(
            info.columns as u64,
            case["columns"].as_u64().unwrap(),
            "{path:?}"
        );
        assert_eq!(
            info.frames as u64,
            case["frames"].as_u64().unwrap(),
            "{path:?}"
        );
        assert_eq!(
            info.transfer_syntax_uid,
            case["transfer_syntax_uid"].as_str().unwrap()
        );
        assert_eq!(
            info.photometric_interpretation,
            case["photometric_interpretation"].as_str().unwrap()
        );
        assert_eq!(info.sop_class_uid, case["sop_class_uid"].as_str().unwrap());
        let tolerance = case["max_abs_diff"].as_u64().unwrap() as i32;
        for f in case["reference_frames"].as_array().unwrap() {
            let k = f.as_u64().unwrap() as usize;
            let reference = corpus()
                .join(reference_dir(case))
                .join(format!("frame_{k:04}.png"));
            let want = image::open(&reference).expect("reference png").to_rgb8();
            let (rgb, gray) = file.decode_display(k).unwrap_or_else(|e| panic!("{e}"));
            let got: Vec<u8> = match rgb {
                Some(rgb) => rgb.iter().copied().collect(),
                None => gray.iter().flat_map(|v| [v.round() as u8; 3]).collect(),
            };
            assert_eq!(got.len(), want.as_raw().len(), "{path:?} frame {k}");
            let mut worst = 0;
            for (a, b) in got.iter().zip(want.as_raw()) {
                worst = worst.max((*a as i32 - *b as i32).abs());
            }
            assert!(
                worst <= tolerance,
                "{path:?} frame {k}: max abs diff {worst} > {tolerance}"
            );
        }
        // Calibration regions, item by item.
        let want_regions = case["ultrasound_regions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            info.ultrasound_regions.len(),
            want_regions.len(),
            "{path:?}"
        );
        for (got, want) in info.ultrasound_regions.iter().zip(&want_regions) {
            assert_eq!(got.min_x0, want["min_x0"].as_i64().unwrap());
            assert_eq!(got.max_y1, want["max_y1"].as_i64().unwrap());
            assert_eq!(got.spatial_format, want["spatial_format"].as_i64().unwrap());
            assert_eq!(got.units_x, want["units_x"].as_i64().unwrap());
            assert_eq!(got.reference_pixel_x0, want["reference_pixel_x0"].as_i64());
            assert!(
                (got.physical_delta_x - want["physical_delta_x"].as_f64().unwrap()).abs()
                    < CALIBRATION_TOLERANCE
            );
            match want.get("mm_per_px_x").and_then(|v| v.as_f64()) {
                Some(mm) => {
                    let g = got.mm_per_px_x.expect("mm per px");
                    assert!(
                        (g - mm).abs() < CALIBRATION_TOLERANCE,
                        "{path:?}: {g} vs {mm}"
                    );
                    let gy = got.mm_per_px_y.expect("mm per px y");
                    assert!(
                        (gy - want["mm_per_px_y"].as_f64().unwrap()).abs() < CALIBRATION_TOLERANCE
                    );
                }
                None => assert!(got.mm_per_px_x.is_none() || want["units_x"].as_i64() == Some(3)),
            }
        }
    }
}

#[test]
fn calibrated_files_report_mm_per_pixel_and_the_transducer_face() {
    let path = corpus().join("files/OBXXXX1A.dcm");
    let file = DicomFile::open(&path, &ReadOptions::default()).unwrap();
    match &file.info().calibration {
        Calibration::Ok {
            mm_per_px_x,
            mm_per_px_y,
            reference_px,
            ..
        } => {
            assert!((mm_per_px_x - 0.26228787661969977).abs() < CALIBRATION_TOLERANCE);
            assert!((mm_per_px_y - 0.26228787661969977).abs() < CALIBRATION_TOLERANCE);
            // Reference pixel (340, 36) relative to the region at (120, 60).
            assert_eq!(*reference_px, Some((460.0, 96.0)));
        }
        other => panic!("expected calibration, got {other:?}"),
    }
    let region = file.imaging_region().unwrap();
    assert_eq!((region.bounds.x0, region.bounds.y0), (120, 60));
    // A point 10 mm deep on the reference column.
    let (x_mm, y_mm) = file
        .info()
        .calibration
        .px_to_mm(460.0, 96.0 + 10.0 / 0.26228787661969977, 60.0)
        .unwrap();
    assert!(x_mm.abs() < 1e-9 && (y_mm - 10.0).abs() < 1e-9);
}

#[test]
fn colour_frames_carry_a_colour_mask_and_luma() {
    let path = corpus().join("files/examples_ybr_color.dcm");
    let file = DicomFile::open(&path, &ReadOptions::default()).unwrap();
    let frame = file.read_frame(3).unwrap();
    let rgb = frame.rgb.as_ref().expect("colour source keeps RGB");
    let mask = frame.colour_mask.as_ref().expect("colour mask");
    assert_eq!(mask.dim(), frame.intensity.dim());
    for ((y, x), v) in frame.intensity.indexed_iter().step_by(97) {
        let l = sonoguide::frame::luma(rgb[[y, x, 0]], rgb[[y, x, 1]], rgb[[y, x, 2]]);
        assert!((l - v).abs() < 1e-4);
    }
    // The YBR cine is a Doppler clip: it has coloured pixels, but most of it is grey.
    let coloured = mask.iter().filter(|v| **v != 0).count();
    assert!(
        coloured > 0 && coloured < mask.len() / 2,
        "{coloured} coloured of {}",
        mask.len()
    );
}

#[test]
fn frames_stream_one_at_a_time() {
    let path = corpus().join("files/examples_ybr_color.dcm");
    let file = DicomFile::open(&path, &ReadOptions::default()).unwrap();
    let mut n = 0;
    for (i, f) in file.frames().enumerate() {
        let f = f.unwrap();
        assert_eq!(f.index, i);
        n += 1;
    }
    assert_eq!(n, 30);
    assert!(file.read_frame(30).is_err());
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = corpus().join("bad");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        seen += 1;
        let result = DicomFile::open(&path, &ReadOptions::default())
            .and_then(|f| f.read_frame(0).map(|fr| (f, fr)));
        if name == "bad_calibration.dcm" {
            let (file, frame) = result.unwrap_or_else(|e| panic!("{name} should load: {e}"));
            assert_eq!(file.info().calibration.status(), "unusable", "{name}");
            assert_eq!(frame.calibration.status(), "unusable");
            continue;
        }
        let err = result
            .err()
            .unwrap_or_else(|| panic!("{name} was accepted"));
        let msg = err.to_string();
        assert!(
            msg.contains(&name),
            "{name}: error does not name the file: {msg}"
        );
        let expect = match name.as_str() {
            "empty.dcm" => "empty",
            "not_dicom.dcm" => "DICM",
            "truncated_in_header.dcm" => "past the end",
            "truncated_in_pixels.dcm" => "truncated",
            "absurd_dimensions.dcm" => "limit",
            "no_pixel_data.dcm" => "no pixel data",
            "bits_allocated_13.dcm" => "BitsAllocated",
            "samples_per_pixel_7.dcm" => "SamplesPerPixel",
            _ => "",
        };
        assert!(msg.contains(expect), "{name}: {msg}");
    }
    assert!(seen >= 9);
}

#[test]
fn configurable_limits_refuse_large_frames_before_decoding() {
    let path = corpus().join("files/US1_UNCR.dcm");
    let mut opts = ReadOptions::default();
    opts.max_frame_pixels = 640 * 480 - 1;
    let err = DicomFile::open(&path, &opts).unwrap_err().to_string();
    assert!(err.contains("limit"), "{err}");
}

#[test]
fn every_truncation_of_a_file_is_refused_without_panic() {
    let bytes = std::fs::read(corpus().join("files/OBXXXX1A_rle.dcm")).unwrap();
    let whole = DicomFile::from_bytes("whole.dcm", bytes.clone(), &ReadOptions::default())
        .and_then(|f| f.read_frame(0))
        .unwrap();
    // A cut may only go unnoticed when it removes nothing but the fragment's trailing pad
    // byte (fragments are padded to even length): then the pixels must be the whole file's.
    const PAD_BYTES: usize = 1;
    // Cut at many points, through the header, the regions sequence and the fragments.
    let mut refused = 0;
    for cut in (0..bytes.len())
        .step_by(997)
        .chain([bytes.len() - 1, bytes.len() - 7])
    {
        let r = DicomFile::from_bytes("cut.dcm", bytes[..cut].to_vec(), &ReadOptions::default())
            .and_then(|f| f.read_frame(0));
        match r {
            Err(e) => {
                assert!(e.to_string().contains("cut.dcm"), "{e}");
                refused += 1;
            }
            Ok(frame) => {
                assert!(
                    cut >= bytes.len() - PAD_BYTES,
                    "a file cut at {cut} of {} bytes was accepted",
                    bytes.len()
                );
                assert_eq!(frame.intensity, whole.intensity, "cut at {cut}");
            }
        }
    }
    assert!(refused > 1, "the cuts were refused");
}
