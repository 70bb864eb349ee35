//! Reading ultrasound DICOM: header, calibration, and frames decoded one at a time.
//!
//! [`DicomFile::open`] parses the file (encoded pixel data stays encoded in memory) and checks
//! the header against the file size and the configured limits before any pixel buffer is
//! allocated. [`DicomFile::read_frame`] decodes one frame: a 120-frame cine costs one frame's
//! decode to reach frame 0.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dicom_core::value::Value as DicomValue;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use ndarray::{Array2, Array3};
use serde::Serialize;

use super::prescan::{self, Layout};
use super::region::{detect_imaging_region, face_at_reference, fan_within};
use super::DicomError;
use crate::frame::{
    check_spacing_mm, chroma, luma, Calibration, CalibrationSource, Frame, ImagingRegion, Rect,
    RegionShape, RegionSource, COLOUR_CHROMA_THRESHOLD,
};

/// Limits applied before any pixel buffer is allocated.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReadOptions {
    /// Largest frame accepted, in pixels (rows × columns).
    pub max_frame_pixels: u64,
    /// Most frames accepted in one file.
    pub max_frames: u64,
    /// Largest file accepted, in bytes.
    pub max_file_bytes: u64,
    /// Largest inflated data set accepted from a deflated file, in bytes (the smaller of this
    /// and `max_file_bytes` applies). Deflate reaches ratios of 1000:1, so without this bound
    /// a 1 MB file could claim a gigabyte.
    pub max_inflated_bytes: u64,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            // 8192 × 8192: four times the largest ultrasound frames seen in archives.
            max_frame_pixels: 8192 * 8192,
            // Ten minutes of cine at 60 frames/s.
            max_frames: 36_000,
            // 4 GiB: what 32-bit DICOM lengths can address.
            max_file_bytes: 4 << 30,
            // 512 MiB: the inflated data set is held twice while it is read (checked here,
            // then parsed by dicom-rs), so this keeps a deflated file near 1 GiB at most.
            // Deflated ultrasound is rare and small (reports, single frames); cines are sent
            // JPEG-compressed.
            max_inflated_bytes: 512 << 20,
        }
    }
}

/// One item of the Sequence of Ultrasound Regions (0018,6011), as stored, with the derived
/// millimetres per pixel where the units are centimetres.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UltrasoundRegion {
    /// Region Location Min X0 (first column).
    pub min_x0: i64,
    /// Region Location Min Y0 (first row).
    pub min_y0: i64,
    /// Region Location Max X1 (last column, inclusive).
    pub max_x1: i64,
    /// Region Location Max Y1 (last row, inclusive).
    pub max_y1: i64,
    /// Region Spatial Format (1 = 2-D tissue or flow).
    pub spatial_format: i64,
    /// Region Data Type (1 = tissue).
    pub data_type: i64,
    /// Physical Units X Direction (3 = cm).
    pub units_x: i64,
    /// Physical Units Y Direction (3 = cm).
    pub units_y: i64,
    /// Physical Delta X, in `units_x`.
    pub physical_delta_x: f64,
    /// Physical Delta Y, in `units_y`.
    pub physical_delta_y: f64,
    /// Reference Pixel X0, relative to the region's first column (absent when not given).
    pub reference_pixel_x0: Option<i64>,
    /// Reference Pixel Y0, relative to the region's first row.
    pub reference_pixel_y0: Option<i64>,
    /// Millimetres per pixel along x, when the units are cm.
    pub mm_per_px_x: Option<f64>,
    /// Millimetres per pixel along y, when the units are cm.
    pub mm_per_px_y: Option<f64>,
}

/// The chosen imaging region, as reported by `sonoguide info`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImagingRegionInfo {
    /// Bounds in full-frame pixels (end exclusive).
    #[serde(flatten)]
    pub bounds: Rect,
    /// Rectangle or sector.
    pub shape: RegionShape,
    /// Where it came from.
    pub source: RegionSource,
    /// Millimetres per pixel along x, if calibrated.
    pub mm_per_px_x: Option<f64>,
    /// Millimetres per pixel along y, if calibrated.
    pub mm_per_px_y: Option<f64>,
    /// Reference pixel column (full frame).
    pub reference_pixel_x0: Option<f64>,
    /// Reference pixel row (full frame).
    pub reference_pixel_y0: Option<f64>,
    /// A fitted fan: apex (column, row), near and far radius (px), edge angles from straight
    /// down (degrees).
    pub fan: Option<FanInfo>,
}

/// A fan's geometry as `sonoguide info` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FanInfo {
    /// Centre of the arcs, px.
    pub apex_px: [f64; 2],
    /// Radius of the near arc (the skin line), px.
    pub r_near_px: f64,
    /// Radius of the far arc, px.
    pub r_far_px: f64,
    /// Edge angles from straight down, degrees (left, right).
    pub edges_deg: [f64; 2],
}

/// What the header says about the image.
#[derive(Debug, Clone, Serialize)]
pub struct DicomInfo {
    /// The file.
    pub path: PathBuf,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// Transfer Syntax UID.
    pub transfer_syntax_uid: String,
    /// Photometric Interpretation as stored.
    pub photometric_interpretation: String,
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub columns: u32,
    /// Number of frames (1 when absent).
    pub frames: u32,
    /// Bits Allocated.
    pub bits_allocated: u16,
    /// Bits Stored.
    pub bits_stored: u16,
    /// Samples per Pixel.
    pub samples_per_pixel: u16,
    /// Planar Configuration (0 interleaved, 1 planar).
    pub planar_configuration: u16,
    /// Pixel Representation (0 unsigned, 1 signed).
    pub pixel_representation: u16,
    /// Every item of the Sequence of Ultrasound Regions.
    pub ultrasound_regions: Vec<UltrasoundRegion>,
    /// Calibration of the chosen imaging region (serialised by [`super::InfoReport`] as a
    /// status and a reason).
    #[serde(skip)]
    pub calibration: Calibration,
}

/// A palette colour lookup table, already reduced to 8 bits per entry.
#[derive(Debug, Clone)]
struct Palette {
    first_mapped: i64,
    red: Vec<u8>,
    green: Vec<u8>,
    blue: Vec<u8>,
}

impl Palette {
    fn lookup(&self, value: i64) -> [u8; 3] {
        let n = self.red.len().min(self.green.len()).min(self.blue.len());
        if n == 0 {
            return [0, 0, 0];
        }
        let i = (value - self.first_mapped).clamp(0, n as i64 - 1) as usize;
        [self.red[i], self.green[i], self.blue[i]]
    }
}

/// An open DICOM file whose frames can be decoded one at a time.
pub struct DicomFile {
    path: PathBuf,
    obj: DefaultDicomObject,
    info: DicomInfo,
    /// How frames are decoded.
    codec: PixelCodec,
    palette: Option<Palette>,
    /// The imaging region from the header, if it gives one.
    header_region: Option<ImagingRegion>,
    /// The imaging region detected from frame 0 when the header gives none.
    detected_region: OnceLock<ImagingRegion>,
}

impl std::fmt::Debug for DicomFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DicomFile")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn bad(path: &Path, attribute: &'static str, reason: impl Into<String>) -> DicomError {
    DicomError::BadAttribute {
        path: path.to_path_buf(),
        attribute,
        reason: reason.into(),
    }
}

fn get_u32(obj: &InMemDicomObject, tag: Tag) -> Option<u32> {
    obj.get(tag).and_then(|e| e.value().to_int::<u32>().ok())
}
fn get_i64(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.get(tag).and_then(|e| e.value().to_int::<i64>().ok())
}
fn get_f64(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    obj.get(tag).and_then(|e| e.value().to_float64().ok())
}
fn get_str(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.value().to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
}

