//! A fuzzer for the DICOM reader (and the OpenIGTLink parsers) that runs on stable Rust.
//!
//! ```sh
//! cargo run --release --example fuzz -- --minutes 10              # every target, 10 min in all
//! cargo run --release --example fuzz -- --seconds 120 --seed 7    # a CI-sized run
//! cargo run --release --example fuzz -- --iterations 2000 --target palette
//! ```
//!
//! Targets: `mutate` (mutations of the corpus and sample files: bit flips, insertions,
//! deletions, truncations, corrupted lengths, swapped tags, nested sequences, header fields,
//! transfer syntax relabels),
//! `palette` (segmented palettes), `rle` (RLE headers and segments), `jpeg` and `j2k`
//! (mutated code streams of the corpus's JPEG and JPEG 2000 frames, and headers claiming
//! absurd sizes), `deflate` (deflated data sets and Deflated Image Frame Compression frames,
//! bombs among them), `regions` (Sequences of Ultrasound Regions) and `igtl` (OpenIGTLink
//! messages through `igtl::Header::parse`, `igtl::content` and `igtl::parse_image`).
//!
//! Each input is generated from (seed, target, index) alone, so any input can be made again.
//! The inputs run in a child process (this program with `--child`), in-process one after
//! another, each under `catch_unwind` with a panic hook that also counts the panics the
//! reader contains itself. The parent is the watchdog: the child announces each input before
//! running it, and the parent kills it when one takes longer than `--hang-seconds` (a hang)
//! and restarts it after the input when it dies (a crash: an abort, a stack overflow, out of
//! memory). Every input that panics, hangs or crashes is saved under
//! `tests/data/fuzz-regressions/<target>/`, which `tests/hostile.rs` replays. At the end it
//! prints, per target, the inputs tried, the panics, hangs and crashes, and the peak RSS
//! (VmHWM of the child processes).

#[path = "../tests/hostile/craft.rs"]
mod craft;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use craft::*;

/// Every target, in the order they run.
const TARGETS: [&str; 8] = [
    "mutate", "palette", "rle", "jpeg", "j2k", "deflate", "regions", "igtl",
];
/// An input running longer than this is a hang (the slowest normal inputs, JPEG 2000 frames
/// decoded by openjp2, take well under a second).
const DEFAULT_HANG_SECONDS: u64 = 10;
/// Inputs saved per distinct failure (panic location, hang, crash) and target in one run:
/// enough to replay it, without filling the folder with copies.
const SAVED_PER_SIGNATURE: usize = 2;
/// How often the parent samples a child's VmHWM while it runs.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(200);
/// An input that takes the child's peak RSS past this is a finding (the bound
/// `tests/hostile.rs` holds `sonoguide frames` to); the child is restarted after it so that
/// the next input starts from a low mark.
const MEMORY_FINDING_KB: u64 = 1 << 20;

fn usage() -> String {
    "usage: fuzz [--minutes N | --seconds N | --iterations N] [--seed S] [--target NAME] \
     [--hang-seconds N] [--memory-mib N] [--out DIR] [--reasons]\n  targets: mutate palette rle jpeg j2k deflate regions igtl"
        .into()
}

struct Args {
    seconds: Option<u64>,
    iterations: Option<u64>,
    seed: u64,
    targets: Vec<String>,
    hang_seconds: u64,
    out: PathBuf,
    child: bool,
    from: u64,
    to: u64,
    until_ms: u128,
    /// Tally the refusal messages and print the commonest per target.
    reasons: bool,
    /// Peak RSS (kB) past which an input is a finding.
    memory_kb: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        seconds: None,
        iterations: None,
        seed: 1,
        targets: TARGETS.iter().map(|t| t.to_string()).collect(),
        hang_seconds: DEFAULT_HANG_SECONDS,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-regressions"),
        child: false,
        from: 0,
        to: u64::MAX,
        until_ms: u128::MAX,
        reasons: false,
        memory_kb: MEMORY_FINDING_KB,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or(format!("{flag} needs a value\n{}", usage()))
        };
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: '{v}' is not a number"))
        };
        match flag.as_str() {
            "--minutes" => a.seconds = Some(num(value()?)? * 60),
            "--seconds" => a.seconds = Some(num(value()?)?),
            "--iterations" => a.iterations = Some(num(value()?)?),
            "--seed" => a.seed = num(value()?)?,
            "--hang-seconds" => a.hang_seconds = num(value()?)?.max(1),
            "--target" => {
                let t = value()?;
                if !TARGETS.contains(&t.as_str()) {
                    return Err(format!("unknown target '{t}'\n{}", usage()));
                }
                a.targets = vec![t];
            }
            "--out" => a.out = PathBuf::from(value()?),
            "--child" => a.child = true,
            "--reasons" => a.reasons = true,
            "--memory-mib" => a.memory_kb = num(value()?)? * 1024,
            "--from" => a.from = num(value()?)?,
            "--to" => a.to = num(value()?)?,
            "--until-ms" => {
                let v = value()?;
                a.until_ms = v.parse().map_err(|_| format!("--until-ms: '{v}'"))?;
            }
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument '{other}'\n{}", usage())),
        }
    }
    if a.seconds.is_none() && a.iterations.is_none() {
        a.seconds = Some(120);
    }
    Ok(a)
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.child {
        child(&args);
        return ExitCode::SUCCESS;
    }
    parent(&args)
}

// ---------------------------------------------------------------------------------------------
// The seeds.

