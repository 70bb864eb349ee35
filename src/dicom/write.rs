//! Writing ultrasound DICOM: the phantom cases and derived (overlay) outputs.
//!
//! Files are US Image Storage (one frame) or US Multi-frame Image Storage, explicit VR little
//! endian, 8 bits per sample, with a Sequence of Ultrasound Regions item giving the calibration
//! in centimetres. They are written to a temporary file beside the target and renamed, so an
//! interrupted run never leaves a half-written file.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Length, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::InMemDicomObject;

use super::DicomError;
use crate::frame::Rect;

/// Colour model of the frames to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    /// One 8-bit sample per pixel, MONOCHROME2.
    Gray,
    /// Three 8-bit samples per pixel, interleaved RGB.
    Rgb,
}

/// Patient, study and series identity of an output file.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Identity {
    /// Patient's Name.
    pub patient_name: String,
    /// Patient ID.
    pub patient_id: String,
    /// Study Instance UID.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// Study Date (YYYYMMDD).
    pub study_date: String,
    /// Study Time (HHMMSS).
    pub study_time: String,
    /// Series Description.
    pub series_description: String,
    /// Further attributes copied verbatim from a source (patient and study details).
    pub extra: Vec<(dicom_core::Tag, VR, String)>,
}

/// The identity of an image derived from `source`: same patient and study, a new series and
/// instance, and the reference to the source for the Source Image Sequence.
pub fn derived_identity(
    source: &InMemDicomObject,
    description: &str,
) -> (Identity, Option<(String, String, String)>) {
    let get = |tag| {
        source
            .get(tag)
            .and_then(|e| e.value().to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
    };
    let study_uid = get(tags::STUDY_INSTANCE_UID)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(new_uid);
    let mut extra = Vec::new();
    for (tag, vr) in [
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::ACCESSION_NUMBER, VR::SH),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
        (tags::STUDY_ID, VR::SH),
    ] {
        if let Some(v) = get(tag) {
            extra.push((tag, vr, v));
        }
    }
    let identity = Identity {
        patient_name: get(tags::PATIENT_NAME).unwrap_or_default(),
        patient_id: get(tags::PATIENT_ID).unwrap_or_default(),
        study_uid,
        series_uid: new_uid(),
        sop_instance_uid: new_uid(),
        study_date: get(tags::STUDY_DATE)
            .filter(|d| d.len() == 8)
            .unwrap_or_else(|| "19700101".into()),
        study_time: get(tags::STUDY_TIME)
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "000000".into()),
        series_description: description.to_string(),
        extra,
    };
    let reference = match (get(tags::SOP_CLASS_UID), get(tags::SOP_INSTANCE_UID)) {
        (Some(c), Some(i)) if !c.is_empty() && !i.is_empty() => {
            Some((c, i, description.to_string()))
        }
        _ => None,
    };
    (identity, reference)
}

/// Series Description of the derived overlay DICOM.
pub const OVERLAY_SERIES: &str = "sonoguide overlay (research tool)";
/// Series Description of the DICOM SEG.
pub const SEG_SERIES: &str = "sonoguide segmentation (research tool)";

/// Frame Time written when nothing better is known (a source without Frame Time or Cine
/// Rate): 30 frames/s.
pub const DEFAULT_FRAME_TIME_MS: f64 = 33.3;