/// Where the data set starts after the preamble and file meta group, and its transfer syntax.
///
/// The walk is the one dicom-rs's meta reader makes, so that the data set starts where it
/// will start parsing it: the group length (0002,0000) comes first, and elements are read
/// until it is used up, whatever their group; VRs it does not know are UN (4-byte length).
/// Each length is checked against the bytes left, because dicom-rs allocates and zero-fills
/// a UID's declared length before reading it.
fn locate_dataset(bytes: &[u8]) -> Result<(usize, String), String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    let mut pos = if bytes.get(128..132) == Some(b"DICM") {
        132
    } else if bytes.get(0..4) == Some(b"DICM") {
        4
    } else {
        return Err("no DICM magic at byte 128 (not a DICOM Part 10 file)".into());
    };
    let cut = |pos: usize| format!("file ends inside the file meta group (byte {pos})");
    let u32_at = |p: usize| -> Option<u32> {
        let b = bytes.get(p..p + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    // (tag, header length, value length) of the element at `p`.
    let element = |p: usize| -> Result<((u16, u16), usize, u32), String> {
        let h = bytes.get(p..p + 8).ok_or_else(|| cut(p))?;
        let tag = (
            u16::from_le_bytes([h[0], h[1]]),
            u16::from_le_bytes([h[2], h[3]]),
        );
        if tag.0 == 0xFFFE {
            return Ok((tag, 8, u32_at(p + 4).ok_or_else(|| cut(p))?));
        }
        if prescan::explicit_length_is_long([h[4], h[5]]) {
            Ok((tag, 12, u32_at(p + 8).ok_or_else(|| cut(p))?))
        } else {
            Ok((tag, 8, u16::from_le_bytes([h[6], h[7]]) as u32))
        }
    };
    let (tag, header, len) = element(pos)?;
    if tag != (0x0002, 0x0000) || len != 4 {
        return Err(format!(
            "the file meta group does not start with its group length (found ({:04X},{:04X}) of {len} bytes)",
            tag.0, tag.1
        ));
    }
    let group_length = u32_at(pos + header).ok_or_else(|| cut(pos))?;
    pos += header + 4;
    let mut read = 0u32;
    let mut ts = None;
    while read < group_length {
        let (tag, header, len) = element(pos)?;
        if len == u32::MAX {
            return Err(format!(
                "file meta element ({:04X},{:04X}) has an undefined length",
                tag.0, tag.1
            ));
        }
        let body = pos + header;
        let end = body
            .checked_add(len as usize)
            .filter(|e| *e <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "file meta element ({:04X},{:04X}) claims {len} bytes past the end of the file",
                    tag.0, tag.1
                )
            })?;
        if tag == (0x0002, 0x0010) {
            ts = Some(
                String::from_utf8_lossy(&bytes[body..end])
                    .trim_end_matches(['\0', ' '])
                    .to_string(),
            );
        }
        read = read.saturating_add(header as u32).saturating_add(len);
        pos = end;
    }
    let ts = ts.ok_or("the file meta group has no Transfer Syntax UID (0002,0010)")?;
    Ok((pos, ts))
}

