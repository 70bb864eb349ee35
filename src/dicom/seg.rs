//! DICOM Segmentation (SEG) output: the label map of every processed frame as a BINARY
//! segmentation that viewers (OHIF, 3D Slicer) and tools (highdicom, dcmqi) read.
//!
//! One segment per label present anywhere in the file (tendon, bone surface, acoustic shadow,
//! joint space / effusion, vessel, nerve), each with coded category and type, a display colour
//! and the algorithm's identification. Every SEG frame references its source image and frame
//! with Spatial Locations Preserved YES: the label map has the source frame's pixel grid.
//!
//! dicom-rs has no SEG module, so the header is built with its general object API and the
//! pixel data appended by hand. Frames are spooled to a temporary file as they come (one byte
//! per pixel), so a long cine is never held in memory; [`SegWriter::finish`] then writes the
//! file beside its target and renames it into place.
//!
//! Standard references: PS3.3 A.51 (Segmentation IOD), C.8.20 (Segmentation Image module),
//! C.7.6.16 (Multi-frame Functional Groups), C.7.6.17 (Multi-frame Dimension), PS3.5 8.1.1
//! (BINARY pixel data: one bit per pixel, the first pixel in the least significant bit, frames
//! packed without padding between them, only the total padded to an even length).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{dicom_value, DataElement, Length, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use ndarray::Array2;

use super::write::{new_uid, part10_bytes, pixel_data_element, Identity};
use super::DicomError;
use crate::label::Label;

/// A coded concept: (code value, coding scheme designator, code meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    /// Code Value.
    pub value: &'static str,
    /// Coding Scheme Designator (`SCT` SNOMED CT, `DCM` DICOM).
    pub scheme: &'static str,
    /// Code Meaning.
    pub meaning: &'static str,
}

const fn sct(value: &'static str, meaning: &'static str) -> Code {
    Code {
        value,
        scheme: "SCT",
        meaning,
    }
}

const fn dcm(value: &'static str, meaning: &'static str) -> Code {
    Code {
        value,
        scheme: "DCM",
        meaning,
    }
}

// Segmented property categories, from PS3.16 CID 7150 "Segmentation Property Categories".
const ANATOMICAL_STRUCTURE: Code = sct("91723000", "Anatomical Structure");
const BODY_SUBSTANCE: Code = sct("91720002", "Body Substance");
const SPATIAL_AND_RELATIONAL: Code = sct("309825002", "Spatial and Relational Concept");

/// Segmented property category and type of a label (PS3.16):
/// - tendon: SCT 13024002 "Tendon" (CID 7151);
/// - bone surface: SCT 425647002 "Bone Surface" (the echo is the cortex's surface, not the bone);
/// - acoustic shadow: DCM 112124 "Shadow" under the spatial-concept category: no SNOMED CT
///   concept names an acoustic shadow, which is an imaging finding, not a body structure;
/// - joint space / effusion: SCT 32457005 "Body fluid" under "Body Substance" (what the label
///   marks is the anechoic fluid in the recess);
/// - vessel: SCT 59820001 "Blood Vessel" (CID 7151);
/// - nerve: SCT 91728009 "Nerve" (CID 7151).
pub fn segment_codes(label: Label) -> Option<(Code, Code)> {
    Some(match label {
        Label::Background => return None,
        Label::Tendon => (ANATOMICAL_STRUCTURE, sct("13024002", "Tendon")),
        Label::Bone => (ANATOMICAL_STRUCTURE, sct("425647002", "Bone Surface")),
        Label::Shadow => (SPATIAL_AND_RELATIONAL, dcm("112124", "Shadow")),
        Label::Joint => (BODY_SUBSTANCE, sct("32457005", "Body fluid")),
        Label::Vessel => (ANATOMICAL_STRUCTURE, sct("59820001", "Blood Vessel")),
        Label::Nerve => (ANATOMICAL_STRUCTURE, sct("91728009", "Nerve")),
    })
}

