//! OpenIGTLink (the protocol of 3D Slicer and PLUS): messages and a server that runs the
//! pipeline on received images.
//!
//! Wire format (all numbers big-endian): a 58-byte header — version u16 (1: v2 header; 2: v3,
//! with an extended header and metadata in the body), type char[12], device name char[20],
//! timestamp u64, body size u64, CRC-64 (ECMA-182, polynomial 0x42F0E1EBA9EA3693, no
//! reflection) of the body — then the body. IMAGE content: a 72-byte image header (version,
//! components, scalar type, endianness, coordinate system, size[3], 12-float matrix whose
//! columns are the i, j, k axes scaled by the spacing and the image centre, sub-volume) and the
//! pixels. POINT: 136 bytes per point. STRING: encoding u16, length u16, bytes. STATUS: code
//! u16, sub-code i64, error name char[20], message (NUL-terminated).
//!
//! The server answers each IMAGE with an IMAGE (the overlay, RGB), a POINT (entry and target,
//! in the image's world frame) and a STRING (the plan as JSON), all with the IMAGE's timestamp,
//! device names derived from its device name ([`reply_device`]) and, for the overlay, its
//! coordinate system. A frame that cannot be answered (unusable content, pipeline error) gets a
//! STATUS with the IMAGE's device name and the reason, and the connection goes on. Peers are
//! distrusted: bodies are buffered as their bytes arrive, never from the declared size; every
//! number taken from a message is checked; connections are capped, each with a memory bound and
//! read, idle and write timeouts; broken framing closes that connection only; the server stops
//! within a polling tick of its stop flag being set.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ndarray::Array2;

use crate::frame::{Calibration, CalibrationSource, Frame};
use crate::{Pipeline, Result, Session};

/// Errors of the OpenIGTLink server (per-connection failures are reported as events —
/// [`Event::Refused`], [`Event::Rejected`], [`Event::Failed`] — not as errors: one peer's
/// trouble never stops the server).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IgtlError {
    /// The listening socket could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The listening socket has no local address.
    #[error("the server's socket has no local address")]
    NoAddress,
    /// A server setting cannot work.
    #[error("server setting {field}: {reason}")]
    Config {
        /// The [`ServerConfig`] field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Header size in bytes.
pub const HEADER_BYTES: usize = 58;
/// Bytes of the device name field of the header.
pub const DEVICE_NAME_BYTES: usize = 20;
/// IMAGE content header size in bytes.
pub const IMAGE_HEADER_BYTES: usize = 72;
/// Bytes per point of a POINT message.
pub const POINT_BYTES: usize = 136;
/// STATUS content before its message text: code, sub-code, error name.
pub const STATUS_HEADER_BYTES: usize = 30;
/// Default bound on a message body: a 4096 x 4096 RGB 16-bit image (96 MiB) fits.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 128 << 20;
/// Default bound on the bytes buffered for one connection: one largest body. A connection holds
/// one message or one set of replies at a time (the body is freed before the pipeline runs),
/// and the replies to the largest image (a 48 MiB overlay) fit as well.
pub const DEFAULT_MAX_CONNECTION_BYTES: u64 = DEFAULT_MAX_BODY_BYTES;
/// Default cap on connections served at once: a guidance set-up has a scanner or PLUS and one
/// or two viewers; 32 leaves ample room while bounding threads (one per connection) and memory
/// (cap × per-connection bound).
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;
/// Suffix of the overlay IMAGE's device name (see [`reply_device`]).
pub const OVERLAY_SUFFIX: &str = "_overlay";
/// Suffix of the POINT reply's device name.
pub const POINTS_SUFFIX: &str = "_points";
/// Suffix of the STRING (plan JSON) reply's device name.
pub const PLAN_SUFFIX: &str = "_plan";
/// Bytes of the incoming device name kept in reply names: the 20-byte field less the longest
/// suffix, so that all three replies share one prefix.
pub const REPLY_BASE_BYTES: usize = DEVICE_NAME_BYTES - OVERLAY_SUFFIX.len();
/// Reply base name when the incoming device name is empty.
pub const DEFAULT_REPLY_BASE: &str = "sonoguide";

/// STATUS codes of the OpenIGTLink specification that the server sends.
pub mod status {
    /// Unknown error: the pipeline failed on the frame.
    pub const UNKNOWN_ERROR: u16 = 2;
    /// Busy: the connection cap is reached (sent before closing a connection beyond it).
    pub const BUSY: u16 = 6;
    /// Time out: a started message did not arrive within the read timeout.
    pub const TIME_OUT: u16 = 7;
    /// Overflow: a message or its replies exceed a size limit.
    pub const OVERFLOW: u16 = 8;
    /// Checksum error: the body's CRC-64 does not match the header's.
    pub const CHECKSUM_ERROR: u16 = 9;
    /// Configuration error: the IMAGE content is invalid or not handled (sizes, matrix,
    /// coordinate system, pixel format).
    pub const CONFIG_ERROR: u16 = 10;

    /// The error-name field for a code.
    pub fn name(code: u16) -> &'static str {
        match code {
            1 => "OK",
            UNKNOWN_ERROR => "Unknown error",
            BUSY => "Busy",
            TIME_OUT => "Time out",
            OVERFLOW => "Overflow",
            CHECKSUM_ERROR => "Checksum error",
            CONFIG_ERROR => "Configuration error",
            _ => "Error",
        }
    }
}

/// CRC-64/ECMA-182 as OpenIGTLink uses it (MSB first, init 0, no final xor).
pub fn crc64(data: &[u8]) -> u64 {
    const POLY: u64 = 0x42F0_E1EB_A9EA_3693;
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = (i as u64) << 56;
            for _ in 0..8 {
                c = if c & (1 << 63) != 0 {
                    (c << 1) ^ POLY
                } else {
                    c << 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = 0u64;
    for &b in data {
        crc = table[(((crc >> 56) as u8) ^ b) as usize] ^ (crc << 8);
    }
    crc
}

/// A parsed message header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// 1 (v2 header) or 2 (v3: extended header and metadata).
    pub version: u16,
    /// Message type, e.g. "IMAGE".
    pub kind: String,
    /// Device name.
    pub device: String,
    /// Timestamp (OpenIGTLink fixed point: seconds in the high 32 bits).
    pub timestamp: u64,
    /// Body size in bytes.
    pub body_size: u64,
    /// CRC-64 of the body.
    pub crc: u64,
}

fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_string()
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}
fn be_f32(b: &[u8]) -> f32 {
    f32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Header {
    /// Parses the 58 header bytes.
    pub fn parse(b: &[u8; HEADER_BYTES]) -> Header {
        Header {
            version: be_u16(&b[0..2]),
            kind: text(&b[2..14]),
            device: text(&b[14..34]),
            timestamp: be_u64(&b[34..42]),
            body_size: be_u64(&b[42..50]),
            crc: be_u64(&b[50..58]),
        }
    }
}

/// The current time as an OpenIGTLink timestamp (seconds in the high 32 bits, fraction in the
/// low 32).
pub fn timestamp_now() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let frac = ((now.subsec_nanos() as u64) << 32) / 1_000_000_000;
    (now.as_secs() << 32) | frac
}