impl DicomFile {
    /// Opens and checks a DICOM file.
    pub fn open(path: impl AsRef<Path>, options: &ReadOptions) -> Result<DicomFile, DicomError> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| DicomError::Io {
            path: path.into(),
            source,
        })?;
        if !meta.is_file() {
            return Err(DicomError::Malformed {
                path: path.into(),
                reason: "not a regular file".into(),
            });
        }
        if meta.len() > options.max_file_bytes {
            return Err(DicomError::TooLarge {
                path: path.into(),
                reason: format!("file is {} bytes", meta.len()),
                limit: format!("{} bytes", options.max_file_bytes),
            });
        }
        let bytes = std::fs::read(path).map_err(|source| DicomError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_bytes(path, bytes, options)
    }

    /// Parses a DICOM file held in memory; `name` is used in error messages.
    pub fn from_bytes(
        name: impl AsRef<Path>,
        bytes: Vec<u8>,
        options: &ReadOptions,
    ) -> Result<DicomFile, DicomError> {
        let path = name.as_ref().to_path_buf();
        let malformed = |reason: String| DicomError::Malformed {
            path: path.clone(),
            reason,
        };
        if bytes.len() as u64 > options.max_file_bytes {
            return Err(DicomError::TooLarge {
                path: path.clone(),
                reason: format!("data is {} bytes", bytes.len()),
                limit: format!("{} bytes", options.max_file_bytes),
            });
        }
        let (start, ts) = locate_dataset(&bytes).map_err(malformed)?;
        match Layout::for_transfer_syntax(&ts) {
            Layout::Deflated => {
                // dicom-rs inflates without bound and parses without the pre-scan: inflate
                // here first, bounded, and walk what comes out.
                let limit = options.max_inflated_bytes.min(options.max_file_bytes);
                let inflated =
                    prescan::inflate_bounded(&bytes[start..], limit).map_err(|e| match e {
                        prescan::InflateError::TooLarge(limit) => DicomError::TooLarge {
                            path: path.clone(),
                            reason: "the deflated data set inflates past the limit".into(),
                            limit: format!("{limit} bytes inflated"),
                        },
                        prescan::InflateError::Corrupt(reason) => {
                            malformed(format!("cannot inflate the deflated data set: {reason}"))
                        }
                    })?;
                prescan::check(&inflated, 0, Layout::ExplicitLittle)
                    .map_err(|r| malformed(format!("inflated data set: {r}")))?;
            }
            layout => prescan::check(&bytes, start, layout).map_err(malformed)?,
        }
        let preamble_len = if bytes.get(128..132) == Some(b"DICM") {
            128
        } else {
            0
        };
        let obj = OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Never)
            .from_reader(&bytes[preamble_len..])
            .map_err(|e| malformed(e.to_string()))?;
        let ts_uid = obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string();
        let o: &InMemDicomObject = &obj;

        let rows =
            get_u32(o, tags::ROWS).ok_or_else(|| bad(&path, "Rows", "missing or not a number"))?;
        let columns = get_u32(o, tags::COLUMNS)
            .ok_or_else(|| bad(&path, "Columns", "missing or not a number"))?;
        if rows == 0 || columns == 0 {
            return Err(bad(
                &path,
                "Rows/Columns",
                format!("{rows}x{columns} is an empty image"),
            ));
        }
        let pixels = rows as u64 * columns as u64;
        if pixels > options.max_frame_pixels {
            return Err(DicomError::TooLarge {
                path: path.clone(),
                reason: format!("frame of {columns}x{rows} = {pixels} pixels"),
                limit: format!("{} pixels", options.max_frame_pixels),
            });
        }
        let frames_raw = get_str(o, tags::NUMBER_OF_FRAMES)
            .map(|s| {
                s.parse::<i64>()
                    .map_err(|_| bad(&path, "NumberOfFrames", format!("'{s}' is not a number")))
            })
            .transpose()?
            .unwrap_or(1);
        if frames_raw < 1 {
            return Err(bad(&path, "NumberOfFrames", format!("{frames_raw} frames")));
        }
        if frames_raw as u64 > options.max_frames {
            return Err(DicomError::TooLarge {
                path: path.clone(),
                reason: format!("{frames_raw} frames"),
                limit: format!("{} frames", options.max_frames),
            });
        }
        let frames = u32::try_from(frames_raw).map_err(|_| DicomError::TooLarge {
            path: path.clone(),
            reason: format!("{frames_raw} frames"),
            limit: format!("{} frames", u32::MAX),
        })?;
        let samples_per_pixel = get_u32(o, tags::SAMPLES_PER_PIXEL)
            .ok_or_else(|| bad(&path, "SamplesPerPixel", "missing or not a number"))?;
        if samples_per_pixel != 1 && samples_per_pixel != 3 {
            return Err(bad(
                &path,
                "SamplesPerPixel",
                format!("{samples_per_pixel} (only 1 and 3 exist in ultrasound)"),
            ));
        }
        let bits_allocated = get_u32(o, tags::BITS_ALLOCATED)
            .ok_or_else(|| bad(&path, "BitsAllocated", "missing or not a number"))?;
        if bits_allocated != 8 && bits_allocated != 16 {
            return Err(bad(
                &path,
                "BitsAllocated",
                format!("{bits_allocated} (supported: 8 and 16)"),
            ));
        }
        let bits_stored = get_u32(o, tags::BITS_STORED).unwrap_or(bits_allocated);
        if bits_stored == 0 || bits_stored > bits_allocated {
            return Err(bad(
                &path,
                "BitsStored",
                format!("{bits_stored} with BitsAllocated {bits_allocated}"),
            ));
        }
        let pi = get_str(o, tags::PHOTOMETRIC_INTERPRETATION)
            .ok_or_else(|| bad(&path, "PhotometricInterpretation", "missing"))?;
        let expected_spp = match pi.as_str() {
            "MONOCHROME1" | "MONOCHROME2" | "PALETTE COLOR" => 1,
            "RGB" | "YBR_FULL" | "YBR_FULL_422" | "YBR_RCT" | "YBR_ICT" | "YBR_PARTIAL_420" => 3,
            other => {
                return Err(DicomError::Unsupported {
                    path: path.clone(),
                    what: format!("photometric interpretation '{other}'"),
                })
            }
        };
        if expected_spp != samples_per_pixel {
            return Err(bad(
                &path,
                "SamplesPerPixel",
                format!("{samples_per_pixel} does not match {pi}"),
            ));
        }
        let planar_configuration = get_u32(o, tags::PLANAR_CONFIGURATION).unwrap_or(0);
        let pixel_representation = get_u32(o, tags::PIXEL_REPRESENTATION).unwrap_or(0);

        // A transfer syntax dicom-rs knows, can decode, and whose pixel data this reader
        // checks before decoding.
        let Some(ts_entry) = dicom_transfer_syntax_registry::TransferSyntaxRegistry.get(&ts_uid)
        else {
            return Err(DicomError::Unsupported {
                path: path.clone(),
                what: format!("unknown transfer syntax {ts_uid}"),
            });
        };
        let codec = PixelCodec::for_transfer_syntax(&ts_uid)
            .filter(|_| ts_entry.can_decode_all())
            .ok_or_else(|| DicomError::Unsupported {
                path: path.clone(),
                what: format!("transfer syntax {} ({})", ts_uid, ts_entry.name()),
            })?;

        // Pixel data present and long enough for every frame: native data must hold every
        // frame's bytes; encapsulated data needs a fragment per frame (PS3.5 A.4: a fragment
        // holds data of one frame only), so an absurd frame count is refused here.
        let pixel_elem = o
            .get(tags::PIXEL_DATA)
            .ok_or_else(|| DicomError::NoPixelData { path: path.clone() })?;
        let frame_bytes = native_frame_bytes(rows, columns, samples_per_pixel, bits_allocated, &pi);
        match pixel_elem.value() {
            DicomValue::Primitive(p) => {
                let have = p.calculate_byte_len() as u64;
                let need = frame_bytes * frames as u64;
                if have < need {
                    return Err(DicomError::Malformed {
                        path: path.clone(),
                        reason: format!(
                            "pixel data holds {have} bytes but {frames} frame(s) of {columns}x{rows}x{samples_per_pixel} at {bits_allocated} bits need {need} (truncated?)"
                        ),
                    });
                }
            }
            DicomValue::PixelSequence(seq) => {
                let fragments = seq.fragments().len();
                if fragments == 0 {
                    return Err(DicomError::Malformed {
                        path: path.clone(),
                        reason: "encapsulated pixel data has no fragments".into(),
                    });
                }
                if (fragments as u64) < frames as u64 {
                    return Err(bad(
                        &path,
                        "NumberOfFrames",
                        format!(
                            "{frames} frames but the encapsulated pixel data holds {fragments} fragment(s) (each frame needs at least one)"
                        ),
                    ));
                }
                if codec == PixelCodec::Native {
                    return Err(DicomError::Malformed {
                        path: path.clone(),
                        reason: format!(
                            "encapsulated pixel data in the uncompressed transfer syntax {ts_uid}"
                        ),
                    });
                }
            }
            DicomValue::Sequence(_) => {
                return Err(DicomError::Malformed {
                    path: path.clone(),
                    reason: "pixel data is a sequence".into(),
                })
            }
        }

        let palette = if pi == "PALETTE COLOR" {
            Some(read_palette(&path, o)?)
        } else {
            None
        };
        let ultrasound_regions = read_regions(o);
        let (header_region, calibration) = choose_region(o, &ultrasound_regions, rows, columns);

        let info = DicomInfo {
            path: path.clone(),
            sop_class_uid: get_str(o, tags::SOP_CLASS_UID).unwrap_or_default(),
            transfer_syntax_uid: ts_uid,
            photometric_interpretation: pi,
            rows,
            columns,
            frames,
            bits_allocated: bits_allocated as u16,
            bits_stored: bits_stored as u16,
            samples_per_pixel: samples_per_pixel as u16,
            planar_configuration: planar_configuration as u16,
            pixel_representation: pixel_representation as u16,
            ultrasound_regions,
            calibration,
        };
        Ok(DicomFile {
            path,
            obj,
            info,
            codec,
            palette,
            header_region,
            detected_region: OnceLock::new(),
        })
    }

    /// The header facts.
    pub fn info(&self) -> &DicomInfo {
        &self.info
    }

    /// The file's path (or the name given to [`DicomFile::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of frames.
    pub fn frame_count(&self) -> usize {
        self.info.frames as usize
    }

    /// The parsed DICOM object (for derived outputs that copy patient and study attributes).
    pub fn object(&self) -> &DefaultDicomObject {
        &self.obj
    }

    /// The imaging region: from the header, else detected from frame 0.
    pub fn imaging_region(&self) -> Result<ImagingRegion, DicomError> {
        if let Some(r) = self.detected_region.get() {
            return Ok(r.clone());
        }
        let r = match &self.header_region {
            // A convex or phased-array file declares the fan's bounding rectangle: look for
            // the fan inside it (its corners are not tissue, its near arc is the skin). If the
            // first frame cannot be decoded, the rectangle stands (reading its pixels will
            // report the error).
            Some(header) => match self.decode_display(0) {
                Ok((rgb, gray)) => {
                    let found = fan_within(header, &gray, rgb.as_ref());
                    match &self.info.calibration {
                        Calibration::Ok {
                            mm_per_px_y,
                            reference_px: Some(face),
                            ..
                        } => face_at_reference(found, *face, *mm_per_px_y),
                        _ => found,
                    }
                }
                Err(_) => return Ok(header.clone()),
            },
            None => {
                let (rgb, gray) = self.decode_display(0)?;
                detect_imaging_region(&gray, rgb.as_ref())
            }
        };
        Ok(self.detected_region.get_or_init(|| r).clone())
    }

    /// The imaging region as reported by `sonoguide info`, with its calibration.
    pub fn imaging_region_info(&self) -> Result<ImagingRegionInfo, DicomError> {
        let region = self.imaging_region()?;
        let (mx, my, rx, ry) = match &self.info.calibration {
            Calibration::Ok {
                mm_per_px_x,
                mm_per_px_y,
                reference_px,
                ..
            } => (
                Some(*mm_per_px_x),
                Some(*mm_per_px_y),
                reference_px.map(|r| r.0),
                reference_px.map(|r| r.1),
            ),
            _ => (None, None, None, None),
        };
        Ok(ImagingRegionInfo {
            bounds: region.bounds,
            shape: region.shape,
            source: region.source,
            mm_per_px_x: mx,
            mm_per_px_y: my,
            reference_pixel_x0: rx,
            reference_pixel_y0: ry,
            fan: region.fan.map(|f| FanInfo {
                apex_px: f.apex,
                r_near_px: f.r_near,
                r_far_px: f.r_far,
                edges_deg: [f.theta_left.to_degrees(), f.theta_right.to_degrees()],
            }),
        })
    }

    /// Decodes frame `index` (zero-based).
    pub fn read_frame(&self, index: usize) -> Result<Frame, DicomError> {
        let (rgb, intensity) = self.decode_display(index)?;
        let colour_mask = rgb.as_ref().map(|rgb| {
            Array2::from_shape_fn(intensity.dim(), |(y, x)| {
                u8::from(
                    chroma(rgb[[y, x, 0]], rgb[[y, x, 1]], rgb[[y, x, 2]])
                        > COLOUR_CHROMA_THRESHOLD,
                )
            })
        });
        let region = self.imaging_region()?;
        Ok(Frame {
            intensity,
            rgb,
            colour_mask,
            region,
            calibration: self.info.calibration.clone(),
            index,
        })
    }

    /// Iterates over the frames, decoding each when it is reached.
    pub fn frames(&self) -> impl Iterator<Item = Result<Frame, DicomError>> + '_ {
        (0..self.frame_count()).map(move |i| self.read_frame(i))
    }

    /// Decodes frame `index` to the displayed RGB (for colour sources) and the B-mode
    /// intensity (0–255).
    pub fn decode_display(
        &self,
        index: usize,
    ) -> Result<(Option<Array3<u8>>, Array2<f32>), DicomError> {
        let info = &self.info;
        if index >= info.frames as usize {
            return Err(DicomError::Decode {
                path: self.path.clone(),
                frame: index,
                reason: format!("the file has {} frame(s)", info.frames),
            });
        }
        let decode_err = |reason: String| DicomError::Decode {
            path: self.path.clone(),
            frame: index,
            reason,
        };
        let (h, w) = (info.rows as usize, info.columns as usize);
        let n = h * w;
        let samples = self.frame_samples(index).map_err(decode_err)?;
        // `samples` holds the frame in its stored colour model, interleaved, as u16 values.
        let needed = n * info.samples_per_pixel as usize;
        if samples.values.len() < needed {
            return Err(decode_err(format!(
                "decoded {} samples, a {w}x{h}x{} frame needs {needed}",
                samples.values.len(),
                info.samples_per_pixel
            )));
        }
        let to8 = |v: u16| -> u8 {
            if info.bits_stored > 8 {
                (v >> (info.bits_stored - 8)).min(255) as u8
            } else {
                v.min(255) as u8
            }
        };
        match samples.model {
            Model::Mono { inverted } => {
                let max = ((1u32 << info.bits_stored) - 1) as f32;
                let gray = Array2::from_shape_fn((h, w), |(y, x)| {
                    let v = samples.values[y * w + x] as f32 / max * 255.0;
                    if inverted {
                        255.0 - v
                    } else {
                        v
                    }
                });
                Ok((None, gray))
            }
            Model::Palette => {
                let pal = self
                    .palette
                    .as_ref()
                    .ok_or_else(|| decode_err("palette colour without a palette".into()))?;
                let signed = info.pixel_representation == 1;
                let mut buf = Vec::with_capacity(n * 3);
                for raw in &samples.values[..n] {
                    let v = if signed && info.bits_allocated == 16 {
                        *raw as i16 as i64
                    } else {
                        *raw as i64
                    };
                    buf.extend_from_slice(&pal.lookup(v));
                }
                let rgb = Array3::from_shape_vec((h, w, 3), buf)
                    .map_err(|e| decode_err(e.to_string()))?;
                let gray = luma_of(&rgb);
                Ok((Some(rgb), gray))
            }
            Model::Rgb => {
                let buf: Vec<u8> = samples.values[..n * 3].iter().map(|v| to8(*v)).collect();
                let rgb = Array3::from_shape_vec((h, w, 3), buf)
                    .map_err(|e| decode_err(e.to_string()))?;
                let gray = luma_of(&rgb);
                Ok((Some(rgb), gray))
            }
            Model::YbrFull => {
                let mut buf = Vec::with_capacity(n * 3);
                for s in samples.values[..n * 3].chunks_exact(3) {
                    buf.extend_from_slice(&ybr_full_to_rgb(
                        to8(s[0]) as f32,
                        to8(s[1]) as f32,
                        to8(s[2]) as f32,
                    ));
                }
                let rgb = Array3::from_shape_vec((h, w, 3), buf)
                    .map_err(|e| decode_err(e.to_string()))?;
                let gray = luma_of(&rgb);
                Ok((Some(rgb), gray))
            }
        }
    }

    /// Frame `index` as stored samples, interleaved, one u16 per sample, with the colour model
    /// they are in.
    fn frame_samples(&self, index: usize) -> Result<Samples, String> {
        let info = &self.info;
        let bits = info.bits_allocated;
        let pixel = self.obj.get(tags::PIXEL_DATA).ok_or("no pixel data")?;
        let fb = native_frame_bytes(
            info.rows,
            info.columns,
            info.samples_per_pixel as u32,
            bits as u32,
            &info.photometric_interpretation,
        ) as usize;
        match pixel.value() {
            DicomValue::Primitive(p) => {
                let start = fb * index;
                let values: Vec<u16> = match (p, bits) {
                    (dicom_core::PrimitiveValue::U16(v), 16) => v
                        .get(start / 2..(start + fb) / 2)
                        .ok_or("pixel data too short for this frame")?
                        .to_vec(),
                    _ => {
                        let b = p.to_bytes();
                        let b = b
                            .get(start..start + fb)
                            .ok_or("pixel data too short for this frame")?;
                        bytes_to_samples(b, bits)
                    }
                };
                Ok(self.arrange_native(values))
            }
            DicomValue::PixelSequence(seq) => {
                let data = frame_data(seq.fragments(), seq.offset_table(), info.frames, index)?;
                match self.codec {
                    PixelCodec::Rle => {
                        let values = decode_rle_frame(
                            &data,
                            info.rows as usize * info.columns as usize,
                            info.samples_per_pixel as usize,
                            (bits as usize).div_ceil(8),
                        )?;
                        Ok(self.arrange_native(values))
                    }
                    PixelCodec::DeflatedFrames => {
                        let bytes = inflate_frame(&data, fb)?;
                        Ok(self.arrange_native(bytes_to_samples(&bytes, bits)))
                    }
                    PixelCodec::Jpeg => {
                        check_jpeg_header(&data, info)?;
                        drop(data);
                        self.decode_with_dicom_rs(index)
                    }
                    PixelCodec::Jpeg2000 => {
                        check_j2k_header(&data, info)?;
                        drop(data);
                        self.decode_with_dicom_rs(index)
                    }
                    PixelCodec::Native => {
                        Err("encapsulated pixel data in an uncompressed transfer syntax".into())
                    }
                }
            }
            DicomValue::Sequence(_) => Err("pixel data is a sequence".into()),
        }
    }

    /// Native samples of one frame (as stored, one u16 per sample) masked to the bits stored,
    /// interleaved, with their colour model.
    fn arrange_native(&self, mut values: Vec<u16>) -> Samples {
        let info = &self.info;
        let (h, w, spp) = (
            info.rows as usize,
            info.columns as usize,
            info.samples_per_pixel as usize,
        );
        let n = h * w;
        let pi = info.photometric_interpretation.as_str();
        let mask = if info.bits_stored < 16 {
            (1u32 << info.bits_stored) as u16 - 1
        } else {
            u16::MAX
        };
        for v in &mut values {
            *v &= mask;
        }
        if spp == 1 {
            return Samples {
                values,
                model: mono_or_palette(pi),
            };
        }
        if pi == "YBR_FULL_422" && info.transfer_syntax_uid != RLE_LOSSLESS {
            // Native 4:2:2: Y1 Y2 Cb Cr per pair of pixels along a row.
            let mut out = Vec::with_capacity(n * 3);
            for row in values.chunks_exact(w * 2) {
                for x in 0..w {
                    let pair = x / 2;
                    let y = row.get(pair * 4 + (x % 2)).copied().unwrap_or(0);
                    let cb = row.get(pair * 4 + 2).copied().unwrap_or(128);
                    let cr = row.get(pair * 4 + 3).copied().unwrap_or(128);
                    out.extend_from_slice(&[y, cb, cr]);
                }
            }
            return Samples {
                values: out,
                model: Model::YbrFull,
            };
        }
        // RLE frames come out of `decode_rle_frame` interleaved whatever the planar
        // configuration says (each sample is its own segment).
        if info.planar_configuration == 1
            && info.transfer_syntax_uid != RLE_LOSSLESS
            && values.len() >= n * 3
        {
            values = (0..n * 3).map(|i| values[(i % 3) * n + i / 3]).collect();
        }
        let model = if pi.starts_with("YBR_FULL") {
            Model::YbrFull
        } else {
            Model::Rgb
        };
        Samples { values, model }
    }

    /// Decodes frame `index` with dicom-pixeldata (JPEG, JPEG 2000), after its header has been
    /// checked against the DICOM header. The decoders are third-party code run on hostile
    /// bytes; a panic in one is turned into this frame's error rather than ending the process.
    fn decode_with_dicom_rs(&self, index: usize) -> Result<Samples, String> {
        let info = &self.info;
        let (n, spp) = (
            info.rows as usize * info.columns as usize,
            info.samples_per_pixel as usize,
        );
        let pi = info.photometric_interpretation.as_str();
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.obj.decode_pixel_data_frame(index as u32)
        }))
        .map_err(|_| "the decoder failed on this frame's code stream (it panicked)".to_string())?
        .map_err(|e| e.to_string())?;
        let data = decoded.data();
        let values: Vec<u16> = bytes_to_samples(data, info.bits_allocated);
        if values.len() < n * spp {
            return Err(format!(
                "decoder returned {} samples, expected {}",
                values.len(),
                n * spp
            ));
        }
        if spp == 1 {
            return Ok(Samples {
                values,
                model: mono_or_palette(pi),
            });
        }
        // The JPEG and JPEG 2000 decoders return RGB.
        Ok(Samples {
            values,
            model: Model::Rgb,
        })
    }
}