/// The algorithm family written in Segmentation Algorithm Identification: DCM 123110
/// "Artificial Intelligence" (the segmenter combines rules with a learned pixel classifier).
const ALGORITHM_FAMILY: Code = dcm("123110", "Artificial Intelligence");

/// An sRGB colour as DICOM CIELab (PS3.3 C.10.7.1.1): L* 0–100 and a*, b* −128–127 scaled to
/// 0–65535, from sRGB through CIE XYZ with the D65 white point.
pub fn cielab(rgb: [u8; 3]) -> [u16; 3] {
    let lin = |c: u8| {
        let c = c as f64 / 255.0;
        if c > 0.04045 {
            ((c + 0.055) / 1.055).powf(2.4)
        } else {
            c / 12.92
        }
    };
    let (r, g, b) = (lin(rgb[0]), lin(rgb[1]), lin(rgb[2]));
    let x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.9505;
    let y = 0.2126 * r + 0.7152 * g + 0.0722 * b;
    let z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.0889;
    let f = |t: f64| {
        if t > 0.008856 {
            t.cbrt()
        } else {
            7.787 * t + 16.0 / 116.0
        }
    };
    let l = 116.0 * f(y) - 16.0;
    let a = 500.0 * (f(x) - f(y));
    let bb = 200.0 * (f(y) - f(z));
    let scale = |v: f64, lo: f64, hi: f64| {
        (((v - lo) / (hi - lo)).clamp(0.0, 1.0) * 65535.0).round() as u16
    };
    [
        scale(l, 0.0, 100.0),
        scale(a, -128.0, 127.0),
        scale(bb, -128.0, 127.0),
    ]
}

/// The source image a segmentation is derived from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SegSource {
    /// SOP Class UID of the source.
    pub sop_class_uid: String,
    /// SOP Instance UID of the source.
    pub sop_instance_uid: String,
    /// Series Instance UID of the source.
    pub series_uid: String,
    /// Whether the source is a multi-frame image (frames are then referenced by number).
    pub multi_frame: bool,
}

impl SegSource {
    /// The source's references as its data set states them; `None` when it lacks a SOP Class,
    /// SOP Instance or Series Instance UID (nothing could be referenced).
    pub fn of(source: &InMemDicomObject, multi_frame: bool) -> Option<SegSource> {
        let get = |tag| {
            source
                .get(tag)
                .and_then(|e| e.value().to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
                .filter(|s| !s.is_empty())
        };
        Some(SegSource {
            sop_class_uid: get(tags::SOP_CLASS_UID)?,
            sop_instance_uid: get(tags::SOP_INSTANCE_UID)?,
            series_uid: get(tags::SERIES_INSTANCE_UID)?,
            multi_frame,
        })
    }
}

/// Name written as Segment Algorithm Name and Algorithm Name.
pub const ALGORITHM_NAME: &str = "sonoguide";

/// What [`SegWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SegOutcome {
    /// A SEG with these labels as segments 1, 2, … in this order.
    Written(Vec<Label>),
    /// No frame held any label: a SEG needs at least one segment, so none was written.
    Empty,
}

/// Writes a BINARY DICOM SEG frame by frame (see the module documentation).
#[derive(Debug)]
pub struct SegWriter {
    path: PathBuf,
    spool_path: PathBuf,
    spool: Option<std::io::BufWriter<std::fs::File>>,
    width: usize,
    height: usize,
    identity: Identity,
    source: Option<SegSource>,
    /// Source frame numbers (1-based) of the spooled frames, in order.
    frame_numbers: Vec<u32>,
    present: [bool; Label::ALL.len()],
}

fn write_error(path: &Path) -> impl Fn(String) -> DicomError + '_ {
    move |reason| DicomError::Write {
        path: path.to_path_buf(),
        reason,
    }
}

