//! OpenIGTLink (the protocol of 3D Slicer and PLUS): messages and a server that runs the
//! pipeline on received images.
//!
//! Wire format (all numbers big-endian): a 58-byte header — version u16 (1: v2 header; 2: v3,
//! with an extended header and metadata in the body), type char[12], device name char[20],
//! timestamp u64, body size u64, CRC-64 (ECMA-182, polynomial 0x42F0E1EBA9EA3693, no
//! reflection) of the body — then the body. IMAGE content: a 72-byte image header (version,
//! components, scalar type, endianness, coordinate system, size[3], 12-float matrix whose
//! columns are the i, j, k axes scaled by the spacing and the image centre, sub-volume) and the
//! pixels. POINT: 136 bytes per point. STRING: encoding u16, length u16, bytes.
//!
//! The server answers each IMAGE with an IMAGE (the overlay, RGB), a POINT (entry and target,
//! in the image's world frame) and a STRING (the plan as JSON). It checks sizes (bounded) and
//! CRCs; a malformed message closes that connection only; several clients are served at once;
//! it stops when its stop flag is set.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ndarray::Array2;

use crate::frame::{Calibration, CalibrationSource, Frame};
use crate::{Pipeline, Result, Session};

/// Errors of the OpenIGTLink server (per-connection failures are reported as
/// [`Event::Refused`], not as errors: one peer's trouble never stops the server).
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
}

/// Header size in bytes.
pub const HEADER_BYTES: usize = 58;
/// IMAGE content header size in bytes.
pub const IMAGE_HEADER_BYTES: usize = 72;
/// Bytes per point of a POINT message.
pub const POINT_BYTES: usize = 136;
/// Default bound on a message body: a 4096 x 4096 RGB 16-bit image fits.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 128 << 20;
/// Device names of the replies.
pub const OVERLAY_DEVICE: &str = "sonoguide_overlay";
/// Device name of the POINT reply.
pub const POINTS_DEVICE: &str = "sonoguide_plan";
/// Device name of the STRING reply.
pub const PLAN_DEVICE: &str = "sonoguide_plan_json";

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

/// Builds a complete message (v2 header) of `kind` from `device` with `content`.
pub fn message(kind: &str, device: &str, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + content.len());
    out.extend_from_slice(&1u16.to_be_bytes());
    let mut name = [0u8; 12];
    name[..kind.len().min(12)].copy_from_slice(&kind.as_bytes()[..kind.len().min(12)]);
    out.extend_from_slice(&name);
    let mut dev = [0u8; 20];
    dev[..device.len().min(20)].copy_from_slice(&device.as_bytes()[..device.len().min(20)]);
    out.extend_from_slice(&dev);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let frac = ((now.subsec_nanos() as u64) << 32) / 1_000_000_000;
    out.extend_from_slice(&((now.as_secs() << 32) | frac).to_be_bytes());
    out.extend_from_slice(&(content.len() as u64).to_be_bytes());
    out.extend_from_slice(&crc64(content).to_be_bytes());
    out.extend_from_slice(content);
    out
}

/// The content of a v3 body (the extended header and metadata removed), or why it is invalid.
pub fn content(header: &Header, body: &[u8]) -> std::result::Result<Vec<u8>, String> {
    if header.version < 2 {
        return Ok(body.to_vec());
    }
    if body.len() < 12 {
        return Err("v3 body shorter than its extended header".into());
    }
    let ext = be_u16(&body[0..2]) as usize;
    let meta_header = be_u16(&body[2..4]) as usize;
    let meta = be_u32(&body[4..8]) as usize;
    let end = body
        .len()
        .checked_sub(meta_header + meta)
        .ok_or("metadata larger than the body")?;
    if ext < 12 || ext > end {
        return Err(format!("bad extended header size {ext}"));
    }
    Ok(body[ext..end].to_vec())
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
}

/// Parses IMAGE content: 2-D, 8- or 16-bit, 1 or 3 components.
pub fn parse_image(c: &[u8], max_pixels: u64) -> std::result::Result<ImageIn, String> {
    if c.len() < IMAGE_HEADER_BYTES {
        return Err(format!(
            "IMAGE content of {} bytes is shorter than its header",
            c.len()
        ));
    }
    let components = c[2] as usize;
    let scalar = c[3];
    let little = c[4] == 2;
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
    let need = w * h * components * bytes;
    let px = &c[IMAGE_HEADER_BYTES..];
    if px.len() < need {
        return Err(format!(
            "IMAGE holds {} pixel bytes, {w}x{h}x{components} needs {need}",
            px.len()
        ));
    }
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
    let norm = |a: &[f32]| ((a[0] * a[0] + a[1] * a[1] + a[2] * a[2]) as f64).sqrt();
    Ok(ImageIn {
        width: w,
        height: h,
        components,
        intensity,
        matrix,
        spacing_mm: (norm(&matrix[0..3]), norm(&matrix[3..6])),
    })
}