/// The transfer syntax UID of RLE Lossless.
const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

fn mono_or_palette(pi: &str) -> Model {
    match pi {
        "MONOCHROME1" => Model::Mono { inverted: true },
        "MONOCHROME2" => Model::Mono { inverted: false },
        _ => Model::Palette,
    }
}

/// Stored bytes (little endian) to one u16 per sample.
fn bytes_to_samples(b: &[u8], bits_allocated: u16) -> Vec<u16> {
    if bits_allocated == 16 {
        b.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    } else {
        b.iter().map(|v| *v as u16).collect()
    }
}

/// How the pixel data of a transfer syntax is decoded. Only these are read: each has its
/// frame sizes checked before anything is allocated from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PixelCodec {
    /// Uncompressed pixel data (implicit/explicit VR, big endian, deflated data set).
    Native,
    /// RLE Lossless: decoded here, bounded by the frame size.
    Rle,
    /// JPEG baseline, extended and lossless: frame header checked here, decoded by dicom-rs.
    Jpeg,
    /// JPEG 2000 (and High-Throughput JPEG 2000): SIZ marker checked here, decoded by dicom-rs.
    Jpeg2000,
    /// Deflated Image Frame Compression: each frame inflated here, bounded by its size.
    DeflatedFrames,
}

impl PixelCodec {
    fn for_transfer_syntax(uid: &str) -> Option<PixelCodec> {
        Some(match uid {
            "1.2.840.10008.1.2"
            | "1.2.840.10008.1.2.1"
            | "1.2.840.10008.1.2.2"
            | "1.2.840.10008.1.2.1.99" => PixelCodec::Native,
            RLE_LOSSLESS => PixelCodec::Rle,
            "1.2.840.10008.1.2.4.50"
            | "1.2.840.10008.1.2.4.51"
            | "1.2.840.10008.1.2.4.57"
            | "1.2.840.10008.1.2.4.70" => PixelCodec::Jpeg,
            "1.2.840.10008.1.2.4.90"
            | "1.2.840.10008.1.2.4.91"
            | "1.2.840.10008.1.2.4.92"
            | "1.2.840.10008.1.2.4.93"
            | "1.2.840.10008.1.2.4.201"
            | "1.2.840.10008.1.2.4.202"
            | "1.2.840.10008.1.2.4.203" => PixelCodec::Jpeg2000,
            "1.2.840.10008.1.2.8.1" => PixelCodec::DeflatedFrames,
            _ => return None,
        })
    }
}