/// Builds a complete message (v2 header) of `kind` from `device` with `content`, stamped now.
pub fn message(kind: &str, device: &str, content: &[u8]) -> Vec<u8> {
    message_at(kind, device, timestamp_now(), content)
}

/// Builds a complete message (v2 header) with the given timestamp (replies carry the one of
/// the message they answer). Type and device name are cut to their 12 and 20 bytes.
pub fn message_at(kind: &str, device: &str, timestamp: u64, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + content.len());
    out.extend_from_slice(&1u16.to_be_bytes());
    let mut name = [0u8; 12];
    name[..kind.len().min(12)].copy_from_slice(&kind.as_bytes()[..kind.len().min(12)]);
    out.extend_from_slice(&name);
    let mut dev = [0u8; DEVICE_NAME_BYTES];
    let n = device.len().min(DEVICE_NAME_BYTES);
    dev[..n].copy_from_slice(&device.as_bytes()[..n]);
    out.extend_from_slice(&dev);
    out.extend_from_slice(&timestamp.to_be_bytes());
    out.extend_from_slice(&(content.len() as u64).to_be_bytes());
    out.extend_from_slice(&crc64(content).to_be_bytes());
    out.extend_from_slice(content);
    out
}

/// The device name of a reply to a message from `incoming`: its first [`REPLY_BASE_BYTES`]
/// bytes (cut at a character boundary; [`DEFAULT_REPLY_BASE`] when empty) followed by `suffix`.
///
/// Replies are not named exactly like the IMAGE they answer: clients such as pyigtl keep the
/// last message per device name (three replies with one name would overwrite each other), and
/// 3D Slicer would update the sender's own image node with the overlay.
pub fn reply_device(incoming: &str, suffix: &str) -> String {
    let base = if incoming.is_empty() {
        DEFAULT_REPLY_BASE
    } else {
        incoming
    };
    let room = REPLY_BASE_BYTES.min(DEVICE_NAME_BYTES.saturating_sub(suffix.len()));
    let mut cut = base.len().min(room);
    while !base.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &base[..cut])
}

/// The content of a body (for v3, the extended header and metadata removed), or why it is
/// invalid. Borrows: no copy of a body that may be large.
pub fn content<'a>(header: &Header, body: &'a [u8]) -> std::result::Result<&'a [u8], String> {
    if header.version < 2 {
        return Ok(body);
    }
    if body.len() < 12 {
        return Err(format!(
            "v3 body of {} bytes is shorter than its 12-byte extended header",
            body.len()
        ));
    }
    let ext = be_u16(&body[0..2]) as usize;
    let meta_header = be_u16(&body[2..4]) as usize;
    let meta = be_u32(&body[4..8]) as usize;
    let end = meta_header
        .checked_add(meta)
        .and_then(|m| body.len().checked_sub(m))
        .ok_or_else(|| {
            format!(
                "metadata of {meta_header} + {meta} bytes is larger than the {}-byte body",
                body.len()
            )
        })?;
    if ext < 12 || ext > end {
        return Err(format!(
            "extended header size {ext} (12 to {end} possible in this body)"
        ));
    }
    Ok(&body[ext..end])
}

/// The world coordinate system of an IMAGE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoordinateSystem {
    /// Right, anterior, superior (code 1; 3D Slicer's).
    Ras,
    /// Left, posterior, superior (code 2; DICOM's).
    Lps,
}

impl CoordinateSystem {
    /// The code in the IMAGE header.
    pub fn code(self) -> u8 {
        match self {
            CoordinateSystem::Ras => 1,
            CoordinateSystem::Lps => 2,
        }
    }

    /// From the code in the IMAGE header (1 or 2).
    pub fn from_code(code: u8) -> Option<CoordinateSystem> {
        match code {
            1 => Some(CoordinateSystem::Ras),
            2 => Some(CoordinateSystem::Lps),
            _ => None,
        }
    }
}

/// An image received in an IMAGE message.
#[derive(Debug, Clone)]
pub struct ImageIn {
    /// Columns (i).
    pub width: usize,
    /// Rows (j).
    pub height: usize,
    /// 1 (greyscale) or 3 (RGB).
    pub components: usize,
    /// Intensity 0–255 (luma for RGB).
    pub intensity: Array2<f32>,
    /// The 12 matrix floats as received (i, j, k axes × spacing, centre).
    pub matrix: [f32; 12],
    /// Millimetres per pixel along i and j (the axes' lengths).
    pub spacing_mm: (f64, f64),
    /// The world frame of the matrix.
    pub coordinates: CoordinateSystem,
}

/// Smallest image side handled, pixels: the pipeline's filters and feature windows span
/// several pixels, and no ultrasound frame is narrower.
pub const MIN_IMAGE_SIDE: usize = 16;
/// Largest distance of the image centre from the world origin, mm: no patient is 100 m
/// across, and beyond it f32 positions lose sub-0.01 mm precision.
pub const MAX_WORLD_MM: f64 = 1e5;
/// Smallest sine of the angle between the i and j axes: axes closer than about half a degree
/// to parallel do not span an image plane.
pub const MIN_AXIS_SINE: f64 = 0.01;

/// Checks the IMAGE matrix: every element finite, spacings plausible, i and j axes spanning a
/// plane, the centre within reach. Returns the spacings (mm per pixel along i and j).
fn check_matrix(m: &[f32; 12]) -> std::result::Result<(f64, f64), String> {
    if let Some(k) = m.iter().position(|v| !v.is_finite()) {
        return Err(format!("IMAGE matrix element {k} is not finite ({})", m[k]));
    }
    let v = |k: usize| [m[k] as f64, m[k + 1] as f64, m[k + 2] as f64];
    let norm = |a: [f64; 3]| (a[0] * a[0] + a[1] * a[1] + a[2] * a[2]).sqrt();
    let (t, s, c) = (v(0), v(3), v(9));
    let (sx, sy) = (norm(t), norm(s));
    if let Some(reason) = crate::frame::check_spacing_mm(sx, sy) {
        return Err(format!("IMAGE matrix: {reason}"));
    }
    let cross = [
        t[1] * s[2] - t[2] * s[1],
        t[2] * s[0] - t[0] * s[2],
        t[0] * s[1] - t[1] * s[0],
    ];
    if norm(cross) < MIN_AXIS_SINE * sx * sy {
        return Err("IMAGE matrix: the i and j axes are (nearly) parallel".into());
    }
    if let Some(k) = c.iter().position(|x| x.abs() > MAX_WORLD_MM) {
        return Err(format!(
            "IMAGE matrix: centre coordinate {k} is {} mm, beyond {MAX_WORLD_MM} mm",
            c[k]
        ));
    }
    Ok((sx, sy))
}

