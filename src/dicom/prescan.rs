//! A bounds check of a DICOM file's element headers, run before dicom-rs parses it.
//!
//! The parser reserves each value's declared length before it reads it, so a corrupt length
//! of nearly 4 GiB would cost that much memory before the read fails. This walk reads only
//! the headers (tag, VR, length), enters sequences and items, skips values, and refuses any
//! value that claims more bytes than remain in the file. It costs one pass over the headers.

/// The byte layout of the data set after the file meta group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Explicit VR, little endian.
    ExplicitLittle,
    /// Implicit VR, little endian.
    ImplicitLittle,
    /// Explicit VR, big endian.
    ExplicitBig,
    /// Compressed data set (deflate): not walked here.
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
/// Nesting beyond this is not real DICOM; it guards the walk against crafted inputs.
const MAX_DEPTH: usize = 64;

fn long_length_vr(vr: [u8; 2]) -> bool {
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

/// Walks the data set starting at `start` (just after the file meta group).
/// Returns a description of the first impossible length found.
pub(crate) fn check(bytes: &[u8], start: usize, layout: Layout) -> Result<(), String> {
    if layout == Layout::Deflated {
        return Ok(());
    }
    let big = layout == Layout::ExplicitBig;
    let explicit = layout != Layout::ImplicitLittle;
    let u16_at = |p: usize| -> Option<u16> {
        let b = bytes.get(p..p + 2)?;
        Some(if big {
            u16::from_be_bytes([b[0], b[1]])
        } else {
            u16::from_le_bytes([b[0], b[1]])
        })
    };
    let u32_at = |p: usize| -> Option<u32> {
        let b = bytes.get(p..p + 4)?;
        let a = [b[0], b[1], b[2], b[3]];
        Some(if big {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    };
    // Each open container: (end offset if defined, is encapsulated pixel data).
    let mut stack: Vec<(Option<usize>, bool)> = Vec::new();
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
                "sequences nested deeper than {MAX_DEPTH} at byte {pos}"
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
                Some(v) => [v[0], v[1]],
                None => return Err(format!("truncated element header at byte {pos}")),
            };
            if long_length_vr(vr) {
                let Some(len) = u32_at(pos + 8) else {
                    return Err(format!("truncated element header at byte {pos}"));
                };
                (Some(vr), len, pos + 12)
            } else {
                let Some(len) = u16_at(pos + 6) else {
                    return Err(format!("truncated element header at byte {pos}"));
                };
                (Some(vr), len as u32, pos + 8)
            }
        } else {
            let Some(len) = u32_at(pos + 4) else {
                return Err(format!("truncated element header at byte {pos}"));
            };
            (None, len, pos + 8)
        };
        let is_sq = vr == Some(*b"SQ");
        if len == UNDEFINED {
            // Undefined length: a sequence, encapsulated pixel data, or (implicit VR) an SQ.
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
        if is_sq {
            stack.push((Some(end), false));
            pos = body;
        } else {
            pos = end;
        }
    }
    Ok(())
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
}