struct Corpus {
    /// DICOM files of the corpus and the sample data.
    files: Vec<Vec<u8>>,
    /// The JPEG frames of the corpus's JPEG cine (240×320 YBR_FULL_422).
    jpeg_frames: Vec<Vec<u8>>,
    /// The corpus's JPEG 2000 frame (480×640, 3 components).
    j2k_frame: Vec<u8>,
}

impl Corpus {
    fn load() -> Corpus {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut paths: Vec<PathBuf> = Vec::new();
        for dir in [
            root.join("tests/data/dicom-corpus/files"),
            root.join("sample-data"),
        ] {
            if let Ok(rd) = std::fs::read_dir(dir) {
                paths.extend(
                    rd.flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|e| e == "dcm")),
                );
            }
        }
        // Sorted, so that an index means the same file on every run.
        paths.sort();
        let mut files: Vec<Vec<u8>> = paths.iter().filter_map(|p| std::fs::read(p).ok()).collect();
        // The corpus has no deflated file: add deflated copies of the explicit VR LE ones.
        let deflated: Vec<Vec<u8>> = files
            .iter()
            .filter(|f| f.windows(19).any(|w| w == b"1.2.840.10008.1.2.1"))
            .filter_map(|f| {
                let start = dataset_start(f)?;
                Some(part10(
                    ts::DEFLATED,
                    US_IMAGE_STORAGE,
                    &deflate_stored(&f[start..]),
                ))
            })
            .take(3)
            .collect();
        files.extend(deflated);
        Corpus {
            files,
            jpeg_frames: corpus_fragments("examples_ybr_color.dcm"),
            j2k_frame: corpus_fragments("US1_J2KR.dcm").concat(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generators.

fn generate(target: &str, rng: &mut Rng, c: &Corpus) -> Vec<u8> {
    match target {
        "mutate" => gen_mutate(rng, c),
        "palette" => gen_palette(rng),
        "rle" => gen_rle(rng),
        "jpeg" => gen_jpeg(rng, c),
        "j2k" => gen_j2k(rng, c),
        "deflate" => gen_deflate(rng, c),
        "regions" => gen_regions(rng),
        _ => gen_igtl(rng),
    }
}

/// An element header found in an explicit VR little endian file.
struct Hdr {
    pos: usize,
    tag: (u16, u16),
    len_pos: usize,
    long: bool,
    value: std::ops::Range<usize>,
}

/// The element headers of an explicit VR LE file (meta group and data set), entering
/// sequences, as far as they make sense. Best effort: mutation targets, not a parser.
fn headers(b: &[u8]) -> Vec<Hdr> {
    const MAX: usize = 20_000;
    let mut out = Vec::new();
    let mut pos = if b.get(128..132) == Some(b"DICM") {
        132
    } else {
        return out;
    };
    // Inside encapsulated pixel data, items are fragments: skipped whole.
    let mut in_pixels = false;
    while pos + 8 <= b.len() && out.len() < MAX {
        let tag = (
            u16::from_le_bytes([b[pos], b[pos + 1]]),
            u16::from_le_bytes([b[pos + 2], b[pos + 3]]),
        );
        if tag.0 == 0xFFFE {
            let len = u32::from_le_bytes([b[pos + 4], b[pos + 5], b[pos + 6], b[pos + 7]]);
            if tag.1 == 0xE0DD {
                in_pixels = false;
            }
            pos += 8;
            if in_pixels && tag.1 == 0xE000 && len != u32::MAX {
                pos = pos.saturating_add(len as usize);
            }
            continue;
        }
        let vr = [b[pos + 4], b[pos + 5]];
        if !vr.iter().all(|c| c.is_ascii_uppercase()) {
            break;
        }
        let long = sonoguide::dicom::long_length_vr(vr);
        let (len_pos, len, body) = if long {
            if pos + 12 > b.len() {
                break;
            }
            (
                pos + 8,
                u32::from_le_bytes([b[pos + 8], b[pos + 9], b[pos + 10], b[pos + 11]]),
                pos + 12,
            )
        } else {
            (
                pos + 6,
                u16::from_le_bytes([b[pos + 6], b[pos + 7]]) as u32,
                pos + 8,
            )
        };
        let end = if len == u32::MAX {
            body
        } else {
            body.saturating_add(len as usize).min(b.len())
        };
        out.push(Hdr {
            pos,
            tag,
            len_pos,
            long,
            value: body..end,
        });
        in_pixels = tag == (0x7FE0, 0x0010) && len == u32::MAX;
        pos = if &vr == b"SQ" || len == u32::MAX {
            body
        } else {
            end
        };
    }
    out
}

fn mutate_bytes(rng: &mut Rng, b: &mut Vec<u8>, c: &Corpus) {
    if b.is_empty() {
        b.extend(rng.bytes(16));
    }
    let hs = headers(b);
    match rng.below(12) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let p = rng.pick(b.len());
                b[p] ^= 1 << rng.below(8);
            }
        }
        1 => {
            let p = rng.pick(b.len());
            let v = rng.interesting_u32().to_le_bytes();
            let n = if rng.chance(1, 2) { 2 } else { 4 };
            for (k, x) in v.iter().take(n).enumerate() {
                if let Some(t) = b.get_mut(p + k) {
                    *t = *x;
                }
            }
        }
        2 => {
            let p = rng.pick(b.len() + 1);
            let n = 1 + rng.pick(64);
            let ins = rng.bytes(n);
            b.splice(p..p, ins);
        }
        3 => {
            let p = rng.pick(b.len());
            let n = (1 + rng.pick(256)).min(b.len() - p);
            b.drain(p..p + n);
        }
        4 => {
            let p = rng.pick(b.len());
            b.truncate(p);
        }
        5 if !hs.is_empty() => {
            // A corrupted length field.
            let h = &hs[rng.pick(hs.len())];
            let v = rng.interesting_u32();
            if h.long {
                b[h.len_pos..h.len_pos + 4].copy_from_slice(&v.to_le_bytes());
            } else {
                b[h.len_pos..h.len_pos + 2].copy_from_slice(&(v as u16).to_le_bytes());
            }
        }
        6 if hs.len() >= 2 => {
            // Two tags swapped.
            let (i, j) = (rng.pick(hs.len()), rng.pick(hs.len()));
            let (pi, pj) = (hs[i].pos, hs[j].pos);
            for k in 0..4 {
                b.swap(pi + k, pj + k);
            }
        }
        7 if !hs.is_empty() => {
            // Nested sequences inserted before an element.
            const DEPTHS: [usize; 9] = [1, 2, 10, 31, 32, 33, 64, 1_000, 5_000];
            let depth = DEPTHS[rng.pick(DEPTHS.len())];
            let at = hs[rng.pick(hs.len())].pos;
            let e = Elem {
                tag: (0x0040, 0x0260),
                vr: *b"SQ",
                value: V::RawUndefined(nested_sequence_content(depth)),
            };
            b.splice(at..at, encode(&[e], Enc::Explicit));
        }
        8 if !hs.is_empty() => {
            // An image attribute set to an extreme.
            const FIELDS: [(u16, u16); 8] = [
                (0x0028, 0x0010),
                (0x0028, 0x0011),
                (0x0028, 0x0002),
                (0x0028, 0x0100),
                (0x0028, 0x0101),
                (0x0028, 0x0103),
                (0x0028, 0x0006),
                (0x0028, 0x1101),
            ];
            let want = FIELDS[rng.pick(FIELDS.len())];
            if let Some(h) = hs.iter().find(|h| h.tag == want) {
                let v = rng.interesting_u16().to_le_bytes();
                if h.value.len() >= 2 {
                    b[h.value.start..h.value.start + 2].copy_from_slice(&v);
                }
            } else if let Some(h) = hs.iter().find(|h| h.tag == (0x0028, 0x0008)) {
                // Number of Frames (IS): a number of the same width.
                let w = h.value.len();
                let s = format!("{:<w$}", rng.interesting_u32() % 100_000_000);
                if s.len() == w {
                    b[h.value.clone()].copy_from_slice(s.as_bytes());
                }
            }
        }
        9 if !c.files.is_empty() => {
            // A chunk of another file spliced in.
            let other = &c.files[rng.pick(c.files.len())];
            if !other.is_empty() {
                let s = rng.pick(other.len());
                let n = (1 + rng.pick(512)).min(other.len() - s);
                let p = rng.pick(b.len() + 1);
                b.splice(p..p, other[s..s + n].iter().copied());
            }
        }
        10 => {
            // The same data set under another transfer syntax label (deflated when the new
            // one is the deflated syntax).
            if let Some(start) = dataset_start(b) {
                let to = ts::ALL[rng.pick(ts::ALL.len())];
                let ds = if to == ts::DEFLATED {
                    deflate_stored(&b[start..])
                } else {
                    b[start..].to_vec()
                };
                *b = part10(to, US_IMAGE_STORAGE, &ds);
            }
        }
        _ => {
            // A run of one byte overwritten.
            let p = rng.pick(b.len());
            let n = (1 + rng.pick(32)).min(b.len() - p);
            let v = if rng.chance(1, 2) { 0xFF } else { 0 };
            b[p..p + n].fill(v);
        }
    }
}

