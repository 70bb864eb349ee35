//! DICOM SEG output: `process` writes one per input; dciodvfy finds no error in it; it decodes
//! (here, bit by bit, and with highdicom) to exactly the labels of `labels.png`; odd frame sizes
//! pack bits across frames; empty label maps and `--no-seg` write none.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_dictionary_std::tags;
use dicom_object::open_file;
use ndarray::Array2;
use sonoguide::dicom::seg::{SegOutcome, SegSource, SegWriter};
use sonoguide::dicom::write::{derived_identity, write_us_image, Colour, UsImage};
use sonoguide::frame::Rect;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sonoguide"))
}

fn sample_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sample-data")
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sonoguide-seg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A SEG decoded by hand: per source frame (1-based number), the label map rebuilt from the
/// segments (segment number → label code by the segment's label).
fn decode(path: &Path) -> (Vec<u32>, Vec<Array2<u8>>) {
    let obj = open_file(path).unwrap();
    let int = |tag| -> usize { obj.element(tag).unwrap().to_int::<u32>().unwrap() as usize };
    let (rows, cols, n) = (
        int(tags::ROWS),
        int(tags::COLUMNS),
        int(tags::NUMBER_OF_FRAMES),
    );
    assert_eq!(int(tags::BITS_ALLOCATED), 1);
    let names = [
        "tendon",
        "bone surface",
        "acoustic shadow",
        "joint space / effusion",
        "vessel",
        "nerve",
    ];
    let mut code_of = std::collections::HashMap::new();
    for item in obj
        .element(tags::SEGMENT_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()
    {
        let number = item
            .element(tags::SEGMENT_NUMBER)
            .unwrap()
            .to_int::<u16>()
            .unwrap();
        let label = item.element(tags::SEGMENT_LABEL).unwrap().to_str().unwrap();
        let code = names
            .iter()
            .position(|n| *n == label.trim_end())
            .unwrap_or_else(|| panic!("unknown segment {label}")) as u8
            + 1;
        code_of.insert(number, code);
    }
    let pixels = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    let bits = rows * cols * n;
    assert_eq!(
        pixels.len(),
        bits.div_ceil(8) + bits.div_ceil(8) % 2,
        "only the total is padded, to even length"
    );
    let mut numbers: Vec<u32> = Vec::new();
    let mut maps: Vec<Array2<u8>> = Vec::new();
    let per_frame = obj
        .element(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .unwrap()
        .items()
        .unwrap();
    assert_eq!(per_frame.len(), n);
    for (f, fg) in per_frame.iter().enumerate() {
        let segment = fg
            .element(tags::SEGMENT_IDENTIFICATION_SEQUENCE)
            .unwrap()
            .items()
            .unwrap()[0]
            .element(tags::REFERENCED_SEGMENT_NUMBER)
            .unwrap()
            .to_int::<u16>()
            .unwrap();
        let source = &fg
            .element(tags::DERIVATION_IMAGE_SEQUENCE)
            .unwrap()
            .items()
            .unwrap()[0]
            .element(tags::SOURCE_IMAGE_SEQUENCE)
            .unwrap()
            .items()
            .unwrap()[0];
        assert_eq!(
            source
                .element(tags::SPATIAL_LOCATIONS_PRESERVED)
                .unwrap()
                .to_str()
                .unwrap()
                .trim(),
            "YES"
        );
        let number = source
            .element(tags::REFERENCED_FRAME_NUMBER)
            .ok()
            .map(|e| e.to_int::<u32>().unwrap())
            .unwrap_or(1);
        let slot = match numbers.iter().position(|&k| k == number) {
            Some(i) => i,
            None => {
                numbers.push(number);
                maps.push(Array2::zeros((rows, cols)));
                numbers.len() - 1
            }
        };
        for i in 0..rows * cols {
            let bit = f * rows * cols + i;
            if pixels[bit / 8] >> (bit % 8) & 1 == 1 {
                let cell = &mut maps[slot][(i / cols, i % cols)];
                assert_eq!(*cell, 0, "segments overlap at frame {number} pixel {i}");
                *cell = code_of[&segment];
            }
        }
    }
    (numbers, maps)
}

fn png_labels(path: &Path) -> Array2<u8> {
    let img = image::open(path).unwrap().to_luma8();
    Array2::from_shape_vec(
        (img.height() as usize, img.width() as usize),
        img.into_raw(),
    )
    .unwrap()
}

fn dciodvfy_errors(path: &Path) -> Option<Vec<String>> {
    let tool = common::find_tool("seg: dciodvfy", "dciodvfy", "Debian package dicom3tools")?;
    let o = Command::new(tool).arg(path).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Some(
        text.lines()
            .filter(|l| l.starts_with("Error"))
            .map(str::to_string)
            .collect(),
    )
}

fn highdicom_check(args: &[&std::ffi::OsStr]) {
    if !common::python_has("seg: highdicom read-back", &["highdicom", "PIL", "numpy"]) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seg_check.py");
    let o = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "highdicom read-back: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn process_writes_a_seg_per_sample_that_validators_and_highdicom_read_back() {
    let out = temp("process");
    let o = bin()
        .args(["process", "--backend", "cpu", "--out"])
        .arg(&out)
        .arg(sample_data())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(sample_data()).unwrap() {
        let src = entry.unwrap().path();
        if src.extension().is_none_or(|e| e != "dcm") {
            continue;
        }
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let dir = out.join(&stem);
        let seg = dir.join(format!("{stem}.seg.dcm"));
        let mut pngs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".labels.png"))
            .collect();
        pngs.sort();
        // Bit by bit, here: every frame, every pixel.
        let (numbers, maps) = decode(&seg);
        assert_eq!(numbers, (1..=pngs.len() as u32).collect::<Vec<_>>());
        for (png, map) in pngs.iter().zip(&maps) {
            assert_eq!(&png_labels(png), map, "{}", png.display());
        }
        // The summary names the file and its segments.
        let file = summary["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| {
                f["path"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("{stem}.dcm"))
            })
            .unwrap();
        assert_eq!(file["seg"]["file"], format!("{stem}.seg.dcm"));
        assert!(!file["seg"]["segments"].as_array().unwrap().is_empty());
        if let Some(errors) = dciodvfy_errors(&seg) {
            assert!(
                errors.is_empty(),
                "dciodvfy on {}: {errors:?}",
                seg.display()
            );
        }
        let mut args: Vec<&std::ffi::OsStr> = vec![seg.as_os_str(), src.as_os_str()];
        args.extend(pngs.iter().map(|p| p.as_os_str()));
        highdicom_check(&args);
        checked += 1;
    }
    assert!(checked >= 4, "{checked} sample files");
    let _ = std::fs::remove_dir_all(&out);
}