/// Parses IMAGE content: 2-D, 8- or 16-bit, 1 or 3 components, RAS or LPS, the whole volume
/// (no sub-volume), exactly the pixel bytes its sizes call for, and a usable matrix.
pub fn parse_image(c: &[u8], max_pixels: u64) -> std::result::Result<ImageIn, String> {
    if c.len() < IMAGE_HEADER_BYTES {
        return Err(format!(
            "IMAGE content of {} bytes is shorter than its {IMAGE_HEADER_BYTES}-byte header",
            c.len()
        ));
    }
    let version = be_u16(&c[0..2]);
    if version != 1 && version != 2 {
        return Err(format!("IMAGE header version {version} (1 or 2 handled)"));
    }
    let components = c[2] as usize;
    let scalar = c[3];
    let little = match c[4] {
        1 => false,
        2 => true,
        other => return Err(format!("IMAGE endianness {other} (1 big, 2 little)")),
    };
    let coordinates = CoordinateSystem::from_code(c[5])
        .ok_or_else(|| format!("IMAGE coordinate system {} (1 RAS, 2 LPS)", c[5]))?;
    let (w, h, d) = (
        be_u16(&c[6..8]) as usize,
        be_u16(&c[8..10]) as usize,
        be_u16(&c[10..12]) as usize,
    );
    let mut matrix = [0f32; 12];
    for (k, m) in matrix.iter_mut().enumerate() {
        *m = be_f32(&c[12 + 4 * k..16 + 4 * k]);
    }
    if d != 1 || w == 0 || h == 0 {
        return Err(format!("only 2-D images are handled, got {w}x{h}x{d}"));
    }
    if w < MIN_IMAGE_SIDE || h < MIN_IMAGE_SIDE {
        return Err(format!(
            "{w}x{h} is smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels"
        ));
    }
    if (w * h) as u64 > max_pixels {
        return Err(format!("{w}x{h} exceeds the {max_pixels}-pixel limit"));
    }
    if components != 1 && components != 3 {
        return Err(format!("{components} components (1 or 3 handled)"));
    }
    let bytes = match scalar {
        2 | 3 => 1,
        4 | 5 => 2,
        other => {
            return Err(format!(
                "scalar type {other} (8- and 16-bit integers handled)"
            ))
        }
    };
    let sub: Vec<usize> = (0..6)
        .map(|k| be_u16(&c[60 + 2 * k..62 + 2 * k]) as usize)
        .collect();
    if sub != [0, 0, 0, w, h, d] {
        return Err(format!(
            "sub-volume at {:?} of size {:?} (only the whole {w}x{h}x{d} image is handled)",
            &sub[..3],
            &sub[3..]
        ));
    }
    let need = w * h * components * bytes;
    let px = &c[IMAGE_HEADER_BYTES..];
    if px.len() != need {
        return Err(format!(
            "IMAGE holds {} pixel bytes, {w}x{h}x{components} at {bytes} byte(s) needs {need}",
            px.len()
        ));
    }
    let spacing_mm = check_matrix(&matrix)?;
    let sample = |i: usize| -> f32 {
        match scalar {
            3 => px[i] as f32,
            2 => (px[i] as i8 as f32 + 128.0).max(0.0),
            _ => {
                let b = [px[2 * i], px[2 * i + 1]];
                let v = if little {
                    u16::from_le_bytes(b)
                } else {
                    u16::from_be_bytes(b)
                };
                let v = if scalar == 4 {
                    (v as i16 as i32 + 32768) as f32
                } else {
                    v as f32
                };
                v / 257.0
            }
        }
    };
    let intensity = Array2::from_shape_fn((h, w), |(y, x)| {
        let i = (y * w + x) * components;
        if components == 1 {
            sample(i)
        } else {
            0.299 * sample(i) + 0.587 * sample(i + 1) + 0.114 * sample(i + 2)
        }
    });
    Ok(ImageIn {
        width: w,
        height: h,
        components,
        intensity,
        matrix,
        spacing_mm,
        coordinates,
    })
}

/// IMAGE content for an RGB 8-bit image with the given matrix in the given world frame.
pub fn image_content(
    width: usize,
    height: usize,
    rgb: &[u8],
    matrix: &[f32; 12],
    coordinates: CoordinateSystem,
) -> Vec<u8> {
    let mut c = Vec::with_capacity(IMAGE_HEADER_BYTES + rgb.len());
    c.extend_from_slice(&1u16.to_be_bytes());
    c.push(3); // components
    c.push(3); // uint8
    c.push(2); // little endian (bytes)
    c.push(coordinates.code());
    for v in [width as u16, height as u16, 1] {
        c.extend_from_slice(&v.to_be_bytes());
    }
    for m in matrix {
        c.extend_from_slice(&m.to_be_bytes());
    }
    for v in [0u16, 0, 0, width as u16, height as u16, 1] {
        c.extend_from_slice(&v.to_be_bytes());
    }
    c.extend_from_slice(rgb);
    c
}

/// POINT content: named points (name, world position).
pub fn point_content(points: &[(&str, [f32; 3])]) -> Vec<u8> {
    let mut c = Vec::with_capacity(points.len() * POINT_BYTES);
    for (name, p) in points {
        let mut n = [0u8; 64];
        n[..name.len().min(64)].copy_from_slice(&name.as_bytes()[..name.len().min(64)]);
        c.extend_from_slice(&n);
        let mut g = [0u8; 32];
        g[..8].copy_from_slice(b"sonoguid");
        c.extend_from_slice(&g);
        c.extend_from_slice(&[255, 255, 255, 255]);
        for v in p {
            c.extend_from_slice(&v.to_be_bytes());
        }
        c.extend_from_slice(&2.0f32.to_be_bytes());
        c.extend_from_slice(&[0u8; 20]);
    }
    c
}