/// IMAGE content for an RGB 8-bit image with the given matrix.
pub fn image_content(width: usize, height: usize, rgb: &[u8], matrix: &[f32; 12]) -> Vec<u8> {
    let mut c = Vec::with_capacity(IMAGE_HEADER_BYTES + rgb.len());
    c.extend_from_slice(&1u16.to_be_bytes());
    c.push(3); // components
    c.push(3); // uint8
    c.push(2); // little endian (bytes)
    c.push(2); // LPS
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

/// What the server reports to whoever runs it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// Listening.
    Listening(SocketAddr),
    /// A client connected.
    Connected(SocketAddr),
    /// A client left.
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
    /// A message was refused and the connection closed.
    Refused {
        /// The client.
        peer: SocketAddr,
        /// Why.
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
    /// Largest message body accepted, bytes.
    pub max_body_bytes: u64,
    /// Largest image accepted, pixels.
    pub max_pixels: u64,
    /// How long a started message may take to arrive.
    pub body_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_pixels: 4096 * 4096,
            body_timeout: Duration::from_secs(10),
        }
    }
}

/// An OpenIGTLink server around a pipeline.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    pipeline: Arc<Pipeline>,
    config: ServerConfig,
    stop: Arc<AtomicBool>,
    latencies: Arc<Mutex<Vec<f64>>>,
}

enum ReadError {
    Closed,
    Stopped,
    Failed(String),
}

/// Polling interval of blocking reads and of the accept loop (how fast a stop is noticed).
const POLL: Duration = Duration::from_millis(50);

fn read_full(
    s: &mut TcpStream,
    buf: &mut [u8],
    stop: &AtomicBool,
    deadline: Option<Instant>,
) -> std::result::Result<(), ReadError> {
    let mut got = 0;
    while got < buf.len() {
        if stop.load(Ordering::Relaxed) {
            return Err(ReadError::Stopped);
        }
        if got > 0 && deadline.is_some_and(|d| Instant::now() > d) {
            return Err(ReadError::Failed(format!(
                "message cut short: {got} of {} bytes arrived",
                buf.len()
            )));
        }
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Err(ReadError::Closed),
            Ok(0) => {
                return Err(ReadError::Failed(format!(
                    "connection closed after {got} of {} bytes",
                    buf.len()
                )))
            }
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(ReadError::Failed(e.to_string())),
        }
    }
    Ok(())
}

