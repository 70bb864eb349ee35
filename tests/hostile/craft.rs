//! Crafting DICOM files (valid, odd and hostile) and running inputs through the reader.
//!
//! Shared by `tests/hostile.rs` (the crafted files and the replay of fuzz regressions) and
//! `examples/fuzz.rs` (the generators and the in-process runner), so that what the fuzzer
//! finds is replayed by exactly the code that found it. Everything here is built in Rust:
//! nothing extra needs installing.

#![allow(dead_code)]

use sonoguide::dicom::{DicomFile, ReadOptions};

// ---------------------------------------------------------------------------------------------
// A small reproducible PRNG.

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to drive mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The generator for input `index` of `target` in a run seeded `seed`: every input can be
    /// regenerated on its own, so a crashed run can save the input that killed it.
    pub fn for_input(seed: u64, target: &str, index: u64) -> Rng {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in target.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        let mut r = Rng(seed ^ h ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next();
        r
    }
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    /// An index into a slice of `n` items (`n` > 0).
    pub fn pick(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// A byte.
    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    /// A 32-bit value, biased towards the values that break parsers.
    pub fn interesting_u32(&mut self) -> u32 {
        const V: [u32; 14] = [
            0,
            1,
            2,
            0x7F,
            0xFF,
            0x100,
            0x7FFF,
            0xFFFF,
            0x1_0000,
            0x7FFF_FFFF,
            0x8000_0000,
            0xFFFF_FFF0,
            0xFFFF_FFFE,
            0xFFFF_FFFF,
        ];
        if self.chance(3, 4) {
            V[self.pick(V.len())]
        } else {
            self.next() as u32
        }
    }
    /// A 16-bit value, biased towards the values that break parsers.
    pub fn interesting_u16(&mut self) -> u16 {
        const V: [u16; 10] = [0, 1, 2, 3, 8, 16, 0x7F, 0x7FFF, 0x8000, 0xFFFF];
        if self.chance(3, 4) {
            V[self.pick(V.len())]
        } else {
            self.next() as u16
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Data elements and files.

/// Transfer syntax UIDs.
pub mod ts {
    /// Implicit VR little endian.
    pub const IMPLICIT: &str = "1.2.840.10008.1.2";
    /// Explicit VR little endian.
    pub const EXPLICIT: &str = "1.2.840.10008.1.2.1";
    /// Deflated explicit VR little endian.
    pub const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
    /// RLE Lossless.
    pub const RLE: &str = "1.2.840.10008.1.2.5";
    /// JPEG baseline.
    pub const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
    /// JPEG 2000 lossless.
    pub const J2K_LOSSLESS: &str = "1.2.840.10008.1.2.4.90";
    /// Deflated Image Frame Compression.
    pub const DEFLATED_FRAMES: &str = "1.2.840.10008.1.2.8.1";
    /// Every transfer syntax the fuzzer re-labels files with (JPEG-LS last: not built).
    pub const ALL: [&str; 12] = [
        IMPLICIT,
        EXPLICIT,
        "1.2.840.10008.1.2.2",
        DEFLATED,
        RLE,
        JPEG_BASELINE,
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.70",
        J2K_LOSSLESS,
        "1.2.840.10008.1.2.4.91",
        DEFLATED_FRAMES,
        "1.2.840.10008.1.2.4.80",
    ];
}

/// Where the data set of a Part 10 file starts: after the preamble, `DICM`, and the meta
/// group as its group length (explicit VR LE, 12 bytes at byte 132) gives it.
pub fn dataset_start(file: &[u8]) -> Option<usize> {
    if file.get(128..132) != Some(b"DICM") {
        return None;
    }
    let g = file.get(140..144)?;
    let start = 144usize.checked_add(u32::from_le_bytes([g[0], g[1], g[2], g[3]]) as usize)?;
    (start <= file.len()).then_some(start)
}

/// Ultrasound Image Storage.
pub const US_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.6.1";
/// Ultrasound Multi-frame Image Storage.
pub const US_MULTIFRAME_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.3.1";

/// A data element value.
#[derive(Debug, Clone)]
pub enum V {
    /// Bytes, written with their length.
    Bytes(Vec<u8>),
    /// A sequence of items (undefined lengths, delimited).
    Seq(Vec<Vec<Elem>>),
    /// Encapsulated pixel data: a basic offset table and fragments.
    Fragments(Vec<u32>, Vec<Vec<u8>>),
    /// Bytes written after an undefined length, as they are (they must carry their own
    /// delimiter).
    RawUndefined(Vec<u8>),
    /// Bytes written after a length given here, whatever their real size.
    RawWithLength(u32, Vec<u8>),
}

/// A data element.
#[derive(Debug, Clone)]
pub struct Elem {
    /// (group, element).
    pub tag: (u16, u16),
    /// Value representation.
    pub vr: [u8; 2],
    /// Value.
    pub value: V,
}

/// How a data set is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enc {
    /// Explicit VR little endian.
    Explicit,
    /// Implicit VR little endian.
    Implicit,
}

/// Whether an explicit VR takes a 4-byte length: the long VRs and, as dicom-rs reads them,
/// VRs it does not know (read as UN).
fn long_vr(vr: [u8; 2]) -> bool {
    const SHORT: [&[u8; 2]; 21] = [
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    ];
    !SHORT.contains(&&vr)
}

/// An element of bytes.
pub fn el(tag: (u16, u16), vr: &[u8; 2], value: Vec<u8>) -> Elem {
    Elem {
        tag,
        vr: *vr,
        value: V::Bytes(value),
    }
}
/// A text element (padded to even length as its VR requires).
pub fn text(tag: (u16, u16), vr: &[u8; 2], s: &str) -> Elem {
    el(tag, vr, s.as_bytes().to_vec())
}
/// A US element of one or more values.
pub fn us(tag: (u16, u16), v: &[u16]) -> Elem {
    el(tag, b"US", v.iter().flat_map(|x| x.to_le_bytes()).collect())
}
/// An UL element.
pub fn ul(tag: (u16, u16), v: u32) -> Elem {
    el(tag, b"UL", v.to_le_bytes().to_vec())
}
/// An SL element.
pub fn sl(tag: (u16, u16), v: i32) -> Elem {
    el(tag, b"SL", v.to_le_bytes().to_vec())
}
/// An FD element.
pub fn fd(tag: (u16, u16), v: f64) -> Elem {
    el(tag, b"FD", v.to_le_bytes().to_vec())
}
/// An OW element of 16-bit words.
pub fn ow(tag: (u16, u16), words: &[u16]) -> Elem {
    el(
        tag,
        b"OW",
        words.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}
/// A sequence element.
pub fn seq(tag: (u16, u16), items: Vec<Vec<Elem>>) -> Elem {
    Elem {
        tag,
        vr: *b"SQ",
        value: V::Seq(items),
    }
}

fn pad(vr: [u8; 2], mut v: Vec<u8>) -> Vec<u8> {
    if v.len() % 2 == 1 {
        let p = match &vr {
            b"UI" | b"OB" | b"UN" => 0,
            _ if matches!(
                &vr,
                b"AE" | b"AS" | b"CS" | b"DA" | b"DS" | b"DT" | b"IS" | b"LO"
            ) || matches!(
                &vr,
                b"LT" | b"PN" | b"SH" | b"ST" | b"TM" | b"UC" | b"UR" | b"UT"
            ) =>
            {
                b' '
            }
            _ => 0,
        };
        v.push(p);
    }
    v
}

fn header(out: &mut Vec<u8>, tag: (u16, u16), vr: [u8; 2], len: u32, enc: Enc) {
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    match enc {
        Enc::Implicit => out.extend_from_slice(&len.to_le_bytes()),
        Enc::Explicit if long_vr(vr) || len == u32::MAX => {
            out.extend_from_slice(&vr);
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&len.to_le_bytes());
        }
        Enc::Explicit => {
            out.extend_from_slice(&vr);
            out.extend_from_slice(&(len as u16).to_le_bytes());
        }
    }
}

fn item_header(out: &mut Vec<u8>, tag: u16, len: u32) {
    out.extend_from_slice(&0xFFFEu16.to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

/// Encodes elements in tag order.
pub fn encode(elems: &[Elem], enc: Enc) -> Vec<u8> {
    let mut sorted: Vec<&Elem> = elems.iter().collect();
    sorted.sort_by_key(|e| e.tag);
    let mut out = Vec::new();
    for e in sorted {
        match &e.value {
            V::Bytes(b) => {
                let b = pad(e.vr, b.clone());
                header(&mut out, e.tag, e.vr, b.len() as u32, enc);
                out.extend_from_slice(&b);
            }
            V::Seq(items) => {
                header(&mut out, e.tag, *b"SQ", u32::MAX, enc);
                for item in items {
                    item_header(&mut out, 0xE000, u32::MAX);
                    out.extend(encode(item, enc));
                    item_header(&mut out, 0xE00D, 0);
                }
                item_header(&mut out, 0xE0DD, 0);
            }
            V::Fragments(table, frags) => {
                header(&mut out, e.tag, *b"OB", u32::MAX, enc);
                item_header(&mut out, 0xE000, 4 * table.len() as u32);
                for t in table {
                    out.extend_from_slice(&t.to_le_bytes());
                }
                for f in frags {
                    let f = pad(*b"OB", f.clone());
                    item_header(&mut out, 0xE000, f.len() as u32);
                    out.extend_from_slice(&f);
                }
                item_header(&mut out, 0xE0DD, 0);
            }
            V::RawUndefined(b) => {
                header(&mut out, e.tag, e.vr, u32::MAX, enc);
                out.extend_from_slice(b);
            }
            V::RawWithLength(len, b) => {
                header(&mut out, e.tag, e.vr, *len, enc);
                out.extend_from_slice(b);
            }
        }
    }
    out
}

/// A Part 10 file: preamble, `DICM`, file meta group (explicit VR LE), then `dataset` as given
/// (already encoded in `ts_uid`).
pub fn part10(ts_uid: &str, sop_class: &str, dataset: &[u8]) -> Vec<u8> {
    let meta = encode(
        &[
            el((0x0002, 0x0001), b"OB", vec![0, 1]),
            text((0x0002, 0x0002), b"UI", sop_class),
            text((0x0002, 0x0003), b"UI", "1.2.826.0.1.3680043.2.1125.1"),
            text((0x0002, 0x0010), b"UI", ts_uid),
            text((0x0002, 0x0012), b"UI", "1.2.826.0.1.3680043.2.1125.2"),
        ],
        Enc::Explicit,
    );
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    out.extend(encode(
        &[ul((0x0002, 0x0000), meta.len() as u32)],
        Enc::Explicit,
    ));
    out.extend(meta);
    out.extend_from_slice(dataset);
    out
}

/// The Image Pixel module of a `columns`×`rows` image (and the SOP class).
pub fn image_module(rows: u16, columns: u16, spp: u16, bits: u16, pi: &str) -> Vec<Elem> {
    let mut v = vec![
        text((0x0008, 0x0016), b"UI", US_IMAGE_STORAGE),
        text((0x0008, 0x0018), b"UI", "1.2.826.0.1.3680043.2.1125.1"),
        text((0x0008, 0x0060), b"CS", "US"),
        us((0x0028, 0x0002), &[spp]),
        text((0x0028, 0x0004), b"CS", pi),
        us((0x0028, 0x0010), &[rows]),
        us((0x0028, 0x0011), &[columns]),
        us((0x0028, 0x0100), &[bits]),
        us((0x0028, 0x0101), &[bits]),
        us((0x0028, 0x0102), &[bits.saturating_sub(1)]),
        us((0x0028, 0x0103), &[0]),
    ];
    if spp == 3 {
        v.push(us((0x0028, 0x0006), &[0]));
    }
    v
}

/// Number of Frames.
pub fn number_of_frames(n: &str) -> Elem {
    text((0x0028, 0x0008), b"IS", n)
}

/// Native pixel data.
pub fn native_pixels(bytes: Vec<u8>) -> Elem {
    el((0x7FE0, 0x0010), b"OB", bytes)
}

/// Encapsulated pixel data, one fragment per frame, empty offset table.
pub fn encapsulated_pixels(frags: Vec<Vec<u8>>) -> Elem {
    Elem {
        tag: (0x7FE0, 0x0010),
        vr: *b"OB",
        value: V::Fragments(Vec::new(), frags),
    }
}

/// A palette colour LUT channel.
#[derive(Debug, Clone)]
pub enum Lut {
    /// Plain LUT data.
    Plain(Vec<u16>),
    /// Segmented LUT data (PS3.3 C.7.9.2).
    Segmented(Vec<u16>),
}

/// The palette elements: descriptor (entries, first mapped, bits) for each channel and data.
pub fn palette(descriptor: [u16; 3], red: Lut, green: Lut, blue: Lut) -> Vec<Elem> {
    let mut v = Vec::new();
    for (k, lut) in [red, green, blue].into_iter().enumerate() {
        let k = k as u16;
        v.push(us((0x0028, 0x1101 + k), &descriptor));
        match lut {
            Lut::Plain(w) => v.push(ow((0x0028, 0x1201 + k), &w)),
            Lut::Segmented(w) => v.push(ow((0x0028, 0x1221 + k), &w)),
        }
    }
    v
}

/// One item of the Sequence of Ultrasound Regions.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// Region Location Min X0, Min Y0, Max X1, Max Y1.
    pub bounds: [u32; 4],
    /// Region Spatial Format, Region Data Type.
    pub format_and_type: [u16; 2],
    /// Physical Units X and Y.
    pub units: [u16; 2],
    /// Reference Pixel X0 and Y0.
    pub reference: Option<[i32; 2]>,
    /// Physical Delta X and Y.
    pub delta: [f64; 2],
}

impl Region {
    /// A 2-D tissue region in cm over `bounds`, with `delta` cm per pixel.
    pub fn tissue(bounds: [u32; 4], delta: [f64; 2]) -> Region {
        Region {
            bounds,
            format_and_type: [1, 1],
            units: [3, 3],
            reference: Some([0, 0]),
            delta,
        }
    }

    fn elems(&self) -> Vec<Elem> {
        let mut v = vec![
            us((0x0018, 0x6012), &[self.format_and_type[0]]),
            us((0x0018, 0x6014), &[self.format_and_type[1]]),
            ul((0x0018, 0x6018), self.bounds[0]),
            ul((0x0018, 0x601A), self.bounds[1]),
            ul((0x0018, 0x601C), self.bounds[2]),
            ul((0x0018, 0x601E), self.bounds[3]),
            us((0x0018, 0x6024), &[self.units[0]]),
            us((0x0018, 0x6026), &[self.units[1]]),
            fd((0x0018, 0x602C), self.delta[0]),
            fd((0x0018, 0x602E), self.delta[1]),
        ];
        if let Some([x, y]) = self.reference {
            v.push(sl((0x0018, 0x6020), x));
            v.push(sl((0x0018, 0x6022), y));
        }
        v
    }
}

/// The Sequence of Ultrasound Regions.
pub fn regions(items: &[Region]) -> Elem {
    seq((0x0018, 0x6011), items.iter().map(|r| r.elems()).collect())
}

/// The content of `depth` nested sequences of (0040,0260), explicit VR LE, undefined lengths,
/// as the value of an undefined-length element (built without recursion).
pub fn nested_sequence_content(depth: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(depth * 32);
    // The outer element's header is written by `encode`; start with its first item.
    item_header(&mut b, 0xE000, u32::MAX);
    for _ in 1..depth {
        header(&mut b, (0x0040, 0x0260), *b"SQ", u32::MAX, Enc::Explicit);
        item_header(&mut b, 0xE000, u32::MAX);
    }
    for _ in 1..depth {
        item_header(&mut b, 0xE00D, 0);
        item_header(&mut b, 0xE0DD, 0);
    }
    item_header(&mut b, 0xE00D, 0);
    item_header(&mut b, 0xE0DD, 0);
    b
}

/// `depth` nested sequences, implicit VR LE, every length defined (only the dictionary says
/// these are sequences), built inside out without recursion.
pub fn nested_implicit_defined(depth: usize) -> Vec<u8> {
    let mut inner: Vec<u8> = Vec::new();
    for _ in 0..depth {
        let mut item = Vec::with_capacity(inner.len() + 16);
        item_header(&mut item, 0xE000, inner.len() as u32);
        item.extend_from_slice(&inner);
        let mut sq = Vec::with_capacity(item.len() + 8);
        header(
            &mut sq,
            (0x0040, 0x0260),
            *b"SQ",
            item.len() as u32,
            Enc::Implicit,
        );
        sq.extend_from_slice(&item);
        inner = sq;
    }
    inner
}

// ---------------------------------------------------------------------------------------------
// Deflate, written by hand (no compression crate needed).

/// A raw deflate stream of stored blocks.
pub fn deflate_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 65_535 * 5 + 5);
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(65_535).collect()
    };
    for (k, c) in chunks.iter().enumerate() {
        out.push(u8::from(k + 1 == chunks.len()));
        out.extend_from_slice(&(c.len() as u16).to_le_bytes());
        out.extend_from_slice(&(!(c.len() as u16)).to_le_bytes());
        out.extend_from_slice(c);
    }
    out
}

struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    fn put(&mut self, v: u64, n: u32) {
        self.acc |= v << self.n;
        self.n += n;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    /// A Huffman code, most significant bit first (RFC 1951 3.1.1).
    fn code(&mut self, code: u32, len: u32) {
        let mut r = 0u64;
        for k in 0..len {
            r |= (((code >> k) & 1) as u64) << (len - 1 - k);
        }
        self.put(r, len);
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// An inflate bomb: a raw deflate stream (one fixed-Huffman block) that inflates to at least
/// `bytes` zero bytes, at 13 bits per 258 bytes.
pub fn deflate_bomb(bytes: u64) -> Vec<u8> {
    let mut w = BitWriter {
        out: Vec::new(),
        acc: 0,
        n: 0,
    };
    w.put(1, 1); // BFINAL
    w.put(1, 2); // BTYPE 01: fixed Huffman codes
    w.code(0x30, 8); // literal 0
    for _ in 0..bytes.div_ceil(258) {
        w.code(0xC5, 8); // length code 285: 258 bytes
        w.code(0, 5); // distance code 0: distance 1
    }
    w.code(0, 7); // end of block (256)
    w.finish()
}

// ---------------------------------------------------------------------------------------------
// Running inputs.

/// What the reader did with an input.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Read (and decoded, up to the frame cap).
    Ok,
    /// Refused with an error that names the input.
    Refused(String),
    /// Refused with an error that does not name the input (a bug: errors name the file).
    Unnamed(String),
}

/// Frames decoded per fuzz input at most: enough to reach frame 1 of a cine and the paths
/// that differ after frame 0, few enough to keep inputs fast.
pub const FUZZ_FRAMES_PER_INPUT: usize = 3;

fn named(name: &str, msg: String) -> Verdict {
    if msg.contains(name) {
        Verdict::Refused(msg)
    } else {
        Verdict::Unnamed(msg)
    }
}

/// Opens `bytes` as the DICOM file `name`, reports it as `sonoguide info` would, and decodes
/// up to `max_frames` frames.
pub fn run_dicom(name: &str, bytes: Vec<u8>, max_frames: usize) -> Verdict {
    let file = match DicomFile::from_bytes(name, bytes, &ReadOptions::default()) {
        Ok(f) => f,
        Err(e) => return named(name, e.to_string()),
    };
    // What `info --json` serialises (NaN deltas and all).
    let _ = serde_json::to_string(file.info());
    if let Err(e) = file.imaging_region_info() {
        return named(name, e.to_string());
    }
    let (rows, columns) = (file.info().rows as usize, file.info().columns as usize);
    for i in 0..file.frame_count().min(max_frames) {
        match file.read_frame(i) {
            Ok(frame) => {
                if frame.intensity.dim() != (rows, columns) {
                    return Verdict::Unnamed(format!(
                        "frame {i} is {:?}, the header says {rows}x{columns}",
                        frame.intensity.dim()
                    ));
                }
                if let Some((x, y)) = frame.calibration.mm_per_px() {
                    if !(x.is_finite() && y.is_finite() && x > 0.0 && y > 0.0) {
                        return Verdict::Unnamed(format!(
                            "calibration accepted with {x} x {y} mm per pixel"
                        ));
                    }
                }
            }
            Err(e) => return named(name, e.to_string()),
        }
    }
    Verdict::Ok
}

/// Most pixels an OpenIGTLink IMAGE may have in the fuzzer (the server's default).
pub const IGTL_MAX_PIXELS: u64 = 4096 * 4096;

/// Parses `bytes` as one OpenIGTLink message with the pure functions of `sonoguide::igtl`:
/// header, v3 body content, and IMAGE content.
pub fn run_igtl(bytes: &[u8]) -> Verdict {
    use sonoguide::igtl::{content, parse_image, Header, HEADER_BYTES};
    let Some(h) = bytes.get(..HEADER_BYTES) else {
        return Verdict::Refused("shorter than a header".into());
    };
    let mut hb = [0u8; HEADER_BYTES];
    hb.copy_from_slice(h);
    let header = Header::parse(&hb);
    let body = &bytes[HEADER_BYTES..];
    let c = match content(&header, body) {
        Ok(c) => c,
        Err(e) => return Verdict::Refused(e),
    };
    match parse_image(c, IGTL_MAX_PIXELS) {
        Ok(_) => Verdict::Ok,
        Err(e) => Verdict::Refused(e),
    }
}

/// The targets whose inputs are OpenIGTLink messages (all others are DICOM files).
pub const IGTL_TARGETS: [&str; 1] = ["igtl"];

/// Runs one input of `target`.
pub fn run_input(target: &str, bytes: Vec<u8>) -> Verdict {
    if IGTL_TARGETS.contains(&target) {
        run_igtl(&bytes)
    } else {
        run_dicom("fuzz-input.dcm", bytes, FUZZ_FRAMES_PER_INPUT)
    }
}

// ---------------------------------------------------------------------------------------------
// Pieces of the corpus, and RLE written by hand.

/// The corpus folder.
pub fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dicom-corpus/files")
}

/// The encapsulated fragments of a corpus file (empty for native pixel data).
pub fn corpus_fragments(file: &str) -> Vec<Vec<u8>> {
    let Ok(f) = DicomFile::open(corpus_dir().join(file), &ReadOptions::default()) else {
        return Vec::new();
    };
    f.object()
        .get(dicom_core::Tag(0x7FE0, 0x0010))
        .and_then(|e| e.value().fragments().map(|fr| fr.to_vec()))
        .unwrap_or_default()
}

/// PackBits of one byte plane as literal runs (PS3.5 G.3.1), padded to even length.
pub fn packbits_literal(plane: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for run in plane.chunks(128) {
        out.push((run.len() - 1) as u8);
        out.extend_from_slice(run);
    }
    if out.len() % 2 == 1 {
        out.push(0x80); // no-op
    }
    out
}

/// An RLE Lossless frame of the given byte planes (most significant plane of each sample
/// first).
pub fn rle_frame(planes: &[Vec<u8>]) -> Vec<u8> {
    let segments: Vec<Vec<u8>> = planes.iter().map(|p| packbits_literal(p)).collect();
    let mut header = vec![0u8; 64];
    header[0..4].copy_from_slice(&(segments.len() as u32).to_le_bytes());
    let mut offset = 64u32;
    for (k, s) in segments.iter().enumerate() {
        header[4 + 4 * k..8 + 4 * k].copy_from_slice(&offset.to_le_bytes());
        offset += s.len() as u32;
    }
    let mut out = header;
    for s in segments {
        out.extend(s);
    }
    out
}
