//! A bounds check of a DICOM file's element headers, run before dicom-rs parses it.
//!
//! The parser reserves each value's declared length before it reads it, so a corrupt length
//! of nearly 4 GiB would cost that much memory before the read fails. It also builds nested
//! sequences by recursion, so sequences nested thousands deep would overflow the stack, and it
//! keeps every element, item and text value as its own heap object, so a file made of nothing
//! but tiny elements costs many times its size. This walk reads only the headers (tag, VR,
//! length), enters sequences and items without recursion, skips values, and refuses any value
//! that claims more bytes than remain in the file, nesting deeper than real files use, and
//! more elements or text values than real files hold. It costs one pass over the headers.
//!
//! A deflated data set is inflated here first, bounded by a byte limit, so that the walk can
//! check it too and an inflate bomb stops at the limit.

use std::io::Read;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_encoding::transfer_syntax::{Codec, DataRWAdapter};

/// The byte layout of the data set after the file meta group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Explicit VR, little endian.
    ExplicitLittle,
    /// Implicit VR, little endian.
    ImplicitLittle,
    /// Explicit VR, big endian.
    ExplicitBig,
    /// Compressed data set (deflate): inflated with [`inflate_bounded`], then walked as
    /// explicit VR little endian.
    Deflated,
}

impl Layout {
    pub(crate) fn for_transfer_syntax(uid: &str) -> Layout {
        match uid.trim_end_matches('\0').trim() {
            "1.2.840.10008.1.2" => Layout::ImplicitLittle,
            "1.2.840.10008.1.2.2" => Layout::ExplicitBig,
            "1.2.840.10008.1.2.1.99" => Layout::Deflated,
            _ => Layout::ExplicitLittle,
        }
    }
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQ_END: (u16, u16) = (0xFFFE, 0xE0DD);
const PIXEL_DATA: (u16, u16) = (0x7FE0, 0x0010);
/// Open containers (each sequence and each item counts one) beyond this are not real DICOM
/// (ultrasound headers nest three or four sequences); it keeps dicom-rs's recursive reading of
/// sequences far from the stack's end on any thread.
pub(crate) const MAX_DEPTH: usize = 64;
/// Elements and items (pixel data fragments excluded) beyond this are not a real header:
/// ultrasound headers hold hundreds to a few thousand. dicom-rs keeps each as a heap object of
/// about 100 bytes, so the bound keeps a file of tiny elements to ~100 MiB of objects.
pub(crate) const MAX_ELEMENTS: usize = 1 << 20;
/// Values of one multi-valued text element (backslash-separated) beyond this are not real:
/// dicom-rs keeps each value as its own `String` (24 bytes even when empty), so a value of
/// backslashes would cost 24 times its size.
pub(crate) const MAX_TEXT_VALUES: usize = 1 << 16;

/// Whether explicit VR `vr` has the long form (2 reserved bytes and a 32-bit length;
/// PS3.5 table 7.1-1) rather than a 16-bit length.
pub fn long_length_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

/// The VRs dicom-rs knows. It reads any other two bytes as UN, whose length takes four bytes
/// after two reserved ones, so the walk must too: read as a 2-byte length, a corrupt VR would
/// hide a 4-byte length of up to 4 GiB that dicom-rs then allocates.
fn known_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FD"
            | b"FL"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SQ"
            | b"SS"
            | b"ST"
            | b"SV"
            | b"TM"
            | b"UC"
            | b"UI"
            | b"UL"
            | b"UN"
            | b"UR"
            | b"US"
            | b"UT"
            | b"UV"
    )
}

/// Whether dicom-rs reads a 4-byte length (after two reserved bytes) for this explicit VR:
/// the long VRs, and every VR it does not know (read as UN).
pub(crate) fn explicit_length_is_long(vr: [u8; 2]) -> bool {
    !known_vr(vr) || long_length_vr(vr)
}

/// Text VRs that may hold several backslash-separated values.
fn multi_valued_text_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"AE"
            | b"AS"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"IS"
            | b"LO"
            | b"PN"
            | b"SH"
            | b"TM"
            | b"UC"
            | b"UI"
    )
}