fn gen_mutate(rng: &mut Rng, c: &Corpus) -> Vec<u8> {
    if c.files.is_empty() {
        return rng.bytes(256);
    }
    let mut b = c.files[rng.pick(c.files.len())].clone();
    for _ in 0..1 + rng.below(4) {
        mutate_bytes(rng, &mut b, c);
    }
    b
}

/// A random segmented LUT: discrete, linear and indirect segments, indirect ones usually
/// pointing at an earlier segment.
fn random_segments(rng: &mut Rng) -> Vec<u16> {
    let mut seg: Vec<u16> = Vec::new();
    let mut starts: Vec<usize> = Vec::new();
    for _ in 0..1 + rng.below(12) {
        starts.push(seg.len());
        match rng.below(4) {
            0 | 1 => {
                let n = rng.below(12) as u16;
                seg.extend([0, n]);
                for _ in 0..n {
                    seg.push(rng.next() as u16);
                }
            }
            2 => seg.extend([1, rng.below(40) as u16, rng.next() as u16]),
            _ => {
                let offset = if rng.chance(3, 4) && starts.len() > 1 {
                    2 * starts[rng.pick(starts.len())] as u32
                } else {
                    rng.interesting_u32()
                };
                let count = if rng.chance(3, 4) {
                    rng.below(4) as u16
                } else {
                    rng.interesting_u16()
                };
                seg.extend([2, count, offset as u16, (offset >> 16) as u16]);
            }
        }
    }
    if rng.chance(1, 8) {
        // Cut short somewhere.
        let n = rng.pick(seg.len() + 1);
        seg.truncate(n);
    }
    seg
}