/// The encoded bytes of frame `index`: its own fragment when there is one fragment per frame,
/// else the fragments the basic offset table assigns to it (as dicom-rs gathers them).
fn frame_data<'a>(
    fragments: &'a [Vec<u8>],
    offset_table: &[u32],
    frames: u32,
    index: usize,
) -> Result<Cow<'a, [u8]>, String> {
    if fragments.len() == frames as usize {
        return fragments
            .get(index)
            .map(|f| Cow::Borrowed(f.as_slice()))
            .ok_or_else(|| format!("no fragment for frame {index}"));
    }
    let base = match offset_table.get(index) {
        Some(b) => *b as usize,
        None if index == 0 => 0,
        None => {
            return Err(format!(
                "the basic offset table has no entry for frame {index}"
            ))
        }
    };
    let next = offset_table.get(index + 1).map(|v| *v as usize);
    let mut out = Vec::new();
    let mut offset = 0usize;
    for f in fragments {
        if next.is_some_and(|n| offset >= n) {
            break;
        }
        if offset >= base {
            out.extend_from_slice(f);
        }
        // Offsets count each fragment's 8-byte item header.
        offset += f.len() + 8;
    }
    if out.is_empty() {
        return Err(format!(
            "no fragment starts at offset {base} given by the basic offset table"
        ));
    }
    Ok(Cow::Owned(out))
}

/// The most a PackBits byte pair can expand to: a replicate run of 128 from 2 bytes.
const RLE_MAX_EXPANSION: usize = 64;

/// Decodes an RLE Lossless frame (PS3.5 Annex G) to interleaved samples, one u16 each. Each
/// segment is one byte plane (most significant first within a sample); decoding stops at the
/// frame's size, so no segment can write past it.
fn decode_rle_frame(
    frame: &[u8],
    pixels: usize,
    spp: usize,
    bytes_per_sample: usize,
) -> Result<Vec<u16>, String> {
    let segments = prescan::rle_segments(frame, spp * bytes_per_sample)?;
    // Refuse before allocating the frame when the data cannot expand to it.
    if frame.len().saturating_mul(RLE_MAX_EXPANSION) < pixels * segments.len() {
        return Err(format!(
            "RLE frame of {} bytes cannot expand to {} segments of {pixels} bytes",
            frame.len(),
            segments.len()
        ));
    }
    let mut values = vec![0u16; pixels * spp];
    let mut plane = Vec::with_capacity(pixels);
    for (k, range) in segments.into_iter().enumerate() {
        let (sample, byte) = (k / bytes_per_sample, k % bytes_per_sample);
        unpack_bits(&frame[range], pixels, &mut plane)
            .map_err(|e| format!("RLE segment {k}: {e}"))?;
        let shift = 8 * (bytes_per_sample - 1 - byte);
        for (i, b) in plane.iter().enumerate() {
            values[i * spp + sample] |= (*b as u16) << shift;
        }
    }
    Ok(values)
}

/// PackBits (PS3.5 G.3.1) into `out`, exactly `n` bytes.
fn unpack_bits(seg: &[u8], n: usize, out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    let mut i = 0;
    while out.len() < n {
        let Some(&h) = seg.get(i) else {
            return Err(format!(
                "decodes to {} bytes, {n} expected (truncated)",
                out.len()
            ));
        };
        i += 1;
        let h = h as i8;
        if h >= 0 {
            let k = h as usize + 1;
            let literal = seg
                .get(i..i + k)
                .ok_or("a literal run passes the end of the segment (truncated)")?;
            out.extend_from_slice(&literal[..k.min(n - out.len())]);
            i += k;
        } else if h != -128 {
            let k = (1 - h as isize) as usize;
            let v = *seg
                .get(i)
                .ok_or("a replicate run passes the end of the segment (truncated)")?;
            i += 1;
            out.resize((out.len() + k).min(n), v);
        }
    }
    Ok(())
}

/// Inflates one frame of Deflated Image Frame Compression, refusing more or fewer bytes than
/// the frame holds.
fn inflate_frame(data: &[u8], frame_bytes: usize) -> Result<Vec<u8>, String> {
    let out = prescan::inflate_bounded(data, frame_bytes as u64).map_err(|e| match e {
        prescan::InflateError::TooLarge(_) => {
            format!("the frame inflates past its {frame_bytes} bytes")
        }
        prescan::InflateError::Corrupt(r) => format!("cannot inflate the frame: {r}"),
    })?;
    if out.len() < frame_bytes {
        return Err(format!(
            "the frame inflates to {} bytes, {frame_bytes} expected",
            out.len()
        ));
    }
    Ok(out)
}

/// Refuses a JPEG frame whose own header disagrees with the DICOM header, before the decoder
/// allocates from it (jpeg-decoder sizes its buffers from the frame header alone, and
/// dicom-rs copies its output into a buffer sized from the DICOM header).
fn check_jpeg_header(data: &[u8], info: &DicomInfo) -> Result<(), String> {
    let h = prescan::jpeg_frame_header(data)?;
    check_codestream_size("JPEG", h, info)?;
    if !prescan::ends_with_end_marker(data) {
        return Err("the JPEG code stream has no EOI marker (truncated)".into());
    }
    // jpeg-decoder returns one byte per sample up to 8 bits, two above.
    if (h.precision <= 8) != (info.bits_allocated == 8) {
        return Err(format!(
            "JPEG samples of {} bits in a file of {} bits allocated",
            h.precision, info.bits_allocated
        ));
    }
    Ok(())
}