/// STRING content (US-ASCII, MIBenum 3).
pub fn string_content(s: &str) -> Vec<u8> {
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|b| b.is_ascii())
        .take(u16::MAX as usize)
        .collect();
    let mut c = Vec::with_capacity(4 + bytes.len());
    c.extend_from_slice(&3u16.to_be_bytes());
    c.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    c.extend_from_slice(&bytes);
    c
}

/// STATUS content: `code` (see [`status`]), sub-code 0, the code's error name, and `text`
/// (NUL-terminated, as the OpenIGTLink library writes it).
pub fn status_content(code: u16, text: &str) -> Vec<u8> {
    let mut c = Vec::with_capacity(STATUS_HEADER_BYTES + text.len() + 1);
    c.extend_from_slice(&code.to_be_bytes());
    c.extend_from_slice(&0i64.to_be_bytes());
    let mut name = [0u8; 20];
    let n = status::name(code).as_bytes();
    name[..n.len().min(20)].copy_from_slice(&n[..n.len().min(20)]);
    c.extend_from_slice(&name);
    c.extend_from_slice(text.as_bytes());
    c.push(0);
    c
}

/// World position (the image's frame) of pixel (x, y), from the IMAGE matrix: origin =
/// centre − ((size − 1) / 2) along each axis.
pub fn pixel_to_world(m: &[f32; 12], width: usize, height: usize, x: f64, y: f64) -> [f32; 3] {
    let (t, s, c) = (&m[0..3], &m[3..6], &m[9..12]);
    let (ci, cj) = ((width as f64 - 1.0) / 2.0, (height as f64 - 1.0) / 2.0);
    let mut out = [0f32; 3];
    for k in 0..3 {
        out[k] = (c[k] as f64 + (x - ci) * t[k] as f64 + (y - cj) * s[k] as f64) as f32;
    }
    out
}

/// The most bytes the replies to a `width` x `height` IMAGE take: three headers, the RGB
/// overlay, two points and the longest STRING.
pub fn reply_bytes_bound(width: usize, height: usize) -> u64 {
    let overlay = IMAGE_HEADER_BYTES as u64 + 3 * width as u64 * height as u64;
    let points = 2 * POINT_BYTES as u64;
    let plan = 4 + u16::MAX as u64;
    3 * HEADER_BYTES as u64 + overlay + points + plan
}

/// What the server reports to whoever runs it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// Listening.
    Listening(SocketAddr),
    /// A client connected (and has a slot).
    Connected(SocketAddr),
    /// A client left (its slot is free again).
    Disconnected(SocketAddr),
    /// A frame was answered.
    Answered {
        /// The client.
        peer: SocketAddr,
        /// Received to results sent, ms.
        latency_ms: f64,
        /// Plan status.
        status: &'static str,
    },
    /// The server closed a connection it was serving: broken framing, a limit, a timeout.
    Refused {
        /// The client.
        peer: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A connection beyond the cap was closed at once, unserved (after a best-effort STATUS
    /// "busy").
    Rejected {
        /// The client.
        peer: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A frame could not be answered; the client got a STATUS and the connection goes on.
    Failed {
        /// The client.
        peer: SocketAddr,
        /// The message's device name.
        device: String,
        /// The STATUS code sent (see [`status`]).
        code: u16,
        /// Why (also the STATUS message).
        reason: String,
    },
    /// A message of a type the server does not handle was ignored.
    Ignored {
        /// The client.
        peer: SocketAddr,
        /// Its type.
        kind: String,
    },
}

/// Server settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Largest message body accepted, bytes (a larger declared size closes the connection).
    pub max_body_bytes: u64,
    /// Largest image accepted, pixels.
    pub max_pixels: u64,
    /// Connections served at once; one beyond it is closed at once. Also the bound on client
    /// threads (one per connection).
    pub max_connections: usize,
    /// Bytes buffered for one connection (the body being received, then the replies being
    /// sent), besides a fixed read buffer of [`READ_CHUNK`] bytes. A message declaring more
    /// closes the connection; replies that would need more fail that frame (STATUS).
    pub max_connection_bytes: u64,
    /// How long one message may take to arrive, from its first byte to its last; a peer that
    /// starts a message and stalls is dropped after it.
    pub read_timeout: Duration,
    /// How long a connection may stay silent between messages before it is closed.
    pub idle_timeout: Duration,
    /// How long the replies to one frame may take to be taken by the peer; a peer that does
    /// not read is dropped after it.
    pub write_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_pixels: 4096 * 4096,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connection_bytes: DEFAULT_MAX_CONNECTION_BYTES,
            // 10 s: a 640x480 frame takes milliseconds on a LAN; the largest body (128 MiB)
            // needs 13 MB/s. A stalled peer holds a slot no longer.
            read_timeout: Duration::from_secs(10),
            // Two minutes: a viewer may pause streaming; an abandoned connection frees its
            // slot in bounded time.
            idle_timeout: Duration::from_secs(120),
            // 10 s for at most 48 MiB of replies: a peer that reads at all takes them sooner.
            write_timeout: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    fn check(&self) -> std::result::Result<(), IgtlError> {
        let bad = |field, reason: &str| {
            Err(IgtlError::Config {
                field,
                reason: reason.to_string(),
            })
        };
        if self.max_connections == 0 {
            return bad("max_connections", "0 would refuse every client");
        }
        if self.max_body_bytes == 0 || self.max_connection_bytes == 0 {
            return bad("max_body_bytes / max_connection_bytes", "must be positive");
        }
        for (field, d) in [
            ("read_timeout", self.read_timeout),
            ("idle_timeout", self.idle_timeout),
            ("write_timeout", self.write_timeout),
        ] {
            if d.is_zero() {
                return bad(field, "a zero timeout would drop every client");
            }
        }
        Ok(())
    }
}

/// Bytes read from a socket at a time: the fixed per-connection read buffer.
pub const READ_CHUNK: usize = 64 << 10;

/// Polling interval of socket reads and writes and of the accept loop: how fast a stop and a
/// timeout are noticed.
pub const TICK: Duration = Duration::from_millis(50);

/// An OpenIGTLink server around a pipeline.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    pipeline: Arc<Pipeline>,
    config: ServerConfig,
    stop: Arc<AtomicBool>,
    latencies: Arc<Mutex<Vec<f64>>>,
}

/// Why a connection ends.
enum End {
    /// The peer closed it between messages.
    Left,
    /// The server is stopping.
    Stopped,
    /// The server closes it, and why.
    Close(String),
}

fn is_tick(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// One connection's socket with the server's limits: every blocking call returns within a
/// tick, so that the stop flag and the deadlines are checked at least that often.
struct Conn<'a> {
    stream: TcpStream,
    stop: &'a AtomicBool,
    config: &'a ServerConfig,
}