fn gen_palette(rng: &mut Rng) -> Vec<u8> {
    let bits = if rng.chance(3, 4) { 8 } else { 16 };
    let (rows, cols) = (1 + rng.below(24) as u16, 1 + rng.below(24) as u16);
    let entries = match rng.below(5) {
        0 => 0,
        1 => 16,
        2 => 256,
        3 => rng.interesting_u16(),
        _ => rng.below(300) as u16,
    };
    let first = if rng.chance(3, 4) {
        0
    } else {
        rng.interesting_u16()
    };
    let lut_bits = match rng.below(6) {
        0 => 8,
        1 => rng.interesting_u16(),
        _ => 16,
    };
    let lut = |rng: &mut Rng| {
        if rng.chance(2, 3) {
            Lut::Segmented(random_segments(rng))
        } else {
            let n = rng.below(300) as usize;
            Lut::Plain((0..n).map(|_| rng.next() as u16).collect())
        }
    };
    let (r, g, b) = (lut(rng), lut(rng), lut(rng));
    let mut e = image_module(rows, cols, 1, bits, "PALETTE COLOR");
    e.extend(palette([entries, first, lut_bits], r, g, b));
    let n = rows as usize * cols as usize * (bits as usize / 8);
    e.push(native_pixels(rng.bytes(n)));
    if rng.chance(1, 4) {
        e.push(us((0x0028, 0x0103), &[1]));
    }
    part10(ts::EXPLICIT, US_IMAGE_STORAGE, &encode(&e, Enc::Explicit))
}

/// PackBits of a plane as a random mix of literal and replicate runs.
fn packbits_random(rng: &mut Rng, plane: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < plane.len() {
        let n = (1 + rng.pick(128)).min(plane.len() - i);
        if rng.chance(1, 3) && n >= 2 {
            out.push((1i32 - n as i32) as i8 as u8);
            out.push(plane[i]);
        } else {
            out.push((n - 1) as u8);
            out.extend_from_slice(&plane[i..i + n]);
        }
        i += n;
    }
    out
}

