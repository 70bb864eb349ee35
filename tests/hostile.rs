//! Hostile DICOM files: each crafted file is refused with an error naming it (or, when it is
//! valid but odd, decoded correctly) by the library and by the `sonoguide frames` command,
//! quickly and within a memory bound; and every input the fuzzer (`examples/fuzz.rs`) saved
//! under `tests/data/fuzz-regressions/` replays without a panic.

#[path = "hostile/craft.rs"]
mod craft;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use craft::*;
use sonoguide::dicom::{DicomFile, ReadOptions};
use sonoguide::Calibration;

/// Peak resident memory allowed to `sonoguide frames` on any crafted file. The largest
/// legitimate allocation for these files is the deflate bomb's counting pass, which holds
/// nothing; 1 GiB is the bound the issue sets for a reader facing hostile input.
const MAX_PEAK_RSS_BYTES: u64 = 1 << 30;
/// Wall-clock time allowed per crafted file (library or command). The slowest case is the
/// inflate bomb, which inflates 512 MiB to count it (about a second optimised); the rest take
/// milliseconds. Generous for a loaded CI machine.
const MAX_SECONDS_PER_FILE: u64 = 30;
/// What the bomb inflates to: past the default `max_inflated_bytes` (512 MiB).
const BOMB_INFLATED_BYTES: u64 = 600 << 20;