impl<'a> Conn<'a> {
    fn new(
        stream: TcpStream,
        stop: &'a AtomicBool,
        config: &'a ServerConfig,
    ) -> std::io::Result<Conn<'a>> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(TICK))?;
        stream.set_write_timeout(Some(TICK))?;
        // Replies are three messages written back to back: do not hold the last one back.
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            stop,
            config,
        })
    }

    /// One read of at most a tick: `None` when nothing arrived.
    fn read_tick(&mut self, buf: &mut [u8]) -> std::result::Result<Option<usize>, End> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(End::Stopped);
        }
        match self.stream.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if is_tick(&e) => Ok(None),
            Err(e) => Err(End::Close(format!("read failed: {e}"))),
        }
    }

    /// Best effort, for a connection about to be closed: one write of at most a tick.
    fn try_send(&mut self, data: &[u8]) {
        let _ = self.stream.write(data);
    }

    /// Sends the messages within the write timeout.
    fn send(&mut self, messages: &[&[u8]]) -> std::result::Result<(), End> {
        let deadline = Instant::now() + self.config.write_timeout;
        let total: usize = messages.iter().map(|m| m.len()).sum();
        let mut sent = 0;
        for m in messages {
            let mut rest: &[u8] = m;
            while !rest.is_empty() {
                if self.stop.load(Ordering::Relaxed) {
                    return Err(End::Stopped);
                }
                match self.stream.write(rest) {
                    Ok(0) => return Err(End::Close("the peer takes no more data".into())),
                    Ok(n) => {
                        rest = &rest[n..];
                        sent += n;
                    }
                    Err(e) if is_tick(&e) => {}
                    Err(e) => return Err(End::Close(format!("write failed: {e}"))),
                }
                if !rest.is_empty() && Instant::now() >= deadline {
                    return Err(End::Close(format!(
                        "write timed out: the peer took {sent} of {total} reply bytes in {}",
                        secs(self.config.write_timeout)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Reads one message: waits up to the idle timeout for it to start, then up to the read
    /// timeout for all of it. The body grows as its bytes arrive.
    fn read_message(&mut self, scratch: &mut [u8]) -> std::result::Result<(Header, Vec<u8>), End> {
        let (read_timeout, idle_timeout) = (self.config.read_timeout, self.config.idle_timeout);
        let mut hb = [0u8; HEADER_BYTES];
        let mut got = 0;
        let idle_since = Instant::now();
        let mut started: Option<Instant> = None;
        while got < HEADER_BYTES {
            match self.read_tick(&mut hb[got..])? {
                Some(0) if got == 0 => return Err(End::Left),
                Some(0) => {
                    return Err(End::Close(format!(
                        "connection closed after {got} of {HEADER_BYTES} header bytes"
                    )))
                }
                Some(n) => {
                    started.get_or_insert_with(Instant::now);
                    got += n;
                }
                None => {}
            }
            match started {
                None if idle_since.elapsed() >= idle_timeout => {
                    return Err(End::Close(format!(
                        "idle for {}: no message started",
                        secs(idle_timeout)
                    )))
                }
                Some(t) if got < HEADER_BYTES && t.elapsed() >= read_timeout => {
                    return Err(End::Close(format!(
                        "read timed out: {got} of {HEADER_BYTES} header bytes in {}",
                        secs(read_timeout)
                    )))
                }
                _ => {}
            }
        }
        let started = started.unwrap_or_else(Instant::now);
        let header = Header::parse(&hb);
        if header.version != 1 && header.version != 2 {
            return Err(End::Close(format!(
                "header version {} (1 or 2 expected): not OpenIGTLink",
                header.version
            )));
        }
        if header.kind.is_empty()
            || !header
                .kind
                .bytes()
                .all(|b| b.is_ascii_graphic() || b == b'_')
        {
            return Err(End::Close(
                "message type is not text: not OpenIGTLink".into(),
            ));
        }
        let limit = self
            .config
            .max_body_bytes
            .min(self.config.max_connection_bytes);
        let size = match usize::try_from(header.body_size) {
            Ok(s) if header.body_size <= limit => s,
            _ => {
                let reason = format!(
                    "{} message declares a {}-byte body, over the {limit}-byte limit \
                     (message body and per-connection bounds)",
                    header.kind, header.body_size
                );
                self.try_send(&message_at(
                    "STATUS",
                    &header.device,
                    header.timestamp,
                    &status_content(status::OVERFLOW, &reason),
                ));
                return Err(End::Close(reason));
            }
        };
        // Never allocate from the declared size: grow with the bytes that arrived (doubling,
        // so copies stay linear), never past the declared size, which is within the bounds.
        let mut body: Vec<u8> = Vec::new();
        while body.len() < size {
            let want = (size - body.len()).min(scratch.len());
            match self.read_tick(&mut scratch[..want])? {
                Some(0) => {
                    return Err(End::Close(format!(
                        "{} message cut short: connection closed after {} of {size} body bytes",
                        header.kind,
                        body.len()
                    )))
                }
                Some(n) => {
                    let len = body.len();
                    if body.capacity() < len + n {
                        let target = (body.capacity() * 2).max(len + n).min(size);
                        body.try_reserve_exact(target - len).map_err(|e| {
                            End::Close(format!(
                                "cannot buffer {target} bytes of a {} message: {e}",
                                header.kind
                            ))
                        })?;
                    }
                    body.extend_from_slice(&scratch[..n]);
                }
                None => {}
            }
            if body.len() < size && started.elapsed() >= read_timeout {
                let reason = format!(
                    "read timed out: {} of {size} body bytes of a {} message in {}",
                    body.len(),
                    header.kind,
                    secs(read_timeout)
                );
                self.try_send(&message_at(
                    "STATUS",
                    &header.device,
                    header.timestamp,
                    &status_content(status::TIME_OUT, &reason),
                ));
                return Err(End::Close(reason));
            }
        }
        Ok((header, body))
    }
}

/// Frees a connection slot when the connection's thread ends (panics included).
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a frame was not answered: the STATUS code and the reason.
struct FrameFailure {
    code: u16,
    reason: String,
}

impl Server {
    /// Binds to `addr` (port 0 picks a free port). Fails on settings that cannot work (a zero
    /// cap, bound or timeout).
    pub fn bind(addr: &str, pipeline: Arc<Pipeline>, config: ServerConfig) -> Result<Server> {
        config.check()?;
        let bind_err = |source| IgtlError::Bind {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Server {
            listener,
            pipeline,
            config,
            stop: Arc::new(AtomicBool::new(false)),
            latencies: Arc::default(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The settings in force.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Set it to stop the server (from a signal handler, another thread …): `run` returns
    /// within about a [`TICK`], whatever the clients do (a frame in the pipeline finishes
    /// first).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Latencies (IMAGE received → results sent) of every answered frame so far, ms.
    pub fn latencies_ms(&self) -> Vec<f64> {
        self.latencies.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Serves until the stop flag is set: each client on its own thread, at most
    /// `max_connections` at once; a connection beyond the cap is closed at once.
    pub fn run(&self, on_event: &(dyn Fn(Event) + Sync)) {
        if let Some(a) = self.local_addr() {
            on_event(Event::Listening(a));
        }
        let active = AtomicUsize::new(0);
        let cap = self.config.max_connections;
        std::thread::scope(|scope| {
            while !self.stop.load(Ordering::Relaxed) {
                let (stream, peer) = match self.listener.accept() {
                    Ok(c) => c,
                    // Nothing pending (or a transient failure such as too many open files):
                    // wait a tick.
                    Err(_) => {
                        std::thread::sleep(TICK);
                        continue;
                    }
                };
                // Only this loop takes slots, so the check and the increment cannot race
                // with another taker; threads only give slots back.
                if active.load(Ordering::Acquire) >= cap {
                    reject(stream, peer, cap, on_event);
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let slot = Slot(&active);
                on_event(Event::Connected(peer));
                let spawned = std::thread::Builder::new()
                    .name(format!("igtl {peer}"))
                    .spawn_scoped(scope, move || {
                        let _slot = slot;
                        match self.serve_client(stream, peer, on_event) {
                            End::Left | End::Stopped => {}
                            End::Close(reason) => on_event(Event::Refused { peer, reason }),
                        }
                        on_event(Event::Disconnected(peer));
                    });
                // The closure (stream and slot) is dropped with the error: the connection is
                // closed and its slot freed.
                if let Err(e) = spawned {
                    on_event(Event::Refused {
                        peer,
                        reason: format!("no thread to serve it: {e}"),
                    });
                    on_event(Event::Disconnected(peer));
                }
            }
        });
    }

    fn serve_client(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        on_event: &(dyn Fn(Event) + Sync),
    ) -> End {
        let mut conn = match Conn::new(stream, &self.stop, &self.config) {
            Ok(c) => c,
            Err(e) => return End::Close(format!("cannot set up the socket: {e}")),
        };
        match self.serve_frames(&mut conn, peer, on_event) {
            Ok(()) => End::Left,
            Err(end) => end,
        }
    }

    /// Answers messages until the connection ends (always with an `End`).
    fn serve_frames(
        &self,
        conn: &mut Conn<'_>,
        peer: SocketAddr,
        on_event: &(dyn Fn(Event) + Sync),
    ) -> std::result::Result<(), End> {
        let mut scratch = vec![0u8; READ_CHUNK];
        let mut session = Session::new();
        let mut session_size = None;
        loop {
            let (header, body) = conn.read_message(&mut scratch)?;
            let received = Instant::now();
            let outcome = if crc64(&body) != header.crc {
                // The framing held (exactly the declared bytes arrived): answer and go on.
                let bytes = body.len();
                drop(body);
                Err(FrameFailure {
                    code: status::CHECKSUM_ERROR,
                    reason: format!(
                        "{} message: CRC-64 of the {bytes}-byte body does not match the header's",
                        header.kind
                    ),
                })
            } else if header.kind != "IMAGE" {
                on_event(Event::Ignored {
                    peer,
                    kind: header.kind,
                });
                continue;
            } else {
                let parsed = content(&header, &body)
                    .and_then(|c| parse_image(c, self.config.max_pixels))
                    .map_err(|reason| FrameFailure {
                        code: status::CONFIG_ERROR,
                        reason,
                    });
                // Free the body before the pipeline runs and the replies are built: the
                // connection holds one or the other, within its bound.
                drop(body);
                parsed.and_then(|image| {
                    let size = (image.width, image.height);
                    // A new size is a new stream: the plan smoothing must not mix frames of
                    // different geometry.
                    if session_size != Some(size) {
                        session = Session::new();
                        session_size = Some(size);
                    }
                    self.frame_replies(&header, &image, &mut session)
                })
            };
            match outcome {
                Ok(replies) => {
                    let refs: Vec<&[u8]> = replies.iter().map(|r| r.as_slice()).collect();
                    conn.send(&refs)?;
                    let ms = received.elapsed().as_secs_f64() * 1e3;
                    if let Ok(mut l) = self.latencies.lock() {
                        l.push(ms);
                    }
                    on_event(Event::Answered {
                        peer,
                        latency_ms: ms,
                        status: "sent",
                    });
                }
                Err(FrameFailure { code, reason }) => {
                    let reply = message_at(
                        "STATUS",
                        &header.device,
                        header.timestamp,
                        &status_content(code, &reason),
                    );
                    conn.send(&[&reply])?;
                    on_event(Event::Failed {
                        peer,
                        device: header.device,
                        code,
                        reason,
                    });
                }
            }
        }
    }

    /// The replies to one image, or why there are none.
    fn frame_replies(
        &self,
        header: &Header,
        image: &ImageIn,
        session: &mut Session,
    ) -> std::result::Result<[Vec<u8>; 3], FrameFailure> {
        let need = reply_bytes_bound(image.width, image.height);
        if need > self.config.max_connection_bytes {
            return Err(FrameFailure {
                code: status::OVERFLOW,
                reason: format!(
                    "the replies to a {}x{} image take up to {need} bytes, over the \
                     per-connection bound of {} bytes",
                    image.width, image.height, self.config.max_connection_bytes
                ),
            });
        }
        // A bug in the pipeline must cost this frame only, not every client's connection
        // (a panicking client thread would bring the whole server down at the end of `run`).
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.answer(header, image, session)
        })) {
            Ok(Ok(replies)) => Ok(replies),
            Ok(Err(e)) => Err(FrameFailure {
                code: status::UNKNOWN_ERROR,
                reason: format!("pipeline failed: {e}"),
            }),
            Err(_) => {
                *session = Session::new();
                Err(FrameFailure {
                    code: status::UNKNOWN_ERROR,
                    reason: "internal error while processing the frame (a bug; frame dropped)"
                        .into(),
                })
            }
        }
    }

    fn answer(
        &self,
        header: &Header,
        image: &ImageIn,
        session: &mut Session,
    ) -> Result<[Vec<u8>; 3]> {
        // parse_image checked the spacing (finite, plausible).
        let (sx, sy) = image.spacing_mm;
        let calibration = Calibration::Ok {
            mm_per_px_x: sx,
            mm_per_px_y: sy,
            reference_px: None,
            source: CalibrationSource::Given,
        };
        let gray: Vec<u8> = image
            .intensity
            .iter()
            .map(|v| v.round().clamp(0.0, 255.0) as u8)
            .collect();
        let frame = Frame::from_gray8(image.width, image.height, &gray, calibration)?;
        let r = self.pipeline.process_in(session, &frame)?;
        let overlay = crate::overlay::draw_plan(
            &r.despeckled,
            &r.segmentation.labels,
            &r.plan,
            r.segmentation.mm_per_px,
        )?;
        let (device, stamp) = (header.device.as_str(), header.timestamp);
        let overlay = message_at(
            "IMAGE",
            &reply_device(device, OVERLAY_SUFFIX),
            stamp,
            &image_content(
                image.width,
                image.height,
                overlay.as_raw(),
                &image.matrix,
                image.coordinates,
            ),
        );
        let mut points = Vec::new();
        if let Some(e) = r.plan.entry {
            points.push((
                "entry",
                pixel_to_world(&image.matrix, image.width, image.height, e.px[0], e.px[1]),
            ));
        }
        if let Some(t) = r.plan.target {
            points.push((
                "target",
                pixel_to_world(&image.matrix, image.width, image.height, t.px[0], t.px[1]),
            ));
        }
        let points = message_at(
            "POINT",
            &reply_device(device, POINTS_SUFFIX),
            stamp,
            &point_content(&points),
        );
        let json =
            serde_json::to_string(&r.plan).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        let plan = message_at(
            "STRING",
            &reply_device(device, PLAN_SUFFIX),
            stamp,
            &string_content(&json),
        );
        Ok([overlay, points, plan])
    }
}

/// Closes a connection beyond the cap at once, after a best-effort STATUS "busy" (one
/// non-blocking write: a peer that does not read gets nothing and costs nothing).
fn reject(mut stream: TcpStream, peer: SocketAddr, cap: usize, on_event: &(dyn Fn(Event) + Sync)) {
    let reason = format!("{cap} connections already served (the cap); closed at once");
    if stream.set_nonblocking(true).is_ok() {
        let _ = stream.write(&message_at(
            "STATUS",
            "",
            timestamp_now(),
            &status_content(status::BUSY, &reason),
        ));
    }
    drop(stream);
    on_event(Event::Rejected { peer, reason });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Side of the test images: the smallest handled.
    const SIDE: usize = MIN_IMAGE_SIDE;

    fn diagonal(sx: f32, sy: f32) -> [f32; 12] {
        let mut m = [0f32; 12];
        m[0] = sx;
        m[4] = sy;
        m[8] = 1.0;
        m
    }

    fn grey_content(w: usize, h: usize, matrix: &[f32; 12], cs: CoordinateSystem) -> Vec<u8> {
        let mut c = image_content(w, h, &[], matrix, cs);
        c[2] = 1;
        c.extend((0..w * h).map(|i| (i * 7 % 256) as u8));
        c
    }

    #[test]
    fn crc64_matches_the_ecma_182_check_value() {
        // CRC-64/ECMA-182 of "123456789".
        assert_eq!(crc64(b"123456789"), 0x6C40_DF5F_0B49_7347);
    }

    #[test]
    fn messages_round_trip() {
        let m = message_at(
            "STRING",
            "dev",
            0x1234_5678_9ABC_DEF0,
            &string_content("hello"),
        );
        let mut hb = [0u8; HEADER_BYTES];
        hb.copy_from_slice(&m[..HEADER_BYTES]);
        let h = Header::parse(&hb);
        assert_eq!(
            (h.version, h.kind.as_str(), h.device.as_str(), h.body_size),
            (1, "STRING", "dev", 9)
        );
        assert_eq!(h.timestamp, 0x1234_5678_9ABC_DEF0);
        assert_eq!(h.crc, crc64(&m[HEADER_BYTES..]));
        let rgb = vec![10u8; SIDE * SIDE * 3];
        let matrix = diagonal(0.2, 0.3);
        let c = image_content(SIDE, SIDE, &rgb, &matrix, CoordinateSystem::Ras);
        let img = parse_image(&c, 1 << 20).unwrap();
        assert_eq!((img.width, img.height, img.components), (SIDE, SIDE, 3));
        assert_eq!(img.coordinates, CoordinateSystem::Ras);
        assert!((img.spacing_mm.0 - 0.2).abs() < 1e-6 && (img.spacing_mm.1 - 0.3).abs() < 1e-6);
        let lps = image_content(SIDE, SIDE, &rgb, &matrix, CoordinateSystem::Lps);
        assert_eq!(
            parse_image(&lps, 1 << 20).unwrap().coordinates,
            CoordinateSystem::Lps
        );
        // Too few and too many pixel bytes; over the pixel limit.
        let short = image_content(SIDE, SIDE, &rgb[..10], &matrix, CoordinateSystem::Lps);
        assert!(parse_image(&short, 1 << 20).is_err());
        let mut long = c.clone();
        long.push(0);
        assert!(parse_image(&long, 1 << 20).is_err());
        assert!(parse_image(&c, (SIDE * SIDE - 1) as u64).is_err());
    }

    #[test]
    fn status_content_follows_the_specification() {
        let c = status_content(status::CONFIG_ERROR, "bad matrix");
        assert_eq!(be_u16(&c[0..2]), 10);
        assert_eq!(be_u64(&c[2..10]), 0);
        assert_eq!(text(&c[10..30]), "Configuration error");
        assert_eq!(&c[30..], b"bad matrix\0");
    }

    #[test]
    fn reply_devices_keep_the_incoming_name_and_fit_the_field() {
        assert_eq!(reply_device("probe", OVERLAY_SUFFIX), "probe_overlay");
        assert_eq!(reply_device("probe", POINTS_SUFFIX), "probe_points");
        assert_eq!(reply_device("probe", PLAN_SUFFIX), "probe_plan");
        assert_eq!(reply_device("", OVERLAY_SUFFIX), "sonoguide_overlay");
        // 20 bytes in: cut to the shared 12-byte base.
        let long = "Image_Reference_0123";
        for suffix in [OVERLAY_SUFFIX, POINTS_SUFFIX, PLAN_SUFFIX] {
            let d = reply_device(long, suffix);
            assert!(d.len() <= DEVICE_NAME_BYTES, "{d}");
            assert!(d.starts_with("Image_Refere"), "{d}");
        }
        // A multi-byte character across the cut is dropped whole, never split.
        let d = reply_device("sonde_échographie", OVERLAY_SUFFIX);
        assert!(
            d.len() <= DEVICE_NAME_BYTES && d.ends_with(OVERLAY_SUFFIX),
            "{d}"
        );
    }

    #[test]
    fn v3_content_sizes_are_checked() {
        let h = Header {
            version: 2,
            kind: "IMAGE".into(),
            device: "d".into(),
            timestamp: 0,
            body_size: 0,
            crc: 0,
        };
        assert!(content(&h, &[0u8; 5]).is_err());
        // Extended header of 12 bytes, 4 content bytes, no metadata.
        let mut b = vec![0u8; 16];
        b[1] = 12;
        assert_eq!(content(&h, &b).unwrap().len(), 4);
        // Metadata larger than the body; extended header beyond it; absurd sizes.
        let mut m = b.clone();
        m[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(content(&h, &m).is_err());
        let mut e = b.clone();
        e[0..2].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(content(&h, &e).is_err());
        let mut z = b;
        z[1] = 0;
        assert!(content(&h, &z).is_err());
    }

    #[test]
    fn every_number_of_an_image_is_checked() {
        let good = grey_content(SIDE, SIDE, &diagonal(0.1, 0.1), CoordinateSystem::Lps);
        assert!(parse_image(&good, 1 << 20).is_ok());
        let bad_matrices: [(&str, [f32; 12]); 7] = [
            ("NaN spacing", diagonal(f32::NAN, 0.1)),
            ("infinite spacing", diagonal(0.1, f32::INFINITY)),
            ("zero spacing", diagonal(0.0, 0.1)),
            ("absurd spacing", diagonal(1e6, 0.1)),
            ("parallel axes", {
                let mut m = diagonal(0.1, 0.0);
                m[3] = 0.1;
                m
            }),
            ("NaN centre", {
                let mut m = diagonal(0.1, 0.1);
                m[10] = f32::NAN;
                m
            }),
            ("far centre", {
                let mut m = diagonal(0.1, 0.1);
                m[9] = 1e9;
                m
            }),
        ];
        for (what, m) in bad_matrices {
            let c = grey_content(SIDE, SIDE, &m, CoordinateSystem::Lps);
            assert!(parse_image(&c, 1 << 20).is_err(), "{what} accepted");
        }
        // Header fields: image version, endianness, coordinate system, depth, sub-volume,
        // scalar type, components, a side below the minimum.
        for (what, at, value) in [
            ("image version", 1, 9u8),
            ("endianness", 4, 0),
            ("coordinate system", 5, 3),
            ("depth", 11, 2),
            ("sub-volume offset", 61, 1),
            ("sub-volume size", 67, 1),
            ("scalar type", 3, 10),
            ("components", 2, 2),
        ] {
            let mut c = good.clone();
            c[at] = value;
            assert!(parse_image(&c, 1 << 20).is_err(), "{what} accepted");
        }
        let small = grey_content(SIDE - 1, SIDE, &diagonal(0.1, 0.1), CoordinateSystem::Lps);
        assert!(parse_image(&small, 1 << 20).is_err());
    }

    fn cpu_pipeline() -> Arc<Pipeline> {
        let mut config = crate::PipelineConfig::default();
        config.backend = crate::Backend::Cpu;
        Arc::new(Pipeline::new(config).unwrap())
    }

    #[test]
    fn odd_but_valid_images_get_replies_or_a_failure_never_a_panic() {
        let server = Server::bind("127.0.0.1:0", cpu_pipeline(), ServerConfig::default()).unwrap();
        let header = Header {
            version: 1,
            kind: "IMAGE".into(),
            device: "odd".into(),
            timestamp: 42,
            body_size: 0,
            crc: 0,
        };
        let mut session = Session::new();
        for (w, h, fill) in [
            (SIDE, SIDE, None),
            (SIDE, 300, Some(0u8)),
            (300, SIDE, Some(255u8)),
            (64, 48, Some(128u8)),
            (64, 48, None),
        ] {
            let mut c = image_content(w, h, &[], &diagonal(0.1, 0.1), CoordinateSystem::Ras);
            c[2] = 1;
            c.extend((0..w * h).map(|i| fill.unwrap_or((i * 31 % 251) as u8)));
            let image = parse_image(&c, 1 << 20).unwrap();
            match server.frame_replies(&header, &image, &mut session) {
                Ok(replies) => assert_eq!(replies.len(), 3),
                Err(f) => panic!("{w}x{h}: {}", f.reason),
            }
        }
    }

    /// Ticks the stop may take on a loaded machine: one to notice it, the rest slack.
    const STOP_TICKS: u32 = 10;

    #[test]
    fn a_stalled_client_is_dropped_and_never_delays_a_stop() {
        let mut config = ServerConfig::default();
        config.read_timeout = Duration::from_secs(1);
        let server = Server::bind("127.0.0.1:0", cpu_pipeline(), config).unwrap();
        let addr = server.local_addr().unwrap();
        let stop = server.stop_flag();
        let events = Mutex::new(Vec::new());
        /// Sets the stop flag when dropped: a failed assertion must not leave the scope
        /// waiting for a server that never stops.
        struct StopOnDrop(Arc<AtomicBool>);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        std::thread::scope(|s| {
            let _stop = StopOnDrop(stop.clone());
            let running = s.spawn(|| server.run(&|e| events.lock().unwrap().push(e)));
            // A header declaring 1 MiB, 10 bytes of it, then nothing.
            let mut m = message("IMAGE", "stall", &[0u8; 10]);
            m[42..50].copy_from_slice(&(1u64 << 20).to_be_bytes());
            let mut dropped = TcpStream::connect(addr).unwrap();
            dropped.write_all(&m).unwrap();
            dropped
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            // The server sends a STATUS "time out" and closes.
            let mut got = Vec::new();
            let _ = dropped.read_to_end(&mut got);
            assert!(got.len() > HEADER_BYTES + STATUS_HEADER_BYTES, "{got:?}");
            assert_eq!(be_u16(&got[HEADER_BYTES..]), status::TIME_OUT);
            // Another stalls mid-header, and a third is connected and silent, while the
            // server is asked to stop.
            let mut held = TcpStream::connect(addr).unwrap();
            held.write_all(&m[..HEADER_BYTES / 2]).unwrap();
            let _silent = TcpStream::connect(addr).unwrap();
            std::thread::sleep(TICK * 4);
            let t = Instant::now();
            stop.store(true, Ordering::Relaxed);
            while !running.is_finished() {
                std::thread::sleep(Duration::from_millis(1));
            }
            let took = t.elapsed();
            assert!(took < TICK * STOP_TICKS, "the stop took {took:?}");
        });
        let events = events.into_inner().unwrap();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Refused { reason, .. }
                if reason.contains("read timed out"))),
            "{events:?}"
        );
    }
}