/// What a derived image inherits from its source's acquisition: the time between frames, and
/// whether lossy compression is in its history (by the source's Lossy Image Compression, or
/// by a lossy transfer syntax: once lossy, always lossy).
pub fn source_history(
    source: &InMemDicomObject,
    transfer_syntax_uid: &str,
) -> (Option<f64>, Option<(String, Option<String>)>) {
    let get = |tag| {
        source
            .get(tag)
            .and_then(|e| e.value().to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let positive = |s: Option<String>| {
        s.and_then(|v| v.split('\\').next()?.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let frame_time = positive(get(tags::FRAME_TIME))
        .or_else(|| positive(get(tags::CINE_RATE)).map(|rate| 1000.0 / rate))
        .or_else(|| positive(get(tags::RECOMMENDED_DISPLAY_FRAME_RATE)).map(|r| 1000.0 / r));
    let by_syntax = match transfer_syntax_uid.trim_end_matches('\0') {
        "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51" => Some("ISO_10918_1"),
        "1.2.840.10008.1.2.4.81" => Some("ISO_14495_1"),
        "1.2.840.10008.1.2.4.91" | "1.2.840.10008.1.2.4.93" => Some("ISO_15444_1"),
        _ => None,
    };
    let flagged = get(tags::LOSSY_IMAGE_COMPRESSION).is_some_and(|v| v == "01");
    let lossy = (flagged || by_syntax.is_some()).then(|| {
        let method = get(tags::LOSSY_IMAGE_COMPRESSION_METHOD)
            .or(by_syntax.map(str::to_string))
            .unwrap_or_else(|| "unknown".to_string());
        (method, get(tags::LOSSY_IMAGE_COMPRESSION_RATIO))
    });
    (frame_time, lossy)
}

/// An image to write: frames, geometry and calibration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UsImage {
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// Colour model.
    pub colour: Colour,
    /// One buffer per frame, row-major, `width × height × samples` bytes.
    pub frames: Vec<Vec<u8>>,
    /// Millimetres per pixel (x, y), when known: written as an ultrasound region. `None`
    /// writes no calibration (a derived image never claims one its source did not have).
    pub mm_per_px: Option<(f64, f64)>,
    /// The 2-D tissue region (full-frame pixels, end exclusive).
    pub region: Rect,
    /// Reference pixel (full-frame column, row): lateral origin and the transducer face.
    pub reference_px: (i64, i64),
    /// Time between frames in milliseconds (multi-frame only).
    pub frame_time_ms: f64,
    /// Lossy compression in the image's history: `(method, ratio)` as Lossy Image Compression
    /// Method and Ratio; `None` writes Lossy Image Compression `00`.
    pub lossy: Option<(String, Option<String>)>,
    /// Who and what the image belongs to.
    pub identity: Identity,
    /// Derived images: (SOP Class UID, SOP Instance UID) of the source, and a description.
    pub derived_from: Option<(String, String, String)>,
}

impl UsImage {
    /// An image of `frames` (each `width × height × samples` bytes) calibrated at `mm_per_px`
    /// over `region`, with `reference_px` as lateral origin and transducer face; 30 frames/s,
    /// not derived.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        width: usize,
        height: usize,
        colour: Colour,
        frames: Vec<Vec<u8>>,
        mm_per_px: Option<(f64, f64)>,
        region: Rect,
        reference_px: (i64, i64),
        identity: Identity,
    ) -> UsImage {
        UsImage {
            width,
            height,
            colour,
            frames,
            mm_per_px,
            region,
            reference_px,
            frame_time_ms: DEFAULT_FRAME_TIME_MS,
            lossy: None,
            identity,
            derived_from: None,
        }
    }
}

/// A DICOM UID under the 2.25 root (PS3.5 B.2): a 128-bit number written in decimal, taken
/// from `entropy` (hashed), so that the same inputs give the same UID.
pub fn uid_from(entropy: &[u8]) -> String {
    // Two independent 64-bit FNV-1a style hashes with different offsets, finished with
    // SplitMix64 so that nearby inputs spread over the whole range.
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x8422_2325_cbf2_9ce4;
    for &byte in entropy {
        a = (a ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        b = (b ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3 ^ 0x5bd1_e995);
    }
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let v = ((mix(a) as u128) << 64) | mix(b) as u128;
    format!("2.25.{v}")
}

/// A fresh UID, unique to this process, call and moment.
pub fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut e = Vec::new();
    e.extend_from_slice(&t.to_le_bytes());
    e.extend_from_slice(&std::process::id().to_le_bytes());
    e.extend_from_slice(&n.to_le_bytes());
    uid_from(&e)
}

fn ds(v: f64) -> String {
    // Decimal String: at most 16 characters.
    let s = format!("{v:.10}");
    let s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    s.chars().take(16).collect()
}

/// Writes `image` to `path` (atomically: temporary file, then rename).
pub fn write_us_image(path: &Path, image: &UsImage) -> Result<(), DicomError> {
    let mut writer = UsImageWriter::create(path, image, image.frames.len())?;
    for f in &image.frames {
        writer.push(f)?;
    }
    writer.finish()
}

/// Writes a US image frame by frame, so that a long cine is never held in memory: the header
/// (everything but the pixels) is written first, then each frame as it comes, into a temporary
/// file beside the target that [`UsImageWriter::finish`] renames into place. A writer dropped
/// before `finish` removes its temporary file, so no partial file is ever left under the
/// target's name.
#[derive(Debug)]
pub struct UsImageWriter {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    frame_len: usize,
    frames: usize,
    written: usize,
}

impl UsImageWriter {
    /// Starts writing `frames` frames of the geometry, calibration and identity of `image`
    /// (its `frames` field is not read) to `path`.
    pub fn create(
        path: &Path,
        image: &UsImage,
        frames: usize,
    ) -> Result<UsImageWriter, DicomError> {
        let err = write_error(path);
        let frame_len = image.width * image.height * samples_of(image.colour);
        let header = header_bytes(path, image, frames)?;
        let pixel_bytes = frame_len
            .checked_mul(frames)
            .filter(|n| *n + 1 < u32::MAX as usize)
            .ok_or_else(|| err(format!("{frames} frames of {frame_len} bytes exceed 4 GiB")))?;
        let tmp = crate::atomic::temp_path(path);
        let file = std::fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
        let mut writer = UsImageWriter {
            path: path.to_path_buf(),
            tmp,
            file: Some(std::io::BufWriter::new(file)),
            frame_len,
            frames,
            written: 0,
        };
        let element = pixel_data_element((pixel_bytes + pixel_bytes % 2) as u32);
        writer.write(&header)?;
        writer.write(&element)?;
        Ok(writer)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), DicomError> {
        use std::io::Write;
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| write_error(&self.path)("the writer is finished".into()))?;
        file.write_all(bytes)
            .map_err(|e| write_error(&self.path)(e.to_string()))
    }

    /// Appends the next frame (`width × height × samples` bytes).
    pub fn push(&mut self, frame: &[u8]) -> Result<(), DicomError> {
        if frame.len() != self.frame_len {
            return Err(write_error(&self.path)(format!(
                "every frame must hold {} bytes",
                self.frame_len
            )));
        }
        if self.written == self.frames {
            return Err(write_error(&self.path)(format!(
                "more than the {} frame(s) announced",
                self.frames
            )));
        }
        self.write(frame)?;
        self.written += 1;
        Ok(())
    }

    /// Pads, flushes and renames the file into place; fails if fewer frames than announced
    /// were pushed.
    pub fn finish(mut self) -> Result<(), DicomError> {
        let path = self.path.clone();
        let err = write_error(&path);
        if self.written != self.frames {
            return Err(err(format!(
                "{} of the {} frame(s) announced were written",
                self.written, self.frames
            )));
        }
        if (self.frame_len * self.frames) % 2 == 1 {
            self.write(&[0])?;
        }
        let file = self
            .file
            .take()
            .ok_or_else(|| err("the writer is finished".into()))?;
        // Flushed and closed before the rename (no fsync: the rename is what protects against
        // an interrupted process; power loss is beyond what a batch tool promises).
        drop(file.into_inner().map_err(|e| err(e.error().to_string()))?);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| err(e.to_string()))?;
        // Renamed: nothing left for Drop to remove.
        self.tmp = std::path::PathBuf::new();
        Ok(())
    }
}