fn gen_rle(rng: &mut Rng) -> Vec<u8> {
    let (rows, cols) = (1 + rng.below(48) as u16, 1 + rng.below(48) as u16);
    let (spp, pi) = if rng.chance(2, 3) {
        (1, "MONOCHROME2")
    } else {
        (3, if rng.chance(1, 2) { "RGB" } else { "YBR_FULL" })
    };
    let bits = if rng.chance(3, 4) { 8 } else { 16 };
    let n = rows as usize * cols as usize;
    let planes = spp as usize * (bits as usize / 8);
    let segments: Vec<Vec<u8>> = (0..planes)
        .map(|_| {
            let plane = rng.bytes(n);
            packbits_random(rng, &plane)
        })
        .collect();
    let mut header = vec![0u8; 64];
    header[0..4].copy_from_slice(&(planes as u32).to_le_bytes());
    let mut offset = 64u32;
    for (k, s) in segments.iter().enumerate() {
        header[4 + 4 * k..8 + 4 * k].copy_from_slice(&offset.to_le_bytes());
        offset += s.len() as u32;
    }
    let mut frame = header;
    for s in &segments {
        frame.extend_from_slice(s);
    }
    match rng.below(5) {
        0 => {
            // A header field set to an extreme: the count or an offset.
            let k = rng.below(16) as usize;
            let v = rng.interesting_u32();
            frame[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
        }
        1 => {
            for _ in 0..1 + rng.below(8) {
                let p = rng.pick(frame.len());
                frame[p] ^= 1 << rng.below(8);
            }
        }
        2 => {
            let p = rng.pick(frame.len());
            frame.truncate(p);
        }
        3 => {
            let p = rng.pick(frame.len());
            let n = 1 + rng.pick(32);
            frame.splice(p..p, rng.bytes(n));
        }
        _ => {}
    }
    let (r, c) = if rng.chance(1, 8) {
        (rng.interesting_u16(), rng.interesting_u16())
    } else {
        (rows, cols)
    };
    let mut e = image_module(r, c, spp, bits, pi);
    let mut frames = vec![frame];
    if rng.chance(1, 8) {
        e.push(number_of_frames(&format!("{}", rng.interesting_u32())));
        frames.push(rng.bytes(64));
    }
    e.push(encapsulated_pixels(frames));
    part10(ts::RLE, US_IMAGE_STORAGE, &encode(&e, Enc::Explicit))
}

/// Start of the SOF0 marker segment's parameters (after FFC0) in a JPEG stream.
fn sof_at(f: &[u8]) -> Option<usize> {
    let mut p = 2;
    while p + 4 <= f.len() {
        if f[p] != 0xFF {
            return None;
        }
        let m = f[p + 1];
        let len = u16::from_be_bytes([f[p + 2], f[p + 3]]) as usize;
        if (0xC0..=0xCF).contains(&m) && !matches!(m, 0xC4 | 0xC8 | 0xCC) {
            return Some(p + 4);
        }
        p += 2 + len;
    }
    None
}

fn ensure_end_marker(rng: &mut Rng, f: &mut Vec<u8>) {
    // Half the time, end with EOI/EOC so the frame gets past the truncation check and reaches
    // the decoder.
    if rng.chance(1, 2) && !f.ends_with(&[0xFF, 0xD9]) {
        f.extend_from_slice(&[0xFF, 0xD9]);
    }
}

fn mutate_codestream(rng: &mut Rng, f: &mut Vec<u8>, header_bytes: usize) {
    if f.is_empty() {
        f.extend(rng.bytes(64));
    }
    for _ in 0..1 + rng.below(3) {
        let head = header_bytes.min(f.len()).max(1);
        match rng.below(6) {
            0 | 1 => {
                // Bit flips, mostly in the headers (tables, markers).
                for _ in 0..1 + rng.below(8) {
                    let p = if rng.chance(2, 3) {
                        rng.pick(head)
                    } else {
                        rng.pick(f.len())
                    };
                    f[p] ^= 1 << rng.below(8);
                }
            }
            2 => {
                let p = rng.pick(head);
                let v = rng.interesting_u16().to_be_bytes();
                if p + 2 <= f.len() {
                    f[p..p + 2].copy_from_slice(&v);
                }
            }
            3 => {
                let p = rng.pick(f.len());
                f.truncate(p.max(1));
            }
            4 => {
                let p = rng.pick(f.len());
                let n = (1 + rng.pick(64)).min(f.len() - p);
                f.drain(p..p + n);
            }
            _ => {
                let p = rng.pick(f.len());
                let n = 1 + rng.pick(64);
                f.splice(p..p, rng.bytes(n));
            }
        }
    }
}

fn gen_jpeg(rng: &mut Rng, c: &Corpus) -> Vec<u8> {
    let mut f = if c.jpeg_frames.is_empty() {
        rng.bytes(600)
    } else {
        c.jpeg_frames[rng.pick(c.jpeg_frames.len())].clone()
    };
    let (mut rows, mut cols) = (240u16, 320u16);
    if rng.chance(1, 3) {
        // The frame header claims another size; half the time the DICOM header agrees, so
        // the decoder runs with it (kept moderate to keep inputs fast).
        if let Some(s) = sof_at(&f) {
            let (y, x) = if rng.chance(1, 2) {
                (rng.interesting_u16(), rng.interesting_u16())
            } else {
                (1 + rng.below(1024) as u16, 1 + rng.below(1024) as u16)
            };
            f[s + 1..s + 3].copy_from_slice(&y.to_be_bytes());
            f[s + 3..s + 5].copy_from_slice(&x.to_be_bytes());
            if rng.chance(1, 2) && (y as u32) * (x as u32) <= 1 << 21 {
                (rows, cols) = (y, x);
            }
        }
    }
    if rng.chance(3, 4) {
        mutate_codestream(rng, &mut f, 700);
    }
    ensure_end_marker(rng, &mut f);
    let (spp, pi) = match rng.below(6) {
        0 => (1, "MONOCHROME2"),
        1 => (3, "RGB"),
        _ => (3, "YBR_FULL_422"),
    };
    let bits = if rng.chance(7, 8) { 8 } else { 16 };
    let mut e = image_module(rows, cols, spp, bits, pi);
    let frags = if rng.chance(1, 6) && f.len() > 2 {
        // One frame in two fragments.
        let cut = rng.pick(f.len());
        vec![f[..cut].to_vec(), f[cut..].to_vec()]
    } else {
        vec![f]
    };
    if frags.len() == 2 {
        e.push(number_of_frames("1"));
    }
    e.push(encapsulated_pixels(frags));
    part10(
        ts::JPEG_BASELINE,
        US_IMAGE_STORAGE,
        &encode(&e, Enc::Explicit),
    )
}

fn gen_j2k(rng: &mut Rng, c: &Corpus) -> Vec<u8> {
    let mut f = if c.j2k_frame.is_empty() {
        rng.bytes(600)
    } else {
        c.j2k_frame.clone()
    };
    let (mut rows, mut cols) = (480u16, 640u16);
    if rng.chance(1, 3) && f.len() > 60 {
        // SIZ fields: image size, offsets, tile size, components, subsampling.
        let field = rng.below(9) as usize;
        let v = if rng.chance(1, 2) {
            rng.interesting_u32()
        } else {
            rng.below(2048) as u32
        };
        if field < 8 {
            f[8 + 4 * field..12 + 4 * field].copy_from_slice(&v.to_be_bytes());
            if field < 2 && rng.chance(1, 2) && (1..=2048).contains(&v) {
                if field == 0 {
                    cols = v as u16;
                } else {
                    rows = v as u16;
                }
            }
        } else {
            let k = 42 + rng.below(9) as usize;
            f[k] = rng.byte();
        }
    }
    if rng.chance(3, 4) {
        mutate_codestream(rng, &mut f, 300);
    }
    ensure_end_marker(rng, &mut f);
    let spp = if rng.chance(7, 8) { 3 } else { 1 };
    let pi = if spp == 1 { "MONOCHROME2" } else { "YBR_RCT" };
    let bits = if rng.chance(7, 8) { 8 } else { 16 };
    let mut e = image_module(rows, cols, spp, bits, pi);
    e.push(encapsulated_pixels(vec![f]));
    part10(
        ts::J2K_LOSSLESS,
        US_IMAGE_STORAGE,
        &encode(&e, Enc::Explicit),
    )
}

fn gen_deflate(rng: &mut Rng, c: &Corpus) -> Vec<u8> {
    let (rows, cols) = (1 + rng.below(32) as u16, 1 + rng.below(32) as u16);
    let frame_bytes = rows as usize * cols as usize;
    let z_of = |rng: &mut Rng, data: &[u8]| -> Vec<u8> {
        let mut z = match rng.below(8) {
            // An inflate bomb of a random size.
            0 => deflate_bomb(rng.below(1 << 24)),
            _ => deflate_stored(data),
        };
        match rng.below(4) {
            0 if !z.is_empty() => {
                for _ in 0..1 + rng.below(4) {
                    let p = rng.pick(z.len());
                    z[p] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let p = rng.pick(z.len() + 1);
                z.truncate(p);
            }
            _ => {}
        }
        z
    };
    if rng.chance(1, 2) {
        // A deflated data set: a corpus file's or a small image's.
        let ds = match c.files.get(rng.pick(c.files.len().max(1))) {
            Some(f) if rng.chance(1, 2) => dataset_start(f).map(|s| f[s..].to_vec()),
            _ => None,
        }
        .unwrap_or_else(|| {
            let mut e = image_module(rows, cols, 1, 8, "MONOCHROME2");
            e.push(native_pixels(rng.bytes(frame_bytes)));
            encode(&e, Enc::Explicit)
        });
        let z = z_of(rng, &ds);
        part10(ts::DEFLATED, US_IMAGE_STORAGE, &z)
    } else {
        // Deflated Image Frame Compression: one fragment per frame.
        let frames = 1 + rng.below(3) as usize;
        let frags: Vec<Vec<u8>> = (0..frames)
            .map(|_| {
                let n = if rng.chance(3, 4) {
                    frame_bytes
                } else {
                    rng.pick(2 * frame_bytes + 2)
                };
                let data = rng.bytes(n);
                z_of(rng, &data)
            })
            .collect();
        let mut e = image_module(rows, cols, 1, 8, "MONOCHROME2");
        e.push(number_of_frames(&frames.to_string()));
        e.push(encapsulated_pixels(frags));
        part10(
            ts::DEFLATED_FRAMES,
            US_IMAGE_STORAGE,
            &encode(&e, Enc::Explicit),
        )
    }
}

fn interesting_f64(rng: &mut Rng) -> f64 {
    const V: [f64; 12] = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        0.0,
        -0.0,
        1e-300,
        1e300,
        f64::MAX,
        f64::MIN_POSITIVE,
        -0.01,
        0.01,
        0.0262,
    ];
    if rng.chance(3, 4) {
        V[rng.pick(V.len())]
    } else {
        f64::from_bits(rng.next())
    }
}

fn gen_regions(rng: &mut Rng) -> Vec<u8> {
    let (rows, cols) = (16 + rng.below(64) as u16, 16 + rng.below(64) as u16);
    let mut e = image_module(rows, cols, 1, 8, "MONOCHROME2");
    let n = rng.below(4) as usize;
    let items: Vec<Region> = (0..n)
        .map(|_| {
            let coord = |rng: &mut Rng, max: u16| {
                if rng.chance(1, 2) {
                    rng.below(max as u64 + 4) as u32
                } else {
                    rng.interesting_u32()
                }
            };
            Region {
                bounds: [
                    coord(rng, cols),
                    coord(rng, rows),
                    coord(rng, cols),
                    coord(rng, rows),
                ],
                format_and_type: if rng.chance(3, 4) {
                    [1, 1]
                } else {
                    [rng.interesting_u16(), rng.interesting_u16()]
                },
                units: if rng.chance(3, 4) {
                    [3, 3]
                } else {
                    [rng.interesting_u16(), rng.interesting_u16()]
                },
                reference: rng
                    .chance(3, 4)
                    .then(|| [rng.interesting_u32() as i32, rng.interesting_u32() as i32]),
                delta: [interesting_f64(rng), interesting_f64(rng)],
            }
        })
        .collect();
    e.push(regions(&items));
    if rng.chance(1, 3) {
        // Pixel Spacing as text, sometimes not a number.
        const S: [&str; 6] = ["0.1\\0.1", "nan\\nan", "1e999\\1", "-1\\-1", "0\\0", "abc"];
        e.push(text((0x0028, 0x0030), b"DS", S[rng.pick(S.len())]));
    }
    let px = rng.bytes(rows as usize * cols as usize);
    e.push(native_pixels(px));
    part10(ts::EXPLICIT, US_IMAGE_STORAGE, &encode(&e, Enc::Explicit))
}

fn gen_igtl(rng: &mut Rng) -> Vec<u8> {
    use sonoguide::igtl::{image_content, message, HEADER_BYTES, IMAGE_HEADER_BYTES};
    let (w, h) = (1 + rng.below(32) as usize, 1 + rng.below(32) as usize);
    let rgb = rng.bytes(w * h * 3);
    let mut matrix = [0f32; 12];
    for m in &mut matrix {
        *m = if rng.chance(1, 8) {
            f32::NAN
        } else {
            rng.below(200) as f32 / 10.0 - 10.0
        };
    }
    let coordinates = if rng.chance(1, 2) {
        sonoguide::igtl::CoordinateSystem::Ras
    } else {
        sonoguide::igtl::CoordinateSystem::Lps
    };
    let mut content = image_content(w, h, &rgb, &matrix, coordinates);
    // IMAGE header fields: components, scalar type, endian, coordinate, size.
    if rng.chance(1, 2) && content.len() >= IMAGE_HEADER_BYTES {
        let k = rng.below(12) as usize;
        let v = rng.interesting_u16().to_be_bytes();
        content[k] = v[0];
        if k + 1 < 12 {
            content[k + 1] = v[1];
        }
    }
    let mut body = content;
    let version = if rng.chance(1, 3) { 2 } else { 1 };
    if version == 2 {
        // v3: extended header (size, metadata header size, metadata size, message id).
        let mut ext = Vec::new();
        let ext_size = if rng.chance(3, 4) {
            12
        } else {
            rng.interesting_u16()
        };
        ext.extend_from_slice(&ext_size.to_be_bytes());
        ext.extend_from_slice(&rng.interesting_u16().to_be_bytes());
        ext.extend_from_slice(&rng.interesting_u32().to_be_bytes());
        ext.extend_from_slice(&0u32.to_be_bytes());
        ext.extend(body);
        body = ext;
    }
    let mut msg = message("IMAGE", "fuzz", &body);
    msg[0..2].copy_from_slice(&(version as u16).to_be_bytes());
    match rng.below(5) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let p = rng.pick(msg.len());
                msg[p] ^= 1 << rng.below(8);
            }
        }
        1 => {
            let p = rng.pick(msg.len());
            msg.truncate(p);
        }
        2 => {
            // Body size field.
            msg[42..50].copy_from_slice(&(rng.interesting_u32() as u64).to_be_bytes());
        }
        3 => {
            let p = HEADER_BYTES + rng.pick(msg.len() - HEADER_BYTES + 1);
            let n = 1 + rng.pick(64);
            msg.splice(p..p, rng.bytes(n));
        }
        _ => {}
    }
    msg
}