/// What a crafted file must do.
enum Expect {
    /// Refused with an error naming the file and containing this text.
    Refused(&'static str),
    /// Read and every frame decoded; the check inspects the result.
    Decodes(fn(&DicomFile)),
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
}

fn explicit_file(elems: &[Elem]) -> Vec<u8> {
    part10(
        ts::EXPLICIT,
        US_IMAGE_STORAGE,
        &encode(elems, Enc::Explicit),
    )
}

fn with_ts(tsuid: &str, elems: &[Elem]) -> Vec<u8> {
    part10(tsuid, US_IMAGE_STORAGE, &encode(elems, Enc::Explicit))
}

/// A 16×16 8-bit palette image whose pixel (x, y) is `x` (0–15) with the given LUTs of 16
/// 16-bit entries.
fn palette_file(red: Lut, green: Lut, blue: Lut) -> Vec<u8> {
    let mut e = image_module(16, 16, 1, 8, "PALETTE COLOR");
    e.extend(palette([16, 0, 16], red, green, blue));
    e.push(native_pixels((0..256u32).map(|i| (i % 16) as u8).collect()));
    explicit_file(&e)
}

fn ramp16() -> Lut {
    Lut::Plain((0..16u16).map(|v| v << 12).collect())
}

/// The red LUT of the valid indirect palette: a discrete segment (4 entries), a linear one
/// (4), and an indirect segment replaying those two (8 more).
const VALID_INDIRECT_RED: [u16; 13] = [
    0, 4, 0x0000, 0x1000, 0x2000, 0x3000, 1, 4, 0x7000, 2, 2, 0, 0,
];

fn check_valid_indirect_palette(f: &DicomFile) {
    let (rgb, _) = f.decode_display(0).expect("decodes");
    let rgb = rgb.expect("palette colour is RGB");
    // Red: 00 10 20 30 (discrete), 40 50 60 70 (linear to 0x7000), then both replayed.
    let red: [u8; 16] = [
        0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60,
        0x70,
    ];
    for y in [0usize, 7, 15] {
        for x in 0..16 {
            let want = [red[x], (x as u8) << 4, (x as u8) << 4];
            let got = [rgb[[y, x, 0]], rgb[[y, x, 1]], rgb[[y, x, 2]]];
            assert_eq!(got, want, "pixel ({x},{y}) of value {x}");
        }
    }
}

/// A 64×64 MONOCHROME2 image covered by one tissue region of the given deltas (cm/px).
fn region_file(delta: [f64; 2]) -> Vec<u8> {
    let mut e = image_module(64, 64, 1, 8, "MONOCHROME2");
    e.push(regions(&[Region::tissue([0, 0, 63, 63], delta)]));
    e.push(native_pixels(
        (0..64 * 64u32).map(|i| (i % 200) as u8).collect(),
    ));
    explicit_file(&e)
}

fn unusable_calibration(f: &DicomFile, why: &str) {
    match &f.info().calibration {
        Calibration::Unusable { reason } => assert!(reason.contains(why), "{reason}"),
        other => panic!("calibration should be unusable ({why}), got {other:?}"),
    }
    let frame = f.read_frame(0).expect("the pixels are fine");
    assert!(frame.calibration.mm_per_px().is_none());
    assert!(frame.calibration.px_to_mm(1.0, 1.0, 0.0).is_none());
}

/// A 32×32 MONOCHROME2 image, RLE-encoded, whose pixel i is i mod 251.
fn rle_pixels() -> Vec<u8> {
    (0..32 * 32u32).map(|i| (i % 251) as u8).collect()
}

fn rle_file(frame: Vec<u8>) -> Vec<u8> {
    let mut e = image_module(32, 32, 1, 8, "MONOCHROME2");
    e.push(encapsulated_pixels(vec![frame]));
    with_ts(ts::RLE, &e)
}

/// Frame 0 of the corpus's JPEG cine, in a single-frame file (240×320 YBR_FULL_422).
fn jpeg_file(frame: Vec<u8>) -> Vec<u8> {
    let mut e = image_module(240, 320, 3, 8, "YBR_FULL_422");
    e.push(encapsulated_pixels(vec![frame]));
    with_ts(ts::JPEG_BASELINE, &e)
}

/// The corpus's JPEG 2000 frame in a file of its own (480×640 YBR_RCT).
fn j2k_file(frame: Vec<u8>) -> Vec<u8> {
    let mut e = image_module(480, 640, 3, 8, "YBR_RCT");
    e.push(encapsulated_pixels(vec![frame]));
    with_ts(ts::J2K_LOSSLESS, &e)
}

fn jpeg_frame() -> Vec<u8> {
    let f = corpus_fragments("examples_ybr_color.dcm");
    f.into_iter()
        .next()
        .expect("the JPEG corpus file has fragments")
}

/// The corpus's JPEG 2000 frame: one frame in three fragments.
fn j2k_frame() -> Vec<u8> {
    let f = corpus_fragments("US1_J2KR.dcm").concat();
    assert!(!f.is_empty(), "the JPEG 2000 corpus file has fragments");
    f
}

/// Offset of the first occurrence of `pat` in `b`.
fn find(b: &[u8], pat: &[u8]) -> usize {
    b.windows(pat.len())
        .position(|w| w == pat)
        .expect("pattern present")
}

fn cases() -> Vec<Case> {
    let mut v = vec![
        // Palettes.
        Case {
            name: "palette_self_reference.dcm",
            // The first segment is indirect and points at offset 0: itself.
            bytes: palette_file(Lut::Segmented(vec![2, 1, 0, 0]), ramp16(), ramp16()),
            expect: Expect::Refused("not the start of an earlier segment"),
        },
        Case {
            name: "palette_indirect_cycle.dcm",
            // Two indirect segments pointing at each other (byte 14 = word 7, byte 6 = word 3).
            bytes: palette_file(
                Lut::Segmented(vec![0, 1, 5, 2, 1, 14, 0, 2, 1, 6, 0]),
                ramp16(),
                ramp16(),
            ),
            expect: Expect::Refused("not the start of an earlier segment"),
        },
        Case {
            name: "palette_indirect_to_indirect.dcm",
            bytes: palette_file(
                Lut::Segmented(vec![0, 1, 5, 2, 1, 0, 0, 2, 1, 6, 0]),
                ramp16(),
                ramp16(),
            ),
            expect: Expect::Refused("refers to the indirect segment"),
        },
        Case {
            name: "palette_valid_indirect.dcm",
            bytes: palette_file(
                Lut::Segmented(VALID_INDIRECT_RED.to_vec()),
                ramp16(),
                ramp16(),
            ),
            expect: Expect::Decodes(check_valid_indirect_palette),
        },
        // Deflate.
        Case {
            name: "deflate_bomb.dcm",
            bytes: part10(
                ts::DEFLATED,
                US_IMAGE_STORAGE,
                &deflate_bomb(BOMB_INFLATED_BYTES),
            ),
            expect: Expect::Refused("inflates past the limit"),
        },
    ];
    {
        // Deep nesting hidden inside a deflated data set, where the pre-scan used not to look.
        let mut e = image_module(8, 8, 1, 8, "MONOCHROME2");
        e.push(Elem {
            tag: (0x0040, 0x0260),
            vr: *b"SQ",
            value: V::RawUndefined(nested_sequence_content(5_000)),
        });
        e.push(native_pixels(vec![0; 64]));
        v.push(Case {
            name: "deflated_nested_5000.dcm",
            bytes: part10(
                ts::DEFLATED,
                US_IMAGE_STORAGE,
                &deflate_stored(&encode(&e, Enc::Explicit)),
            ),
            expect: Expect::Refused("nested deeper"),
        });
    }

    {
        // A valid deflated data set (stored blocks) decodes like the file it came from.
        let mut e = image_module(16, 16, 1, 8, "MONOCHROME2");
        e.push(native_pixels((0..256u32).map(|i| i as u8).collect()));
        v.push(Case {
            name: "deflated_valid.dcm",
            bytes: part10(
                ts::DEFLATED,
                US_IMAGE_STORAGE,
                &deflate_stored(&encode(&e, Enc::Explicit)),
            ),
            expect: Expect::Decodes(|f| {
                let fr = f.read_frame(0).expect("decodes");
                assert!((fr.intensity[[15, 15]] - 255.0).abs() < 1e-3);
                assert!((fr.intensity[[1, 2]] - 18.0).abs() < 1e-3);
            }),
        });
    }
    {
        // Deflated Image Frame Compression: one frame that inflates exactly, one that
        // inflates past its 256 bytes (a bomb), one cut short.
        let frame: Vec<u8> = (0..256u32).map(|i| (255 - i) as u8).collect();
        let file = |frags: Vec<Vec<u8>>| {
            let mut e = image_module(16, 16, 1, 8, "MONOCHROME2");
            e.push(number_of_frames(&frags.len().to_string()));
            e.push(encapsulated_pixels(frags));
            with_ts(ts::DEFLATED_FRAMES, &e)
        };
        v.push(Case {
            name: "deflated_frames_valid.dcm",
            bytes: file(vec![deflate_stored(&frame), deflate_stored(&frame)]),
            expect: Expect::Decodes(|f| {
                let fr = f.read_frame(1).expect("decodes");
                assert!((fr.intensity[[0, 0]] - 255.0).abs() < 1e-3);
                assert!((fr.intensity[[15, 15]]).abs() < 1e-3);
            }),
        });
        v.push(Case {
            name: "deflated_frames_bomb.dcm",
            bytes: file(vec![deflate_bomb(BOMB_INFLATED_BYTES)]),
            expect: Expect::Refused("inflates past its 256 bytes"),
        });
        let z = deflate_stored(&frame);
        v.push(Case {
            name: "deflated_frames_truncated.dcm",
            bytes: file(vec![z[..z.len() / 2].to_vec()]),
            expect: Expect::Refused("inflate"),
        });
    }

    // Sizes and counts.
    {
        let mut e = image_module(65_535, 65_535, 1, 8, "MONOCHROME2");
        e.push(native_pixels(vec![0; 64]));
        v.push(Case {
            name: "absurd_rows_columns.dcm",
            bytes: explicit_file(&e),
            expect: Expect::Refused("limit"),
        });
    }
    {
        let mut e = image_module(8, 8, 1, 8, "MONOCHROME2");
        e.push(number_of_frames("2147483647"));
        e.push(native_pixels(vec![0; 64]));
        v.push(Case {
            name: "absurd_frame_count.dcm",
            bytes: explicit_file(&e),
            expect: Expect::Refused("limit"),
        });
    }
    {
        // Within the frame limit, but the pixel data holds one frame.
        let mut e = image_module(8, 8, 1, 8, "MONOCHROME2");
        e.push(number_of_frames("30000"));
        e.push(native_pixels(vec![0; 64]));
        v.push(Case {
            name: "frames_beyond_pixel_data.dcm",
            bytes: explicit_file(&e),
            expect: Expect::Refused("truncated"),
        });
    }
    {
        let mut e = image_module(240, 320, 3, 8, "YBR_FULL_422");
        e.push(number_of_frames("30000"));
        e.push(encapsulated_pixels(vec![jpeg_frame()]));
        v.push(Case {
            name: "frames_beyond_fragments.dcm",
            bytes: with_ts(ts::JPEG_BASELINE, &e),
            expect: Expect::Refused("fragment"),
        });
    }

    // Nesting and lengths.
    {
        let mut e = image_module(8, 8, 1, 8, "MONOCHROME2");
        e.push(Elem {
            tag: (0x0040, 0x0260),
            vr: *b"SQ",
            value: V::RawUndefined(nested_sequence_content(5_000)),
        });
        e.push(native_pixels(vec![0; 64]));
        v.push(Case {
            name: "nested_sequences_5000.dcm",
            bytes: explicit_file(&e),
            expect: Expect::Refused("nested deeper"),
        });
    }
    for (depth, name, expect) in [
        // 32 sequences (64 open containers, each item counting one) is the most accepted;
        // parsed by dicom-rs's recursion on this test thread's 2 MiB stack.
        (
            32,
            "nested_sequences_32.dcm",
            Expect::Decodes(|f| assert_eq!(f.frame_count(), 1)),
        ),
        (
            33,
            "nested_sequences_33.dcm",
            Expect::Refused("nested deeper"),
        ),
    ] {
        let mut e = image_module(8, 8, 1, 8, "MONOCHROME2");
        e.push(Elem {
            tag: (0x0040, 0x0260),
            vr: *b"SQ",
            value: V::RawUndefined(nested_sequence_content(depth)),
        });
        e.push(native_pixels(vec![0; 64]));
        v.push(Case {
            name,
            bytes: explicit_file(&e),
            expect,
        });
    }
    {
        // Implicit VR with every length defined: only the dictionary marks the sequences.
        let e = image_module(8, 8, 1, 8, "MONOCHROME2");
        let mut ds = encode(&e, Enc::Implicit);
        ds.extend(nested_implicit_defined(5_000));
        ds.extend(encode(&[native_pixels(vec![0; 64])], Enc::Implicit));
        v.push(Case {
            name: "nested_implicit_5000.dcm",
            bytes: part10(ts::IMPLICIT, US_IMAGE_STORAGE, &ds),
            expect: Expect::Refused("nested deeper"),
        });
    }
    {
        let mut e = image_module(8, 8, 1, 8, "MONOCHROME2");
        e.push(Elem {
            tag: (0x0009, 0x0010),
            vr: *b"UN",
            value: V::RawWithLength(0xFFFF_FFF0, vec![0; 16]),
        });
        e.push(native_pixels(vec![0; 64]));
        v.push(Case {
            name: "length_fffffff0.dcm",
            bytes: explicit_file(&e),
            expect: Expect::Refused("claims 4294967280 bytes"),
        });
    }

    {
        // A VR dicom-rs does not know: it reads a 4-byte length (here 0xFFFCFFFC) after two
        // reserved bytes, which a 2-byte reading of the header would miss.
        let mut e = image_module(8, 8, 1, 8, "MONOCHROME2");
        e.push(Elem {
            tag: (0x0009, 0x0011),
            vr: [0, 0],
            value: V::RawWithLength(0xFFFC_FFFC, vec![0; 16]),
        });
        e.push(native_pixels(vec![0; 64]));
        v.push(Case {
            name: "unknown_vr_length.dcm",
            bytes: explicit_file(&e),
            expect: Expect::Refused("claims 4294770684 bytes"),
        });
    }
    {
        // The same in the file meta group: dicom-rs allocates and zero-fills a UID's length
        // before reading it, so 'TI' for 'UI' cost 775 MB before the check (fuzz finding).
        let good = explicit_file(&[native_pixels(vec![0; 4])]);
        let mut b = good.clone();
        let at = find(&b, &[0x02, 0x00, 0x02, 0x00, b'U', b'I']);
        b[at + 4] = b'T';
        v.push(Case {
            name: "meta_unknown_vr.dcm",
            bytes: b,
            expect: Expect::Refused("past the end of the file"),
        });
        // A group length past the meta group: dicom-rs reads on into the data set as meta.
        let mut b = good;
        b[140..144].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        v.push(Case {
            name: "meta_group_length_lies.dcm",
            bytes: b,
            expect: Expect::Refused("file meta group"),
        });
    }

    // JPEG.
    {
        let f = jpeg_frame();
        v.push(Case {
            name: "jpeg_truncated.dcm",
            bytes: jpeg_file(f[..f.len() / 2].to_vec()),
            expect: Expect::Refused("truncated"),
        });
        v.push(Case {
            name: "jpeg_cut_in_header.dcm",
            bytes: jpeg_file(f[..40].to_vec()),
            expect: Expect::Refused("JPEG"),
        });
        let mut rng = Rng::new(7);
        v.push(Case {
            name: "jpeg_garbage.dcm",
            bytes: jpeg_file(rng.bytes(f.len())),
            expect: Expect::Refused("SOI"),
        });
        // The frame header claims 65535×65535: jpeg-decoder would size its buffers from it.
        let mut big = f.clone();
        let sof = find(&big, &[0xFF, 0xC0]);
        big[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
        v.push(Case {
            name: "jpeg_absurd_size.dcm",
            bytes: jpeg_file(big),
            expect: Expect::Refused("JPEG header declares 65535x65535"),
        });
    }

    // JPEG 2000.
    {
        let f = j2k_frame();
        v.push(Case {
            name: "j2k_truncated.dcm",
            bytes: j2k_file(f[..f.len() / 2].to_vec()),
            expect: Expect::Refused("truncated"),
        });
        v.push(Case {
            name: "j2k_cut_in_header.dcm",
            bytes: j2k_file(f[..30].to_vec()),
            expect: Expect::Refused("SIZ"),
        });
        let mut rng = Rng::new(11);
        v.push(Case {
            name: "j2k_garbage.dcm",
            bytes: j2k_file(rng.bytes(f.len())),
            expect: Expect::Refused("SOC"),
        });
        // SIZ: 60000×60000 in 1×1 tiles.
        let mut big = f.clone();
        for k in [0usize, 1] {
            big[8 + 4 * k..12 + 4 * k].copy_from_slice(&60_000u32.to_be_bytes());
        }
        for k in [4usize, 5] {
            big[8 + 4 * k..12 + 4 * k].copy_from_slice(&1u32.to_be_bytes());
        }
        v.push(Case {
            name: "j2k_absurd_size.dcm",
            bytes: j2k_file(big),
            expect: Expect::Refused("tiles"),
        });
    }

    // RLE.
    {
        let frame = rle_frame(&[rle_pixels()]);
        v.push(Case {
            name: "rle_valid.dcm",
            bytes: rle_file(frame.clone()),
            expect: Expect::Decodes(|f| {
                let fr = f.read_frame(0).expect("decodes");
                let want = rle_pixels();
                for (i, v) in fr.intensity.iter().enumerate() {
                    assert!((*v - want[i] as f32).abs() < 1e-3, "pixel {i}: {v}");
                }
            }),
        });
        v.push(Case {
            name: "rle_truncated.dcm",
            bytes: rle_file(frame[..frame.len() / 2].to_vec()),
            expect: Expect::Refused("truncated"),
        });
        let mut rng = Rng::new(13);
        v.push(Case {
            name: "rle_garbage.dcm",
            bytes: rle_file(rng.bytes(frame.len())),
            expect: Expect::Refused("RLE"),
        });
        let mut absurd = frame.clone();
        absurd[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        v.push(Case {
            name: "rle_absurd_segment_count.dcm",
            bytes: rle_file(absurd),
            expect: Expect::Refused("segments"),
        });
        let mut past = frame;
        past[4..8].copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        v.push(Case {
            name: "rle_offset_past_end.dcm",
            bytes: rle_file(past),
            expect: Expect::Refused("RLE segment 0 spans"),
        });
    }

    // Calibration.
    v.push(Case {
        name: "delta_nan.dcm",
        bytes: region_file([f64::NAN, 0.01]),
        expect: Expect::Decodes(|f| unusable_calibration(f, "not finite")),
    });
    v.push(Case {
        name: "delta_huge.dcm",
        bytes: region_file([1e300, 1e300]),
        expect: Expect::Decodes(|f| unusable_calibration(f, "implausible")),
    });
    v.push(Case {
        name: "delta_overflowing.dcm",
        bytes: region_file([f64::MAX, 0.01]),
        expect: Expect::Decodes(|f| unusable_calibration(f, "not finite")),
    });
    v.push(Case {
        name: "delta_negative.dcm",
        bytes: region_file([-0.01, 0.01]),
        expect: Expect::Decodes(|f| unusable_calibration(f, "not positive")),
    });
    v
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sonoguide-hostile-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch folder");
    d
}

#[test]
fn crafted_files_are_refused_or_decoded_by_the_library() {
    let dir = scratch("lib");
    for case in cases() {
        let path = dir.join(case.name);
        std::fs::write(&path, &case.bytes).expect("write crafted file");
        let start = Instant::now();
        let result = DicomFile::open(&path, &ReadOptions::default()).and_then(|f| {
            for frame in f.frames() {
                frame?;
            }
            Ok(f)
        });
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(MAX_SECONDS_PER_FILE),
            "{}: took {took:?}",
            case.name
        );
        match (&case.expect, result) {
            (Expect::Refused(what), Err(e)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(case.name),
                    "{}: error does not name the file: {msg}",
                    case.name
                );
                assert!(
                    msg.contains(what),
                    "{}: expected '{what}' in: {msg}",
                    case.name
                );
            }
            (Expect::Refused(what), Ok(_)) => {
                panic!("{} was accepted (expected refusal: {what})", case.name)
            }
            (Expect::Decodes(check), Ok(f)) => check(&f),
            (Expect::Decodes(_), Err(e)) => panic!("{} should decode: {e}", case.name),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn crafting_reproduces_the_corpus_codecs() {
    // The crafted JPEG, JPEG 2000 and RLE files are built from whole frames that decode, so
    // their hostile variants fail for the reason given, not for a crafting mistake.
    for (name, bytes) in [
        ("jpeg_whole.dcm", jpeg_file(jpeg_frame())),
        ("j2k_whole.dcm", j2k_file(j2k_frame())),
    ] {
        let f = DicomFile::from_bytes(name, bytes, &ReadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        f.read_frame(0).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Peak resident set of a finished child, in bytes, and how it was measured.
struct Run {
    code: Option<i32>,
    stderr: String,
    peak_rss: Option<u64>,
    took: Duration,
}

/// Runs `sonoguide frames FILE --out DIR`, under `/usr/bin/time -v` when it exists (GNU time
/// reports the child's peak RSS from `wait4`, exactly); otherwise the child's VmHWM is
/// sampled from /proc while it runs (a lower bound). Killed after `MAX_SECONDS_PER_FILE`.
fn run_frames(file: &Path, out: &Path) -> Run {
    let exe = env!("CARGO_BIN_EXE_sonoguide");
    let gnu_time = Path::new("/usr/bin/time").exists()
        && Command::new("/usr/bin/time")
            .args(["-v", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let mut cmd = if gnu_time {
        let mut c = Command::new("/usr/bin/time");
        c.arg("-v").arg(exe);
        c
    } else {
        Command::new(exe)
    };
    cmd.arg("frames")
        .arg(file)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("run sonoguide");
    let stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut s);
        s
    });
    let mut sampled = 0u64;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if !gnu_time {
            sampled = sampled.max(vm_hwm(child.id()).unwrap_or(0));
        }
        if start.elapsed() > Duration::from_secs(MAX_SECONDS_PER_FILE) {
            kill_tree(child.id());
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{}: still running after {MAX_SECONDS_PER_FILE} s",
                file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let took = start.elapsed();
    let stderr = reader.join().unwrap_or_default();
    let peak_rss = if gnu_time {
        stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes):"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    } else {
        (sampled > 0).then_some(sampled)
    };
    Run {
        code: status.code(),
        stderr,
        peak_rss,
        took,
    }
}

/// VmHWM (peak resident set) of a process, in bytes.
fn vm_hwm(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Kills the children of `pid` (the command under `/usr/bin/time`), by their ids.
fn kill_tree(pid: u32) {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in children.split_whitespace() {
        let _ = Command::new("kill").arg("-9").arg(c).status();
    }
}

#[test]
fn crafted_files_through_the_command_line() {
    let dir = scratch("cli");
    let mut report = Vec::new();
    for case in cases() {
        let path = dir.join(case.name);
        std::fs::write(&path, &case.bytes).expect("write crafted file");
        let out = dir.join(format!("{}.out", case.name));
        let run = run_frames(&path, &out);
        let name = case.name;
        assert!(
            !run.stderr.contains("panicked"),
            "{name}: panic in the command: {}",
            run.stderr
        );
        assert!(
            !matches!(run.code, Some(101) | Some(134) | None),
            "{name}: exit {:?} (panic, abort or signal): {}",
            run.code,
            run.stderr
        );
        match case.expect {
            Expect::Refused(_) => {
                assert_eq!(run.code, Some(1), "{name}: {}", run.stderr);
                assert!(
                    run.stderr.contains(name),
                    "{name}: stderr does not name the file: {}",
                    run.stderr
                );
            }
            Expect::Decodes(_) => {
                assert_eq!(run.code, Some(0), "{name}: {}", run.stderr);
                assert!(
                    out.join("frame_0000.png").exists(),
                    "{name}: no frame written"
                );
            }
        }
        assert!(
            run.took < Duration::from_secs(MAX_SECONDS_PER_FILE),
            "{name}: took {:?}",
            run.took
        );
        let peak = run.peak_rss.expect("peak RSS measured");
        assert!(
            peak < MAX_PEAK_RSS_BYTES,
            "{name}: peak RSS {} MiB ≥ {} MiB",
            peak >> 20,
            MAX_PEAK_RSS_BYTES >> 20
        );
        report.push(format!(
            "{name}: exit {:?}, {:.2} s, peak {} MiB",
            run.code,
            run.took.as_secs_f64(),
            peak >> 20
        ));
    }
    eprintln!("{}", report.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

thread_local! {
    /// Panics raised on this thread (counted by the hook installed in the replay test, even
    /// those the library contains).
    static PANICS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[test]
fn fuzz_regressions_replay_without_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-regressions");
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.with(|p| p.set(p.get() + 1));
        previous(info);
    }));
    let mut replayed = 0;
    let mut contained = Vec::new();
    let Ok(targets) = std::fs::read_dir(&root) else {
        return;
    };
    for target in targets.flatten() {
        if !target.path().is_dir() {
            continue;
        }
        let target_name = target.file_name().to_string_lossy().to_string();
        for input in std::fs::read_dir(target.path())
            .expect("regression folder")
            .flatten()
        {
            let path = input.path();
            if path.extension().is_none_or(|e| e != "bin") {
                continue;
            }
            let bytes = std::fs::read(&path).expect("regression input");
            let before = PANICS.with(|p| p.get());
            let verdict = std::panic::catch_unwind(|| run_input(&target_name, bytes));
            let panics = PANICS.with(|p| p.get()) - before;
            let verdict = verdict.unwrap_or_else(|_| panic!("{}: panicked", path.display()));
            assert!(
                !matches!(verdict, Verdict::Unnamed(_)),
                "{}: {verdict:?}",
                path.display()
            );
            if !IGTL_TARGETS.contains(&target_name.as_str()) {
                // The command too, within the memory and time bounds.
                let out =
                    std::env::temp_dir().join(format!("sonoguide-replay-{}", std::process::id()));
                let run = run_frames(&path, &out);
                let _ = std::fs::remove_dir_all(&out);
                assert!(
                    matches!(run.code, Some(0) | Some(1)) && !run.stderr.contains("panicked"),
                    "{}: exit {:?}: {}",
                    path.display(),
                    run.code,
                    run.stderr
                );
                let peak = run.peak_rss.expect("peak RSS measured");
                assert!(
                    peak < MAX_PEAK_RSS_BYTES,
                    "{}: peak RSS {} MiB",
                    path.display(),
                    peak >> 20
                );
            }
            if panics > 0 {
                // A third-party decoder panicked and the reader turned it into this frame's
                // error: clean for the caller, but worth knowing.
                contained.push(path.display().to_string());
            }
            replayed += 1;
        }
    }
    eprintln!(
        "replayed {replayed} fuzz regression input(s); decoder panics contained by the reader: {contained:?}"
    );
}