impl Drop for UsImageWriter {
    fn drop(&mut self) {
        self.file = None;
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn write_error(path: &Path) -> impl Fn(String) -> DicomError + '_ {
    move |reason| DicomError::Write {
        path: path.to_path_buf(),
        reason,
    }
}

fn samples_of(colour: Colour) -> usize {
    match colour {
        Colour::Gray => 1,
        Colour::Rgb => 3,
    }
}

/// The file up to the pixel data: preamble, file meta group and every element but Pixel Data,
/// for `frames` frames.
fn header_bytes(path: &Path, image: &UsImage, frames: usize) -> Result<Vec<u8>, DicomError> {
    let err = write_error(path);
    if frames == 0 {
        return Err(err("no frames to write".into()));
    }
    if image.width > u16::MAX as usize || image.height > u16::MAX as usize {
        return Err(err(format!(
            "{}x{} does not fit DICOM Rows/Columns",
            image.width, image.height
        )));
    }
    let multi = frames > 1;
    let sop_class = if multi {
        uids::ULTRASOUND_MULTI_FRAME_IMAGE_STORAGE
    } else {
        uids::ULTRASOUND_IMAGE_STORAGE
    };
    let id = &image.identity;
    let mut obj = InMemDicomObject::new_empty();
    let mut put_str = |tag, vr, v: &str| {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    };
    put_str(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100");
    let image_type = if image.derived_from.is_some() {
        "DERIVED\\SECONDARY"
    } else {
        "ORIGINAL\\PRIMARY"
    };
    put_str(tags::IMAGE_TYPE, VR::CS, image_type);
    put_str(tags::SOP_CLASS_UID, VR::UI, sop_class);
    put_str(tags::SOP_INSTANCE_UID, VR::UI, &id.sop_instance_uid);
    put_str(tags::STUDY_DATE, VR::DA, &id.study_date);
    put_str(tags::SERIES_DATE, VR::DA, &id.study_date);
    put_str(tags::CONTENT_DATE, VR::DA, &id.study_date);
    put_str(tags::STUDY_TIME, VR::TM, &id.study_time);
    put_str(tags::SERIES_TIME, VR::TM, &id.study_time);
    put_str(tags::CONTENT_TIME, VR::TM, &id.study_time);
    put_str(tags::ACCESSION_NUMBER, VR::SH, "");
    put_str(tags::MODALITY, VR::CS, "US");
    put_str(tags::MANUFACTURER, VR::LO, "sonoguide");
    put_str(tags::REFERRING_PHYSICIAN_NAME, VR::PN, "");
    // LO holds at most 64 characters.
    let description: String = id.series_description.chars().take(64).collect();
    put_str(tags::SERIES_DESCRIPTION, VR::LO, &description);
    put_str(tags::PATIENT_NAME, VR::PN, &id.patient_name);
    put_str(tags::PATIENT_ID, VR::LO, &id.patient_id);
    put_str(tags::PATIENT_BIRTH_DATE, VR::DA, "");
    put_str(tags::PATIENT_SEX, VR::CS, "");
    put_str(tags::STUDY_INSTANCE_UID, VR::UI, &id.study_uid);
    put_str(tags::SERIES_INSTANCE_UID, VR::UI, &id.series_uid);
    put_str(tags::STUDY_ID, VR::SH, "1");
    put_str(tags::SERIES_NUMBER, VR::IS, "1");
    put_str(tags::INSTANCE_NUMBER, VR::IS, "1");
    put_str(tags::PATIENT_ORIENTATION, VR::CS, "");
    put_str(tags::LATERALITY, VR::CS, "");
    match &image.lossy {
        None => put_str(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        Some((method, ratio)) => {
            put_str(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "01");
            if let Some(r) = ratio {
                put_str(tags::LOSSY_IMAGE_COMPRESSION_RATIO, VR::DS, r);
            }
            put_str(tags::LOSSY_IMAGE_COMPRESSION_METHOD, VR::CS, method);
        }
    }
    put_str(
        tags::BURNED_IN_ANNOTATION,
        VR::CS,
        if image.colour == Colour::Rgb {
            "YES"
        } else {
            "NO"
        },
    );
    for (tag, vr, v) in &id.extra {
        put_str(*tag, *vr, v);
    }
    if let Some((class, instance, description)) = &image.derived_from {
        put_str(tags::DERIVATION_DESCRIPTION, VR::ST, description);
        let item = InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::REFERENCED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from(class.as_str()),
            ),
            DataElement::new(
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(instance.as_str()),
            ),
        ]);
        obj.put(DataElement::new(
            tags::SOURCE_IMAGE_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(vec![item], Length::UNDEFINED),
        ));
    }
    let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
    obj.put(us(tags::SAMPLES_PER_PIXEL, samples_of(image.colour) as u16));
    let pi = match image.colour {
        Colour::Gray => "MONOCHROME2",
        Colour::Rgb => "RGB",
    };
    obj.put(DataElement::new(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        PrimitiveValue::from(pi),
    ));
    if image.colour == Colour::Rgb {
        obj.put(us(tags::PLANAR_CONFIGURATION, 0));
    }
    obj.put(us(tags::ROWS, image.height as u16));
    obj.put(us(tags::COLUMNS, image.width as u16));
    obj.put(us(tags::BITS_ALLOCATED, 8));
    obj.put(us(tags::BITS_STORED, 8));
    obj.put(us(tags::HIGH_BIT, 7));
    obj.put(us(tags::PIXEL_REPRESENTATION, 0));
    if multi {
        obj.put(DataElement::new(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from(frames.to_string()),
        ));
        obj.put(DataElement::new(
            tags::FRAME_INCREMENT_POINTER,
            VR::AT,
            PrimitiveValue::from(tags::FRAME_TIME),
        ));
        obj.put(DataElement::new(
            tags::FRAME_TIME,
            VR::DS,
            PrimitiveValue::from(ds(image.frame_time_ms)),
        ));
    }
    // The calibration, as scanners write it: one 2-D tissue region in centimetres; none when
    // the spacing is not known.
    if let Some(mm_per_px) = image.mm_per_px {
        let r = image.region;
        let ul = |tag, v: u32| DataElement::new(tag, VR::UL, PrimitiveValue::from(v));
        let sl = |tag, v: i32| DataElement::new(tag, VR::SL, PrimitiveValue::from(v));
        let fd = |tag, v: f64| DataElement::new(tag, VR::FD, PrimitiveValue::from(v));
        let region_item = InMemDicomObject::from_element_iter([
            us(tags::REGION_SPATIAL_FORMAT, 1),
            us(tags::REGION_DATA_TYPE, 1),
            ul(tags::REGION_FLAGS, 0),
            ul(tags::REGION_LOCATION_MIN_X0, r.x0 as u32),
            ul(tags::REGION_LOCATION_MIN_Y0, r.y0 as u32),
            ul(tags::REGION_LOCATION_MAX_X1, r.x1.saturating_sub(1) as u32),
            ul(tags::REGION_LOCATION_MAX_Y1, r.y1.saturating_sub(1) as u32),
            sl(
                tags::REFERENCE_PIXEL_X0,
                (image.reference_px.0 - r.x0 as i64) as i32,
            ),
            sl(
                tags::REFERENCE_PIXEL_Y0,
                (image.reference_px.1 - r.y0 as i64) as i32,
            ),
            us(tags::PHYSICAL_UNITS_X_DIRECTION, 3),
            us(tags::PHYSICAL_UNITS_Y_DIRECTION, 3),
            fd(tags::REFERENCE_PIXEL_PHYSICAL_VALUE_X, 0.0),
            fd(tags::REFERENCE_PIXEL_PHYSICAL_VALUE_Y, 0.0),
            fd(tags::PHYSICAL_DELTA_X, mm_per_px.0 / 10.0),
            fd(tags::PHYSICAL_DELTA_Y, mm_per_px.1 / 10.0),
        ]);
        obj.put(DataElement::new(
            tags::SEQUENCE_OF_ULTRASOUND_REGIONS,
            VR::SQ,
            DataSetSequence::new(vec![region_item], Length::UNDEFINED),
        ));
    }
    part10_bytes(obj).map_err(err)
}

/// `obj` as a Part 10 file (preamble, file meta group, data set) in explicit VR little
/// endian, for a header to which Pixel Data is appended.
pub(crate) fn part10_bytes(obj: InMemDicomObject) -> Result<Vec<u8>, String> {
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
                .implementation_version_name("SONOGUIDE_01"),
        )
        .map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.write_all(&mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// The start of a Pixel Data (7FE0,0010) element in explicit VR little endian: tag, "OB", two
/// reserved bytes and the 32-bit length `padded` (even); the pixel bytes follow. It is the
/// last element of the data set, so appending it after the header keeps tags in order.
pub(crate) fn pixel_data_element(padded: u32) -> [u8; 12] {
    let mut e = [0u8; 12];
    e[0..2].copy_from_slice(&0x7FE0u16.to_le_bytes());
    e[2..4].copy_from_slice(&0x0010u16.to_le_bytes());
    e[4..8].copy_from_slice(b"OB\0\0");
    e[8..12].copy_from_slice(&padded.to_le_bytes());
    e
}

/// The implementation class UID written in the file meta group.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.180368217318236457392176425036213839061";