/// The VR dicom-rs gives `tag` in implicit VR: the standard dictionary's (pixel and overlay
/// data are OW, unknown tags UN), as `dicom_encoding`'s implicit VR decoder does.
fn implicit_vr(tag: (u16, u16)) -> [u8; 2] {
    if tag == PIXEL_DATA || (tag.0 >> 8 == 0x60 && tag.1 == 0x3000) {
        return *b"OW";
    }
    StandardDataDictionary
        .by_tag(Tag(tag.0, tag.1))
        .map(|e| e.vr().relaxed())
        .unwrap_or(VR::UN)
        .to_bytes()
}

/// Why a deflated data set was refused.
#[derive(Debug)]
pub(crate) enum InflateError {
    /// It inflates to more than the limit (in bytes).
    TooLarge(u64),
    /// The deflate stream is broken.
    Corrupt(String),
}

/// Inflates a deflated data set (raw deflate, PS3.5 A.5) into memory, refusing it as soon as
/// it passes `limit` bytes. A first pass only counts, so an inflate bomb costs time up to the
/// limit but no memory; a second fills a buffer of the counted size.
pub(crate) fn inflate_bounded(deflated: &[u8], limit: u64) -> Result<Vec<u8>, InflateError> {
    // dicom-rs's own adapter, so that what is checked here is what it will parse.
    let Codec::Dataset(Some(adapter)) =
        dicom_transfer_syntax_registry::entries::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN.codec()
    else {
        return Err(InflateError::Corrupt(
            "no deflate codec in this build".into(),
        ));
    };
    let corrupt = |e: std::io::Error| InflateError::Corrupt(e.to_string());
    let counted = std::io::copy(
        &mut adapter
            .adapt_reader(Box::new(deflated))
            .take(limit.saturating_add(1)),
        &mut std::io::sink(),
    )
    .map_err(corrupt)?;
    if counted > limit {
        return Err(InflateError::TooLarge(limit));
    }
    let mut out = Vec::new();
    out.try_reserve_exact(counted as usize)
        .map_err(|e| InflateError::Corrupt(format!("cannot hold {counted} bytes: {e}")))?;
    adapter
        .adapt_reader(Box::new(deflated))
        .take(counted)
        .read_to_end(&mut out)
        .map_err(corrupt)?;
    Ok(out)
}