/// A source cine to derive from: `frames` frames of `w × h`.
fn source_cine(path: &Path, w: usize, h: usize, frames: usize) -> dicom_object::DefaultDicomObject {
    let (identity, _) = derived_identity(&dicom_object::InMemDicomObject::new_empty(), "source");
    let image = UsImage::new(
        w,
        h,
        Colour::Gray,
        vec![vec![90u8; w * h]; frames],
        Some((0.2, 0.2)),
        Rect {
            x0: 0,
            y0: 0,
            x1: w,
            y1: h,
        },
        (0, 0),
        identity,
    );
    write_us_image(path, &image).unwrap();
    open_file(path).unwrap()
}

#[test]
fn odd_frame_sizes_pack_bits_across_frames() {
    // 7 x 5 = 35 pixels per frame: every frame after the first starts inside a byte.
    let dir = temp("odd");
    let (w, h, frames) = (7, 5, 3);
    let src_path = dir.join("source.dcm");
    let src = source_cine(&src_path, w, h, frames);
    let (identity, _) = derived_identity(&src, "seg");
    let seg_path = dir.join("odd.seg.dcm");
    let mut writer =
        SegWriter::create(&seg_path, w, h, identity, SegSource::of(&src, true)).unwrap();
    let mut all = Vec::new();
    let mut maps = Vec::new();
    for f in 0..frames {
        // Every label, in a pattern that differs per frame (tendon absent from frame 0).
        let map = Array2::from_shape_fn((h, w), |(y, x)| ((x + 2 * y + f) % 7) as u8);
        all.extend(map.iter().copied());
        maps.push(map);
        writer.push(f as u32 + 1, &maps[f]).unwrap();
    }
    assert!(matches!(writer.finish().unwrap(), SegOutcome::Written(s) if s.len() == 6));
    let (numbers, decoded) = decode(&seg_path);
    assert_eq!(numbers, vec![1, 2, 3]);
    assert_eq!(decoded, maps);
    if let Some(errors) = dciodvfy_errors(&seg_path) {
        assert!(errors.is_empty(), "dciodvfy: {errors:?}");
    }
    let raw = dir.join("labels.bin");
    std::fs::write(&raw, &all).unwrap();
    let dims = [frames.to_string(), h.to_string(), w.to_string()];
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--raw".as_ref(),
        seg_path.as_os_str(),
        src_path.as_os_str(),
        raw.as_os_str(),
    ];
    args.extend(dims.iter().map(std::ffi::OsStr::new));
    highdicom_check(&args);
    // No temporary or spool file is left beside the output.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn empty_labels_write_no_seg_and_bad_input_is_refused() {
    let dir = temp("empty");
    let src = source_cine(&dir.join("source.dcm"), 4, 4, 1);
    let (identity, _) = derived_identity(&src, "seg");
    let seg_path = dir.join("empty.seg.dcm");
    let mut writer = SegWriter::create(
        &seg_path,
        4,
        4,
        identity.clone(),
        SegSource::of(&src, false),
    )
    .unwrap();
    writer.push(1, &Array2::zeros((4, 4))).unwrap();
    // A map of the wrong size, and an unknown label code, are errors naming the file.
    let e = writer
        .push(2, &Array2::zeros((3, 4)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty.seg.dcm"), "{e}");
    let e = writer
        .push(2, &Array2::from_elem((4, 4), 9u8))
        .unwrap_err()
        .to_string();
    assert!(e.contains("label code 9"), "{e}");
    assert_eq!(writer.finish().unwrap(), SegOutcome::Empty);
    assert!(!seg_path.exists());
    // An output folder that does not exist: an error naming it, nothing written.
    let missing = dir.join("no/such/folder/x.seg.dcm");
    let e = SegWriter::create(&missing, 4, 4, identity, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no/such/folder"), "{e}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["source.dcm".to_string()]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_seg_writes_none() {
    let out = temp("noseg");
    let o = bin()
        .args(["process", "--no-seg", "--backend", "cpu", "--out"])
        .arg(&out)
        .arg(sample_data().join("linear_0002.dcm"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("linear_0002/linear_0002.overlay.dcm").exists());
    assert!(!out.join("linear_0002/linear_0002.seg.dcm").exists());
    let _ = std::fs::remove_dir_all(&out);
}