/// Refuses a JPEG 2000 frame whose SIZ marker disagrees with the DICOM header.
fn check_j2k_header(data: &[u8], info: &DicomInfo) -> Result<(), String> {
    let h = prescan::j2k_frame_header(data)?;
    check_codestream_size("JPEG 2000", h, info)?;
    if !prescan::ends_with_end_marker(data) {
        return Err("the JPEG 2000 code stream has no EOC marker (truncated)".into());
    }
    if h.precision > info.bits_allocated as u32 {
        return Err(format!(
            "JPEG 2000 samples of {} bits in a file of {} bits allocated",
            h.precision, info.bits_allocated
        ));
    }
    Ok(())
}

fn check_codestream_size(
    kind: &str,
    h: prescan::CodestreamSize,
    info: &DicomInfo,
) -> Result<(), String> {
    if h.rows != info.rows
        || h.columns != info.columns
        || h.components != info.samples_per_pixel as u32
    {
        return Err(format!(
            "the {kind} header declares {}x{} with {} component(s); the DICOM header says {}x{} with {} sample(s) per pixel",
            h.columns, h.rows, h.components, info.columns, info.rows, info.samples_per_pixel
        ));
    }
    Ok(())
}

enum Model {
    Mono { inverted: bool },
    Palette,
    Rgb,
    YbrFull,
}

struct Samples {
    values: Vec<u16>,
    model: Model,
}

/// Bytes per frame of natively encoded pixel data.
fn native_frame_bytes(rows: u32, columns: u32, spp: u32, bits_allocated: u32, pi: &str) -> u64 {
    let px = rows as u64 * columns as u64;
    let bytes = (bits_allocated as u64).div_ceil(8);
    if pi == "YBR_FULL_422" && spp == 3 {
        // Two luma samples and one pair of chroma samples per two pixels.
        px.div_ceil(2) * 4 * bytes
    } else {
        px * spp as u64 * bytes
    }
}

/// YBR_FULL (ITU-R BT.601, full range) to RGB, as PS3.3 C.7.6.3.1.2 gives it.
pub fn ybr_full_to_rgb(y: f32, cb: f32, cr: f32) -> [u8; 3] {
    let r = y + 1.402 * (cr - 128.0);
    let g = y - 0.344_136 * (cb - 128.0) - 0.714_136 * (cr - 128.0);
    let b = y + 1.772 * (cb - 128.0);
    [
        r.round().clamp(0.0, 255.0) as u8,
        g.round().clamp(0.0, 255.0) as u8,
        b.round().clamp(0.0, 255.0) as u8,
    ]
}

fn luma_of(rgb: &Array3<u8>) -> Array2<f32> {
    let (h, w, _) = rgb.dim();
    Array2::from_shape_fn((h, w), |(y, x)| {
        luma(rgb[[y, x, 0]], rgb[[y, x, 1]], rgb[[y, x, 2]])
    })
}

/// Reads the three palette colour LUTs (plain or segmented), reducing entries to 8 bits.
fn read_palette(path: &Path, o: &InMemDicomObject) -> Result<Palette, DicomError> {
    let channels = [
        (
            "Red",
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            tags::SEGMENTED_RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            "Green",
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            tags::SEGMENTED_GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            "Blue",
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            tags::SEGMENTED_BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
    ];
    let mut luts: Vec<Vec<u8>> = Vec::with_capacity(3);
    let mut first_mapped = 0;
    for (name, desc_tag, data_tag, seg_tag) in channels {
        let desc = o
            .get(desc_tag)
            .and_then(|e| e.value().to_multi_int::<i64>().ok())
            .filter(|d| d.len() == 3)
            .ok_or_else(|| {
                bad(
                    path,
                    "PaletteColorLookupTableDescriptor",
                    format!("{name} descriptor missing or not three numbers"),
                )
            })?;
        let entries = if desc[0] == 0 {
            65536
        } else {
            (desc[0] & 0xFFFF) as usize
        };
        // The first mapped value is a 16-bit pixel value (US or SS); anything else is a
        // corrupt descriptor (and would overflow the lookup's subtraction).
        if !(i16::MIN as i64..=u16::MAX as i64).contains(&desc[1]) {
            return Err(bad(
                path,
                "PaletteColorLookupTableDescriptor",
                format!(
                    "{name} first mapped value {} is not a 16-bit pixel value",
                    desc[1]
                ),
            ));
        }
        first_mapped = desc[1];
        let bits = desc[2];
        if bits != 8 && bits != 16 {
            return Err(bad(
                path,
                "PaletteColorLookupTableDescriptor",
                format!("{name} entries of {bits} bits"),
            ));
        }
        let words = |tag: Tag| -> Option<Vec<u16>> {
            let e = o.get(tag)?;
            match e.value() {
                DicomValue::Primitive(dicom_core::PrimitiveValue::U16(v)) => Some(v.to_vec()),
                DicomValue::Primitive(p) => Some(
                    p.to_bytes()
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                ),
                _ => None,
            }
        };
        let mut lut16: Vec<u16> = if let Some(w) = words(data_tag) {
            if bits == 8 && w.len() * 2 >= entries && w.len() < entries {
                // 8-bit entries packed two to a word.
                w.iter()
                    .flat_map(|v| [(*v & 0xFF), (*v >> 8)])
                    .take(entries)
                    .collect()
            } else {
                w
            }
        } else if let Some(seg) = words(seg_tag) {
            expand_segmented(&seg, entries).map_err(|r| {
                bad(
                    path,
                    "SegmentedPaletteColorLookupTableData",
                    format!("{name}: {r}"),
                )
            })?
        } else {
            return Err(bad(
                path,
                "PaletteColorLookupTableData",
                format!("{name} LUT data missing"),
            ));
        };
        // Entries past the descriptor's count are never looked up.
        lut16.truncate(entries);
        if lut16.is_empty() {
            return Err(bad(
                path,
                "PaletteColorLookupTableData",
                format!("{name} LUT is empty"),
            ));
        }
        let lut8 = lut16
            .iter()
            .map(|v| {
                if bits == 16 {
                    (*v >> 8) as u8
                } else {
                    (*v & 0xFF) as u8
                }
            })
            .collect();
        luts.push(lut8);
    }
    let blue = luts.pop().unwrap_or_default();
    let green = luts.pop().unwrap_or_default();
    let red = luts.pop().unwrap_or_default();
    Ok(Palette {
        first_mapped,
        red,
        green,
        blue,
    })
}

/// Most entries a palette LUT can have: the descriptor's count is 16 bits, 0 meaning 65536.
const MAX_LUT_ENTRIES: usize = 65_536;

/// One segment of segmented palette data: where it starts (word index) and its opcode.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: usize,
    opcode: u16,
}