// ---------------------------------------------------------------------------------------------
// The child: runs inputs, reports each on stdout.

/// Panics seen by the hook (including those the reader catches itself), and the last one's
/// location and message.
static PANICS: AtomicUsize = AtomicUsize::new(0);
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

fn child(a: &Args) {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = format!("{location}: {payload}").replace('\n', " ");
        }
    }));
    let target = a.targets.first().map(String::as_str).unwrap_or("mutate");
    let corpus = Corpus::load();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut i = a.from;
    while i < a.to && now_ms() < a.until_ms {
        let _ = writeln!(out, "R {i}");
        let _ = out.flush();
        let input = generate(target, &mut Rng::for_input(a.seed, target, i), &corpus);
        let before = PANICS.load(Ordering::SeqCst);
        let verdict = std::panic::catch_unwind(AssertUnwindSafe(|| run_input(target, input)));
        let panicked = PANICS.load(Ordering::SeqCst) > before;
        match verdict {
            _ if panicked => {
                let last = LAST_PANIC.lock().map(|s| s.clone()).unwrap_or_default();
                let escaped = if verdict.is_err() {
                    "escaped"
                } else {
                    "contained"
                };
                let _ = writeln!(out, "P {i} {escaped} {last}");
            }
            Err(_) => {
                let _ = writeln!(out, "P {i} escaped (no hook message)");
            }
            Ok(Verdict::Unnamed(m)) => {
                let _ = writeln!(out, "U {i} {}", m.replace('\n', " "));
            }
            Ok(Verdict::Ok) => {
                let _ = writeln!(out, "K {i}");
            }
            Ok(Verdict::Refused(m)) => {
                if a.reasons {
                    let _ = writeln!(out, "W {i} {}", m.replace('\n', " "));
                } else {
                    let _ = writeln!(out, "W {i}");
                }
            }
        }
        // VmHWM only rises: after an input that raised it past the bound, stop and let the
        // parent restart from the next input.
        let hwm = vm_hwm_kb("self").unwrap_or(0);
        if hwm > a.memory_kb {
            let _ = writeln!(out, "M {i} {hwm}");
            let _ = out.flush();
            return;
        }
        i += 1;
    }
    let _ = writeln!(out, "D {}", vm_hwm_kb("self").unwrap_or(0));
    let _ = out.flush();
}