/// Walks the data set starting at `start` (just after the file meta group; 0 for an inflated
/// data set, walked as [`Layout::ExplicitLittle`]).
/// Returns a description of the first impossible length, nesting or count found.
pub(crate) fn check(bytes: &[u8], start: usize, layout: Layout) -> Result<(), String> {
    let big = layout == Layout::ExplicitBig;
    let explicit = layout != Layout::ImplicitLittle;
    let u16_at = |p: usize| -> Option<u16> {
        let b = bytes.get(p..p.checked_add(2)?)?;
        Some(if big {
            u16::from_be_bytes([b[0], b[1]])
        } else {
            u16::from_le_bytes([b[0], b[1]])
        })
    };
    let u32_at = |p: usize| -> Option<u32> {
        let b = bytes.get(p..p.checked_add(4)?)?;
        let a = [b[0], b[1], b[2], b[3]];
        Some(if big {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    };
    // Each open container: (end offset if defined, is encapsulated pixel data).
    let mut stack: Vec<(Option<usize>, bool)> = Vec::new();
    let mut elements = 0usize;
    let mut pos = start;
    while pos < bytes.len() {
        while let Some((Some(end), _)) = stack.last() {
            if pos >= *end {
                stack.pop();
            } else {
                break;
            }
        }
        if stack.len() > MAX_DEPTH {
            return Err(format!(
                "sequences nested deeper than {MAX_DEPTH} levels at byte {pos}"
            ));
        }
        let Some(group) = u16_at(pos) else {
            return Err(format!("truncated element header at byte {pos}"));
        };
        let Some(elem) = u16_at(pos + 2) else {
            return Err(format!("truncated element header at byte {pos}"));
        };
        let tag = (group, elem);
        let in_fragments = stack.last().is_some_and(|(_, f)| *f);
        if !in_fragments {
            elements += 1;
            if elements > MAX_ELEMENTS {
                return Err(format!(
                    "more than {MAX_ELEMENTS} elements and items (at byte {pos})"
                ));
            }
        }
        if group == 0xFFFE {
            let Some(len) = u32_at(pos + 4) else {
                return Err(format!("truncated item header at byte {pos}"));
            };
            let body = pos + 8;
            if tag == ITEM_END || tag == SEQ_END {
                if tag == SEQ_END || !in_fragments {
                    stack.pop();
                }
                pos = body;
                continue;
            }
            if tag != ITEM {
                return Err(format!(
                    "unexpected delimiter ({group:04X},{elem:04X}) at byte {pos}"
                ));
            }
            if len == UNDEFINED {
                if in_fragments {
                    return Err(format!(
                        "pixel data fragment of undefined length at byte {pos}"
                    ));
                }
                stack.push((None, false));
                pos = body;
                continue;
            }
            let end = body
                .checked_add(len as usize)
                .filter(|e| *e <= bytes.len())
                .ok_or_else(|| {
                    format!(
                        "item at byte {pos} claims {len} bytes but only {} remain (truncated file?)",
                        bytes.len().saturating_sub(body)
                    )
                })?;
            if in_fragments {
                pos = end;
            } else {
                stack.push((Some(end), false));
                pos = body;
            }
            continue;
        }
        let (vr, len, body) = if explicit {
            let vr = match bytes.get(pos + 4..pos + 6) {
                Some(v) if known_vr([v[0], v[1]]) => [v[0], v[1]],
                Some(_) => *b"UN",
                None => return Err(format!("truncated element header at byte {pos}")),
            };
            if long_length_vr(vr) {
                let Some(len) = u32_at(pos + 8) else {
                    return Err(format!("truncated element header at byte {pos}"));
                };
                (vr, len, pos + 12)
            } else {
                let Some(len) = u16_at(pos + 6) else {
                    return Err(format!("truncated element header at byte {pos}"));
                };
                (vr, len as u32, pos + 8)
            }
        } else {
            let Some(len) = u32_at(pos + 4) else {
                return Err(format!("truncated element header at byte {pos}"));
            };
            (implicit_vr(tag), len, pos + 8)
        };
        if len == UNDEFINED {
            // Undefined length: a sequence or encapsulated pixel data. dicom-rs reads any
            // other element of undefined length as a sequence too, in the same encoding.
            stack.push((None, tag == PIXEL_DATA));
            pos = body;
            continue;
        }
        let end = body.checked_add(len as usize).filter(|e| *e <= bytes.len()).ok_or_else(|| {
            format!(
                "element ({group:04X},{elem:04X}) at byte {pos} claims {len} bytes but only {} remain (truncated file?)",
                bytes.len().saturating_sub(body)
            )
        })?;
        if &vr == b"SQ" {
            stack.push((Some(end), false));
            pos = body;
        } else {
            if multi_valued_text_vr(vr) {
                let values = bytes[body..end].iter().filter(|b| **b == b'\\').count() + 1;
                if values > MAX_TEXT_VALUES {
                    return Err(format!(
                        "element ({group:04X},{elem:04X}) at byte {pos} holds {values} values (limit {MAX_TEXT_VALUES})"
                    ));
                }
            }
            pos = end;
        }
    }
    Ok(())
}

/// What a compressed frame's own header declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CodestreamSize {
    /// Lines (rows).
    pub rows: u32,
    /// Samples per line (columns).
    pub columns: u32,
    /// Components (samples per pixel).
    pub components: u32,
    /// Bits per sample (the largest over the components).
    pub precision: u32,
}

/// Most tiles a JPEG 2000 image may have: tile indices (Isot) are 16-bit. openjp2 allocates a
/// structure per tile from the SIZ marker alone, so a 1-pixel tile grid over a large image
/// would cost gigabytes before any data is read.
const MAX_J2K_TILES: u64 = 65_535;

fn be16(b: &[u8], p: usize) -> Option<u32> {
    let s = b.get(p..p.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]) as u32)
}