/// Expands segmented palette data (PS3.3 C.7.9.2) into at most `entries` values.
///
/// Discrete (0) and linear (1) segments are applied as they are read. An indirect segment (2)
/// replays `count` consecutive segments read earlier, the first being the one that starts at
/// the given byte offset from the start of the data; a replayed segment must itself be
/// discrete or linear (an indirect segment may not refer to an indirect one), and an offset
/// that is not the start of an earlier segment is an error. Nothing recurses, and the work is
/// bounded: each applied segment costs a step, and the steps are limited to the data's
/// segments plus the LUT's entries.
fn expand_segmented(seg: &[u16], entries: usize) -> Result<Vec<u16>, String> {
    let entries = entries.min(MAX_LUT_ENTRIES);
    let mut out: Vec<u16> = Vec::with_capacity(entries);
    let mut segments: Vec<Segment> = Vec::new();
    let mut steps_left = seg.len() + entries;
    let mut i = 0;
    while i < seg.len() && out.len() < entries {
        let op = seg[i];
        if i + 1 == seg.len() && op == 0 {
            // A single trailing null word pads the data to an even length.
            break;
        }
        segments.push(Segment {
            start: i,
            opcode: op,
        });
        match op {
            0 | 1 => {
                i = apply_segment(seg, i, &mut out, entries)?;
                steps_left = steps_left.saturating_sub(1);
            }
            2 => {
                let count = *seg.get(i + 1).ok_or("indirect segment cut short")? as usize;
                let lo = *seg.get(i + 2).ok_or("indirect segment cut short")? as usize;
                let hi = *seg.get(i + 3).ok_or("indirect segment cut short")? as usize;
                let offset = lo | (hi << 16);
                // The segments read before this one.
                let earlier = &segments[..segments.len() - 1];
                // Segments start on 16-bit words; the offset is in bytes.
                let first = (offset % 2 == 0)
                    .then_some(offset / 2)
                    .and_then(|w| earlier.iter().position(|s| s.start == w))
                    .ok_or_else(|| {
                        format!(
                            "indirect segment at word {i} points at byte {offset}, which is not the start of an earlier segment"
                        )
                    })?;
                let copied = earlier.get(first..first + count).ok_or_else(|| {
                    format!(
                        "indirect segment at word {i} copies {count} segments from byte {offset}; only {} precede it",
                        earlier.len() - first
                    )
                })?;
                for s in copied {
                    if s.opcode == 2 {
                        return Err(format!(
                            "indirect segment at word {i} refers to the indirect segment at word {}",
                            s.start
                        ));
                    }
                    if steps_left == 0 {
                        return Err(
                            "segmented LUT replays more segments than it has entries".into()
                        );
                    }
                    steps_left -= 1;
                    if out.len() >= entries {
                        break;
                    }
                    apply_segment(seg, s.start, &mut out, entries)?;
                }
                i += 4;
            }
            other => return Err(format!("unknown segment opcode {other} at word {i}")),
        }
    }
    Ok(out)
}

/// Applies the discrete or linear segment starting at word `i`, adding at most
/// `entries - out.len()` values; returns the index of the word after it.
fn apply_segment(
    seg: &[u16],
    i: usize,
    out: &mut Vec<u16>,
    entries: usize,
) -> Result<usize, String> {
    let len = *seg.get(i + 1).ok_or("segment header cut short")? as usize;
    let room = entries.saturating_sub(out.len());
    match seg[i] {
        0 => {
            let vals = seg
                .get(i + 2..i + 2 + len)
                .ok_or("discrete segment cut short")?;
            out.extend_from_slice(&vals[..len.min(room)]);
            Ok(i + 2 + len)
        }
        1 => {
            let end = *seg.get(i + 2).ok_or("linear segment cut short")? as f64;
            let start = *out.last().ok_or("linear segment with no previous value")? as f64;
            for k in 1..=len.min(room) {
                out.push((start + (end - start) * k as f64 / len as f64).round() as u16);
            }
            Ok(i + 3)
        }
        other => Err(format!("segment opcode {other} cannot be replayed")),
    }
}

/// Reads every item of the Sequence of Ultrasound Regions.
fn read_regions(o: &InMemDicomObject) -> Vec<UltrasoundRegion> {
    let Some(seq) = o
        .get(tags::SEQUENCE_OF_ULTRASOUND_REGIONS)
        .and_then(|e| e.value().items())
    else {
        return Vec::new();
    };
    seq.iter()
        .map(|item| {
            let units_x = get_i64(item, tags::PHYSICAL_UNITS_X_DIRECTION).unwrap_or(0);
            let units_y = get_i64(item, tags::PHYSICAL_UNITS_Y_DIRECTION).unwrap_or(0);
            let dx = get_f64(item, tags::PHYSICAL_DELTA_X).unwrap_or(f64::NAN);
            let dy = get_f64(item, tags::PHYSICAL_DELTA_Y).unwrap_or(f64::NAN);
            // Unit code 3 is centimetres: 10 mm each.
            let mm = |units: i64, d: f64| (units == 3).then_some(d * 10.0);
            UltrasoundRegion {
                min_x0: get_i64(item, tags::REGION_LOCATION_MIN_X0).unwrap_or(0),
                min_y0: get_i64(item, tags::REGION_LOCATION_MIN_Y0).unwrap_or(0),
                max_x1: get_i64(item, tags::REGION_LOCATION_MAX_X1).unwrap_or(0),
                max_y1: get_i64(item, tags::REGION_LOCATION_MAX_Y1).unwrap_or(0),
                spatial_format: get_i64(item, tags::REGION_SPATIAL_FORMAT).unwrap_or(0),
                data_type: get_i64(item, tags::REGION_DATA_TYPE).unwrap_or(0),
                units_x,
                units_y,
                physical_delta_x: dx,
                physical_delta_y: dy,
                reference_pixel_x0: get_i64(item, tags::REFERENCE_PIXEL_X0),
                reference_pixel_y0: get_i64(item, tags::REFERENCE_PIXEL_Y0),
                mm_per_px_x: mm(units_x, dx),
                mm_per_px_y: mm(units_y, dy),
            }
        })
        .collect()
}