impl Server {
    /// Binds to `addr` (port 0 picks a free port).
    pub fn bind(addr: &str, pipeline: Arc<Pipeline>, config: ServerConfig) -> Result<Server> {
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

    /// Set it to stop the server (from a signal handler, another thread …).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Latencies (IMAGE received → results sent) of every answered frame so far, ms.
    pub fn latencies_ms(&self) -> Vec<f64> {
        self.latencies.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Serves until the stop flag is set; every client on its own thread.
    pub fn run(&self, on_event: &(dyn Fn(Event) + Sync)) {
        if let Some(a) = self.local_addr() {
            on_event(Event::Listening(a));
        }
        std::thread::scope(|scope| {
            while !self.stop.load(Ordering::Relaxed) {
                match self.listener.accept() {
                    Ok((stream, peer)) => {
                        on_event(Event::Connected(peer));
                        scope.spawn(move || {
                            if let Err(reason) = self.serve_client(stream, peer, on_event) {
                                on_event(Event::Refused { peer, reason });
                            }
                            on_event(Event::Disconnected(peer));
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(POLL)
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        });
    }

    fn serve_client(
        &self,
        mut s: TcpStream,
        peer: SocketAddr,
        on_event: &(dyn Fn(Event) + Sync),
    ) -> std::result::Result<(), String> {
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(POLL)).map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        let mut session = Session::new();
        loop {
            let mut hb = [0u8; HEADER_BYTES];
            match read_full(
                &mut s,
                &mut hb,
                &self.stop,
                Some(Instant::now() + self.config.body_timeout),
            ) {
                Ok(()) => {}
                Err(ReadError::Closed) | Err(ReadError::Stopped) => return Ok(()),
                Err(ReadError::Failed(e)) => return Err(e),
            }
            let header = Header::parse(&hb);
            if header.version != 1 && header.version != 2 {
                return Err(format!(
                    "header version {} (1 or 2 expected): not OpenIGTLink",
                    header.version
                ));
            }
            if header.kind.is_empty()
                || !header
                    .kind
                    .bytes()
                    .all(|b| b.is_ascii_graphic() || b == b'_')
            {
                return Err("message type is not text: not OpenIGTLink".into());
            }
            if header.body_size > self.config.max_body_bytes {
                return Err(format!(
                    "{} message of {} bytes exceeds the {}-byte limit",
                    header.kind, header.body_size, self.config.max_body_bytes
                ));
            }
            let mut body = vec![0u8; header.body_size as usize];
            match read_full(
                &mut s,
                &mut body,
                &self.stop,
                Some(Instant::now() + self.config.body_timeout),
            ) {
                Ok(()) => {}
                Err(ReadError::Stopped) => return Ok(()),
                Err(ReadError::Closed) => {
                    return Err(format!("{} message cut short: no body", header.kind))
                }
                Err(ReadError::Failed(e)) => return Err(format!("{} message: {e}", header.kind)),
            }
            let received = Instant::now();
            if crc64(&body) != header.crc {
                return Err(format!("{} message: CRC mismatch", header.kind));
            }
            if header.kind != "IMAGE" {
                on_event(Event::Ignored {
                    peer,
                    kind: header.kind,
                });
                continue;
            }
            let c = content(&header, &body)?;
            let image = parse_image(&c, self.config.max_pixels)?;
            let replies = self
                .answer(&image, &mut session)
                .map_err(|e| e.to_string())?;
            s.write_all(&replies).map_err(|e| e.to_string())?;
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
    }

    fn answer(&self, image: &ImageIn, session: &mut Session) -> Result<Vec<u8>> {
        let (sx, sy) = image.spacing_mm;
        let calibration = match crate::frame::check_spacing_mm(sx, sy) {
            None => Calibration::Ok {
                mm_per_px_x: sx,
                mm_per_px_y: sy,
                reference_px: None,
                source: CalibrationSource::Given,
            },
            Some(reason) => Calibration::Unusable {
                reason: format!("IMAGE matrix: {reason}"),
            },
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
        let mut out = message(
            "IMAGE",
            OVERLAY_DEVICE,
            &image_content(image.width, image.height, overlay.as_raw(), &image.matrix),
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
        out.extend(message("POINT", POINTS_DEVICE, &point_content(&points)));
        let json =
            serde_json::to_string(&r.plan).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        out.extend(message("STRING", PLAN_DEVICE, &string_content(&json)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_matches_the_ecma_182_check_value() {
        // CRC-64/ECMA-182 of "123456789".
        assert_eq!(crc64(b"123456789"), 0x6C40_DF5F_0B49_7347);
    }

    #[test]
    fn messages_round_trip() {
        let m = message("STRING", "dev", &string_content("hello"));
        let mut hb = [0u8; HEADER_BYTES];
        hb.copy_from_slice(&m[..HEADER_BYTES]);
        let h = Header::parse(&hb);
        assert_eq!(
            (h.version, h.kind.as_str(), h.device.as_str(), h.body_size),
            (1, "STRING", "dev", 9)
        );
        assert_eq!(h.crc, crc64(&m[HEADER_BYTES..]));
        let rgb = vec![10u8; 4 * 3 * 3];
        let mut matrix = [0f32; 12];
        matrix[0] = 0.2;
        matrix[4] = 0.3;
        matrix[8] = 1.0;
        let img = parse_image(&image_content(4, 3, &rgb, &matrix), 100).unwrap();
        assert_eq!((img.width, img.height, img.components), (4, 3, 3));
        assert!((img.spacing_mm.0 - 0.2).abs() < 1e-6 && (img.spacing_mm.1 - 0.3).abs() < 1e-6);
        assert!(parse_image(&image_content(4, 3, &rgb[..10], &matrix), 100).is_err());
        assert!(parse_image(&image_content(4, 3, &rgb, &matrix), 5).is_err());
    }
}