fn be32(b: &[u8], p: usize) -> Option<u32> {
    let s = b.get(p..p.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Reads the frame header (SOF marker) of a JPEG code stream (ISO 10918-1 B.2.2), walking
/// the marker segments before it without decoding anything.
pub(crate) fn jpeg_frame_header(data: &[u8]) -> Result<CodestreamSize, String> {
    if data.get(0..2) != Some(&[0xFF, 0xD8]) {
        return Err("the JPEG code stream does not start with an SOI marker".into());
    }
    let mut pos = 2;
    loop {
        if data.get(pos) != Some(&0xFF) {
            return Err(format!(
                "no JPEG marker at byte {pos} before the frame header (garbage or truncated)"
            ));
        }
        // Any number of 0xFF fill bytes may precede a marker.
        while data.get(pos) == Some(&0xFF) {
            pos += 1;
        }
        let Some(&marker) = data.get(pos) else {
            return Err("the JPEG code stream ends before its frame header".into());
        };
        pos += 1;
        match marker {
            // Markers without a length: TEM, RSTn, SOI.
            0x01 | 0xD0..=0xD8 => continue,
            0xD9 => return Err("the JPEG code stream ends (EOI) before a frame header".into()),
            0xDA => return Err("a JPEG scan starts before the frame header".into()),
            0x00 => return Err(format!("stuffed byte where a JPEG marker belongs at {pos}")),
            _ => {}
        }
        let len =
            be16(data, pos).ok_or("the JPEG code stream ends inside a marker segment")? as usize;
        if len < 2 || pos + len > data.len() {
            return Err(format!(
                "JPEG marker FF{marker:02X} at byte {} claims {len} bytes (truncated?)",
                pos - 2
            ));
        }
        // SOF0–SOF15 except DHT (C4), JPG (C8) and DAC (CC).
        if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            if len < 8 {
                return Err(format!("JPEG frame header of {len} bytes is too short"));
            }
            let precision = data[pos + 2] as u32;
            let rows = be16(data, pos + 3).unwrap_or(0);
            let columns = be16(data, pos + 5).unwrap_or(0);
            let components = data[pos + 7] as u32;
            if len < 8 + 3 * components as usize {
                return Err(format!(
                    "JPEG frame header of {len} bytes cannot describe {components} components"
                ));
            }
            return Ok(CodestreamSize {
                rows,
                columns,
                components,
                precision,
            });
        }
        pos += len;
    }
}

/// Reads the image and tile size (SIZ marker, ISO 15444-1 A.5.1) of a JPEG 2000 code stream,
/// bare or wrapped in a JP2 file, and refuses impossible geometry before openjp2 sees it.
pub(crate) fn j2k_frame_header(data: &[u8]) -> Result<CodestreamSize, String> {
    const JP2_SIGNATURE: [u8; 12] = [0, 0, 0, 12, b'j', b'P', b' ', b' ', 0x0D, 0x0A, 0x87, 0x0A];
    let cs = if data.starts_with(&[0xFF, 0x4F]) {
        data
    } else if data.starts_with(&JP2_SIGNATURE) {
        jp2_codestream(data)?
    } else {
        return Err("not a JPEG 2000 code stream (no SOC marker)".into());
    };
    if cs.get(2..4) != Some(&[0xFF, 0x51]) {
        return Err("the JPEG 2000 code stream has no SIZ marker after SOC".into());
    }
    let short = || "the JPEG 2000 SIZ marker is truncated".to_string();
    let lsiz = be16(cs, 4).ok_or_else(short)? as usize;
    let field = |k: usize| be32(cs, 8 + 4 * k).ok_or_else(short);
    let (xsiz, ysiz, xosiz, yosiz) = (field(0)?, field(1)?, field(2)?, field(3)?);
    let (xtsiz, ytsiz, xtosiz, ytosiz) = (field(4)?, field(5)?, field(6)?, field(7)?);
    let csiz = be16(cs, 40).ok_or_else(short)?;
    if csiz == 0 || lsiz != 38 + 3 * csiz as usize {
        return Err(format!(
            "JPEG 2000 SIZ marker of {lsiz} bytes with {csiz} components"
        ));
    }
    if xosiz >= xsiz || yosiz >= ysiz {
        return Err(format!(
            "JPEG 2000 image offset ({xosiz},{yosiz}) lies outside its size {xsiz}x{ysiz}"
        ));
    }
    if xtsiz == 0 || ytsiz == 0 || xtosiz > xosiz || ytosiz > yosiz {
        return Err(format!(
            "JPEG 2000 tiles of {xtsiz}x{ytsiz} at ({xtosiz},{ytosiz}) are impossible"
        ));
    }
    let tiles = ((xsiz - xtosiz) as u64).div_ceil(xtsiz as u64)
        * ((ysiz - ytosiz) as u64).div_ceil(ytsiz as u64);
    if tiles > MAX_J2K_TILES {
        return Err(format!(
            "JPEG 2000 image split into {tiles} tiles (at most {MAX_J2K_TILES} exist)"
        ));
    }
    let mut precision = 0;
    for k in 0..csiz as usize {
        let c = 42 + 3 * k;
        let (ssiz, dx, dy) = match cs.get(c..c + 3) {
            Some(b) => (b[0], b[1], b[2]),
            None => return Err(short()),
        };
        if dx != 1 || dy != 1 {
            return Err(format!(
                "JPEG 2000 component {k} is subsampled {dx}x{dy} (not used by DICOM)"
            ));
        }
        precision = precision.max((ssiz & 0x7F) as u32 + 1);
    }
    Ok(CodestreamSize {
        rows: ysiz - yosiz,
        columns: xsiz - xosiz,
        components: csiz,
        precision,
    })
}

/// Whether a JPEG or JPEG 2000 code stream ends with its end marker (EOI or EOC, both FFD9),
/// ignoring the bytes that pad a fragment to even length (00, or FF as some JPEG 2000
/// encoders write). Both decoders fill the missing part of a truncated stream with flat grey
/// rather than failing, so this is how a truncated frame is told apart from a whole one.
pub(crate) fn ends_with_end_marker(data: &[u8]) -> bool {
    let end = data
        .iter()
        .rposition(|b| *b != 0x00 && *b != 0xFF)
        .map_or(0, |p| p + 1);
    data[..end].ends_with(&[0xFF, 0xD9])
}

/// The contiguous code stream box (`jp2c`) of a JP2 file.
fn jp2_codestream(data: &[u8]) -> Result<&[u8], String> {
    let mut pos = 0usize;
    while pos < data.len() {
        let lbox = be32(data, pos).ok_or("a JP2 box header is truncated")? as u64;
        let tbox = data
            .get(pos + 4..pos + 8)
            .ok_or("a JP2 box header is truncated")?;
        let (header, len) = match lbox {
            0 => (8, (data.len() - pos) as u64),
            1 => {
                let hi = be32(data, pos + 8).ok_or("a JP2 box header is truncated")? as u64;
                let lo = be32(data, pos + 12).ok_or("a JP2 box header is truncated")? as u64;
                (16, (hi << 32) | lo)
            }
            n => (8, n),
        };
        if len < header as u64 || len > (data.len() - pos) as u64 {
            return Err(format!("JP2 box at byte {pos} claims {len} bytes"));
        }
        if tbox == b"jp2c" {
            return Ok(&data[pos + header..pos + len as usize]);
        }
        pos += len as usize;
    }
    Err("the JP2 file holds no code stream box".into())
}

/// The byte range of each segment of an RLE Lossless frame (PS3.5 G.3: a 64-byte header of a
/// segment count and 15 offsets, then the segments in order).
pub(crate) fn rle_segments(
    frame: &[u8],
    expected: usize,
) -> Result<Vec<std::ops::Range<usize>>, String> {
    const HEADER: usize = 64;
    const MAX_SEGMENTS: usize = 15;
    let le32 = |p: usize| -> Option<usize> {
        let s = frame.get(p..p + 4)?;
        Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
    };
    if frame.len() < HEADER {
        return Err(format!(
            "RLE frame of {} bytes is shorter than its 64-byte header",
            frame.len()
        ));
    }
    let count = le32(0).unwrap_or(0);
    if count == 0 || count > MAX_SEGMENTS || count != expected {
        return Err(format!(
            "RLE header declares {count} segments; this image needs {expected} (1 to {MAX_SEGMENTS})"
        ));
    }
    let mut ranges = Vec::with_capacity(count);
    for k in 0..count {
        let start = le32(4 + 4 * k).unwrap_or(0);
        let end = if k + 1 < count {
            le32(8 + 4 * k).unwrap_or(0)
        } else {
            frame.len()
        };
        if start < HEADER || start > end || end > frame.len() {
            return Err(format!(
                "RLE segment {k} spans bytes {start}..{end} of a {}-byte frame",
                frame.len()
            ));
        }
        ranges.push(start..end);
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elem_le(tag: (u16, u16), vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&tag.0.to_le_bytes());
        v.extend_from_slice(&tag.1.to_le_bytes());
        v.extend_from_slice(vr);
        if long_length_vr(*vr) {
            v.extend_from_slice(&[0, 0]);
            v.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            v.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        v.extend_from_slice(value);
        v
    }

    #[test]
    fn accepts_consistent_lengths() {
        let mut b = elem_le((0x0028, 0x0010), b"US", &[1, 0]);
        b.extend(elem_le((0x7FE0, 0x0010), b"OB", &[0; 16]));
        assert!(check(&b, 0, Layout::ExplicitLittle).is_ok());
    }

    #[test]
    fn refuses_length_past_end() {
        let mut b = elem_le((0x0028, 0x0010), b"US", &[1, 0]);
        let mut px = elem_le((0x7FE0, 0x0010), b"OB", &[0; 16]);
        px[8..12].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        b.extend(px);
        let err = check(&b, 0, Layout::ExplicitLittle).unwrap_err();
        assert!(err.contains("(7FE0,0010)"), "{err}");
    }

    #[test]
    fn walks_encapsulated_fragments() {
        let mut b = Vec::new();
        b.extend_from_slice(&0x7FE0u16.to_le_bytes());
        b.extend_from_slice(&0x0010u16.to_le_bytes());
        b.extend_from_slice(b"OB\0\0");
        b.extend_from_slice(&UNDEFINED.to_le_bytes());
        for frag in [&[][..], &[1u8, 2, 3, 4][..]] {
            b.extend_from_slice(&0xFFFEu16.to_le_bytes());
            b.extend_from_slice(&0xE000u16.to_le_bytes());
            b.extend_from_slice(&(frag.len() as u32).to_le_bytes());
            b.extend_from_slice(frag);
        }
        b.extend_from_slice(&0xFFFEu16.to_le_bytes());
        b.extend_from_slice(&0xE0DDu16.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        assert!(check(&b, 0, Layout::ExplicitLittle).is_ok());
        // A fragment claiming more than the file holds.
        let n = b.len();
        b[n - 8 - 4 - 4..n - 8 - 4].copy_from_slice(&1000u32.to_le_bytes());
        assert!(check(&b, 0, Layout::ExplicitLittle).is_err());
    }

    /// `depth` sequences (0018,6011) each holding one item, nested, explicit VR LE with
    /// undefined lengths.
    fn nested_explicit(depth: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for _ in 0..depth {
            b.extend_from_slice(&[0x18, 0x00, 0x11, 0x60, b'S', b'Q', 0, 0]);
            b.extend_from_slice(&UNDEFINED.to_le_bytes());
            b.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
            b.extend_from_slice(&UNDEFINED.to_le_bytes());
        }
        for _ in 0..depth {
            b.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
            b.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        }
        b
    }

    #[test]
    fn refuses_deep_nesting_without_recursing() {
        assert!(check(&nested_explicit(3), 0, Layout::ExplicitLittle).is_ok());
        let err = check(&nested_explicit(5_000), 0, Layout::ExplicitLittle).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
    }

    #[test]
    fn implicit_vr_sequences_of_defined_length_are_entered() {
        // Implicit VR: (0018,6011) is SQ by the dictionary; lengths are defined, so only the
        // dictionary tells the walk to look inside.
        let mut inner: Vec<u8> = Vec::new();
        for _ in 0..5_000 {
            let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
            item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
            item.extend_from_slice(&inner);
            let mut sq = vec![0x18, 0x00, 0x11, 0x60];
            sq.extend_from_slice(&(item.len() as u32).to_le_bytes());
            sq.extend_from_slice(&item);
            inner = sq;
        }
        let err = check(&inner, 0, Layout::ImplicitLittle).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
    }

    #[test]
    fn refuses_text_elements_of_countless_values() {
        let ok = elem_le((0x0008, 0x0060), b"CS", b"US\\OT");
        assert!(check(&ok, 0, Layout::ExplicitLittle).is_ok());
        let bad = elem_le((0x0008, 0x0060), b"UC", &vec![b'\\'; MAX_TEXT_VALUES + 1]);
        let err = check(&bad, 0, Layout::ExplicitLittle).unwrap_err();
        assert!(err.contains("values"), "{err}");
    }

    /// A raw deflate stream of stored blocks (no compression).
    fn stored_deflate(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let chunks: Vec<&[u8]> = data.chunks(65_535).collect();
        for (k, c) in chunks.iter().enumerate() {
            out.push(u8::from(k + 1 == chunks.len()));
            out.extend_from_slice(&(c.len() as u16).to_le_bytes());
            out.extend_from_slice(&(!(c.len() as u16)).to_le_bytes());
            out.extend_from_slice(c);
        }
        out
    }

    #[test]
    fn inflation_stops_at_the_limit() {
        let data: Vec<u8> = (0..200_000u32).map(|v| (v % 251) as u8).collect();
        let z = stored_deflate(&data);
        assert_eq!(inflate_bounded(&z, 200_000).unwrap(), data);
        assert!(matches!(
            inflate_bounded(&z, 199_999),
            Err(InflateError::TooLarge(199_999))
        ));
        assert!(matches!(
            inflate_bounded(&[0xFF; 16], 1_000),
            Err(InflateError::Corrupt(_))
        ));
    }

    #[test]
    fn reads_jpeg_frame_headers() {
        // SOI, an APP0 segment, SOF0: 8 bits, 480 rows, 640 columns, 3 components.
        let mut j = vec![
            0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 1, 2, 0xFF, 0xC0, 0, 17, 8, 0x01, 0xE0,
        ];
        j.extend_from_slice(&[0x02, 0x80, 3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        let h = jpeg_frame_header(&j).unwrap();
        assert_eq!(
            (h.rows, h.columns, h.components, h.precision),
            (480, 640, 3, 8)
        );
        // Truncated inside the frame header, garbage, and a scan before any frame header.
        assert!(jpeg_frame_header(&j[..12]).is_err());
        assert!(jpeg_frame_header(&[0x12; 32]).is_err());
        assert!(jpeg_frame_header(&[0xFF, 0xD8, 0xFF, 0xDA, 0, 2]).is_err());
    }

    #[test]
    fn reads_j2k_siz_and_refuses_absurd_tiling() {
        let siz = |w: u32, h: u32, tw: u32, th: u32, comps: u16| -> Vec<u8> {
            let mut b = vec![0xFF, 0x4F, 0xFF, 0x51];
            b.extend_from_slice(&(38 + 3 * comps).to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            for v in [w, h, 0, 0, tw, th, 0, 0] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            b.extend_from_slice(&comps.to_be_bytes());
            for _ in 0..comps {
                b.extend_from_slice(&[7, 1, 1]);
            }
            b
        };
        let h = j2k_frame_header(&siz(640, 480, 640, 480, 3)).unwrap();
        assert_eq!(
            (h.rows, h.columns, h.components, h.precision),
            (480, 640, 3, 8)
        );
        let err = j2k_frame_header(&siz(60_000, 60_000, 1, 1, 1)).unwrap_err();
        assert!(err.contains("tiles"), "{err}");
        assert!(j2k_frame_header(&siz(640, 480, 0, 480, 1)).is_err());
        assert!(j2k_frame_header(&siz(640, 480, 640, 480, 3)[..30]).is_err());
        assert!(j2k_frame_header(b"garbage, not a code stream").is_err());
    }

    #[test]
    fn an_unknown_vr_has_a_four_byte_length_as_dicom_rs_reads_it() {
        // (0000,0000) with VR bytes 00 00: dicom-rs reads it as UN, so bytes 8..12 are its
        // length (here 0xFFFCFFFC), not bytes 6..8 (0).
        let mut b = vec![0u8; 8];
        b.extend_from_slice(&0xFFFC_FFFCu32.to_le_bytes());
        b.extend_from_slice(&[0; 32]);
        let err = check(&b, 0, Layout::ExplicitLittle).unwrap_err();
        assert!(err.contains("claims 4294770684 bytes"), "{err}");
    }
}