/// Picks the 2-D tissue region holding the image (the largest one inside the frame) and its
/// calibration; falls back to Pixel Spacing or Imager Pixel Spacing for calibration.
fn choose_region(
    o: &InMemDicomObject,
    regions: &[UltrasoundRegion],
    rows: u32,
    columns: u32,
) -> (Option<ImagingRegion>, Calibration) {
    let tissue: Vec<&UltrasoundRegion> = regions
        .iter()
        .filter(|r| r.spatial_format == 1 && r.data_type == 1)
        .collect();
    // Fall back to any 2-D region when none is marked as tissue.
    let candidates: Vec<&UltrasoundRegion> = if tissue.is_empty() {
        regions.iter().filter(|r| r.spatial_format == 1).collect()
    } else {
        tissue
    };
    // Scanners often write the last column or row as the frame size (one past the end); an
    // overhang of this many pixels is clipped, a larger one means the region does not belong
    // to these pixels (a resized or cropped export).
    const REGION_OVERHANG_PX: i64 = 2;
    let fits = |r: &UltrasoundRegion| {
        r.min_x0 >= 0
            && r.min_y0 >= 0
            && r.max_x1 >= r.min_x0
            && r.max_y1 >= r.min_y0
            && r.max_x1 < columns as i64 + REGION_OVERHANG_PX
            && r.max_y1 < rows as i64 + REGION_OVERHANG_PX
            && r.min_x0 < columns as i64
            && r.min_y0 < rows as i64
    };
    let area = |r: &UltrasoundRegion| (r.max_x1 - r.min_x0 + 1) * (r.max_y1 - r.min_y0 + 1);
    let best = candidates
        .iter()
        .filter(|r| fits(r))
        .max_by_key(|r| area(r))
        .copied();
    if let Some(r) = best {
        let region = ImagingRegion {
            bounds: Rect {
                x0: r.min_x0 as usize,
                y0: r.min_y0 as usize,
                x1: (r.max_x1 as usize + 1).min(columns as usize),
                y1: (r.max_y1 as usize + 1).min(rows as usize),
            },
            shape: RegionShape::Rectangle,
            source: RegionSource::UltrasoundRegion,
            mask: None,
            fan: None,
        };
        let calibration = match (r.mm_per_px_x, r.mm_per_px_y) {
            (Some(x), Some(y)) => match check_spacing_mm(x, y) {
                None => Calibration::Ok {
                    mm_per_px_x: x,
                    mm_per_px_y: y,
                    // A reference pixel so far out that the sum overflows is no reference.
                    reference_px: match (r.reference_pixel_x0, r.reference_pixel_y0) {
                        (Some(rx), Some(ry)) => r
                            .min_x0
                            .checked_add(rx)
                            .zip(r.min_y0.checked_add(ry))
                            .map(|(x, y)| (x as f64, y as f64)),
                        _ => None,
                    },
                    source: CalibrationSource::UltrasoundRegion,
                },
                Some(reason) => Calibration::Unusable {
                    reason: format!("ultrasound region: {reason}"),
                },
            },
            _ => Calibration::Unusable {
                reason: format!(
                    "ultrasound region units are codes {}/{}, not cm (3)",
                    r.units_x, r.units_y
                ),
            },
        };
        return (Some(region), calibration);
    }
    if let Some(r) = candidates.first() {
        // A 2-D region exists but lies outside the frame.
        let reason = format!(
            "ultrasound region ({},{})-({},{}) lies outside the {columns}x{rows} frame",
            r.min_x0, r.min_y0, r.max_x1, r.max_y1
        );
        return (None, Calibration::Unusable { reason });
    }
    for (tag, source) in [
        (tags::PIXEL_SPACING, CalibrationSource::PixelSpacing),
        (
            tags::IMAGER_PIXEL_SPACING,
            CalibrationSource::ImagerPixelSpacing,
        ),
    ] {
        if let Some(v) = o.get(tag).and_then(|e| e.value().to_multi_float64().ok()) {
            if v.len() != 2 {
                return (
                    None,
                    Calibration::Unusable {
                        reason: format!("{source:?} has {} values, not 2", v.len()),
                    },
                );
            }
            // Pixel Spacing is row spacing (y) then column spacing (x), in mm.
            return match check_spacing_mm(v[1], v[0]) {
                None => (
                    None,
                    Calibration::Ok {
                        mm_per_px_x: v[1],
                        mm_per_px_y: v[0],
                        reference_px: None,
                        source,
                    },
                ),
                Some(reason) => (None, Calibration::Unusable { reason }),
            };
        }
    }
    (None, Calibration::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte offset of word `w` in segmented LUT data, split as an indirect segment holds it.
    fn offset_words(w: usize) -> [u16; 2] {
        let b = 2 * w;
        [(b & 0xFFFF) as u16, (b >> 16) as u16]
    }

    #[test]
    fn discrete_and_linear_segments_expand() {
        let seg = [0, 3, 10, 20, 30, 1, 2, 50];
        assert_eq!(
            expand_segmented(&seg, 100).unwrap(),
            vec![10, 20, 30, 40, 50]
        );
        // Bounded by the entry count.
        assert_eq!(expand_segmented(&seg, 4).unwrap(), vec![10, 20, 30, 40]);
    }

    #[test]
    fn an_indirect_segment_replays_exactly_count_segments() {
        // Discrete (word 0), linear (word 5), discrete (word 8), then an indirect segment
        // copying the first two only: the third must not be replayed.
        let [lo, hi] = offset_words(0);
        let seg = [0, 3, 10, 20, 30, 1, 2, 50, 0, 1, 99, 2, 2, lo, hi];
        assert_eq!(
            expand_segmented(&seg, 100).unwrap(),
            vec![10, 20, 30, 40, 50, 99, 10, 20, 30, 40, 50]
        );
        // A replayed linear segment ramps from the value before the replay (90 → 50).
        let [lo, hi] = offset_words(5);
        let seg = [0, 3, 10, 20, 30, 1, 2, 50, 0, 1, 90, 2, 1, lo, hi];
        assert_eq!(
            expand_segmented(&seg, 100).unwrap(),
            vec![10, 20, 30, 40, 50, 90, 70, 50]
        );
    }

    #[test]
    fn a_self_referencing_indirect_segment_is_an_error() {
        // The first segment is indirect and points at itself (offset 0): the old reader
        // recursed until the stack overflowed.
        let err = expand_segmented(&[2, 1, 0, 0], 256).unwrap_err();
        assert!(err.contains("not the start of an earlier segment"), "{err}");
        // Pointing at itself later in the data.
        let [lo, hi] = offset_words(3);
        let err = expand_segmented(&[0, 1, 5, 2, 1, lo, hi], 256).unwrap_err();
        assert!(err.contains("not the start of an earlier segment"), "{err}");
    }

    #[test]
    fn indirect_segments_may_not_refer_to_indirect_segments() {
        // The second indirect segment (word 7) points at the first (word 3).
        let [a_lo, a_hi] = offset_words(0);
        let [b_lo, b_hi] = offset_words(3);
        let seg = [0, 1, 5, 2, 1, a_lo, a_hi, 2, 1, b_lo, b_hi];
        let err = expand_segmented(&seg, 256).unwrap_err();
        assert!(err.contains("refers to the indirect segment"), "{err}");
        // Two indirect segments pointing at each other: the first points forward, which is
        // not an earlier segment.
        let [f_lo, f_hi] = offset_words(7);
        let seg = [0, 1, 5, 2, 1, f_lo, f_hi, 2, 1, b_lo, b_hi];
        let err = expand_segmented(&seg, 256).unwrap_err();
        assert!(err.contains("not the start of an earlier segment"), "{err}");
    }

    #[test]
    fn offsets_must_land_on_a_segment_start() {
        // Byte 2 is inside the discrete segment; byte 1 is not even a word.
        for offset in [2u16, 1] {
            let seg = [0, 2, 5, 6, 2, 1, offset, 0];
            let err = expand_segmented(&seg, 256).unwrap_err();
            assert!(err.contains("not the start"), "{err}");
        }
        // Copying more segments than precede the indirect one.
        let seg = [0, 1, 5, 2, 3, 0, 0];
        let err = expand_segmented(&seg, 256).unwrap_err();
        assert!(err.contains("only 1 precede"), "{err}");
    }

    #[test]
    fn replays_are_bounded_by_the_entry_count() {
        // One entry, then 10,000 indirect segments each replaying it: only `entries` values
        // come out, and the expansion stops there.
        let mut seg = vec![0u16, 1, 7];
        for _ in 0..10_000 {
            seg.extend_from_slice(&[2, 1, 0, 0]);
        }
        let lut = expand_segmented(&seg, 300).unwrap();
        assert_eq!(lut.len(), 300);
        assert!(lut.iter().all(|v| *v == 7));
        // Zero-length segments replayed over and over add no entries but cost work: 1,000
        // indirect segments each replaying 1,000 empty segments exceed the step budget.
        let mut seg = vec![0u16, 1, 7];
        for _ in 0..1_000 {
            seg.extend_from_slice(&[0, 0]);
        }
        for _ in 0..1_000 {
            seg.extend_from_slice(&[2, 1_000, 6, 0]);
        }
        let err = expand_segmented(&seg, 65_536).unwrap_err();
        assert!(err.contains("replays more segments"), "{err}");
    }

    #[test]
    fn rle_frames_decode_and_refuse_overruns() {
        // One 8-bit plane of 6 pixels: a replicate run of 4 × 9 and a literal 1, 2.
        let mut frame = vec![0u8; 64];
        frame[0] = 1;
        frame[4] = 64;
        frame.extend_from_slice(&[(-3i8) as u8, 9, 1, 1, 2]);
        assert_eq!(
            decode_rle_frame(&frame, 6, 1, 1).unwrap(),
            vec![9, 9, 9, 9, 1, 2]
        );
        // A run longer than the frame is cut at the frame's size.
        assert_eq!(decode_rle_frame(&frame, 3, 1, 1).unwrap(), vec![9, 9, 9]);
        // Too little data for the frame.
        assert!(decode_rle_frame(&frame, 7, 1, 1).is_err());
        // A segment count that does not match the image.
        assert!(decode_rle_frame(&frame, 6, 3, 1).is_err());
        // An offset past the end of the frame.
        let mut bad = frame.clone();
        bad[4] = 200;
        assert!(decode_rle_frame(&bad, 6, 1, 1).is_err());
        // A header claiming 0xFFFFFFFF segments.
        let mut bad = frame.clone();
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_rle_frame(&bad, 6, 1, 1).is_err());
        // A tiny frame claiming a huge image is refused before the frame is allocated.
        let err = decode_rle_frame(&frame, 1 << 30, 1, 1).unwrap_err();
        assert!(err.contains("cannot expand"), "{err}");
    }

    #[test]
    fn frame_data_follows_the_offset_table() {
        let frags = vec![vec![1u8, 2], vec![3u8], vec![4u8, 5, 6]];
        // One fragment per frame.
        assert_eq!(&*frame_data(&frags, &[], 3, 1).unwrap(), &[3]);
        // Two frames: fragments 0–1, then 2 (offsets count 8-byte item headers).
        let table = [0u32, 2 + 8 + 1 + 8];
        assert_eq!(&*frame_data(&frags, &table, 2, 0).unwrap(), &[1, 2, 3]);
        assert_eq!(&*frame_data(&frags, &table, 2, 1).unwrap(), &[4, 5, 6]);
        // An offset past every fragment.
        assert!(frame_data(&frags, &[0, 1_000_000], 2, 1).is_err());
        // No table entry for frame 1.
        assert!(frame_data(&frags, &[], 2, 1).is_err());
    }
}