impl SegWriter {
    /// Starts a SEG of `width × height` label maps for `identity` (same study as the source,
    /// a new series and instance), derived from `source` when its references are known.
    pub fn create(
        path: &Path,
        width: usize,
        height: usize,
        identity: Identity,
        source: Option<SegSource>,
    ) -> Result<SegWriter, DicomError> {
        let err = write_error(path);
        if width == 0 || height == 0 || width > u16::MAX as usize || height > u16::MAX as usize {
            return Err(err(format!(
                "{width}x{height} does not fit DICOM Rows/Columns"
            )));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let spool_path = path.with_file_name(format!(".{name}.labels.{}.tmp", std::process::id()));
        let file = std::fs::File::create(&spool_path)
            .map_err(|e| err(format!("{}: {e}", spool_path.display())))?;
        Ok(SegWriter {
            path: path.to_path_buf(),
            spool_path,
            spool: Some(std::io::BufWriter::new(file)),
            width,
            height,
            identity,
            source,
            frame_numbers: Vec::new(),
            present: [false; Label::ALL.len()],
        })
    }

    /// Appends the label map of source frame `frame_number` (1-based).
    pub fn push(&mut self, frame_number: u32, labels: &Array2<u8>) -> Result<(), DicomError> {
        let err = write_error(&self.path);
        if labels.dim() != (self.height, self.width) {
            return Err(err(format!(
                "a label map of {}x{} in a {}x{} segmentation",
                labels.ncols(),
                labels.nrows(),
                self.width,
                self.height
            )));
        }
        let mut bytes = Vec::with_capacity(self.width * self.height);
        for &v in labels.iter() {
            let label = Label::from_code(v)
                .ok_or_else(|| err(format!("label code {v} is not a known label")))?;
            self.present[label.code() as usize] = true;
            bytes.push(v);
        }
        let spool = self
            .spool
            .as_mut()
            .ok_or_else(|| err("the writer is finished".into()))?;
        spool.write_all(&bytes).map_err(|e| err(e.to_string()))?;
        self.frame_numbers.push(frame_number);
        Ok(())
    }

    /// The labels that become segments, in segment-number order.
    fn segments(&self) -> Vec<Label> {
        Label::ALL
            .iter()
            .copied()
            .filter(|l| *l != Label::Background && self.present[l.code() as usize])
            .collect()
    }

    /// Writes the SEG (temporary file, then rename) and removes the spool.
    pub fn finish(mut self) -> Result<SegOutcome, DicomError> {
        let path = self.path.clone();
        let err = write_error(&path);
        let spool = self
            .spool
            .take()
            .ok_or_else(|| err("the writer is finished".into()))?;
        drop(spool.into_inner().map_err(|e| err(e.error().to_string()))?);
        if self.frame_numbers.is_empty() {
            return Err(err("no frame was pushed".into()));
        }
        let segments = self.segments();
        if segments.is_empty() {
            return Ok(SegOutcome::Empty);
        }
        let frame_px = self.width * self.height;
        let seg_frames = segments.len() * self.frame_numbers.len();
        let bits = (frame_px as u128) * seg_frames as u128;
        let bytes = bits.div_ceil(8);
        let padded = bytes + bytes % 2;
        if padded >= u32::MAX as u128 {
            return Err(err(format!(
                "{seg_frames} segmentation frames of {}x{} exceed 4 GiB",
                self.width, self.height
            )));
        }
        let header = self.header(&segments)?;
        let spool_path = self.spool_path.clone();
        crate::atomic::write_atomic(&path, |tmp| {
            let file = std::fs::File::create(tmp).map_err(|e| e.to_string())?;
            let mut out = std::io::BufWriter::new(file);
            out.write_all(&header).map_err(|e| e.to_string())?;
            out.write_all(&pixel_data_element(padded as u32))
                .map_err(|e| e.to_string())?;
            let mut spool = std::fs::File::open(&spool_path)
                .map_err(|e| format!("{}: {e}", spool_path.display()))?;
            let mut frame = vec![0u8; frame_px];
            let mut packer = BitPacker::default();
            for label in &segments {
                spool.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
                for _ in 0..self.frame_numbers.len() {
                    spool.read_exact(&mut frame).map_err(|e| e.to_string())?;
                    packer.push_frame(&frame, label.code(), &mut out)?;
                }
            }
            packer.finish(&mut out)?;
            if bytes % 2 == 1 {
                out.write_all(&[0]).map_err(|e| e.to_string())?;
            }
            out.into_inner()
                .map_err(|e| e.error().to_string())?
                .sync_data()
                .map_err(|e| e.to_string())
        })
        .map_err(|e| match e {
            crate::atomic::AtomicWriteError::Write(reason) => err(reason),
            crate::atomic::AtomicWriteError::Rename(e) => err(e.to_string()),
        })?;
        Ok(SegOutcome::Written(segments))
    }

    /// Preamble, file meta group and every element but Pixel Data.
    fn header(&self, segments: &[Label]) -> Result<Vec<u8>, DicomError> {
        let err = write_error(&self.path);
        let id = &self.identity;
        let source = self.source.as_ref();
        let multi = source.is_some_and(|s| s.multi_frame);
        let n_frames = segments.len() * self.frame_numbers.len();
        let mut obj = InMemDicomObject::new_empty();
        let text = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
        let us = |tag, v: u16| DataElement::new(tag, VR::US, PrimitiveValue::from(v));
        let seq = |tag, items: Vec<InMemDicomObject>| {
            DataElement::new(tag, VR::SQ, DataSetSequence::new(items, Length::UNDEFINED))
        };
        let code_item = |c: &Code| {
            InMemDicomObject::from_element_iter([
                text(tags::CODE_VALUE, VR::SH, c.value),
                text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, c.scheme),
                text(tags::CODE_MEANING, VR::LO, c.meaning),
            ])
        };
        let (date, time) = now_date_time();
        // SOP Common, General Study, Patient.
        obj.put(text(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"));
        obj.put(text(tags::IMAGE_TYPE, VR::CS, "DERIVED\\PRIMARY"));
        obj.put(text(tags::INSTANCE_CREATION_DATE, VR::DA, &date));
        obj.put(text(tags::INSTANCE_CREATION_TIME, VR::TM, &time));
        obj.put(text(
            tags::SOP_CLASS_UID,
            VR::UI,
            uids::SEGMENTATION_STORAGE,
        ));
        obj.put(text(tags::SOP_INSTANCE_UID, VR::UI, &id.sop_instance_uid));
        obj.put(text(tags::STUDY_DATE, VR::DA, &id.study_date));
        obj.put(text(tags::SERIES_DATE, VR::DA, &date));
        obj.put(text(tags::CONTENT_DATE, VR::DA, &date));
        obj.put(text(tags::STUDY_TIME, VR::TM, &id.study_time));
        obj.put(text(tags::SERIES_TIME, VR::TM, &time));
        obj.put(text(tags::CONTENT_TIME, VR::TM, &time));
        obj.put(text(tags::ACCESSION_NUMBER, VR::SH, ""));
        obj.put(text(tags::MODALITY, VR::CS, "SEG"));
        obj.put(text(tags::MANUFACTURER, VR::LO, "sonoguide"));
        obj.put(text(tags::REFERRING_PHYSICIAN_NAME, VR::PN, ""));
        let description: String = id.series_description.chars().take(64).collect();
        obj.put(text(tags::SERIES_DESCRIPTION, VR::LO, &description));
        obj.put(text(tags::MANUFACTURER_MODEL_NAME, VR::LO, "sonoguide"));
        obj.put(text(tags::PATIENT_NAME, VR::PN, &id.patient_name));
        obj.put(text(tags::PATIENT_ID, VR::LO, &id.patient_id));
        obj.put(text(tags::PATIENT_BIRTH_DATE, VR::DA, ""));
        obj.put(text(tags::PATIENT_SEX, VR::CS, ""));
        // Enhanced General Equipment: all four are type 1.
        obj.put(text(tags::DEVICE_SERIAL_NUMBER, VR::LO, "0"));
        obj.put(text(
            tags::SOFTWARE_VERSIONS,
            VR::LO,
            env!("CARGO_PKG_VERSION"),
        ));
        obj.put(text(tags::STUDY_INSTANCE_UID, VR::UI, &id.study_uid));
        obj.put(text(tags::SERIES_INSTANCE_UID, VR::UI, &id.series_uid));
        obj.put(text(tags::STUDY_ID, VR::SH, "1"));
        obj.put(text(tags::SERIES_NUMBER, VR::IS, "901"));
        obj.put(text(tags::INSTANCE_NUMBER, VR::IS, "1"));
        // General Image: type 2C, present and empty (the probe's orientation is unknown).
        obj.put(text(tags::PATIENT_ORIENTATION, VR::CS, ""));
        for (tag, vr, v) in &id.extra {
            obj.put(text(*tag, *vr, v));
        }
        let source_ref = |frame: Option<u32>, with_purpose: bool| {
            source.map(|s| {
                let mut item = InMemDicomObject::from_element_iter([
                    text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, &s.sop_class_uid),
                    text(
                        tags::REFERENCED_SOP_INSTANCE_UID,
                        VR::UI,
                        &s.sop_instance_uid,
                    ),
                ]);
                if let (true, Some(f)) = (s.multi_frame, frame) {
                    item.put(DataElement::new(
                        tags::REFERENCED_FRAME_NUMBER,
                        VR::IS,
                        PrimitiveValue::from(f.to_string()),
                    ));
                }
                if with_purpose {
                    item.put(text(tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES"));
                    item.put(seq(
                        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                        vec![code_item(&dcm(
                            "121322",
                            "Source image for image processing operation",
                        ))],
                    ));
                }
                item
            })
        };
        // Common Instance Reference, and the General Image source reference.
        if let Some(s) = source {
            let instance = source_ref(None, false).into_iter().collect();
            obj.put(seq(
                tags::REFERENCED_SERIES_SEQUENCE,
                vec![InMemDicomObject::from_element_iter([
                    seq(tags::REFERENCED_INSTANCE_SEQUENCE, instance),
                    text(tags::SERIES_INSTANCE_UID, VR::UI, &s.series_uid),
                ])],
            ));
            obj.put(seq(
                tags::SOURCE_IMAGE_SEQUENCE,
                source_ref(None, false).into_iter().collect(),
            ));
        }
        // Multi-frame Dimension: segment number, then (cine sources) the source frame as
        // the temporal position.
        let organisation = new_uid();
        obj.put(seq(
            tags::DIMENSION_ORGANIZATION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([text(
                tags::DIMENSION_ORGANIZATION_UID,
                VR::UI,
                &organisation,
            )])],
        ));
        let dimension = |pointer: Tag, group: Tag, label: &str| {
            InMemDicomObject::from_element_iter([
                text(tags::DIMENSION_ORGANIZATION_UID, VR::UI, &organisation),
                DataElement::new(
                    tags::DIMENSION_INDEX_POINTER,
                    VR::AT,
                    PrimitiveValue::from(pointer),
                ),
                DataElement::new(
                    tags::FUNCTIONAL_GROUP_POINTER,
                    VR::AT,
                    PrimitiveValue::from(group),
                ),
                text(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label),
            ])
        };
        let mut dimensions = vec![dimension(
            tags::REFERENCED_SEGMENT_NUMBER,
            tags::SEGMENT_IDENTIFICATION_SEQUENCE,
            "Referenced Segment Number",
        )];
        if multi {
            dimensions.push(dimension(
                tags::TEMPORAL_POSITION_INDEX,
                tags::FRAME_CONTENT_SEQUENCE,
                "Temporal Position Index",
            ));
        }
        obj.put(seq(tags::DIMENSION_INDEX_SEQUENCE, dimensions));
        // Image Pixel and Segmentation Image.
        obj.put(us(tags::SAMPLES_PER_PIXEL, 1));
        obj.put(text(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            "MONOCHROME2",
        ));
        obj.put(DataElement::new(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from(n_frames.to_string()),
        ));
        obj.put(us(tags::ROWS, self.height as u16));
        obj.put(us(tags::COLUMNS, self.width as u16));
        obj.put(us(tags::BITS_ALLOCATED, 1));
        obj.put(us(tags::BITS_STORED, 1));
        obj.put(us(tags::HIGH_BIT, 0));
        obj.put(us(tags::PIXEL_REPRESENTATION, 0));
        obj.put(text(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"));
        obj.put(text(tags::SEGMENTATION_TYPE, VR::CS, "BINARY"));
        let segment_items = segments
            .iter()
            .enumerate()
            .filter_map(|(i, label)| {
                let (category, kind) = segment_codes(*label)?;
                Some(InMemDicomObject::from_element_iter([
                    seq(
                        tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
                        vec![code_item(&category)],
                    ),
                    us(tags::SEGMENT_NUMBER, (i + 1) as u16),
                    text(tags::SEGMENT_LABEL, VR::LO, label.name()),
                    seq(
                        tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE,
                        vec![InMemDicomObject::from_element_iter([
                            seq(
                                tags::ALGORITHM_FAMILY_CODE_SEQUENCE,
                                vec![code_item(&ALGORITHM_FAMILY)],
                            ),
                            text(tags::ALGORITHM_VERSION, VR::LO, env!("CARGO_PKG_VERSION")),
                            text(tags::ALGORITHM_NAME, VR::LO, ALGORITHM_NAME),
                        ])],
                    ),
                    text(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"),
                    text(tags::SEGMENT_ALGORITHM_NAME, VR::LO, ALGORITHM_NAME),
                    seq(
                        tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
                        vec![code_item(&kind)],
                    ),
                    DataElement::new(tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE, VR::US, {
                        let [l, a, b] = cielab(label.colour());
                        dicom_value!(U16, [l, a, b])
                    }),
                ]))
            })
            .collect();
        obj.put(seq(tags::SEGMENT_SEQUENCE, segment_items));
        obj.put(text(tags::SEGMENTS_OVERLAP, VR::CS, "NO"));
        obj.put(text(tags::CONTENT_LABEL, VR::CS, "SONOGUIDE"));
        obj.put(text(
            tags::CONTENT_DESCRIPTION,
            VR::LO,
            "sonoguide labels (research tool, not a certified device)",
        ));
        obj.put(text(tags::CONTENT_CREATOR_NAME, VR::PN, ""));
        // Functional groups: nothing is shared; per frame the derivation, frame content and
        // segment.
        obj.put(seq(
            tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
            vec![InMemDicomObject::new_empty()],
        ));
        let mut per_frame = Vec::with_capacity(n_frames);
        for (s, _) in segments.iter().enumerate() {
            let number = (s + 1) as u16;
            for (t, &frame_number) in self.frame_numbers.iter().enumerate() {
                let mut item = InMemDicomObject::new_empty();
                if let Some(reference) = source_ref(Some(frame_number), true) {
                    item.put(seq(
                        tags::DERIVATION_IMAGE_SEQUENCE,
                        vec![InMemDicomObject::from_element_iter([
                            seq(tags::SOURCE_IMAGE_SEQUENCE, vec![reference]),
                            seq(
                                tags::DERIVATION_CODE_SEQUENCE,
                                vec![code_item(&dcm("113076", "Segmentation"))],
                            ),
                        ])],
                    ));
                }
                let mut content = InMemDicomObject::new_empty();
                if multi {
                    let position = (t + 1) as u32;
                    content.put(DataElement::new(
                        tags::DIMENSION_INDEX_VALUES,
                        VR::UL,
                        dicom_value!(U32, [number as u32, position]),
                    ));
                    content.put(DataElement::new(
                        tags::TEMPORAL_POSITION_INDEX,
                        VR::UL,
                        PrimitiveValue::from(position),
                    ));
                } else {
                    content.put(DataElement::new(
                        tags::DIMENSION_INDEX_VALUES,
                        VR::UL,
                        PrimitiveValue::from(number as u32),
                    ));
                }
                item.put(seq(tags::FRAME_CONTENT_SEQUENCE, vec![content]));
                item.put(seq(
                    tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                    vec![InMemDicomObject::from_element_iter([us(
                        tags::REFERENCED_SEGMENT_NUMBER,
                        number,
                    )])],
                ));
                per_frame.push(item);
            }
        }
        obj.put(seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame));
        part10_bytes(obj).map_err(err)
    }
}

impl Drop for SegWriter {
    fn drop(&mut self) {
        self.spool = None;
        let _ = std::fs::remove_file(&self.spool_path);
    }
}

/// Packs one bit per pixel, the first pixel in the least significant bit, continuing across
/// frames without padding (PS3.5 8.1.1).
#[derive(Debug, Default)]
struct BitPacker {
    byte: u8,
    used: u32,
    buffer: Vec<u8>,
}

impl BitPacker {
    /// Appends one bit per pixel of `frame`: set where it holds `code`.
    fn push_frame(&mut self, frame: &[u8], code: u8, out: &mut impl Write) -> Result<(), String> {
        self.buffer.clear();
        self.buffer.reserve(frame.len() / 8 + 1);
        for &v in frame {
            if v == code {
                self.byte |= 1 << self.used;
            }
            self.used += 1;
            if self.used == 8 {
                self.buffer.push(self.byte);
                self.byte = 0;
                self.used = 0;
            }
        }
        out.write_all(&self.buffer).map_err(|e| e.to_string())
    }

    /// Writes the last, partly filled byte.
    fn finish(&mut self, out: &mut impl Write) -> Result<(), String> {
        if self.used > 0 {
            out.write_all(&[self.byte]).map_err(|e| e.to_string())?;
            self.byte = 0;
            self.used = 0;
        }
        Ok(())
    }
}

/// Today's date (YYYYMMDD) and time (HHMMSS), UTC.
fn now_date_time() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}{month:02}{day:02}"),
        format!("{:02}{:02}{:02}", rem / 3600, (rem / 60) % 60, rem % 60),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_continue_across_frames_low_bit_first() {
        // Two 3-pixel frames: 6 bits in one byte, no padding between frames.
        let mut p = BitPacker::default();
        let mut out = Vec::new();
        p.push_frame(&[1, 0, 1], 1, &mut out).unwrap();
        p.push_frame(&[0, 1, 1], 1, &mut out).unwrap();
        p.finish(&mut out).unwrap();
        assert_eq!(out, vec![0b0011_0101]);
    }

    #[test]
    fn civil_date_of_known_days() {
        let (d, _) = now_date_time();
        assert_eq!(d.len(), 8);
        assert!(d.as_str() >= "20240101", "{d}");
    }

    #[test]
    fn cielab_of_white_and_black() {
        assert_eq!(cielab([0, 0, 0]), [0, 32896, 32896]);
        let w = cielab([255, 255, 255]);
        assert_eq!(w[0], 65535);
        assert!((w[1] as i32 - 32896).abs() < 40 && (w[2] as i32 - 32896).abs() < 40);
    }

    #[test]
    fn every_label_but_background_is_coded() {
        for l in Label::ALL {
            assert_eq!(segment_codes(l).is_none(), l == Label::Background);
        }
    }
}