/// VmHWM of a process ("self" or a pid), in kB.
fn vm_hwm_kb(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// The parent: the watchdog, the book-keeping and the report.

#[derive(Default)]
struct Stats {
    inputs: u64,
    ok: u64,
    refused: u64,
    panics: u64,
    contained: u64,
    hangs: u64,
    crashes: u64,
    memory: u64,
    unnamed: u64,
    peak_rss_kb: u64,
    seconds: f64,
    saved: Vec<String>,
    signatures: HashMap<String, usize>,
    reasons: HashMap<String, u64>,
}

struct Saver<'a> {
    args: &'a Args,
    target: &'a str,
    corpus: Option<Corpus>,
}

impl Saver<'_> {
    /// Saves input `index` (made again from its seed) when its failure signature has not been
    /// saved often enough yet.
    fn save(&mut self, stats: &mut Stats, kind: &str, index: u64, signature: &str) {
        let n = stats
            .signatures
            .entry(format!("{kind} {signature}"))
            .or_insert(0);
        *n += 1;
        if *n > SAVED_PER_SIGNATURE {
            return;
        }
        let corpus = self.corpus.get_or_insert_with(Corpus::load);
        let input = generate(
            self.target,
            &mut Rng::for_input(self.args.seed, self.target, index),
            corpus,
        );
        let dir = self.args.out.join(self.target);
        let path = dir.join(format!("{kind}-s{}-i{index}.bin", self.args.seed));
        let written = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, &input));
        match written {
            Ok(()) => stats
                .saved
                .push(format!("{} ({signature})", path.display())),
            Err(e) => eprintln!("cannot save {}: {e}", path.display()),
        }
    }
}

enum Msg {
    Line(String),
    Closed,
}

fn run_target(a: &Args, target: &str, budget: Option<Duration>) -> Stats {
    let mut stats = Stats::default();
    let mut saver = Saver {
        args: a,
        target,
        corpus: None,
    };
    let start = Instant::now();
    let until_ms = budget.map_or(u128::MAX, |b| now_ms() + b.as_millis());
    let to = a.iterations.unwrap_or(u64::MAX);
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find this program to run it as a child: {e}");
            return stats;
        }
    };
    let mut next = 0u64;
    while next < to && now_ms() < until_ms {
        let mut child = match Command::new(&exe)
            .args(["--child", "--target", target])
            .args(["--seed", &a.seed.to_string()])
            .args(["--from", &next.to_string(), "--to", &to.to_string()])
            .args(["--until-ms", &until_ms.to_string()])
            .args(a.reasons.then_some("--reasons"))
            .args(["--memory-mib", &(a.memory_kb / 1024).to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cannot start the child: {e}");
                break;
            }
        };
        let pid = child.id().to_string();
        let Some(stdout) = child.stdout.take() else {
            break;
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(Msg::Line(l)).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send(Msg::Closed);
        });
        let mut current: Option<u64> = None;
        let mut finished = false;
        let mut last_sample = Instant::now();
        loop {
            if last_sample.elapsed() > RSS_SAMPLE_INTERVAL {
                stats.peak_rss_kb = stats.peak_rss_kb.max(vm_hwm_kb(&pid).unwrap_or(0));
                last_sample = Instant::now();
            }
            match rx.recv_timeout(Duration::from_secs(a.hang_seconds)) {
                Ok(Msg::Line(l)) => {
                    let mut parts = l.splitn(3, ' ');
                    let kind = parts.next().unwrap_or("");
                    let n: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    let rest = parts.next().unwrap_or("").to_string();
                    match kind {
                        "R" => {
                            current = Some(n);
                            stats.inputs += 1;
                        }
                        "K" => stats.ok += 1,
                        "P" => {
                            stats.panics += 1;
                            if rest.starts_with("contained") {
                                stats.contained += 1;
                            }
                            // The signature is the panic's location (and message).
                            let sig = rest.clone();
                            eprintln!("[{target}] panic at input {n}: {rest}");
                            saver.save(&mut stats, "panic", n, &sig);
                        }
                        "W" if rest.is_empty() => stats.refused += 1,
                        "W" => {
                            stats.refused += 1;
                            // Digits and the file name vary; the reason is the rest.
                            let r: String = rest
                                .replace("fuzz-input.dcm", "")
                                .chars()
                                .map(|c| if c.is_ascii_digit() { '#' } else { c })
                                .collect();
                            *stats.reasons.entry(r).or_insert(0) += 1;
                        }
                        "M" => {
                            // The child stops after this input; it is run again from the next.
                            let kb: u64 = rest.trim().parse().unwrap_or(0);
                            stats.memory += 1;
                            stats.peak_rss_kb = stats.peak_rss_kb.max(kb);
                            eprintln!(
                                "[{target}] input {n} took the peak RSS to {} MiB",
                                kb / 1024
                            );
                            saver.save(&mut stats, "memory", n, "memory");
                            next = n + 1;
                        }
                        "U" => {
                            stats.unnamed += 1;
                            eprintln!("[{target}] error not naming the file at input {n}: {rest}");
                            saver.save(&mut stats, "unnamed", n, "unnamed");
                        }
                        "D" => {
                            stats.peak_rss_kb = stats.peak_rss_kb.max(n);
                            finished = true;
                        }
                        _ => {}
                    }
                }
                Ok(Msg::Closed) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // No word from the child for `hang_seconds`: the current input hangs.
                    stats.peak_rss_kb = stats.peak_rss_kb.max(vm_hwm_kb(&pid).unwrap_or(0));
                    let _ = child.kill();
                    let _ = child.wait();
                    if let Some(i) = current {
                        stats.hangs += 1;
                        eprintln!("[{target}] hang at input {i} (> {} s)", a.hang_seconds);
                        saver.save(&mut stats, "hang", i, "hang");
                        next = i + 1;
                    }
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = child.wait();
        if finished {
            break;
        }
        if let Some(i) = current {
            if next <= i {
                // The child died during input `i`: an abort, a stack overflow or OOM.
                stats.crashes += 1;
                let how = status.map(|s| s.to_string()).unwrap_or_default();
                eprintln!("[{target}] crash at input {i}: {how}");
                saver.save(&mut stats, "crash", i, &how);
                next = i + 1;
            }
        } else {
            // It died before running anything: do not spin.
            eprintln!("[{target}] the child exited before running an input");
            break;
        }
    }
    stats.seconds = start.elapsed().as_secs_f64();
    stats
}

fn parent(a: &Args) -> ExitCode {
    let per_target = a
        .seconds
        .map(|s| Duration::from_secs_f64(s as f64 / a.targets.len() as f64));
    println!(
        "fuzzing {} target(s), seed {}, {}, hang after {} s; regressions in {}",
        a.targets.len(),
        a.seed,
        match (a.seconds, a.iterations) {
            (Some(s), Some(n)) => format!("{s} s in all and at most {n} inputs per target"),
            (Some(s), None) => format!("{s} s in all"),
            (None, Some(n)) => format!("{n} inputs per target"),
            (None, None) => String::new(),
        },
        a.hang_seconds,
        a.out.display()
    );
    let mut all = Vec::new();
    for t in &a.targets {
        let s = run_target(a, t, per_target);
        println!(
            "{t:8} {:>8} inputs ({:.0}/s): {} ok, {} refused; {} panics ({} contained by the reader), {} hangs, {} crashes, {} over {} MiB, {} unnamed errors; peak RSS {} MiB",
            s.inputs,
            s.inputs as f64 / s.seconds.max(1e-9),
            s.ok,
            s.refused,
            s.panics,
            s.contained,
            s.hangs,
            s.crashes,
            s.memory,
            a.memory_kb / 1024,
            s.unnamed,
            s.peak_rss_kb / 1024
        );
        if a.reasons {
            let mut r: Vec<(&String, &u64)> = s.reasons.iter().collect();
            r.sort_by(|x, y| y.1.cmp(x.1));
            for (m, n) in r.iter().take(12) {
                println!("    {n:>7}  {m}");
            }
        }
        all.push((t.clone(), s));
    }
    let total: u64 = all.iter().map(|(_, s)| s.inputs).sum();
    let bad: u64 = all
        .iter()
        .map(|(_, s)| s.panics + s.hangs + s.crashes + s.memory + s.unnamed)
        .sum();
    let peak = all.iter().map(|(_, s)| s.peak_rss_kb).max().unwrap_or(0);
    println!(
        "total    {total:>8} inputs; {bad} findings; peak RSS {} MiB",
        peak / 1024
    );
    for (t, s) in &all {
        for f in &s.saved {
            println!("saved [{t}] {f}");
        }
    }
    if bad > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
